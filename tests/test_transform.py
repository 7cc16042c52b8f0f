"""scale_by_subspace_adam and the four optimizers: shapes, state, errors,
composition."""

import functools
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import grassjax
from grassjax import subspace

KEY = jax.random.key(0)
RANK = 4


def _params(dtype=jnp.float32):
  """A wide matrix, a tall one, a square one, a stack of 3 matrices and a
  bias."""
  keys = jax.random.split(jax.random.key(1), 4)
  return {
    "wide": jax.random.normal(keys[0], (12, 20), dtype),
    "tall": jax.random.normal(keys[1], (20, 12), dtype),
    "square": jax.random.normal(keys[2], (10, 10), dtype),
    "stack": jax.random.normal(keys[3], (3, 8, 14), dtype),
    "bias": jnp.zeros((12,), dtype),
  }


def _grads(step: int, params):
  key = jax.random.fold_in(jax.random.key(2), step)
  return {
    name: jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype)
    for i, (name, p) in enumerate(params.items())
  }


# Every preset of the registry, at rank RANK (a key where it needs one).
OPTIMIZERS = {
  name: functools.partial(
    info.constructor, 1e-2, rank=RANK, key=KEY if info.needs_key else None
  )
  for name, info in grassjax.OPTIMIZERS.items()
}


@functools.cache
def _compiled(name: str):
  """One optimizer per alias (update interval 2) and its jitted, donating
  update.

  Shared by the tests below so each alias compiles once per parameter dtype.
  """
  tx = OPTIMIZERS[name](update_interval=2)
  return tx, jax.jit(tx.update, donate_argnums=1)


def _subspace_state(opt_state) -> grassjax.SubspaceAdamState:
  return opt_state[0]


