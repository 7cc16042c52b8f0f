"""Diagnostics of low-rank training: energy fraction, subspace motion, bytes.

All functions are pure and jit-compatible (except :func:`state_bytes`, which
reads only shapes) and return arrays, so they can be computed inside a training
step and logged without extra host syncs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grassjax import layout as layout_lib
from grassjax.layout import DimensionNumbersOrFn
from grassjax.transform import SubspaceAdamState


def find_subspace_state(opt_state: Any) -> SubspaceAdamState:
  """The :class:`~grassjax.SubspaceAdamState` inside any optax state.

  Works through ``optax.chain``, ``optax.MultiSteps``, ``inject_hyperparams``,
  ``apply_if_finite`` and ``flax.nnx.Optimizer`` states alike.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [
    x
    for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SubspaceAdamState)
    )
    if isinstance(x, SubspaceAdamState)
  ]
  if len(found) != 1:
    raise ValueError(
      "grassjax: expected one SubspaceAdamState in the optimizer state,"
      f" found {len(found)}."
    )
  return found[0]


def energy_fraction(
  grads: optax.Updates,
  opt_state: Any,
  *,
  dimension_numbers: DimensionNumbersOrFn = None,
) -> optax.Updates:
  """Fraction of each projected gradient's norm inside its subspace.

  ``R = ||S^T G||_F / ||G||_F`` for every stacked matrix of every projected
  parameter (0 for a zero gradient), with ``S`` the current basis. Taken just
  after an update it measures how much of the gradient the subspace kept; ``1 -
  R^2`` is the share of the squared norm that recovery scaling works on.

  Args:
    grads: gradients, same structure as the parameters.
    opt_state: an optimizer state containing one ``SubspaceAdamState``.
    dimension_numbers: as given to the optimizer (default: last two axes).

  Returns:
    A pytree like ``grads`` with a ``batch_shape`` array (a scalar for a plain
    matrix) for projected parameters and ``None`` for the others.
  """
  state = find_subspace_state(opt_state)
  treedef: layout_lib.PyTreeDef
  leaves, treedef = jax.tree.flatten(grads)
  # Matched by position, not by tree type: wrappers differ between the
  # gradients and the state (flax.nnx.Optimizer keeps its state in OptVariable
  # where the gradients have Param), while the order of the leaves is the same.
  bases = jax.tree.leaves(
    state.basis, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )
  layouts = layout_lib.layouts_from_bases(grads, bases, dimension_numbers)
  out: list[jax.Array | None] = []
  for g, basis, layout in zip(leaves, bases, layouts, strict=True):
    if layout is None:
      out.append(None)
      continue
    (fractions,) = layout_lib.for_each_matrix(
      functools.partial(_energy_fraction, layout),
      (jnp.zeros(layout.num_matrices, jnp.float32),),
      (layout.to_views(g), layout.flatten_batch(basis)),
    )
    assert fractions is not None  # for_each_matrix returns None for None only
    out.append(fractions.reshape(layout.batch_shape))
  return treedef.unflatten(out)


def _energy_fraction(
  layout: layout_lib.MatrixLayout,
  _: jax.Array,
  view: jax.Array,
  basis: jax.Array,
) -> tuple[jax.Array]:
  """``||S^T G|| / ||G||`` of one matrix (0 for a zero gradient)."""
  inside = jnp.linalg.norm(layout.project(basis, view))
  total = jnp.linalg.norm(view.astype(jnp.float32))
  return (jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0),)


def principal_angles(basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
  """Principal angles between the subspaces spanned by two orthonormal bases.

  ``theta_i = arccos(sigma_i(A^T B))`` in radians, ascending; 0 for a shared
  direction, ``pi / 2`` for an orthogonal one. Batched: ``A`` and ``B`` are
  ``(..., m, r)`` and the result is ``(..., r)``.
  """
  cosines = jnp.linalg.svd(
    jnp.swapaxes(basis_a, -1, -2) @ basis_b, compute_uv=False
  )
  # Singular values come in descending order, so the angles ascend.
  return jnp.arccos(jnp.clip(cosines, -1.0, 1.0))


def subspace_motion(previous_state: Any, state: Any) -> optax.Updates:
  """The largest principal angle between each parameter's old and new basis.

  Args:
    previous_state: optimizer state before a step.
    state: optimizer state after it.

  Returns:
    A pytree like the parameters: a ``batch_shape`` array of angles (radians)
    per projected parameter, ``None`` elsewhere.
  """
  old = find_subspace_state(previous_state).basis
  new = find_subspace_state(state).basis
  return jax.tree.map(
    lambda a, b: (
      None
      if isinstance(a, optax.MaskedNode)
      else principal_angles(a, b)[..., -1]
    ),
    old,
    new,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def state_bytes(state: Any) -> int:
  """Bytes held by the arrays of any pytree (an optax state, params, ...).

  Reads only shapes and dtypes, so it works on the ``jax.ShapeDtypeStruct``
  tree of ``jax.eval_shape(tx.init, params)`` without allocating anything.
  Typed PRNG keys count their raw key data.
  """
  total = 0
  for leaf in jax.tree.leaves(state):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      continue
    dtype = leaf.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      total += jax.eval_shape(jax.random.key_data, leaf).size * 4
    else:
      total += leaf.size * jnp.dtype(dtype).itemsize
  return int(total)
