"""The LLaMA example's model: shapes, causality, parameter counts, layer layouts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grassjax
from examples.llama import model as model_lib

SMALL = model_lib.get_config("tiny").replace(
  vocab_size=50, dim=32, hidden_dim=64, n_heads=2, n_layers=2, max_seq_len=16
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_shape_and_dtype_with_float32_parameters(dtype):
  model = model_lib.Llama(SMALL.replace(dtype=dtype), rngs=nnx.Rngs(0))
  logits = model(TOKENS)
  chex.assert_shape(logits, (2, 12, 50))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)


def test_a_later_token_does_not_change_earlier_logits():
  model = model_lib.Llama(SMALL, rngs=nnx.Rngs(0))
  changed = TOKENS.at[:, 7].set((TOKENS[:, 7] + 1) % 50)
  before, after = model(TOKENS), model(changed)
  np.testing.assert_array_equal(before[:, :7], after[:, :7])
  assert not np.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("name", list(model_lib.CONFIGS))
def test_parameter_counts_match_the_formula(name):
  config = model_lib.get_config(name)
  model = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  assert model_lib.count_params(model) == model_lib.param_count(config)


def test_named_configs_have_the_papers_sizes():
  millions = {
    name: model_lib.param_count(model_lib.get_config(name)) / 1e6
    for name in ("60m", "130m", "350m", "1b", "7b")
  }
  assert millions["60m"] == pytest.approx(58.1, abs=0.1)
  assert millions["130m"] == pytest.approx(134.1, abs=0.1)
  assert millions["350m"] == pytest.approx(367.9, abs=0.1)
  assert millions["1b"] == pytest.approx(1339.1, abs=0.1)
  assert millions["7b"] == pytest.approx(6738.4, abs=0.1)
  with pytest.raises(ValueError, match="60m"):
    model_lib.get_config("3b")
  with pytest.raises(ValueError, match="heads"):
    SMALL.replace(n_heads=3)


def _stack_layers(state: nnx.State) -> dict:
  """An unscanned model's parameters (or gradients) in the scanned layout."""
  state = nnx.to_pure_dict(state)
  layers = [state["layers"][i] for i in range(len(state["layers"]))]
  state["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return state


def test_scanned_and_rematerialized_layers_compute_the_same_function():
  plain = model_lib.Llama(SMALL, rngs=nnx.Rngs(0))
  scanned = model_lib.Llama(
    SMALL.replace(scan_layers=True, remat=True), rngs=nnx.Rngs(1)
  )
  nnx.update(scanned, _stack_layers(nnx.state(plain, nnx.Param)))
  np.testing.assert_allclose(plain(TOKENS), scanned(TOKENS), rtol=1e-5, atol=1e-5)

  def loss(model):
    return model(TOKENS).mean()

  grad_plain = _stack_layers(nnx.grad(loss)(plain))
  grad_scanned = nnx.to_pure_dict(nnx.grad(loss)(scanned))
  chex.assert_trees_all_close(grad_plain, grad_scanned, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_low_rank_mask_projects_attention_and_mlp_kernels_only(scan_layers):
  model = model_lib.Llama(SMALL.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  tx = grassjax.grasswalk(
    1e-3, rank=8, key=jax.random.key(0), mask=model_lib.low_rank_mask
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  optimizer.update(model, nnx.grad(lambda m: m(TOKENS).mean())(model))
  state = grassjax.diagnostics.find_subspace_state(optimizer.opt_state)
  bases = jax.tree_util.tree_flatten_with_path(
    state.basis, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )[0]
  projected = {
    jax.tree_util.keystr(path)
    for path, b in bases
    if not isinstance(b, optax.MaskedNode)
  }
  assert len(projected) == 7 * (1 if scan_layers else SMALL.n_layers)
  for kernel in model_lib.LOW_RANK_KERNELS:
    assert any(kernel in name for name in projected)
  for name in ("embed", "norm", "lm_head"):
    assert not any(f"'{name}'" in p for p in projected), name
  layers = (SMALL.n_layers,) if scan_layers else ()
  q_basis = next(b for path, b in bases if "q_proj" in jax.tree_util.keystr(path))
  chex.assert_shape(q_basis, (*layers, 32, 8))