def _run(tx, params, steps: int, jit: bool = True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  updates = None
  for step in range(steps):
    updates, state = update(_grads(step, params), state, params)
  return updates, state


@pytest.mark.parametrize("name", OPTIMIZERS)
class TestAliases:
  @pytest.mark.parametrize("variant", ["with_jit", "without_jit"])
  def test_shapes_and_dtypes(self, name, variant):
    params = _params()
    tx, compiled = _compiled(name)
    update = compiled if variant == "with_jit" else tx.update
    if variant == "without_jit":  # eager dispatch is slow: fewer leaves
      params = {k: params[k] for k in ("wide", "tall", "stack", "bias")}
    state = tx.init(params)
    for step in range(3):
      updates, state = update(_grads(step, params), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    inner = _subspace_state(state)
    assert int(inner.count) == 3
    r = RANK
    chex.assert_shape(inner.basis["wide"], (12, r))
    chex.assert_shape(inner.mu["wide"], (r, 20))
    chex.assert_shape(inner.basis["tall"], (12, r))  # m > n: projected columns
    chex.assert_shape(inner.mu["tall"], (r, 20))
    if "square" in params:
      chex.assert_shape(inner.basis["square"], (10, r))
    chex.assert_shape(inner.basis["stack"], (3, 8, r))
    chex.assert_shape(inner.nu["stack"], (3, r, 14))
    chex.assert_shape(inner.mu["bias"], (12,))
    assert isinstance(inner.basis["bias"], optax.MaskedNode)
    for basis in (
      inner.basis["wide"],
      inner.basis["tall"],
      *inner.basis["stack"],
    ):
      np.testing.assert_allclose(basis.T @ basis, np.eye(r), atol=1e-5)

  def test_bf16_params_and_moments(self, name):
    params = _params(jnp.bfloat16)
    tx = OPTIMIZERS[name](update_interval=2, mu_dtype=jnp.bfloat16)
    updates, state = _run(tx, params, 3)
    chex.assert_trees_all_equal_dtypes(updates, params)
    inner = _subspace_state(state)
    assert inner.mu["wide"].dtype == jnp.bfloat16
    assert inner.basis["wide"].dtype == jnp.float32
    # The float32 step on the same (bfloat16-valued) gradients: bfloat16
    # moments and updates cost ~0.4% of each update's norm.
    to_f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
    tx32, update32 = _compiled(name)
    state32 = tx32.init(to_f32(params))
    for step in range(3):
      expected, state32 = update32(
        to_f32(_grads(step, params)), state32, params
      )
    for leaf, want in expected.items():
      error = np.linalg.norm(np.asarray(updates[leaf], np.float32) - want)
      assert error <= 1e-2 * np.linalg.norm(want), leaf

  def test_degenerate_gradients_give_finite_updates(self, name):
    params = _params()
    tx, update = _compiled(name)
    state = tx.init(params)
    rank_one = lambda p: jnp.ones(p.shape) * jnp.arange(p.shape[-1])  # noqa: E731
    zero_columns = lambda p: jnp.zeros(p.shape).at[..., 0].set(1.0)  # noqa: E731
    # Steps 0, 2 and 4 make or move the bases: zero, rank-one and zero-column.
    for step, make in enumerate(
      (jnp.zeros_like, jnp.zeros_like, rank_one, zero_columns, jnp.zeros_like)
    ):
      updates, state = update(jax.tree.map(make, params), state, params)
      chex.assert_tree_all_finite((updates, state))
      if step < 2:  # zero moments: no direction, no recovery term
        chex.assert_trees_all_equal(
          updates, jax.tree.map(jnp.zeros_like, params)
        )

  def test_no_recompilation_and_update_branch_behind_cond(self, name):
    params = _params()
    tx, update = _compiled(name)
    state = tx.init(params)
    _, state = update(_grads(0, params), state, params)
    compiled_programs = update._cache_size()
    for step in range(1, 7):
      _, state = update(_grads(step, params), state, params)
    assert update._cache_size() == compiled_programs
    # Decompositions appear only inside the cond/switch branches.
    jaxpr = jax.make_jaxpr(tx.update)(
      _grads(0, params), tx.init(params), params
    )
    top_level = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert "cond" in top_level
    assert not top_level & {"svd", "qr", "householder_product", "geqrf"}

  def test_state_bytes_match_formula(self, name):
    params = _params()
    tx = OPTIMIZERS[name]()
    state = jax.eval_shape(tx.init, params)
    rs = name != "galore"
    r = RANK
    expected = 4 + 8  # count and key
    for m, n, batch in ((12, 20, 1), (12, 20, 1), (10, 10, 1), (8, 14, 3)):
      expected += 4 * batch * (m * r + 2 * r * n + (1 if rs else 0))
    expected += 4 * 2 * 12  # bias: plain Adam moments
    if name in ("subtrack_pp", "galore"):
      expected -= 8  # no key given
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert nbytes == expected

  def test_apply_if_finite_keeps_state(self, name):
    params = _params()
    tx = optax.apply_if_finite(
      OPTIMIZERS[name](update_interval=1), max_consecutive_errors=5
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(_grads(0, params), state, params)
    bad = _grads(1, params)
    bad["wide"] = bad["wide"].at[0, 0].set(jnp.nan)
    updates, new_state = update(bad, state, params)
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))

  def test_composes_with_clip_and_multisteps(self, name):
    params = _params()
    tx = optax.MultiSteps(
      optax.chain(
        optax.clip_by_global_norm(1.0), OPTIMIZERS[name](update_interval=2)
      ),
      every_k_schedule=2,
    )
    updates, _ = _run(tx, params, 4)
    # The inner optimizer's second step, on the means of the gradient pairs.
    inner = optax.chain(
      optax.clip_by_global_norm(1.0), OPTIMIZERS[name](update_interval=2)
    )
    state, update = inner.init(params), jax.jit(inner.update)
    for pair in ((0, 1), (2, 3)):
      grads = [_grads(step, params) for step in pair]
      mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
      expected, state = update(mean, state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-7)


# update_interval static with tangent_rank left to its default, and the least
# one can list (update_interval then traced).
@pytest.mark.parametrize(
  ("name", "static"),
  [
    ("grasswalk", ("rank", "update_interval", "key")),
    *((name, ("rank",)) for name in OPTIMIZERS),
  ],
)
def test_inject_hyperparams_needs_only_the_structural_arguments_given(
  name, static
):
  params = {k: v for k, v in _params().items() if k in ("wide", "bias")}
  factory = getattr(grassjax, name)
  extra = {"key": KEY} if grassjax.OPTIMIZERS[name].needs_key else {}
  injected = optax.inject_hyperparams(factory, static_args=static)(
    learning_rate=1e-2, rank=RANK, update_interval=2, **extra
  )
  plain = factory(1e-2, rank=RANK, update_interval=2, **extra)
  state, plain_state = injected.init(params), plain.init(params)
  update, plain_update = jax.jit(injected.update), jax.jit(plain.update)
  for step in range(3):  # the bases are made on step 0 and move on step 2
    grads = _grads(step, params)
    updates, state = update(grads, state, params)
    expected, plain_state = plain_update(grads, plain_state, params)
    # b1 and b2 become float32 arrays: Adam's bias corrections differ in the
    # last bits.
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = update(_grads(3, params), state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


def test_convergence_on_low_rank_regression():
  """Every optimizer drives down ||X W - Y||^2 with a nearly rank-3 target
  W*."""
  rng = np.random.default_rng(0)
  # Rank 3 plus a small full-rank part, so the residual outside the subspace
  # is not zero on the first step (recovery scaling has something to recover).
  w_true = rng.standard_normal((24, 3)) @ rng.standard_normal((3, 40))
  w_true += 0.3 * rng.standard_normal((24, 40))
  x = jnp.asarray(rng.standard_normal((128, 24)), jnp.float32)
  y = x @ jnp.asarray(w_true, jnp.float32)
  params = {"w": jnp.zeros((24, 40)), "b": jnp.zeros((40,))}

  def loss(p):
    return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

  initial = float(loss(params))
  for name, make in OPTIMIZERS.items():
    tx = make(
      update_interval=10, scale=1.0, projection_mask={"w": True, "b": False}
    )
    tx = optax.chain(tx, optax.scale(3.0))  # learning rate 3e-2

    @jax.jit
    def train(p, tx=tx):
      def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

      (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=300)
      return p

    final = float(loss(train(params)))
    assert final < 0.15 * initial, (name, initial, final)


def test_masked_out_leaves_get_exactly_adam():
  params = _params()
  mask = {k: k in ("wide", "stack") for k in params}
  # scale multiplies the projected leaves' updates only.
  tx = grassjax.scale_by_subspace_adam(
    subspace.random_jump(),
    rank=RANK,
    update_interval=2,
    key=KEY,
    projection_mask=mask,
    scale=0.25,
  )
  adam = optax.scale_by_adam()
  state, adam_state = tx.init(params), adam.init(params)
  # Both jitted: 1 - b2^t amplifies the rounding of an eager pow ~1000-fold.
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  for step in range(4):
    grads = _grads(step, params)
    updates, state = update(grads, state, params)
    expected, adam_state = adam_update(grads, adam_state, params)
    for name in ("tall", "square", "bias"):
      np.testing.assert_allclose(
        updates[name], expected[name], rtol=1e-6, atol=1e-7
      )


def test_galore_matches_optax_contrib_galore_on_square_matrices():
  """Plain GaLore (same SVD, unrotated moments, no recovery) equals optax's."""
  params = {
    "w": jax.random.normal(KEY, (16, 16)),
    "v": jax.random.normal(KEY, (12, 12)),
  }
  ours = grassjax.galore(1e-2, rank=5, update_interval=3, scale=0.25)
  theirs = optax.contrib.galore(1e-2, rank=5, update_proj_gap=3, scale=0.25)
  s1, s2 = ours.init(params), theirs.init(params)
  for step in range(7):
    grads = _grads(step, params)
    u1, s1 = jax.jit(ours.update)(grads, s1, params)
    u2, s2 = jax.jit(theirs.update)(grads, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_keys_are_deterministic_and_independent_across_leaves_and_stack():
  params = {
    "a": jnp.ones((8, 12)),
    "b": jnp.ones((8, 12)),
    "s": jnp.ones((2, 8, 12)),
  }

  def bases(key):
    tx = grassjax.grassjump(1e-2, rank=3, key=key, update_interval=2)
    return _subspace_state(_run(tx, params, 3)[1]).basis

  first, again, other = bases(KEY), bases(KEY), bases(jax.random.key(7))
  chex.assert_trees_all_equal(first, again)
  assert not np.allclose(first["a"], other["a"])
  assert not np.allclose(first["a"], first["b"])
  assert not np.allclose(first["s"][0], first["s"][1])


def test_stacked_leaf_equals_independent_matrices():
  stack = jax.random.normal(KEY, (3, 8, 14))
  tx = grassjax.galore(1e-2, rank=3, update_interval=2)
  stacked, _ = _run(tx, {"s": stack}, 3)
  for i in range(3):
    state = tx.init({"s": stack[i]})
    for step in range(3):
      g = {"s": _grads(step, {"s": stack})["s"][i]}
      update, state = tx.update(g, state, {"s": stack[i]})
    np.testing.assert_allclose(
      stacked["s"][i], update["s"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
  "name, mu_dtype",
  [*((name, None) for name in OPTIMIZERS), ("grassjump", "8bit")],
)
def test_layer_slice_update_equals_that_slice_of_the_stack_update(
  name, mu_dtype
):
  # The per-layer (fused) update: slice l of every stacked leaf and of the
  # per-parameter state (8-bit codes and scales too), the same count and
  # PRNG keys as the whole stack.
  # "n" is a stack of vectors, which take plain Adam (8-bit: its stochastic
  # codes too must round as the whole stack's).
  params = {
    "s": jax.random.normal(KEY, (3, 8, 14)),
    "t": jnp.ones((3, 14, 9)),
    "n": jax.random.normal(KEY, (3, 300)),
  }
  tx = OPTIMIZERS[name](update_interval=2, mu_dtype=mu_dtype)
  state = tx.init(params)
  whole_update = jax.jit(tx.update)
  layer_update = jax.jit(lambda g, s, i: tx.update(g, s, None, layer=(i, 3)))
  for step in range(4):
    grads = _grads(step, params)
    whole, new_state = whole_update(grads, state, params)
    for layer in range(3):
      pick = lambda x, layer=layer: (  # noqa: E731
        x[layer] if x.ndim and x.shape[0] == 3 else x
      )
      update, layer_state = layer_update(
        jax.tree.map(pick, grads), jax.tree.map(pick, state), jnp.int32(layer)
      )
      chex.assert_trees_all_close(
        update, jax.tree.map(pick, whole), rtol=1e-6, atol=1e-7
      )
      chex.assert_trees_all_close(
        layer_state, jax.tree.map(pick, new_state), rtol=1e-6, atol=1e-7
      )
    state = new_state


def test_basis_dtype_stores_the_bases_in_it():
  params = _params()
  tx = grassjax.grasswalk(1e-2, rank=RANK, key=KEY, basis_dtype=jnp.bfloat16)
  state = tx.init(params)
  for step in range(3):
    _, state = tx.update(_grads(step, params), state, params)
  basis = _subspace_state(state).basis["wide"]
  assert basis.dtype == jnp.bfloat16
  gram = basis.astype(jnp.float32).T @ basis.astype(jnp.float32)
  np.testing.assert_allclose(gram, np.eye(RANK), atol=2e-2)


def test_dimension_numbers_for_attention_kernels():
  """A (d, heads, head_dim) kernel projected as a d x (heads*head_dim)
  matrix."""
  kernel = jax.random.normal(KEY, (12, 4, 5))
  dims = grassjax.MatrixDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = grassjax.galore(1e-2, rank=3, update_interval=2, dimension_numbers=dims)
  tx2 = grassjax.galore(1e-2, rank=3, update_interval=2)
  state3, state2 = (
    tx3.init({"k": kernel}),
    tx2.init({"k": kernel.reshape(12, 20)}),
  )
  chex.assert_shape(_subspace_state(state3).basis["k"], (12, 3))
  for step in range(3):
    g = _grads(step, {"k": kernel})
    u3, state3 = tx3.update(g, state3)
    u2, state2 = tx2.update({"k": g["k"].reshape(12, 20)}, state2)
    np.testing.assert_allclose(
      u3["k"].reshape(12, 20), u2["k"], rtol=1e-5, atol=1e-6
    )
  # A stacked (layers, d, heads, head_dim) kernel: layers is a batch axis.
  stacked = grassjax.MatrixDimensionNumbers(
    reduction_axis=1, output_axis=(2, 3)
  )
  tx = grassjax.galore(1e-2, rank=3, dimension_numbers=stacked)
  chex.assert_shape(
    _subspace_state(tx.init({"k": jnp.ones((2, 12, 4, 5))})).basis["k"],
    (2, 12, 3),
  )


def test_stagger_spreads_updates_over_the_interval():
  params = {"a": jnp.ones((8, 12)), "b": jnp.ones((8, 12))}
  tx = grassjax.grassjump(
    1e-2, rank=3, key=KEY, update_interval=4, stagger=True
  )
  state = tx.init(params)
  history = []
  for step in range(6):
    _, state = tx.update(_grads(step, params), state)
    history.append(jax.tree.map(np.asarray, _subspace_state(state).basis))
  moved = lambda k: [  # noqa: E731
    i
    for i in range(1, 6)
    if not np.array_equal(history[i][k], history[i - 1][k])
  ]
  assert moved("a") == [4]
  assert moved("b") == [2]


def test_default_mask_and_full_rank_explicit_mask():
  params = {"small": jnp.ones((4, 10)), "big": jnp.ones((8, 10))}
  state = _subspace_state(grassjax.galore(1e-2, rank=4).init(params))
  assert isinstance(state.basis["small"], optax.MaskedNode)  # 4 is not > rank
  chex.assert_shape(state.basis["big"], (8, 4))
  full = grassjax.galore(
    1e-2, rank=4, projection_mask={"small": True, "big": True}
  )
  chex.assert_shape(_subspace_state(full.init(params)).basis["small"], (4, 4))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"rank": 0}, "rank must be an int >= 1"),
    (
      {"rank": 9, "projection_mask": {"w": True, "b": False}},
      r"\['w'\].*\(8, 12\)",
    ),
    ({"update_interval": 0}, "update_interval"),
    ({"zeta": 0.0}, "zeta"),
    ({"step_size": -1.0}, "step_size"),
    ({"projection_mask": {"w": True}}, "mask.*does not match"),
    ({"projection_mask": {"w": True, "b": True}}, r"\['b'\].*not a matrix"),
    ({"key": None}, "needs a PRNG key"),
  ],
)
def test_bad_configuration_raises(kwargs, match):
  params = {"w": jnp.ones((8, 12)), "b": jnp.ones((12,))}
  config = {"rank": 3, "key": KEY, **kwargs}
  with pytest.raises(ValueError, match=match):
    grassjax.grasswalk(1e-2, **config).init(params)


