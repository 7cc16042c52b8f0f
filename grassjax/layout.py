"""Which parameters are projected, and how each is seen as a stack of matrices.

A projected parameter is a stack of independent matrices: the axes named by
its :class:`MatrixDimensionNumbers` form each matrix, every other axis is a
*batch* axis (scanned layers), and each matrix has its own basis, moments and
recovery norm. A :class:`MatrixLayout` describes that view of one parameter
statically (from its shape alone); :func:`projection_layouts` decides, at
``init``, which parameters are projected, and :func:`layouts_from_bases`
recovers the same layouts from an optimizer state's bases.
:func:`for_each_matrix` runs a per-matrix function over a stack, one matrix
at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grassjax import _checks

# jax.tree_util.PyTreeDef, typed loosely: it lives in jaxlib's compiled core,
# which ships no type stubs.
PyTreeDef = Any

ProjectedSide = Literal["shorter", "longer"]


class MatrixDimensionNumbers(NamedTuple):
  """Which axes of a parameter form the matrix that is projected.

  Same convention as ``optax.contrib.MuonDimensionNumbers``: the matrix maps
  the ``reduction_axis`` (inputs) to the ``output_axis`` (outputs); each may
  be one axis or several (flattened in order). Every other axis is a *batch*
  axis: the parameter is a stack of independent matrices (scanned layers),
  processed one matrix at a time (so the step's intermediates exist for one
  matrix, not the whole stack). The update is computed in the parameter's
  own layout; only batch axes that do not lead, or matrix axes out of order,
  cost a transposed copy.

  The default, ``(-2, -1)``, makes the last two axes the matrix. An attention
  kernel ``(d_model, heads, head_dim)`` projected as one ``d_model x
  heads*head_dim`` matrix uses ``MatrixDimensionNumbers(0, (1, 2))``; a
  scanned stack of them ``(layers, d_model, heads, head_dim)`` uses
  ``MatrixDimensionNumbers(1, (2, 3))``.
  """

  reduction_axis: int | Sequence[int] = -2
  output_axis: int | Sequence[int] = -1


DimensionNumbersOrFn = (
  MatrixDimensionNumbers | Any | Callable[[optax.Params], Any] | None
)
MaskOrFn = Any | Callable[[optax.Params], Any] | None


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How one parameter is seen as a stack of matrices (static).

  Each matrix is handled in the parameter's own memory order, as a *view*
  ``(a, b)``: the group of matrix axes that comes first in the parameter's
  layout gives the view's rows. The projected side is the view's axis
  ``side``: with ``side == 1`` every product contracts the view's second
  axis, so a tall matrix is never transposed. The canonical matrix ``G`` is
  ``(m, n)`` with ``m`` the projected side: the basis is ``(m, r)`` and the
  moments ``(r, n)``.

  Attributes:
    shape: the parameter's shape.
    batch_axes: the axes that stack matrices, in the parameter's order.
    row_axes: the axes of the view's rows, in the parameter's order.
    col_axes: the axes of the view's columns.
    side: 0 if the view's rows are projected, 1 if its columns are.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]
  side: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """The leading shape of every state array of this parameter."""
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def view_shape(self) -> tuple[int, int]:
    return _size(self.shape, self.row_axes), _size(self.shape, self.col_axes)

  @property
  def m(self) -> int:
    """The projected side: the basis is ``(m, r)``."""
    return self.view_shape[self.side]

  @property
  def n(self) -> int:
    """The other side: the moments are ``(r, n)``."""
    return self.view_shape[1 - self.side]

  @property
  def _perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.row_axes + self.col_axes

  def to_views(self, x: jax.Array) -> jax.Array:
    """The parameter as ``(N, a, b)`` views, ``N`` = :attr:`num_matrices`.

    A reshape only (no copy) when the batch axes lead and each matrix group
    is contiguous and in order, as for ``(L, m, n)`` stacks. View ``j`` is
    matrix ``j`` of the batch axes flattened in row-major order, the order
    of :meth:`flatten_batch`.
    """
    if self._perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, self._perm)
    return x.reshape(-1, *self.view_shape)

  def from_views(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_views`."""
    x = x.reshape(tuple(self.shape[a] for a in self._perm))
    if self._perm != tuple(range(len(self.shape))):
      inverse = tuple(self._perm.index(a) for a in range(len(self.shape)))
      x = jnp.transpose(x, inverse)
    return x

  def flatten_batch(self, x: jax.Array) -> jax.Array:
    """A state array ``batch_shape + s`` as ``(N,) + s``."""
    return x.reshape(-1, *x.shape[len(self.batch_axes) :])

  def unflatten_batch(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`flatten_batch`."""
    return x.reshape(*self.batch_shape, *x.shape[1:])

  def canonical(self, view: jax.Array) -> jax.Array:
    """One view as the canonical ``(m, n)`` matrix."""
    return view if self.side == 0 else view.T

  def project(
    self, basis: jax.Array, view: jax.Array, dtype: Any = None
  ) -> jax.Array:
    """``S^T G`` ``(..., r, n)`` from (a stack of) views, in float32.

    The operands are cast to ``dtype`` first when it is given (bfloat16
    products with float32 accumulation); the view is never transposed.
    """
    spec = "...mr,...mn->...rn" if self.side == 0 else "...mr,...nm->...rn"
    if dtype is not None:
      basis, view = basis.astype(dtype), view.astype(dtype)
    return jnp.einsum(spec, basis, view, preferred_element_type=jnp.float32)

  def expand(
    self, basis: jax.Array, low: jax.Array, dtype: Any = None
  ) -> jax.Array:
    """``S X`` for ``X`` ``(r, n)``, in the view's layout, in float32."""
    spec = "mr,rn->mn" if self.side == 0 else "mr,rn->nm"
    if dtype is not None:
      basis, low = basis.astype(dtype), low.astype(dtype)
    return jnp.einsum(spec, basis, low, preferred_element_type=jnp.float32)

  def column_sum(self, x: jax.Array) -> jax.Array:
    """Sums a view over the projected side: one value per column of ``G``."""
    return jnp.sum(x, axis=self.side)

  def scale_columns(self, view: jax.Array, scales: jax.Array) -> jax.Array:
    """Multiplies column ``i`` of ``G`` (in the view's layout) by
    ``scales[i]``."""
    return view * (scales[None, :] if self.side == 0 else scales[:, None])


def _as_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


def _size(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  return math.prod(shape[a] for a in axes)


def matrix_layout(
  name: str,
  shape: tuple[int, ...],
  dimension_numbers: MatrixDimensionNumbers | None = None,
  *,
  projected_side: ProjectedSide = "shorter",
  projected_size: int | None = None,
) -> MatrixLayout:
  """The layout of parameter ``name`` of ``shape``.

  The projected side is the shorter (or, with ``projected_side="longer"``,
  the longer) of the two matrix sides; the reduction side when both have the
  same size. ``projected_size`` instead picks the side of that size, as a
  basis of ``(m, r)`` determines it.

  Raises:
    ValueError: for fewer than two axes, or axes that overlap.
  """
  dims = dimension_numbers or MatrixDimensionNumbers()
  if len(shape) < 2:
    raise ValueError(
      f"grassjax: parameter {name} with shape {shape} is masked in for"
      " low-rank projection but is not a matrix (ndim < 2)."
    )
  red = _as_axes(dims.reduction_axis, len(shape))
  out = _as_axes(dims.output_axis, len(shape))
  if not red or not out or len(set(red + out)) != len(red + out):
    raise ValueError(
      f"grassjax: parameter {name} with shape {shape}: reduction axes {red}"
      f" and output axes {out} must be non-empty and disjoint ({dims})."
    )
  red_size, out_size = _size(shape, red), _size(shape, out)
  if projected_size is not None:
    projected = red if red_size == projected_size else out
  elif projected_side == "shorter":
    projected = red if red_size <= out_size else out
  else:
    projected = red if red_size >= out_size else out
  batch = tuple(a for a in range(len(shape)) if a not in red + out)
  rows, cols = (red, out) if min(red) < min(out) else (out, red)
  side = 0 if projected == rows else 1
  return MatrixLayout(tuple(shape), batch, rows, cols, side)


def per_leaf(spec: Any, tree: Any, name: str) -> list:
  """Flattens an optax-style per-parameter spec (value, pytree or callable).

  ``None`` or one :class:`MatrixDimensionNumbers` applies to every leaf; a
  lone bool only to a one-leaf tree.
  """
  treedef: PyTreeDef = jax.tree.structure(tree)
  if callable(spec):
    spec = spec(tree)
  single = isinstance(spec, (bool, jax.Array, np.ndarray, np.bool_))
  if single and treedef.num_leaves > 1:
    # Also what optax.inject_hyperparams hands over for a callable it was not
    # told is static: it calls it as a schedule, with the step count.
    raise ValueError(
      f"grassjax: `{name}` is {spec!r}, one value for {treedef.num_leaves}"
      " parameters: give a pytree or a callable of the parameters (with"
      " optax.inject_hyperparams, name a callable in static_args)."
    )
  if spec is None or isinstance(spec, (bool, MatrixDimensionNumbers)):
    return [spec] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as err:
    given = jax.tree.structure(
      spec, is_leaf=lambda x: x is None or isinstance(x, MatrixDimensionNumbers)
    )
    raise ValueError(
      f"grassjax: `{name}` does not match the structure of the parameters:"
      f" expected {treedef}, got {given}."
    ) from err


def _mask_value(name: str, value: Any) -> bool:
  if isinstance(value, (bool, type(None))):
    return bool(value)
  if hasattr(value, "dtype") and value.dtype == bool and jnp.ndim(value) == 0:
    return bool(value)
  raise ValueError(
    f"grassjax: projection_mask leaf for parameter {name} must be a bool, got"
    f" {value!r}."
  )


def projection_layouts(
  params: optax.Params,
  *,
  rank: int,
  projection_mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  projected_side: ProjectedSide = "shorter",
) -> list[MatrixLayout | None]:
  """The layout of each leaf of ``params`` that is projected, else ``None``.

  Without a ``projection_mask``, a leaf is projected when it is real, has at
  least two axes and both its matrix sides exceed ``rank``. With one, the
  masked-in leaves are projected, and each must have ``rank`` at most its
  projected side.

  Raises:
    ValueError: naming the parameter path and shape, for a mask or dimension
      numbers that do not fit the parameters, or a rank too large.
  """
  masks = per_leaf(projection_mask, params, "projection_mask")
  dims_list = per_leaf(dimension_numbers, params, "dimension_numbers")
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  layouts = []
  for (path, leaf), masked_in, dims in zip(
    leaves, masks, dims_list, strict=True
  ):
    name, shape = jax.tree_util.keystr(path), tuple(jnp.shape(leaf))
    layout = None
    if projection_mask is None:
      real = not jnp.issubdtype(_checks.leaf_dtype(leaf), jnp.complexfloating)
      if real and len(shape) >= 2:
        layout = matrix_layout(name, shape, dims, projected_side=projected_side)
        if min(layout.m, layout.n) <= rank:
          layout = None
    elif _mask_value(name, masked_in):
      layout = matrix_layout(name, shape, dims, projected_side=projected_side)
      if min(layout.m, layout.n) < rank:
        raise ValueError(
          f"grassjax: parameter {name} with shape {shape} has matrix"
          f" {layout.m} x {layout.n}; rank {rank} exceeds its smaller side."
        )
    layouts.append(layout)
  return layouts


def layouts_from_bases(
  tree: Any, bases: Sequence[Any], dimension_numbers: DimensionNumbersOrFn
) -> list[MatrixLayout | None]:
  """The layouts of the leaves of ``tree`` that have a basis in ``bases``.

  ``bases`` is the flat list of a state's bases (``optax.MaskedNode`` for the
  leaves that are not projected), in the order of ``tree``'s leaves; each
  basis's ``(m, r)`` shape fixes the projected side.

  Raises:
    ValueError: naming the leaf, when a basis does not fit its leaf (the
      tree and the state do not belong together).
  """
  dims_list = per_leaf(dimension_numbers, tree, "dimension_numbers")
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if len(bases) != len(leaves):
    raise ValueError(
      f"grassjax: the tree has {len(leaves)} leaves but the optimizer state"
      f" has {len(bases)} bases."
    )
  layouts: list[MatrixLayout | None] = []
  for (path, leaf), basis, dims in zip(leaves, bases, dims_list, strict=True):
    if isinstance(basis, optax.MaskedNode):
      layouts.append(None)
      continue
    name, shape = jax.tree_util.keystr(path), tuple(jnp.shape(leaf))
    layout = matrix_layout(name, shape, dims, projected_size=basis.shape[-2])
    if basis.shape[:-1] != (*layout.batch_shape, layout.m):
      raise ValueError(
        f"grassjax: leaf {name} with shape {shape} does not fit the optimizer"
        f" state's basis of shape {basis.shape}."
      )
    layouts.append(layout)
  return layouts


def for_each_matrix(
  fn: Callable[..., tuple],
  carried: tuple[Any, ...],
  read: tuple[Any, ...] = (),
) -> tuple[Any, ...]:
  """``carried[k][j] = fn(*carried[:][j], *read[:][j])[k]`` for every ``j``.

  Each entry is an array or a pytree of arrays (a quantized moment) with the
  stack's ``N`` matrices along the first axis of every leaf; ``None``
  entries are passed through as ``None``. The matrices are visited one at a
  time in a ``fori_loop`` whose carry is updated slice by slice in place: the
  intermediates of ``fn`` exist for one matrix (``vmap`` would hold them for
  the whole stack), and an output may overwrite the input it replaces.

  Slice ``j`` of each array must belong to the same matrix: the state arrays
  of a parameter keep its batch axes in front in the parameter's order, which
  is the order :meth:`MatrixLayout.to_views` flattens them in.
  """
  size = jax.tree.leaves(carried)[0].shape[0]

  def at(x, j):
    return jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, False), x
    )

  if size == 1:  # no loop to compile
    outs = fn(*(jax.tree.map(lambda a: a[0], x) for x in carried + read))
    return tuple(jax.tree.map(lambda a: a[None], o) for o in outs)

  def body(j, stacks):
    outs = fn(*(at(x, j) for x in stacks + read))
    return tuple(
      jax.tree.map(
        lambda a, o: jax.lax.dynamic_update_index_in_dim(a, o, j, 0), x, o
      )
      for x, o in zip(stacks, outs, strict=True)
    )

  return jax.lax.fori_loop(0, size, body, carried)
