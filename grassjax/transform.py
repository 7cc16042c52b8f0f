"""Adam inside a moving low-rank subspace, with moment rotation and recovery scaling.

:func:`scale_by_subspace_adam` is the building block of every optimizer in
grassjax. For each projected parameter it keeps an orthonormal basis ``S``
``(m, r)`` and runs Adam on the projected gradient ``S^T G`` ``(r, n)``; a
:class:`~grassjax.subspace.SubspaceRule` moves ``S`` every ``update_interval``
steps. The two components of "Principled Randomized Exploration of Gradient
Subspaces for Efficient LLM Training" (Appendix A) are switches:

* ``adaptive_optimizer`` (AO): rotate Adam's moments onto the new basis.
* ``recovery_scaling`` (RS): add back the part of the gradient outside the
  subspace, rescaled column by column, with a growth limiter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grassjax import subspace as subspace_lib

# Guards the ratios of recovery scaling against zero denominators.
_RS_EPS = 1e-8


def _rs_cancellation_tol(basis_dtype: jax.typing.DTypeLike) -> float:
  """Below this share of ``sum_i phi_i^2 ||G[:, i]||^2``, ``||Lambda||^2`` is recomputed.

  ``||G||^2 - ||S^T G||^2`` is off by about the basis's orthonormality error
  times ``||G||^2`` (a few ulps of the dtype the basis is stored in); above
  this share that is at most a few percent of ``||Lambda||^2``.
  """
  return max(1e-3, 16 * float(jnp.finfo(basis_dtype).eps))


class MatrixDimensionNumbers(NamedTuple):
  """Which axes of a parameter form the matrix that is projected.

  Same convention as ``optax.contrib.MuonDimensionNumbers``: the matrix maps
  the ``reduction_axis`` (inputs) to the ``output_axis`` (outputs); each may
  be one axis or several (flattened in order). Every other axis is a *batch*
  axis: the parameter is a stack of independent matrices (scanned layers),
  each with its own basis, moments and recovery norm, processed one matrix
  at a time in a loop (so the step's intermediates exist for one matrix, not
  the whole stack). The update is computed in the parameter's own layout;
  only batch axes that do not lead, or matrix axes out of order, cost a
  transposed copy.

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


class SubspaceAdamState(NamedTuple):
  """State of :func:`scale_by_subspace_adam`.

  For a projected parameter with batch shape ``B`` (stacked matrices) and a
  canonical ``(m, n)`` matrix, ``m <= n``, rank ``r``:

  Attributes:
    count: ``int32`` scalar, the number of steps taken. Like optax's counts it
      saturates at ``2^31 - 1``, a prime: from there on (68 years at a step a
      second) no basis moves, except with ``update_interval = 1``, and then
      with the same key every step.
    key: the PRNG key the per-leaf, per-step keys are folded from, stored as
      raw ``uint32`` key data; ``None`` when none was given.
    mu: first moments: ``B + (r, n)`` for projected leaves, the parameter's
      shape otherwise (complex for a complex parameter).
    nu: second moments, same shapes as ``mu``, always real.
    basis: ``B + (m, r)`` orthonormal bases; ``optax.MaskedNode()`` for leaves
      that are not projected.
    recovery_norm: ``B``-shaped ``float32`` norm of the last applied recovery
      term (``||Lambda_{t-1}||_F``); ``optax.MaskedNode()`` for leaves that are
      not projected or when recovery scaling is off.
  """

  count: jax.Array
  key: jax.Array | None
  mu: optax.Updates
  nu: optax.Updates
  basis: optax.Updates
  recovery_norm: optax.Updates


