"""Cost: HBM bytes and flops of the optimizer step, from the accelerators'
compilers, against AdamW, optax.contrib.galore and the minimum.

    python -m benchmarks.cost                      # TPU v5e and H100 targets
    python -m benchmarks.cost --targets gpu-a100-80gb --models 60m

The program is one optimizer step (``tx.update`` and ``optax.apply_updates``,
state and parameters donated) on the projected kernels of one block of a
LLaMA config (all blocks are alike, so the cost per parameter is the
model's), at the papers' rank, compiled ahead of time for each target
(``examples/llama/targets.py``):

* **keep step** (the basis is kept: steps between subspace updates) and
  **update step** (the subspace rule runs) are compiled apart: the step count
  is a constant of each program, so the compiler folds the basis branch and
  the figures are those of one path only (a ``cond`` would count both);
* **bytes**: the TPU compiler's ``cost_analysis()["bytes accessed"]``,
  which counts both branches of a conditional (the one left in a keep step
  is recovery scaling's rare explicit-residual fallback, so the RS rows are
  upper bounds there); the deviceless GPU compiler returns no cost
  analysis, so there they are counted from the optimized HLO
  (:func:`hlo_bytes`: the operands and result of every top-level
  instruction, i.e. each fusion, library call and copy, the traffic each
  kernel makes to memory, the fallback at its cheaper branch). The TPU's
  HLO text is not counted so: its copies between HBM and on-chip memory
  would count as traffic;
* **flops**: the TPU compiler's count; for a GPU target, the CPU compiler's
  count of the same program (flops are the math's, not the device's);
* **roofline time**: ``max(bytes / bandwidth, flops / peak)`` on the
  target's published bandwidth and matmul peak (``devices/*.json``: bf16 on a
  TPU, whose default float32 matmul is bf16; TF32 on a GPU, which XLA uses
  for float32 matmuls by default);
* **minimum bytes** (:func:`minimum_bytes`): what the step cannot avoid
  moving, from the shapes of the parameters and the state.

Every figure is a compiler's estimate, not a measurement on a device.
Results go to ``benchmarks/results/cost-accelerators.{json,md}``; rows
already compiled (same jax version) are reused.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from benchmarks.speed import PAPER_RANKS, matrix_optimizers, with_count
from examples.llama import model as model_lib
from examples.llama import targets as targets_lib

T = 200  # the update interval; the update step runs at count T
STEPS = {"keep": 1, "update": T}
F32 = 4
NAME = "cost"


def block_kernels(model: str) -> dict[str, jax.ShapeDtypeStruct]:
  """The projected kernels of block 0 of ``model`` (unscanned), by path."""
  params = model_lib.abstract_params(model_lib.get_config(model))
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  mask = jax.tree.leaves(model_lib.low_rank_mask(params))
  return {
    jax.tree_util.keystr(path): leaf
    for (path, leaf), projected in zip(leaves, mask, strict=True)
    if projected and jax.tree_util.keystr(path).startswith("['layers'][0]")
  }


def step_program(tx: optax.GradientTransformation, count: int):
  """One optimizer step with the step count fixed at ``count``."""

  def step(grads, state, params):
    updates, state = tx.update(grads, with_count(state, count), params)
    # Outputs in the order of the donated inputs, so that JAX pairs each
    # donated buffer with its own new value (it pairs same-shaped buffers in
    # order; paired wrongly, XLA copies the parameters and moments).
    return state, optax.apply_updates(params, updates)

  return step


def _array_bytes(text: str) -> int:
  """Bytes of every array shape (``f32[512,1376]{1,0}``) in ``text``."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    size = math.prod(int(d) for d in dims.split(",") if d)
    total += size * _ITEMSIZE[dtype]
  return total


_ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_SHAPE = re.compile(rf"\b({'|'.join(_ITEMSIZE)})\[([\d,]*)\]")
# Instructions that move no data of their own.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")


