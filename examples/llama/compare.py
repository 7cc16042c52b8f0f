"""Train the same model with several optimizers and compare them.

    python -m examples.llama.compare --steps 300
    python -m examples.llama.compare --optimizers adamw,grasswalk --steps 1000

Every run uses the same data, seed and settings (any flag of
``examples.llama.train`` but the optimizer and the checkpoint flags); each
writes its own outputs to ``<out-dir>/<optimizer>/``. The comparison is
written to ``<out-dir>/compare.md`` (final validation loss, perplexity,
throughput and optimizer-state memory against AdamW) and
``<out-dir>/compare.png`` (all loss curves in one plot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax

from examples.llama import config as config_lib
from examples.llama import report
from examples.llama import sharding as sharding_lib
from examples.llama import train as train_lib
from examples.llama.errors import reports_user_errors

# Flags of the trainer that compare.py sets itself or does not offer.
_NOT_FLAGS = ("optimizer", "checkpoint_dir", "checkpoint_every", "resume")


def parse_args(
  argv: Sequence[str] | None = None,
) -> tuple[config_lib.TrainConfig, list[str]]:
  """The shared configuration and the optimizers to run."""
  parser = config_lib.build_parser(
    "python -m examples.llama.compare",
    "Train with several optimizers on the same data and compare them.",
    exclude=_NOT_FLAGS,
  )
  parser.add_argument(
    "--optimizers",
    default=",".join(config_lib.OPTIMIZERS),
    help="comma-separated optimizers to run, in this order",
  )
  parser.set_defaults(out_dir="runs/llama-compare")
  args = parser.parse_args(argv)
  names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
  unknown = [name for name in names if name not in config_lib.OPTIMIZERS]
  if unknown or not names:
    parser.error(
      f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; choose"
      f" from {', '.join(config_lib.OPTIMIZERS)}."
    )
  if len(set(names)) != len(names):
    parser.error(f"--optimizers lists an optimizer twice: {args.optimizers}.")
  return config_lib.config_from_args(parser, args), names


# The name ``benchmarks.quality`` imports the table by.
markdown_table = report.summary_table


def plot_comparison(
  results: dict[str, train_lib.RunResult], path: Path, title: str
) -> None:
  """All runs' training and validation loss curves in one plot."""
  report.plot_losses(
    {name: r.records for name, r in results.items()}, path, title
  )


def compare(
  cfg: config_lib.TrainConfig, optimizers: Sequence[str], **train_kwargs
) -> dict[str, train_lib.RunResult]:
  """Runs :func:`train.train` once per optimizer and writes the comparison.

  Args:
    cfg: the shared configuration (its ``optimizer`` is replaced).
    optimizers: the optimizers, by name.
    **train_kwargs: passed to :func:`train.train` (``model_config``,
      ``progress``).

  Returns:
    Each optimizer's :class:`train.RunResult`.
  """
  out_dir = Path(cfg.out_dir)
  results = {}
  for name in optimizers:
    run_cfg = dataclasses.replace(
      cfg.with_optimizer(name), out_dir=str(out_dir / name)
    )
    results[name] = train_lib.train(run_cfg, **train_kwargs)
  if jax.process_index() != 0:
    return results
  table = report.summary_table([r.summary for r in results.values()])
  title = (
    f"{cfg.model}, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens"
  )
  (out_dir / "compare.md").write_text(f"# {title}\n\n{table}")
  plot_comparison(results, out_dir / "compare.png", title)
  return results


@reports_user_errors("python -m examples.llama.compare")
def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``python -m examples.llama.compare``."""
  cfg, optimizers = parse_args(argv)
  if cfg.distributed:
    sharding_lib.start_distributed(cfg)
  compare(cfg, optimizers)
  if jax.process_index() == 0:
    print((Path(cfg.out_dir) / "compare.md").read_text())


if __name__ == "__main__":
  main()
