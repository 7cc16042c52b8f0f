r"""The optimizers: :func:`low_rank_adamw` and its presets.

:func:`low_rank_adamw` is AdamW with the Adam step of projected matrices run
in a rank-``r`` subspace that a :class:`~grassjax.SubspaceRule` moves; the
four presets fix the rule and the papers' defaults:

====================  =============  ========  ===  ===  ========
preset                subspace rule  interval  AO   RS   key
====================  =============  ========  ===  ===  ========
:func:`grasswalk`     random walk    100       on   on   required
:func:`grassjump`     random jump    100       on   on   required
:func:`subtrack_pp`   tracking       100       on   on   unused
:func:`galore`        SVD            200       off  off  unused
====================  =============  ========  ===  ===  ========

:data:`OPTIMIZERS` maps each preset's name to it, whether it needs a key, and
its defaults, for code that picks an optimizer by name.
"""

# Annotations stay objects here (no postponed evaluation): optax's suite
# reads learning_rate's annotation to know that a preset takes schedules.
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

from grassjax import quantization
from grassjax import subspace as subspace_lib
from grassjax.layout import DimensionNumbersOrFn, MaskOrFn, ProjectedSide
from grassjax.transform import scale_by_subspace_adam


def low_rank_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rule: subspace_lib.SubspaceRule,
  *,
  rank: int,
  key: jax.Array | None = None,
  update_interval: int | jax.Array = 100,
  scale: jax.typing.ArrayLike = 0.25,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: MaskOrFn = None,
  adaptive_optimizer: bool = True,
  recovery_scaling: bool = True,
  zeta: jax.typing.ArrayLike = 1.01,
  scale_recovery: bool = True,
  projection_mask: MaskOrFn = None,
  dimension_numbers: DimensionNumbersOrFn = None,
  projected_side: ProjectedSide = "shorter",
  mu_dtype: jax.typing.DTypeLike | quantization.Blockwise8Bit | None = None,
  nu_dtype: jax.typing.DTypeLike | quantization.Blockwise8Bit | None = None,
  basis_dtype: jax.typing.DTypeLike | None = None,
  projection_dtype: jax.typing.DTypeLike | None = None,
  stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW whose projected matrices take Adam's step in a moving subspace.

  ``optax.chain(scale_by_subspace_adam(rule, ...),
  optax.add_decayed_weights(weight_decay, weight_decay_mask),
  optax.scale_by_learning_rate(learning_rate))``, so a projected matrix
  ``W`` moves by

  .. math::
    W \leftarrow W - \eta_t \left(\mathrm{scale} \cdot (S D + \Lambda)
      + \lambda W\right)

  and every other parameter by AdamW's step; ``S``, ``D`` and ``Lambda`` are
  those of :func:`grassjax.scale_by_subspace_adam`. Without weight decay the
  update needs no ``params``, like ``optax.adam``.

  Args:
    learning_rate: a float or an optax schedule.
    rule: the subspace rule (:mod:`grassjax.subspace`).
    rank: ``r``. The papers use 128 (60M), 256 (130M, 350M), 512 (1B) and
      1024 (7B).
    key: one PRNG key (``jax.random.key(seed)``); required by random rules.
    update_interval: ``T``, steps between subspace updates.
    scale: multiplies the low-rank update (GaLore's ``alpha``); 0.25 as in
      the papers' LLaMA runs.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay ``lambda`` on the full weights.
    weight_decay_mask: which parameters decay (an optax mask; default all),
      as ``optax.adamw``'s ``mask``.
    adaptive_optimizer: rotate Adam's moments onto each new basis (AO).
    recovery_scaling: add back the rescaled residual (RS).
    zeta: growth limiter of the recovery term.
    scale_recovery: whether ``scale`` multiplies the recovery term too.
    projection_mask: which parameters are projected (a pytree of bools or a
      callable of the parameters); default: every matrix whose two sides
      exceed ``rank``.
    dimension_numbers: which axes form each matrix
      (:class:`grassjax.MatrixDimensionNumbers`).
    projected_side: ``"shorter"`` (the papers') or ``"longer"`` (as
      ``optax.contrib.galore``).
    mu_dtype: dtype of Adam's first moments (``None``: float32), or
      ``"8bit"`` for block-wise 8-bit codes (:mod:`grassjax.quantization`).
    nu_dtype: dtype of Adam's second moments, or ``"8bit"`` (``None``:
      ``mu_dtype``).
    basis_dtype: dtype of the stored bases (``None``: float32).
    projection_dtype: operand dtype of the products with the bases,
      accumulated in float32 (``None``: float32).
    stagger: spread the parameters' subspace updates over the interval.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  subspace_adam = scale_by_subspace_adam(
    rule,
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
    projection_mask=projection_mask,
    dimension_numbers=dimension_numbers,
    projected_side=projected_side,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
    basis_dtype=basis_dtype,
    projection_dtype=projection_dtype,
    stagger=stagger,
  )
  # No decay skips a pass over the weights; optax.identity keeps the state's
  # structure that of a decayed chain, so it does not change when
  # inject_hyperparams makes weight_decay an array.
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  decay = (
    optax.identity()
    if no_decay
    else optax.add_decayed_weights(weight_decay, weight_decay_mask)
  )
  return optax.chain(
    subspace_adam, decay, optax.scale_by_learning_rate(learning_rate)
  )


