"""Cosine Normalization (Luo et al., ICANN 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import layer_name

__all__ = ["CosineNorm"]


class CosineNorm(nn.Module):
    r"""A linear layer whose pre-activations are cosine similarities.

    .. math::
        y_j = \cos(w_j, x) = \frac{w_j \cdot x}{\max(\lVert w_j \rVert, \epsilon)\,
        \max(\lVert x \rVert, \epsilon)} \in [-1, 1]

    (Luo, Zhan, Xue, Wang, Ren, Yang, "Cosine Normalization: Using Cosine Similarity
    Instead of Dot Product in Neural Networks", ICANN 2018): the dot product of
    ``nn.Linear`` (without bias) with both vectors normalized, so the output is
    bounded whatever the scale of the input or the weights.

    Semantics: no dependence on the batch, nothing to synchronize. ``weight`` has
    ``nn.Linear``'s shape and initialisation; there is no bias (the paper's form).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        eps: keyword-only; lower bound of both norms. Default: 1e-8.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Example::

        >>> head = distnorm.CosineNorm(512, 10)
        >>> logits = head(features) * 16.0   # a scale is usually learned or fixed
    """

    def __init__(self, in_features: int, out_features: int, *, eps: float = 1e-8,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"{layer_name(self)}: expected an input of shape "
                             f"(*, {self.in_features}) (got {tuple(input.shape)})")
        return F.linear(F.normalize(input, dim=-1, eps=self.eps),
                        F.normalize(self.weight, dim=-1, eps=self.eps))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}"
