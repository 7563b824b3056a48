"""The math shared by the layers: normalization given (group) moments, with its
written-out backward, and the running-statistics update. Stateless: what a layer
keeps between calls (its counters, its policy) arrives as a
:class:`~distnorm.distributed.collectives.SyncContext`.

The split follows docs/algorithms.md §1: :func:`distnorm.stats.group_moments`
reduces the forward moments (one all-reduce); :func:`batch_norm_with_moments`
normalizes with them and, in backward, reduces ``[Σg, Σg·x̂]`` (one all-reduce) to
form the input gradient of the group batch. Variants reuse both: Batch
Renormalization passes ``γ·r`` and ``γ·d + β`` as weight and bias, CmBN passes the
moments of a whole accumulation cycle.

Precision: whatever the parameters' dtype (a ``.half()`` model included), the
statistics and the normalization are computed in float32 at least
(:func:`distnorm.stats.stats_dtype`), as ``nn.BatchNorm``'s kernels do; only the
output takes the input's dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _native_cuda, cuda_ops, kernels
from .cuda_ops import Running, Stats
from .distributed.collectives import SyncContext, Written, all_reduce
from ._autograd_group import _backward_policy, _strong, _weak
from .stats import Moments, group_moments, group_sums, stats_dtype

__all__ = ["batch_norm_with_moments", "group_moments_with_grad", "sync_batch_norm",
           "update_running_stats"]


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` → ``(1, C, 1, …)`` broadcastable against ``x``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


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


def _local_grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Σg and Σg·x̂ per channel of the local slice, in the statistics' dtype, and the
    payload ``[Σg, Σg·x̂]`` to all-reduce (a fresh tensor): one native pass over ``g``
    and ``x``."""
    if x.is_cuda:  # its CUDA kernel (torch's SyncBatchNorm uses it too)
        sum_g, sum_gxmu, _, _ = torch.batch_norm_backward_reduce(
            grad_out, x, mean, invstd, None, True, False, False)
        return kernels.fused(_grad_sums_and_payload, sum_g, sum_gxmu, invstd)
    # On CPU: native_batch_norm_backward's grad_bias and grad_weight (with no weight)
    _, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, None, None, None, mean, invstd, True, eps, [False, True, True])
    sum_g, sum_gxhat = sum_g.to(mean.dtype), sum_gxhat.to(mean.dtype)
    return sum_g, sum_gxhat, torch.cat([sum_g, sum_gxhat])