def test_flax_nnx_optimizer_trains_and_checkpoints():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(16, 32, rngs=rngs)
      self.down = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x)))

  model = Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model,
    grassjax.grasswalk(1e-2, rank=3, key=KEY, update_interval=5),
    wrt=nnx.Param,
  )
  x = jax.random.normal(KEY, (32, 16))
  y = jnp.sin(x[:, :4])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  state = nnx.state(optimizer)
  with tempfile.TemporaryDirectory() as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(f"{tmp}/opt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(f"{tmp}/opt", state)
  chex.assert_trees_all_equal(jax.tree.leaves(restored), jax.tree.leaves(state))


def _identity_rule() -> subspace.SubspaceRule:
  return subspace.SubspaceRule(
    lambda grad, rank, key: jnp.eye(grad.shape[0], rank, dtype=grad.dtype),
    lambda basis, grad, key: basis,
  )


def test_recovery_norm_of_a_gradient_inside_the_subspace_is_that_applied():
  # ||G||^2 - ||S^T G||^2 cancels to rounding noise here (the residual is
  # ~3e-10 of ||G||^2); the stored norm must be that of the Lambda applied.
  rng = np.random.default_rng(0)
  g = rng.standard_normal((16, 40))
  g[RANK:] *= 1e-5
  g = g.astype(np.float32)
  b1, b2, eps = 0.9, 0.999, 1e-8
  tx = grassjax.scale_by_subspace_adam(
    _identity_rule(), rank=RANK, projection_mask={"wide": True, "tall": True}
  )
  grads = {"wide": jnp.asarray(g), "tall": jnp.asarray(g.T)}
  state = tx.init(grads)
  _, state = jax.jit(tx.update)(grads, state)
  low = g[:RANK].astype(np.float64)
  mu, nu = (1 - b1) * low, (1 - b2) * low**2
  direction = (mu / (1 - b1)) / (np.sqrt(nu / (1 - b2)) + eps)
  phi = np.linalg.norm(direction, axis=0) / (np.linalg.norm(low, axis=0) + 1e-8)
  expected = np.linalg.norm(phi * g[RANK:].astype(np.float64))
  for name in grads:
    np.testing.assert_allclose(state.recovery_norm[name], expected, rtol=1e-4)

  # The same with an SVD basis of a rank-RANK gradient: the residual is the
  # rounding of the SVD, and the stored norm is that of the float32 residual.
  g = (
    rng.standard_normal((16, RANK)) @ rng.standard_normal((RANK, 40))
  ).astype(np.float32)
  tx = grassjax.scale_by_subspace_adam(
    subspace.svd(), rank=RANK, projection_mask={"w": True}
  )
  state = tx.init({"w": g})
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state)
  basis = np.asarray(state.basis["w"])
  low = basis.T.astype(np.float64) @ g
  phi = 1 / (np.linalg.norm(low, axis=0) + 1e-8) * np.sqrt(RANK)
  residual = g - basis @ (basis.T @ g)
  expected = np.linalg.norm(phi * residual)
  np.testing.assert_allclose(state.recovery_norm["w"], expected, rtol=0.2)


