"""Switchable Normalization (Luo et al., ICLR 2019)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import register_variant
from ..functional import group_moments_with_grad
from ..stats import Moments, stats_dtype
from ._base import BatchNormBase
from ._mixture import MixtureBase, channel_view, instance_moments, moments_over

__all__ = ["SwitchableNorm"]

#: The BN logit ``convert_model(mode="switchable")`` starts from (IN and LN at 0):
#: softmax weight 1 − 2e⁻⁸/(1 + 2e⁻⁸) ≈ 0.99933 on BatchNorm's mean and variance.
CONVERT_BN_LOGIT = 8.0


@register_variant("switchable")
class SwitchableNorm(MixtureBase):
    r"""Normalization with a learned softmax mixture of IN, LN and BN statistics.

    .. math::
        \mu = \sum_{k \in \{IN, LN, BN\}} w_k \mu_k, \quad
        \sigma^2 = \sum_k w'_k \sigma^2_k, \quad
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with :math:`w = \mathrm{softmax}(\text{mean\_weight})` and
    :math:`w' = \mathrm{softmax}(\text{var\_weight})` (Luo et al., "Differentiable
    Learning-to-Normalize via Switchable Normalization", ICLR 2019). The three
    statistics are the mean and biased variance over: the spatial dims of each
    sample and channel (IN), the channels and spatial dims of each sample (LN), and
    the batch and spatial dims of each channel (BN) — the last over the whole
    process group's batch, as in :class:`SyncBatchNorm`.

    Semantics:

    * The BatchNorm statistics are synced like :class:`SyncBatchNorm`:
      count-weighted moments of the concatenated batch in one all-reduce forward;
      their gradient (∂L/∂μ_BN, ∂L/∂σ²_BN summed over ranks) in one all-reduce of
      2C numbers backward; running statistics of the whole group; no collective
      in eval. With W ranks the output, input gradient, summed parameter gradients
      and running statistics equal the unsynced layer's on the concatenated batch.
    * Eval mode replaces μ_BN, σ²_BN by ``running_mean``, ``running_var``; IN and
      LN statistics stay per sample.
    * ``mean_weight`` and ``var_weight`` are three logits each, in the order
      (IN, LN, BN), shared by all channels, as in the paper's code. A layer built
      directly starts from equal logits (``bn_logit=0``: weights 1/3 each, the
      paper's initialisation). ``convert_model(mode="switchable")`` starts from
      ``bn_logit=8`` (IN and LN logits 0): 99.93 % of both mixtures is BatchNorm,
      so the converted model computes almost what the BatchNorm model did, while
      the IN and LN logits still receive gradient (a softmax weight of exactly
      1 would need an infinite logit and would never move). Pass ``bn_logit=…``
      to ``convert_model`` to choose another start.
    * Variances are biased for all three statistics (the paper's equations; the
      official code uses an unbiased IN variance).
    * The state_dict holds BatchNorm's keys plus ``mean_weight`` and
      ``var_weight``; a plain BatchNorm checkpoint loads (the logits keep their
      values). ``revert_model`` gives back the BatchNorm part only.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the mixed variance. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics for the BN part. Default: ``True``.
        process_group: the group the BN statistics are synced over; ``None`` = the
            default (world) group, resolved at every forward.
        bn_logit: keyword-only; the initial BN logit of both mixtures (IN and LN
            start at 0). Default: 0.

    Shape:
        - Input: ``(N, C, *)`` (1-D, 2-D, 3-D); ``N`` may differ across ranks and be 0.
          For ``(N, C)`` the IN statistics are the element itself (variance 0).
        - Output: same shape and dtype as the input.

    Example::

        >>> layer = distnorm.SwitchableNorm(64)
        >>> y = layer(torch.randn(8, 64, 32, 32))
        >>> model = distnorm.convert_model(torchvision.models.resnet50(), mode="switchable")
    """

    _extra_parameters = ("mean_weight", "var_weight")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, *, bn_logit: float = 0.0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)
        self.bn_logit = float(bn_logit)
        kw = {"device": device, "dtype": dtype}
        self.mean_weight = nn.Parameter(torch.empty(3, **kw))
        self.var_weight = nn.Parameter(torch.empty(3, **kw))
        self._reset_logits()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "mean_weight" in self._parameters:  # not yet created in _BatchNorm.__init__
            self._reset_logits()

    def _reset_logits(self) -> None:
        with torch.no_grad():
            for logits in (self.mean_weight, self.var_weight):
                logits.copy_(torch.tensor([0.0, 0.0, self.bn_logit]))

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, process_group: Optional[Any] = None,
                        **options: Any) -> BatchNormBase:
        """A SwitchableNorm sharing ``bn``'s parameters and buffers, BN-dominant
        (``bn_logit=8`` unless given; see the class docstring)."""
        options.setdefault("bn_logit", CONVERT_BN_LOGIT)
        return super().from_batch_norm(bn, process_group, **options)

    def mixture_weights(self) -> Tuple[Tensor, Tensor]:
        """The softmax weights (IN, LN, BN) of the mean and of the variance."""
        return self.mean_weight.softmax(0), self.var_weight.softmax(0)

    def _mix(self, input: Tensor, group: Optional[Any], batch_stats: bool) -> Tensor:
        dtype = stats_dtype(input)
        if batch_stats:
            mean_bn, var_bn, count = group_moments_with_grad(input, group, self._sync_context())
            self._update_running_stats(Moments(count, mean_bn.detach(), var_bn.detach()))
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mean_in, var_in = instance_moments(input)
        x = input.to(dtype)
        mean_ln, var_ln = moments_over(x, tuple(range(1, input.dim())))
        w_mean = self.mean_weight.to(dtype).softmax(0)
        w_var = self.var_weight.to(dtype).softmax(0)
        mean = (w_mean[0] * mean_in + w_mean[1] * mean_ln
                + w_mean[2] * channel_view(mean_bn.to(dtype), input))
        var = (w_var[0] * var_in + w_var[1] * var_ln
               + w_var[2] * channel_view(var_bn.to(dtype), input))
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * channel_view(self.weight.to(dtype), input) \
                + channel_view(self.bias.to(dtype), input)
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.bn_logit:
            text += f", bn_logit={self.bn_logit}"
        return text