@dataclasses.dataclass(frozen=True)
class _MatrixLayout:
  """Static description of how one parameter is seen as a stack of matrices.

  Each matrix is handled in the parameter's own memory order, as a *view*
  ``(a, b)``: the group of matrix axes that comes first in the parameter's
  layout gives the view's rows. The projected (shorter) side is the view's
  axis ``side``; with ``side == 1`` every product contracts the view's second
  axis, so a tall matrix is never transposed.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  row_axes: tuple[int, ...]  # the view's rows, in the parameter's order
  col_axes: tuple[int, ...]  # the view's columns
  side: int  # 0: the view's rows are projected; 1: its columns

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

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
    """The parameter as ``(N, a, b)`` views, ``N`` = the batch size.

    A reshape only (no copy) when the batch axes lead and each matrix group
    is contiguous and in order, as for ``(L, m, n)`` stacks.
    """
    if self._perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, self._perm)
    return x.reshape(-1, *self.view_shape)

  def from_views(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_views`."""
    x = x.reshape(tuple(self.shape[a] for a in self._perm))
    if self._perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, tuple(self._perm.index(a) for a in range(len(self.shape))))
    return x

  def canonical(self, view: jax.Array) -> jax.Array:
    """One view as the canonical ``(m, n)`` matrix (transposed when ``side == 1``)."""
    return view if self.side == 0 else view.T

  def project(self, basis: jax.Array, view: jax.Array) -> jax.Array:
    """``S^T G`` ``(..., r, n)`` from a (stack of) view(s), without transposing it."""
    spec = "...mr,...mn->...rn" if self.side == 0 else "...mr,...nm->...rn"
    return jnp.einsum(spec, basis, view, preferred_element_type=jnp.float32)

  def expand(self, basis: jax.Array, low: jax.Array) -> jax.Array:
    """``S X`` for ``X`` ``(r, n)``, in the view's layout."""
    spec = "mr,rn->mn" if self.side == 0 else "mr,rn->nm"
    return jnp.einsum(spec, basis, low)

  def column_sum(self, x: jax.Array) -> jax.Array:
    """Sums a view over the projected side: one value per column of ``G``."""
    return jnp.sum(x, axis=self.side)

  def scale_columns(self, view: jax.Array, scales: jax.Array) -> jax.Array:
    """Multiplies column ``i`` of ``G`` (in the view's layout) by ``scales[i]``."""
    return view * (scales[None, :] if self.side == 0 else scales[:, None])


def _as_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


def _size(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  return math.prod(shape[a] for a in axes)


def _layout(
  path: str, shape: tuple[int, ...], dims: MatrixDimensionNumbers
) -> _MatrixLayout:
  if len(shape) < 2:
    raise ValueError(
      f"grassjax: parameter {path} with shape {shape} is masked in for low-rank"
      " projection but is not a matrix (ndim < 2)."
    )
  red = _as_axes(dims.reduction_axis, len(shape))
  out = _as_axes(dims.output_axis, len(shape))
  if not red or not out or set(red) & set(out) or len(set(red + out)) != len(red + out):
    raise ValueError(
      f"grassjax: parameter {path} with shape {shape}: reduction axes {red} and"
      f" output axes {out} must be non-empty and disjoint ({dims})."
    )
  batch = tuple(a for a in range(len(shape)) if a not in red + out)
  projected = red if _size(shape, red) <= _size(shape, out) else out
  rows, cols = (red, out) if min(red) < min(out) else (out, red)
  return _MatrixLayout(tuple(shape), batch, rows, cols, 0 if projected == rows else 1)


def _resolve_tree(spec, params, name: str, is_leaf=None) -> list:
  """Flattens an optax-style per-parameter spec (value, pytree or callable)."""
  treedef = jax.tree.structure(params)
  if callable(spec):
    spec = spec(params)
  if spec is None or isinstance(spec, (bool, MatrixDimensionNumbers)):
    return [spec] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"grassjax: `{name}` does not match the structure of the parameters:"
      f" expected {treedef}, got {jax.tree.structure(spec, is_leaf=is_leaf)}."
    ) from err


def _update_interval(value) -> int | jax.Array:
  """``update_interval`` as an int, or as the integer scalar array it may be.

  ``optax.inject_hyperparams`` makes an array of an int, traced under jit; the
  step predicate takes it as it is.
  """
  if not (
    isinstance(value, jax.Array)
    and value.ndim == 0
    and jnp.issubdtype(value.dtype, jnp.integer)
  ):
    return subspace_lib._positive_int("update_interval", value)
  try:
    known = int(value)
  except TypeError:  # traced
    return value
  if known < 1:
    raise ValueError(f"grassjax: update_interval must be >= 1, got {value!r}.")
  return value