def test_unprojected_bfloat16_leaves_are_float32_adam_rounded():
  params = _params(jnp.bfloat16)
  mask = {k: k in ("wide", "stack") for k in params}
  tx = grassjax.scale_by_subspace_adam(
    subspace.random_jump(),
    rank=RANK,
    update_interval=2,
    key=KEY,
    projection_mask=mask,
  )
  adam = optax.scale_by_adam()
  to_f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
  state, adam_state = tx.init(params), adam.init(to_f32(params))
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  tight = dict(rtol=1e-6, atol=1e-8)
  for step in range(4):
    grads = _grads(step, params)
    updates, state = update(grads, state)
    expected, adam_state = adam_update(to_f32(grads), adam_state)
    for name in ("tall", "square", "bias"):
      # Equal to float32 rounding (jit may fuse the two programs apart), so
      # the updates to one bfloat16 rounding step.
      assert updates[name].dtype == jnp.bfloat16
      np.testing.assert_allclose(updates[name], expected[name], rtol=2**-8)
      np.testing.assert_allclose(state.mu[name], adam_state.mu[name], **tight)
      np.testing.assert_allclose(state.nu[name], adam_state.nu[name], **tight)
  halved = grassjax.scale_by_subspace_adam(
    subspace.svd(), rank=RANK, projection_mask=mask, mu_dtype=jnp.bfloat16
  ).init(to_f32(params))
  assert halved.mu["bias"].dtype == halved.nu["bias"].dtype == jnp.bfloat16


