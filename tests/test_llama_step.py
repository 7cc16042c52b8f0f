"""The training step: fused equals unfused, clipping, rounding, and its
memory."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.llama import config as config_lib
from examples.llama import memory as memory_lib
from examples.llama import metrics as metrics_lib
from examples.llama import sharding as sharding_lib
from examples.llama import step as step_lib
from examples.llama import train as train_lib

VOCAB = 259  # the byte tokenizer's
RUN = dict(
  model="tiny",
  scan_layers=True,
  clip="per-layer",
  steps=100,
  warmup=5,
  batch_size=4,
  seq_len=32,
  rank=8,
  update_interval=5,
)


def _run(cfg: config_lib.TrainConfig, steps: int, tokens=None):
  """``steps`` training steps on fixed random tokens (or ``tokens``, shaped
  ``(steps, grad_accum, micro_batch, seq_len + 1)``): (losses, final state,
  energy fractions per step)."""
  model_config = config_lib.model_config(cfg, VOCAB)
  tx = config_lib.make_optimizer(cfg)
  graphdefs, abstract = step_lib.abstract_train_state(
    model_config, tx, cfg.seed
  )
  mesh = sharding_lib.make_mesh("none")
  shardings = sharding_lib.state_shardings(abstract, mesh, "none")
  state = step_lib.init_train_state(model_config, tx, cfg.seed, shardings)
  batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  step = step_lib.make_train_step(
    cfg, graphdefs, shardings, batch_sharding, mesh
  )
  if tokens is None:
    tokens = np.random.default_rng(0).integers(0, VOCAB, (steps, 1, 4, 33))
  losses, energy = [], []
  for batch in tokens:
    state, metrics = step(state, jnp.asarray(batch, jnp.int32))
    losses.append(float(metrics.pop("loss")))
    energy.append(
      {k: float(v) for k, v in metrics.items() if k.startswith("energy_")}
    )
  return np.array(losses), state, energy


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_fused_update_equals_unfused(optimizer):
  cfg = config_lib.TrainConfig(optimizer=optimizer, **RUN)
  unfused_losses, unfused, unfused_energy = _run(cfg, 20)
  fused_losses, fused, fused_energy = _run(
    dataclasses.replace(cfg, fused_update=True), 20
  )
  np.testing.assert_allclose(fused_losses, unfused_losses, rtol=1e-6)
  for a, b in zip(unfused_energy[1:], fused_energy[1:], strict=True):
    assert a.keys() == b.keys() and (optimizer == "adamw") == (not a)
    np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5)
  # The parameters, each array to 1e-5 of its norm. (Element by element,
  # Adam turns one-ulp differences in near-zero gradients into larger
  # relative ones, and an SVD basis may turn within a nearly degenerate
  # singular pair: GaLore's differ by 1.6e-6 after 20 steps; AdamW's runs
  # are bitwise equal. A wrong slice, key or count differs by far more.)
  for a, b in zip(
    jax.tree.leaves(unfused.model), jax.tree.leaves(fused.model), strict=True
  ):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_fused_update_with_bfloat16_weights_and_state_equals_unfused():
  # Stochastic rounding draws the same bits per block in both modes: at most a
  # rare element differs, by one bfloat16 step, where float32 gradients
  # computed in another order round the other way (different bits would
  # move about half of them).
  cfg = config_lib.TrainConfig(
    optimizer="grasswalk",
    param_dtype="bfloat16",
    moment_dtype="bfloat16",
    basis_dtype="bfloat16",
    **RUN,
  )
  unfused_losses, unfused, _ = _run(cfg, 6)
  fused_losses, fused, _ = _run(dataclasses.replace(cfg, fused_update=True), 6)
  np.testing.assert_allclose(fused_losses, unfused_losses, rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves(unfused.model), jax.tree.leaves(fused.model), strict=True
  ):
    assert a.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    differ = a != b
    assert differ.mean() <= 1e-3
    assert np.all(np.abs(a - b)[differ] <= 2**-7 * np.abs(a)[differ])


def test_energy_in_the_backward_loop_equals_the_gradients_energy():
  # One micro-batch: a scanned model measures each block's energy fraction
  # inside its backward loop. Two equal micro-batches: the gradient is the
  # same, and its energy is measured on the whole accumulated tree.
  cfg = config_lib.TrainConfig(optimizer="grasswalk", **dict(RUN, batch_size=2))
  tokens = np.random.default_rng(1).integers(0, VOCAB, (6, 1, 2, 33))
  in_loop = _run(cfg, 6, tokens)[2]
  accumulated = _run(
    dataclasses.replace(cfg, batch_size=4, grad_accum=2),
    6,
    tokens.repeat(2, axis=1),
  )[2]
  for a, b in zip(in_loop[1:], accumulated[1:], strict=True):
    assert a.keys() == b.keys() and len(a) == 7
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5)


def test_clip_per_layer_clips_each_block_and_the_rest():
  grads = {
    "layers": {"w": jnp.stack([jnp.full((3,), 10.0), jnp.full((3,), 0.1)])},
    "embed": {"e": jnp.full((4,), 3.0)},
  }
  clipped = step_lib.clip_per_layer(grads, max_norm=1.0)
  np.testing.assert_allclose(
    np.linalg.norm(clipped["layers"]["w"][0]), 1.0, rtol=1e-6
  )
  np.testing.assert_array_equal(
    clipped["layers"]["w"][1], grads["layers"]["w"][1]
  )
  np.testing.assert_allclose(
    np.linalg.norm(clipped["embed"]["e"]), 1.0, rtol=1e-6
  )


def test_stochastic_rounding_is_unbiased_where_nearest_drops_updates():
  weight = jnp.float32(1.0)
  update = jnp.float32(1e-4)  # far below bfloat16's spacing at 1 (2^-7)
  bits = jax.random.bits(jax.random.key(0), (20000,), jnp.uint32)
  rounded = step_lib.stochastic_round(jnp.full((20000,), weight + update), bits)
  assert set(np.unique(np.asarray(rounded, np.float32))) <= {1.0, 1.0078125}
  np.testing.assert_allclose(
    np.mean(np.asarray(rounded, np.float64)) - 1.0, 1e-4, rtol=0.1
  )
  # Nearest rounding (apply_updates without a key) drops the update.
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  nearest = step_lib.apply_updates(params, {"w": jnp.full((4,), update)}, None)
  np.testing.assert_array_equal(nearest["w"], params["w"])


def test_stacked_leaf_step_memory_stays_within_the_state_saving():
  # Peak(opt) - peak(adamw) <= state(opt) - state(adamw) + 2% of peak(adamw):
  # the optimizer holds no stack-sized temporaries beyond the gradient. With
  # 16 blocks, so that one block's work (allowed) is small next to a stack.
  settings = dict(RUN, clip="global", rank=32, batch_size=2, seq_len=32)
  model_config = dataclasses.replace(
    config_lib.model_config(config_lib.TrainConfig(**settings), VOCAB),
    n_layers=16,
  )
  adamw, *low_rank = (
    memory_lib.step_memory(
      config_lib.TrainConfig(optimizer=name, **settings), model_config
    )
    for name in config_lib.OPTIMIZERS
  )
  for memory in low_rank:
    assert memory["peak"] - adamw["peak"] <= (
      memory["optimizer_state"]
      - adamw["optimizer_state"]
      + 0.02 * adamw["peak"]
    )


def test_dry_run_prints_the_memory_of_the_step_and_exits(capsys):
  train_lib.main(
    ["--dry-run", "--scan-layers", "--fused-update", "--clip", "per-layer",
     "--param-dtype", "bfloat16", "--batch-size", "2", "--seq-len", "32"]
  )  # fmt: skip
  out = capsys.readouterr().out
  assert re.search(r"^  peak +\d+\.\d\d GiB$", out, re.MULTILINE), out
  for name in ("parameters", "optimizer state", "gradients", "temporaries"):
    assert name in out


def test_metrics_keep_a_nan_loss_and_drop_the_first_steps_nan_energy(tmp_path):
  from tqdm import tqdm

  log = metrics_lib.MetricsLog(tmp_path, 0, enabled=False)
  pending = [
    (1, {"loss": jnp.float32(jnp.nan), "energy_q_proj": jnp.float32(jnp.nan)}),
    (2, {"loss": jnp.float32(1.0), "energy_q_proj": jnp.float32(0.5)}),
  ]
  metrics_lib.record_losses(
    pending,
    log,
    metrics_lib.Throughput(1),
    tqdm(disable=True),
  )
  first, second = log.records
  assert np.isnan(first["loss"]) and "energy_q_proj" not in first
  assert second["energy_q_proj"] == 0.5
