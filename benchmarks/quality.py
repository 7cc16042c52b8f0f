"""Quality: LLaMA pre-training runs of every optimizer over seeds and learning
rates.

    python -m benchmarks.quality             # tiny model, shipped sample
    python -m benchmarks.quality --ablation  # and the 16-cell grid
    python -m benchmarks.quality --model 60m --steps 2000 --data-dir /data/c4

Every run is the LLaMA example's trainer (:func:`examples.llama.train.train`)
with the same data, token budget and settings; the optimizer, its learning
rate and the seed (model init, data order, subspaces) change. Each optimizer
of ``grassjax.OPTIMIZERS`` and AdamW, at its defaults, runs for every
learning rate of ``--lrs`` and seed of ``--seeds``; where its best rate
(the lowest mean final eval loss over the seeds) lies on an edge of the grid,
the grid grows past that edge (``--max-extra-lrs`` times at most), so the
rate each optimizer is compared at is tuned, not a bound. With
``--tune-seeds`` only those seeds sweep the rates, and the rest of ``--seeds``
run at each optimizer's tuned rate. The comparison at the tuned rates gives
each mean loss in bits per byte of validation text as well, which compares
across tokenizers:

    python -m benchmarks.quality --tokenizer examples/llama/tokenizer \
      --tune-seeds 0 --steps 300 --results-name quality-subword

``--ablation`` adds the 16 cells of the grid in Table 1 of "Principled
Randomized Exploration of Gradient Subspaces for Efficient LLM Training" (4
subspace rules x adaptive optimizer on/off x recovery scaling on/off), each
at the learning rate its rule's optimizer does best with, for the seeds of
``--ablation-seeds``.

A run is kept in ``--out-dir/<name>/`` and reused while its ``summary.json``
holds the same configuration, so an interrupted benchmark continues where it
stopped. Writes ``benchmarks/results/quality-<platform>.{json,md}`` (one
record per run, with ``optimizer``, ``seed``, ``lr``) and
``quality-<platform>.png`` (each optimizer at its best learning rate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import grassjax
from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import report as report_lib
from examples.llama import train as train_lib
from examples.llama.errors import NonFiniteError, UserError, reports_user_errors

RULES = {  # subspace rule of each grid row -> the optimizer that uses it
  "svd": "galore",
  "tracking": "subtrack_pp",
  "random_walk": "grasswalk",
  "random_jump": "grassjump",
}


def _defaults(optimizer: str) -> tuple[bool | None, bool | None]:
  """The (AO, RS) an optimizer takes by default; ``None`` for AdamW."""
  if optimizer == "adamw":
    return None, None
  defaults = grassjax.OPTIMIZERS[optimizer].defaults
  return defaults["adaptive_optimizer"], defaults["recovery_scaling"]


def run_name(optimizer: str, lr: float, seed: int, ao=None, rs=None) -> str:
  """A run's directory name; the AO/RS switches appear only off-default."""
  name = f"{optimizer}-lr{lr:g}-seed{seed}"
  if (ao, rs) != (None, None) and (ao, rs) != _defaults(optimizer):
    name += f"-ao{int(ao)}-rs{int(rs)}"
  return name


def run(
  cfg: config_lib.TrainConfig,
  optimizer: str,
  lr: float,
  seed: int,
  out_dir: Path,
  ao: bool | None = None,
  rs: bool | None = None,
) -> dict[str, Any]:
  """One run's record, trained now or read back from an earlier one."""
  name = run_name(optimizer, lr, seed, ao, rs)
  if ao is None:
    ao, rs = _defaults(optimizer)
  run_cfg = dataclasses.replace(
    cfg.with_optimizer(optimizer),
    lr=lr,
    seed=seed,
    adaptive_optimizer=ao,
    recovery_scaling=rs,
    out_dir=str(out_dir / name),
  ).resolved(process_count=1)
  summary_path = out_dir / name / "summary.json"
  earlier = (
    json.loads(summary_path.read_text()) if summary_path.exists() else {}
  )
  if same_config(earlier.get("config"), run_cfg):
    summary = earlier
    records = run_records(out_dir / name)
  else:
    try:
      summary, records = train_lib.train(run_cfg, progress=True)
    except NonFiniteError as err:
      # A rate of the sweep that diverges ranks last (_mean_loss), and the
      # sweep goes on.
      records = run_records(out_dir / name)
      summary = {"final_eval_loss": math.nan, "diverged": str(err)}
      print(f"{name:36s} diverged: {err}")
    else:
      print(
        f"{name:36s} eval loss {summary['final_eval_loss']:.4f}"
        f"  ({summary['wall_seconds']:.0f} s)"
      )
  return {
    "run": name,
    "optimizer": optimizer,
    "lr": lr,
    "seed": seed,
    "adaptive_optimizer": ao,
    "recovery_scaling": rs,
    **{k: v for k, v in summary.items() if k not in ("config", "optimizer")},
    "curves": curves(records),
  }