def test_complex_parameters_are_left_to_adam_with_the_squared_modulus():
  keys = jax.random.split(KEY, 3)
  params = {"w": jax.random.normal(keys[0], (8, 12))}
  params["c"] = jax.lax.complex(*jax.random.normal(keys[1], (2, 8, 12)))
  tx = grassjax.scale_by_subspace_adam(subspace.svd(), rank=3, scale=0.25)
  adam = optax.scale_by_adam()
  state, adam_state = tx.init(params), adam.init(params)
  assert isinstance(state.basis["c"], optax.MaskedNode)  # the default mask
  assert (
    state.mu["c"].dtype == jnp.complex64 and state.nu["c"].dtype == jnp.float32
  )
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  for step in range(3):
    grads = _grads(step, params)
    grads["c"] = grads["c"] + 1j * _grads(step + 10, params)["c"]
    updates, state = update(grads, state)
    expected, adam_state = adam_update(grads, adam_state)
    np.testing.assert_allclose(
      updates["c"], expected["c"], rtol=1e-6, atol=1e-7
    )


def test_integer_and_projected_complex_parameters_are_refused():
  tx = grassjax.galore(1e-2, rank=3)
  with pytest.raises(
    ValueError, match=r"\['i'\] with shape \(8, 12\) has dtype int32"
  ):
    tx.init({"i": jnp.ones((8, 12), jnp.int32)})
  with pytest.raises(
    ValueError, match=r"\['w'\] with shape \(8, 12\) has dtype int32"
  ):
    tx.update(
      {"w": jnp.ones((8, 12), jnp.int32)}, tx.init({"w": jnp.ones((8, 12))})
    )
  masked_in = grassjax.galore(1e-2, rank=3, projection_mask={"c": True})
  with pytest.raises(
    ValueError, match=r"\['c'\] with shape \(8, 12\) and dtype complex64"
  ):
    masked_in.init({"c": jnp.ones((8, 12), jnp.complex64)})


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_keys_of_any_prng_implementation(impl):
  params = {"a": jnp.ones((8, 12)), "s": jnp.ones((2, 8, 12))}
  key = jax.random.key(0, impl=impl)
  tx = grassjax.grassjump(1e-2, rank=3, key=key, update_interval=2)
  _, state = _run(tx, params, 3)
  basis = _subspace_state(state).basis
  # The third step (count 2) moved the basis with its leaf's first key.
  step_key = jax.random.fold_in(jax.random.fold_in(key, 0), 2)
  expected = subspace.random_jump().update(
    basis["a"], None, jax.random.split(step_key, 1)[0]
  )
  np.testing.assert_allclose(basis["a"], expected, atol=1e-6)
  assert not np.allclose(basis["s"][0], basis["s"][1])


