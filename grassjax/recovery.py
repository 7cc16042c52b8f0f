r"""Recovery scaling (RS): the gradient outside the subspace, added back.

The part of each column of the gradient that the basis misses is rescaled by
the ratio the subspace's Adam step gave that column, and the whole term is
kept from growing faster than a factor ``zeta`` per step. From "Principled
Randomized Exploration of Gradient Subspaces for Efficient LLM Training"
(under review), Appendix A; the same device appears in Fira and SubTrack++.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grassjax.layout import MatrixLayout

# Guards the ratios of recovery scaling against zero denominators.
EPS = 1e-8


def cancellation_tolerance(basis_dtype: jax.typing.DTypeLike) -> float:
  r"""The share of :math:`\sum_i \phi_i^2 \|G_{:,i}\|^2` under which
  :math:`\|\Lambda\|^2` is taken from the explicit residual.

  ``||G||^2 - ||S^T G||^2`` is off by about the basis's orthonormality error
  times ``||G||^2`` (a few ulps of the dtype the basis is stored in); above
  this share that is at most a few percent of ``||Lambda||^2``.
  """
  return max(1e-3, 16 * float(jnp.finfo(basis_dtype).eps))


def recovery_update(
  layout: MatrixLayout,
  grad: jax.Array,
  grad_low: jax.Array,
  direction: jax.Array,
  basis: jax.Array,
  previous_norm: jax.Array,
  limit_growth: jax.Array,
  *,
  zeta: jax.typing.ArrayLike,
  scale: jax.typing.ArrayLike,
  scale_recovery: bool,
  basis_dtype: jax.typing.DTypeLike,
  projection_dtype: jax.typing.DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""The update ``scale (S D + Lambda)`` of one matrix, and ``||Lambda||``.

  With :math:`\tilde G = S^\top G` ``(r, n)``, the Adam direction ``D`` ``(r,
  n)`` and the residual :math:`\Delta = G - S \tilde G`, per column ``i``:

  .. math::
    \phi_i = \frac{\|D_{:,i}\|}{\|\tilde G_{:,i}\| + 10^{-8}}, \qquad
    \Lambda_{:,i} = \phi_i \Delta_{:,i}

  and, when ``limit_growth`` and :math:`\|\Lambda\|_F > \zeta
  (\|\Lambda_{prev}\|_F + 10^{-8})`, ``Lambda`` is rescaled to that norm.

  ``S D + Lambda`` is formed as ``S (D - c G~) + c G`` with ``c`` the column
  scales, and :math:`\|\Delta_{:,i}\|^2` as :math:`\|G_{:,i}\|^2 -
  \|\tilde G_{:,i}\|^2`, so the step costs one product with ``S`` beyond
  ``S^T G`` and no ``(m, n)`` buffer beyond the gradient and the update.
  Where that difference is mostly rounding (under
  :func:`cancellation_tolerance` of :math:`\sum_i \phi_i^2
  \|G_{:,i}\|^2`: ``G`` lies nearly in the subspace), ``||Lambda||`` comes
  from the explicit ``Delta`` instead, behind a ``lax.cond``.

  Args:
    layout: the parameter's layout; ``grad`` is one of its views.
    grad: ``G`` as a view ``(a, b)``.
    grad_low: ``G~``, ``(r, n)``, float32.
    direction: ``D``, ``(r, n)``, float32.
    basis: ``S``, ``(m, r)``, float32.
    previous_norm: :math:`\|\Lambda_{prev}\|_F`, a float32 scalar.
    limit_growth: whether the limiter applies (not on the first step).
    zeta: the growth limit, ``> 0``.
    scale: multiplies ``S D`` (and ``Lambda`` if ``scale_recovery``).
    scale_recovery: whether ``scale`` multiplies ``Lambda``.
    basis_dtype: the dtype the basis is stored in (its rounding sets the
      cancellation tolerance).
    projection_dtype: dtype of the product with ``S`` (float32 if ``None``).

  Returns:
    The update as a float32 view, and the norm of the ``Lambda`` it holds.
  """
  low_sq = jnp.sum(jnp.square(grad_low), axis=0)
  phi = jnp.linalg.norm(direction, axis=0) / (jnp.sqrt(low_sq) + EPS)
  weights = jnp.square(phi)
  grad32 = grad.astype(jnp.float32)
  col_sq = layout.column_sum(jnp.square(grad32))
  lam_sq = jnp.sum(weights * jnp.maximum(col_sq - low_sq, 0.0))

  def explicit_lam_sq():
    residual = grad32 - layout.expand(basis, grad_low)
    return jnp.sum(weights * layout.column_sum(jnp.square(residual)))

  lam_sq = jax.lax.cond(
    lam_sq < cancellation_tolerance(basis_dtype) * jnp.sum(weights * col_sq),
    explicit_lam_sq,
    lambda: lam_sq,
  )
  lam_norm = jnp.sqrt(lam_sq)
  cap = zeta * (previous_norm + EPS)
  limit = limit_growth & (lam_norm > cap)
  factor = jnp.where(limit, cap / jnp.where(limit, lam_norm, 1.0), 1.0)
  col_scale = phi * factor * (scale if scale_recovery else 1.0)
  low = scale * direction - col_scale * grad_low
  update = layout.expand(basis, low, projection_dtype)
  update = update + layout.scale_columns(grad32, col_scale)
  return update, lam_norm * factor
