"""grassjax against the independent float64 reference in ``tests/reference.py``.

* The 16 cells of the ablation grid (4 subspace rules x AO on/off x RS on/off)
  on a wide and a tall matrix: each step's basis is read from the library's
  state and handed to the reference, so projection, Adam, the AO rotation and
  RS are compared exactly whatever a rule draws or however an SVD signs its
  vectors. The rules' bases are checked against the reference geometry apart.
* A rule whose bases are a pure function of the gradients, mirrored in NumPy:
  bases and updates computed without reading the library, for update intervals
  1 to 3 on wide, tall, square and stacked parameters.
* The growth limiter firing and not; the reductions to Adam (identity basis)
  and of AO to the identity (unchanged basis); the learning rate and weight
  decay of an alias.

Every transformation is jitted once. The reference itself is checked first
against exact identities of the geodesic and of the AO rotation (pure NumPy).
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassjax
from grassjax import subspace
from tests import reference

RANK = 3
STEPS = 8
SHAPES = {"wide": (4, 6), "tall": (7, 5)}
ALL_SHAPES = {**SHAPES, "square": (5, 5), "stacked": (2, 4, 6)}
TRACK_STEP = 0.05  # raw SubTrack++ step: angles of ~0.1 to 1 rad here
WALK_ANGLE = 0.4
RULES = {
  "svd": subspace.svd(),
  "tracking": subspace.tracking(TRACK_STEP),
  "random_walk": subspace.random_walk(WALK_ANGLE),
  "random_jump": subspace.random_jump(),
}
KEY = jax.random.key(7)
# float32 library against the float64 reference. The largest deviation seen is
# ~1e-5 relative, nearly all of it the float32 rounding of b2 in Adam's 1 - b2^t
# (1.3e-5 at t = 1, as in optax: the reference takes b2 exact); the rest is
# ~1e-6 from products, SVDs and QRs. rtol 1e-4 / atol 1e-5 keep a margin of 5x
# or more and stay far below any wrong term: the AO rotation, the recovery term,
# the limiter or a step of basis timing change updates by > 1e-2.
TOL = dict(rtol=1e-4, atol=1e-5)
BASIS_ATOL = 1e-5  # orthonormal float32 bases, entries <= 1


def gradients(
  shapes: dict, steps: int = STEPS, growth: float = 1.0, seed: int = 0
) -> list[dict]:
  """Independent Gaussian gradients, scaled by ``growth^t`` (float32)."""
  rng = np.random.default_rng(seed)
  return [
    {
      name: (growth**t * rng.standard_normal(shape)).astype(np.float32)
      for name, shape in shapes.items()
    }
    for t in range(steps)
  ]


def run_library(tx, grads, params=None):
  """Updates, bases and recovery norms after each step, with one jit."""
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  update = jax.jit(tx.update)
  updates, bases, norms = [], [], []
  for g in grads:
    u, state = update(g, state, params)
    # An alias's state is a chain whose first element is the subspace state.
    inner = state if isinstance(state, grassjax.SubspaceAdamState) else state[0]
    updates.append(jax.tree.map(np.asarray, u))
    bases.append(jax.tree.map(np.asarray, inner.basis))
    norms.append(jax.tree.map(np.asarray, inner.recovery_norm))
  return updates, bases, norms


def matrices(shapes: dict):
  """``(name, index)`` of every matrix: one per leaf, one per stacked slice."""
  for name, shape in shapes.items():
    for index in np.ndindex(*shape[:-2]):
      yield name, index


def check_against_reference(
  shapes, grads, updates, bases, norms=None, **settings
):
  """Compares every matrix of every step; returns the reference states by
  matrix."""
  states = {}
  for name, index in matrices(shapes):
    expected, state = reference.run(
      [g[name][index] for g in grads],
      [b[name][index] for b in bases],
      **settings,
    )
    for t, (u, e) in enumerate(zip(updates, expected, strict=True), start=1):
      np.testing.assert_allclose(
        u[name][index], e, **TOL, err_msg=f"{name}{index} step {t}"
      )
    if norms is not None and settings["recovery_scaling"]:
      np.testing.assert_allclose(
        [n[name][index] for n in norms], state.recovery_norms, **TOL
      )
    states[name, index] = state
  return states


def canonical_grad(grads, t: int, name: str, index=()) -> np.ndarray:
  return reference.canonical(grads[t - 1][name][index])[0]


def svd_projector(g: np.ndarray) -> np.ndarray:
  u = np.linalg.svd(g)[0][:, :RANK]
  return u @ u.T


def orthonormality_error(s: np.ndarray) -> float:
  return float(np.abs(s.T @ s - np.eye(s.shape[1])).max())


# ----------------------------------------------------------------------------
# The reference's own identities (pure NumPy)
# ----------------------------------------------------------------------------


def test_reference_geometry_identities():
  rng = np.random.default_rng(0)
  s = reference.qr_positive(rng.standard_normal((7, 3)))
  h = reference.tangent(s, rng.standard_normal((7, 3)))
  np.testing.assert_allclose(s.T @ h, 0.0, atol=1e-12)
  np.testing.assert_allclose(reference.geodesic(s, h, 0.0), s, atol=1e-12)
  d = 1e-6
  velocity = (reference.geodesic(s, h, d) - reference.geodesic(s, h, -d)) / (
    2 * d
  )
  np.testing.assert_allclose(velocity, h, atol=1e-8)
  for tau in (0.3, 2.0, -5.0):
    moved = reference.geodesic(s, h, tau)
    assert orthonormality_error(moved) < 1e-12
    np.testing.assert_allclose(
      moved, reference.geodesic_expm(s, h, tau), atol=1e-12
    )
  # A unit rank-1 walk of angle a: one principal angle a, the others 0.
  moved = reference.random_walk_step(s, rng.standard_normal((7, 3)), 0.7)
  cosines = np.linalg.svd(s.T @ moved, compute_uv=False)
  np.testing.assert_allclose(
    np.sort(cosines), [np.cos(0.7), 1.0, 1.0], atol=1e-12
  )
  # Tracking descends the projection error for a small step.
  g = rng.standard_normal((7, 9))
  tracked = reference.tracking_step(s, g, 1e-3)
  assert reference.projection_error(tracked, g) < reference.projection_error(
    s, g
  )


def test_reference_rotation_identities():
  rng = np.random.default_rng(1)
  m = rng.standard_normal((3, 5))
  v = m**2 + rng.uniform(0.1, 1.0, (3, 5))
  s = reference.qr_positive(rng.standard_normal((6, 3)))
  same = reference.rotate(s, s, m, v, 4, 0.9, 0.999)
  np.testing.assert_allclose(same[0], m, rtol=1e-12)
  np.testing.assert_allclose(same[1], v, rtol=1e-12)
  # 45 degrees inside the subspace: eq. (6) read literally goes negative here.
  c = np.sqrt(0.5)
  turned = s @ np.array([[c, -c, 0], [c, c, 0], [0, 0, 1]])
  m = np.ones((3, 5)) * np.array([[1.0], [-1.0], [0.5]])
  v = 0.1 * m**2
  assert np.all(reference.rotate(turned, s, m, v, 2, 0.9, 0.999)[1] >= 0)


def test_rotate_moments_matches_reference():
  """The library's AO rotation against the reference, on a generic rotation."""
  rng = np.random.default_rng(2)
  s_old = reference.qr_positive(rng.standard_normal((6, 3)))
  s_new = reference.qr_positive(s_old + 0.7 * rng.standard_normal((6, 3)))
  # Moments as Adam leaves them after 3 steps, so V/c2 - (M/c1)^2 is small.
  m, v = np.zeros((3, 5)), np.zeros((3, 5))
  for _ in range(3):
    g = rng.standard_normal((3, 5))
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
  m, v = m.astype(np.float32), v.astype(np.float32)
  got = grassjax.rotate_moments(
    jnp.asarray(s_new.T @ s_old, jnp.float32), m, v, 0.9, 0.999, jnp.asarray(3)
  )
  expected = reference.rotate(s_new, s_old, m, v, 4, 0.9, 0.999)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-9)
  same = grassjax.rotate_moments(jnp.eye(3), m, v, 0.9, 0.999, jnp.asarray(3))
  np.testing.assert_allclose(same[0], m, rtol=1e-6)
  np.testing.assert_allclose(same[1], v, rtol=1e-5)