def test_raw_and_typed_threefry_keys_give_the_same_stream():
  params = {"a": jnp.ones((8, 12))}

  def basis(key):
    tx = grassjax.grasswalk(1e-2, rank=3, key=key, update_interval=1)
    return _subspace_state(_run(tx, params, 3)[1]).basis["a"]

  np.testing.assert_array_equal(basis(KEY), basis(jax.random.PRNGKey(0)))


@pytest.mark.parametrize(
  ("make", "error", "match"),
  [
    (
      lambda: grassjax.grasswalk(1e-2, rank=3, key=42),
      TypeError,
      "key.*got 42",
    ),
    (
      lambda: grassjax.grasswalk(1e-2, rank=3, key=jax.random.split(KEY)),
      TypeError,
      "key must be one PRNG key",
    ),
    (
      lambda: grassjax.scale_by_subspace_adam("svd", rank=3),
      TypeError,
      "subspace must be a grassjax.SubspaceRule",
    ),
    (
      lambda: grassjax.grasswalk(1e-2, rank=3, key=KEY, step_size=float("nan")),
      ValueError,
      "step_size must be finite",
    ),
    (
      lambda: subspace.tracking(float("inf")),
      ValueError,
      "step_size must be finite",
    ),
    (
      lambda: grassjax.galore(1e-2, rank=2.0),
      ValueError,
      "rank must be an int",
    ),
    (
      lambda: grassjax.galore(1e-2, rank=jnp.asarray(3)),
      ValueError,
      "rank must be an int.*name it in static_args",
    ),
    (  # what inject_hyperparams makes of an unlisted jnp.bfloat16
      lambda: grassjax.galore(1e-2, rank=3, mu_dtype=jnp.bfloat16(0)),
      TypeError,
      "mu_dtype must be a dtype.*name it in static_args",
    ),
    (
      lambda: grassjax.subtrack_pp(1e-2, rank=3, tangent_rank=0),
      ValueError,
      "tangent_rank must be an int",
    ),
  ],
)
def test_bad_arguments_are_refused_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_numpy_integers_are_accepted_for_int_arguments():
  tx = grassjax.galore(1e-2, rank=np.int64(3), update_interval=np.int32(2))
  chex.assert_shape(tx.init({"w": jnp.ones((8, 12))})[0].basis["w"], (8, 3))


