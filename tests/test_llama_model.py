"""The LLaMA example's model: shapes, causality, parameter counts, layer
layouts."""

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
TOKENS = jnp.asarray(
  np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_shape_and_dtype_with_float32_parameters(dtype):
  model = model_lib.Llama(SMALL.replace(dtype=dtype), rngs=nnx.Rngs(0))
  logits = model(TOKENS)
  chex.assert_shape(logits, (2, 12, 50))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  # The same parameters (the init does not depend on the compute dtype) give
  # the float32 model's logits, up to bfloat16 rounding.
  reference = model_lib.Llama(SMALL, rngs=nnx.Rngs(0))(TOKENS)
  np.testing.assert_allclose(
    logits, reference, atol=2e-2 if dtype != jnp.float32 else 0
  )


def test_a_later_token_does_not_change_earlier_logits():
  model = model_lib.Llama(SMALL, rngs=nnx.Rngs(0))
  changed = TOKENS.at[:, 7].set((TOKENS[:, 7] + 1) % 50)
  before, after = model(TOKENS), model(changed)
  np.testing.assert_array_equal(before[:, :7], after[:, :7])
  assert not np.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("name", list(model_lib.CONFIGS))
def test_parameter_counts_match_the_formula(name):
  # V d (embedding) + L (4 d^2 + 3 d h + 2 d) (attention, MLP, two norms per
  # block) + d (final norm) + d V (LM head).
  config = model_lib.get_config(name)
  d, h, v = config.dim, config.hidden_dim, config.vocab_size
  formula = (
    v * d + config.n_layers * (4 * d * d + 3 * d * h + 2 * d) + d + d * v
  )
  assert model_lib.param_count(config) == formula


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


def test_config_validates_and_canonicalizes_its_fields():
  for changes, message in (
    (dict(n_heads=3), "heads"),  # 32 does not split into 3 heads
    (dict(n_heads=32), "even"),  # head_dim 1: no rotary pairs
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype=jnp.int32), "float"),
  ):
    with pytest.raises(ValueError, match=message):
      SMALL.replace(**changes)
  # Any spelling of a dtype is stored as one jnp.dtype, so equal configs hash
  # alike (the config is static data of the model's graph).
  configs = [SMALL.replace(dtype=d) for d in (jnp.bfloat16, "bfloat16")]
  assert configs[0].dtype == jnp.dtype("bfloat16")
  assert hash(configs[0]) == hash(configs[1])
  assert SMALL.head_dim == 16


def _stack_layers(state: nnx.State) -> dict:
  """An unscanned model's parameters (or gradients) in the scanned layout."""
  state = nnx.to_pure_dict(state)
  layers = [state["layers"][i] for i in range(len(state["layers"]))]
  state["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return state


@pytest.mark.parametrize("scan_layers", [True, False])
def test_scanned_and_rematerialized_layers_compute_the_same_function(
  scan_layers,
):
  plain = model_lib.Llama(SMALL, rngs=nnx.Rngs(0))
  other = model_lib.Llama(
    SMALL.replace(scan_layers=scan_layers, remat=True), rngs=nnx.Rngs(1)
  )
  layout = _stack_layers if scan_layers else nnx.to_pure_dict
  nnx.update(other, layout(nnx.state(plain, nnx.Param)))
  np.testing.assert_allclose(plain(TOKENS), other(TOKENS), rtol=1e-5, atol=1e-5)

  def loss(model):
    return model(TOKENS).mean()

  grad_plain = layout(nnx.grad(loss)(plain))
  grad_other = nnx.to_pure_dict(nnx.grad(loss)(other))
  chex.assert_trees_all_close(grad_plain, grad_other, rtol=1e-4, atol=1e-6)
  if scan_layers:
    q_kernel = nnx.state(other, nnx.Param)["layers"]["attention"]["q_proj"][
      "kernel"
    ]
    chex.assert_shape(q_kernel, (SMALL.n_layers, SMALL.dim, SMALL.dim))


def _by_path(tree) -> dict:
  """``{keystr(path): leaf}``, with ``optax.MaskedNode`` kept as a leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )[0]
  return {jax.tree_util.keystr(path): x for path, x in leaves}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_low_rank_mask_projects_attention_and_mlp_kernels_only(scan_layers):
  model = model_lib.Llama(
    SMALL.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0)
  )
  # nnx.Optimizer hands the mask the nnx.State of the parameters, whose paths
  # end in `.value`; a pure dict of them gets the same mask.
  params = nnx.state(model, nnx.Param)
  mask = jax.tree.leaves(model_lib.low_rank_mask(params))
  assert mask == jax.tree.leaves(
    model_lib.low_rank_mask(nnx.to_pure_dict(params))
  )
  n_projected = 7 * (1 if scan_layers else SMALL.n_layers)
  assert sum(mask) == n_projected

  tx = grassjax.grasswalk(
    1e-3, rank=8, key=jax.random.key(0), projection_mask=model_lib.low_rank_mask
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: m(TOKENS).mean())(model))

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  train_step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, before, after))

  state = grassjax.diagnostics.find_subspace_state(optimizer.opt_state)
  bases, moments = _by_path(state.basis), _by_path(state.mu)
  projected = {
    name for name, b in bases.items() if not isinstance(b, optax.MaskedNode)
  }
  assert len(projected) == n_projected
  for kernel in model_lib.LOW_RANK_KERNELS:
    assert any(f"'{kernel}'" in name for name in projected), kernel
  for name in ("embed", "norm", "lm_head"):
    assert not any(f"'{name}'" in p for p in projected), name
  # A projected (m, n) kernel, m <= n, keeps an (m, r) basis and (r, n)
  # moments; down_proj's (64, 32) kernel is projected as its transpose. The
  # leading (n_layers,) axis of scanned kernels is a batch of matrices.
  layers = (SMALL.n_layers,) if scan_layers else ()
  for kernel, mu_shape in (("q_proj", (8, 32)), ("gate_proj", (8, 64))):
    for name in (n for n in projected if f"'{kernel}'" in n):
      chex.assert_shape(bases[name], (*layers, 32, 8))
      chex.assert_shape(moments[name], (*layers, *mu_shape))
  for name in (n for n in projected if "'down_proj'" in n):
    chex.assert_shape(bases[name], (*layers, 32, 8))
    chex.assert_shape(moments[name], (*layers, 8, 64))
  # The rest gets full-size Adam moments.
  embedding = next(x for name, x in moments.items() if "'embed'" in name)
  chex.assert_shape(embedding, (SMALL.vocab_size, SMALL.dim))
