"""distnorm: batch normalization for small per-GPU batches.

Public API (see the README): the layers, ``convert_model`` / ``revert_model`` and
``distnorm.distributed.group_by``.
"""

from . import distributed, functional, stats
from .convert import convert_model, register_variant, revert_model, variants
from .modules import FrozenBatchNorm, GroupNorm, SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "FrozenBatchNorm",
    "GroupNorm",
    "SyncBatchNorm",
    "convert_model",
    "distributed",
    "functional",
    "register_variant",
    "revert_model",
    "stats",
    "variants",
]
