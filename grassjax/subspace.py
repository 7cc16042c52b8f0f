r"""Subspace rules and Grassmannian geometry.

Every function here works on one matrix in *canonical orientation*: a gradient
``G`` of shape ``(m, n)`` with ``m <= n`` and an orthonormal basis ``S`` of
shape ``(m, r)`` whose columns span the rank-``r`` subspace the gradient is
projected on (``S^T G`` has shape ``(r, n)``).
:func:`grassjax.scale_by_subspace_adam` hands each rule one matrix at a time in
that orientation (transposing a tall one, looping over stacked layers), so rules
never see batch axes.

A :class:`SubspaceRule` is two pure functions:

* ``init(grad, rank, key) -> basis``: the first basis, from the first gradient.
* ``update(basis, grad, key) -> basis``: the basis for an update step, from the
  previous basis and the current gradient.

Four rules are built in (the subspace-update rows of Table 1 in "Principled
Randomized Exploration of Gradient Subspaces for Efficient LLM Training"):
:func:`svd` (GaLore), :func:`tracking` (SubTrack++), :func:`random_walk`
(GrassWalk) and :func:`random_jump` (GrassJump), plus :func:`fixed`, which keeps
the first SVD basis forever. Writing another rule takes two functions; see
:class:`SubspaceRule`.

The geometry follows Bendokat, Zimmermann and Absil, "A Grassmann manifold
handbook: basic geometry and computational aspects" (Advances in Computational
Mathematics, 2024, doi:10.1007/s10444-023-10090-8): a tangent vector at
``S`` is an ``(m, r)`` matrix ``H`` with ``S^T H = 0``, and with the thin SVD
``H = U Sigma V^T`` the geodesic leaving ``S`` along ``H`` is

.. math::
  S(\tau) = S V \cos(\Sigma \tau) V^\top + U \sin(\Sigma \tau) V^\top
    + S (I - V V^\top).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from grassjax import _checks

InitFn = Callable[[jax.Array, int, jax.Array | None], jax.Array]
UpdateFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class SubspaceRule(NamedTuple):
  """How a basis is made from the first gradient and moved on update steps.

  Attributes:
    init: ``init(grad, rank, key) -> basis``. ``grad`` is ``(m, n)`` with
      ``m <= n`` (float32), ``rank`` a static int ``r <= m``, ``key`` a typed
      PRNG key (``None`` when the optimizer was given none). Returns an ``(m,
      r)`` matrix with orthonormal columns.
    update: ``update(basis, grad, key) -> basis``: the ``(m, r)`` basis for the
      current update step from the previous ``(m, r)`` basis and the current
      ``(m, n)`` gradient. Must keep the columns orthonormal.
    needs_key: whether the rule draws random numbers; the optimizer then
      refuses to be built without a ``key``.
    name: a short name for logs and reprs.

  Both functions must be pure and jit-compatible; the optimizer calls them on
  one matrix at a time, and only on update steps (behind ``jax.lax.switch``),
  so they may be expensive.

  Example, a rule that keeps the ``r`` coordinate axes (the identity basis)::

    def init(grad, rank, key):
      return jnp.eye(grad.shape[0], rank, dtype=grad.dtype)

    identity = SubspaceRule(init, lambda basis, grad, key: basis)
  """

  init: InitFn
  update: UpdateFn
  needs_key: bool = False
  name: str = "custom"


# ----------------------------------------------------------------------------
# Grassmannian geometry
# ----------------------------------------------------------------------------


def orthonormalize(x: jax.Array) -> jax.Array:
  """Orthonormal basis of ``range(x)`` by QR with signs fixed so diag(R) > 0.

  For ``x`` of shape ``(m, r)``, ``m >= r``, returns ``Q`` ``(m, r)`` with
  ``x = Q R``. Fixing the signs makes the result unique (for full-rank ``x``),
  so an already orthonormal ``x`` comes back unchanged up to rounding: this is
  how the geodesic rules remove fp32 drift after every step.
  """
  q, r = jnp.linalg.qr(x)
  signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs


def tangent(basis: jax.Array, x: jax.Array) -> jax.Array:
  """Projects ``x`` ``(m, r)`` on the tangent space at ``basis``:
  ``(I - S S^T) x``."""
  return x - basis @ (basis.T @ x)


def geodesic(
  basis: jax.Array,
  u: jax.Array,
  sigma: jax.Array,
  v: jax.Array,
  step_size: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Moves ``basis`` along the Grassmann geodesic of tangent ``U Sigma V^T``.

  Computes

  .. math::
    S(\tau) = S V \cos(\Sigma \tau) V^\top + U \sin(\Sigma \tau) V^\top
      + S (I - V V^\top)

  as :math:`S + (S V (\cos(\Sigma \tau) - I) + U \sin(\Sigma \tau))
  V^\top`, which costs ``O(m r k)`` instead of ``O(m r^2)``.

  Args:
    basis: ``S``, ``(m, r)`` with orthonormal columns.
    u: ``U``, ``(m, k)`` orthonormal and orthogonal to ``S`` (``S^T U = 0``).
    sigma: ``Sigma``, ``(k,)`` non-negative singular values.
    v: ``V``, ``(r, k)`` orthonormal.
    step_size: ``tau``; the rotation angles are ``sigma * tau`` radians.

  Returns:
    ``S(tau)``, ``(m, r)``, orthonormal in exact arithmetic; ``S(0) = S`` and
    ``dS/dtau (0) = U Sigma V^T``.
  """
  theta = sigma * step_size
  moved = (basis @ v) * (jnp.cos(theta) - 1.0) + u * jnp.sin(theta)
  return basis + moved @ v.T


