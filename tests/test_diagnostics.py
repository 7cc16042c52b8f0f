"""grassjax.diagnostics: energy fraction, principal angles, subspace motion,
bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassjax
from grassjax import diagnostics

KEY = jax.random.key(0)


def _step(tx, params, grads, state=None):
  state = tx.init(params) if state is None else state
  _, new_state = jax.jit(tx.update)(grads, state, params)
  return state, new_state


def test_energy_fraction_is_one_inside_and_zero_outside_the_subspace():
  params = {
    "w": jnp.zeros((6, 10)),
    "stack": jnp.zeros((2, 6, 10)),
    "b": jnp.zeros(3),
  }
  tx = optax.chain(
    optax.clip_by_global_norm(1e3), grassjax.galore(1e-2, rank=2)
  )
  low_rank = jnp.outer(jnp.arange(1.0, 7.0), jnp.ones(10))  # rank one
  grads = {
    "w": low_rank,
    "stack": jnp.stack([low_rank, -low_rank]),
    "b": jnp.ones(3),
  }
  _, state = _step(tx, params, grads)
  fraction = diagnostics.energy_fraction(grads, state)
  np.testing.assert_allclose(fraction["w"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(fraction["stack"], [1.0, 1.0], rtol=1e-5)
  assert fraction["b"] is None
  basis = diagnostics.find_subspace_state(state).basis["w"]
  outside = jnp.eye(6) - basis @ basis.T
  orthogonal = {**grads, "w": outside @ jax.random.normal(KEY, (6, 10))}
  assert float(diagnostics.energy_fraction(orthogonal, state)["w"]) < 1e-5
  zero = jax.tree.map(jnp.zeros_like, grads)
  assert float(diagnostics.energy_fraction(zero, state)["w"]) == 0.0


def test_principal_angles_and_walk_motion():
  eye = jnp.eye(4)[:, :2]
  angle = 0.3
  rotated = eye.at[:, 1].set(
    jnp.array([0.0, jnp.cos(angle), jnp.sin(angle), 0.0])
  )
  np.testing.assert_allclose(
    diagnostics.principal_angles(eye, rotated), [0.0, angle], atol=1e-3
  )
  params = {"w": jnp.zeros((8, 12))}
  tx = grassjax.grasswalk(
    1e-2, rank=3, key=KEY, update_interval=1, step_size=0.25
  )
  grads = {"w": jax.random.normal(KEY, (8, 12))}
  _, first = _step(tx, params, grads)
  before, after = _step(tx, params, grads, first)
  np.testing.assert_allclose(
    diagnostics.subspace_motion(before, after)["w"], 0.25, atol=1e-3
  )


def test_state_bytes_of_shapes_only():
  params = {"w": jnp.zeros((64, 96)), "b": jnp.zeros(96)}
  shapes = jax.eval_shape(
    grassjax.grasswalk(1e-3, rank=8, key=KEY).init, params
  )
  expected = 4 * (64 * 8 + 2 * 8 * 96 + 1) + 4 * 2 * 96 + 4 + 8
  assert diagnostics.state_bytes(shapes) == expected
  adam = jax.eval_shape(optax.adam(1e-3).init, params)
  assert diagnostics.state_bytes(adam) == 4 * 2 * (64 * 96 + 96) + 4
  assert diagnostics.state_bytes({"k": jax.random.key(0)}) == 8


def test_energy_fraction_refuses_gradients_of_another_tree():
  params = {"a": jnp.ones((8, 16)), "b": jnp.ones((12, 20))}
  tx = grassjax.galore(1e-3, rank=2)
  state = tx.init(params)
  swapped = {"a": jnp.ones((12, 20)), "b": jnp.ones((8, 16))}
  with pytest.raises(ValueError, match=r"\['a'\].*does not fit"):
    grassjax.diagnostics.energy_fraction(swapped, state)
