"""Block-wise 8-bit moments: the codes, their errors, the optimizers on them,
and their state in orbax, flax and a sharded layout."""

import functools
import tempfile

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import grassjax
from grassjax import quantization

BLOCK = quantization.Blockwise8Bit(block_size=8)
# Half a mantissa step of float8_e4m3fn, relative: the bound of a normal
# code's rounding.
HALF_STEP = 2.0**-4


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
  n=st.integers(1, 40),
  exponent=st.integers(-12, 6),
  seed=st.integers(0, 2**16),
)
def test_first_moment_error_is_relative_within_the_code_range(
  n, exponent, seed
):
  """Each entry within 2^-15 of its block's largest magnitude comes back
  within half a mantissa step; smaller ones within the smallest code's."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, n)) * np.exp(rng.uniform(-8, 0, (3, n)))
  x = jnp.asarray(x * 10.0**exponent, jnp.float32)
  q = BLOCK.quantize(x)
  chex.assert_shape(q.codes, x.shape)
  chex.assert_shape(q.scales, (3, -(-n // BLOCK.block_size)))
  assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.float32
  back = BLOCK.dequantize(q)
  scale = jnp.repeat(q.scales, BLOCK.block_size, axis=-1)[:, :n]
  error = jnp.abs(back - x)
  # Normal codes: relative; subnormal ones: absolute, 2^-10 of the code
  # unit (scale / 448).
  bound = jnp.maximum(HALF_STEP * jnp.abs(x), 2.0**-10 * scale / 448)
  assert jnp.all(error <= bound * (1 + 1e-6)), float(jnp.max(error / bound))
  # The block's largest entry comes back to rounding, and signs are kept.
  np.testing.assert_allclose(
    jnp.max(jnp.abs(back), -1), jnp.max(q.scales, -1), rtol=1e-6
  )
  assert jnp.all(jnp.sign(back) * jnp.sign(x) >= 0)


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
  n=st.integers(1, 40),
  seed=st.integers(0, 2**16),
  decades=st.integers(1, 30),
)
def test_second_moment_is_never_negative_nor_rounded_to_zero(n, seed, decades):
  rng = np.random.default_rng(seed)
  v = 10.0 ** rng.uniform(-decades, 0, (2, n))
  v[rng.random((2, n)) < 0.2] = 0.0
  v = jnp.asarray(v, jnp.float32)
  q = BLOCK.quantize(v, second_moment=True)
  back = BLOCK.dequantize(q, second_moment=True)
  assert q.codes.dtype == jnp.uint8
  assert jnp.all(back >= 0)
  np.testing.assert_array_equal(back == 0, v == 0)
  # Within half a 4-bit mantissa step, or rounded up to the smallest code.
  scale = jnp.repeat(q.scales, BLOCK.block_size, axis=-1)[:, :n]
  smallest = 1.125 * 2.0**-16 * scale
  relative = jnp.abs(back - v) <= 2.0**-5 * v * (1 + 1e-6)
  rounded_up = (back > v) & (back <= smallest * (1 + 1e-6))
  assert jnp.all(relative | rounded_up | (v == 0))
  # The row's largest entry (a block's scale) comes back exactly.
  np.testing.assert_array_equal(jnp.max(back, -1), jnp.max(v, -1))


def test_stochastic_codes_of_the_second_moment_are_unbiased():
  """Each draw is one of the two codes around an entry; their mean is the
  entry, where rounding to nearest keeps a bias of up to half a step. A
  seed repeats its codes, and a slice rounds as the whole given its
  offset."""
  rng = np.random.default_rng(0)
  v = jnp.asarray(np.exp(rng.uniform(-6, 0, (4, 64))), jnp.float32)

  def draw(seed, x=v, offset=0):
    rounding = quantization.StochasticRounding.seeded(seed)._replace(
      offset=offset
    )
    q = BLOCK.quantize(x, second_moment=True, rounding=rounding)
    return q, BLOCK.dequantize(q, second_moment=True)

  draws = jax.vmap(lambda s: draw(s)[1])(jnp.arange(2000))
  # A code's step is 2^-4 of the entry at most (16 codes a binade).
  assert jnp.all(jnp.abs(draws - v) <= 2.0**-4 * v * (1 + 1e-6))
  bias = jnp.abs(draws.mean(0) - v) / v
  nearest = BLOCK.dequantize(
    BLOCK.quantize(v, second_moment=True), second_moment=True
  )
  assert float(bias.max()) < 4e-3 < float(jnp.max(jnp.abs(nearest - v) / v))
  chex.assert_trees_all_equal(draw(7)[0], draw(7)[0])
  assert not np.array_equal(draw(7)[0].codes, draw(8)[0].codes)
  whole, _ = draw(3)
  rows, _ = draw(3, v[2:], offset=2 * v.shape[1])
  chex.assert_trees_all_equal(rows.codes, whole.codes[2:])


def test_8bit_second_moment_follows_a_decaying_gradient_over_a_long_run():
  """b2 = 0.999 moves V by 0.1% a step, far below a code's step: rounded to
  nearest, the entries whose gradient decays while their block's largest
  stays stick (the scale follows the largest alone); with the optimizers'
  stochastic codes they follow float32's."""
  rng = np.random.default_rng(1)
  pattern = jnp.asarray(
    rng.standard_normal((4, 512)) * np.exp(rng.uniform(-3, 0, (4, 512))),
    jnp.float32,
  )
  decays = jnp.asarray(rng.uniform(size=(4, 512)) < 0.5)
  params = {"w": jnp.zeros((4, 512))}
  store = quantization.storage("nu_dtype", "8bit")

  def gradient(t):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(2), t))
    return pattern * jnp.where(decays, 0.997**t, 1.0) * (1 + 0.3 * noise)

  def final_nu(mu_dtype):
    tx = grassjax.adamw(1e-3, mu_dtype=mu_dtype)

    def step(state, t):
      return tx.update({"w": gradient(t)}, state, params)[1], None

    state, _ = jax.lax.scan(step, tx.init(params), jnp.arange(1500))
    return quantization.moment_values(
      state[0].nu, store if mu_dtype else None, second_moment=True
    )["w"]

  def nearest_nu():
    def step(nu, t):
      v = store.dequantize(nu, second_moment=True)
      v = 0.999 * v + 0.001 * jnp.square(gradient(t))
      return store.quantize(v, second_moment=True), None

    nu, _ = jax.lax.scan(step, store.zeros(pattern.shape), jnp.arange(1500))
    return store.dequantize(nu, second_moment=True)

  exact = jax.jit(final_nu, static_argnums=0)(None)

  def error(nu):
    return float(
      jnp.linalg.norm(jnp.sqrt(nu) - jnp.sqrt(exact))
      / jnp.linalg.norm(jnp.sqrt(exact))
    )

  stochastic = error(jax.jit(final_nu, static_argnums=0)("8bit"))
  nearest = error(jax.jit(nearest_nu)())
  assert stochastic < 0.05 and nearest > 5 * stochastic, (stochastic, nearest)


