"""GrassWalk's step size: a sweep of the geodesic rotation angle.

    python -m benchmarks.walk_angle
    python -m benchmarks.walk_angle --angles 0.05,0.2,1.0 --steps 2000

``grassjax.subspace.random_walk`` normalizes the tangent, so ``step_size`` is
the angle (radians) by which one direction of each subspace rotates per update.
This script trains the LLaMA example with GrassWalk at several angles (same
data, seed and budget; any trainer flag applies) and reports the final
validation loss of each; ``pi / 2`` rotates a direction fully out of the old
subspace, close to a jump. ``grassjax.subspace.DEFAULT_WALK_ANGLE`` was chosen
from this sweep (see ``benchmarks/results/walk_angle-<platform>.md``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import train as train_lib
from examples.llama.errors import reports_user_errors

ANGLES = (0.05, 0.1, 0.2, 0.5, 1.0, math.pi / 2)


@reports_user_errors("python -m benchmarks.walk_angle")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.walk_angle",
    "Train with GrassWalk at several rotation angles.",
    exclude=(
      "optimizer",
      "step_size",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
    ),
  )
  parser.add_argument("--angles", default=",".join(f"{a:.4g}" for a in ANGLES))
  parser.set_defaults(out_dir="runs/walk_angle")
  args = parser.parse_args(argv)
  cfg = config_lib.config_from_args(parser, args).with_optimizer("grasswalk")
  records = []
  for angle in (float(a) for a in args.angles.split(",")):
    run_cfg = dataclasses.replace(
      cfg,
      step_size=angle,
      out_dir=str(Path(cfg.out_dir) / f"angle-{angle:.4g}"),
    )
    summary = train_lib.train(run_cfg).summary
    records.append(
      {
        "angle": angle,
        "final_eval_loss": summary["final_eval_loss"],
        "final_train_loss": summary["final_train_loss"],
      }
    )
    print(f"angle {angle:.4g}: eval loss {summary['final_eval_loss']:.4f}")
  best = min(records, key=lambda r: r["final_eval_loss"])
  budget = common.run_budget(cfg)
  tables = f"Budget: {budget}.\n\n" + common.markdown_table(
    ("angle (rad)", "final eval loss", "final train loss"),
    [
      (r["angle"], r["final_eval_loss"], r["final_train_loss"]) for r in records
    ],
  )
  tables += f"\nLowest eval loss at angle {best['angle']:.4g}.\n"
  path = common.write_results("walk_angle", {"budget": budget}, records, tables)
  print(f"\n{tables}\nwrote {path}")


if __name__ == "__main__":
  main()
