"""Stateless math shared by the layers: normalization given (group) moments, with
its written-out backward, and the running-statistics update.

The split follows ALGORITHMS.md §1: :func:`distnorm.stats.group_moments` reduces the
forward moments (one all-reduce); :func:`batch_norm_with_moments` normalizes with
them and, in backward, reduces ``[Σg, Σg·x̂]`` (one all-reduce) to form the input
gradient of the group batch. Variants reuse both: Batch Renormalization passes
``γ·r`` and ``γ·d + β`` as weight and bias, CmBN passes the moments of a whole
accumulation cycle.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .stats import Moments, all_reduce_sum, group_moments, stats_dtype

__all__ = ["batch_norm_with_moments", "group_moments_with_grad", "update_running_stats"]


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` → ``(1, C, 1, …)`` broadcastable against ``x``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _backward_policy(layer: Optional[Any]) -> Optional[str]:
    """A rank left out of the forward statistics (``nonfinite="skip"``) stays out of
    their gradient; non-finite gradients never raise (AMP's loss scaler expects them
    and skips the step)."""
    return "skip" if getattr(layer, "nonfinite", None) == "skip" else None


def _affine_grad_eager(grad_out: Tensor, x: Tensor, k: Tensor, weight: Tensor, bias: Tensor,
                       mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``k·grad_out + weight·x̂ + bias`` per channel in eager ops, with
    ``x̂ = (x − mean)/sqrt(var + eps)`` the forward's normalized input."""
    if x.dtype in (torch.float32, torch.float64):
        # weight·x̂ + bias is an eval-mode batch norm with the forward's statistics:
        # one fused, vectorized native pass (addcmul with a broadcast first operand is
        # 2× slower on CPU), then k·g in place.
        out = torch.batch_norm(x, weight.to(x.dtype), bias.to(x.dtype), mean.to(x.dtype),
                               var.to(x.dtype), False, 0.0, eps, torch.backends.cudnn.enabled)
        return out.addcmul_(grad_out, _channel_view(k.to(x.dtype), x))
    # float16/bfloat16: computed in float32, rounded once
    a = weight * torch.rsqrt(var + eps)
    out = torch.addcmul(_channel_view(bias - a * mean, x), x, _channel_view(a, x))
    return out.addcmul_(grad_out, _channel_view(k, x)).to(x.dtype)


