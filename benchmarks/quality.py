"""Quality: short LLaMA pre-training runs of every optimizer and the ablation grid.

    python -m benchmarks.quality                       # tiny model, shipped sample
    python -m benchmarks.quality --steps 2000 --model 60m --data-dir /data/c4

Every run is the LLaMA example's trainer (:func:`examples.llama.train.train`)
with the same data, seed, token budget and settings; only the optimizer
changes. Two sets:

* **optimizers**: adamw, galore, subtrack_pp, grasswalk, grassjump, each with
  its defaults;
* **ablation**: the 16 cells of the grid in Table 1 of "Principled Randomized
  Exploration of Gradient Subspaces for Efficient LLM Training": 4 subspace
  rules (svd as in GaLore, tracking as in SubTrack++, random walk as in
  GrassWalk, random jump as in GrassJump) x adaptive optimizer on/off x
  recovery scaling on/off. A cell that equals one of the optimizers' default
  runs reuses it.

Writes ``benchmarks/results/quality-<platform>.{json,md}`` (final eval loss and
perplexity per run, the budget in the heading) and ``quality-<platform>.png``
(the curves of the optimizers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from benchmarks import common
from examples.llama import compare as compare_lib
from examples.llama import config as config_lib
from examples.llama import train as train_lib
from examples.llama.errors import reports_user_errors

RULES = {  # subspace rule of each grid row -> the optimizer that uses it
  "svd": "galore",
  "tracking": "subtrack_pp",
  "random_walk": "grasswalk",
  "random_jump": "grassjump",
}
DEFAULTS = {"galore": (False, False)}  # (AO, RS); the others default to on, on


def run_name(optimizer: str, ao: bool, rs: bool) -> str:
  """A run's directory name; optimizers at their defaults keep their plain name."""
  if DEFAULTS.get(optimizer, (True, True)) == (ao, rs):
    return optimizer
  return f"{optimizer}-ao{int(ao)}-rs{int(rs)}"


def run(cfg: config_lib.TrainConfig, optimizer: str, ao, rs, out_dir: Path, cache):
  """Trains one run (or returns it from ``cache``); returns its summary and records."""
  name = "adamw" if optimizer == "adamw" else run_name(optimizer, ao, rs)
  if name not in cache:
    run_cfg = dataclasses.replace(
      cfg.with_optimizer(optimizer),
      adaptive_optimizer=None if optimizer == "adamw" else ao,
      recovery_scaling=None if optimizer == "adamw" else rs,
      out_dir=str(out_dir / name),
    )
    cache[name] = train_lib.train(run_cfg, progress=True)
    summary = cache[name].summary
    print(
      f"{name:24s} eval loss {summary['final_eval_loss']:.4f}"
      f"  ({summary['wall_seconds']:.0f} s)"
    )
  return name, cache[name]


def curves(records, points: int = 60) -> dict[str, list]:
  """A run's training loss (averaged into ``points`` bins) and eval losses."""
  train = np.array([(r["step"], r["loss"]) for r in records if "loss" in r])
  bins = np.array_split(train, min(points, len(train)))
  return {
    "train_step": [float(b[:, 0].mean()) for b in bins],
    "train_loss": [float(b[:, 1].mean()) for b in bins],
    "eval_step": [r["step"] for r in records if "eval_loss" in r],
    "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
  }


@reports_user_errors("python -m benchmarks.quality")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.quality",
    "Short pre-training runs of every optimizer and the 16-cell ablation grid.",
    exclude=(
      "optimizer",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
      "adaptive_optimizer",
      "recovery_scaling",
    ),
  )
  parser.add_argument("--skip-ablation", action="store_true")
  parser.set_defaults(out_dir="runs/quality")
  cfg = config_lib.config_from_args(parser, args := parser.parse_args(argv))
  out_dir = Path(cfg.out_dir)
  cache: dict[str, train_lib.RunResult] = {}

  main_runs = {}
  for optimizer in config_lib.OPTIMIZERS:
    ao, rs = DEFAULTS.get(optimizer, (True, True))
    name, result = run(cfg, optimizer, ao, rs, out_dir, cache)
    main_runs[name] = result
  grid = []
  if not args.skip_ablation:
    for rule, optimizer in RULES.items():
      for ao in (False, True):
        for rs in (False, True):
          name, result = run(cfg, optimizer, ao, rs, out_dir, cache)
          grid.append((rule, ao, rs, name, result.summary["final_eval_loss"]))

  tokens = cfg.steps * cfg.batch_size * cfg.seq_len
  budget = common.run_budget(cfg)
  tables = f"Budget: {budget}.\n\n## Optimizers\n\n" + compare_lib.markdown_table(
    [r.summary for r in main_runs.values()]
  )
  if grid:
    cells = {(rule, ao, rs): loss for rule, ao, rs, _, loss in grid}
    header = (
      "subspace rule",
      "AO off, RS off",
      "AO off, RS on",
      "AO on, RS off",
      "AO on, RS on",
    )
    rows = [
      (
        rule,
        *(f"{cells[rule, ao, rs]:.4f}" for ao in (False, True) for rs in (False, True)),
      )
      for rule in RULES
    ]
    tables += (
      "\n## Ablation grid: final eval loss (AdamW: "
      f"{main_runs['adamw'].summary['final_eval_loss']:.4f})\n\n"
      + common.markdown_table(header, rows)
    )
  records = [
    {
      "run": name,
      **{k: v for k, v in r.summary.items() if k != "config"},
      "adaptive_optimizer": r.summary["config"]["adaptive_optimizer"],
      "recovery_scaling": r.summary["config"]["recovery_scaling"],
      "curves": curves(r.records),
    }
    for name, r in cache.items()
  ]
  meta = {
    "budget": budget,
    "config": {
      **dataclasses.asdict(cfg),
      "data_dir": common.display_path(cfg.data_dir),
    },
  }
  path = common.write_results("quality", meta, records, tables)
  compare_lib.plot_comparison(
    main_runs, path.with_suffix(".png"), f"LLaMA {cfg.model}, {tokens:,} tokens"
  )
  print(f"\n{tables}\nwrote {path}, {path.with_suffix('.md')} and the plot")


if __name__ == "__main__":
  main()
