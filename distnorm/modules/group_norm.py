"""GroupNorm as a drop-in for BatchNorm (Wu & He, "Group Normalization", ECCV 2018)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import register_variant

__all__ = ["GroupNorm", "largest_divisor"]


def largest_divisor(channels: int, at_most: int) -> int:
    """The largest divisor of ``channels`` not above ``at_most`` (at least 1)."""
    if at_most < 1:
        raise ValueError(f"num_groups must be at least 1 (got {at_most})")
    return max(g for g in range(1, min(channels, at_most) + 1) if channels % g == 0)


@register_variant("gn", revertible=False)
class GroupNorm(nn.GroupNorm):
    r"""``torch.nn.GroupNorm`` that records it replaced a BatchNorm.

    G groups of C/G channels, statistics per sample and group: no dependence on
    the batch and nothing to synchronize. Made by ``convert_model(mode="gn")``
    with G the largest divisor of C not above ``num_groups`` (32, the paper's
    choice); γ and β are BatchNorm's. Converting a trained BN model changes its
    function (GN has no running statistics): it is for training or fine-tuning,
    and it cannot be reverted.
    """

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, process_group: Any = None,
                        num_groups: int = 32) -> "GroupNorm":
        """GroupNorm with ``bn``'s eps, affine flag, γ and β; ``process_group`` is unused."""
        channels = bn.num_features
        ref = bn.weight if getattr(bn, "weight", None) is not None else bn.running_mean
        layer = cls(largest_divisor(channels, num_groups), channels, bn.eps, bn.affine,
                    device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None else None)
        if bn.affine:
            for name in ("weight", "bias"):
                value = getattr(bn, name)
                setattr(layer, name, value if isinstance(value, nn.Parameter)
                        else nn.Parameter(value.detach().clone()))
        layer.train(bn.training)
        return layer

    def to_batch_norm(self) -> nn.Module:
        """Refused: GroupNorm has no running statistics to give back.

        Raises:
            ValueError: always (``revert_model`` names the layer).
        """
        raise ValueError("GroupNorm has no running statistics (convert_model(mode='gn') "
                         "is one-way)")
