"""The layers, one variant per file; importing this registers them with convert_model."""

from .batch_renorm import BatchRenorm
from .cross_iteration import CrossIterationBatchNorm
from .cross_mini_batch import CrossMiniBatchNorm, accumulation_steps_from, reset_accumulation
from .frozen import FrozenBatchNorm
from .group_norm import GroupNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchRenorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "SyncBatchNorm",
    "accumulation_steps_from",
    "reset_accumulation",
]