def _grad_sums_and_payload(sum_g: Tensor, sum_gxmu: Tensor, invstd: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
    # The payload in float64 at once: the guarded all-reduce sends float64 anyway.
    sum_gxhat = sum_gxmu * invstd
    return sum_g, sum_gxhat, torch.cat([sum_g, sum_gxhat]).to(torch.float64)


def _input_grad_coefficients(sums: Tensor, weight: Optional[Tensor], invstd: Tensor,
                             count: Tensor, mean: Tensor, fused_pass: bool
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(k, w', b')`` of ``∂L/∂x = k·g + w'·x̂ + b'`` from the group's
    ``[A, B] = [Σg, Σg·x̂]``: ``k = w/σ̂``, ``w' = −k·B/M``, ``b' = −k·A/M``. For the
    fused pass (``fused_pass``), ``(k, a, c)`` of ``k·g + a·x + c`` instead:
    ``a = w'/σ̂``, ``c = b' − a·μ``."""
    channels = invstd.numel()
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    # Both rows in one op: on CPU each op costs tens of µs of dispatch whatever its
    # size, a layer's fixed cost at 7×7.
    bias_x, weight_x = (sums.view(2, channels).to(invstd.dtype)
                        * (scale / count.to(invstd.dtype).clamp(min=1))).neg_().unbind()
    if fused_pass:
        coef_x = weight_x * invstd
        return scale, coef_x, torch.addcmul(bias_x, coef_x, mean, value=-1)
    return scale, weight_x, bias_x


class _BatchNormWithMoments(torch.autograd.Function):
    """y = (x − μ)/sqrt(σ² + eps) · w + b, where (μ, σ²) are moments of a batch that
    contains x (over a process group and/or earlier micro-batches).

    Backward (docs/algorithms.md §1): with local A = Σg, B = Σg·x̂ all-reduced over the
    group and M the count the moments were taken over,
    ∂L/∂x = w/σ̂ · (g − A/M − x̂·B/M); ∂L/∂w = local Σg·x̂; ∂L/∂b = local Σg.
    Saved for backward: x, the weight, the mean, variance and invstd (C-sized) and
    the count. On CUDA (:func:`distnorm.cuda_ops.applies`) one Triton launch forward
    and three backward (:func:`_triton_backward`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                mean: Tensor, var: Tensor, count: Tensor, eps: float,
                group: Optional[Any], context: Optional[SyncContext]) -> Tensor:
        dtype = stats_dtype(x)
        mean, var = mean.to(dtype), var.to(dtype)
        ctx.group, ctx.context, ctx.eps = _weak(group), context, eps
        ctx.triton = cuda_ops.applies(x)
        if ctx.triton:  # one launch; backward: three and one all-reduce
            ctx.save_for_backward(x, weight, mean, var, count)
            return cuda_ops.normalize(x, Stats(count, None, mean, var), weight, bias, eps)
        # Eval-mode native kernel with the group moments as "running" statistics:
        # one fused pass, any layout (channels_last is preserved). Parameters and
        # statistics in float32 (float64 for float64 inputs) whatever their own
        # dtype: the kernels' mixed-precision path for half inputs, and no
        # variance above 65504 rounded to inf for a .half() model.
        y = torch.batch_norm(x, _cast(weight, dtype), _cast(bias, dtype), mean, var, False,
                             0.0, eps, torch.backends.cudnn.enabled)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, var, invstd, count)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.triton:
            x, weight, mean, var, count = ctx.saved_tensors
            return _triton_backward(ctx, grad_out, x, weight, Stats(count, None, mean, var)) \
                + (None,) * 6
        x, weight, mean, var, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.is_cuda and grad_out.stride() != x.stride():
            # CUDA's reduce kernel and the fused input gradient read both in x's layout
            grad_out = torch.empty_like(x).copy_(grad_out)
        if x.numel() == 0:  # a shape fact: this rank's slice is empty
            sum_g = sum_gxhat = torch.zeros(channels, dtype=mean.dtype, device=x.device)
            payload = torch.zeros(2 * channels, dtype=mean.dtype, device=x.device)
        else:
            sum_g, sum_gxhat, payload = _local_grad_sums(grad_out, x, mean, invstd, ctx.eps)
        grad_x = None
        if need_x:
            sums = all_reduce(payload, _strong(ctx.group), ctx.context, "backward",
                              _backward_policy(ctx.context))
            fused_pass = kernels.affine_grad_applies(grad_out, x)
            k, a, c = kernels.fused(_input_grad_coefficients, sums, weight, invstd, count,
                                    mean, fused_pass)
            if fused_pass:
                grad_x = kernels.affine_grad(grad_out, x, k, a, c)
            if grad_x is None:
                grad_x = _affine_grad_eager(grad_out, x, k, a, c, mean, var, ctx.eps)
        grad_w = sum_gxhat.to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_g.to(weight.dtype if weight is not None else sum_g.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _triton_backward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Optional[Tensor],
                     stats: Stats) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(∂L/∂x, ∂L/∂w, ∂L/∂b)`` in three Triton launches and one all-reduce: partial
    sums, the guarded packet ``[Σg, Σg·x̂]`` with the local parameter gradients, and
    the input gradient from the reduced packet (docs/algorithms.md §1)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    channels = x.shape[1]
    if grad_out.stride() != x.stride():  # the kernels read both in x's layout
        grad_out = torch.empty_like(x).copy_(grad_out)
    stats_type = stats.mean.dtype if stats.mean is not None else stats_dtype(x)
    grad_w = (torch.empty(channels, dtype=weight.dtype, device=x.device)
              if need_w and weight is not None else None)
    grad_b = (torch.empty(channels, dtype=weight.dtype if weight is not None else stats_type,
                          device=x.device) if need_b else None)

    def write(spec: Any) -> Tensor:
        return cuda_ops.grad_packet(grad_out, x, stats, ctx.eps, spec, grad_w, grad_b)

    grad_x = None
    if need_x:
        sums = all_reduce(Written(2 * channels, x.device, write), _strong(ctx.group),
                          ctx.context, "backward", _backward_policy(ctx.context))
        grad_x = cuda_ops.input_grad(grad_out, x, stats, sums, weight, ctx.eps)
    elif grad_w is not None or grad_b is not None:
        write(None)
    return grad_x, grad_w, grad_b


class _SyncBatchNorm(torch.autograd.Function):
    """A synced BatchNorm in Triton launches (:mod:`distnorm.cuda_ops`): forward two
    launches, the all-reduce of the guarded moment sums, one launch that normalizes
    and updates the running statistics; backward :func:`_triton_backward`. Saved for
    backward: x, the weight and the reduced sums (2C + 1 float64 numbers)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                running: Optional[Running], eps: float, group: Optional[Any],
                context: Optional[SyncContext]) -> Tensor:
        # moment sums reduced over the group: [m, Σx, Σx²] (float64)
        sums = group_sums(x, group, context=context)
        if torch.compiler.is_compiling():  # a view of the traced all-reduce's result:
            sums = sums.clone()  # dynamo saves no views across the Function's graphs
        y = cuda_ops.normalize(x, Stats.of_sums(sums), weight, bias, eps, running)
        ctx.save_for_backward(x, weight, sums)
        ctx.group, ctx.context, ctx.eps = _weak(group), context, eps
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight, sums = ctx.saved_tensors
        return _triton_backward(ctx, grad_out, x, weight, Stats.of_sums(sums)) + (None,) * 4


def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running: Optional[Running], eps: float, group: Optional[Any], *,
                    context: Optional[SyncContext] = None) -> Tensor:
    """A training-mode BatchNorm over ``group``, differentiable: group moments, running
    update (``running``, or ``None``) and normalization.

    Where :func:`distnorm.cuda_ops.applies` (CUDA), six Triton launches and two
    all-reduces per training step; on CUDA without Triton, torch's native
    SyncBatchNorm kernels (:mod:`distnorm._native_cuda`); elsewhere :func:`distnorm.stats.group_moments`,
    :func:`update_running_stats` and :func:`batch_norm_with_moments`.
    """
    if cuda_ops.applies(x):
        return _SyncBatchNorm.apply(x, weight, bias, running, eps, group, context)
    if _native_cuda.applies(x):  # CUDA without Triton: torch's SyncBatchNorm kernels
        return _native_cuda.sync_batch_norm(x, weight, bias, running, eps, group, context)
    moments = group_moments(x, group, context=context)
    if running is not None:
        update_running_stats(running.mean, running.var, running.tracked, moments,
                             running.momentum)
    return batch_norm_with_moments(x, moments, weight, bias, eps, group, context=context)


def batch_norm_with_moments(x: Tensor, moments: Moments, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float, group: Optional[Any], *,
                            context: Optional[SyncContext] = None) -> Tensor:
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
        context: the calling layer's sync context, for the guards and messages of
            that all-reduce (see :func:`distnorm.distributed.collectives.all_reduce`).

    Returns:
        ``y``, same shape, dtype and memory format as ``x``.
    """
    return _BatchNormWithMoments.apply(x, weight, bias, moments.mean, moments.var,
                                       moments.count, eps, group, context)


class _GroupMomentsWithGrad(torch.autograd.Function):
    """(μ, σ², M) of the group batch with their gradient.

    Forward: :func:`distnorm.stats.group_moments` (one all-reduce). Backward: each
    rank holds only its own part of ∂L/∂μ and ∂L/∂σ² (L is a sum over ranks), so
    their sums travel in one all-reduce of 2C numbers, then
    ∂L/∂x = (Σ∂L/∂μ + 2 Σ∂L/∂σ² · (x − μ)) / M.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[Any],  # type: ignore[override]
                context: Optional[SyncContext]):
        moments = group_moments(x, group, context=context)
        ctx.save_for_backward(x, moments.mean, moments.count)
        ctx.group, ctx.context = _weak(group), context
        ctx.mark_non_differentiable(moments.count)
        return moments.mean, moments.var, moments.count

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor, _grad_count: Any):  # type: ignore[override]
        x, mean, count = ctx.saved_tensors
        channels = x.shape[1]
        sums = all_reduce(torch.cat([grad_mean, grad_var]).to(mean.dtype), _strong(ctx.group),
                          ctx.context, "backward", _backward_policy(ctx.context))
        m = count.to(mean.dtype).clamp(min=1)
        g_mean = _channel_view(sums[:channels] / m, x)
        g_var = _channel_view(sums[channels:] * (2 / m), x)
        grad_x = g_mean + g_var * (x.to(mean.dtype) - _channel_view(mean, x))
        return grad_x.to(x.dtype), None, None


def group_moments_with_grad(x: Tensor, group: Optional[Any],
                            context: Optional[SyncContext] = None) -> Moments:
    """:func:`distnorm.stats.group_moments` with autograd through the mean and
    variance, for layers that mix the group statistics into others (SwitchableNorm).

    Returns:
        :class:`~distnorm.stats.Moments`; ``mean`` and ``var`` carry gradients.
    """
    return Moments(*_GroupMomentsWithGrad.apply(x, group, context))


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Optional[Tensor], moments: Moments,
                         momentum: Optional[float]) -> None:
    """torch's running-statistics update with the (group) moments, in place.

    ``running ← (1 − f)·running + f·stat`` with ``f = momentum``, or the cumulative
    average ``1/num_batches_tracked`` when ``momentum`` is ``None``; the variance
    tracked is unbiased. When ``moments.count == 0`` (empty batch over the whole
    group) nothing changes, ``num_batches_tracked`` included — decided on the
    device, without a host synchronisation. Half-precision buffers are updated in
    float32 and rounded once, as ``nn.BatchNorm``'s kernels do.
    """
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    with torch.no_grad():
        if cuda_ops.applies(running_mean):  # one Triton launch
            cuda_ops.running_update(Stats(moments.count, None, moments.mean, moments.var),
                                    Running(running_mean, running_var, num_batches_tracked,
                                            momentum))
            return
        kernels.fused(_update_running_stats, running_mean, running_var, num_batches_tracked,
                      moments.count, moments.mean, moments.var, momentum)


def _update_running_stats(running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Optional[Tensor], count: Tensor, mean: Tensor,
                          var: Tensor, momentum: Optional[float]) -> None:
    has_data = count > 0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(has_data)
    dtype = running_mean.dtype if running_mean.dtype in (torch.float32, torch.float64) \
        else torch.float32
    if momentum is None:
        assert num_batches_tracked is not None
        factor = (has_data / num_batches_tracked.clamp(min=1).to(torch.float64)).to(dtype)
    else:  # 1·momentum rounds to the update's dtype exactly as momentum does
        factor = has_data.to(dtype) * momentum
    unbiased = Moments(count, mean, var).unbiased_var()
    for running, stat in ((running_mean, mean), (running_var, unbiased)):
        if running.dtype == dtype:
            running.lerp_(stat.to(dtype), factor)
        else:
            # A half-precision buffer, updated in float32 and saturated at its largest
            # finite value (65504 for float16), before and after: nn.BatchNorm.half()
            # stores inf there, and the next lerp computes inf - inf = NaN. Saturated,
            # it never becomes inf or NaN, eval outputs stay finite, and it recovers
            # when the batch statistics come back into range (docs/faults.md, row 8).
            limit = torch.finfo(running.dtype).max
            blended = running.to(dtype).clamp_(-limit, limit).lerp_(stat.to(dtype), factor)
            running.copy_(blended.clamp_(-limit, limit))
