"""The synced BatchNorm family, one variant per file; importing this registers them
with ``convert_model`` (see :mod:`distnorm.registry`)."""

from typing import Any

from ._rank_state import load_rank_state_dict, rank_state_dict
from .batch_instance_norm import BatchInstanceNorm
from .batch_renorm import BatchRenorm
from .cross_iteration import CrossIterationBatchNorm
from .cross_mini_batch import CrossMiniBatchNorm, accumulation_steps_from, reset_accumulation
from .cycle_batch_norm import CycleBatchNorm
from .frozen import FrozenBatchNorm
from .group_norm import GroupNorm
from .switchable_norm import SwitchableNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchInstanceNorm",
    "BatchRenorm",
    "CrossIterationBatchNorm",
    "CrossMiniBatchNorm",
    "CycleBatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "SwitchableNorm",
    "SyncBatchNorm",
    "accumulation_steps_from",
    "load_rank_state_dict",
    "rank_state_dict",
    "reset_accumulation",
]

# The catalogue lived here before distnorm.catalogue: its names stay importable from
# this package. Looked up on first use (PEP 562), since the catalogue imports this
# package (SyncBatchNorm, the input checks) and an import here would close a circle.
_MOVED_TO_CATALOGUE = frozenset({"AdaIN", "ConditionalBatchNorm", "ConditionalInstanceNorm",
                                 "CosineNorm", "FilterResponseNorm", "PositionalNorm", "SPADE",
                                 "moment_shortcut"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_CATALOGUE:
        from .. import catalogue

        return getattr(catalogue, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