def _project_nothing(params: Any) -> Any:
  return jax.tree.map(lambda _: False, params)


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 1e-4,
  mask: MaskOrFn = None,
  *,
  mu_dtype: jax.typing.DTypeLike | quantization.Blockwise8Bit | None = None,
  nu_dtype: jax.typing.DTypeLike | quantization.Blockwise8Bit | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW whose moments may be stored in 8 bits: ``optax.adamw``'s step.

  Every parameter takes the plain Adam step of
  :func:`scale_by_subspace_adam` (nothing is projected), then decoupled
  weight decay and the learning rate:

  .. math::
    W \leftarrow W - \eta_t \left(
      \frac{M / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon}
      + \lambda W \right)

  With float32 moments this is ``optax.adamw``; with ``mu_dtype="8bit"`` it
  is AdamW with block-wise 8-bit moments
  (:mod:`grassjax.quantization`), the full-rank anchor of the low-rank
  optimizers' 8-bit runs. Arguments as ``optax.adamw``'s, ``mask`` the
  weight decay's; ``mu_dtype`` and ``nu_dtype`` as in
  :func:`scale_by_subspace_adam`.

  Example:
    >>> import jax.numpy as jnp, grassjax
    >>> params = {"w": jnp.ones((4, 512))}
    >>> tx = grassjax.adamw(1e-3, mu_dtype="8bit")
    >>> state = tx.init(params)
    >>> state[0].mu.codes["w"].dtype, state[0].mu.scales["w"].shape
    (dtype('uint8'), (4, 2))
  """
  return low_rank_adamw(
    learning_rate,
    subspace_lib.svd(),  # never used: no parameter is projected
    rank=1,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=mask,
    projection_mask=_project_nothing,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )


def _preset(
  factory: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Gives a preset ``f(learning_rate, *, own..., **options)`` the full
  signature: its own arguments, then :func:`low_rank_adamw`'s other keyword
  arguments with their defaults.

  ``optax.inject_hyperparams`` binds arguments by signature, so every option
  can be a hyperparameter (or a static argument) of a preset.
  """
  own = inspect.signature(factory).parameters
  shared = [
    p
    for name, p in inspect.signature(low_rank_adamw).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in own
  ]
  params = [p for p in own.values() if p.kind is not p.VAR_KEYWORD]
  factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    params + shared,
    return_annotation=optax.GradientTransformationExtraArgs,
  )
  return factory


_OPTIONS_DOC = """the other keyword arguments of :func:`low_rank_adamw`
      (``update_interval``, ``scale``, ``b1``, ``b2``, ``eps``,
      ``weight_decay``, ``weight_decay_mask``, ``adaptive_optimizer``,
      ``recovery_scaling``, ``zeta``, ``scale_recovery``,
      ``projection_mask``, ``dimension_numbers``, ``projected_side``, the
      dtypes, ``stagger``), with its defaults."""


def _geodesic_options(
  tangent_rank: int | None, normalize_step: bool, svd_method: str
) -> dict[str, Any]:
  """The keyword arguments of the geodesic rules from a preset's.

  ``tangent_rank`` defaults to ``None`` (not 1) in the presets, so
  ``optax.inject_hyperparams`` leaves an unlisted one static.
  """
  return {
    "tangent_rank": 1 if tangent_rank is None else tangent_rank,
    "normalize": normalize_step,
    "svd_method": svd_method,
  }


