"""The optimizers: GrassWalk, GrassJump, SubTrack++ and GaLore.

Each is ``optax.chain(scale_by_subspace_adam(rule, ...),
optax.add_decayed_weights(weight_decay, weight_decay_mask),
optax.scale_by_learning_rate(learning_rate))``, so the parameter update is

    W <- W - lr * (scale * (S D + Lambda) + weight_decay * W)

for projected matrices and ``W <- W - lr * (D + weight_decay * W)`` (AdamW)
for the rest; see :func:`grassjax.scale_by_subspace_adam` for ``S``, ``D``
and ``Lambda``. Defaults are those of the papers' LLaMA-1B runs ("Principled
Randomized Exploration of Gradient Subspaces for Efficient LLM Training",
Table 4: update interval 100, scale 0.25; SubTrack-Grad, Table 14: tracking
step size 10). The rank has no default: the papers use 128 (60M), 256 (130M,
350M), 512 (1B) and 1024 (7B).
"""

from __future__ import annotations

import jax
import optax

from grassjax import subspace as subspace_lib
from grassjax.transform import (
  DimensionNumbersOrFn,
  MaskOrFn,
  scale_by_subspace_adam,
)


def _low_rank_adamw(
  rule: subspace_lib.SubspaceRule,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  weight_decay_mask: MaskOrFn,
  **kwargs,
) -> optax.GradientTransformationExtraArgs:
  # Without weight decay the update needs no params, like optax.adam.
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  decay = (
    () if no_decay else (optax.add_decayed_weights(weight_decay, weight_decay_mask),)
  )
  return optax.chain(
    scale_by_subspace_adam(rule, **kwargs),
    *decay,
    optax.scale_by_learning_rate(learning_rate),
  )