def test_count_saturates_and_the_bases_then_stay():
  """As documented in SubspaceAdamState: the count stops at 2^31 - 1 (prime)."""
  params = {"a": jnp.ones((8, 12))}
  tx = grassjax.grassjump(1e-2, rank=3, key=KEY, update_interval=4)
  update = jax.jit(tx.update)
  _, state = update(_grads(0, params), tx.init(params))
  inner = _subspace_state(state)
  state = (inner._replace(count=jnp.int32(2**31 - 4)), *state[1:])
  bases = []
  for step in range(1, 6):
    _, state = update(_grads(step, params), state)
    bases.append(_subspace_state(state).basis["a"])
  assert int(_subspace_state(state).count) == 2**31 - 1
  # 2^31 - 4 is a multiple of 4: that step moves the basis, no later one.
  assert not np.allclose(bases[0], inner.basis["a"])
  for basis in bases[1:]:
    np.testing.assert_array_equal(basis, bases[0])


def test_rotate_moments_keeps_a_negative_variance_estimate_from_v():
  """V / c2 - (M / c1)^2 < 0 (b1 != b2 weigh the past apart); V' stays >= 0.

  Two coordinates with mean 1 and V / c2 = 0.5, rotated by 45 degrees: the
  rotated means are 0 and sqrt(2), the rotated variances both -0.5, so
  ``V' / c2 = |[-0.5, 1.5]|``.
  """
  b1, b2, steps = 0.9, 0.999, 10
  c1, c2 = 1 - b1**steps, 1 - b2**steps
  mu = jnp.full((2, 1), c1, jnp.float32)
  nu = jnp.full((2, 1), 0.5 * c2, jnp.float32)
  rotation = jnp.asarray([[1.0, -1.0], [1.0, 1.0]]) / np.sqrt(2.0)
  new_mu, new_nu = grassjax.rotate_moments(
    rotation, mu, nu, b1, b2, jnp.int32(steps)
  )
  np.testing.assert_allclose(new_mu[:, 0], [0.0, np.sqrt(2.0) * c1], atol=1e-6)
  np.testing.assert_allclose(new_nu[:, 0], [0.5 * c2, 1.5 * c2], rtol=1e-4)


@pytest.mark.parametrize("rule", ["random_walk", "tracking"])
def test_bfloat16_bases_do_not_move_on_rounding(rule):
  """A bfloat16 basis is ~4e-3 from orthonormal; that error is no tangent.

  At rank = m (a random walk has no tangent space) and for a gradient inside
  the basis's span (tracking has nothing to lower), a normalized step must
  leave the basis where it is, up to bfloat16 rounding.
  """
  m, n = 8, 16
  if rule == "random_walk":
    make, rank = subspace.random_walk(0.5), m
  else:
    make, rank = subspace.tracking(0.5, normalize=True), 3
  tx = grassjax.scale_by_subspace_adam(
    make,
    rank=rank,
    update_interval=1,
    key=KEY,
    basis_dtype=jnp.bfloat16,
    projection_mask={"w": True},
  )
  state = tx.init({"w": jnp.zeros((m, n))})
  _, state = tx.update({"w": jax.random.normal(KEY, (m, n))}, state)
  before = state.basis["w"].astype(jnp.float32)
  inside = subspace.orthonormalize(before) @ jax.random.normal(KEY, (rank, n))
  _, state = tx.update({"w": inside}, state)
  overlap = np.asarray(state.basis["w"].astype(jnp.float32).T @ before)
  # bfloat16 rounding of an orthonormal basis: entries off by <= 2^-8.
  np.testing.assert_allclose(overlap, np.eye(rank), atol=2e-2)


def test_bfloat16_projections_round_operands_only():
  """projection_dtype=bfloat16: both products take bfloat16 operands and
  accumulate in float32, so the update is within bfloat16 rounding of the
  float32 one, and not equal to it."""
  params = _params()
  grads = _grads(0, params)

  def first_update(projection_dtype):
    tx = grassjax.grasswalk(
      1.0, rank=RANK, key=KEY, projection_dtype=projection_dtype
    )
    return tx.update(grads, tx.init(params))[0]

  exact, rounded = first_update(None), first_update(jnp.bfloat16)
  for name in ("wide", "tall", "square", "stack"):
    scale = float(jnp.max(jnp.abs(exact[name])))
    np.testing.assert_allclose(rounded[name], exact[name], atol=3e-2 * scale)
    assert not np.allclose(rounded[name], exact[name], atol=1e-4 * scale)
    assert rounded[name].dtype == jnp.float32
  np.testing.assert_array_equal(rounded["bias"], exact["bias"])


