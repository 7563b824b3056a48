"""Conditional Instance Normalization (Dumoulin, Shlens & Kudlur, ICLR 2017)."""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import layer_name
from ..modules._base import check_input

__all__ = ["ConditionalInstanceNorm"]

StyleIndex = Union[int, Sequence[int], Tensor]


def check_spatial(layer: nn.Module, x: Tensor, what: str = "input") -> None:
    """Instance statistics need at least two elements per sample and channel."""
    if x.dim() < 3 or math.prod(x.shape[2:]) < 2:
        raise ValueError(f"{layer_name(layer)}: instance statistics need an (N, C, *spatial) "
                         f"{what} with more than one spatial element (got shape "
                         f"{tuple(x.shape)})")


class ConditionalInstanceNorm(nn.Module):
    r"""InstanceNorm with one (γ, β) pair per style, picked per sample.

    .. math::
        y_n = \gamma_{s_n} \frac{x_n - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}} + \beta_{s_n}

    (Dumoulin, Shlens, Kudlur, "A Learned Representation for Artistic Style",
    ICLR 2017): one network renders ``num_styles`` styles; sample n uses style
    :math:`s_n`. μ_n, σ²_n are each channel's mean and biased variance over the
    spatial dims (``torch.nn.functional.instance_norm``).

    Semantics: no dependence on the batch, nothing to synchronize, the same in
    training and eval. ``weight`` and ``bias`` are ``(num_styles, C)``, starting at
    1 and 0. Style indices are checked on the host (one small read) so that an
    index out of range is a ``ValueError``, not a device-side assert.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        num_styles: number of styles.
        eps: added to the variance. Default: 1e-5.

    Shape:
        - Input: ``x`` ``(N, C, *spatial)`` with more than one spatial element;
          ``style_index`` an int (every sample), or ``N`` ints (list or integer
          tensor of shape ``(N,)``).
        - Output: same shape and dtype as ``x``.

    Example::

        >>> cin = distnorm.ConditionalInstanceNorm(64, num_styles=32)
        >>> y = cin(torch.randn(4, 64, 32, 32), torch.tensor([0, 3, 3, 31]))
    """

    def __init__(self, num_features: int, num_styles: int, eps: float = 1e-5, *,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_styles = num_styles
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_styles, num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_styles, num_features, **kw))

    def _indices(self, style_index: StyleIndex, n: int) -> Tensor:
        index = torch.as_tensor(style_index, device=self.weight.device)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"{layer_name(self)}: style_index must hold integers "
                             f"(got dtype {index.dtype})")
        if index.dim() == 0:
            index = index.expand(n)
        if index.shape != (n,):
            raise ValueError(f"{layer_name(self)}: expected one style index per sample, "
                             f"shape ({n},) or a single int (got shape {tuple(index.shape)})")
        if n:
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= self.num_styles:
                bad = low if low < 0 else high
                raise ValueError(f"{layer_name(self)}: style index {bad} out of range "
                                 f"[0, {self.num_styles})")
        return index.long()

    def forward(self, x: Tensor, style_index: StyleIndex) -> Tensor:
        check_input(self, x, self.num_features)
        check_spatial(self, x)
        index = self._indices(style_index, x.shape[0])
        shape = (x.shape[0], self.num_features) + (1,) * (x.dim() - 2)
        normalized = F.instance_norm(x, eps=self.eps)
        y = normalized * self.weight[index].view(shape) + self.bias[index].view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_styles={self.num_styles}, eps={self.eps}"
