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
   (both moments of every parameter in bfloat16, the bases in float32), and
   every optimizer's with 8-bit moments (``--moment-dtype 8bit``).
2. **Peak memory of one training step** (``jit(step).lower(...).compile()
   .memory_analysis()``: arguments + outputs + temporaries - donated aliases)
   of the LLaMA example's full step (forward, backward, clip, update) for each
   optimizer, as a ratio to AdamW's. The state-bytes ratio predicts
   ``(peak_adamw - state_adamw + state_opt) / peak_adamw``; the target is a
   measured ratio no larger (no ``(m, n)`` temporaries beyond the gradient
   and the update).
3. **The whole step at scale** (:func:`scale_table`): 1b and 7b, each
   optimizer, plain / fused / fused with bfloat16 weights and state / the
   same with 8-bit moments, and which of 24, 40 and 80 GiB each fits.

Results go to ``benchmarks/results/memory-<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
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
from examples.llama import targets as targets_lib
from grassjax import diagnostics

MODELS = ("60m", "130m", "350m", "1b", "7b")
F32 = 4
GiB = 2**30


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
      tx = make_optimizer(name, rank, update_interval=200, moment_dtype="8bit")
      moments_8bit = diagnostics.state_bytes(jax.eval_shape(tx.init, params))
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
          "8bit_moments_bytes": moments_8bit,
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
  "fused + bf16 + 8-bit": dict(
    scan_layers=True,
    fused_update=True,
    clip="per-layer",
    **dict(BF16_STATE, moment_dtype="8bit"),
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


def scale_runs(models, optimizers=None, modes=None):
  """The scale table's rows: ``(model, mode, optimizer)``.

  The peer runs where it can (the whole-model step), and the unscanned mode
  is kept to AdamW, GaLore and the peer. ``optimizers`` and ``modes``
  restrict the table (None: all).
  """
  runs = []
  for model in models:
    for mode, flags in SCALE_MODES.items():
      if modes is not None and mode not in modes:
        continue
      fused = flags.get("fused_update", False)
      for name in ("adamw", *OPTIMIZERS, *(() if fused else (PEER,))):
        if mode == "unscanned" and name not in ("adamw", "galore", PEER):
          continue
        if optimizers is None or name in optimizers:
          runs.append((model, mode, name))
  return runs


def scale_config(
  model: str, mode: str, name: str, mesh: str = "none"
) -> config_lib.TrainConfig:
  """The trainer's configuration of one row of the scale table."""
  settings = dict(SCALE_STEP, **SCALE_MODES[mode])
  if name in ("adamw", PEER):
    # AdamW takes 8-bit moments (grassjax.adamw), the peer none.
    if name == PEER or settings.get("moment_dtype") != "8bit":
      settings.pop("moment_dtype", None)
    settings.pop("basis_dtype", None)
  return config_lib.TrainConfig(
    optimizer="galore" if name == PEER else name,
    model=model,
    rank=PAPER_RANKS[model],
    mesh=mesh,
    **settings,
  )


def scale_record(
  model: str,
  mode: str,
  name: str,
  target: targets_lib.Target,
  mesh: str = "none",
) -> dict:
  """One row: the compiled peak of the step on ``target``, or the TPU
  compiler's refusal (``refused``, with what it needed and had)."""
  cfg = scale_config(model, mode, name, mesh)
  tx = peer_optimizer(cfg) if name == PEER else None
  record = {
    "model": model,
    "mode": mode,
    "optimizer": name,
    "target": target.name,
    "mesh": mesh,
    "devices": 1 if mesh == "none" else target.count,
  }
  started = time.perf_counter()
  try:
    memory = memory_lib.step_memory(
      cfg, config_lib.model_config(cfg, 32000), tx, target
    )
  except targets_lib.CompileRefused as refused:
    record.update(
      refused=True,
      needed_bytes=refused.needed_bytes,
      available_bytes=refused.available_bytes,
      peak=None,
    )
  else:
    record.update(memory, refused=False)
    if target.spec is None:
      record["fits_gib"] = [
        size for size in (24, 40, 80) if memory["peak"] <= size * GiB
      ]
  record["compile_seconds"] = round(time.perf_counter() - started, 1)
  return record


def _key(record: dict) -> tuple:
  return (
    record["model"],
    record["mode"],
    record["optimizer"],
    record.get("target", "cpu"),
    record.get("mesh", "none"),
  )


def scale_table(
  runs,
  target: targets_lib.Target,
  mesh: str = "none",
  done: Sequence[dict] = (),
  save: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
  """Compiled peak of the whole step at scale: each run of
  :func:`scale_runs`.

  ``--remat --dtype bfloat16``, batch 4 x 256, the papers' ranks, vocabulary
  32000; modes: unscanned layers, scanned (plain: float32 weights, global
  clipping), fused (``--fused-update --clip per-layer``) and fused with
  bfloat16 weights, moments and bases. The same figures as ``python -m
  examples.llama.train ... --dry-run --target ...``. Rows in ``done`` (an
  earlier run's records) are reused; ``save`` is called with the records so
  far after each new row, so a long run that stops keeps what it compiled.
  """
  reuse = {_key(r): r for r in done}
  records = []
  for model, mode, name in runs:
    key = (model, mode, name, target.name, mesh)
    if key in reuse:
      records.append(reuse[key])
      continue
    record = scale_record(model, mode, name, target, mesh)
    records.append(record)
    peak = (
      f"refused (needs {record['needed_bytes'] / GiB:.2f} GiB)"
      if record["refused"]
      else f"{record['peak'] / GiB:7.2f} GiB"
    )
    print(
      f"scale {target.name} {model:4s} {mode:13s} {name:20s} peak {peak}"
      f" ({record['compile_seconds']} s to compile)",
      flush=True,
    )
    if save is not None:
      save(records)
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


SCALE_HEADER = (
  "`--remat --dtype bfloat16`, batch 4 x 256, papers' ranks, vocabulary"
  " 32000; GiB per device. Modes: unscanned layers; scanned (`--scan-layers`,"
  " float32 weights, global clipping); fused (`--fused-update --clip"
  " per-layer`); fused with bfloat16 weights, moments and bases; the same"
  " with block-wise 8-bit moments (`--moment-dtype 8bit`; AdamW's too)."
  " optax.contrib.galore cannot project stacked (scanned) kernels and keeps"
  " full Adam moments for them."
)


def fit_cell(record: dict, target: targets_lib.Target) -> str:
  """The fit column: the CPU table's sizes, the TPU compiler's verdict, or a
  GPU fit with the runtime's needs counted (:func:`targets.gpu_fit`)."""
  if record["refused"]:
    return (
      f"refused: needs {record['needed_bytes'] / GiB:.2f} of"
      f" {record['available_bytes'] / GiB:.2f} GiB"
    )
  if target.spec is None:
    return ", ".join(f"{s} GiB" for s in record["fits_gib"]) or "none"
  if target.platform == "tpu":
    return "yes"
  fit = targets_lib.gpu_fit(record["peak"], target.spec)
  if not fit.fits:
    return "no"
  if fit.fits_default:
    return f"yes ({fit.spare_bytes / GiB:.1f} GiB spare)"
  return (
    f"with fraction {fit.mem_fraction:.2f} ({fit.spare_bytes / GiB:.1f} GiB"
    " spare)"
  )


def scale_markdown(
  records: list[dict], target: targets_lib.Target, cpu: dict[tuple, dict]
) -> str:
  """The scale table of ``records``, with the CPU compiler's peak beside an
  accelerator's."""
  accelerator = target.spec is not None
  columns = ["model", "mode", "optimizer"]
  columns += ["params", "state", "temporaries", "peak"]
  columns += ["CPU compiler's peak"] if accelerator else []
  columns += ["fits", "compile (s)"]
  rows = []
  for r in records:
    cpu_peak = cpu.get((r["model"], r["mode"], r["optimizer"]))
    row = [r["model"], r["mode"], r["optimizer"]]
    if r["refused"]:
      row += ["", "", "", ""]
    else:
      row += [
        r[k] / GiB
        for k in ("parameters", "optimizer_state", "temporaries", "peak")
      ]
    if accelerator:
      row.append("" if cpu_peak is None else cpu_peak["peak"] / GiB)
    seconds = r["compile_seconds"]
    row += [fit_cell(r, target), "" if seconds is None else seconds]
    rows.append(row)
  return common.markdown_table(columns, rows)


def _cpu_scale_records() -> dict[tuple, dict]:
  """The committed CPU scale table, by (model, mode, optimizer)."""
  path = common.results_path("memory", "cpu")
  if not path.exists():
    return {}
  return {
    (r["model"], r["mode"], r["optimizer"]): r
    for r in json.loads(path.read_text())["records"]
    if "mode" in r and r.get("target", "cpu") == "cpu"
  }


def target_main(args, target: targets_lib.Target) -> None:
  """``--target``: the scale table from an accelerator's compiler."""
  runs = scale_runs(
    [m for m in args.scale_models.split(",") if m],
    args.optimizers and args.optimizers.split(","),
    args.modes and args.modes.split(","),
  )
  name = "memory" if args.mesh == "none" else f"memory-{args.mesh}"
  meta = {
    "target": target.name,
    "target_device": target.describe(),
    "compiled_on": "this machine, ahead of time (no device attached)",
    "mesh": args.mesh,
    "command": "python -m benchmarks.memory " + " ".join(args.argv),
  }
  cpu = _cpu_scale_records()

  def save(records: list[dict]) -> Path:
    records = common.merged(records, name, target.name, _key)
    compiler = f"{target.platform.upper()} compiler"
    text = (
      f"## Peak memory of the whole training step at scale ({compiler},"
      f" compile-only, for {target.describe()})\n\n"
      + SCALE_HEADER
      + " The CPU compiler's peak (memory-optimized schedule) is"
      " benchmarks/results/memory-cpu.md's. "
      + FIT_NOTE[target.platform]
      + "\n\n"
      + scale_markdown(records, target, cpu)
    )
    return common.write_results(name, meta, records, text, target.name)

  done = common.earlier_records(name, target.name)
  records = scale_table(runs, target, args.mesh, done, save)
  print(f"\nwrote {save(records)}")


FIT_NOTE = {
  "gpu": (
    "A GPU fit counts about"
    f" {targets_lib.CUDA_RUNTIME_RESERVE / GiB:g} GiB for the CUDA context"
    " and libraries, outside XLA's buffers: 'yes' fits JAX's default"
    " preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION=0.75); 'with fraction f'"
    " needs that variable set to f; spare is what is left beyond the step and"
    " the runtime."
  ),
  "tpu": (
    "The TPU compiler checks each program against the chip's HBM and refuses"
    " one that does not fit."
  ),
}


# GPUs from the smallest memory up, for "what fits where"; TPU v5e slices.
GPU_LADDER = (
  "gpu-l4",
  "gpu-rtx4090",
  "gpu-a100-40gb",
  "gpu-a100-80gb",
  "gpu-h100-80gb",
  "gpu-h200",
)
V5E_SLICES = ("tpu-v5e", "tpu-v5e:4", "tpu-v5e:8", "tpu-v5e:16", "tpu-v5e:32")
FITS_OPTIMIZERS = ("adamw", *OPTIMIZERS, PEER)


def _fits(record: dict, target: targets_lib.Target) -> bool:
  if record["refused"]:
    return False
  if target.platform == "tpu":
    return True
  return targets_lib.gpu_fit(record["peak"], target.spec).fits


def smallest_fit(
  model: str,
  name: str,
  mode: str,
  ladder: Sequence[str],
  mesh: str,
  done: dict[tuple, dict],
  save: Callable[[dict], None],
) -> list[dict]:
  """Compiles the step for each target of ``ladder`` in turn until one fits;
  returns the records compiled (or reused from ``done``)."""
  records = []
  for name_ in ladder:
    target = targets_lib.parse_target(name_)
    layout = "none" if target.count == 1 else mesh
    key = (model, mode, name, target.name, layout)
    record = done.get(key) or scale_record(model, mode, name, target, layout)
    if key not in done:
      save(record)
      print(
        f"fits {model} {name:20s} {mode:13s} {target.name:14s}"
        f" {fit_cell(record, target)} ({record['compile_seconds']} s)",
        flush=True,
      )
    records.append(record)
    if _fits(record, target):
      break
  return records


def fits_main(args) -> None:
  """``--fits``: the smallest GPU of :data:`GPU_LADDER` on which each
  optimizer's 1b and 7b steps fit, and the smallest v5e slice (fsdp).

  Each optimizer runs in its lowest-memory mode of the H100 table
  (``memory-gpu-h100-80gb``), which must exist.
  """
  h100 = common.earlier_records("memory", "gpu-h100-80gb")
  if not h100:
    sys.exit("run python -m benchmarks.memory --target gpu-h100-80gb first")
  best = {}
  for r in h100:
    if not r["refused"]:
      key = (r["model"], r["optimizer"])
      if key not in best or r["peak"] < best[key]["peak"]:
        best[key] = r
  path = common.results_path("memory-fits", "accelerators")
  done = {
    _key(r): r for r in common.earlier_records("memory-fits", "accelerators")
  }
  meta = {
    "command": "python -m benchmarks.memory --fits " + " ".join(args.argv),
    "compiled_on": "this machine, ahead of time (no device attached)",
  }

  def save(record: dict | None = None) -> None:
    if record is not None:
      done[_key(record)] = record
    records = common.merged(
      list(done.values()), "memory-fits", "accelerators", _key
    )
    common.write_results(
      "memory-fits",
      meta,
      records,
      fits_markdown(records, best),
      platform="accelerators",
    )

  ladders = {"gpu": (GPU_LADDER, "none"), "tpu-v5e": (V5E_SLICES, "fsdp")}
  names = args.optimizers.split(",") if args.optimizers else FITS_OPTIMIZERS
  for model in args.scale_models.split(","):
    for kind in args.fits.split(","):
      ladder, mesh = ladders[kind]
      for name in names:
        mode = best[(model, name)]["mode"]
        smallest_fit(model, name, mode, ladder, mesh, done, save)
  save()
  print(f"\nwrote {path}")


def _fit_of(record: dict) -> str:
  return fit_cell(record, targets_lib.parse_target(record["target"]))


def fits_markdown(records: list[dict], best: dict) -> str:
  """One row per model, optimizer and family: where the step first fits."""
  rows = []
  families = {"gpu": GPU_LADDER, "TPU v5e (fsdp)": V5E_SLICES}
  for (model, name), row in sorted(best.items()):
    for family, ladder in families.items():
      tried = [
        r
        for t in ladder
        for r in records
        if (r["model"], r["optimizer"], r["target"]) == (model, name, t)
        and r["mode"] == row["mode"]
      ]
      if not tried:
        continue
      last = tried[-1]
      target = targets_lib.parse_target(last["target"])
      fitted = _fits(last, target)
      rows.append(
        (
          model,
          name,
          row["mode"],
          family,
          target.describe() if fitted else f"none up to {target.describe()}",
          "" if last["refused"] else last["peak"] / GiB,
          fit_cell(last, target),
          "; ".join(f"{r['target']}: {_fit_of(r)}" for r in tried[:-1]),
        )
      )
  return (
    "## What fits where (compiled for each device, ahead of time)\n\n"
    "Each optimizer in its lowest-memory mode of the H100 table, compiled"
    " for each GPU from the smallest memory up until it fits (the GPU"
    " compiler plans for the device's memory, so each is compiled for), and"
    " for v5e slices from one chip up with `--mesh fsdp` until the TPU"
    " compiler accepts it. "
    + FIT_NOTE["gpu"]
    + "\n\n"
    + common.markdown_table(
      (
        "model",
        "optimizer",
        "mode",
        "devices",
        "smallest that fits",
        "peak per device (GiB)",
        "fit",
        "smaller ones tried",
      ),
      rows,
    )
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--peak-model", default="60m", choices=tuple(PAPER_RANKS))
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--scale-models", default="350m,1b,7b")
  parser.add_argument(
    "--target",
    default="cpu",
    help="compile the scale table for this device (see examples.llama.train"
    " --help); results go to memory-<target>",
  )
  parser.add_argument("--mesh", default="none", choices=("none", "dp", "fsdp"))
  parser.add_argument(
    "--optimizers", default=None, help="comma-separated; default: all"
  )
  parser.add_argument(
    "--modes",
    default=None,
    help=f"comma-separated, of {', '.join(SCALE_MODES)}; default: all",
  )
  parser.add_argument(
    "--fits",
    default=None,
    help="'gpu', 'tpu-v5e' or both (comma-separated): the smallest GPU, or"
    " v5e slice, on which each optimizer's step fits",
  )
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  args.argv = argv
  if args.fits:
    targets_lib.compile_only()
    if args.scale_models == "350m,1b,7b":
      args.scale_models = "1b,7b"
    fits_main(args)
    return
  target = targets_lib.parse_target(args.target)
  if target.spec is not None:
    targets_lib.compile_only()
    if args.scale_models == "350m,1b,7b":
      args.scale_models = "1b,7b"
    target_main(args, target)
    return
  models = [m for m in args.models.split(",") if m]
  # The CPU compiler never refuses; rows written before refusals and compile
  # times were recorded say so now (no time: a blank cell).
  earlier = [
    {"refused": False, "compile_seconds": None, **r}
    for r in common.earlier_records("memory", "cpu")
    if "mode" in r
  ]

  states = state_bytes_table(models)
  peaks = peak_step_memory(args.peak_model, args.batch_size, args.seq_len)
  scale = scale_table(
    scale_runs(
      [m for m in args.scale_models.split(",") if m],
      args.optimizers and args.optimizers.split(","),
      args.modes and args.modes.split(","),
    ),
    target,
    done=earlier,
  )
  # The rows of the file that this run did not ask for stay.
  scale = [
    *scale,
    *(r for r in earlier if _key(r) not in {_key(x) for x in scale}),
  ]
  tables = (
    "## Peak memory of the whole training step at scale (compile-only, CPU"
    " compiler, memory-optimized schedule)\n\n"
    + SCALE_HEADER
    + "\n\n"
    + scale_markdown(scale, target, {})
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
        "with 8-bit moments (GiB)",
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
          r["8bit_moments_bytes"] / 2**30,
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
