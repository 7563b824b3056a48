"""Positional Normalization (Li et al., NeurIPS 2019)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import layer_name
from ..stats import stats_dtype

__all__ = ["PositionalNorm", "moment_shortcut"]


def moment_shortcut(x: Tensor, mean: Optional[Tensor] = None,
                    std: Optional[Tensor] = None) -> Tensor:
    r"""PONO's moment shortcut (MS): re-inject moments taken earlier in the network.

    .. math:: y = x \cdot \sigma + \mu

    ``mean`` and ``std`` are what :class:`PositionalNorm` returned for an earlier
    (encoder) layer with the same spatial size; they broadcast over ``x``'s
    channels. Either may be ``None`` (skipped). Out of place; differentiable.
    """
    if std is not None:
        x = x * std
    if mean is not None:
        x = x + mean
    return x


class PositionalNorm(nn.Module):
    r"""Normalize each position across channels; return the moments too.

    .. math::
        \mu_{n,s} = \frac{1}{C}\sum_c x_{n,c,s}, \quad
        \sigma_{n,s} = \sqrt{\frac{1}{C}\sum_c (x_{n,c,s} - \mu_{n,s})^2 + \epsilon},
        \quad y = \frac{x - \mu}{\sigma}

    (Li, Wu, Lim, Belongie, Weinberger, "Positional Normalization", NeurIPS 2019),
    s a spatial position of sample n. The moments carry structural information
    that the paper passes on to a later layer through the *moment shortcut*:
    ``moment_shortcut(h, mean, std)`` (= ``h·std + mean``), also available as
    :meth:`PositionalNorm.moment_shortcut`.

    Semantics: no dependence on the batch, nothing to synchronize, the same in
    training and eval, no parameters. The variance is biased (the paper's equation;
    its code uses ``torch.var``'s unbiased default).

    Args:
        eps: added to the variance. Default: 1e-5.

    Shape:
        - Input: ``(N, C, *)``.
        - Output: ``(y, mean, std)``: ``y`` like the input; ``mean`` and ``std``
          ``(N, 1, *)``, in float32 for half inputs.

    Example::

        >>> pono = distnorm.PositionalNorm()
        >>> h, mean, std = pono(encoder_features)
        >>> out = distnorm.moment_shortcut(decoder_features, mean, std)
    """

    moment_shortcut = staticmethod(moment_shortcut)

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, input: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if input.dim() < 2:
            raise ValueError(f"{layer_name(self)}: expected an (N, C, *) input of at least 2D "
                             f"(got {input.dim()}D input of shape {tuple(input.shape)})")
        x = input.to(stats_dtype(input))
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        std = (var + self.eps).sqrt()
        return ((x - mean) / std).to(input.dtype), mean, std

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
