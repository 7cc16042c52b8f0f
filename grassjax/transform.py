r"""Adam inside a moving low-rank subspace: :func:`scale_by_subspace_adam`.

The building block of every optimizer in grassjax. For each projected
parameter it keeps an orthonormal basis ``S`` ``(m, r)`` and runs Adam on the
projected gradient ``S^T G`` ``(r, n)``; a
:class:`~grassjax.subspace.SubspaceRule` moves ``S`` every
``update_interval`` steps. The two components of "Principled Randomized
Exploration of Gradient Subspaces for Efficient LLM Training" (under review,
Appendix A) are switches:

* ``adaptive_optimizer`` (AO): rotate Adam's moments onto the new basis
  (:func:`grassjax.moments.rotate_moments`).
* ``recovery_scaling`` (RS): add back the part of the gradient outside the
  subspace, rescaled column by column, with a growth limiter
  (:func:`grassjax.recovery.recovery_update`).

How each parameter is seen as a stack of matrices is
:mod:`grassjax.layout`'s; this module holds the state, the per-matrix step
and the loop over parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from grassjax import _checks, moments, recovery
from grassjax import layout as layout_lib
from grassjax import quantization as quant
from grassjax import subspace as subspace_lib
from grassjax.layout import (
  DimensionNumbersOrFn,
  MaskOrFn,
  MatrixLayout,
  ProjectedSide,
  PyTreeDef,
)


class SubspaceAdamState(NamedTuple):
  """State of :func:`scale_by_subspace_adam`.

  For a projected parameter with batch shape ``B`` (stacked matrices; see
  :class:`~grassjax.layout.MatrixLayout`), a canonical ``(m, n)`` matrix and
  rank ``r``:

  Attributes:
    count: ``int32`` scalar, the number of steps taken. Like optax's counts
      it saturates at ``2^31 - 1``, a prime: from there on (68 years at a
      step a second) no basis moves, except with ``update_interval = 1``,
      and then with the same key every step.
    key: the PRNG key the per-leaf, per-step keys are folded from, stored as
      raw ``uint32`` key data; ``None`` when none was given.
    mu: first moments: ``B + (r, n)`` for projected leaves, the parameter's
      shape otherwise (complex for a complex parameter).
    nu: second moments, same shapes as ``mu``, always real. Under 8-bit
      storage ``mu`` and ``nu`` are each a
      :class:`~grassjax.quantization.QuantizedArray` of two trees shaped as
      the parameters: ``codes`` (``uint8``, the moment's shape) and
      ``scales`` (one per block of the moment's last axis). Scalars and
      complex moments are not quantized: their ``codes`` entry is the
      float32 (complex64) moment and their ``scales`` entry
      ``optax.MaskedNode()``.
    basis: ``B + (m, r)`` orthonormal bases; ``optax.MaskedNode()`` for
      leaves that are not projected.
    recovery_norm: ``B``-shaped ``float32`` norm of the last applied
      recovery term (``||Lambda_{t-1}||_F``); ``optax.MaskedNode()`` for
      leaves that are not projected or when recovery scaling is off.
  """

  # Named as optax's states name theirs, over tuple.count.
  count: jax.Array  # type: ignore[assignment]
  key: jax.Array | None
  mu: optax.Updates
  nu: optax.Updates
  basis: optax.Updates
  recovery_norm: optax.Updates


class _StepConfig(NamedTuple):
  """The settings of the per-matrix step (static, or traced hyperparameters)."""

  rule: subspace_lib.SubspaceRule
  rank: int
  adaptive_optimizer: bool
  recovery_scaling: bool
  # Numbers, or traced scalars under optax.inject_hyperparams.
  zeta: Any
  scale: Any
  scale_recovery: bool
  b1: Any
  b2: Any
  eps: Any
  projection_dtype: jnp.dtype | None
  mu_storage: quant.MomentStorage
  nu_storage: quant.MomentStorage

  def load(self, mu, nu) -> tuple[jax.Array, jax.Array]:
    """The stored moments' values, in float32 at least."""
    return (
      quant.load(mu, self.mu_storage),
      quant.load(nu, self.nu_storage, second_moment=True),
    )

  def save(self, mu, nu, like_mu, like_nu, rounding=None) -> tuple[Any, Any]:
    """``mu`` and ``nu`` stored as ``like_mu`` and ``like_nu`` are; 8-bit
    codes of ``nu`` are rounded stochastically with ``rounding``."""
    return (
      quant.save(mu, like_mu, self.mu_storage),
      quant.save(
        nu, like_nu, self.nu_storage, second_moment=True, rounding=rounding
      ),
    )


# What a step does to a basis; ``lax.switch`` takes the branches in this order.
KEEP, INIT, MOVE = 0, 1, 2


def _basis_branch(count, offset, update_interval) -> jax.Array:
  """``INIT`` on the first step, ``MOVE`` every ``update_interval``, else
  ``KEEP``."""
  due = (count + offset) % update_interval == 0
  return jnp.where(count == 0, INIT, jnp.where(due, MOVE, KEEP))


def _next_basis(
  config: _StepConfig,
  layout: MatrixLayout,
  branch: jax.Array,
  count: jax.Array,
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  basis: jax.Array,
  key: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The float32 basis of this step, with the moments rotated onto it (AO).

  Each new basis is rounded to ``basis.dtype`` before the moments rotate, so
  they rotate onto the basis that is kept. A low-precision basis is made
  orthonormal in float32 before a rule moves it: its rounding error (``4e-3``
  for bfloat16) would otherwise read as a tangent direction.
  """
  stored = basis.dtype
  current = basis.astype(jnp.float32)

  def keep():
    return current, mu, nu

  def init():
    new = config.rule.init(
      layout.canonical(grad).astype(jnp.float32), config.rank, key
    )
    return new.astype(stored).astype(jnp.float32), mu, nu

  def move():
    start = current
    if stored != jnp.float32:
      start = subspace_lib.orthonormalize(current)
    new = config.rule.update(
      start, layout.canonical(grad).astype(jnp.float32), key
    )
    new = new.astype(stored).astype(jnp.float32)
    if not config.adaptive_optimizer:
      return new, mu, nu
    new_mu, new_nu = moments.rotate_moments(
      new.T @ current, *config.load(mu, nu), config.b1, config.b2, count
    )
    return new, *config.save(new_mu, new_nu, mu, nu)

  branches = {KEEP: keep, INIT: init, MOVE: move}
  return jax.lax.switch(branch, [branches[code] for code in sorted(branches)])


def _matrix_step(
  config: _StepConfig,
  layout: MatrixLayout,
  branch: jax.Array,
  count: jax.Array,
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  basis: jax.Array,
  recovery_norm: jax.Array | None,
  key: jax.Array | None,
  rounding: quant.StochasticRounding | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """One projected matrix's step: ``grad`` is a view (see ``MatrixLayout``).

  Returns the update (the view's shape and dtype) and the new ``mu``, ``nu``,
  ``basis`` and ``recovery_norm`` (``None`` without recovery scaling).
  ``rounding`` rounds 8-bit codes of ``nu`` (``None``: no 8-bit ``nu``).
  """
  c = config
  t = optax.safe_increment(count)
  basis_f32, mu, nu = _next_basis(
    c, layout, branch, count, grad, mu, nu, basis, key
  )
  grad_low = layout.project(basis_f32, grad, c.projection_dtype)
  old_mu, old_nu = c.load(mu, nu)
  mu, nu = c.save(
    (1 - c.b1) * grad_low + c.b1 * old_mu,
    (1 - c.b2) * jnp.square(grad_low) + c.b2 * old_nu,
    mu,
    nu,
    rounding,
  )
  # The direction of the moments as stored, so a resumed run repeats it.
  direction = moments.adam_direction(*c.load(mu, nu), t, c.b1, c.b2, c.eps)
  if c.recovery_scaling:
    assert recovery_norm is not None  # carried whenever recovery scaling is on
    update, recovery_norm = recovery.recovery_update(
      layout,
      grad,
      grad_low,
      direction,
      basis_f32,
      recovery_norm,
      count > 0,
      zeta=c.zeta,
      scale=c.scale,
      scale_recovery=c.scale_recovery,
      basis_dtype=basis.dtype,
      projection_dtype=c.projection_dtype,
    )
  else:
    update = layout.expand(basis_f32, c.scale * direction, c.projection_dtype)
  new_basis = basis_f32.astype(basis.dtype)
  return update.astype(grad.dtype), mu, nu, new_basis, recovery_norm


def _projected_leaf(
  config: _StepConfig,
  layout: MatrixLayout,
  branch: jax.Array,
  count: jax.Array,
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  basis: jax.Array,
  recovery_norm: Any,
  keys: jax.Array | None,
  rounding: quant.StochasticRounding | None,
) -> tuple[Any, ...]:
  """:func:`_matrix_step` on every matrix of a projected parameter.

  Returns ``(update, mu, nu, basis, recovery_norm)`` in the parameter's and
  the state's shapes; a masked ``recovery_norm`` (recovery scaling off)
  comes back as it was. ``rounding`` is that of ``nu``'s first entry.
  """
  masked = isinstance(recovery_norm, optax.MaskedNode)
  stacks = tuple(
    jax.tree.map(layout.flatten_batch, x)
    for x in (mu, nu, basis, None if masked else recovery_norm)
  )
  offsets = None
  if rounding is not None:
    matrix_size = math.prod(jax.tree.leaves(stacks[1])[0].shape[1:])
    offsets = rounding.offset + matrix_size * jnp.arange(
      layout.num_matrices, dtype=jnp.uint32
    )

  def step(*args):
    *args, offset = args
    at = None if rounding is None else rounding._replace(offset=offset)
    return _matrix_step(config, layout, branch, count, *args, at)

  update, *new_state = layout_lib.for_each_matrix(
    step, (layout.to_views(grad), *stacks), (keys, offsets)
  )
  new_mu, new_nu, new_basis, new_norm = (
    jax.tree.map(layout.unflatten_batch, x) for x in new_state
  )
  assert update is not None  # for_each_matrix returns None for None only
  return (
    layout.from_views(update),
    new_mu,
    new_nu,
    new_basis,
    recovery_norm if masked else new_norm,
  )


def _adam_leaf(
  config: _StepConfig, grad, mu, nu, count, rounding
) -> tuple[Any, ...]:
  """Plain Adam for a parameter that is not projected: ``(update, mu, nu)``.

  In float32 at least, as the projected leaves: a bfloat16 gradient would
  otherwise round ``(1 - b1) g`` and ``g^2`` before they are accumulated.
  A complex gradient's second moment is ``|g|^2``. As in
  ``optax.scale_by_adam``, the direction is that of the new moments before
  they are stored (cast, or quantized).
  """
  b1, b2 = config.b1, config.b2
  g = grad.astype(jnp.promote_types(grad.dtype, jnp.float32))
  old_mu, old_nu = config.load(mu, nu)
  new_mu = (1 - b1) * g + b1 * old_mu
  g_sq = jnp.square(g) if jnp.isrealobj(g) else (g.conj() * g).real
  new_nu = (1 - b2) * g_sq + b2 * old_nu
  mu, nu = config.save(new_mu, new_nu, mu, nu, rounding)
  t = optax.safe_increment(count)
  direction = moments.adam_direction(new_mu, new_nu, t, b1, b2, config.eps)
  return direction.astype(grad.dtype), mu, nu


def _matrix_keys(
  key_data: jax.Array | None,
  key_impl: Any,
  leaf_index: int,
  count: jax.Array,
  layout: MatrixLayout,
  layer: tuple[jax.Array, int] | None,
) -> jax.Array | None:
  """One key per stacked matrix of leaf ``leaf_index`` on this step.

  Folded from the optimizer's key, the leaf's index and the step count, then
  split over the matrices; for a per-layer call (``layer = (index, size)``)
  the split covers the whole ``size``-layer stack and this slice takes its
  share, so each slice gets the keys of the whole-stack step.
  """
  if key_data is None:
    return None
  base = jax.random.wrap_key_data(key_data, impl=key_impl)
  leaf_key = jax.random.fold_in(jax.random.fold_in(base, leaf_index), count)
  if layer is None:
    return jax.random.split(leaf_key, layout.num_matrices)
  index, layers = layer
  keys = jax.random.split(leaf_key, layers * layout.num_matrices)
  keys = keys.reshape(layers, layout.num_matrices)
  return jax.lax.dynamic_index_in_dim(keys, index, keepdims=False)


def _rounding(
  config: _StepConfig,
  key_data: jax.Array | None,
  leaf_index: int,
  count: jax.Array,
  nu: Any,
  layer: tuple[jax.Array, int] | None,
) -> quant.StochasticRounding | None:
  """The stochastic rounding of leaf ``leaf_index``'s 8-bit ``nu`` on this
  step (``None`` when it is not 8-bit): seeded by the optimizer's key (if
  any), the leaf's index and the step count; a per-layer call's slice starts
  at its offset in the whole stack, so it rounds as the whole-stack step."""
  if not isinstance(nu, quant.QuantizedArray):
    return None
  words = (
    (leaf_index, count) if key_data is None else (key_data, leaf_index, count)
  )
  rounding = quant.StochasticRounding.seeded(*words)
  if layer is None:
    return rounding
  index, _ = layer
  offset = jnp.asarray(index, jnp.uint32) * jnp.uint32(nu.codes.size)
  return rounding._replace(offset=offset)


def _stagger_offsets(
  layouts: list[MatrixLayout | None], update_interval, stagger: bool
) -> list:
  """Per-leaf offsets of the update steps: projected leaf ``j`` of ``k``
  gets ``j T // k`` with ``stagger``, else all 0."""
  projected = [i for i, layout in enumerate(layouts) if layout is not None]
  offsets = [0] * len(layouts)
  if stagger:
    for j, i in enumerate(projected):
      offsets[i] = (j * update_interval) // len(projected)
  return offsets


def _init_leaf(
  layout: MatrixLayout | None,
  leaf: Any,
  *,
  rank: int,
  mu_storage: quant.MomentStorage,
  nu_storage: quant.MomentStorage,
  basis_dtype: jnp.dtype,
  recovery_scaling: bool,
) -> tuple[Any, Any, Any, Any]:
  """Zero ``(mu, nu, basis, recovery_norm)`` of one parameter."""
  masked = optax.MaskedNode()
  if layout is None:
    shape = tuple(jnp.shape(leaf))
    # A complex parameter's mean is complex; its second moment |g|^2 is real.
    complex_mean = jnp.issubdtype(_checks.leaf_dtype(leaf), jnp.complexfloating)
    return (
      quant.zeros(shape, mu_storage, complex_mean=complex_mean),
      quant.zeros(shape, nu_storage),
      masked,
      masked,
    )
  batch = layout.batch_shape
  rnorm = jnp.zeros(batch, jnp.float32) if recovery_scaling else masked
  moment_shape = (*batch, rank, layout.n)
  return (
    quant.zeros(moment_shape, mu_storage),
    quant.zeros(moment_shape, nu_storage),
    jnp.zeros((*batch, layout.m, rank), basis_dtype),
    rnorm,
  )


def _check_leaf_dtypes(tree: Any, layouts: list[MatrixLayout | None]) -> None:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), layout in zip(leaves, layouts, strict=True):
    _checks.trainable_dtype(
      jax.tree_util.keystr(path),
      tuple(jnp.shape(leaf)),
      _checks.leaf_dtype(leaf),
      layout is not None,
    )


def _unzip(treedef, rows: list[tuple], storages: tuple[Any, ...]) -> list:
  """Per-leaf tuples as one tree per position.

  ``storages[k]`` is the moment storage of position ``k`` (its tree is built
  by :func:`grassjax.quantization.join_moment`), or ``None`` for a plain
  tree. A tree with no leaves (``{}``, or the placeholder of
  ``optax.tree.map_params``) gives empty trees of its structure.
  """
  width = len(storages)
  columns = zip(*rows, strict=True) if rows else [()] * width
  return [
    treedef.unflatten(list(column))
    if storage is None
    else quant.join_moment(treedef, list(column), storage)
    for column, storage in zip(columns, storages, strict=True)
  ]


class _Config(NamedTuple):
  """Everything :func:`scale_by_subspace_adam` was given, checked."""

  step: _StepConfig
  update_interval: int | jax.Array
  stagger: bool
  projection_mask: MaskOrFn
  dimension_numbers: DimensionNumbersOrFn
  projected_side: ProjectedSide
  basis_dtype: jnp.dtype
  key_data: jax.Array | None
  key_impl: Any


def _init_state(config: _Config, params: optax.Params) -> SubspaceAdamState:
  """The ``init`` of :func:`scale_by_subspace_adam`: zero moments and bases."""
  layouts = layout_lib.projection_layouts(
    params,
    rank=config.step.rank,
    projection_mask=config.projection_mask,
    dimension_numbers=config.dimension_numbers,
    projected_side=config.projected_side,
  )
  _check_leaf_dtypes(params, layouts)
  init_leaf = functools.partial(
    _init_leaf,
    rank=config.step.rank,
    mu_storage=config.step.mu_storage,
    nu_storage=config.step.nu_storage,
    basis_dtype=config.basis_dtype,
    recovery_scaling=config.step.recovery_scaling,
  )
  leaves, treedef = jax.tree.flatten(params)
  rows = [
    init_leaf(layout, leaf)
    for layout, leaf in zip(layouts, leaves, strict=True)
  ]
  storages = (config.step.mu_storage, config.step.nu_storage)
  mu, nu, basis, rnorm = _unzip(treedef, rows, (*storages, None, None))
  key = config.key_data
  return SubspaceAdamState(
    count=jnp.zeros([], jnp.int32),
    # A private copy, safe to donate with the state.
    key=None if key is None else jnp.array(key, copy=True),
    mu=mu,
    nu=nu,
    basis=basis,
    recovery_norm=rnorm,
  )


def _update_state(
  config: _Config,
  updates: optax.Updates,
  state: SubspaceAdamState,
  params: optax.Params | None = None,
  *,
  layer: tuple[jax.Array, int] | None = None,
  **extra_args: Any,
) -> tuple[optax.Updates, SubspaceAdamState]:
  """The ``update`` of :func:`scale_by_subspace_adam`: one step.

  Other keyword arguments (``value``, ``grad``, ... that ``optax.chain``
  passes every member) are accepted and ignored.

  ``layer=(index, size)`` updates one slice of stacked parameters, for a
  per-layer (fused) update: every leaf of ``updates`` and of the state's
  per-parameter trees is slice ``index`` (a traced int) of a leaf stacked
  along a leading axis of ``size``, and the step equals that slice of the
  whole-stack step, PRNG keys included. The returned count is the step's
  count (each slice's call returns the same).
  """
  del params, extra_args
  count, step = state.count, config.step
  treedef: PyTreeDef
  grads, treedef = jax.tree.flatten(updates)
  per_leaf_state = list(
    zip(
      quant.split_moment(treedef, state.mu),
      quant.split_moment(treedef, state.nu),
      treedef.flatten_up_to(state.basis),
      treedef.flatten_up_to(state.recovery_norm),
      strict=True,
    )
  )
  layouts = layout_lib.layouts_from_bases(
    updates, [leaf[2] for leaf in per_leaf_state], config.dimension_numbers
  )
  _check_leaf_dtypes(updates, layouts)
  offsets = _stagger_offsets(layouts, config.update_interval, config.stagger)
  rows = []
  for i, (grad, layout, (mu, nu, basis, rnorm)) in enumerate(
    zip(grads, layouts, per_leaf_state, strict=True)
  ):
    key_data = None if config.key_data is None else state.key
    rounding = _rounding(step, key_data, i, count, nu, layer)
    if layout is None:
      adam = _adam_leaf(step, grad, mu, nu, count, rounding)
      rows.append((*adam, basis, rnorm))
      continue
    branch = _basis_branch(count, offsets[i], config.update_interval)
    keys = _matrix_keys(key_data, config.key_impl, i, count, layout, layer)
    rows.append(
      _projected_leaf(
        step, layout, branch, count, grad, mu, nu, basis, rnorm, keys, rounding
      )
    )
  storages = (step.mu_storage, step.nu_storage)
  new_updates, mu, nu, basis, rnorm = _unzip(
    treedef, rows, (None, *storages, None, None)
  )
  return new_updates, state._replace(
    count=optax.safe_increment(count),
    mu=mu,
    nu=nu,
    basis=basis,
    recovery_norm=rnorm,
  )


def scale_by_subspace_adam(
  subspace: subspace_lib.SubspaceRule,
  *,
  rank: int,
  update_interval: int | jax.Array = 200,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: jax.typing.ArrayLike = 1.01,
  scale: jax.typing.ArrayLike = 1.0,
  scale_recovery: bool = True,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  key: jax.Array | None = None,
  projection_mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  projected_side: ProjectedSide = "shorter",
  mu_dtype: jax.typing.DTypeLike | quant.Blockwise8Bit | None = None,
  nu_dtype: jax.typing.DTypeLike | quant.Blockwise8Bit | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  projection_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam in a rank-``r`` subspace of each weight matrix's gradient.

  For a projected parameter, seen as a canonical ``(m, n)`` matrix ``G``
  whose projected side ``m`` is the shorter one (or, with
  ``projected_side="longer"``, the longer one), on step ``t`` (1-based):

  1. On update steps (``(t - 1) % update_interval == 0``) the basis moves:
     :math:`S_t = \mathrm{init}(G_t)` on the first step,
     :math:`S_t = \mathrm{update}(S_{t-1}, G_t)` later (the rule's two
     functions). With ``adaptive_optimizer`` the moments are then rotated by
     :func:`~grassjax.moments.rotate_moments` with
     :math:`P = S_t^\top S_{t-1}`; without it they are kept (GaLore).
  2. Adam on the projected gradient :math:`\tilde G = S_t^\top G_t`
     ``(r, n)``:

     .. math::
       M \leftarrow \beta_1 M + (1 - \beta_1) \tilde G, \quad
       V \leftarrow \beta_2 V + (1 - \beta_2) \tilde G^2, \quad
       D = \frac{M / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon}

  3. The update is :math:`\mathrm{scale} \cdot (S_t D + \Lambda)`, with the
     recovery term :math:`\Lambda` of
     :func:`~grassjax.recovery.recovery_update` when ``recovery_scaling``
     (else 0). A step costs two products with ``S_t`` and needs no ``(m,
     n)`` buffer beyond the gradient and the update.

  Parameters that are not projected get plain Adam with the same ``b1, b2,
  eps``, not multiplied by ``scale``, computed in float32 at least
  (complex64 for complex parameters, with ``|g|^2`` in ``V``) and cast back
  to the parameter's dtype. For float32 (or complex64) parameters and
  moments that is ``optax.scale_by_adam``; for bfloat16 ones it is
  ``optax.scale_by_adam`` on the float32 gradient, rounded. Integer
  parameters, and complex ones masked in for projection, are refused.

  The step is always the same compiled program: the step predicate is a
  scalar, and the subspace update (an SVD, a QR, a geodesic) and the moment
  rotation sit behind ``jax.lax.switch``, so steps that do not update pay
  nothing for them. Random rules get their own key per parameter, per
  stacked matrix and per step, folded from ``key``, the parameter's index
  and the step count (which saturates; see :class:`SubspaceAdamState`).

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
    projection_mask: which parameters are projected: a pytree of bools
      matching the parameters, or a callable of the parameters returning one.
      Default: every real parameter with ``ndim >= 2`` whose two matrix sides
      both exceed ``rank``. A masked-in parameter must be real, with ``rank``
      at most its smaller side.
    dimension_numbers: which axes form the matrix
      (:class:`~grassjax.layout.MatrixDimensionNumbers`): one for all
      parameters, a pytree of them (``None`` leaves take the default), or a
      callable of the parameters. Default: the last two axes, leading axes
      stacked.
    projected_side: ``"shorter"`` (the papers': moments ``r x max(m, n)``)
      or ``"longer"`` (as ``optax.contrib.galore``: moments ``r x min(m,
      n)``, a larger basis). Random rules keep about ``r / m`` of a
      gradient's energy, so the side matters most for them.
    mu_dtype: how ``mu`` is stored whatever the parameters' dtype: a
      floating dtype of 16 bits or more, or ``"8bit"`` (or a
      :class:`~grassjax.quantization.Blockwise8Bit`) for block-wise 8-bit
      codes, dequantized, updated and quantized again inside the step, one
      matrix at a time; ``None`` means float32. The step computes in float32
      whatever it is.
    nu_dtype: how ``nu`` is stored, as ``mu_dtype``; ``None`` means
      ``mu_dtype``'s.
    basis_dtype: dtype in which the bases are stored; ``None`` means
      float32. The step computes in float32 whatever it is; bfloat16 halves
      the bases at the price of orthonormality to about ``4e-3``.
    projection_dtype: dtype of the operands of the two products with the
      basis, accumulated in float32; ``None`` means float32. bfloat16 uses an
      accelerator's fast matrix units.
    stagger: spread the update steps of the projected parameters evenly over
      the interval (parameter ``i`` of ``k`` updates when ``(t - 1 + i T //
      k) % T == 0``), so a step never pays for all subspace updates at once.
      All bases are still made on the first step.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SubspaceAdamState`. Its ``update`` also takes ``layer=(index,
    size)`` for a per-layer update of stacked parameters (see
    ``update_fn``).

  Raises:
    ValueError: on a bad configuration or parameter dtype (named parameter
      path, shape and dtype).
    TypeError: if ``subspace`` is not a :class:`~grassjax.SubspaceRule` or
      ``key`` not a PRNG key.
  """
  if not isinstance(subspace, subspace_lib.SubspaceRule):
    raise TypeError(
      "grassjax: subspace must be a grassjax.SubspaceRule, such as"
      f" grassjax.subspace.svd(); got {subspace!r}."
    )
  rank = _checks.positive_int("rank", rank)
  update_interval = _checks.update_interval(update_interval)
  _checks.positive("zeta", zeta)
  if projected_side not in ("shorter", "longer"):
    raise ValueError(
      "grassjax: projected_side must be 'shorter' or 'longer', got"
      f" {projected_side!r}."
    )
  mu_storage = quant.storage("mu_dtype", mu_dtype) or jnp.dtype(jnp.float32)
  nu_storage = quant.storage("nu_dtype", nu_dtype) or mu_storage
  basis_dtype = _checks.as_dtype("basis_dtype", basis_dtype) or jnp.dtype(
    jnp.float32
  )
  projection_dtype = _checks.as_dtype("projection_dtype", projection_dtype)
  if subspace.needs_key and key is None:
    raise ValueError(
      f"grassjax: the {subspace.name!r} subspace rule is random and needs a"
      " PRNG key: pass key=jax.random.key(seed)."
    )
  key_data, key_impl = (None, None) if key is None else _checks.split_key(key)
  config = _Config(
    step=_StepConfig(
      subspace,
      rank,
      adaptive_optimizer,
      recovery_scaling,
      zeta,
      scale,
      scale_recovery,
      b1,
      b2,
      eps,
      projection_dtype,
      mu_storage,
      nu_storage,
    ),
    update_interval=update_interval,
    stagger=stagger,
    projection_mask=projection_mask,
    dimension_numbers=dimension_numbers,
    projected_side=projected_side,
    basis_dtype=basis_dtype,
    key_data=key_data,
    key_impl=key_impl,
  )
  return optax.GradientTransformationExtraArgs(
    functools.partial(_init_state, config),
    functools.partial(_update_state, config),
  )
