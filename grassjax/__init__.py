"""grassjax: memory-efficient training by low-rank gradient projection.

GrassWalk, GrassJump, SubTrack++ and GaLore as optax gradient transformations,
built on :func:`scale_by_subspace_adam` and the subspace rules of
:mod:`grassjax.subspace`.
"""

from grassjax import diagnostics, subspace
from grassjax.alias import galore, grassjump, grasswalk, subtrack_pp
from grassjax.subspace import SubspaceRule
from grassjax.transform import (
  MatrixDimensionNumbers,
  SubspaceAdamState,
  rotate_moments,
  scale_by_subspace_adam,
)

__version__ = "0.1.0"

__all__ = [
  "MatrixDimensionNumbers",
  "SubspaceAdamState",
  "SubspaceRule",
  "diagnostics",
  "galore",
  "grassjump",
  "grasswalk",
  "rotate_moments",
  "scale_by_subspace_adam",
  "subspace",
  "subtrack_pp",
]
