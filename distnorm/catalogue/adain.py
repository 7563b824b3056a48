"""Adaptive Instance Normalization (Huang & Belongie, ICCV 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import layer_name
from ..stats import stats_dtype
from .conditional_instance_norm import check_spatial

__all__ = ["AdaIN"]


class AdaIN(nn.Module):
    r"""Normalize the content per sample and channel, then give it the style's moments.

    .. math::
        y = \sigma(s)\, \frac{c - \mu(c)}{\sigma(c)} + \mu(s), \qquad
        \sigma(\cdot) = \sqrt{\mathrm{Var}(\cdot) + \epsilon}

    (Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive
    Instance Normalization", ICCV 2017). μ and Var are each sample's and channel's
    mean and biased variance over the spatial dims (the content side is
    ``torch.nn.functional.instance_norm``). No learned parameters: the affine map
    comes from the style input.

    Semantics: no dependence on the batch, nothing to synchronize, the same in
    training and eval. Sample n of the content takes the moments of sample n of
    the style: both batches must be equal in size and channels (expand a single
    style yourself with ``style.expand(n, *style.shape[1:])``); the style's
    spatial size may differ from the content's. The gradient flows into both
    inputs. Variances are biased (the paper's definition; the authors' code uses
    ``torch.var``'s unbiased default).

    Args:
        eps: added to both variances. Default: 1e-5.

    Shape:
        - Input: ``content`` ``(N, C, *spatial)``, ``style`` ``(N, C, *spatial')``
          with the same number of spatial dims and more than one spatial element each.
        - Output: same shape and dtype as ``content``.

    Example::

        >>> adain = distnorm.AdaIN()
        >>> t = adain(encoder(content_images), encoder(style_images))
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        check_spatial(self, content, "content")
        check_spatial(self, style, "style")
        if style.shape[:2] != content.shape[:2] or style.dim() != content.dim():
            raise ValueError(f"{layer_name(self)}: style and content must agree in batch size, "
                             f"channels and number of dims (got content "
                             f"{tuple(content.shape)}, style {tuple(style.shape)})")
        dtype = stats_dtype(content)
        var, mean = torch.var_mean(style.to(dtype), dim=tuple(range(2, style.dim())),
                                   correction=0, keepdim=True)
        normalized = F.instance_norm(content, eps=self.eps).to(dtype)
        return (normalized * (var + self.eps).sqrt() + mean).to(content.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
