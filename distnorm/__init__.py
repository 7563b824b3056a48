"""distnorm: batch normalization for small per-GPU batches.

Public API (see the README): the layers, ``convert_model`` / ``revert_model``,
``reset_accumulation`` and ``distnorm.distributed.group_by``.
"""

from . import distributed, errors, functional, schedules, stats
from .convert import convert_model, register_variant, revert_model, variants
from .errors import NonFiniteError, SyncError
from .modules import (
    BatchRenorm,
    CrossIterationBatchNorm,
    CrossMiniBatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    SyncBatchNorm,
    accumulation_steps_from,
    reset_accumulation,
)

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "NonFiniteError",
    "SyncBatchNorm",
    "SyncError",
    "accumulation_steps_from",
    "convert_model",
    "distributed",
    "errors",
    "functional",
    "register_variant",
    "reset_accumulation",
    "revert_model",
    "schedules",
    "stats",
    "variants",
]