# ----------------------------------------------------------------------------
# The ablation grid
# ----------------------------------------------------------------------------


def grid_settings(adaptive_optimizer: bool, recovery_scaling: bool) -> dict:
  return dict(
    update_interval=2,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=1.01,
    scale=0.25,
  )


@functools.cache
def grid_run(rule: str, adaptive_optimizer: bool, recovery_scaling: bool):
  """The library on one cell (cached: the geometry test reuses the runs)."""
  settings = grid_settings(adaptive_optimizer, recovery_scaling)
  tx = grassjax.scale_by_subspace_adam(
    RULES[rule], rank=RANK, key=KEY, **settings
  )
  grads = gradients(SHAPES)
  return (grads, *run_library(tx, grads))


@pytest.mark.parametrize(
  "rule, adaptive_optimizer, recovery_scaling",
  list(itertools.product(RULES, (False, True), (False, True))),
)
def test_grid_cell_matches_reference(
  rule, adaptive_optimizer, recovery_scaling
):
  grads, updates, bases, norms = grid_run(
    rule, adaptive_optimizer, recovery_scaling
  )
  check_against_reference(
    SHAPES,
    grads,
    updates,
    bases,
    norms,
    **grid_settings(adaptive_optimizer, recovery_scaling),
  )
  # The basis moves on the update steps t = 1, 3, 5, 7 only.
  for name in SHAPES:
    for t in range(2, STEPS + 1):
      if t % 2 == 0:
        np.testing.assert_array_equal(bases[t - 1][name], bases[t - 2][name])
      else:
        assert not np.allclose(bases[t - 1][name], bases[t - 2][name])


