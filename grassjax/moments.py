r"""Adam's moments, in a subspace that moves.

The bias-corrected Adam direction, the bias correction itself (accurate to
rounding), and :func:`rotate_moments`, the adaptive optimizer (AO) of
"Principled Randomized Exploration of Gradient Subspaces for Efficient LLM
Training" (under review; no arXiv id yet), which carries the moments over to
a new basis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def adam_direction(
  mu: jax.Array,
  nu: jax.Array,
  count: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
) -> jax.Array:
  r"""The bias-corrected Adam direction, as ``optax.scale_by_adam`` computes it.

  .. math::
    D = \frac{M / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon}

  with ``t = count``; every array has the moments' shape.
  """
  mu_hat = mu / (1 - b1**count).astype(mu.dtype)
  nu_hat = nu / (1 - b2**count).astype(nu.dtype)
  return mu_hat / (jnp.sqrt(nu_hat) + eps)


def bias_correction(decay: jax.typing.ArrayLike, steps: jax.Array) -> jax.Array:
  r"""``1 - decay^steps`` in float32, accurate to rounding.

  :math:`V / c_2 - (M / c_1)^2` cancels exactly after one step, so ``c`` must
  match the ``(1 - decay)`` the moments were accumulated with: ``1 - 0.999^t``
  with 0.999 rounded to float32 is off by 1.3e-5 relative, and that error
  would leave a spurious variance. ``-expm1(t log1p(-(1 - decay)))`` with ``1
  - decay`` taken in Python's double precision is exact at ``t = 1``.
  """
  one_minus = 1.0 - decay  # double precision for a Python float
  log_decay = jnp.log1p(-jnp.asarray(one_minus, jnp.float32))
  return -jnp.expm1(steps * log_decay)


def rotate_moments(
  rotation: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  steps: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  r"""Rotates Adam's moments onto a new basis (the adaptive optimizer, AO).

  With :math:`P = S_{new}^\top S_{old}` ``(r, r)``, the bias corrections of
  the moments as they stand, :math:`c_1 = 1 - \beta_1^t`,
  :math:`c_2 = 1 - \beta_2^t` (``t = steps`` already taken, ``t >= 1``), and
  squares taken elementwise:

  .. math::
    M' = P M, \qquad
    V' = c_2 \left| (P \odot P) \left(\frac{V}{c_2} - \frac{M^2}{c_1^2}\right)
         + \left(\frac{P M}{c_1}\right)^2 \right|

  Treating ``M / c1`` and ``V / c2`` as estimates of each coordinate's mean
  and second moment, the variance rotates with ``P * P`` and the squared
  rotated mean is added back. ``V'`` is never negative, and ``P = I`` leaves
  both moments unchanged. (Eq. (6) of the paper, read literally, shrinks
  ``V`` when the basis does not move and can turn it negative.)

  Args:
    rotation: ``P``, ``(r, r)``.
    mu: ``M``, ``(r, n)``.
    nu: ``V``, ``(r, n)``.
    b1: Adam's first decay rate.
    b2: Adam's second decay rate.
    steps: ``t``, the number of steps the moments have seen.

  Returns:
    ``(M', V')``, both ``(r, n)``.

  References:
    "Principled Randomized Exploration of Gradient Subspaces for Efficient
    LLM Training" (under review), Appendix A.
  """
  c1 = bias_correction(b1, steps)
  c2 = bias_correction(b2, steps)
  mean = mu / c1
  variance = nu / c2 - jnp.square(mean)
  rotated_mean = rotation @ mean
  spread = jnp.square(rotation) @ variance
  nu_new = c2 * jnp.abs(spread + jnp.square(rotated_mean))
  return rotated_mean * c1, nu_new
