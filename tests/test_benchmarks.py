"""The benchmarks' statistics: learning-rate tuning and the noise test."""

import math

import pytest

from benchmarks import quality
from examples.llama.errors import UserError


def _fake_runs(loss_of_lr, seeds=(0, 1, 2)):
  """``run_seeds`` for :func:`quality.sweep` with losses from a formula, and
  the list of rates it was called with."""
  called = []

  def run_seeds(lr):
    called.append(lr)
    return [
      {
        "optimizer": "opt",
        "lr": lr,
        "seed": seed,
        "final_eval_loss": loss_of_lr(lr) + 1e-3 * seed,
      }
      for seed in seeds
    ]

  return run_seeds, called


def _parabola(best_lr):
  return lambda lr: (math.log10(lr) - math.log10(best_lr)) ** 2


@pytest.mark.parametrize(
  "best_lr, grown",
  [
    (3e-3, []),  # inside the grid: nothing added
    (3e-4, [3e-4, 1e-4]),  # below: grows down until the best is inside
    (3e-2, [3e-2, 1e-1]),  # above: grows up
    (1e-6, [3e-4, 1e-4]),  # far below: stops after max_extra rates
  ],
)
def test_sweep_grows_the_grid_past_an_edge_holding_the_best_rate(
  best_lr, grown
):
  run_seeds, called = _fake_runs(_parabola(best_lr))
  records = quality.sweep(run_seeds, [1e-3, 3e-3, 1e-2], max_extra=2)
  assert called == [1e-3, 3e-3, 1e-2, *grown]
  assert len(records) == 3 * len(called)
  best = quality.best_lrs(records)["opt"]
  if best_lr != 1e-6:
    assert best == pytest.approx(best_lr)
    assert min(called) < best < max(called)


def test_a_diverged_rate_is_never_the_best():
  run_seeds, _ = _fake_runs(lambda lr: math.nan if lr > 5e-3 else -lr)
  records = quality.sweep(run_seeds, [1e-3, 3e-3, 1e-2], max_extra=0)
  assert quality.best_lrs(records) == {"opt": 3e-3}


def test_beyond_noise_compares_the_gap_with_the_seed_spread():
  assert quality.beyond_noise([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) == "yes"
  assert quality.beyond_noise([1.0, 1.1, 0.9], [1.05, 1.15, 0.95]) == "no"
  assert quality.beyond_noise([1.0], [2.0]) == "n/a"


def test_the_keep_step_program_holds_the_keep_path_only():
  """With the count a constant, the basis update is folded away: the keep
  step calls no SVD, the update step does."""
  import re

  import jax
  import jax.numpy as jnp

  import grassjax
  from benchmarks import cost
  from examples.llama import targets

  params = {"w": jax.ShapeDtypeStruct((16, 24), jnp.float32)}
  tx = grassjax.galore(1e-3, rank=4, update_interval=10)
  cpu = targets.parse_target("cpu")
  calls = {}
  for count in (1, 10):
    compiled, _ = cost.compile_step(tx, params, count, cpu)
    text = compiled.as_text()
    assert "conditional" not in text
    calls[count] = re.findall(r'custom_call_target="([^"]*gesdd[^"]*)"', text)
  assert not calls[1] and calls[10]


def test_rates_from_a_results_file_of_other_settings_are_refused():
  import dataclasses

  from examples.llama import config as config_lib

  cfg = config_lib.TrainConfig(moment_dtype="8bit")
  recorded = json_config(dataclasses.replace(cfg, moment_dtype="float32"))
  reference = {"meta": {"config": recorded, "best_lr": {"adamw": 1e-3}}}
  # Only the moments' storage (and the per-run settings) may differ.
  assert quality.reference_rates(reference, cfg, ["adamw"]) == {"adamw": 1e-3}
  other = dataclasses.replace(cfg, steps=cfg.steps + 1)
  with pytest.raises(UserError, match="--steps"):
    quality.reference_rates(reference, other, ["adamw"])
  with pytest.raises(UserError, match="no tuned rate for galore"):
    quality.reference_rates(reference, cfg, ["adamw", "galore"])


def json_config(cfg):
  import dataclasses
  import json

  from benchmarks import common

  recorded = json.loads(json.dumps(dataclasses.asdict(cfg.sized())))
  recorded["data_dir"] = common.display_path(cfg.data_dir)
  return recorded


def test_storage_table_compares_the_same_rate_and_seeds():
  mine = [
    {"optimizer": "opt", "lr": 0.01, "seed": s, "final_eval_loss": 2.0 + s}
    for s in (0, 1)
  ]
  theirs = [
    {"optimizer": "opt", "lr": 0.01, "seed": s, "final_eval_loss": 1.0 + s}
    for s in (0, 1, 2)
  ] + [{"optimizer": "opt", "lr": 0.03, "seed": 0, "final_eval_loss": 9.0}]
  table = quality.storage_table(mine, theirs, {"opt": 0.01}, "8bit")
  # Seed 2 and the other rate are left out of the float32 side.
  assert (
    "| opt | 0.01 | 2.5000 ± 0.7071 | 1.5000 ± 0.7071 | +1.0000 | no |"
    in (table)
  )


def test_tune_seeds_choose_the_rate_and_the_other_seeds_run_at_it_only():
  calls = []

  def run_one(name, lr, seed):
    calls.append((lr, seed))
    # Seed 1 alone would pick 1e-2; the rate is chosen by seed 0's 3e-3.
    loss = _parabola(3e-3 if seed == 0 else 1e-2)(lr)
    return {"optimizer": name, "lr": lr, "seed": seed, "final_eval_loss": loss}

  records, best = quality.tuned_runs(
    run_one, ["opt"], [1e-3, 3e-3, 1e-2], 2, seeds=[0, 1, 2], tune_seeds=[0]
  )
  assert best == {"opt": 3e-3}
  assert calls == [(1e-3, 0), (3e-3, 0), (1e-2, 0), (3e-3, 1), (3e-3, 2)]
  assert len(records) == 5
  with pytest.raises(UserError, match="--tune-seeds"):
    quality.tuned_runs(run_one, ["opt"], [1e-3], 0, seeds=[0], tune_seeds=[1])