@pytest.mark.parametrize("rule", ["svd", "random_jump"])
def test_longer_side_matches_reference(rule):
  """Projecting the longer side: the same equations on the transposed view."""
  settings = grid_settings(adaptive_optimizer=True, recovery_scaling=True)
  tx = grassjax.scale_by_subspace_adam(
    RULES[rule], rank=RANK, key=KEY, projected_side="longer", **settings
  )
  grads = gradients(ALL_SHAPES, seed=2)
  updates, bases, norms = run_library(tx, grads)
  for name, shape in ALL_SHAPES.items():
    assert bases[0][name].shape[-2] == max(shape[-2:]), name
  check_against_reference(
    ALL_SHAPES,
    grads,
    updates,
    bases,
    norms,
    projected_side="longer",
    **settings,
  )


@pytest.mark.parametrize("rule", RULES)
def test_rule_bases_follow_the_reference_geometry(rule):
  """Each rule's bases in the grid runs, against the reference geometry.

  svd: the top-r left singular subspace of the canonical gradient (signs are
  arbitrary, so projectors are compared). tracking: one reference tracking step
  from the previous basis. random_walk: the draw is not reproduced; the step
  ``S_new - S_old`` must be the rank-1 displacement of a geodesic of exactly
  ``WALK_ANGLE`` radians, and ``S_new`` the reference walk along the unit
  tangent that displacement gives. random_jump: orthonormal, not the SVD one.
  """
  grads, _, bases, _ = grid_run(rule, True, True)
  for name in SHAPES:
    for t in range(1, STEPS + 1, 2):
      g = canonical_grad(grads, t, name)
      new = bases[t - 1][name].astype(np.float64)
      assert orthonormality_error(new) < BASIS_ATOL
      if rule == "random_jump":
        assert not np.allclose(new @ new.T, svd_projector(g), atol=1e-2)
      elif t == 1 or rule == "svd":
        np.testing.assert_allclose(
          new @ new.T, svd_projector(g), atol=BASIS_ATOL
        )
      elif rule == "tracking":
        old = bases[t - 2][name].astype(np.float64)
        expected = reference.tracking_step(old, g, TRACK_STEP)
        np.testing.assert_allclose(new, expected, atol=BASIS_ATOL)
      else:
        old = bases[t - 2][name].astype(np.float64)
        moved = new - old
        singular = np.linalg.svd(moved, compute_uv=False)
        chord = [2 * np.sin(WALK_ANGLE / 2), 0.0, 0.0]
        np.testing.assert_allclose(singular, chord, atol=BASIS_ATOL)
        v = np.linalg.svd(moved)[2][0]
        u = reference.tangent(old, moved @ v)
        draw = np.outer(u / np.linalg.norm(u), v)
        expected = reference.random_walk_step(old, draw, WALK_ANGLE)
        np.testing.assert_allclose(new, expected, atol=BASIS_ATOL)


# ----------------------------------------------------------------------------
# Bases that are a pure function of the gradients, mirrored in NumPy
# ----------------------------------------------------------------------------

MIX = 0.5


def mixer(n: int, r: int) -> np.ndarray:
  """A fixed full-rank ``(n, r)`` matrix, ``C[i, j] = cos((i + 1) (j + 1))``."""
  return np.cos(np.outer(np.arange(1, n + 1), np.arange(1, r + 1)))


def _qr_positive(x: jax.Array) -> jax.Array:
  q, r = jnp.linalg.qr(x)
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)


def _mixed(grad: jax.Array, r: int) -> jax.Array:
  return grad @ jnp.asarray(mixer(grad.shape[1], r), grad.dtype)


