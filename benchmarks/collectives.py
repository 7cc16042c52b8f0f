"""Collectives and per-device memory of the sharded optimizer update.

For each optimizer, ``tx.update`` alone (where the optimizer's communication
lives) is compiled from abstract shapes for a LLaMA config's parameters, on
``--devices`` host devices with the example's FSDP layout: every matrix of
the parameters, gradients and state sharded on its largest axis that the
device count divides (``examples.llama.sharding.fsdp_spec``). Nothing runs:
the compiled HLO is read for its collectives, and ``memory_analysis()`` for
the per-device peak (with the memory-optimized CPU schedule, as every memory
figure of the project).

Collectives are split by where they sit: on every step, or inside the
``lax.switch`` branches that move the bases (an update step, every ``T``
steps; both the first-step and the later branch are counted). Bytes are those
of each collective's result on one device (an all-gather's gathered array, an
all-reduce's reduced one). The layers are unscanned, so each matrix is its own
leaf and no collective sits in a loop.

    python -m benchmarks.collectives            # 60m and 1b, 4 devices

writes ``benchmarks/results/collectives-<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from benchmarks import common
from benchmarks.speed import PAPER_RANKS, make_optimizer
from examples.llama import memory as memory_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(
  r"= (\(?[\w\[\]{}, :]+?\)?) (" + "|".join(KINDS) + r")(?:-start)?\("
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CALLED = re.compile(
  r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_ARRAY = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")


class Collective(NamedTuple):
  """One collective of a compiled program."""

  kind: str
  bytes: int
  largest_elements: int  # of the largest array in its result
  in_branch: bool  # inside a conditional branch (runs on update steps only)


def _array_sizes(shape: str) -> list[tuple[int, int]]:
  """``(elements, bytes)`` of each array in an HLO result shape."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape):
    elements = math.prod(int(d) for d in dims.split(",") if d)
    bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
    sizes.append((elements, elements * bits // 8))
  return sizes


def collectives(hlo_text: str) -> list[Collective]:
  """The collectives of a compiled module's text (``compiled.as_text()``).

  A computation counts as inside a branch when it is reachable from the
  entry only through a conditional's ``branch_computations``.
  """
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  always, stack = set(), [entry]
  while stack:  # computations reached without entering a branch
    name = stack.pop()
    if name in always or name not in bodies:
      continue
    always.add(name)
    for line in bodies[name]:
      stack.extend(_CALLED.findall(line))
  found = []
  for name, lines in bodies.items():
    for line in lines:
      match = _COLLECTIVE.search(line)
      if match:
        sizes = _array_sizes(match.group(1))
        found.append(
          Collective(
            match.group(2),
            sum(b for _, b in sizes),
            max((e for e, _ in sizes), default=0),
            name not in always,
          )
        )
  return found


def fsdp_shardings(tree, mesh: Mesh):
  """The example's FSDP sharding of every array in ``tree``."""
  axis = mesh.axis_names[0]
  return jax.tree.map(
    lambda x: NamedSharding(
      mesh, sharding_lib.fsdp_spec(x.shape, mesh.size, axis)
    ),
    tree,
  )


OPTIMIZERS = {  # label: (registry name, svd_method)
  "adamw": ("adamw", None),
  "galore (exact SVD)": ("galore", "exact"),
  "galore (randomized SVD)": ("galore", "randomized"),
  "grasswalk": ("grasswalk", "randomized"),
  "grassjump": ("grassjump", None),
  "subtrack_pp": ("subtrack_pp", "randomized"),
}


def measure(model: str, devices: int) -> list[dict]:
  """One record per optimizer: collectives and per-device peak of its update."""
  mesh = Mesh(np.array(jax.devices()[:devices]), ("fsdp",))
  params = model_lib.abstract_params(model_lib.get_config(model))
  params = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
  )
  param_shardings = fsdp_shardings(params, mesh)
  projected = jax.tree.leaves(model_lib.low_rank_mask(params))
  largest = max(
    math.prod(p.shape)
    for p, masked_in in zip(jax.tree.leaves(params), projected, strict=True)
    if masked_in
  )
  records = []
  for label, (name, svd_method) in OPTIMIZERS.items():
    tx = make_optimizer(name, PAPER_RANKS[model], 200, svd_method=svd_method)
    state = jax.eval_shape(tx.init, params)
    state_shardings = fsdp_shardings(state, mesh)
    update = jax.jit(
      tx.update,
      in_shardings=(param_shardings, state_shardings, param_shardings),
      out_shardings=(param_shardings, state_shardings),
      donate_argnums=(0, 1),
    )
    options = memory_lib.compiler_options(jax.default_backend())
    compiled = update.lower(params, state, params).compile(options)
    found = collectives(compiled.as_text())
    analysis = compiled.memory_analysis()
    peak = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
    gathers = [c.largest_elements for c in found if c.kind == "all-gather"]
    record = {
      "model": model,
      "optimizer": label,
      "rank": PAPER_RANKS[model],
      "devices": devices,
      "every_step_bytes": sum(c.bytes for c in found if not c.in_branch),
      "update_step_extra_bytes": sum(c.bytes for c in found if c.in_branch),
      "collectives": {k: sum(c.kind == k for c in found) for k in KINDS},
      "largest_gather_elements": max(gathers, default=0),
      "largest_matrix_elements": largest,
      "peak_bytes_per_device": peak,
    }
    records.append(record)
    print(
      f"{model:4s} {label:24s} every step"
      f" {record['every_step_bytes'] / 2**20:9.2f} MiB  update steps"
      f" +{record['update_step_extra_bytes'] / 2**20:9.2f} MiB"
      f"  largest gather {record['largest_gather_elements']:>10d}"
      f"  peak {peak / 2**30:7.3f} GiB"
    )
  adamw_peak = records[0]["peak_bytes_per_device"]
  for record in records:
    record["peak_ratio_to_adamw"] = record["peak_bytes_per_device"] / adamw_peak
  return records


def _table(records: Sequence[dict]) -> str:
  rows = [
    (
      r["model"],
      r["optimizer"],
      f"{r['every_step_bytes'] / 2**20:.2f}",
      f"{r['update_step_extra_bytes'] / 2**20:.2f}",
      f"{r['largest_gather_elements']:,}",
      f"{r['largest_matrix_elements']:,}",
      f"{r['peak_bytes_per_device'] / 2**30:.3f}",
      f"{r['peak_ratio_to_adamw']:.3f}",
    )
    for r in records
  ]
  header = (
    "model",
    "optimizer",
    "every step (MiB)",
    "update steps, extra (MiB)",
    "largest all-gather (elements)",
    "largest projected matrix (elements)",
    "peak per device (GiB)",
    "peak / AdamW",
  )
  return common.markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="60m,1b")
  parser.add_argument("--devices", type=int, default=4)
  args = parser.parse_args(argv)
  if jax.device_count() < args.devices:
    if jax.default_backend() != "cpu":
      sys.exit(f"needs {args.devices} devices, found {jax.device_count()}")
    # The host device count is fixed when JAX starts: start again with it.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={args.devices}"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *argv], env)
  records = [
    r for model in args.models.split(",") for r in measure(model, args.devices)
  ]
  note = (
    f"`tx.update` alone, compiled on {args.devices} devices with the example's"
    " FSDP layout (`python -m benchmarks.collectives`); the papers' ranks,"
    " T = 200, unscanned layers. Bytes: the collectives' results on one"
    " device; 'update steps, extra' is inside the branches that move the"
    " bases (every T steps)."
  )
  meta = {"command": "python -m benchmarks.collectives", "note": note}
  common.write_results("collectives", meta, records, _table(records) + "\n")


if __name__ == "__main__":
  main()
