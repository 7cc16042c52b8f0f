"""One command for a GPU or TPU host: speed, memory and a short quality check.

    python -m benchmarks.accelerator        # about 8 minutes on one H100

Each part writes its own results, stamped with the device and named for its
platform (``speed-gpu``, ``memory-device-gpu``, ``quality-gpu``), beside the
CPU figures:

1. **Speed** (:mod:`benchmarks.speed`): the optimizer step on the projected
   matrices of ``60m`` against ``optax.contrib.galore`` and AdamW, the whole
   training step of ``60m`` against AdamW, and one subspace update of each
   rule on the largest shapes.
2. **Memory**: the training steps of the README's memory table that fit one
   device (1b fused with bfloat16 state, 7b fused with bfloat16 state, 1b
   scanned), each run for two steps by the trainer, with the device's own
   ``peak_bytes_in_use`` next to the compiler's estimate (``--dry-run``).
3. **Quality**: ``tiny`` on the shipped sample for AdamW and GrassWalk at the
   default learning rate, seed 0, as a check against the CPU runs.

``--smoke`` runs every part at toy sizes, to check the command on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks import common
from benchmarks import speed as speed_lib

# The memory rows: the README's --remat --dtype bfloat16, batch 4 x 256,
# vocabulary 32000 and the papers' ranks, in the modes that fit 80 GiB.
MEMORY_FLAGS = (
  "--remat --dtype bfloat16 --batch-size 4 --seq-len 256 --vocab-size 32000"
  " --update-interval 200 --steps 2 --warmup 0 --eval-batches 1"
)
FUSED_BF16 = (
  "--scan-layers --fused-update --clip per-layer --param-dtype bfloat16"
  " --moment-dtype bfloat16 --basis-dtype bfloat16"
)
MEMORY_RUNS = (  # (label, flags, optimizer)
  ("7b fused + bf16", f"--model 7b --rank 1024 {FUSED_BF16}", "grasswalk"),
  ("1b fused + bf16", f"--model 1b --rank 512 {FUSED_BF16}", "adamw"),
  ("1b fused + bf16", f"--model 1b --rank 512 {FUSED_BF16}", "grasswalk"),
  ("1b scanned", "--model 1b --rank 512 --scan-layers", "adamw"),
  ("1b scanned", "--model 1b --rank 512 --scan-layers", "grasswalk"),
)
SMOKE_MEMORY_RUNS = (
  ("tiny fused + bf16", f"--model tiny --rank 8 {FUSED_BF16}", "grasswalk"),
)


def _trainer(flags: str, out_dir: Path) -> list[str]:
  return [
    sys.executable,
    "-m",
    "examples.llama.train",
    *flags.split(),
    "--out-dir",
    str(out_dir),
  ]


def memory_records(runs) -> list[dict]:
  """Each run's device peak (a real step) and the compiler's estimate.

  Every run is its own process, so each peak is that run's alone.
  """
  records = []
  for label, flags, optimizer in runs:
    run_flags = f"{flags} {MEMORY_FLAGS} --optimizer {optimizer}"
    with tempfile.TemporaryDirectory() as tmp:
      out = Path(tmp)
      estimate = subprocess.run(
        [*_trainer(run_flags, out), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
      ).stdout
      subprocess.run(_trainer(run_flags, out), check=True)
      summary = json.loads((out / "summary.json").read_text())
    peak_line = next(x for x in estimate.splitlines() if "peak" in x)
    record = {
      "run": label,
      "optimizer": optimizer,
      "flags": run_flags,
      "compiler_peak_gib": float(peak_line.split()[1]),
      "device_peak_bytes": summary["device_peak_bytes"],
    }
    records.append(record)
    print(f"memory {label:18s} {optimizer:10s} {record}")
  return records


def _memory_table(records: list[dict]) -> str:
  rows = [
    (
      r["run"],
      r["optimizer"],
      f"{r['compiler_peak_gib']:.2f}",
      "n/a"
      if r["device_peak_bytes"] is None
      else f"{r['device_peak_bytes'] / 2**30:.2f}",
    )
    for r in records
  ]
  return common.markdown_table(
    ("step", "optimizer", "compiler's peak (GiB)", "device's peak (GiB)"), rows
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--smoke", action="store_true", help="toy sizes, any device"
  )
  args = parser.parse_args(argv)
  if jax.default_backend() == "cpu" and not args.smoke:
    sys.exit("no accelerator found; --smoke runs the command at toy sizes")

  if args.smoke:
    speed_args = [
      "--quick",
      "--rounds",
      "1",
      "--loop-steps",
      "2",
      "--repeats",
      "1",
    ]
  else:
    speed_args = ["--model", "60m", "--train-models", "60m", "--rounds", "3"]
  speed_lib.main(speed_args)

  memory = memory_records(SMOKE_MEMORY_RUNS if args.smoke else MEMORY_RUNS)
  common.write_results(
    "memory-device-smoke" if args.smoke else "memory-device",
    {"command": "python -m benchmarks.accelerator"},
    memory,
    _memory_table(memory) + "\n",
  )

  quality_flags = ["--optimizers", "adamw,grasswalk", "--seeds", "0"]
  quality_flags += ["--lrs", "0.003"]
  if args.smoke:
    quality_flags += ["--steps", "20", "--warmup", "2", "--eval-every", "10"]
    quality_flags += ["--results-name", "quality-smoke"]
  subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.quality",
      *quality_flags,
      "--out-dir",
      f"runs/accelerator-quality{'-smoke' if args.smoke else ''}",
    ],
    check=True,
  )


if __name__ == "__main__":
  main()