# With C = mixer(n, r) and a canonical G: init(G) = qr+(G C) and update(S, G) =
# qr+(S + MIX G C). (A basis spanning columns of G would make S^T G triangular,
# and Adam's direction of its exact zeros is float32 rounding noise.)
MIXING_RULE = grassjax.SubspaceRule(
  init=lambda grad, rank, key: _qr_positive(_mixed(grad, rank)),
  update=lambda basis, grad, key: _qr_positive(
    basis + MIX * _mixed(grad, basis.shape[1])
  ),
  name="mixing",
)


def mixing_bases(
  grads: list[np.ndarray], update_interval: int
) -> list[np.ndarray]:
  """MIXING_RULE's basis on each step, in float64 NumPy."""
  bases, s = [], None
  for t, g in enumerate(grads, start=1):
    g, _ = reference.canonical(g)
    mixed = g @ mixer(g.shape[1], RANK)
    if t == 1:
      s = reference.qr_positive(mixed)
    elif reference.is_update_step(t, update_interval):
      s = reference.qr_positive(s + MIX * mixed)
    bases.append(s)
  return bases


def check_mixing_run(shapes, grads, updates, bases, norms, **settings):
  """Library bases against mixing_bases, then updates against the reference."""
  states = {}
  for name, index in matrices(shapes):
    grads_here = [g[name][index] for g in grads]
    expected_bases = mixing_bases(grads_here, settings["update_interval"])
    for t, (b, e) in enumerate(
      zip(bases, expected_bases, strict=True), start=1
    ):
      np.testing.assert_allclose(
        b[name][index], e, atol=BASIS_ATOL, err_msg=f"{name}{index} step {t}"
      )
    expected, states[name, index] = reference.run(
      grads_here, expected_bases, **settings
    )
    for t, (u, e) in enumerate(zip(updates, expected, strict=True), start=1):
      np.testing.assert_allclose(
        u[name][index], e, **TOL, err_msg=f"{name}{index} step {t}"
      )
    if settings["recovery_scaling"]:
      np.testing.assert_allclose(
        [n[name][index] for n in norms],
        states[name, index].recovery_norms,
        **TOL,
      )
  return states


@pytest.mark.parametrize(
  "update_interval, scale_recovery", [(1, True), (2, False), (3, True)]
)
def test_pure_rule_bases_and_updates_match_numpy(
  update_interval, scale_recovery
):
  settings = dict(
    update_interval=update_interval,
    adaptive_optimizer=True,
    recovery_scaling=True,
    zeta=1.01,
    scale=0.25,
    scale_recovery=scale_recovery,
  )
  tx = grassjax.scale_by_subspace_adam(MIXING_RULE, rank=RANK, **settings)
  grads = gradients(ALL_SHAPES, seed=1)
  check_mixing_run(ALL_SHAPES, grads, *run_library(tx, grads), **settings)


@functools.cache
def limiter_update():
  settings = dict(
    update_interval=3, adaptive_optimizer=True, recovery_scaling=True, zeta=1.01
  )
  return settings, grassjax.scale_by_subspace_adam(
    MIXING_RULE, rank=RANK, **settings
  )


def test_growth_limiter_fires():
  """Independent, growing gradients: ||Lambda|| jumps and the limiter caps it.

  The basis moves at t = 4 and 7, so the capped norm is carried across basis
  changes; without the limiter the updates would differ far beyond TOL.
  """
  settings, tx = limiter_update()
  grads = gradients(SHAPES, growth=1.5, seed=2)
  updates, bases, norms = run_library(tx, grads)
  states = check_mixing_run(SHAPES, grads, updates, bases, norms, **settings)
  for state in states.values():
    assert not state.limited[0]  # the first step is never limited
    assert sum(state.limited) >= 2
  unlimited = reference.run(
    [g["wide"] for g in grads],
    [b["wide"] for b in bases],
    **{**settings, "zeta": np.inf},
  )[0]
  gap = max(
    np.abs(u["wide"] - e).max() for u, e in zip(updates, unlimited, strict=True)
  )
  assert gap > 1e-2


def test_growth_limiter_does_not_fire():
  """A fixed direction shrinking by half each step: ||Lambda|| falls, no cap."""
  settings, tx = limiter_update()
  direction = gradients(SHAPES, steps=1, seed=3)[0]
  grads = [
    jax.tree.map(lambda g, t=t: g * np.float32(0.5**t), direction)
    for t in range(STEPS)
  ]
  states = check_mixing_run(SHAPES, grads, *run_library(tx, grads), **settings)
  for state in states.values():
    assert not any(state.limited)
    norms = np.array(state.recovery_norms)
    assert np.all(norms[1:] / norms[:-1] < 0.99 * settings["zeta"])