def grasswalk(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array,
  update_interval: int = 100,
  step_size: jax.typing.ArrayLike = subspace_lib.DEFAULT_WALK_ANGLE,
  scale: jax.typing.ArrayLike = 0.25,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: MaskOrFn = None,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: float = 1.01,
  mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  tangent_rank: int | None = None,
  normalize_step: bool = True,
  moment_dtype: jax.typing.DTypeLike | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
  scale_recovery: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GrassWalk: a random walk on the Grassmannian, with AO and RS.

  The basis starts as the top-``rank`` SVD subspace of the first gradient and
  every ``update_interval`` steps moves along a Grassmann geodesic in a random
  tangent direction (:func:`grassjax.subspace.random_walk`):
  ``H = (I - S S^T) X``, ``X ~ N(0, 1)``, rank-``tangent_rank`` part by
  randomized SVD, ``S <- S V cos(Sigma tau) V^T + U sin(Sigma tau) V^T + S (I -
  V V^T)``. Adam runs on ``S^T G`` ``(r, n)`` with its moments rotated onto
  each new basis, and the residual ``G - S S^T G`` is added back column-wise
  rescaled (see :func:`grassjax.scale_by_subspace_adam`).

  ``step_size`` is the geodesic distance per update in radians (the tangent's
  singular values are normalized to unit Frobenius norm); set
  ``normalize_step=False`` for the papers' raw Gaussian scale, where the
  tables' step sizes (10, 10000) amount to angles of thousands of radians.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``; the default mask projects every matrix whose two sizes
      exceed it.
    key: PRNG key of the walk.
    update_interval: ``T``, steps between subspace updates.
    step_size: rotation angle per update (radians); default ``pi / 2``
      (:data:`grassjax.subspace.DEFAULT_WALK_ANGLE`, chosen by a sweep).
    scale: multiplies the low-rank update and the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay on the full weights (AdamW style).
    weight_decay_mask: which parameters decay (optax mask; default all).
    adaptive_optimizer: rotate Adam's moments onto new bases (AO).
    recovery_scaling: add back the rescaled residual (RS).
    zeta: growth limiter of the recovery term.
    mask: which parameters are projected (pytree of bools or callable).
    dimension_numbers: which axes form each matrix
      (:class:`grassjax.MatrixDimensionNumbers`).
    tangent_rank: rank of each random rotation (``None``: 1).
    normalize_step: ``step_size`` is an angle (True) or the raw scale.
    moment_dtype: dtype of Adam's moments (``None``: float32).
    basis_dtype: dtype of the stored bases (``None``: float32).
    stagger: spread parameters' subspace updates over the interval.
    scale_recovery: whether ``scale`` multiplies the recovery term too.

  Returns:
    An ``optax.GradientTransformation``.
  """
  rule = subspace_lib.random_walk(
    step_size,
    tangent_rank=1 if tangent_rank is None else tangent_rank,
    normalize=normalize_step,
  )
  return _low_rank_adamw(
    rule,
    learning_rate,
    weight_decay,
    weight_decay_mask,
    rank=rank,
    update_interval=update_interval,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=zeta,
    scale=scale,
    scale_recovery=scale_recovery,
    b1=b1,
    b2=b2,
    eps=eps,
    key=key,
    mask=mask,
    dimension_numbers=dimension_numbers,
    moment_dtype=moment_dtype,
    basis_dtype=basis_dtype,
    stagger=stagger,
  )


def grassjump(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array,
  update_interval: int = 100,
  scale: jax.typing.ArrayLike = 0.25,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: MaskOrFn = None,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: float = 1.01,
  mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  moment_dtype: jax.typing.DTypeLike | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
  scale_recovery: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GrassJump: a fresh random subspace every ``update_interval`` steps, with AO and RS.

  Every basis, the first included, is ``Q`` of the sign-fixed QR of an ``(m,
  r)`` Gaussian (:func:`grassjax.subspace.random_jump`). Adam runs on ``S^T G``
  with its moments rotated onto each new basis, and the residual is added
  back column-wise rescaled (:func:`grassjax.scale_by_subspace_adam`).

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    key: PRNG key of the jumps.
    update_interval: ``T``.
    scale: multiplies the low-rank update and the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay on the full weights.
    weight_decay_mask: which parameters decay.
    adaptive_optimizer: rotate Adam's moments onto new bases (AO).
    recovery_scaling: add back the rescaled residual (RS).
    zeta: growth limiter of the recovery term.
    mask: which parameters are projected.
    dimension_numbers: which axes form each matrix.
    moment_dtype: dtype of Adam's moments (``None``: float32).
    basis_dtype: dtype of the stored bases (``None``: float32).
    stagger: spread parameters' subspace updates over the interval.
    scale_recovery: whether ``scale`` multiplies the recovery term too.

  Returns:
    An ``optax.GradientTransformation``.
  """
  return _low_rank_adamw(
    subspace_lib.random_jump(),
    learning_rate,
    weight_decay,
    weight_decay_mask,
    rank=rank,
    update_interval=update_interval,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=zeta,
    scale=scale,
    scale_recovery=scale_recovery,
    b1=b1,
    b2=b2,
    eps=eps,
    key=key,
    mask=mask,
    dimension_numbers=dimension_numbers,
    moment_dtype=moment_dtype,
    basis_dtype=basis_dtype,
    stagger=stagger,
  )


def subtrack_pp(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  update_interval: int = 100,
  step_size: jax.typing.ArrayLike = 10.0,
  scale: jax.typing.ArrayLike = 0.25,
  key: jax.Array | None = None,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: MaskOrFn = None,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: float = 1.01,
  mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  tangent_rank: int | None = None,
  normalize_step: bool = False,
  moment_dtype: jax.typing.DTypeLike | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
  scale_recovery: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SubTrack++: Grassmannian subspace tracking, with AO and RS.

  Starts from the SVD subspace of the first gradient; every
  ``update_interval`` steps takes one geodesic step that lowers the projection
  error ``||G - S S^T G||_F^2`` of the current gradient, along the rank-1 part
  of the descent direction ``H = 2 (G - S S^T G) G^T S``
  (:func:`grassjax.subspace.tracking`). Adam's moments are rotated onto each
  new basis and the residual is added back column-wise rescaled
  (:func:`grassjax.scale_by_subspace_adam`).

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    update_interval: ``T``.
    step_size: ``eta``; the rotation angle is ``eta * sigma_1(H)`` (papers'
      convention, SubTrack-Grad Table 14: 10), or ``eta`` radians with
      ``normalize_step=True``.
    scale: multiplies the low-rank update and the recovery term.
    key: unused by tracking; accepted for a uniform signature.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay on the full weights.
    weight_decay_mask: which parameters decay.
    adaptive_optimizer: rotate Adam's moments onto new bases (AO).
    recovery_scaling: add back the rescaled residual (RS).
    zeta: growth limiter of the recovery term.
    mask: which parameters are projected.
    dimension_numbers: which axes form each matrix.
    tangent_rank: rank of each tracking step (``None``: 1, as in the papers).
    normalize_step: make ``step_size`` an angle in radians.
    moment_dtype: dtype of Adam's moments (``None``: float32).
    basis_dtype: dtype of the stored bases (``None``: float32).
    stagger: spread parameters' subspace updates over the interval.
    scale_recovery: whether ``scale`` multiplies the recovery term too.

  Returns:
    An ``optax.GradientTransformation``.
  """
  rule = subspace_lib.tracking(
    step_size,
    tangent_rank=1 if tangent_rank is None else tangent_rank,
    normalize=normalize_step,
  )
  return _low_rank_adamw(
    rule,
    learning_rate,
    weight_decay,
    weight_decay_mask,
    rank=rank,
    update_interval=update_interval,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=zeta,
    scale=scale,
    scale_recovery=scale_recovery,
    b1=b1,
    b2=b2,
    eps=eps,
    key=key,
    mask=mask,
    dimension_numbers=dimension_numbers,
    moment_dtype=moment_dtype,
    basis_dtype=basis_dtype,
    stagger=stagger,
  )


def galore(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  update_interval: int = 200,
  scale: jax.typing.ArrayLike = 0.25,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: MaskOrFn = None,
  adaptive_optimizer: bool = False,
  recovery_scaling: bool = False,
  zeta: float = 1.01,
  key: jax.Array | None = None,
  mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  moment_dtype: jax.typing.DTypeLike | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
  scale_recovery: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GaLore: the top-``r`` SVD subspace every ``update_interval`` steps.

  ``S = U[:, :r]`` of the current gradient's SVD (:func:`grassjax.subspace.svd`),
  Adam on ``S^T G`` with moments kept unrotated across subspace switches, and
  no recovery term: ``update = scale * S D``. The baseline; turning on
  ``adaptive_optimizer`` and ``recovery_scaling`` gives the SVD row of the
  ablation grid. Defaults from SubTrack-Grad Table 14 (interval 200, scale
  0.25).

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    update_interval: ``T``.
    scale: GaLore's ``alpha``, multiplies the low-rank update.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay on the full weights.
    weight_decay_mask: which parameters decay.
    adaptive_optimizer: rotate Adam's moments onto new bases (AO, off).
    recovery_scaling: add back the rescaled residual (RS, off).
    zeta: growth limiter of the recovery term.
    key: unused by the SVD rule; accepted for a uniform signature.
    mask: which parameters are projected.
    dimension_numbers: which axes form each matrix.
    moment_dtype: dtype of Adam's moments (``None``: float32).
    basis_dtype: dtype of the stored bases (``None``: float32).
    stagger: spread parameters' SVDs over the interval.
    scale_recovery: whether ``scale`` multiplies the recovery term too.

  Returns:
    An ``optax.GradientTransformation``.
  """
  return _low_rank_adamw(
    subspace_lib.svd(),
    learning_rate,
    weight_decay,
    weight_decay_mask,
    rank=rank,
    update_interval=update_interval,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    zeta=zeta,
    scale=scale,
    scale_recovery=scale_recovery,
    b1=b1,
    b2=b2,
    eps=eps,
    key=key,
    mask=mask,
    dimension_numbers=dimension_numbers,
    moment_dtype=moment_dtype,
    basis_dtype=basis_dtype,
    stagger=stagger,
  )