def test_zero_blocks_saturation_and_non_finite_values():
  x = jnp.array([[0.0] * 8 + [3.0, -448.0, 1e30] + [0.0] * 5])
  back = BLOCK.dequantize(BLOCK.quantize(x))
  np.testing.assert_array_equal(back[0, :8], 0.0)  # an all-zero block
  np.testing.assert_allclose(back[0, 10], 1e30, rtol=HALF_STEP)
  assert jnp.isnan(BLOCK.dequantize(BLOCK.quantize(x.at[0, 3].set(jnp.nan))))[
    0, :8
  ].all()  # a NaN spoils its block and stays visible


def test_storage_choices_and_refusals():
  assert (
    quantization.storage("mu_dtype", "8bit") == quantization.Blockwise8Bit()
  )
  assert quantization.storage("mu_dtype", jnp.bfloat16) == jnp.bfloat16
  with pytest.raises(
    ValueError, match=r"mu_dtype must be a floating dtype.*8bit"
  ):
    quantization.storage("mu_dtype", jnp.int8)
  with pytest.raises(ValueError, match=r"nu_dtype.*float8_e4m3fn"):
    quantization.storage("nu_dtype", jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="block_size must be an int >= 1"):
    quantization.Blockwise8Bit(block_size=0)
  with pytest.raises(ValueError, match="mu_dtype must be a floating dtype"):
    grassjax.galore(1e-2, rank=2, mu_dtype="int8")


