"""An independent float64 NumPy reading of the low-rank Adam update equations.

Written from the update equations of "Principled Randomized Exploration of
Gradient Subspaces for Efficient LLM Training" (GrassWalk, GrassJump; Section 3
and Appendix A) and of SubTrack++, with these readings where the papers are
ambiguous or, taken literally, wrong (the same ones grassjax documents):

* canonical orientation: a gradient with more rows than columns is handled as
  its transpose, so the basis ``S`` is ``(min(m, n), r)`` (or, projecting the
  longer side, ``(max(m, n), r)``); a square matrix is projected on the left;
* Adam with bias correction and ``eps`` outside the square root, one global
  1-based step count ``t`` that a basis change does not reset;
* the adaptive-optimizer (AO) rotation of the moments in its bias-corrected
  estimator form, applied on the step whose basis changes, before that step's
  gradient enters the moments;
* recovery scaling (RS): per-column factors ``phi``, the residual ``Delta`` of
  the current basis, the ``zeta`` growth limiter (not on the first step) and
  the applied norm carried to the next step across basis changes;
* ``scale`` multiplying the whole low-rank update, recovery term included
  (optionally only the projected part);
* the Grassmann geodesic of a tangent, and SubTrack++'s tracking step along the
  descent direction of the projection error.

Nothing here imports or mirrors grassjax; the tests compare the two. The bases
are inputs: the caller says which basis each update step adopts, so the update
equations are checked whatever a subspace rule draws or however an SVD signs
its vectors. Every array is float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RS_EPS = 1e-8  # in phi's denominator and in the limiter's ratio


def canonical(g: np.ndarray, longer: bool = False) -> tuple[np.ndarray, bool]:
  """``(G, transposed)``: ``G = g`` if ``rows <= cols``, else ``G = g^T``.

  With ``longer``, the other way round: ``G`` has its longer side first (the
  projected side is the longer one). A square ``g`` is never transposed.
  """
  g = np.asarray(g, np.float64)
  rows, cols = g.shape
  transpose = rows < cols if longer else rows > cols
  return (g.T, True) if transpose else (g, False)


def is_update_step(t: int, update_interval: int) -> bool:
  """The basis moves on 1-based step ``t`` iff ``(t - 1) mod T = 0``."""
  return (t - 1) % update_interval == 0


def adam_direction(
  m: np.ndarray, v: np.ndarray, t: int, b1: float, b2: float, eps: float
) -> np.ndarray:
  """``D = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)``, elementwise."""
  return (m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps)


def rotate(
  s_new: np.ndarray,
  s_old: np.ndarray,
  m: np.ndarray,
  v: np.ndarray,
  t: int,
  b1: float,
  b2: float,
) -> tuple[np.ndarray, np.ndarray]:
  """AO: the moments left by step ``t - 1`` carried onto the basis ``s_new``.

  ``P = S_new^T S_old`` (``r x r``), ``c1 = 1 - b1^(t-1)``,
  ``c2 = 1 - b2^(t-1)``, squares elementwise:

      M' = P M
      V' = c2 | (P * P) (V / c2 - M^2 / c1^2) + (P M)^2 / c1^2 |

  i.e. the per-coordinate variance estimate ``V / c2 - (M / c1)^2`` rotates
  with ``P * P`` and the squared rotated mean is added back. ``t`` is the
  1-based step about to be taken, ``t >= 2``.
  """
  p = s_new.T @ s_old
  c1, c2 = 1.0 - b1 ** (t - 1), 1.0 - b2 ** (t - 1)
  m_new = p @ m
  v_new = c2 * np.abs((p * p) @ (v / c2 - m**2 / c1**2) + m_new**2 / c1**2)
  return m_new, v_new


def recovery_term(
  g: np.ndarray,
  s: np.ndarray,
  direction: np.ndarray,
  previous_norm: float,
  zeta: float,
  first: bool,
) -> tuple[np.ndarray, bool]:
  """RS: ``(Lambda, limited)`` for a canonical gradient ``G`` and basis ``S``.

  ``G~ = S^T G``, ``Delta = G - S G~``, ``phi_i = ||D[:, i]|| / (||G~[:, i]|| +
  1e-8)`` and ``Lambda[:, i] = phi_i Delta[:, i]``. Unless ``first``, if
  ``||Lambda|| / (||Lambda_prev|| + 1e-8) > zeta`` (Frobenius norms), ``Lambda``
  is rescaled to the norm ``zeta (||Lambda_prev|| + 1e-8)``.
  """
  g_low = s.T @ g
  delta = g - s @ g_low
  phi = np.linalg.norm(direction, axis=0) / (
    np.linalg.norm(g_low, axis=0) + RS_EPS
  )
  lam = phi[None, :] * delta
  norm = np.linalg.norm(lam)
  limited = (not first) and norm / (previous_norm + RS_EPS) > zeta
  if limited:
    lam = lam * (zeta * (previous_norm + RS_EPS) / norm)
  return lam, bool(limited)


@dataclass
class MatrixState:
  """What the reference keeps for one canonical ``(m, n)`` matrix.

  ``recovery_norms`` and ``limited`` record, per step, ``||Lambda||`` as
  applied and whether the growth limiter fired (empty without RS).
  """

  basis: np.ndarray | None = None
  m: np.ndarray | None = None
  v: np.ndarray | None = None
  recovery_norms: list[float] = field(default_factory=list)
  limited: list[bool] = field(default_factory=list)


def step(
  state: MatrixState,
  g: np.ndarray,
  basis: np.ndarray,
  t: int,
  *,
  update_interval: int,
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

  1. If step ``t`` updates the subspace the basis becomes ``basis`` (it is
     ignored otherwise); from ``t = 2`` on, with AO, the moments are first
     rotated onto it (:func:`rotate`), without AO they are kept as they are.
  2. Adam on ``G~ = S^T G``: ``M = b1 M + (1 - b1) G~``, ``V = b2 V + (1 - b2)
     G~^2``, ``D`` as in :func:`adam_direction`.
  3. The update is ``scale (S D + Lambda)``, or ``scale S D + Lambda`` when
     ``scale_recovery`` is off, with ``Lambda`` from :func:`recovery_term` under
     RS and ``0`` otherwise.
  """
  r = basis.shape[1]
  if t == 1:
    state.basis = basis
    state.m = np.zeros((r, g.shape[1]))
    state.v = np.zeros((r, g.shape[1]))
  elif is_update_step(t, update_interval):
    if adaptive_optimizer:
      state.m, state.v = rotate(basis, state.basis, state.m, state.v, t, b1, b2)
    state.basis = basis
  s = state.basis
  g_low = s.T @ g
  state.m = b1 * state.m + (1.0 - b1) * g_low
  state.v = b2 * state.v + (1.0 - b2) * g_low**2
  direction = adam_direction(state.m, state.v, t, b1, b2, eps)
  low_rank = s @ direction
  if not recovery_scaling:
    return scale * low_rank
  previous = state.recovery_norms[-1] if state.recovery_norms else 0.0
  lam, limited = recovery_term(g, s, direction, previous, zeta, first=t == 1)
  state.recovery_norms.append(float(np.linalg.norm(lam)))
  state.limited.append(limited)
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
  projected_side: str = "shorter",
) -> tuple[list[np.ndarray], MatrixState]:
  """The updates (before the learning rate) for a sequence of gradients.

  Args:
    grads: each step's gradient of one matrix parameter, ``(m, n)`` in the
      parameter's own orientation.
    bases: one per step, the canonical ``(min(m, n), r)`` orthonormal basis
      adopted if that step updates the subspace (ignored on other steps).
    update_interval: ``T``.
    adaptive_optimizer: rotate the moments onto each new basis (AO).
    recovery_scaling: add the rescaled residual ``Lambda`` (RS).
    zeta: the growth limiter of ``||Lambda||``.
    scale: multiplies the low-rank update.
    scale_recovery: whether ``scale`` multiplies ``Lambda`` too.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``, outside the square root.
    projected_side: ``"shorter"``, or ``"longer"``: the bases are then
      ``(max(m, n), r)`` and the moments ``(r, min(m, n))``.

  Returns:
    The updates, each in its gradient's orientation, and the final state.
  """
  state = MatrixState()
  updates = []
  for t, (g, basis) in enumerate(zip(grads, bases, strict=True), start=1):
    g64, transposed = canonical(g, longer=projected_side == "longer")
    u = step(
      state,
      g64,
      np.asarray(basis, np.float64),
      t,
      update_interval=update_interval,
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


# ----------------------------------------------------------------------------
# Grassmann geometry
# ----------------------------------------------------------------------------


def tangent(s: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``H = (I - S S^T) X``, the projection of ``X`` on the tangent space at
  ``S``."""
  return x - s @ (s.T @ x)


def geodesic(s: np.ndarray, h: np.ndarray, tau: float) -> np.ndarray:
  """``S(tau) = S V cos(Sigma tau) V^T + U sin(Sigma tau) V^T + S (I - V V^T)``.

  ``H = U Sigma V^T`` (thin SVD) is a tangent at ``S`` (``S^T H = 0``), both
  ``(m, r)``.
  """
  u, sigma, vt = np.linalg.svd(h, full_matrices=False)
  v = vt.T
  return (
    s @ v @ np.diag(np.cos(sigma * tau)) @ vt
    + u @ np.diag(np.sin(sigma * tau)) @ vt
    + s @ (np.eye(s.shape[1]) - v @ vt)
  )


def geodesic_expm(s: np.ndarray, h: np.ndarray, tau: float) -> np.ndarray:
  """The same curve as ``expm(tau (H S^T - S H^T)) S``.

  The exponent ``A`` is skew-symmetric, so ``i A`` is Hermitian: with ``i A = Q
  diag(w) Q^H``, ``expm(A) = Q diag(exp(-i w)) Q^H``.
  """
  a = tau * (h @ s.T - s @ h.T)
  w, q = np.linalg.eigh(1j * a)
  return ((q * np.exp(-1j * w)) @ q.conj().T).real @ s


def qr_positive(x: np.ndarray) -> np.ndarray:
  """``Q`` of ``X = Q R`` with the signs fixed so that ``diag(R) > 0``."""
  q, r = np.linalg.qr(x)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def rank_k_part(h: np.ndarray, k: int) -> np.ndarray:
  """The top-``k`` part ``U_k Sigma_k V_k^T`` of ``H``'s SVD."""
  u, sigma, vt = np.linalg.svd(h, full_matrices=False)
  return (u[:, :k] * sigma[:k]) @ vt[:k]


def geodesic_step(
  s: np.ndarray, h: np.ndarray, step_size: float, *, k: int = 1, normalize: bool
) -> np.ndarray:
  """``qr_positive(S(step_size))`` along the top-``k`` part of the tangent
  ``H``.

  With ``normalize`` the tangent's singular values are scaled to unit Frobenius
  norm, so ``step_size`` is the geodesic distance travelled, in radians.
  """
  part = rank_k_part(h, k)
  if normalize:
    part = part / np.linalg.norm(part)
  return qr_positive(geodesic(s, part, step_size))


def tracking_step(
  s: np.ndarray, g: np.ndarray, step_size: float, *, normalize: bool = False
) -> np.ndarray:
  """SubTrack++: one geodesic step that lowers ``F(S) = ||G - S S^T G||_F^2``.

  ``A = S^T G`` and ``R = G - S A``; the Riemannian gradient of ``F`` is ``-2 R
  A^T``, so the step follows its negative ``H = 2 R A^T`` (rank-1 part) for a
  canonical gradient ``G``.
  """
  a = s.T @ g
  return geodesic_step(
    s, 2.0 * (g - s @ a) @ a.T, step_size, normalize=normalize
  )


def random_walk_step(s: np.ndarray, x: np.ndarray, angle: float) -> np.ndarray:
  """GrassWalk: rotate by ``angle`` radians along the rank-1 part of
  ``(I - S S^T) X``."""
  return geodesic_step(s, tangent(s, x), angle, normalize=True)


def projection_error(s: np.ndarray, g: np.ndarray) -> float:
  """``F(S) = ||G - S S^T G||_F^2``."""
  return float(np.sum((g - s @ (s.T @ g)) ** 2))
