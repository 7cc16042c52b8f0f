"""Grassmannian geometry and subspace rules: properties that hold for any
input."""

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import grassjax
from grassjax import subspace

jax.config.update("jax_default_matmul_precision", "highest")

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
SEEDS = st.integers(0, 2**31 - 1)
SHAPES = st.sampled_from([(6, 2), (8, 3), (12, 4), (16, 1), (9, 8)])


def _orthonormal(seed: int, m: int, r: int) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((m, r))
  return np.linalg.qr(x)[0]


def _orthonormality_error(s) -> float:
  s = np.asarray(s, np.float64)
  return float(np.max(np.abs(s.T @ s - np.eye(s.shape[1]))))


@functools.partial(jax.jit, static_argnums=2)
def _random_tangent_step(basis, key, k):
  """A tangent ``U Sigma V^T`` from a projected Gaussian, and its factors."""
  h = subspace.tangent(basis, jax.random.normal(key, basis.shape))
  return h, subspace.top_singular(h, k)


@jax.jit
def _walk(basis, key, angle):
  return subspace.random_walk(angle).update(basis, None, key)


@jax.jit
def _track(basis, grad):
  # A small step: 0.05 radians along the rank-1 descent direction.
  return subspace.tracking(0.05, normalize=True).update(basis, grad, None)


@hypothesis.given(seed=SEEDS, shape=SHAPES, step=st.floats(-3.0, 3.0))
@SETTINGS
def test_geodesic_is_orthonormal_and_starts_at_basis(seed, shape, step):
  m, r = shape
  basis = jnp.asarray(_orthonormal(seed, m, r), jnp.float32)
  k = min(r, m - r)
  _, (u, sigma, v) = _random_tangent_step(basis, jax.random.key(seed), k)
  moved = subspace.geodesic(basis, u, sigma, v, step)
  assert _orthonormality_error(moved) < 1e-5
  np.testing.assert_allclose(
    subspace.geodesic(basis, u, sigma, v, 0.0), basis, atol=1e-6
  )


@hypothesis.given(seed=SEEDS, shape=SHAPES)
@SETTINGS
def test_tangent_is_orthogonal_to_basis(seed, shape):
  m, r = shape
  basis = jnp.asarray(_orthonormal(seed, m, r), jnp.float32)
  h, _ = _random_tangent_step(basis, jax.random.key(seed), 1)
  np.testing.assert_allclose(basis.T @ h, 0.0, atol=1e-5)


@hypothesis.given(seed=SEEDS, shape=SHAPES)
@SETTINGS
def test_geodesic_velocity_and_matrix_exponential(seed, shape):
  """dS/dtau(0) = H, and S(tau) = expm(tau (H S^T - S H^T)) S."""
  m, r = shape
  basis = _orthonormal(seed, m, r)
  x = np.random.default_rng(seed + 1).standard_normal((m, r))
  h = x - basis @ (basis.T @ x)
  u, s, vt = np.linalg.svd(h, full_matrices=False)
  with jax.enable_x64(True):
    b, u, s, v = (jnp.asarray(a, jnp.float64) for a in (basis, u, s, vt.T))
    tau, d = 0.7, 1e-6
    velocity = (
      subspace.geodesic(b, u, s, v, d) - subspace.geodesic(b, u, s, v, -d)
    ) / (2 * d)
    np.testing.assert_allclose(velocity, h, atol=1e-6)
    skew = tau * (h @ basis.T - basis @ h.T)
    expected = jax.scipy.linalg.expm(jnp.asarray(skew)) @ b
    np.testing.assert_allclose(
      subspace.geodesic(b, u, s, v, tau), expected, atol=1e-9
    )


@hypothesis.given(seed=SEEDS, shape=SHAPES, angle=st.floats(0.0, 1.5))
@SETTINGS
def test_normalized_walk_rotates_by_exactly_step_size(seed, shape, angle):
  """A rank-1 normalized walk: one principal angle equals step_size, the
  rest 0."""
  m, r = shape
  basis = jnp.asarray(_orthonormal(seed, m, r), jnp.float32)
  moved = _walk(basis, jax.random.key(seed), angle)
  cosines = np.linalg.svd(
    np.asarray(basis.T @ moved, np.float64), compute_uv=False
  )
  expected = np.ones(r)
  expected[-1] = np.cos(angle)
  np.testing.assert_allclose(np.sort(cosines), np.sort(expected), atol=2e-5)


@hypothesis.given(seed=SEEDS, shape=SHAPES)
@SETTINGS
def test_tracking_step_lowers_projection_error(seed, shape):
  m, r = shape
  rng = np.random.default_rng(seed)
  grad = jnp.asarray(rng.standard_normal((m, m + 3)), jnp.float32)
  basis = jnp.asarray(_orthonormal(seed, m, r), jnp.float32)
  before = subspace.projection_error(basis, grad)
  after = subspace.projection_error(_track(basis, grad), grad)
  assert after <= before * (1 + 1e-6)
  if before > 1e-3 * jnp.sum(grad**2):
    assert after < before


