"""grassjax against the independent float64 reference in ``tests/reference.py``.

The 16 cells of the ablation grid (4 subspace rules x adaptive optimizer on/off
x recovery scaling on/off) run on tiny wide, tall, square and stacked
parameters. Each step's basis is read from the library's state and handed to
the reference, so the comparison covers projection, Adam, the AO rotation and
recovery scaling exactly, whatever a rule draws; the rules' own bases are
checked against the reference geometry separately.
"""

from __future__ import annotations

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

SHAPES = {"wide": (4, 7), "tall": (7, 4), "square": (5, 5), "stacked": (2, 4, 6)}
RANK = 3
STEPS = 7
RULES = {
  "svd": subspace.svd(),
  "tracking": subspace.tracking(0.05),
  "random_walk": subspace.random_walk(0.4),
  "random_jump": subspace.random_jump(),
}
# float32 library against float64 reference, over a few Adam steps whose
# directions are O(1): agreement to ~1e-6 relative is expected; 1e-4 leaves
# room for float32 rounding in the SVD/QR-made bases, and is far below the size
# of any wrong term (the AO and RS corrections change updates by > 1e-2).
TOL = dict(rtol=1e-4, atol=2e-5)


def gradients(steps: int, growth: float = 1.0, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [
    {
      name: (growth**t * rng.standard_normal(shape)).astype(np.float32)
      for name, shape in SHAPES.items()
    }
    for t in range(steps)
  ]


def run_library(tx, grads):
  """The updates and the basis held after each step."""
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  update = jax.jit(tx.update)
  updates, bases = [], []
  for g in grads:
    u, state = update(g, state)
    updates.append(jax.tree.map(np.asarray, u))
    bases.append(jax.tree.map(np.asarray, state.basis))
  return updates, bases


def check_against_reference(grads, updates, bases, **settings):
  """Compares every matrix of every step; returns the reference states."""
  states = []
  for name, shape in SHAPES.items():
    for index in np.ndindex(*shape[:-2]):
      expected, state = reference.run(
        [g[name][index] for g in grads],
        [b[name][index] for b in bases],
        **settings,
      )
      for t, (u, e) in enumerate(zip(updates, expected, strict=True), start=1):
        np.testing.assert_allclose(
          u[name][index], e, **TOL, err_msg=f"{name}{index} step {t}"
        )
      states.append(state)
  return states


@pytest.mark.parametrize(
  "rule, adaptive_optimizer, recovery_scaling",
  list(itertools.product(RULES, (False, True), (False, True))),
)
def test_grid_cell_matches_reference(rule, adaptive_optimizer, recovery_scaling):
  settings = dict(
    update_interval=2,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=1.01,
    scale=0.25,
  )
  tx = grassjax.scale_by_subspace_adam(
    RULES[rule], rank=RANK, key=jax.random.key(7), **settings
  )
  grads = gradients(STEPS)
  updates, bases = run_library(tx, grads)
  check_against_reference(grads, updates, bases, **settings)
  # The basis only moves on update steps (t = 1, 3, 5, 7).
  for t in (2, 4, 6):
    chex.assert_trees_all_equal(bases[t - 1], bases[t - 2])
  assert not np.allclose(bases[2]["wide"], bases[1]["wide"])


@pytest.mark.parametrize("update_interval", [1, 3])
@pytest.mark.parametrize("scale_recovery", [True, False])
def test_update_intervals_and_unscaled_recovery(update_interval, scale_recovery):
  settings = dict(
    update_interval=update_interval,
    adaptive_optimizer=True,
    recovery_scaling=True,
    zeta=1.01,
    scale=0.25,
    scale_recovery=scale_recovery,
  )
  tx = grassjax.scale_by_subspace_adam(
    subspace.random_jump(), rank=RANK, key=jax.random.key(3), **settings
  )
  grads = gradients(STEPS, seed=1)
  updates, bases = run_library(tx, grads)
  check_against_reference(grads, updates, bases, **settings)


@pytest.mark.parametrize("growth, zeta, fires", [(1.5, 1.01, True), (1.0, 1e3, False)])
def test_growth_limiter(growth, zeta, fires):
  settings = dict(
    update_interval=3, adaptive_optimizer=True, recovery_scaling=True, zeta=zeta
  )
  tx = grassjax.scale_by_subspace_adam(subspace.svd(), rank=RANK, **settings)
  grads = gradients(STEPS, growth=growth, seed=2)
  updates, bases = run_library(tx, grads)
  states = check_against_reference(grads, updates, bases, **settings)
  limited = [any(s.limited[t] for s in states) for t in range(STEPS)]
  assert not limited[0]  # the first step is never limited
  assert any(limited) == fires


def test_rule_bases_follow_the_reference_geometry():
  grads = gradients(5, seed=4)
  tracking = grassjax.scale_by_subspace_adam(
    RULES["tracking"], rank=RANK, update_interval=2
  )
  _, bases = run_library(tracking, grads)
  for t in (3, 5):  # update steps: one geodesic step from the previous basis
    for name in ("wide", "tall", "square"):
      g, _ = reference.canonical(grads[t - 1][name].astype(np.float64))
      expected = reference.tracking_step(bases[t - 2][name].astype(np.float64), g, 0.05)
      np.testing.assert_allclose(bases[t - 1][name], expected, atol=1e-5)

  svd = grassjax.scale_by_subspace_adam(RULES["svd"], rank=RANK, update_interval=2)
  _, bases = run_library(svd, grads)
  for t in (1, 3, 5):  # the top-r left singular subspace (signs are arbitrary)
    g, _ = reference.canonical(grads[t - 1]["tall"].astype(np.float64))
    u = np.linalg.svd(g)[0][:, :RANK]
    s = bases[t - 1]["tall"]
    np.testing.assert_allclose(s @ s.T, u @ u.T, atol=1e-5)


def identity_rule() -> grassjax.SubspaceRule:
  return grassjax.SubspaceRule(
    init=lambda grad, rank, key: jnp.eye(grad.shape[0], rank, dtype=grad.dtype),
    update=lambda basis, grad, key: basis,
    name="identity",
  )


def test_full_rank_identity_basis_reduces_to_adam():
  params = {"wide": jnp.zeros((4, 6)), "tall": jnp.zeros((6, 4)), "bias": jnp.zeros(6)}
  tx = grassjax.scale_by_subspace_adam(
    identity_rule(),
    rank=4,
    update_interval=2,
    adaptive_optimizer=False,
    recovery_scaling=False,
    mask={"wide": True, "tall": True, "bias": False},
  )
  adam = optax.adam(1.0)  # the learning rate only flips the sign
  state, adam_state = tx.init(params), adam.init(params)
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  rng = np.random.default_rng(5)
  for _ in range(6):
    g = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
    )
    u, state = update(g, state)
    a, adam_state = adam_update(g, adam_state)
    chex.assert_trees_all_close(u, jax.tree.map(jnp.negative, a), atol=1e-6, rtol=1e-6)
  assert state.basis["wide"].shape == (4, 4)  # it was projected, at full rank


def test_adaptive_optimizer_is_the_identity_for_an_unchanged_basis():
  m = jnp.asarray(np.random.default_rng(6).standard_normal((3, 5)), jnp.float32)
  v = jnp.square(m) + 0.1
  same_m, same_v = grassjax.rotate_moments(jnp.eye(3), m, v, 0.9, 0.999, 4)
  chex.assert_trees_all_close((same_m, same_v), (m, v), rtol=1e-6)

  grads = gradients(STEPS, seed=6)
  runs = [
    run_library(
      grassjax.scale_by_subspace_adam(
        subspace.fixed(), rank=RANK, update_interval=2, adaptive_optimizer=ao
      ),
      grads,
    )[0]
    for ao in (False, True)
  ]
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)
