"""An independent float64 NumPy reading of the low-rank Adam update equations.

Written from the equations of "Principled Randomized Exploration of Gradient
Subspaces for Efficient LLM Training" (Section 3, Appendix A) and SubTrack++,
with the conventions grassjax documents where the papers are ambiguous: the
canonical orientation (a tall matrix is handled as its transpose), one global
1-based step count, Adam with bias correction and ``eps`` outside the square
root, the adaptive-optimizer (AO) rotation in its bias-corrected estimator
form, recovery scaling (RS) with per-column factors and the ``zeta`` growth
limiter, and ``scale`` multiplying the whole low-rank update. Nothing here
calls grassjax: the tests compare the two.

Subspace bases are inputs: the caller says which basis holds on each step, so a
comparison never depends on how a rule draws or decomposes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RS_EPS = 1e-8  # in phi's denominator and the limiter's ratio


def canonical(g: np.ndarray) -> tuple[np.ndarray, bool]:
  """``(G, transposed)`` with ``G`` of shape ``(m, n)``, ``m <= n``."""
  return (g.T, True) if g.shape[0] > g.shape[1] else (g, False)


def rotate(
  s_new: np.ndarray, s_old: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, b1, b2
):
  """AO: moments of step ``t - 1`` carried onto the basis ``s_new``.

  With ``P = S_new^T S_old``, ``c1 = 1 - b1^(t-1)``, ``c2 = 1 - b2^(t-1)``:
  ``M' = P M`` and ``V' = c2 | (P * P) (V / c2 - M^2 / c1^2) + (P M)^2 / c1^2 |``.
  """
  p = s_new.T @ s_old
  c1, c2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
  m_new = p @ m
  v_new = c2 * np.abs((p * p) @ (v / c2 - m**2 / c1**2) + m_new**2 / c1**2)
  return m_new, v_new


@dataclass
class MatrixState:
  """What the reference keeps for one canonical ``(m, n)`` matrix."""

  basis: np.ndarray | None = None
  m: np.ndarray | None = None
  v: np.ndarray | None = None
  recovery_norm: float = 0.0
  limited: list[bool] = field(default_factory=list)


def step(
  state: MatrixState,
  g: np.ndarray,
  basis: np.ndarray,
  t: int,
  update_interval: int,
  *,
  adaptive_optimizer: bool,
  recovery_scaling: bool,
  zeta: float,
  scale: float,
  scale_recovery: bool,
  b1: float,
  b2: float,
  eps: float,
) -> np.ndarray:
  """One step on a canonical ``(m, n)`` gradient; returns the ``(m, n)`` update.

  ``basis`` is the ``(m, r)`` basis to adopt if step ``t`` (1-based) updates
  the subspace (``(t - 1) % update_interval == 0``); it is ignored otherwise.
  The update is ``scale (S D + Lambda)`` (``scale S D + Lambda`` when
  ``scale_recovery`` is off), with ``D`` Adam's direction in the subspace.
  """
  r = basis.shape[1]
  if t == 1:
    state.basis = basis
    state.m = np.zeros((r, g.shape[1]))
    state.v = np.zeros((r, g.shape[1]))
  elif (t - 1) % update_interval == 0:
    if adaptive_optimizer:
      state.m, state.v = rotate(basis, state.basis, state.m, state.v, t, b1, b2)
    state.basis = basis
  s = state.basis
  g_low = s.T @ g
  state.m = b1 * state.m + (1 - b1) * g_low
  state.v = b2 * state.v + (1 - b2) * g_low**2
  direction = (state.m / (1 - b1**t)) / (np.sqrt(state.v / (1 - b2**t)) + eps)
  low_rank = s @ direction
  if not recovery_scaling:
    return scale * low_rank
  residual = g - s @ g_low
  phi = np.linalg.norm(direction, axis=0) / (np.linalg.norm(g_low, axis=0) + RS_EPS)
  lam = phi[None, :] * residual
  norm = np.linalg.norm(lam)
  limited = t > 1 and norm / (state.recovery_norm + RS_EPS) > zeta
  if limited:
    lam *= zeta * (state.recovery_norm + RS_EPS) / norm
  state.limited.append(bool(limited))
  state.recovery_norm = float(np.linalg.norm(lam))
  return scale * (low_rank + lam) if scale_recovery else scale * low_rank + lam


def run(
  grads: Sequence[np.ndarray],
  bases: Sequence[np.ndarray],
  *,
  update_interval: int,
  adaptive_optimizer: bool,
  recovery_scaling: bool,
  zeta: float = 1.01,
  scale: float = 1.0,
  scale_recovery: bool = True,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> tuple[list[np.ndarray], MatrixState]:
  """Updates of a sequence of gradients of one matrix parameter.

  Args:
    grads: the gradient of each step, ``(m, n)`` in the parameter's own
      orientation.
    bases: for each step, the canonical ``(min(m, n), r)`` basis adopted if the
      step updates the subspace.
    update_interval: ``T``.
    adaptive_optimizer, recovery_scaling, zeta, scale, scale_recovery, b1, b2,
    eps: as in ``grassjax.scale_by_subspace_adam``.

  Returns:
    The updates (in the parameter's orientation) and the final state, whose
    ``limited`` lists whether the growth limiter fired on each step.
  """
  state = MatrixState()
  updates = []
  for t, (g, basis) in enumerate(zip(grads, bases, strict=True), start=1):
    g64, transposed = canonical(np.asarray(g, np.float64))
    u = step(
      state,
      g64,
      np.asarray(basis, np.float64),
      t,
      update_interval,
      adaptive_optimizer=adaptive_optimizer,
      recovery_scaling=recovery_scaling,
      zeta=zeta,
      scale=scale,
      scale_recovery=scale_recovery,
      b1=b1,
      b2=b2,
      eps=eps,
    )
    updates.append(u.T if transposed else u)
  return updates, state


def geodesic(s: np.ndarray, h: np.ndarray, tau: float) -> np.ndarray:
  """``S(tau) = S V cos(Sigma tau) V^T + U sin(Sigma tau) V^T + S (I - V V^T)``.

  ``H = U Sigma V^T`` is a tangent at ``S`` (``S^T H = 0``), both ``(m, r)``.
  """
  u, sigma, vt = np.linalg.svd(h, full_matrices=False)
  v = vt.T
  r = s.shape[1]
  return (
    s @ v @ np.diag(np.cos(sigma * tau)) @ vt
    + u @ np.diag(np.sin(sigma * tau)) @ vt
    + s @ (np.eye(r) - v @ vt)
  )


def qr_positive(x: np.ndarray) -> np.ndarray:
  """``Q`` of ``x = Q R`` with ``diag(R) > 0``."""
  q, r = np.linalg.qr(x)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def tracking_step(s: np.ndarray, g: np.ndarray, step_size: float) -> np.ndarray:
  """SubTrack++'s basis update, rank-1 tangent, raw step, then QR.

  ``A = S^T G``, ``H = 2 (G - S A) A^T`` (minus the Riemannian gradient of
  ``||G - S A||_F^2``), its top singular triplet as the tangent.
  """
  a = s.T @ g
  h = 2.0 * (g - s @ a) @ a.T
  u, sigma, vt = np.linalg.svd(h, full_matrices=False)
  rank1 = sigma[0] * np.outer(u[:, 0], vt[0])
  return qr_positive(geodesic(s, rank1, step_size))
