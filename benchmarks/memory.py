"""Memory: optimizer-state bytes of the LLaMA configs, and the peak memory of a
step.

    python -m benchmarks.memory  # state bytes 60m ... 7b, peak on 60m
    python -m benchmarks.memory --peak-model 130m

1. **State bytes** (``jax.eval_shape``: nothing is allocated) of adamw, galore,
   grasswalk, grassjump and subtrack_pp for each named LLaMA config at the
   papers' rank, next to the theoretical minimum: for a projected ``(m, n)``
   kernel, an ``(min(m, n), r)`` basis and two ``(r, max(m, n))`` moments, plus
   one recovery norm with recovery scaling; two full moments for every other
   parameter; the step count and PRNG key. Target: state bytes = minimum.
   The low-rank optimizers' state is also given with ``moment_dtype=bfloat16``
   (both moments of every parameter in bfloat16, the bases in float32).
2. **Peak memory of one training step** (``jit(step).lower(...).compile()
   .memory_analysis()``: arguments + outputs + temporaries - donated aliases)
   of the LLaMA example's full step (forward, backward, clip, update) for each
   optimizer, as a ratio to AdamW's. The state-bytes ratio predicts
   ``(peak_adamw - state_adamw + state_opt) / peak_adamw``; the target is a
   measured ratio no larger (no ``(m, n)`` temporaries beyond the gradient
   and the update).
3. **The whole step at scale** (:func:`scale_table`): 1b and 7b, each
   optimizer, plain / fused / fused with bfloat16 weights and state, and
   which of 24, 40 and 80 GiB each fits.

Results go to ``benchmarks/results/memory-<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers

import grassjax
from benchmarks import common
from benchmarks.speed import OPTIMIZERS, PAPER_RANKS, make_optimizer
from examples.llama import config as config_lib
from examples.llama import memory as memory_lib
from examples.llama import model as model_lib
from grassjax import diagnostics

MODELS = ("60m", "130m", "350m", "1b", "7b")
F32 = 4


def minimum_state_bytes(params, name: str, rank: int) -> int:
  """The fewest bytes the optimizer ``name`` can keep, from the parameter
  shapes."""
  if name == "adamw":
    return (
      2 * F32 * sum(math.prod(p.shape) for p in jax.tree.leaves(params)) + 4
    )
  low_rank = jax.tree.leaves(model_lib.low_rank_mask(params))
  total = 4  # the step count
  info = grassjax.OPTIMIZERS[name]
  if info.needs_key:
    total += 8  # the PRNG key, two uint32
  recovery = info.defaults["recovery_scaling"]
  for p, projected in zip(jax.tree.leaves(params), low_rank, strict=True):
    if projected:
      *batch, a, b = p.shape
      floats = min(a, b) * rank + 2 * rank * max(a, b) + (1 if recovery else 0)
      total += F32 * math.prod(batch) * floats
    else:
      total += F32 * 2 * math.prod(p.shape)
  return total


def state_bytes_table(models) -> list[dict]:
  """State bytes of each optimizer on each config, against the minimum and
  AdamW."""
  records = []
  for model in models:
    params = model_lib.abstract_params(model_lib.get_config(model))
    rank = PAPER_RANKS[model]
    adamw = None
    for name in ("adamw", *OPTIMIZERS):
      tx = make_optimizer(name, rank, update_interval=200)
      measured = diagnostics.state_bytes(jax.eval_shape(tx.init, params))
      if name == "adamw":
        adamw = measured
      minimum = minimum_state_bytes(params, name, rank)
      bf16_moments = None
      if name != "adamw":
        tx = make_optimizer(
          name, rank, update_interval=200, moment_dtype=jnp.bfloat16
        )
        bf16_moments = diagnostics.state_bytes(jax.eval_shape(tx.init, params))
      records.append(
        {
          "model": model,
          "optimizer": name,
          "rank": rank,
          "state_bytes": measured,
          "minimum_bytes": minimum,
          "state_over_minimum": measured / minimum,
          "ratio_to_adamw": measured / adamw,
          "bf16_moments_bytes": bf16_moments,
        }
      )
      print(
        f"state {model:5s} {name:12s} {measured / 2**30:8.3f} GiB"
        f"  / minimum {measured / minimum:.4f}  / adamw {measured / adamw:.3f}"
      )
  return records


def peak_step_memory(model: str, batch_size: int, seq_len: int) -> list[dict]:
  """Compiled peak memory of one full training step for each optimizer."""
  records = []
  adamw = None
  for name in ("adamw", *OPTIMIZERS):
    cfg = config_lib.TrainConfig(
      optimizer=name,
      model=model,
      rank=PAPER_RANKS[model],
      update_interval=200,
      batch_size=batch_size,
      seq_len=seq_len,
    )
    memory = memory_lib.step_memory(
      cfg, config_lib.model_config(cfg, vocab_size=32000)
    )
    peak, state_bytes = memory["peak"], memory["optimizer_state"]
    if adamw is None:
      adamw = {"peak": peak, "state": state_bytes}
    predicted = (adamw["peak"] - adamw["state"] + state_bytes) / adamw["peak"]
    records.append(
      {
        "model": model,
        "optimizer": name,
        "batch": [batch_size, seq_len],
        "peak_bytes": peak,
        "temp_bytes": memory["temporaries"],
        "optimizer_state_bytes": state_bytes,
        "peak_ratio_to_adamw": peak / adamw["peak"],
        "predicted_ratio_from_state": predicted,
      }
    )
    print(
      f"peak  {model:5s} {name:12s} {peak / 2**20:9.1f} MiB  / adamw"
      f" {peak / adamw['peak']:.3f}  (state bytes predict {predicted:.3f})"
    )
  return records


# The step settings of the scale table: LLaMA as people train it at 1B and 7B.
SCALE_STEP = dict(remat=True, dtype="bfloat16", batch_size=4, seq_len=256)
BF16_STATE = dict(
  param_dtype="bfloat16", moment_dtype="bfloat16", basis_dtype="bfloat16"
)
SCALE_MODES = {
  "unscanned": dict(scan_layers=False),
  "plain": dict(scan_layers=True),
  "fused": dict(scan_layers=True, fused_update=True, clip="per-layer"),
  "fused + bf16": dict(
    scan_layers=True, fused_update=True, clip="per-layer", **BF16_STATE
  ),
}
PEER = "optax.contrib.galore"


def peer_optimizer(cfg: config_lib.TrainConfig) -> optax.GradientTransformation:
  """``optax.contrib.galore`` as the trainer would run it: the same kernels,
  rank, interval, scale and schedule, after the same global clipping.

  It projects two-dimensional leaves only (it has no batch axes), so stacked
  (scanned) kernels get its base optimizer, full Adam.
  """

  def dimension_numbers(params):
    return jax.tree.map(
      lambda projected, p: (
        GaLoreDimensionNumbers() if projected and p.ndim == 2 else None
      ),
      model_lib.low_rank_mask(params),
      params,
    )

  peer = optax.contrib.galore(
    config_lib.learning_rate_schedule(cfg),
    rank=cfg.rank,
    update_proj_gap=cfg.update_interval,
    scale=cfg.scale,
    weight_decay=cfg.weight_decay,
    weight_dimension_numbers=dimension_numbers,
  )
  return optax.chain(optax.clip_by_global_norm(1.0), peer)


def scale_table(models) -> list[dict]:
  """Compiled peak of the whole step at scale: each optimizer in each mode.

  ``--remat --dtype bfloat16``, batch 4 x 256, the papers' ranks, vocabulary
  32000; modes: unscanned layers, scanned (plain: float32 weights, global
  clipping), fused (``--fused-update --clip per-layer``) and fused with
  bfloat16 weights, moments and bases. The peer, ``optax.contrib.galore``,
  runs where it can (the whole-model step). The same figures as ``python -m
  examples.llama.train ... --dry-run``.
  """
  records = []
  for model in models:
    for mode, flags in SCALE_MODES.items():
      fused = flags.get("fused_update", False)
      for name in ("adamw", *OPTIMIZERS, *(() if fused else (PEER,))):
        if mode == "unscanned" and name not in ("adamw", "galore", PEER):
          continue
        settings = dict(SCALE_STEP, **flags)
        if name in ("adamw", PEER):
          settings.pop("moment_dtype", None)
          settings.pop("basis_dtype", None)
        cfg = config_lib.TrainConfig(
          optimizer="galore" if name == PEER else name,
          model=model,
          rank=PAPER_RANKS[model],
          **settings,
        )
        tx = peer_optimizer(cfg) if name == PEER else None
        memory = memory_lib.step_memory(
          cfg, config_lib.model_config(cfg, 32000), tx
        )
        fits = [size for size in (24, 40, 80) if memory["peak"] <= size * 2**30]
        records.append(
          {
            "model": model,
            "mode": mode,
            "optimizer": name,
            **memory,
            "fits_gib": fits,
          }
        )
        print(
          f"scale {model:4s} {mode:13s} {name:20s} peak"
          f" {memory['peak'] / 2**30:7.2f} GiB"
        )
  return records


def plot_scale(records: list[dict], path: Path) -> None:
  """Peak against model size, one line per optimizer and mode."""
  from matplotlib.figure import Figure

  sizes = {
    m: model_lib.param_count(model_lib.get_config(m)) / 1e9
    for m in {r["model"] for r in records}
  }
  fig = Figure(figsize=(7.5, 4.8))
  ax = fig.subplots()
  lines = {}
  for r in records:
    lines.setdefault((r["optimizer"], r["mode"]), []).append(
      (sizes[r["model"]], r["peak"] / 2**30)
    )
  for (name, mode), points in sorted(lines.items()):
    if name not in ("adamw", "grasswalk", PEER):
      continue
    xs, ys = zip(*sorted(points), strict=True)
    ax.plot(xs, ys, "o-", label=f"{name}, {mode}")
  for size in (24, 40, 80):
    ax.axhline(size, color="k", alpha=0.25, linestyle="--")
    ax.text(min(sizes.values()), size, f" {size} GiB", va="bottom", fontsize=8)
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="parameters (billions)",
    ylabel="compiled peak of one step (GiB)",
    title="LLaMA training step, batch 4 x 256, CPU compiler (compile-only)",
  )
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--peak-model", default="60m", choices=tuple(PAPER_RANKS))
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--scale-models", default="350m,1b,7b")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]

  states = state_bytes_table(models)
  peaks = peak_step_memory(args.peak_model, args.batch_size, args.seq_len)
  scale = scale_table([m for m in args.scale_models.split(",") if m])
  tables = (
    "## Peak memory of the whole training step at scale (compile-only, CPU"
    " compiler, memory-optimized schedule)\n\n"
    "`--remat --dtype bfloat16`, batch 4 x 256, papers' ranks,"
    " vocabulary 32000; GiB per device. Modes: unscanned layers; scanned"
    " (`--scan-layers`, float32 weights, global clipping); fused"
    " (`--fused-update --clip per-layer`); fused with bfloat16 weights, moments"
    " and bases. optax.contrib.galore cannot project stacked (scanned) kernels"
    " and keeps full Adam moments for them.\n\n"
    + common.markdown_table(
      (
        "model",
        "mode",
        "optimizer",
        "params",
        "state",
        "temporaries",
        "peak",
        "fits",
      ),
      [
        (
          r["model"],
          r["mode"],
          r["optimizer"],
          r["parameters"] / 2**30,
          r["optimizer_state"] / 2**30,
          r["temporaries"] / 2**30,
          r["peak"] / 2**30,
          ", ".join(f"{s} GiB" for s in r["fits_gib"]) or "none",
        )
        for r in scale
      ],
    )
    + "\n"
    "## Optimizer-state bytes (papers' ranks: 60m 128, 130m/350m 256, 1b 512,"
    " 7b 1024)\n\n"
    + common.markdown_table(
      (
        "model",
        "optimizer",
        "rank",
        "state (GiB)",
        "state / minimum",
        "state / adamw",
        "with bf16 moments (GiB)",
      ),
      [
        (
          r["model"],
          r["optimizer"],
          r["rank"],
          r["state_bytes"] / 2**30,
          r["state_over_minimum"],
          r["ratio_to_adamw"],
          ""
          if r["bf16_moments_bytes"] is None
          else r["bf16_moments_bytes"] / 2**30,
        )
        for r in states
      ],
    )
    + f"\n## Peak memory of one training step, LLaMA {args.peak_model}, batch"
    f" {args.batch_size} x {args.seq_len}\n\n"
    + common.markdown_table(
      ("optimizer", "peak (MiB)", "peak / adamw", "predicted by state bytes"),
      [
        (
          r["optimizer"],
          r["peak_bytes"] / 2**20,
          r["peak_ratio_to_adamw"],
          r["predicted_ratio_from_state"],
        )
        for r in peaks
      ],
    )
  )
  path = common.write_results(
    "memory",
    {"peak_model": args.peak_model, "batch": [args.batch_size, args.seq_len]},
    states + peaks + scale,
    tables,
  )
  plot_scale(scale, path.with_suffix(".png"))
  print(
    f"\nwrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}"
  )


if __name__ == "__main__":
  main()
