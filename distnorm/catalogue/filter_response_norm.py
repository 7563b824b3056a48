"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..modules._base import check_input
from ..modules._mixture import channel_view
from ..stats import stats_dtype

__all__ = ["FilterResponseNorm"]


class FilterResponseNorm(nn.Module):
    r"""FRN + TLU: each sample and channel divided by its root mean square, then a
    learned affine map and a learned threshold.

    .. math::
        \nu^2 = \frac{1}{|S|}\sum_{s \in S} x_s^2, \qquad
        y = \max\!\left(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta,\ \tau\right)

    (Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch
    Dependence in the Training of Deep Neural Networks", CVPR 2020), S the spatial
    positions of one sample and channel. There is no mean subtraction: the learned
    threshold τ (TLU) replaces ReLU and keeps units from dying.

    Semantics: no dependence on the batch, nothing to synchronize, the same in
    training and eval. With ``learnable_eps=True`` the epsilon is
    ``eps + |eps_learned|`` with ``eps_learned`` a learned scalar (initial value
    ``learned_eps_init``): the paper learns ε for ``(N, C)`` and 1×1 inputs, where
    ν² is the square of the single element and a fixed small ε makes the layer a
    sign function; the fixed ``eps`` keeps ε above 0.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: the (minimum) epsilon. Default: 1e-6.
        learnable_eps: keyword-only; learn an extra ε ≥ 0. Default: ``False``.
        learned_eps_init: keyword-only; initial ``eps_learned``. Default: 1e-4.

    Shape:
        - Input: ``(N, C, *)``; for ``(N, C)`` the mean runs over one element.
        - Output: same shape and dtype.

    Example::

        >>> frn = distnorm.FilterResponseNorm(64)
        >>> y = frn(torch.randn(2, 64, 16, 16))
    """

    def __init__(self, num_features: int, eps: float = 1e-6, *, learnable_eps: bool = False,
                 learned_eps_init: float = 1e-4, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.learnable_eps = learnable_eps
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.tau = nn.Parameter(torch.zeros(num_features, **kw))
        if learnable_eps:
            self.eps_learned = nn.Parameter(torch.full((1,), float(learned_eps_init), **kw))
        else:
            self.register_parameter("eps_learned", None)

    def forward(self, input: Tensor) -> Tensor:
        check_input(self, input, self.num_features)
        dtype = stats_dtype(input)
        x = input.to(dtype)
        if input.dim() == 2:
            nu2 = x.square()
        else:
            nu2 = x.square().mean(dim=tuple(range(2, input.dim())), keepdim=True)
        eps: Any = self.eps
        if self.eps_learned is not None:
            eps = self.eps_learned.to(dtype).abs() + self.eps
        y = x * torch.rsqrt(nu2 + eps)
        y = y * channel_view(self.weight.to(dtype), input) + channel_view(self.bias.to(dtype), input)
        return torch.maximum(y, channel_view(self.tau.to(dtype), input)).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}"