def _params():
  keys = jax.random.split(jax.random.key(3), 3)
  return {
    "stack": jax.random.normal(keys[0], (2, 12, 300)),
    "wide": jax.random.normal(keys[1], (16, 40)),
    "bias": jax.random.normal(keys[2], (40,)),
    "gain": jnp.ones(()),
    "phase": jnp.ones((5,), jnp.complex64),
  }


def _grads(step, params):
  key = jax.random.fold_in(jax.random.key(4), step)
  return jax.tree.map(
    lambda p: jax.random.normal(
      jax.random.fold_in(key, p.size), p.shape
    ).astype(p.dtype),
    params,
  )


def _preset(name, **kwargs):
  info = grassjax.OPTIMIZERS[name]
  key = jax.random.key(0) if info.needs_key else None
  mask = {
    "stack": True,
    "wide": True,
    "bias": False,
    "gain": False,
    "phase": False,
  }
  return info.constructor(
    1e-2, rank=4, key=key, update_interval=3, projection_mask=mask, **kwargs
  )


@functools.cache
def _run(name: str, mu_dtype, steps: int = 12):
  """Updates and state of ``steps`` jitted steps (each preset compiles once
  per storage)."""
  tx = _preset(name, mu_dtype=mu_dtype)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates = []
  for i in range(steps):
    u, state = step(_grads(i, params), state, params)
    updates.append(u)
  return updates, state


@pytest.mark.parametrize("name", list(grassjax.OPTIMIZERS))
def test_every_preset_runs_on_8bit_moments_close_to_float32(name):
  updates, state = _run(name, "8bit")
  reference, reference_state = _run(name, None)
  inner = state[0]
  for moment in (inner.mu, inner.nu):
    assert isinstance(moment, quantization.QuantizedArray)
    chex.assert_shape(moment.codes["stack"], (2, 4, 300))
    chex.assert_shape(moment.scales["stack"], (2, 4, 2))
    chex.assert_shape(moment.codes["bias"], (40,))
    assert moment.codes["stack"].dtype == jnp.uint8
    # Scalars are not quantized.
    assert isinstance(moment.scales["gain"], optax.MaskedNode)
  # Nor is a complex mean; the second moment |g|^2 of a complex parameter
  # is real, and is.
  assert isinstance(inner.mu.scales["phase"], optax.MaskedNode)
  assert inner.mu.codes["phase"].dtype == jnp.complex64
  assert inner.nu.codes["phase"].dtype == jnp.uint8
  # The same gradients give the same bases, so the moments' values compare
  # entry by entry, parameter by parameter.
  store = quantization.storage("mu_dtype", "8bit")
  for moment, second in (("mu", False), ("nu", True)):
    got = quantization.moment_values(
      getattr(inner, moment), store, second_moment=second
    )
    want = getattr(reference_state[0], moment)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert jnp.linalg.norm(g - w) <= 0.1 * jnp.linalg.norm(w), moment
  # Rounding errors compound over the steps and the basis moves (with AO,
  # rotating the dequantized moments) twice more than the first: the
  # updates stay within a few percent of float32's.
  for got, want in zip(updates[-3:], reference[-3:], strict=True):
    for leaf in ("stack", "wide", "bias"):
      error = jnp.linalg.norm(got[leaf] - want[leaf])
      assert error <= 0.15 * jnp.linalg.norm(want[leaf]), (name, leaf)
    np.testing.assert_allclose(got["gain"], want["gain"], rtol=1e-5)
    chex.assert_tree_all_finite(got)


def test_adamw_8bit_is_adamw_to_the_codes_precision_and_float32_exactly():
  params = _params()
  del params["phase"]
  exact, ours = optax.adamw(1e-2), grassjax.adamw(1e-2)
  eight = grassjax.adamw(1e-2, mu_dtype="8bit")
  states = [tx.init(params) for tx in (exact, ours, eight)]
  # Jitted: 1 - b2^t amplifies the rounding of an eager pow.
  updates = [jax.jit(tx.update) for tx in (exact, ours, eight)]
  for i in range(5):
    grads = _grads(i, params)
    out = [
      update(grads, s, params)
      for update, s in zip(updates, states, strict=True)
    ]
    states = [s for _, s in out]
    chex.assert_trees_all_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-9)
    for got, want in zip(
      jax.tree.leaves(out[2][0]), jax.tree.leaves(out[0][0]), strict=True
    ):
      assert jnp.linalg.norm(got - want) <= 0.1 * jnp.linalg.norm(want)


