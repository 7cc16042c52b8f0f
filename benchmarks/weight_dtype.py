"""bfloat16 weights (and state): the loss of stochastic and nearest rounding
against float32.

    python -m benchmarks.weight_dtype
    python -m benchmarks.weight_dtype --optimizers grasswalk --seeds 0,1,2

Trains the LLaMA example (any trainer flag applies; default: ``tiny`` on the
shipped sample) with the weights stored in float32, in bfloat16 with updates
rounded stochastically (``--param-dtype bfloat16``), and in bfloat16 rounded to
nearest (``--no-stochastic-rounding``), and for the low-rank optimizers with
bfloat16 weights, moments and bases (the state of the 24 GiB recipe), for each
optimizer and seed, and reports the final validation loss: mean and standard
deviation over seeds.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import train as train_lib
from examples.llama.errors import reports_user_errors

SETTINGS = {
  "float32": dict(param_dtype="float32"),
  "bfloat16, stochastic": dict(
    param_dtype="bfloat16", stochastic_rounding=True
  ),
  "bfloat16, nearest": dict(param_dtype="bfloat16", stochastic_rounding=False),
  # The 24 GiB recipe's state: moments and bases in bfloat16 too (low-rank
  # only).
  "bfloat16 + bf16 moments and bases": dict(
    param_dtype="bfloat16", moment_dtype="bfloat16", basis_dtype="bfloat16"
  ),
}
LOW_RANK_ONLY = ("moment_dtype", "basis_dtype")


@reports_user_errors("python -m benchmarks.weight_dtype")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.weight_dtype",
    "Train with float32 and bfloat16 weights.",
    exclude=(
      "optimizer",
      "seed",
      "param_dtype",
      "stochastic_rounding",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
    ),
  )
  parser.add_argument("--optimizers", default="grasswalk,adamw")
  parser.add_argument("--seeds", default="0,1")
  parser.set_defaults(out_dir="runs/weight_dtype")
  args = parser.parse_args(argv)
  cfg = config_lib.config_from_args(parser, args)
  records = []
  for optimizer in args.optimizers.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      for setting, flags in SETTINGS.items():
        if optimizer == "adamw" and any(f in flags for f in LOW_RANK_ONLY):
          continue
        name = f"{optimizer}-{seed}-{flags['param_dtype']}-{len(records)}"
        run_cfg = dataclasses.replace(
          cfg.with_optimizer(optimizer),
          seed=seed,
          out_dir=str(Path(cfg.out_dir) / name),
          **flags,
        )
        summary = train_lib.train(run_cfg, progress=False).summary
        records.append(
          {
            "optimizer": optimizer,
            "seed": seed,
            "weights": setting,
            "final_eval_loss": summary["final_eval_loss"],
          }
        )
        print(
          f"{optimizer} seed {seed} {setting}: {summary['final_eval_loss']:.4f}"
        )
  rows = []
  for optimizer in args.optimizers.split(","):
    for setting in SETTINGS:
      losses = [
        r["final_eval_loss"]
        for r in records
        if r["optimizer"] == optimizer and r["weights"] == setting
      ]
      if not losses:
        continue
      spread = statistics.stdev(losses) if len(losses) > 1 else float("nan")
      rows.append(
        (optimizer, setting, len(losses), statistics.mean(losses), spread)
      )
  budget = common.run_budget(cfg)
  tables = f"Budget: {budget}.\n\n" + common.markdown_table(
    ("optimizer", "weights", "seeds", "mean eval loss", "std"), rows
  )
  path = common.write_results(
    "weight_dtype", {"budget": budget}, records, tables
  )
  print(f"\n{tables}\nwrote {path}")


if __name__ == "__main__":
  main()