def _as_dtype(name: str, value: jax.typing.DTypeLike | None) -> jnp.dtype:
  """``value`` as a dtype, float32 for ``None``.

  An array is refused: ``optax.inject_hyperparams`` takes a dtype such as
  ``jnp.bfloat16`` (a callable) for a schedule unless it is static, and would
  hand over ``jnp.bfloat16(count)`` cast to float32.
  """
  if value is None:
    return jnp.dtype(jnp.float32)
  if not isinstance(value, (jax.Array, np.ndarray)):
    try:
      return jnp.dtype(value)
    except TypeError:
      pass
  raise TypeError(
    f"grassjax: {name} must be a dtype, got {value!r} (with"
    " optax.inject_hyperparams, name it in static_args)."
  )


def _check_dtype(name: str, shape: tuple[int, ...], dtype, projected: bool) -> None:
  """Refuses what the step would silently get wrong.

  Integer (and boolean) updates would be cast back to their dtype, which
  truncates Adam's direction to zero; a complex matrix has no real basis.
  """
  if jnp.issubdtype(dtype, jnp.floating):
    return
  if jnp.issubdtype(dtype, jnp.complexfloating):
    if projected:
      raise ValueError(
        f"grassjax: parameter {name} with shape {shape} and dtype {dtype} is"
        " masked in for low-rank projection, which needs a real dtype; mask it"
        " out (it then gets Adam with |g|^2, as optax.adam)."
      )
    return
  raise ValueError(
    f"grassjax: parameter {name} with shape {shape} has dtype {dtype}; only"
    " floating-point (or, unprojected, complex) parameters can be trained."
  )


def _leaf_dtype(leaf) -> jnp.dtype:
  """A parameter's dtype, also for Python scalars and ``ShapeDtypeStruct``s."""
  return jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def _split_key(key) -> tuple[jax.Array, Any]:
  """A key's raw ``uint32`` data and its implementation (``None``: the default).

  The state keeps the raw data (plain arrays checkpoint everywhere); the
  implementation rewraps it on every step, so any ``jax.random.key(seed,
  impl=...)`` works.

  Raises:
    TypeError: unless ``key`` is one typed key (``jax.random.key``) or one raw
      key of the default implementation (``jax.random.PRNGKey``).
  """
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if jnp.shape(key) == ():
      return jax.random.key_data(key), jax.random.key_impl(key)
  elif dtype == jnp.uint32:
    try:
      one = jnp.shape(jax.random.wrap_key_data(key)) == ()
    except (TypeError, ValueError):
      one = False
    if one:
      return key, None
  raise TypeError(
    "grassjax: key must be one PRNG key, from jax.random.key(seed) (any impl)"
    f" or jax.random.PRNGKey(seed); got {key!r}."
  )


def _adam_direction(mu, nu, count, b1, b2, eps):
  """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` (as optax)."""
  mu_hat = mu / (1 - b1**count).astype(mu.dtype)
  nu_hat = nu / (1 - b2**count).astype(nu.dtype)
  return mu_hat / (jnp.sqrt(nu_hat) + eps)


def _bias_correction(decay: jax.typing.ArrayLike, steps: jax.Array) -> jax.Array:
  """``1 - decay^steps`` in float32, accurate to rounding.

  ``V / c2 - (M / c1)^2`` cancels exactly after one step, so ``c`` must match
  the ``(1 - decay)`` the moments were accumulated with: ``1 - 0.999^t`` with
  0.999 rounded to float32 is off by 1.3e-5 relative, and that error would
  leave a spurious variance. ``-expm1(t log1p(-(1 - decay)))`` with ``1 -
  decay`` taken in Python's double precision is exact at ``t = 1``.
  """
  one_minus = 1.0 - decay  # double precision for a Python float
  return -jnp.expm1(steps * jnp.log1p(-jnp.asarray(one_minus, jnp.float32)))


