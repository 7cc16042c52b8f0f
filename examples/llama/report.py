"""What a run, or several, leave behind: the summary, loss plots and tables.

:func:`summarize` condenses a run into the dictionary written to
``summary.json`` (and returned by ``train.train``); :func:`format_summary`
prints it, :func:`summary_table` sets several side by side, and
:func:`plot_losses` draws the loss curves of one run or several in one plot.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from examples.llama import config as config_lib
from examples.llama import model as model_lib
from grassjax.diagnostics import state_bytes


def device_peak_bytes() -> int | None:
  """The most memory the first local device has held so far, where the backend
  reports it (GPUs and TPUs do, CPUs do not): a real step's peak, next to the
  compiler's estimate of ``--dry-run``."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def summarize(
  cfg: config_lib.TrainConfig,
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation,
  *,
  devices: int,
  records: Sequence[dict[str, Any]],
  final_eval: dict[str, float] | None,
  tokens_per_sec: float | None,
  wall_seconds: float,
  preempted_at: int | None = None,
) -> dict[str, Any]:
  """A run's summary: final losses, throughput, and its optimizer state against
  AdamW's.

  Args:
    cfg: the run's configuration.
    model_config: its model.
    tx: its optimizer (its state is sized from shapes; nothing is allocated).
    devices: the devices it ran on.
    records: its metrics records.
    final_eval: the final evaluation's ``eval_loss`` and ``eval_ppl``;
      ``None`` for a run stopped before its end.
    tokens_per_sec: the training throughput (``None`` if not measured).
    wall_seconds: the run's wall time.
    preempted_at: the step after which a stop signal ended the run.

  Returns:
    A JSON-friendly dictionary, ``config`` holding every field of ``cfg``.
  """
  # Resumed from the final checkpoint into a new --out-dir, the run has no
  # training loss of its own.
  last_train = next((r for r in reversed(records) if "loss" in r), {})
  params = model_lib.abstract_params(model_config)
  optimizer_bytes = state_bytes(jax.eval_shape(tx.init, params))
  adamw_bytes = state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  return {
    "optimizer": cfg.optimizer,
    "model": cfg.model,
    "steps": cfg.steps,
    "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
    "devices": devices,
    "param_count": model_lib.param_count(model_config),
    "final_train_loss": last_train.get("loss"),
    "final_energy_fraction": {
      k: v for k, v in last_train.items() if k.startswith("energy_")
    },
    "final_eval_loss": None if final_eval is None else final_eval["eval_loss"],
    "final_eval_ppl": None if final_eval is None else final_eval["eval_ppl"],
    "preempted_at": preempted_at,
    "skipped_steps": sum(1 for r in records if r.get("skipped")),
    "tokens_per_sec": tokens_per_sec,
    "optimizer_state_bytes": optimizer_bytes,
    "adamw_state_bytes": adamw_bytes,
    "state_bytes_ratio_to_adamw": optimizer_bytes / adamw_bytes,
    "wall_seconds": wall_seconds,
    "device_peak_bytes": device_peak_bytes(),
    "config": dataclasses.asdict(cfg),
  }


def write_report(
  out_dir: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]
) -> None:
  """Writes ``summary.json`` and, if the run has records, ``loss.png``."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if records:
    title = f"{summary['model']} / {summary['optimizer']}"
    plot_losses({"": records}, out_dir / "loss.png", title)


def _tokens_per_sec(summary: dict[str, Any]) -> str:
  rate = summary["tokens_per_sec"]
  return "n/a" if rate is None else f"{rate:,.0f}"


def format_summary(summary: dict[str, Any]) -> str:
  """A few readable lines of a run's summary."""
  return "\n".join(
    [
      f"{summary['model']} ({summary['param_count']:,} parameters),"
      f" {summary['optimizer']}, {summary['steps']} steps",
      f"  final eval loss     {summary['final_eval_loss']:.4f}"
      f"  (perplexity {summary['final_eval_ppl']:.2f})",
      f"  throughput          {_tokens_per_sec(summary)} tokens/s",
      "  optimizer state     "
      f"{summary['optimizer_state_bytes'] / 2**20:,.2f} MiB"
      f"  (AdamW: {summary['adamw_state_bytes'] / 2**20:,.2f} MiB,"
      f" ratio {summary['state_bytes_ratio_to_adamw']:.3f})",
      f"  wall time           {summary['wall_seconds']:.0f} s",
    ]
    + [
      f"  energy fraction     {kind.removeprefix('energy_'):9s} {value:.3f}"
      for kind, value in summary["final_energy_fraction"].items()
    ]
  )


def markdown_table(
  header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = ""
) -> str:
  """A markdown table; floats get 4 significant digits.

  ``align`` gives a letter per column, ``l`` (left) or ``r`` (right, for
  numbers); columns it does not reach are left-aligned.
  """

  def cell(value: Any) -> str:
    if isinstance(value, float):
      return f"{value:.4g}"
    return str(value)

  rules = {"l": "---|", "r": "---:|"}
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "".join(rules[a] for a in align.ljust(len(header), "l")),
  ]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
  """Runs side by side, one row each: loss, perplexity, tokens/s, optimizer
  state."""
  header = (
    "optimizer",
    "final eval loss",
    "perplexity",
    "tokens/s",
    "optimizer state (MiB)",
    "ratio to AdamW",
  )
  rows = [
    (
      s["optimizer"],
      f"{s['final_eval_loss']:.4f}",
      f"{s['final_eval_ppl']:.2f}",
      _tokens_per_sec(s),
      f"{s['optimizer_state_bytes'] / 2**20:,.2f}",
      f"{s['state_bytes_ratio_to_adamw']:.3f}",
    )
    for s in summaries
  ]
  return markdown_table(header, rows, align="lrrrrr")


def plot_losses(
  runs: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str
) -> None:
  """Writes the training and validation loss curves of ``runs`` to ``path``.

  Args:
    runs: each run's metrics records, by the label its curves get (``""``
      for none).
    path: the image file.
    title: the plot's title.
  """
  # A bare Figure needs no backend and leaves pyplot's state (and a notebook's
  # inline display) alone.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 5))
  ax = fig.subplots()
  for i, (label, records) in enumerate(runs.items()):
    _plot_run(ax, records, label, color=f"C{i}")
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.grid(alpha=0.3)
  ax.legend(ncol=2, fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_run(
  ax, records: Sequence[dict[str, Any]], label: str, color: str
) -> None:
  """Adds one run's training loss (smoothed) and validation loss to ``ax``."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  prefix = f"{label} " if label else ""
  if train:
    steps, losses = map(np.asarray, zip(*train, strict=True))
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
    ax.plot(steps[window - 1 :], smooth, color=color, label=f"{prefix}train")
  if evals:
    steps, losses = zip(*evals, strict=True)
    ax.plot(
      steps, losses, "o--", color=color, markersize=4, label=f"{prefix}eval"
    )
