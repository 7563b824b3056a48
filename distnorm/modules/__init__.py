"""The layers, one variant per file; importing this registers them with convert_model."""

from .frozen import FrozenBatchNorm
from .group_norm import GroupNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = ["FrozenBatchNorm", "GroupNorm", "SyncBatchNorm"]