def run_records(run_dir: Path) -> list[dict]:
  """The metrics records a run wrote to ``run_dir/metrics.jsonl``."""
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def same_config(recorded: dict | None, cfg: config_lib.TrainConfig) -> bool:
  """Whether a run recorded with configuration ``recorded`` is a run of ``cfg``.

  A field the record lacks (it predates the field) counts as its default.
  """
  if recorded is None:
    return False
  current = json.loads(json.dumps(dataclasses.asdict(cfg)))
  defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
  return set(recorded) <= set(current) and all(
    recorded.get(name, defaults[name]) == value
    for name, value in current.items()
  )


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


def _losses(records: Sequence[dict], **match) -> list[float]:
  return [
    r["final_eval_loss"]
    for r in records
    if all(r[k] == v for k, v in match.items())
  ]


def _mean_loss(losses: Sequence[float]) -> float:
  """The mean over seeds; a diverged run (NaN) ranks last."""
  mean = statistics.mean(losses)
  return math.inf if math.isnan(mean) else mean


def mean_std(losses: Sequence[float]) -> str:
  """``"mean ± std"`` of losses over seeds; one loss alone; none blank."""
  if not losses:
    return ""
  if len(losses) < 2:
    return f"{losses[0]:.4f}"
  return f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"


def best_lrs(records: Sequence[dict]) -> dict[str, float]:
  """Each optimizer's learning rate of lowest mean final eval loss, among
  the rates it ran with."""
  best = {}
  for name in dict.fromkeys(r["optimizer"] for r in records):
    lrs = {r["lr"] for r in records if r["optimizer"] == name}
    best[name] = min(
      sorted(lrs),
      key=lambda lr: _mean_loss(_losses(records, optimizer=name, lr=lr)),
    )
  return best


def _round_rate(lr: float) -> float:
  """The nearest of 1, 2, 3 or 5 times a power of ten, in log distance."""
  exponent = math.floor(math.log10(lr))
  candidates = [
    float(f"{mantissa}e{e}")
    for e in (exponent, exponent + 1)
    for mantissa in (1, 2, 3, 5)
  ]
  return min(candidates, key=lambda c: abs(math.log(c / lr)))


def sweep(
  run_seeds: Callable[[float], list[dict]],
  lrs: Sequence[float],
  max_extra: int,
) -> list[dict]:
  """The records of ``run_seeds(lr)`` over the grid ``lrs``, extended past an
  edge while the best rate sits on it.

  A best rate at the grid's edge is a bound, not a tuned rate: the grid grows
  there by its mean ratio between neighbours, rounded to 1, 2, 3 or 5 times
  a power of ten (``1e-3, 3e-3, 1e-2`` goes on to ``3e-4, 1e-4`` or ``3e-2,
  1e-1``), at most ``max_extra`` times.
  """
  grid = sorted(lrs)
  records = [r for lr in grid for r in run_seeds(lr)]
  if len(grid) < 2:
    return records
  ratio = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1))
  for _ in range(max_extra):
    (best,) = best_lrs(records).values()
    if best == grid[0]:
      grid.insert(0, _round_rate(grid[0] / ratio))
      records += run_seeds(grid[0])
    elif best == grid[-1]:
      grid.append(_round_rate(grid[-1] * ratio))
      records += run_seeds(grid[-1])
    else:
      break
  return records