def hlo_bytes(hlo_text: str) -> int:
  """Bytes read and written by the top-level instructions of an optimized
  HLO module: the bytes of each instruction's operands and result, summed
  over the entry computation and the computations it calls. A fusion is one
  kernel (its body is not entered), a loop body counts once, and a
  conditional counts its cheapest branch: the conditionals left in a step
  whose count is a constant are data-dependent fallbacks (recovery
  scaling's explicit residual), which a step takes only when the gradient
  lies almost inside the subspace. Instructions that move nothing
  (parameters, tuples, bitcasts) count zero.
  """
  computations: dict[str, list[tuple[str, str, str, str]]] = {}
  entry = current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.-]+) .*\{$", line)
    if header:
      current = header[2]
      computations[current] = []
      if header[1]:
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      match = _INSTRUCTION.match(line)
      if match is not None:
        computations[current].append(match.groups())
  shapes = {
    name: _array_bytes(result)
    for body in computations.values()
    for name, result, _, _ in body
  }

  @functools.cache
  def computation_bytes(computation: str) -> int:
    total = 0
    for name, _, op, rest in computations[computation]:
      if op in _FREE:
        continue
      called = [
        c.strip().lstrip("%")
        for single, many in _CALLED.findall(rest)
        for c in (single or many).split(",")
      ]
      if op == "conditional":
        total += min(computation_bytes(c) for c in called)
      elif op in ("while", "call"):
        total += sum(computation_bytes(c) for c in called)
      else:
        operands = re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])
        total += shapes[name] + sum(shapes.get(o, 0) for o in operands)
    return total

  return computation_bytes(entry)


_CALLED = re.compile(
  r"(?:body|condition|to_apply|true_computation|false_computation)="
  r"%?([\w.-]+)|branch_computations=\{([^}]*)\}"
)


def minimum_bytes(params, state) -> int:
  """The fewest bytes one step can move: the gradient read, the parameters
  read and written, the state read, and the state that changes written.

  Every optimizer's state changes each step but for its bases (kept between
  updates) and its PRNG key: only arrays named ``mu``/``nu`` (moments) and
  the step counts and recovery norms are written. With recovery scaling the
  residual ``G - S S^T G`` needs ``S^T G`` first, so a kernel that holds
  less than a whole column of the gradient on chip reads the gradient
  twice; that second read is not counted here.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  read = sum(x.size * x.dtype.itemsize for _, x in leaves)
  written = sum(
    x.size * x.dtype.itemsize
    for path, x in leaves
    if not any("basis" in str(k) or "key" in str(k) for k in path)
    and not any("projector" in str(k).lower() for k in path)
  )
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return 3 * weights + read + written


def compile_step(
  tx: optax.GradientTransformation,
  params,
  count: int,
  target: targets_lib.Target,
):
  """The step compiled for ``target``'s first device (or this machine)."""
  state = jax.eval_shape(tx.init, params)
  program = step_program(tx, count)
  if target.spec is None:
    return jax.jit(program, donate_argnums=(1, 2)).lower(
      params, state, params
    ).compile(), state
  device = target.devices()[0]
  one = NamedSharding(Mesh(np.array([device]), ("x",)), P())
  shard = jax.tree.map(lambda _: one, (params, state, params))
  step = jax.jit(program, in_shardings=shard, donate_argnums=(1, 2))
  return step.lower(params, state, params).compile(), state


def cost_record(
  model: str, name: str, step: str, target: targets_lib.Target
) -> dict[str, Any]:
  """Bytes, flops and roofline time of one optimizer's step on one target."""
  params = block_kernels(model)
  tx = matrix_optimizers(PAPER_RANKS[model], T)[name]
  started = time.perf_counter()
  compiled, state = compile_step(tx, params, STEPS[step], target)
  seconds = time.perf_counter() - started
  n = sum(x.size for x in jax.tree.leaves(params))
  if target.platform == "tpu":
    cost = compiled.cost_analysis()
    bytes_accessed, flops = cost["bytes accessed"], cost["flops"]
  else:
    bytes_accessed = hlo_bytes(compiled.as_text())
    cpu = targets_lib.parse_target("cpu")
    compiled_cpu, _ = compile_step(tx, params, STEPS[step], cpu)
    flops = compiled_cpu.cost_analysis()["flops"]
  spec = target.spec
  peak = spec.peak_flops("bfloat16" if target.platform == "tpu" else "tf32")
  roofline = max(bytes_accessed / spec.bandwidth, flops / peak)
  return {
    "model": model,
    "optimizer": name,
    "step": step,
    "target": target.name,
    "parameters": n,
    "bytes": bytes_accessed,
    "flops": flops,
    "minimum_bytes": minimum_bytes(params, state),
    "bytes_per_param": bytes_accessed / n,
    "minimum_per_param": minimum_bytes(params, state) / n,
    "flops_per_param": flops / n,
    "roofline_us": roofline * 1e6,
    "compile_seconds": round(seconds, 1),
  }