@_preset
def grasswalk(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array,
  step_size: jax.typing.ArrayLike = subspace_lib.DEFAULT_WALK_ANGLE,
  tangent_rank: int | None = None,
  normalize_step: bool = True,
  svd_method: subspace_lib.SvdMethod = "exact",
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""GrassWalk: a random walk on the Grassmannian, with AO and RS.

  The basis starts as the top-``rank`` SVD subspace of the first gradient;
  every ``update_interval`` steps it moves along a Grassmann geodesic in a
  random tangent direction (:func:`grassjax.subspace.random_walk`),
  :math:`H = (I - S S^\top) X` with :math:`X \sim N(0, 1)^{m \times r}`.
  Adam's moments are rotated onto each new basis and the residual outside
  the subspace is added back column-wise rescaled.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    key: PRNG key of the walk (``jax.random.key(seed)``).
    step_size: geodesic distance per update in radians (the tangent's
      singular values are normalized to unit Frobenius norm); default
      :data:`grassjax.subspace.DEFAULT_WALK_ANGLE`. With
      ``normalize_step=False`` the raw Gaussian scale is kept (the papers'
      literal reading, where step sizes of 10 to 10000 are angles of
      thousands of radians).
    tangent_rank: rank of each random rotation (``None``: 1).
    normalize_step: ``step_size`` is an angle (True) or the raw scale.
    svd_method: ``"exact"`` or ``"randomized"`` SVD for the first basis
      (:func:`grassjax.subspace.svd_basis`).
    **options: {options}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    "Principled Randomized Exploration of Gradient Subspaces for Efficient
    LLM Training" (under review), Section 3 and Table 4.

  Example:
    >>> import jax, jax.numpy as jnp, grassjax
    >>> params = {"w": jnp.ones((16, 32)), "b": jnp.zeros(32)}
    >>> tx = grassjax.grasswalk(1e-3, rank=4, key=jax.random.key(0))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state)
    >>> state[0].basis["w"].shape, state[0].mu["w"].shape
    ((16, 4), (4, 32))
  """
  geodesic = _geodesic_options(tangent_rank, normalize_step, svd_method)
  rule = subspace_lib.random_walk(step_size, **geodesic)
  return low_rank_adamw(learning_rate, rule, rank=rank, key=key, **options)


@_preset
def grassjump(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array,
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""GrassJump: a fresh random subspace every interval, with AO and RS.

  Every ``update_interval`` steps (and on the first) the basis is a new
  uniformly random one, the sign-fixed QR of :math:`X \sim N(0, 1)^{m
  \times r}` (:func:`grassjax.subspace.random_jump`); the gradient never
  chooses it. Adam's moments are rotated onto each new basis and the
  residual is added back column-wise rescaled.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    key: PRNG key of the jumps (``jax.random.key(seed)``).
    **options: {options}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    "Principled Randomized Exploration of Gradient Subspaces for Efficient
    LLM Training" (under review), Section 3 and Table 4.

  Example:
    >>> import jax, jax.numpy as jnp, grassjax
    >>> tx = grassjax.grassjump(1e-3, rank=4, key=jax.random.key(0))
    >>> state = tx.init({"w": jnp.ones((16, 32))})
    >>> state[0].basis["w"].shape
    (16, 4)
  """
  return low_rank_adamw(
    learning_rate,
    subspace_lib.random_jump(),
    rank=rank,
    key=key,
    **options,
  )


