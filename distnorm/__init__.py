"""distnorm: batch normalization for small per-GPU batches.

Public API (see the README): the layers, ``convert_model`` / ``revert_model``,
``check_model``, ``reset_accumulation`` and ``distnorm.distributed.group_by``.
"""

from . import catalogue, distributed, errors, functional, registry, schedules, stats
from .catalogue import (
    SPADE,
    AdaIN,
    ConditionalBatchNorm,
    ConditionalInstanceNorm,
    CosineNorm,
    FilterResponseNorm,
    PositionalNorm,
    moment_shortcut,
)
from .check import check_model
from .distributed.nonfinite import check_nonfinite
from .convert import convert_model, register_variant, revert_model, variants
from .errors import NonFiniteError, SyncError
from .join import joinable
from .population import precise_bn
from .modules import (
    BatchInstanceNorm,
    BatchRenorm,
    CrossIterationBatchNorm,
    CrossMiniBatchNorm,
    CycleBatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    SwitchableNorm,
    SyncBatchNorm,
    accumulation_steps_from,
    load_rank_state_dict,
    rank_state_dict,
    reset_accumulation,
)

__version__ = "0.1.0"

__all__ = [
    "AdaIN",
    "BatchInstanceNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "ConditionalInstanceNorm",
    "CosineNorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "CycleBatchNorm",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "NonFiniteError",
    "PositionalNorm",
    "SPADE",
    "SwitchableNorm",
    "SyncBatchNorm",
    "SyncError",
    "accumulation_steps_from",
    "catalogue",
    "check_model",
    "check_nonfinite",
    "convert_model",
    "distributed",
    "errors",
    "functional",
    "joinable",
    "load_rank_state_dict",
    "moment_shortcut",
    "precise_bn",
    "rank_state_dict",
    "register_variant",
    "registry",
    "reset_accumulation",
    "revert_model",
    "schedules",
    "stats",
    "variants",
]