def tuned_runs(
  run_one: Callable[[str, float, int], dict],
  optimizers: Sequence[str],
  lrs: Sequence[float],
  max_extra: int,
  seeds: Sequence[int],
  tune_seeds: Sequence[int],
) -> tuple[list[dict], dict[str, float]]:
  """Every optimizer's runs and its tuned rate.

  ``run_one(optimizer, lr, seed)`` runs ``tune_seeds`` over the rates of
  :func:`sweep`; the rest of ``seeds`` then run at each optimizer's tuned
  rate only, so they add to the spread at that rate without having chosen it.

  Raises:
    UserError: ``tune_seeds`` are not among ``seeds``.
  """
  if not set(tune_seeds) <= set(seeds):
    raise UserError(
      f"--tune-seeds {list(tune_seeds)} must be among --seeds {list(seeds)}."
    )
  records = [
    record
    for name in optimizers
    for record in sweep(
      lambda lr, name=name: [run_one(name, lr, seed) for seed in tune_seeds],
      lrs,
      max_extra,
    )
  ]
  best = best_lrs(records)
  records += [
    run_one(name, lr, seed)
    for name, lr in best.items()
    for seed in seeds
    if seed not in tune_seeds
  ]
  return records, best


def beyond_noise(a: Sequence[float], b: Sequence[float]) -> str:
  """``"yes"`` if two mean losses differ by more than twice the standard
  error of their difference (each spread taken from its seeds), else
  ``"no"``; ``"n/a"`` with fewer than two seeds."""
  if min(len(a), len(b)) < 2:
    return "n/a"
  error = math.sqrt(
    statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
  )
  return (
    "yes" if abs(statistics.mean(a) - statistics.mean(b)) > 2 * error else "no"
  )


def tables(
  records: Sequence[dict], best: dict[str, float], bytes_per_token: float
) -> str:
  """The learning-rate grid, the comparison at the best rates (with each mean
  loss in bits per byte of text, ``loss / (ln 2 * bytes_per_token)``), the
  ablation."""
  main = [r for r in records if "ablation" not in r]
  optimizers = list(best)
  lrs = sorted({r["lr"] for r in main})
  grid = [
    (name, *(mean_std(_losses(main, optimizer=name, lr=lr)) for lr in lrs))
    for name in optimizers
  ]
  out = (
    "## Final eval loss by learning rate, mean ± std over seeds\n\n"
    "A blank cell: a rate outside that optimizer's grid, which grows past"
    " an edge only while its best rate sits there.\n\n"
  )
  out += common.markdown_table(
    ("optimizer", *(f"lr {lr:g}" for lr in lrs)), grid
  )
  if "adamw" not in best:
    raise ValueError("the comparison needs adamw among --optimizers.")
  adamw = _losses(main, optimizer="adamw", lr=best["adamw"])
  rows = []
  for name in optimizers:
    losses = _losses(main, optimizer=name, lr=best[name])
    diff = statistics.mean(losses) - statistics.mean(adamw)
    rows.append(
      (
        name,
        f"{best[name]:g}",
        mean_std(losses),
        f"{min(losses):.4f} to {max(losses):.4f}",
        f"{statistics.mean(losses) / (math.log(2) * bytes_per_token):.4f}",
        "" if name == "adamw" else f"{diff:+.4f}",
        "" if name == "adamw" else beyond_noise(losses, adamw),
      )
    )
  out += "\n## Each optimizer at its best learning rate\n\n"
  out += common.markdown_table(
    (
      "optimizer",
      "best lr",
      "final eval loss",
      "range over seeds",
      "bits per byte",
      "vs AdamW",
      "beyond seed noise",
    ),
    rows,
  )
  ablation = [r for r in records if "ablation" in r]
  if ablation:
    header = (
      "subspace rule",
      "lr",
      *(f"AO {a}, RS {b}" for a in ("off", "on") for b in ("off", "on")),
    )
    cells = [
      (
        rule,
        f"{best[optimizer]:g}",
        *(
          mean_std(
            _losses(
              ablation,
              ablation=rule,
              adaptive_optimizer=ao,
              recovery_scaling=rs,
            )
          )
          for ao in (False, True)
          for rs in (False, True)
        ),
      )
      for rule, optimizer in RULES.items()
    ]
    seeds = sorted({r["seed"] for r in ablation})
    out += (
      "\n## Ablation grid: final eval loss"
      f" (seeds {', '.join(map(str, seeds))};"
      f" AdamW at its best lr: {mean_std(adamw)})\n\n"
      + common.markdown_table(header, cells)
    )
  return out + "\n"