def test_registry_describes_each_preset():
  assert tuple(grassjax.OPTIMIZERS) == (
    "galore",
    "grasswalk",
    "grassjump",
    "subtrack_pp",
  )
  for name, info in grassjax.OPTIMIZERS.items():
    assert info.constructor is getattr(grassjax, name)
    assert info.needs_key == (name in ("grasswalk", "grassjump"))
    key = KEY if info.needs_key else None
    tx = info.constructor(1e-2, rank=RANK, key=key)
    state = _subspace_state(tx.init(_params()))
    assert (state.key is not None) == info.needs_key
    if info.needs_key:
      with pytest.raises(TypeError, match="key"):
        info.constructor(1e-2, rank=RANK)
  defaults = {name: info.defaults for name, info in grassjax.OPTIMIZERS.items()}
  assert defaults["galore"]["update_interval"] == 200
  assert not defaults["galore"]["adaptive_optimizer"]
  assert defaults["grasswalk"]["recovery_scaling"]
  assert "step_size" in defaults["subtrack_pp"]
  assert "step_size" not in defaults["grassjump"]


def test_presets_are_low_rank_adamw_with_their_rule():
  """A preset and low_rank_adamw given the same rule and options agree."""
  params = _params()
  options = dict(rank=RANK, update_interval=2, weight_decay=0.1, scale=0.5)
  preset = grassjax.subtrack_pp(1e-2, step_size=0.3, **options)
  general = grassjax.low_rank_adamw(1e-2, subspace.tracking(0.3), **options)
  state_a, state_b = preset.init(params), general.init(params)
  for step in range(3):
    grads = _grads(step, params)
    a, state_a = preset.update(grads, state_a, params)
    b, state_b = general.update(grads, state_b, params)
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
  "module",
  [
    "alias",
    "layout",
    "moments",
    "recovery",
    "subspace",
    "transform",
    "diagnostics",
  ],
)
def test_docstring_examples_run(module):
  import doctest
  import importlib

  result = doctest.testmod(importlib.import_module(f"grassjax.{module}"))
  assert result.failed == 0


def test_a_callable_mask_left_to_inject_hyperparams_is_named():
  """inject_hyperparams calls a non-static callable with the step count."""
  mask = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)  # noqa: E731
  tx = optax.inject_hyperparams(grassjax.galore, static_args=("rank",))(
    learning_rate=1e-2, rank=RANK, projection_mask=mask
  )
  with pytest.raises(ValueError, match=r"projection_mask.*static_args"):
    tx.init(_params())
  static = optax.inject_hyperparams(
    grassjax.galore, static_args=("rank", "projection_mask")
  )(learning_rate=1e-2, rank=RANK, projection_mask=mask)
  state = static.init(_params())
  assert not isinstance(state.inner_state[0].basis["wide"], optax.MaskedNode)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_extra_keyword_arguments_are_accepted_and_ignored(name):
  """optax.chain passes its extra arguments (a line search's value=, ...) to
  every member."""
  tx = OPTIMIZERS[name](update_interval=2)
  params = _params()
  state = tx.init(params)
  grads = _grads(0, params)
  expected, expected_state = tx.update(grads, state, params)
  updates, new_state = tx.update(
    grads, state, params, value=jnp.asarray(1.0), value_fn=lambda p: 0.0
  )
  chex.assert_trees_all_equal(updates, expected)
  chex.assert_trees_all_equal(new_state, expected_state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tree_without_leaves_and_map_params(name):
  """init and update of {}; optax.tree.map_params inits on a placeholder
  with no leaves."""
  tx = OPTIMIZERS[name]()
  updates, state = tx.update({}, tx.init({}), {})
  assert updates == {}
  params = _params()
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda p: p + 1, state)
  subspace_state = mapped[0]
  chex.assert_trees_all_equal(
    subspace_state.mu, jax.tree.map(lambda m: m + 1, state[0].mu)
  )
  chex.assert_trees_all_equal(subspace_state.count, state[0].count)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_structure_does_not_depend_on_weight_decay_being_traced(name):
  """inject_hyperparams makes weight_decay an array; the state must keep the
  structure of the optimizer it wraps."""
  factory = getattr(grassjax, name)
  extra = {"key": KEY} if grassjax.OPTIMIZERS[name].needs_key else {}
  injected = optax.inject_hyperparams(factory, static_args=("rank", "key"))(
    learning_rate=1e-2, rank=RANK, **extra
  )
  plain = factory(1e-2, rank=RANK, **extra)
  params = _params()
  assert jax.tree.structure(
    injected.init(params).inner_state
  ) == jax.tree.structure(plain.init(params))


@pytest.mark.parametrize("name", [*OPTIMIZERS, "low_rank_adamw"])
def test_learning_rate_is_annotated_as_a_schedule(name):
  """optax's suite checks schedules only on optimizers annotated so."""
  import inspect

  annotation = (
    inspect.signature(getattr(grassjax, name))
    .parameters["learning_rate"]
    .annotation
  )
  assert annotation is optax.ScalarOrSchedule