# ----------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------


def identity_rule() -> grassjax.SubspaceRule:
  return grassjax.SubspaceRule(
    init=lambda grad, rank, key: jnp.eye(grad.shape[0], rank, dtype=grad.dtype),
    update=lambda basis, grad, key: basis,
    name="identity",
  )


@pytest.mark.parametrize(
  "adaptive_optimizer, recovery_scaling", [(False, False), (True, True)]
)
def test_full_rank_identity_basis_reduces_to_adam(
  adaptive_optimizer, recovery_scaling
):
  """rank = min dimension, S = I, scale 1: optax.adam (AO: P = I; RS:
  Delta = 0)."""
  params = {"wide": jnp.zeros((4, 6)), "tall": jnp.zeros((6, 4))}
  tx = grassjax.scale_by_subspace_adam(
    identity_rule(),
    rank=4,
    update_interval=2,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    projection_mask={"wide": True, "tall": True},
  )
  adam = optax.adam(1.0)  # the learning rate 1 only flips the sign
  state, adam_state = tx.init(params), adam.init(params)
  # Both jitted: an eager pow rounds 1 - b2^t differently (~1e-5 relative).
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  rng = np.random.default_rng(5)
  for _ in range(6):
    g = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
    )
    u, state = update(g, state)
    a, adam_state = adam_update(g, adam_state)
    chex.assert_trees_all_close(
      u, jax.tree.map(jnp.negative, a), atol=1e-6, rtol=1e-6
    )
  assert state.basis["wide"].shape == (4, 4)  # projected, at full rank


def test_adaptive_optimizer_is_the_identity_for_an_unchanged_basis():
  """A rule whose update keeps the basis: AO on and off give the same run."""
  grads = gradients(SHAPES, seed=6)
  runs = [
    run_library(
      grassjax.scale_by_subspace_adam(
        subspace.fixed(), rank=RANK, update_interval=2, adaptive_optimizer=ao
      ),
      grads,
    )[0]
    for ao in (False, True)
  ]
  # P = S^T S is I only to float32 rounding (~1e-7), hence not exact equality.
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_default_mask_leaves_small_and_1d_leaves_to_adam():
  """Leaves the default mask leaves out (min side <= rank, 1-D) get
  scale_by_adam.

  (An explicit mask is covered in test_transform.py.)
  """
  shapes = {"wide": (4, 6), "narrow": (3, 8), "bias": (6,)}
  # scale != 1: it multiplies the projected update only, never plain Adam's.
  tx = grassjax.scale_by_subspace_adam(
    MIXING_RULE, rank=RANK, update_interval=2, scale=0.25
  )
  adam = optax.scale_by_adam()
  grads = gradients(shapes, steps=4, seed=8)
  state, adam_state = tx.init(grads[0]), adam.init(grads[0])
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  for g in grads:
    u, state = update(g, state)
    a, adam_state = adam_update(g, adam_state)
    for name in ("narrow", "bias"):  # equal up to an ulp of XLA's fusions
      np.testing.assert_allclose(u[name], a[name], rtol=1e-6, atol=1e-7)
  assert isinstance(state.basis["narrow"], optax.MaskedNode)
  assert state.basis["wide"].shape == (4, RANK)


def test_alias_applies_learning_rate_and_decoupled_weight_decay():
  """GaLore with AO and RS: W <- W - lr (scale (S D + Lambda) + wd W)."""
  lr, wd, scale = 0.1, 0.01, 0.25
  tx = grassjax.galore(
    lr,
    rank=RANK,
    update_interval=2,
    scale=scale,
    weight_decay=wd,
    adaptive_optimizer=True,
    recovery_scaling=True,
  )
  grads = gradients(SHAPES, steps=5, seed=9)
  params = gradients(SHAPES, steps=1, seed=10)[0]
  updates, bases, _ = run_library(tx, grads, params)
  settings = dict(
    update_interval=2, adaptive_optimizer=True, recovery_scaling=True
  )
  for name, _ in matrices(SHAPES):
    expected = reference.run(
      [g[name] for g in grads],
      [b[name] for b in bases],
      scale=scale,
      **settings,
    )[0]
    for u, e in zip(updates, expected, strict=True):
      np.testing.assert_allclose(u[name], -lr * (e + wd * params[name]), **TOL)