def top_singular(
  x: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-``k`` singular triplets ``(U (m, k), sigma (k,), V (r, k))`` of
  ``x`` ``(m, r)``."""
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  return u[:, :k], s[:k], vt[:k].T


def randomized_svd(
  x: jax.Array,
  k: int,
  key: jax.Array,
  *,
  oversample: int = 4,
  power_iters: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Approximate top-``k`` SVD of ``x`` ``(m, r)`` by a randomized range finder.

  Halko, Martinsson and Tropp, "Finding structure with randomness" (2011,
  arXiv:0909.4061): ``Q = orth((x x^T)^q x Omega)`` with a
  Gaussian ``Omega`` of ``k + oversample`` columns, then the exact SVD of the
  small ``Q^T x``. The left vectors lie in ``range(x)``, so for a tangent ``x``
  they stay orthogonal to the basis.

  Args:
    x: the ``(m, r)`` matrix.
    k: number of triplets, ``k <= min(m, r)``.
    key: PRNG key of the Gaussian test matrix ``Omega``.
    oversample: extra columns of ``Omega`` beyond ``k``, which make the
      top-``k`` triplets accurate when the spectrum decays slowly.
    power_iters: ``q``, passes of ``x x^T`` that sharpen a flat spectrum.

  Returns:
    ``(U (m, k), sigma (k,), V (r, k))``, with ``x ~ U diag(sigma) V^T``.
  """
  width = min(k + oversample, *x.shape)
  omega = jax.random.normal(key, (x.shape[1], width), x.dtype)
  q = orthonormalize(x @ omega)
  for _ in range(power_iters):
    q = orthonormalize(x @ (x.T @ q))
  ub, s, vt = jnp.linalg.svd(q.T @ x, full_matrices=False)
  return (q @ ub)[:, :k], s[:k], vt[:k].T


def projection_error(basis: jax.Array, grad: jax.Array) -> jax.Array:
  """``F(S) = ||G - S S^T G||_F^2`` for ``S`` ``(m, r)`` and ``G`` ``(m, n)``.

  The loss that :func:`tracking` descends; a scalar.
  """
  return jnp.sum(jnp.square(grad - basis @ (basis.T @ grad)))


# Singular values of a tangent below this fraction of the norm of the matrix
# it was projected from are taken as zero: they are rounding (a gradient
# inside span(S), a random walk with rank = m), which normalizing would
# otherwise blow up to a full step.
_TANGENT_RTOL = 1e-4


TopSingular = Callable[[jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]]


def _step_along(
  basis: jax.Array,
  direction: jax.Array,
  scale: jax.Array,
  step_size: jax.typing.ArrayLike,
  k: int,
  normalize: bool,
  decompose: TopSingular,
) -> jax.Array:
  """Geodesic step along the rank-``k`` part of the tangent ``direction``.

  ``decompose(direction, k)`` gives that part's singular triplets (exact or
  randomized); ``scale`` is the Frobenius norm of the matrix ``direction``
  was projected from, and singular values under ``_TANGENT_RTOL * scale`` do
  not move the basis.
  """
  u, sigma, v = decompose(direction, min(k, basis.shape[1]))
  sigma = jnp.where(sigma > _TANGENT_RTOL * scale, sigma, 0.0)
  if normalize:
    # Unit Frobenius norm: the geodesic distance travelled is exactly step_size.
    norm = jnp.linalg.norm(sigma)
    sigma = sigma / jnp.where(norm > 0, norm, 1.0)
  return orthonormalize(geodesic(basis, u, sigma, v, step_size))


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------


def _svd_basis(
  grad: jax.Array, rank: int, key: jax.Array | None = None
) -> jax.Array:
  """Top-``rank`` left singular vectors of ``grad`` ``(m, n)``, cost
  ``O(m^2 n)`` for ``m <= n``."""
  del key
  if grad.shape[0] < grad.shape[1]:
    # The left singular vectors of G are the right ones of the tall G^T,
    # whose SVD takes about a fifth less time on XLA:CPU (benchmarks/speed.py).
    _, _, vh = jnp.linalg.svd(grad.T, full_matrices=False)
    return vh[:rank].T
  u, _, _ = jnp.linalg.svd(grad, full_matrices=False)
  return u[:, :rank]


SvdMethod = Literal["exact", "randomized"]


def svd_basis(
  method: SvdMethod = "exact", *, oversample: int = 8, power_iters: int = 2
) -> InitFn:
  """An ``init`` that takes the top-``rank`` left singular vectors of ``grad``.

  ``"exact"``: from ``jnp.linalg.svd`` (cost ``O(m^2 n)``; under sharding the
  solver needs the whole matrix on one device). ``"randomized"``: from
  :func:`randomized_svd` with ``power_iters`` passes, which touches ``G`` only
  through products (``G Omega``, ``G^T Q``), so a sharded gradient is never
  gathered; it needs a key.
  """
  if method == "exact":
    return _svd_basis
  if method != "randomized":
    raise ValueError(
      f"grassjax: svd_method must be 'exact' or 'randomized', got {method!r}."
    )
  _checks.positive_int("oversample", oversample)

  def randomized_basis(grad, rank, key):
    u, _, _ = randomized_svd(
      grad, rank, key, oversample=oversample, power_iters=power_iters
    )
    return u

  return randomized_basis


def svd(svd_method: SvdMethod = "exact") -> SubspaceRule:
  """GaLore's rule: the top-``r`` left singular vectors of the current gradient.

  ``init(G) = update(S, G) = U[:, :r]`` with ``G = U Sigma V^T``. The previous
  basis is discarded. Column signs are those ``jnp.linalg.svd`` returns; they
  matter only when the adaptive optimizer is off (unrotated moments). The SVD
  of a zero or rank-deficient gradient still has orthonormal ``U``.
  ``svd_method="randomized"`` uses a randomized range finder instead
  (:func:`svd_basis`), and the rule then needs a key.

  Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
  Low-Rank Projection" (2024), arXiv:2403.03507.
  """
  init = svd_basis(svd_method)
  return SubspaceRule(
    init=init,
    update=lambda basis, grad, key: init(grad, basis.shape[1], key),
    needs_key=svd_method == "randomized",
    name="svd",
  )


def fixed(svd_method: SvdMethod = "exact") -> SubspaceRule:
  """The SVD basis of the first gradient, never updated (the "no subspace
  update" ablation).

  ``init(G_1) = U[:, :r]`` with ``G_1 = U Sigma V^T`` ``(m, n)``, as
  :func:`svd`; ``update(S, G) = S``.
  """
  return SubspaceRule(
    init=svd_basis(svd_method),
    update=lambda basis, grad, key: basis,
    needs_key=svd_method == "randomized",
    name="fixed",
  )


def tracking(
  step_size: jax.typing.ArrayLike = 10.0,
  *,
  tangent_rank: int = 1,
  normalize: bool = False,
  svd_method: SvdMethod = "exact",
) -> SubspaceRule:
  r"""SubTrack++'s Grassmannian subspace tracking.

  Lowers the projection error ``F(S) = ||G - S A||_F^2`` with ``A = S^T G``
  (the least-squares fit) by one geodesic step. The Riemannian gradient of
  ``F`` at ``S`` is ``-2 R A^T`` with ``R = G - S A``; the step follows the
  *descent* direction, ``(m, r)`` with :math:`S^\top H = 0`,

  .. math::
    H = 2 R A^\top = 2 (G A^\top - S (A A^\top)),

  restricted to its top-``tangent_rank`` singular triplets (one in the
  papers), and moves ``S`` by :func:`geodesic` with ``tau = step_size``.
  ``G A^T`` is formed without the ``(m, n)`` residual. The basis is
  re-orthonormalized (:func:`orthonormalize`) after each step. The first basis
  is the SVD one. Singular values of ``H`` under ``1e-4 ||2 G A^T||_F`` are
  rounding and count as zero, so a gradient inside ``span(S)`` leaves the basis
  where it is.

  The sign: the SubTrack-Grad paper's eq. (6) steps along ``+grad F``, which
  raises the error; the SubTrack++ algorithm uses ``-grad F``, as here.

  Args:
    step_size: ``eta``. With ``normalize=False`` (the papers' convention) the
      rotation angle is ``eta * sigma_1(H)``, so it scales with the squared
      gradient norm; default 10 (SubTrack-Grad, Table 14).
    tangent_rank: rank of the tangent used per step.
    normalize: scale the tangent's singular values to unit Frobenius norm, so
      ``step_size`` is the rotation angle in radians.
    svd_method: how the first basis is made (:func:`svd_basis`); a
      randomized one needs a key.

  Reference: Rajabi et al., "SubTrack++: Gradient Subspace Tracking for
  Scalable LLM Training" (2025).
  """

  _checks.step_size(step_size)
  tangent_rank = _checks.positive_int("tangent_rank", tangent_rank)

  def update(basis, grad, key):
    del key
    a = basis.T @ grad
    ga = grad @ a.T
    direction = 2.0 * (ga - basis @ (a @ a.T))
    return _step_along(
      basis,
      direction,
      2.0 * jnp.linalg.norm(ga),
      step_size,
      tangent_rank,
      normalize,
      top_singular,
    )

  return SubspaceRule(
    init=svd_basis(svd_method),
    update=update,
    needs_key=svd_method == "randomized",
    name="tracking",
  )


# GrassWalk's default rotation angle per update, from sweeps with the LLaMA
# example (python -m benchmarks.walk_angle: tiny model, 600 steps, rank 32, an
# update every 50 steps). At GrassWalk's tuned rate (3e-2) over 3 seeds the
# final eval loss was lowest at pi/2 (1.8076 +- 0.0227; 0.1: 1.8101, 0.5:
# 1.8125), where each update swaps one basis direction for an orthogonal one;
# an earlier one-seed sweep from 0.05 to pi/2 also ended lowest there. No
# difference exceeds the seed noise: the angle matters little at this scale.
# benchmarks/results/walk_angle-cpu.md has the table.
DEFAULT_WALK_ANGLE = math.pi / 2


def random_walk(
  step_size: jax.typing.ArrayLike = DEFAULT_WALK_ANGLE,
  *,
  tangent_rank: int = 1,
  normalize: bool = True,
  svd_method: SvdMethod = "exact",
) -> SubspaceRule:
  """GrassWalk's random walk on the Grassmannian.

  Starts from the SVD basis of the first gradient. On each update step:
  draw ``X ~ N(0, 1)^{m x r}``, project it on the tangent space
  ``H = (I - S S^T) X``, take its top-``tangent_rank`` part ``U Sigma V^T`` by
  :func:`randomized_svd`, and step along the geodesic (:func:`geodesic`), then
  re-orthonormalize. The gradient is not used after the first step.
  Singular values of ``H`` under ``1e-4 ||X||_F`` are rounding and count as
  zero, so with ``r = m`` (no tangent space) the basis stays where it is.

  Args:
    step_size: with ``normalize=True`` (default) the geodesic distance of each
      step in radians: ``Sigma`` is rescaled to unit Frobenius norm, so a
      rank-1 walk rotates one direction of the subspace by exactly
      ``step_size``. Default :data:`DEFAULT_WALK_ANGLE` (``pi / 2``, chosen by
      a sweep; see its comment). With ``normalize=False`` the raw Gaussian
      scale is kept (the papers' literal reading), where ``sigma ~ sqrt(m)``
      turns the tables' step sizes (10 to 10000) into angles of thousands of
      radians.
    tangent_rank: rank of the tangent per step (1: a rank-1 rotation).
    normalize: see ``step_size``.
    svd_method: how the first basis is made (:func:`svd_basis`).

  Reference: "Principled Randomized Exploration of Gradient Subspaces for
  Efficient LLM Training", Section 3, eq. (2).
  """

  _checks.step_size(step_size)
  tangent_rank = _checks.positive_int("tangent_rank", tangent_rank)

  def update(basis, grad, key):
    del grad
    draw_key, svd_key = jax.random.split(key)
    draw = jax.random.normal(draw_key, basis.shape, basis.dtype)
    return _step_along(
      basis,
      tangent(basis, draw),
      jnp.linalg.norm(draw),
      step_size,
      tangent_rank,
      normalize,
      functools.partial(randomized_svd, key=svd_key),
    )

  return SubspaceRule(
    init=svd_basis(svd_method),
    update=update,
    needs_key=True,
    name="random_walk",
  )


def _random_basis(
  shape: tuple[int, ...], dtype, key: jax.Array | None
) -> jax.Array:
  assert key is not None  # the rule needs a key; the optimizer refuses none
  return orthonormalize(jax.random.normal(key, shape, dtype))


def random_jump() -> SubspaceRule:
  """GrassJump's rule: a fresh uniformly random basis on every update step.

  ``S = Q`` from the sign-fixed QR of ``X ~ N(0, 1)^{m x r}`` (Haar-distributed
  on the Stiefel manifold), for the first basis too. The gradient is never
  used.

  Reference: "Principled Randomized Exploration of Gradient Subspaces for
  Efficient LLM Training", Section 3.
  """
  return SubspaceRule(
    init=lambda grad, rank, key: _random_basis(
      (grad.shape[0], rank), grad.dtype, key
    ),
    update=lambda basis, grad, key: _random_basis(
      basis.shape, basis.dtype, key
    ),
    needs_key=True,
    name="random_jump",
  )
