"""grassjax: memory-efficient training by low-rank gradient projection.

GrassWalk, GrassJump, SubTrack++ and GaLore as optax gradient
transformations: :func:`low_rank_adamw` and its presets, built on
:func:`scale_by_subspace_adam` and the subspace rules of
:mod:`grassjax.subspace`.
"""

from grassjax import (
  diagnostics,
  layout,
  moments,
  quantization,
  recovery,
  subspace,
)
from grassjax.alias import (
  OPTIMIZERS,
  OptimizerInfo,
  adamw,
  galore,
  grassjump,
  grasswalk,
  low_rank_adamw,
  subtrack_pp,
)
from grassjax.layout import MatrixDimensionNumbers, MatrixLayout
from grassjax.moments import rotate_moments
from grassjax.subspace import SubspaceRule
from grassjax.transform import SubspaceAdamState, scale_by_subspace_adam

__version__ = "0.1.0"

__all__ = [
  "OPTIMIZERS",
  "MatrixDimensionNumbers",
  "MatrixLayout",
  "OptimizerInfo",
  "SubspaceAdamState",
  "SubspaceRule",
  "adamw",
  "diagnostics",
  "galore",
  "grassjump",
  "grasswalk",
  "layout",
  "low_rank_adamw",
  "moments",
  "quantization",
  "recovery",
  "rotate_moments",
  "scale_by_subspace_adam",
  "subspace",
  "subtrack_pp",
]
