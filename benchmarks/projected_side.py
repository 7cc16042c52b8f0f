"""Which side of a kernel to project: state bytes, energy kept and loss, per
side.

    python -m benchmarks.projected_side

A rank-``r`` basis of the shorter side ``m`` keeps moments ``r x n`` (the
papers' choice); of the longer side, ``r x m`` moments and a larger basis (as
``optax.contrib.galore``). Two measurements:

1. **State bytes** of each low-rank preset at the papers' ranks for 60m, 1b
   and 7b, on each side (shapes only, nothing allocated).
2. **Energy kept and loss**: the LLaMA example's trainer (``tiny`` and its
   defaults unless flags say otherwise) for each low-rank preset on each side,
   at the preset's best learning rate in ``benchmarks.quality``'s results and
   for the seeds of ``--seeds``:
   the final energy fraction ``R = ||S^T G|| / ||G||`` by layer type (the
   trainer's own metric, on the last step's gradient) and the final eval
   loss. A random basis keeps about ``r / m`` of the energy of a gradient with
   no preferred direction, so the side matters most for the random rules.

Writes ``benchmarks/results/projected_side-<platform>.{json,md}``; runs are
kept under ``--out-dir/longer/`` and reused, as ``benchmarks.quality`` does;
the shorter side (the default) reuses ``benchmarks.quality``'s runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

import grassjax
from benchmarks import common
from benchmarks import quality as quality_lib
from benchmarks.speed import PAPER_RANKS
from examples.llama import config as config_lib
from examples.llama import model as model_lib
from examples.llama.errors import reports_user_errors
from grassjax.diagnostics import state_bytes

SIDES = ("shorter", "longer")


def state_records(models=("60m", "1b", "7b")) -> list[dict]:
  """Optimizer-state bytes of each preset on each side, from shapes."""
  records = []
  for model in models:
    params = model_lib.abstract_params(model_lib.get_config(model))
    for name, info in grassjax.OPTIMIZERS.items():
      sizes = {}
      for side in SIDES:
        tx = info.constructor(
          1e-3,
          rank=PAPER_RANKS[model],
          key=jax.random.key(0) if info.needs_key else None,
          projection_mask=model_lib.low_rank_mask,
          projected_side=side,
        )
        sizes[side] = state_bytes(jax.eval_shape(tx.init, params))
      records.append(
        {
          "table": "state",
          "model": model,
          "optimizer": name,
          "rank": PAPER_RANKS[model],
          **{f"{side}_bytes": sizes[side] for side in SIDES},
          "longer_over_shorter": sizes["longer"] / sizes["shorter"],
        }
      )
  return records


def run_records(
  cfg: config_lib.TrainConfig,
  out_dir: Path,
  quality_dir: Path,
  lrs: dict[str, float],
  seeds: list[int],
) -> list[dict]:
  """Trainer runs of each low-rank preset on each side, at its learning rate
  of ``lrs``.

  The shorter side is every preset's default, so those runs are
  ``benchmarks.quality``'s and are reused from ``quality_dir``.
  """
  records = []
  for side in SIDES:
    side_cfg = dataclasses.replace(cfg, projected_side=side)
    runs_dir = quality_dir if side == "shorter" else out_dir / side
    for name in grassjax.OPTIMIZERS:
      for seed in seeds:
        record = quality_lib.run(side_cfg, name, lrs[name], seed, runs_dir)
        records.append({"table": "runs", "projected_side": side, **record})
  return records


def _tables(states: list[dict], runs: list[dict]) -> str:
  state_rows = [
    (
      r["model"],
      r["optimizer"],
      r["rank"],
      f"{r['shorter_bytes'] / 2**30:.3f}",
      f"{r['longer_bytes'] / 2**30:.3f}",
      f"{r['longer_over_shorter']:.3f}",
    )
    for r in states
  ]
  kinds = sorted({k for r in runs for k in r["final_energy_fraction"]})
  run_rows = [
    (
      r["optimizer"],
      r["projected_side"],
      f"{r['lr']:g}",
      r["seed"],
      *(f"{r['final_energy_fraction'][k]:.3f}" for k in kinds),
      f"{r['final_eval_loss']:.4f}",
      f"{r['optimizer_state_bytes'] / 2**20:.2f}",
    )
    for r in runs
  ]
  return (
    "## Optimizer state (GiB), each side\n\n"
    + common.markdown_table(
      ("model", "optimizer", "rank", "shorter", "longer", "longer / shorter"),
      state_rows,
    )
    + "\n## Energy kept on the last step, final eval loss\n\n"
    + common.markdown_table(
      (
        "optimizer",
        "side",
        "lr",
        "seed",
        *(k.removeprefix("energy_") + " R" for k in kinds),
        "final eval loss",
        "state (MiB)",
      ),
      run_rows,
    )
  )


@reports_user_errors("python -m benchmarks.projected_side")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.projected_side",
    "State bytes, energy kept and loss of the low-rank optimizers, per side.",
    exclude=(
      "optimizer",
      "projected_side",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
      "adaptive_optimizer",
      "recovery_scaling",
    ),
  )
  parser.add_argument("--seeds", type=common.ints, default=[0])
  parser.add_argument(
    "--quality-results",
    default="benchmarks/results/quality-cpu.json",
    help="benchmarks.quality's results: each preset runs at its best"
    " learning rate there (--lr where the file or the preset is missing)",
  )
  parser.add_argument(
    "--quality-dir",
    default="runs/quality",
    help="benchmarks.quality's runs, reused for the shorter side",
  )
  parser.set_defaults(out_dir="runs/projected_side")
  args = parser.parse_args(argv)
  cfg = config_lib.config_from_args(parser, args)
  results = Path(args.quality_results)
  best = (
    json.loads(results.read_text())["meta"]["best_lr"]
    if results.exists()
    else {}
  )
  lrs = {name: best.get(name, cfg.lr) for name in grassjax.OPTIMIZERS}
  states = state_records()
  runs = run_records(
    cfg, Path(cfg.out_dir), Path(args.quality_dir), lrs, args.seeds
  )
  budget = common.run_budget(cfg).rsplit(", lr", 1)[0]
  text = (
    f"Runs: {budget}; each preset at its best learning rate of"
    f" benchmarks.quality.\n\n" + _tables(states, runs) + "\n"
  )
  meta = {
    "command": "python -m benchmarks.projected_side",
    "budget": budget,
    "lrs": lrs,
    "seeds": args.seeds,
  }
  path = common.write_results("projected_side", meta, states + runs, text)
  print(f"\n{text}wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