def test_8bit_state_is_a_quarter_of_float32():
  params = {"w": jnp.zeros((64, 4096)), "v": jnp.zeros((4096,))}
  sizes = {
    dtype: sum(
      x.nbytes
      for x in jax.tree.leaves(
        grassjax.adamw(1e-3, mu_dtype=dtype).init(params)
      )
    )
    for dtype in (None, "8bit")
  }
  entries = 65 * 4096
  assert sizes[None] == 8 * entries + 4  # the count
  # One byte a code, 4 a scale of 256 entries: 1.016 bytes an entry.
  assert sizes["8bit"] == 2 * (entries + 4 * entries // 256) + 4


def test_checkpoint_round_trips_bit_for_bit_and_resumes_the_same():
  tx = _preset("grasswalk", mu_dtype="8bit")
  params = _params()
  step = jax.jit(tx.update)
  state = tx.init(params)
  for i in range(4):
    _, state = step(_grads(i, params), state, params)
  with tempfile.TemporaryDirectory() as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(f"{tmp}/ckpt", state)
      checkpointer.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      restored = checkpointer.restore(f"{tmp}/ckpt", abstract)
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal(restored, state)  # bit for bit, codes too
  for i in range(4, 8):
    updates, state = step(_grads(i, params), state, params)
    again, restored = step(_grads(i, params), restored, params)
    chex.assert_trees_all_equal(again, updates)
  chex.assert_trees_all_equal(restored, state)


def test_flax_nnx_optimizer_keeps_the_codes_and_scales_apart():
  """nnx stores each parameter's entry of a state tree as one variable: the
  codes' and scales' trees keep every entry a single array."""

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((8, 300)))
      self.b = nnx.Param(jnp.ones((300,)))

    def __call__(self):
      return jnp.sum(jnp.square(self.w[...] - 2)) + jnp.sum(self.b[...])

  model = Model()
  optimizer = nnx.Optimizer(
    model,
    grassjax.grassjump(1e-2, rank=2, key=jax.random.key(0), mu_dtype="8bit"),
    wrt=nnx.Param,
  )

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: m())(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < losses[0]
  mu = nnx.as_pure(optimizer.opt_state)[0].mu
  assert mu.codes["w"].dtype == jnp.uint8 and mu.codes["w"].shape == (2, 300)
  assert mu.scales["w"].shape == (2, 2)


def test_fsdp_splits_codes_and_scales_along_one_axis():
  """The example's fsdp rule: a block and its scale on one device. 11008
  columns are 43 blocks, which 4 devices do not divide, so that moment is
  split on its rank axis instead, codes and scales alike."""
  from jax.sharding import AbstractMesh
  from jax.sharding import PartitionSpec as P

  from examples.llama import sharding

  params = {
    "mlp": jax.ShapeDtypeStruct((8, 64, 11008), jnp.float32),
    "attention": jax.ShapeDtypeStruct((8, 64, 4096), jnp.float32),
    "norm": jax.ShapeDtypeStruct((64,), jnp.float32),
  }
  tx = grassjax.grassjump(1e-3, rank=32, key=jax.random.key(0), mu_dtype="8bit")
  state = jax.eval_shape(tx.init, params)
  specs = jax.tree.map(
    lambda s: s.spec,
    sharding.state_shardings(state, AbstractMesh((4,), ("fsdp",)), "fsdp"),
  )
  for moment in (specs[0].mu, specs[0].nu):
    assert moment.codes == moment.scales
    assert moment.codes["attention"] == P(None, None, "fsdp")
    assert moment.codes["mlp"] == P(None, "fsdp", None)
    assert moment.codes["norm"] == P()
  # The bases, (8, 64, 32), keep the rule of any other array.
  assert specs[0].basis["mlp"] == P(None, "fsdp", None)