# Settings that may differ between a run of ``--rates-from`` and the runs of
# the results file it compares with.
_PER_RUN = ("optimizer", "lr", "seed", "out_dir", "moment_dtype")


def reference_rates(
  reference: dict, cfg: config_lib.TrainConfig, optimizers: Sequence[str]
) -> dict[str, float]:
  """The tuned rate of each optimizer in a quality results file, checked to
  come from runs of ``cfg`` but for the moments' storage."""
  recorded = reference["meta"]["config"]
  current = json.loads(json.dumps(dataclasses.asdict(cfg.sized())))
  current["data_dir"] = common.display_path(cfg.data_dir)
  differ = [
    name
    for name, value in current.items()
    if name not in _PER_RUN and recorded.get(name, value) != value
  ]
  if differ:
    flags = ", ".join(f"--{config_lib._flag_name(n)}" for n in differ)
    raise UserError(
      "--rates-from compares runs of the same settings; these differ from"
      f" the file's: {flags}."
    )
  missing = [n for n in optimizers if n not in reference["meta"]["best_lr"]]
  if missing:
    raise UserError(f"--rates-from has no tuned rate for {', '.join(missing)}.")
  return {name: reference["meta"]["best_lr"][name] for name in optimizers}


def storage_table(
  records: Sequence[dict],
  reference: Sequence[dict],
  best: dict[str, float],
  storage: str,
) -> str:
  """Each optimizer's runs at its tuned rate against the reference file's
  runs at the same rate and seeds (their moments stored otherwise)."""
  rows = []
  for name, lr in best.items():
    losses = _losses(records, optimizer=name, lr=lr)
    seeds = {r["seed"] for r in records if r["optimizer"] == name}
    theirs = [
      r["final_eval_loss"]
      for r in reference
      if r["optimizer"] == name
      and r["lr"] == lr
      and r["seed"] in seeds
      and "ablation" not in r
    ]
    rows.append(
      (
        name,
        f"{lr:g}",
        mean_std(losses),
        mean_std(theirs),
        f"{statistics.mean(losses) - statistics.mean(theirs):+.4f}",
        beyond_noise(losses, theirs),
      )
    )
  return (
    f"## Moments stored as {storage} against float32, at each optimizer's"
    " tuned rate\n\n"
    + common.markdown_table(
      (
        "optimizer",
        "lr",
        f"{storage}: final eval loss",
        "float32",
        "difference",
        "beyond seed noise",
      ),
      rows,
    )
    + "\n"
  )