@_preset
def subtrack_pp(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array | None = None,
  step_size: jax.typing.ArrayLike = 10.0,
  tangent_rank: int | None = None,
  normalize_step: bool = False,
  svd_method: subspace_lib.SvdMethod = "exact",
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SubTrack++: Grassmannian subspace tracking, with AO and RS.

  Starts from the SVD subspace of the first gradient; every
  ``update_interval`` steps takes one geodesic step that lowers the
  projection error :math:`\|G - S S^\top G\|_F^2` of the current gradient,
  along the rank-``tangent_rank`` part of the descent direction
  :math:`H = 2 (G - S S^\top G) G^\top S`
  (:func:`grassjax.subspace.tracking`). Adam's moments are rotated onto each
  new basis and the residual is added back column-wise rescaled.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    key: unused by tracking; accepted so every preset takes one.
    step_size: ``eta``; the rotation angle is ``eta * sigma_1(H)`` (the
      papers' convention; SubTrack-Grad, Table 14: 10), or ``eta`` radians
      with ``normalize_step=True``.
    tangent_rank: rank of each tracking step (``None``: 1, as the papers).
    normalize_step: make ``step_size`` an angle in radians.
    svd_method: ``"exact"`` or ``"randomized"`` SVD for the first basis
      (:func:`grassjax.subspace.svd_basis`; randomized needs a ``key``).
    **options: {options}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Rajabi, Nonta and Rambhatla, "SubTrack++: Gradient Subspace Tracking
    for Scalable LLM Training" (NeurIPS 2025); "SubTrack your Grad: Gradient
    Subspace Tracking for Memory and Time Efficient Full-Parameter LLM
    Training", Table 14.

  Example:
    >>> import jax.numpy as jnp, grassjax
    >>> tx = grassjax.subtrack_pp(1e-3, rank=4)
    >>> state = tx.init({"w": jnp.ones((32, 16))})
    >>> state[0].basis["w"].shape  # the shorter side is projected
    (16, 4)
  """
  geodesic = _geodesic_options(tangent_rank, normalize_step, svd_method)
  rule = subspace_lib.tracking(step_size, **geodesic)
  return low_rank_adamw(learning_rate, rule, rank=rank, key=key, **options)


@_preset
def galore(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int,
  key: jax.Array | None = None,
  update_interval: int | jax.Array = 200,
  svd_method: subspace_lib.SvdMethod = "exact",
  adaptive_optimizer: bool = False,
  recovery_scaling: bool = False,
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore: the top-``r`` SVD subspace every ``update_interval`` steps.

  :math:`S = U_{:, :r}` of the current gradient's SVD
  (:func:`grassjax.subspace.svd`), Adam on :math:`S^\top G` with the moments
  kept unrotated across subspace switches, and no recovery term: the update
  is ``scale * S D``. The baseline; turning on ``adaptive_optimizer`` and
  ``recovery_scaling`` gives the SVD row of the ablation grid. Defaults from
  SubTrack-Grad, Table 14 (interval 200, scale 0.25).

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``.
    key: unused by the SVD rule; accepted so every preset takes one.
    update_interval: ``T``, steps between SVDs.
    svd_method: ``"exact"``, or ``"randomized"`` (a range finder that never
      gathers a sharded gradient; needs a ``key``), see
      :func:`grassjax.subspace.svd_basis`.
    adaptive_optimizer: rotate Adam's moments onto new bases (AO, off).
    recovery_scaling: add back the rescaled residual (RS, off).
    **options: {options}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", arXiv:2403.03507.

  Example:
    >>> import jax.numpy as jnp, grassjax
    >>> tx = grassjax.galore(1e-3, rank=4, projected_side="longer")
    >>> state = tx.init({"w": jnp.ones((16, 32))})
    >>> state[0].basis["w"].shape, state[0].mu["w"].shape
    ((32, 4), (4, 16))
  """
  return low_rank_adamw(
    learning_rate,
    subspace_lib.svd(svd_method),
    rank=rank,
    key=key,
    update_interval=update_interval,
    adaptive_optimizer=adaptive_optimizer,
    recovery_scaling=recovery_scaling,
    **options,
  )


for _alias in (grasswalk, grassjump, subtrack_pp, galore):
  if _alias.__doc__ is not None:  # None under python -OO
    _alias.__doc__ = _alias.__doc__.replace("{options}", _OPTIONS_DOC)


class OptimizerInfo(NamedTuple):
  """A preset, as code that picks an optimizer by name sees it.

  Attributes:
    constructor: ``constructor(learning_rate, *, rank, key, ...)``.
    needs_key: whether ``key`` is required (a random subspace rule).
    defaults: every keyword argument's default, the rule's own (e.g.
      ``step_size``) included.
  """

  constructor: Callable[..., optax.GradientTransformationExtraArgs]
  needs_key: bool
  defaults: Mapping[str, Any]


def _info(constructor: Callable[..., Any]) -> OptimizerInfo:
  params = inspect.signature(constructor).parameters
  defaults = {
    name: p.default
    for name, p in params.items()
    if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
  }
  needs_key = params["key"].default is inspect.Parameter.empty
  return OptimizerInfo(constructor, needs_key, types.MappingProxyType(defaults))


OPTIMIZERS: Mapping[str, OptimizerInfo] = types.MappingProxyType(
  {
    alias.__name__: _info(alias)
    for alias in (galore, grasswalk, grassjump, subtrack_pp)
  }
)
"""The presets by name: ``"galore"``, ``"grasswalk"``, ``"grassjump"``,
``"subtrack_pp"``."""
