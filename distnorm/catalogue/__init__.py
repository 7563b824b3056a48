"""The catalogue: normalization layers beside the synced BatchNorm family.

Layers that are not a drop-in for BatchNorm — ``convert_model`` never creates
them — each used where its paper uses it: batch-independent ones (FilterResponseNorm,
PositionalNorm, CosineNorm, a cosine-similarity linear layer), and conditional
ones that take a second input (ConditionalInstanceNorm, AdaIN; ConditionalBatchNorm
and SPADE, whose BatchNorm part is a :class:`~distnorm.SyncBatchNorm`, synced over
their ``process_group``).

The mixtures BatchInstanceNorm and SwitchableNorm stay in :mod:`distnorm.modules`:
they are BatchNorm variants (``convert_model(mode="bin" / "switchable")``, revertible,
``nn.BatchNorm``'s state_dict).
"""

from .adain import AdaIN
from .conditional_batch_norm import ConditionalBatchNorm
from .conditional_instance_norm import ConditionalInstanceNorm
from .cosine_norm import CosineNorm
from .filter_response_norm import FilterResponseNorm
from .positional_norm import PositionalNorm, moment_shortcut
from .spade import SPADE

__all__ = [
    "AdaIN",
    "ConditionalBatchNorm",
    "ConditionalInstanceNorm",
    "CosineNorm",
    "FilterResponseNorm",
    "PositionalNorm",
    "SPADE",
    "moment_shortcut",
]
