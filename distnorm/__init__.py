"""distnorm: batch normalization for small per-GPU batches.

Public API (see the README): the layers, ``convert_model`` / ``revert_model`` and
``distnorm.distributed.group_by``.
"""

from . import distributed, functional, schedules, stats
from .convert import convert_model, register_variant, revert_model, variants
from .modules import BatchRenorm, CrossMiniBatchNorm, FrozenBatchNorm, GroupNorm, SyncBatchNorm, reset_accumulation
from .modules import CrossIterationBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "SyncBatchNorm",
    "convert_model",
    "distributed",
    "functional",
    "register_variant",
    "schedules",
    "reset_accumulation",
    "revert_model",
    "stats",
    "variants",
]
