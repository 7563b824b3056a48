"""The layers, one variant per file; importing this registers them with convert_model."""

from .adain import AdaIN
from .batch_instance_norm import BatchInstanceNorm
from .batch_renorm import BatchRenorm
from .conditional_batch_norm import ConditionalBatchNorm
from .conditional_instance_norm import ConditionalInstanceNorm
from .cosine_norm import CosineNorm
from .cross_iteration import CrossIterationBatchNorm
from .cross_mini_batch import CrossMiniBatchNorm, accumulation_steps_from, reset_accumulation
from .filter_response_norm import FilterResponseNorm
from .frozen import FrozenBatchNorm
from .group_norm import GroupNorm
from .positional_norm import PositionalNorm, moment_shortcut
from ._rank_state import load_rank_state_dict, rank_state_dict
from .spade import SPADE
from .switchable_norm import SwitchableNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "AdaIN",
    "BatchInstanceNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "ConditionalInstanceNorm",
    "CosineNorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "PositionalNorm",
    "SPADE",
    "SwitchableNorm",
    "SyncBatchNorm",
    "accumulation_steps_from",
    "load_rank_state_dict",
    "moment_shortcut",
    "rank_state_dict",
    "reset_accumulation",
]