@reports_user_errors("python -m benchmarks.quality")
def main(argv=None) -> None:
  parser = config_lib.build_parser(
    "python -m benchmarks.quality",
    "Pre-training runs of every optimizer over seeds and learning rates.",
    exclude=(
      "optimizer",
      "lr",
      "seed",
      "checkpoint_dir",
      "checkpoint_every",
      "resume",
      "adaptive_optimizer",
      "recovery_scaling",
    ),
  )
  parser.add_argument("--lrs", type=common.floats, default=[1e-3, 3e-3, 1e-2])
  parser.add_argument(
    "--max-extra-lrs",
    type=int,
    default=2,
    help="rates each optimizer's grid may grow by past an edge where its"
    " best rate lies (0: the grid as given)",
  )
  parser.add_argument("--seeds", type=common.ints, default=[0, 1, 2])
  parser.add_argument(
    "--tune-seeds",
    type=common.ints,
    default=None,
    help="the seeds of --seeds that tune the rate (default: all); the others"
    " run at each optimizer's tuned rate only",
  )
  parser.add_argument(
    "--optimizers",
    type=lambda x: x.split(","),
    default=list(config_lib.OPTIMIZERS),
  )
  parser.add_argument("--results-name", default="quality")
  parser.add_argument("--ablation", action="store_true")
  parser.add_argument("--ablation-seeds", type=common.ints, default=[0])
  parser.add_argument(
    "--rates-from",
    type=Path,
    default=None,
    help="a quality results file (JSON): run each optimizer only at the rate"
    " tuned there, and compare with that file's runs (for another"
    " --moment-dtype)",
  )
  parser.set_defaults(out_dir="runs/quality")
  args = parser.parse_args(argv)
  cfg = config_lib.config_from_args(parser, args)
  out_dir = Path(cfg.out_dir)

  if args.rates_from is not None:
    _compare_storage(args, cfg, out_dir)
    return
  tune_seeds = args.seeds if args.tune_seeds is None else args.tune_seeds
  # Bits per byte compare losses across tokenizers.
  ratio = data_lib.bytes_per_token(
    cfg.data_source(), data_lib.load_tokenizer(cfg.tokenizer)
  )
  records, best = tuned_runs(
    lambda name, lr, seed: run(cfg, name, lr, seed, out_dir),
    args.optimizers,
    args.lrs,
    args.max_extra_lrs,
    args.seeds,
    tune_seeds,
  )
  if args.ablation:
    for rule, optimizer in RULES.items():
      for ao in (False, True):
        for rs in (False, True):
          for seed in args.ablation_seeds:
            record = run(cfg, optimizer, best[optimizer], seed, out_dir, ao, rs)
            records.append({**record, "ablation": rule})

  budget = common.run_budget(cfg).rsplit(", lr", 1)[0]
  grids = {
    name: sorted({r["lr"] for r in records if r["optimizer"] == name})
    for name in best
  }
  tuning = (
    "" if tune_seeds == args.seeds else f", rates tuned over seeds {tune_seeds}"
  )
  text = (
    f"Budget: {budget}; learning rates {args.lrs} (grown past an edge up to"
    f" {args.max_extra_lrs} times), seeds {args.seeds}{tuning}; {ratio:.3f}"
    " bytes of validation text a token.\n\n"
  )
  text += tables(records, best, ratio)
  meta = {
    "budget": budget,
    "lrs": grids,
    "seeds": args.seeds,
    "tune_seeds": tune_seeds,
    "bytes_per_token": ratio,
    "best_lr": best,
    "config": {
      **dataclasses.asdict(cfg),
      "data_dir": common.display_path(cfg.data_dir),
    },
  }
  path = common.write_results(args.results_name, meta, records, text)
  best_runs = {}
  for name, lr in best.items():
    seed = args.seeds[0]
    best_runs[f"{name} (lr {lr:g})"] = run_records(
      out_dir / run_name(name, lr, seed)
    )
  tokens = cfg.steps * cfg.batch_size * cfg.seq_len
  report_lib.plot_losses(
    best_runs,
    path.with_suffix(".png"),
    f"LLaMA {cfg.model}, {tokens:,} tokens, best lr, seed {args.seeds[0]}",
  )
  print(f"\n{text}wrote {path}, {path.with_suffix('.md')} and the plot")


def _compare_storage(args, cfg: config_lib.TrainConfig, out_dir: Path) -> None:
  """``--rates-from``: the seeds at each optimizer's tuned rate, against the
  results file's runs."""
  reference = json.loads(args.rates_from.read_text())
  best = reference_rates(reference, cfg, args.optimizers)
  records = [
    run(cfg, name, lr, seed, out_dir)
    for name, lr in best.items()
    for seed in args.seeds
  ]
  budget = common.run_budget(cfg).rsplit(", lr", 1)[0]
  text = (
    f"Budget: {budget}; moments {cfg.moment_dtype}; rates tuned with float32"
    f" moments in {common.display_path(args.rates_from)}; seeds"
    f" {args.seeds}.\n\n"
  )
  text += storage_table(records, reference["records"], best, cfg.moment_dtype)
  meta = {
    "budget": budget,
    "moment_dtype": cfg.moment_dtype,
    "rates_from": common.display_path(args.rates_from),
    "best_lr": best,
    "seeds": args.seeds,
  }
  path = common.write_results(args.results_name, meta, records, text)
  print(f"\n{text}wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