class _BatchNormWithMoments(torch.autograd.Function):
    """y = (x − μ)/sqrt(σ² + eps) · w + b, where (μ, σ²) are moments of a batch that
    contains x (over a process group and/or earlier micro-batches).

    Backward (ALGORITHMS.md §1): with local A = Σg, B = Σg·x̂ all-reduced over the
    group and M the count the moments were taken over,
    ∂L/∂x = w/σ̂ · (g − A/M − x̂·B/M); ∂L/∂w = local Σg·x̂; ∂L/∂b = local Σg.
    Saved for backward: x, the weight, the mean, variance and invstd (C-sized) and
    the count.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                mean: Tensor, var: Tensor, count: Tensor, eps: float,
                group: Optional[dist.ProcessGroup], layer: Optional[Any]) -> Tensor:
        param_dtype = weight.dtype if weight is not None else mean.dtype
        mean_p, var_p = mean.to(param_dtype), var.to(param_dtype)
        # Eval-mode native kernel with the group moments as "running" statistics:
        # one fused pass, any layout (channels_last is preserved), mixed precision.
        y = torch.batch_norm(x, weight, bias, mean_p, var_p, False, 0.0, eps,
                             torch.backends.cudnn.enabled)
        var_s = var.to(stats_dtype(x))
        invstd = torch.rsqrt(var_s + eps)
        ctx.save_for_backward(x, weight, mean.to(stats_dtype(x)), var_s, invstd, count)
        ctx.group, ctx.layer, ctx.eps = group, layer, eps
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight, mean, var, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.numel() == 0:  # a shape fact: this rank's slice is empty
            sum_g = sum_gxhat = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        else:
            # One fused native pass gives Σg (grad_bias) and Σg·x̂ (grad_weight).
            _, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, None, None, None, mean, invstd, True, ctx.eps, [False, True, True])
            sum_g, sum_gxhat = sum_g.to(mean.dtype), sum_gxhat.to(mean.dtype)
        grad_x = None
        if need_x:
            sums = all_reduce_sum(torch.cat([sum_g, sum_gxhat]), ctx.group, layer=ctx.layer,
                                  what="backward", nonfinite=_backward_policy(ctx.layer))
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            # w/σ̂·(g − A/M − x̂·B/M) = k·g + w'·x̂ + b' per channel, with k = w/σ̂,
            # w' = −k·B/M, b' = −k·A/M: both rows in one op (on CPU each op costs
            # tens of µs of dispatch whatever its size, a layer's fixed cost at 7×7).
            bias_x, weight_x = (sums.view(2, channels)
                                * (scale / count.to(mean.dtype).clamp(min=1))).neg_().unbind()
            if kernels.affine_grad_applies(grad_out, x):
                # The compiled pass takes k·g + a·x + c: a = w'/σ̂, c = b' − a·μ.
                coef_x = weight_x * invstd
                grad_x = kernels.affine_grad(grad_out, x, scale, coef_x,
                                             torch.addcmul(bias_x, coef_x, mean, value=-1))
            if grad_x is None:
                grad_x = _affine_grad_eager(grad_out, x, scale, weight_x, bias_x, mean, var,
                                            ctx.eps)
        grad_w = sum_gxhat.to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_g.to(weight.dtype if weight is not None else sum_g.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def batch_norm_with_moments(x: Tensor, moments: Moments, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float,
                            group: Optional[dist.ProcessGroup], *,
                            layer: Optional[Any] = None) -> Tensor:
    """Normalize ``x`` with moments of a batch that contains it; differentiable.

    Args:
        x: ``(N, C, *)`` local slice (``N`` may be 0).
        moments: from :func:`distnorm.stats.group_moments` (or accumulated sums);
            their gradient with respect to ``x`` is part of the backward.
        weight, bias: ``(C,)`` or ``None``; any differentiable expression (BRN
            passes ``γ·r`` and ``γ·d + β``).
        eps: added to the variance.
        group: the group the moments were reduced over (``None``: local); backward
            reduces ``[Σg, Σg·x̂]`` over it with one all-reduce.
        layer: the calling layer, for the checks and messages of that all-reduce
            (see :func:`distnorm.stats.all_reduce_sum`).

    Returns:
        ``y``, same shape, dtype and memory format as ``x``.
    """
    return _BatchNormWithMoments.apply(x, weight, bias, moments.mean, moments.var,
                                       moments.count, eps, group, layer)


class _GroupMomentsWithGrad(torch.autograd.Function):
    """(μ, σ², M) of the group batch with their gradient.

    Forward: :func:`distnorm.stats.group_moments` (one all-reduce). Backward: each
    rank holds only its own part of ∂L/∂μ and ∂L/∂σ² (L is a sum over ranks), so
    their sums travel in one all-reduce of 2C numbers, then
    ∂L/∂x = (Σ∂L/∂μ + 2 Σ∂L/∂σ² · (x − μ)) / M.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup],  # type: ignore[override]
                layer: Optional[Any]):
        moments = group_moments(x, group, layer=layer)
        ctx.save_for_backward(x, moments.mean, moments.count)
        ctx.group, ctx.layer = group, layer
        ctx.mark_non_differentiable(moments.count)
        return moments.mean, moments.var, moments.count

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor, _grad_count: Any):  # type: ignore[override]
        x, mean, count = ctx.saved_tensors
        channels = x.shape[1]
        sums = all_reduce_sum(torch.cat([grad_mean, grad_var]).to(mean.dtype), ctx.group,
                              layer=ctx.layer, what="backward",
                              nonfinite=_backward_policy(ctx.layer))
        m = count.to(mean.dtype).clamp(min=1)
        g_mean = _channel_view(sums[:channels] / m, x)
        g_var = _channel_view(sums[channels:] * (2 / m), x)
        grad_x = g_mean + g_var * (x.to(mean.dtype) - _channel_view(mean, x))
        return grad_x.to(x.dtype), None, None


def group_moments_with_grad(x: Tensor, group: Optional[dist.ProcessGroup],
                            layer: Optional[Any] = None) -> Moments:
    """:func:`distnorm.stats.group_moments` with autograd through the mean and
    variance, for layers that mix the group statistics into others (SwitchableNorm).

    Returns:
        :class:`~distnorm.stats.Moments`; ``mean`` and ``var`` carry gradients.
    """
    return Moments(*_GroupMomentsWithGrad.apply(x, group, layer))


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], moments: Moments,
                         momentum: Optional[float]) -> None:
    """torch's running-statistics update with the (group) moments, in place.

    ``running ← (1 − f)·running + f·stat`` with ``f = momentum``, or the cumulative
    average ``1/num_batches_tracked`` when ``momentum`` is ``None``; the variance
    tracked is unbiased. When ``moments.count == 0`` (empty batch over the whole
    group) nothing changes, ``num_batches_tracked`` included — decided on the
    device, without a host synchronisation.
    """
    with torch.no_grad():
        has_data = moments.count > 0
        if num_batches_tracked is not None:
            num_batches_tracked.add_(has_data)
        if momentum is None:
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            factor = has_data / num_batches_tracked.clamp(min=1).to(torch.float64)
            factor = factor.to(running_mean.dtype)
        else:  # 1·momentum rounds to the buffers' dtype exactly as momentum does
            factor = has_data.to(running_mean.dtype) * momentum
        running_mean.lerp_(moments.mean.to(running_mean.dtype), factor)
        running_var.lerp_(moments.unbiased_var().to(running_var.dtype), factor)