def table(records: list[dict]) -> str:
  """One table per model and target: each optimizer's keep and update step,
  per parameter and against AdamW's."""
  out = []
  adamw = {
    (r["model"], r["target"], r["step"]): r
    for r in records
    if r["optimizer"] == "optax.adamw"
  }
  groups = sorted({(r["model"], r["target"]) for r in records})
  for model, target in groups:
    rows = []
    for r in records:
      if (r["model"], r["target"]) != (model, target):
        continue
      base = adamw.get((model, target, r["step"]))
      rows.append(
        (
          r["optimizer"],
          r["step"],
          r["bytes_per_param"],
          r["minimum_per_param"],
          r["bytes_per_param"] / r["minimum_per_param"],
          "" if base is None else r["bytes"] / base["bytes"],
          r["flops_per_param"],
          r["roofline_us"],
          "" if base is None else r["roofline_us"] / base["roofline_us"],
        )
      )
    n = next(
      r["parameters"]
      for r in records
      if (r["model"], r["target"]) == (model, target)
    )
    out.append(
      f"## {model}, one block's projected kernels ({n:,} parameters, rank"
      f" {PAPER_RANKS[model]}), {target}\n\n"
      + common.markdown_table(
        (
          "optimizer",
          "step",
          "bytes / param",
          "minimum / param",
          "bytes / minimum",
          "bytes / adamw's",
          "flops / param",
          "roofline (us)",
          "roofline / adamw's",
        ),
        rows,
      )
    )
  return "\n\n".join(out) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default="tpu-v5e,gpu-h100-80gb")
  parser.add_argument("--models", default="60m,1b")
  parser.add_argument("--steps", default="keep,update")
  parser.add_argument(
    "--optimizers", default=None, help="comma-separated; default: all"
  )
  parser.add_argument(
    "--skip",
    default="",
    help="model:target:step triples to leave out, comma-separated (e.g."
    " 1b:tpu-v5e:update: libtpu compiles an SVD of 2048 x 5461 slowly)",
  )
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  targets_lib.compile_only()
  names = args.optimizers.split(",") if args.optimizers else None
  done = common.earlier_records(NAME, "accelerators")
  key = lambda r: (r["model"], r["optimizer"], r["step"], r["target"])  # noqa: E731
  reuse = {key(r): r for r in done}
  skip = set(args.skip.split(",")) - {""}
  records = []
  meta = {
    "command": "python -m benchmarks.cost " + " ".join(argv),
    "update_interval": T,
    "compiled_on": "this machine, ahead of time (no device attached)",
  }

  def save():
    kept = common.merged(records, NAME, "accelerators", key)
    common.write_results(
      NAME, meta, kept, NOTE + table(kept), platform="accelerators"
    )

  for target_name in args.targets.split(","):
    target = targets_lib.parse_target(target_name)
    for model in args.models.split(","):
      optimizers = matrix_optimizers(PAPER_RANKS[model], T)
      for name in names or optimizers:
        for step in args.steps.split(","):
          if f"{model}:{target_name}:{step}" in skip:
            continue
          if (model, name, step, target_name) in reuse:
            records.append(reuse[(model, name, step, target_name)])
            continue
          record = cost_record(model, name, step, target)
          records.append(record)
          print(
            f"cost {target_name} {model} {name:24s} {step:6s}"
            f" {record['bytes_per_param']:8.2f} B/param (minimum"
            f" {record['minimum_per_param']:.2f}),"
            f" {record['flops_per_param']:8.1f} flops/param,"
            f" {record['compile_seconds']} s to compile",
            flush=True,
          )
          save()
  save()


NOTE = (
  "Compiler estimates, not measurements: bytes are the TPU compiler's"
  " cost_analysis (both branches of recovery scaling's rare"
  " explicit-residual fallback counted), or for a GPU target the operands"
  " and results of the optimized HLO's top-level instructions (the fallback"
  " at its cheaper branch); flops are the TPU compiler's, or the CPU"
  " compiler's for a GPU target. The keep step keeps the basis; the"
  " update step runs the subspace rule (at count T = 200). The minimum is the"
  " gradient read, the weights read and written, the state read and the"
  " changing state written (benchmarks/cost.py, minimum_bytes). Roofline:"
  " max(bytes / bandwidth, flops / matmul peak) on the published figures.\n\n"
)


if __name__ == "__main__":
  main()