@pytest.mark.parametrize(
  "rule",
  [subspace.random_walk(0.3), subspace.random_jump()],
  ids=lambda r: r.name,
)
def test_random_rules_depend_on_key_only(rule):
  """Updates are a function of the basis and key alone, not of the gradient."""
  m, r = 10, 3
  rng = np.random.default_rng(0)
  grad, other = (
    jnp.asarray(rng.standard_normal((m, 14)), jnp.float32) for _ in range(2)
  )
  init = jax.jit(rule.init, static_argnums=1)
  update = jax.jit(rule.update)
  basis = init(grad, r, jax.random.key(1))
  np.testing.assert_array_equal(basis, init(grad, r, jax.random.key(1)))
  moved = update(basis, grad, jax.random.key(2))
  np.testing.assert_array_equal(moved, update(basis, other, jax.random.key(2)))
  assert not np.allclose(moved, update(basis, grad, jax.random.key(3)))
  assert _orthonormality_error(moved) < 1e-5
  if rule.name == "random_jump":  # its first basis too; the walk's is the SVD's
    np.testing.assert_array_equal(basis, init(other, r, jax.random.key(1)))
    assert not np.allclose(basis, init(grad, r, jax.random.key(3)))


def test_svd_rule_of_degenerate_gradients_is_orthonormal():
  rule = subspace.svd()
  rank_one = jnp.outer(jnp.arange(1.0, 7.0), jnp.arange(1.0, 10.0))
  zero_columns = jnp.zeros((6, 9)).at[:, 0].set(1.0)
  for grad in (jnp.zeros((6, 9)), rank_one, zero_columns):
    basis = rule.init(grad, 3, None)
    assert bool(jnp.all(jnp.isfinite(basis)))
    assert _orthonormality_error(basis) < 1e-5


@pytest.mark.parametrize(
  "rule",
  [subspace.random_walk(0.3), subspace.tracking(1.0, normalize=True)],
  ids=lambda r: r.name,
)
def test_bases_stay_orthonormal_over_2000_updates(rule):
  m, r, n = 64, 8, 96

  def body(basis, key):
    grad = jax.random.normal(key, (m, n))
    return rule.update(basis, grad, key), None

  basis = subspace.orthonormalize(jax.random.normal(jax.random.key(0), (m, r)))
  keys = jax.random.split(jax.random.key(1), 2000)
  final, _ = jax.jit(lambda b: jax.lax.scan(body, b, keys))(basis)
  assert _orthonormality_error(final) < 1e-4


def test_orthonormalize_fixes_signs_and_is_idempotent():
  x = jax.random.normal(jax.random.key(0), (9, 4))
  q = subspace.orthonormalize(x)
  r = q.T @ x
  assert bool(jnp.all(jnp.diagonal(r) > 0))
  np.testing.assert_allclose(subspace.orthonormalize(q), q, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_a_tangent_of_rounding_leaves_the_basis_in_place(seed):
  """Normalized steps must not blow a zero tangent's rounding up to a full
  step."""
  key = jax.random.key(seed)
  full = subspace.orthonormalize(jax.random.normal(key, (6, 6)))
  # r = m: no tangent space
  walked = _walk(full, jax.random.fold_in(key, 1), 0.3)
  np.testing.assert_allclose(walked.T @ full, np.eye(6), atol=1e-5)
  basis = subspace.orthonormalize(jax.random.normal(key, (8, 3)))
  inside = basis @ jax.random.normal(jax.random.fold_in(key, 2), (3, 12))
  tracked = _track(basis, inside)  # the gradient lies in span(S)
  np.testing.assert_allclose(tracked.T @ basis, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_randomized_svd_basis_finds_the_top_subspace(seed):
  """A rank-4 signal under small noise: the randomized range finder's basis
  spans the exact SVD's top-4 subspace (largest principal angle < 0.01)."""
  key = jax.random.key(seed)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  signal = jax.random.normal(k1, (24, 4)) @ jax.random.normal(k2, (4, 40))
  grad = signal + 1e-3 * jax.random.normal(k3, (24, 40))
  exact = subspace.svd_basis("exact")(grad, 4, None)
  randomized = subspace.svd_basis("randomized")(grad, 4, k4)
  np.testing.assert_allclose(randomized.T @ randomized, np.eye(4), atol=1e-5)
  angles = grassjax.diagnostics.principal_angles(exact, randomized)
  assert float(angles.max()) < 1e-2


def test_randomized_svd_rules_need_a_key():
  for rule in (
    subspace.svd("randomized"),
    subspace.fixed("randomized"),
    subspace.tracking(svd_method="randomized"),
  ):
    assert rule.needs_key
  assert not subspace.svd().needs_key
  with pytest.raises(ValueError, match="needs a PRNG key"):
    grassjax.galore(1e-3, rank=4, svd_method="randomized")
  with pytest.raises(ValueError, match="svd_method"):
    subspace.svd("lanczos")
