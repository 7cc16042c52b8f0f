"""GrassWalk's step size: a sweep of the geodesic rotation angle over seeds.

    python -m benchmarks.walk_angle --lr 0.01
    python -m benchmarks.walk_angle --angles 0.05,0.2,1.0 --steps 2000

``grassjax.subspace.random_walk`` normalizes the tangent, so ``step_size`` is
the angle (radians) by which one direction of each subspace rotates per update;
``pi / 2`` rotates a direction fully out of the old subspace, close to a jump.
This script trains the LLaMA example with GrassWalk at each angle of
``--angles`` and seed of ``--seeds`` (same data and budget; any trainer flag
applies, ``--lr`` best set to GrassWalk's tuned rate from
``benchmarks.quality``) and reports each angle's mean and standard deviation
of the final eval loss, and whether its gap to the default angle exceeds the
seed noise. ``grassjax.subspace.DEFAULT_WALK_ANGLE`` was chosen from this sweep
(see ``benchmarks/results/walk_angle-<platform>.md``). Runs are kept under
``--out-dir/angle-<angle>/`` and reused, as ``benchmarks.quality`` does; the
default angle's runs are ``benchmarks.quality``'s, reused from
``--quality-dir``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from benchmarks import common
from benchmarks import quality as quality_lib
from examples.llama import config as config_lib
from examples.llama.errors import reports_user_errors
from grassjax.subspace import DEFAULT_WALK_ANGLE

ANGLES = (0.05, 0.1, 0.2, 0.5, 1.0, math.pi / 2)


@reports_user_errors("python -m benchmarks.walk_angle")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.walk_angle",
    "Train with GrassWalk at several rotation angles and seeds.",
    exclude=(
      "optimizer",
      "step_size",
      "seed",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
    ),
  )
  parser.add_argument("--angles", type=common.floats, default=list(ANGLES))
  parser.add_argument("--seeds", type=common.ints, default=[0, 1, 2])
  parser.add_argument(
    "--quality-dir",
    default="runs/quality",
    help="benchmarks.quality's runs, whose GrassWalk runs at the default"
    " angle are reused",
  )
  parser.set_defaults(out_dir="runs/walk_angle")
  args = parser.parse_args(argv)
  cfg = config_lib.config_from_args(parser, args)
  angles = sorted({*args.angles, DEFAULT_WALK_ANGLE})
  losses = {}
  records = []
  for angle in angles:
    # The default angle's runs are benchmarks.quality's GrassWalk runs (the
    # same configuration), reused from --quality-dir when there.
    is_default = angle == DEFAULT_WALK_ANGLE
    angle_cfg = dataclasses.replace(
      cfg, step_size=None if is_default else angle
    )
    runs_dir = (
      Path(args.quality_dir)
      if is_default
      else Path(cfg.out_dir) / f"angle-{angle:.4g}"
    )
    runs = [
      quality_lib.run(angle_cfg, "grasswalk", cfg.lr, seed, runs_dir)
      for seed in args.seeds
    ]
    records += [{"angle": angle, **r} for r in runs]
    losses[angle] = [r["final_eval_loss"] for r in runs]

  default = losses[DEFAULT_WALK_ANGLE]
  rows = [
    (
      f"{angle:.4g}" + (" (default)" if angle == DEFAULT_WALK_ANGLE else ""),
      quality_lib.mean_std(losses[angle]),
      f"{statistics.mean(losses[angle]) - statistics.mean(default):+.4f}",
      quality_lib.beyond_noise(losses[angle], default),
    )
    for angle in angles
  ]
  best = min(angles, key=lambda a: statistics.mean(losses[a]))
  budget = common.run_budget(cfg).rsplit(", seed", 1)[0]
  text = f"Budget: {budget}; seeds {args.seeds}.\n\n" + common.markdown_table(
    (
      "angle (rad)",
      "final eval loss, mean ± std",
      "vs default",
      "beyond seed noise",
    ),
    rows,
  )
  text += f"\nLowest mean eval loss at angle {best:.4g}.\n"
  meta = {"budget": budget, "seeds": args.seeds, "best_angle": best}
  path = common.write_results("walk_angle", meta, records, text)
  print(f"\n{text}\nwrote {path}")


if __name__ == "__main__":
  main()