def rotate_moments(
  rotation: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  steps: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Rotates Adam's moments onto a new basis (the adaptive optimizer, AO).

  With ``P = S_new^T S_old`` ``(r, r)``, the bias corrections of the moments as
  they stand, ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t`` (``t = steps`` already
  taken, ``t >= 1``), and squares taken elementwise:

      M' = P M
      V' = c2 | (P * P) (V / c2 - (M / c1)^2) + (P M / c1)^2 |

  Treating ``M / c1`` and ``V / c2`` as estimates of each coordinate's mean and
  second moment, the variance rotates with ``P * P`` and the squared rotated
  mean is added back. ``V'`` is never negative, and ``P = I`` leaves both
  moments unchanged. (Eq. (6) of the paper, read literally, shrinks ``V`` when
  the basis does not move and can turn it negative.)

  Args:
    rotation: ``P``, ``(r, r)``.
    mu: ``M``, ``(r, n)``.
    nu: ``V``, ``(r, n)``.
    b1: Adam's first decay rate.
    b2: Adam's second decay rate.
    steps: ``t``, the number of steps the moments have seen.

  Returns:
    ``(M', V')``, both ``(r, n)``.
  """
  c1 = _bias_correction(b1, steps)
  c2 = _bias_correction(b2, steps)
  mean = mu / c1
  variance = nu / c2 - jnp.square(mean)
  rotated_mean = rotation @ mean
  nu_new = c2 * jnp.abs(jnp.square(rotation) @ variance + jnp.square(rotated_mean))
  return rotated_mean * c1, nu_new


def scale_by_subspace_adam(
  subspace: subspace_lib.SubspaceRule,
  *,
  rank: int,
  update_interval: int | jax.Array = 200,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: float = 1.01,
  scale: jax.typing.ArrayLike = 1.0,
  scale_recovery: bool = True,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  key: jax.Array | None = None,
  mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  moment_dtype: jax.typing.DTypeLike | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam in a rank-``r`` subspace of each weight matrix's gradient.

  For a projected parameter, seen as a canonical ``(m, n)`` matrix ``G`` with
  ``m <= n`` (a matrix with ``m > n`` is handled as its transpose, so the
  shorter side is always projected), on step ``t`` (1-based):

  1. On update steps (``(t - 1) % update_interval == 0``) the basis moves:
     ``S_t = subspace.init(G_t)`` on the first step, ``S_t =
     subspace.update(S_{t-1}, G_t)`` later. With ``adaptive_optimizer`` the
     moments are then rotated by :func:`rotate_moments` with ``P = S_t^T
     S_{t-1}``; without it they are kept as they are (GaLore).
  2. Adam on the projected gradient ``G~ = S_t^T G_t`` ``(r, n)``:
     ``M = b1 M + (1 - b1) G~``, ``V = b2 V + (1 - b2) G~^2``,
     ``D = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)``.
  3. The update is ``scale * (S_t D + Lambda)``. With ``recovery_scaling``,
     ``Delta = G - S_t G~`` and, per column ``i``,
     ``phi_i = ||D[:, i]|| / (||G~[:, i]|| + 1e-8)``, ``Lambda[:, i] = phi_i
     Delta[:, i]``; if ``||Lambda|| / (||Lambda_{t-1}|| + 1e-8) > zeta`` (not on
     the first step), ``Lambda`` is rescaled to norm ``zeta (||Lambda_{t-1}|| +
     1e-8)``. The norm of the ``Lambda`` applied is kept for the next step.
     Without recovery scaling, ``Lambda = 0``.

  ``S_t D + Lambda`` is computed as ``S_t (D - c G~) + c G`` with ``c`` the
  column scales, and ``||Delta[:, i]||^2`` as ``||G[:, i]||^2 - ||G~[:, i]||^2``,
  so a step costs two products with ``S_t`` (``S_t^T G`` and ``S_t (...)``) and
  needs no ``(m, n)`` buffer beyond the gradient and the update. Where that
  difference is mostly rounding (``||Lambda||^2`` under 0.1% of ``sum_i phi_i^2
  ||G[:, i]||^2`` with float32 bases: ``G`` lies nearly in the subspace),
  ``||Lambda||`` is taken from the explicit ``Delta`` instead, at the price of
  a third product for those matrices only.

  Parameters that are not projected get plain Adam with the same ``b1, b2,
  eps``, not multiplied by ``scale``, computed in float32 at least (complex64
  for complex parameters, with ``|g|^2`` in ``V``) and cast back to the
  parameter's dtype, the moments stored in ``moment_dtype``. For float32 (or
  complex64) parameters and moments that is ``optax.scale_by_adam``; for
  bfloat16 ones it is ``optax.scale_by_adam`` on the float32 gradient, rounded
  (optax itself would keep and compute bfloat16 moments). Integer parameters,
  and complex ones masked in for projection, are refused.

  The step is always the same compiled program: the step predicate is a scalar,
  and the subspace update (an SVD, a QR, a geodesic) and the moment rotation
  sit behind ``jax.lax.switch``, so steps that do not update pay nothing for
  them. Random rules get their own key per parameter, per stacked matrix and
  per step, folded from ``key``, the parameter's index and the step count
  (which saturates at ``2^31 - 1``; see :class:`SubspaceAdamState`).

  Args:
    subspace: the subspace rule (see :mod:`grassjax.subspace`).
    rank: ``r``, the subspace dimension, ``>= 1``.
    update_interval: ``T``, steps between basis updates: an int, or an
      integer scalar array (it may be traced, as a hyperparameter of
      ``optax.inject_hyperparams``).
    adaptive_optimizer: rotate Adam's moments onto each new basis (AO).
    recovery_scaling: add the rescaled out-of-subspace residual (RS).
    zeta: growth limiter of the recovery term's norm, ``> 0``.
    scale: multiplies the low-rank update (GaLore's ``alpha``).
    scale_recovery: whether ``scale`` also multiplies ``Lambda`` (default).
      ``False`` leaves it unscaled, as the papers' published code does.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``, added outside the square root.
    key: one PRNG key, ``jax.random.key(seed)`` (any ``impl``) or
      ``jax.random.PRNGKey(seed)``; required by random rules.
    mask: which parameters are projected: a pytree of bools matching the
      parameters, or a callable of the parameters returning one. Default:
      every real parameter with ``ndim >= 2`` whose two matrix sizes both
      exceed ``rank``. A masked-in parameter must be real, with ``min(m, n) >=
      rank``.
    dimension_numbers: which axes form the matrix
      (:class:`MatrixDimensionNumbers`): one for all parameters, a pytree of
      them (``None`` leaves take the default), or a callable of the parameters.
      Default: the last two axes, leading axes stacked.
    moment_dtype: dtype of ``mu`` and ``nu``, whatever the parameters' dtype;
      ``None`` means float32 (bfloat16 halves them).
    basis_dtype: dtype in which the bases are stored; ``None`` means float32.
      The step computes in float32 whatever it is; bfloat16 halves the bases
      at the price of orthonormality to about ``4e-3``.
    stagger: spread the update steps of the projected parameters evenly over
      the interval (parameter ``i`` of ``k`` updates when ``(t - 1 + i T // k)
      % T == 0``), so a step never pays for all subspace updates at once. All
      bases are still made on the first step.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`SubspaceAdamState`.

  Raises:
    ValueError: on a bad configuration or parameter dtype (named parameter path,
      shape and dtype).
    TypeError: if ``subspace`` is not a :class:`~grassjax.SubspaceRule` or
      ``key`` not a PRNG key.
  """
  if not isinstance(subspace, subspace_lib.SubspaceRule):
    raise TypeError(
      "grassjax: subspace must be a grassjax.SubspaceRule, such as"
      f" grassjax.subspace.svd(); got {subspace!r}."
    )
  rank = subspace_lib._positive_int("rank", rank)
  update_interval = _update_interval(update_interval)
  if isinstance(zeta, (int, float)) and not zeta > 0:
    raise ValueError(f"grassjax: zeta must be > 0, got {zeta!r}.")
  moment_dtype = _as_dtype("moment_dtype", moment_dtype)
  basis_dtype = _as_dtype("basis_dtype", basis_dtype)
  if subspace.needs_key and key is None:
    raise ValueError(
      f"grassjax: the {subspace.name!r} subspace rule is random and needs a"
      " PRNG key: pass key=jax.random.key(seed)."
    )
  key_data, key_impl = (None, None) if key is None else _split_key(key)

  def init_fn(params: optax.Params) -> SubspaceAdamState:
    treedef = jax.tree.structure(params)
    masks = _resolve_tree(mask, params, "mask")
    dims_list = _resolve_tree(
      dimension_numbers,
      params,
      "dimension_numbers",
      is_leaf=lambda x: x is None or isinstance(x, MatrixDimensionNumbers),
    )
    mu, nu, basis, rnorm = [], [], [], []
    for (path, leaf), masked_in, dims in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], masks, dims_list, strict=True
    ):
      name, shape = jax.tree_util.keystr(path), jnp.shape(leaf)
      dtype = _leaf_dtype(leaf)
      dims = dims or MatrixDimensionNumbers()
      if mask is None:
        real = not jnp.issubdtype(dtype, jnp.complexfloating)
        layout = _layout(name, shape, dims) if real and len(shape) >= 2 else None
        if layout is not None and min(layout.m, layout.n) <= rank:
          layout = None
      elif not isinstance(masked_in, (bool, type(None))) and not (
        hasattr(masked_in, "dtype")
        and masked_in.dtype == bool
        and jnp.ndim(masked_in) == 0
      ):
        raise ValueError(
          f"grassjax: mask leaf for parameter {name} must be a bool, got {masked_in!r}."
        )
      else:
        layout = _layout(name, shape, dims) if masked_in else None
        if layout is not None and layout.m < rank:
          raise ValueError(
            f"grassjax: parameter {name} with shape {shape} has matrix"
            f" {layout.m} x {layout.n}; rank {rank} exceeds its smaller side"
            f" {layout.m}."
          )
      _check_dtype(name, shape, dtype, layout is not None)
      if layout is None:
        # A complex parameter's mean is complex; its second moment |g|^2 is real.
        mu_dtype = moment_dtype
        if jnp.issubdtype(dtype, jnp.complexfloating):
          mu_dtype = jnp.promote_types(moment_dtype, jnp.complex64)
        mu.append(jnp.zeros(shape, mu_dtype))
        nu.append(jnp.zeros(shape, moment_dtype))
        basis.append(optax.MaskedNode())
        rnorm.append(optax.MaskedNode())
      else:
        batch = layout.batch_shape
        mu.append(jnp.zeros((*batch, rank, layout.n), moment_dtype))
        nu.append(jnp.zeros((*batch, rank, layout.n), moment_dtype))
        basis.append(jnp.zeros((*batch, layout.m, rank), basis_dtype))
        rnorm.append(
          jnp.zeros(batch, jnp.float32) if recovery_scaling else optax.MaskedNode()
        )
    return SubspaceAdamState(
      count=jnp.zeros([], jnp.int32),
      # A private copy, safe to donate with the state.
      key=None if key_data is None else jnp.array(key_data, copy=True),
      mu=treedef.unflatten(mu),
      nu=treedef.unflatten(nu),
      basis=treedef.unflatten(basis),
      recovery_norm=treedef.unflatten(rnorm),
    )

  def project_one(layout, branch, count, t, g, mu, nu, basis, rnorm, key):
    """The step for one projected matrix, ``g`` a view (see ``_MatrixLayout``)."""

    stored = basis.dtype
    basis = basis.astype(jnp.float32)

    def keep():
      return basis, mu, nu

    def first():
      grad = layout.canonical(g).astype(jnp.float32)
      return subspace.init(grad, rank, key).astype(stored).astype(jnp.float32), mu, nu

    def move():
      grad = layout.canonical(g).astype(jnp.float32)
      # Rounded to the stored dtype first, so the moments rotate onto the
      # basis that is kept.
      new_basis = subspace.update(basis, grad, key).astype(stored).astype(jnp.float32)
      if not adaptive_optimizer:
        return new_basis, mu, nu
      new_mu, new_nu = rotate_moments(
        new_basis.T @ basis,
        mu.astype(jnp.float32),
        nu.astype(jnp.float32),
        b1,
        b2,
        count,
      )
      return new_basis, new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)

    basis, mu, nu = jax.lax.switch(branch, (keep, first, move))
    g_low = layout.project(basis, g)
    mu = ((1 - b1) * g_low + b1 * mu.astype(jnp.float32)).astype(mu.dtype)
    nu = ((1 - b2) * jnp.square(g_low) + b2 * nu.astype(jnp.float32)).astype(nu.dtype)
    direction = _adam_direction(
      mu.astype(jnp.float32), nu.astype(jnp.float32), t, b1, b2, eps
    )

    if not recovery_scaling:
      update = layout.expand(basis, scale * direction)
      return update.astype(g.dtype), mu, nu, basis.astype(stored), rnorm

    g_low_sq = jnp.sum(jnp.square(g_low), axis=0)
    phi = jnp.linalg.norm(direction, axis=0) / (jnp.sqrt(g_low_sq) + _RS_EPS)
    weights = jnp.square(phi)
    # ||Delta[:, i]||^2 = ||G[:, i]||^2 - ||G~[:, i]||^2 (S has orthonormal
    # columns): the limiter needs no third (m, n) product.
    g_sq = layout.column_sum(jnp.square(g.astype(jnp.float32)))
    lam_sq = jnp.sum(weights * jnp.maximum(g_sq - g_low_sq, 0.0))

    def explicit_lam_sq():
      residual = g.astype(jnp.float32) - layout.expand(basis, g_low)
      return jnp.sum(weights * layout.column_sum(jnp.square(residual)))

    # When G lies (nearly) in span(S) the difference is rounding noise of
    # ||G||^2, far above the residual it stands for: form Delta instead.
    lam_sq = jax.lax.cond(
      lam_sq < _rs_cancellation_tol(stored) * jnp.sum(weights * g_sq),
      explicit_lam_sq,
      lambda: lam_sq,
    )
    lam_norm = jnp.sqrt(lam_sq)
    cap = zeta * (rnorm + _RS_EPS)
    limit = (count > 0) & (lam_norm > cap)
    factor = jnp.where(limit, cap / jnp.where(limit, lam_norm, 1.0), 1.0)
    col_scale = phi * factor * (scale if scale_recovery else 1.0)
    update = layout.expand(basis, scale * direction - col_scale * g_low)
    update = update + layout.scale_columns(g.astype(jnp.float32), col_scale)
    return update.astype(g.dtype), mu, nu, basis.astype(stored), lam_norm * factor

  def project_stack(layout, branch, count, t, g, mu, nu, basis, rnorm, keys):
    """``project_one`` on every matrix of a projected leaf, one at a time.

    A ``fori_loop`` over the ``N`` stacked matrices, whose carry holds the
    gradient views and the state and is updated in place slice by slice: the
    step's intermediates exist for one matrix at a time (``vmap`` would hold
    each of them for the whole stack), and the update is written over the
    gradient it replaces. The state arrays have the leaf's batch shape in
    front; ``rnorm`` may be ``None``; ``keys`` is ``(N, ...)`` or ``None``.
    """
    batch = layout.batch_shape
    step = functools.partial(project_one, layout, branch, count, t)
    carry = (
      layout.to_views(g),
      *(
        x if x is None else x.reshape(-1, *x.shape[len(batch) :])
        for x in (mu, nu, basis, rnorm)
      ),
    )
    if carry[0].shape[0] == 1:
      outs = tuple(
        None if x is None else x[None]
        for x in step(*(None if x is None else x[0] for x in (*carry, keys)))
      )
    else:

      def body(j, carry):
        pick = functools.partial(jax.lax.dynamic_index_in_dim, index=j, keepdims=False)
        outs = step(*(None if x is None else pick(x) for x in (*carry, keys)))
        return tuple(
          None if x is None else jax.lax.dynamic_update_index_in_dim(x, o, j, 0)
          for x, o in zip(carry, outs, strict=True)
        )

      outs = jax.lax.fori_loop(0, carry[0].shape[0], body, carry)
    update, *state = outs
    return layout.from_views(update), *(
      x if x is None else x.reshape(*batch, *x.shape[1:]) for x in state
    )

  def update_fn(updates, state, params=None, *, layer=None):
    """One step; see the docstring of the enclosing function.

    ``layer=(index, size)`` updates one slice of stacked parameters, for a
    per-layer (fused) update: every leaf of ``updates`` and of the state's
    per-parameter trees is slice ``index`` (a traced int) of a leaf stacked
    along a leading axis of ``size``, and the step equals that slice of the
    whole-stack step, PRNG keys included. The returned count is the step's
    count (each slice's call returns the same).
    """
    del params
    count = state.count
    t = optax.safe_increment(count)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    mus, nus, bases, rnorms = (
      treedef.flatten_up_to(tree)
      for tree in (state.mu, state.nu, state.basis, state.recovery_norm)
    )
    dims_list = _resolve_tree(
      dimension_numbers,
      updates,
      "dimension_numbers",
      is_leaf=lambda x: x is None or isinstance(x, MatrixDimensionNumbers),
    )
    projected = [i for i, b in enumerate(bases) if not isinstance(b, optax.MaskedNode)]
    offsets = {
      i: (j * update_interval) // len(projected) if stagger else 0
      for j, i in enumerate(projected)
    }

    out_updates, out_mu, out_nu, out_basis, out_rnorm = [], [], [], [], []
    for i, ((path, g), mu, nu, basis, rnorm, dims) in enumerate(
      zip(leaves_with_path, mus, nus, bases, rnorms, dims_list, strict=True)
    ):
      name = jax.tree_util.keystr(path)
      _check_dtype(name, g.shape, g.dtype, not isinstance(basis, optax.MaskedNode))
      if isinstance(basis, optax.MaskedNode):
        # In float32 at least, as the projected leaves: a bfloat16 gradient
        # would otherwise round (1 - b1) g and g^2 before they are accumulated.
        g_up = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        new_mu = (1 - b1) * g_up + b1 * mu.astype(g_up.dtype)
        g_sq = jnp.square(g_up) if jnp.isrealobj(g_up) else (g_up.conj() * g_up).real
        new_nu = (1 - b2) * g_sq + b2 * nu.astype(g_sq.dtype)
        direction = _adam_direction(new_mu, new_nu, t, b1, b2, eps)
        out_updates.append(direction.astype(g.dtype))
        out_mu.append(new_mu.astype(mu.dtype))
        out_nu.append(new_nu.astype(nu.dtype))
        out_basis.append(basis)
        out_rnorm.append(rnorm)
        continue
      layout = _layout(name, g.shape, dims or MatrixDimensionNumbers())
      branch = jnp.where(
        count == 0, 1, jnp.where((count + offsets[i]) % update_interval == 0, 2, 0)
      )
      if state.key is None:
        keys = None
      else:
        base_key = jax.random.wrap_key_data(state.key, impl=key_impl)
        leaf_key = jax.random.fold_in(jax.random.fold_in(base_key, i), count)
        size = math.prod(layout.batch_shape)
        if layer is None:
          keys = jax.random.split(leaf_key, size)
        else:  # the keys of the whole stack, and this slice's share of them
          index, layers = layer
          keys = jax.random.split(leaf_key, layers * size).reshape(layers, size)
          keys = jax.lax.dynamic_index_in_dim(keys, index, keepdims=False)
      has_rnorm = not isinstance(rnorm, optax.MaskedNode)
      update, mu, nu, basis, rnorm = project_stack(
        layout,
        branch,
        count,
        t,
        g,
        mu,
        nu,
        basis,
        rnorm if has_rnorm else None,
        keys,
      )
      out_updates.append(update)
      out_mu.append(mu)
      out_nu.append(nu)
      out_basis.append(basis)
      out_rnorm.append(rnorm if has_rnorm else optax.MaskedNode())
    unflat = treedef.unflatten
    return unflat(out_updates), state._replace(
      count=t,
      mu=unflat(out_mu),
      nu=unflat(out_nu),
      basis=unflat(out_basis),
      recovery_norm=unflat(out_rnorm),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
