"""Batch-Instance Normalization (Nam & Kim, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_variant
from ..functional import batch_norm_with_moments
from ..stats import group_moments, stats_dtype
from ._mixture import MixtureBase, channel_view, instance_moments

__all__ = ["BatchInstanceNorm"]


@register_variant("bin")
class BatchInstanceNorm(MixtureBase):
    r"""A per-channel blend of BatchNorm and InstanceNorm, with a learned gate ρ.

    .. math::
        y = \gamma \left(\rho\, \hat x_{BN} + (1 - \rho)\, \hat x_{IN}\right) + \beta,
        \qquad \rho \in [0, 1]^C

    (Nam & Kim, "Batch-Instance Normalization for Adaptively Style-Invariant Neural
    Networks", NeurIPS 2018). :math:`\hat x_{BN} = (x - \mu_B)/\sqrt{\sigma^2_B +
    \epsilon}` uses the statistics of the whole process group's batch, exactly as
    :class:`SyncBatchNorm`; :math:`\hat x_{IN} = (x - \mu_I)/\sqrt{\sigma^2_I +
    \epsilon}` those of each sample and channel over the spatial dims (biased
    variance, as ``nn.InstanceNorm``). A channel with ρ = 1 is BatchNorm, one with
    ρ = 0 is InstanceNorm (it discards each image's "style": contrast, colour).

    Semantics:

    * The BatchNorm part is synced like :class:`SyncBatchNorm` (count-weighted
      moments of the concatenated batch, one all-reduce forward and one backward,
      running statistics of the whole group, no collective in eval). The instance
      part is per sample and needs no communication.
    * ρ is clipped to [0, 1] after every optimizer step, as in the paper — without
      a hook in the training loop: every forward (training and eval) first clamps
      ``rho`` in place, under ``no_grad``, so the value an optimizer step pushed out
      of range is clipped before anything uses it and ``layer.rho`` always shows
      the clipped value. The clamp bypasses autograd's version counter, so a layer
      applied twice in one graph still back-propagates. (With parameters sharded
      across ranks — ZeRO-3, FSDP — clamp the full parameter after the step.) The
      paper also excludes ρ from weight decay; pass it to the optimizer in a
      group with ``weight_decay=0``.
    * ρ starts at 1: a fresh layer, and a BatchNorm converted by
      ``convert_model(mode="bin")``, computes exactly BatchNorm (up to the
      rounding of the separate γ, β multiply-add), in training and eval alike.
    * Eval mode: the BatchNorm part uses the running statistics, the instance part
      the sample's own statistics.
    * An ``(N, C)`` input has one element per sample and channel: its instance
      part is 0, so the layer is ``γ ρ x̂_BN + β``.
    * The state_dict holds BatchNorm's keys plus ``rho``; a plain BatchNorm
      checkpoint loads (``rho`` keeps its value). ``revert_model`` gives back the
      BatchNorm part (the same function only where ρ = 1).

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to both variances. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics for the BatchNorm part.
            Default: ``True``.
        process_group: the group the BatchNorm part is synced over; ``None`` = the
            default (world) group, resolved at every forward.

    Shape:
        - Input: ``(N, C, *)`` (1-D, 2-D, 3-D); ``N`` may differ across ranks and be 0.
        - Output: same shape and dtype as the input.

    Example::

        >>> layer = distnorm.BatchInstanceNorm(64)
        >>> y = layer(torch.randn(8, 64, 32, 32))
        >>> model = distnorm.convert_model(torchvision.models.resnet50(), mode="bin")
    """

    _extra_parameters = ("rho",)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)
        self.rho = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "rho" in self._parameters:  # not yet created when _BatchNorm.__init__ calls this
            nn.init.ones_(self.rho)

    def _before_forward(self) -> None:
        # ρ ∈ [0, 1] after every optimizer step: the first forward after a step clips
        # it. `.data` leaves autograd's version counter alone: a value already in
        # range is rewritten unchanged, so a graph that saved ρ stays valid.
        self.rho.data.clamp_(0.0, 1.0)

    def _mix(self, input: Tensor, group: Optional[Any], batch_stats: bool) -> Tensor:
        if batch_stats:
            moments = group_moments(input, group, context=self._sync_context())
            self._update_running_stats(moments)
            x_bn = batch_norm_with_moments(input, moments, None, None, self.eps, group,
                                           context=self._sync_context())
        else:
            x_bn = F.batch_norm(input, self.running_mean, self.running_var, None, None,
                                False, 0.0, self.eps)
        dtype = stats_dtype(input)
        mean_in, var_in = instance_moments(input)
        x_in = (input.to(dtype) - mean_in) * torch.rsqrt(var_in + self.eps)
        rho = channel_view(self.rho.to(dtype), input)
        y = rho * x_bn.to(dtype) + (1 - rho) * x_in
        if self.weight is not None:
            y = y * channel_view(self.weight.to(dtype), input) \
                + channel_view(self.bias.to(dtype), input)
        return y.to(input.dtype)
