"""The synced BatchNorm on CUDA without Triton: torch's own SyncBatchNorm kernels.

Where Triton cannot be imported, or ``DISTNORM_TRITON=0``, :func:`sync_batch_norm`
runs a training step in the style of ``torch.nn.SyncBatchNorm``: the four native
CUDA kernels ``batch_norm_stats``, ``batch_norm_elemt``,
``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt``, one guarded
all-reduce per direction, and the C-sized glue (packing, unpacking, the running
update) as a short sequence of eager ops — no ``torch.compile``, no host
synchronisation (docs/algorithms.md §1, "Without Triton").

The forward packet is the float64 ``[m, Σx, Σx²]`` of docs/algorithms.md §0, formed
from the kernel's per-channel Welford mean and invstd: ``Σx = m·μ``,
``Σx² = m·(σ² + μ²)``; the local moments are exact to float32 (the kernel's
accumulation), the cross-rank combination is done in float64.

The four kernels are looked up in this module at call time, so that tests (which
have no GPU, and torch has no CPU kernels for them) can substitute reference
implementations, and add ``"cpu"`` to :data:`DEVICES` to run this path on CPU.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import cuda_ops
from ._autograd_group import _backward_policy, _strong, _weak
from ._packing import packed_size, unpack_sums
from .distributed.collectives import Written, all_reduce
from .stats import stats_dtype

__all__ = ["DEVICES", "applies", "sync_batch_norm"]

batch_norm_stats = torch.batch_norm_stats
batch_norm_elemt = torch.batch_norm_elemt
batch_norm_backward_reduce = torch.batch_norm_backward_reduce
batch_norm_backward_elemt = torch.batch_norm_backward_elemt

# Devices this path runs on (tests add "cpu", with the kernels above substituted).
DEVICES = {"cuda"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The epsilon given to batch_norm_stats: tiny, so that σ² = invstd⁻² keeps the
# variance of nearly constant channels (1e-30 more than exact, far below float32
# rounding), yet non-zero so that invstd stays finite for a constant channel.
_TINY = 1e-30
# Device constants (exponents, fills, counts), made once by fills on the device
# (never a host-to-device copy on the hot path). Bounded: a new batch size adds one.
_constants: Dict[Tuple[Any, ...], Tensor] = {}
_MAX_CONSTANTS = 512
# Each direction's constant part of the guard's tail, per guard tensor.
_templates = WeakIdKeyDictionary()


def applies(x: Tensor) -> bool:
    """Whether this path runs for ``x``: a CUDA tensor (see :data:`DEVICES`) of a
    floating dtype where the Triton kernels do not apply, outside a user's
    ``torch.compile`` (which keeps tracing the generic path)."""
    return (x.device.type in DEVICES and x.dtype in _DTYPES and x.dim() >= 2
            and not torch.compiler.is_compiling() and not cuda_ops.applies(x))


def _constant(device: torch.device, dtype: torch.dtype, rows: Tuple[Tuple[float, ...], ...]
              ) -> Tensor:
    """A ``len(rows) × len(rows[0])`` constant on ``device``, cached."""
    key = (device, dtype, rows)
    value = _constants.get(key)
    if value is None:
        if len(_constants) >= _MAX_CONSTANTS:
            _constants.clear()
        value = torch.empty((len(rows), len(rows[0])), dtype=dtype, device=device)
        for i, row in enumerate(rows):
            for j, number in enumerate(row):
                value[i, j].fill_(number)  # the number is a kernel argument: no copy
        _constants[key] = value
    return value


# -- the guarded packet ------------------------------------------------------------------
def _flag_fill(device: torch.device, numel: int, bit: float) -> Tensor:
    """What a non-finite payload's packet holds up to its flag: zeros, then ``bit``."""
    key = ("flag", device, numel, bit)
    value = _constants.get(key)
    if value is None:
        value = torch.zeros(numel, dtype=torch.float64, device=device)
        value[-1].fill_(bit)
        _constants[key] = value
    return value


def _template(spec: Any, numel: int) -> Tensor:
    """``[0 × pad, flag 0, nograd, 0, tag, tag², mode, mode²]``: the packet between the
    payload and the counters, constant for a direction."""
    per_guard = _templates.setdefault(spec.guard, {})
    key = (spec.size, numel, spec.nograd, spec.mode)
    value = per_guard.get(key)
    if value is None:
        pad = spec.size - numel - 11
        value = torch.zeros(pad + 7, dtype=torch.float64, device=spec.guard.device)
        value[pad + 1].fill_(spec.nograd)
        value[pad + 3:pad + 5].copy_(spec.guard[:2])
        value[pad + 5].fill_(spec.mode)
        value[pad + 6].fill_(spec.mode * spec.mode)
        per_guard[key] = value
    return value


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _host_tail(spec: Any, numel: int, device: torch.device) -> List[Tensor]:
    """The packet after the payload, ``[0 × pad, flag 0, nograd, 0, tag, tag², mode,
    mode², call, call², seq, seq²]``, from the host's numbers: the zeros cached on
    the device, the 11 numbers in one asynchronous copy from pinned memory (none
    where the device is the host)."""
    tag, call, seq = spec.host
    values = [0.0, spec.nograd, 0.0, tag, tag * tag, spec.mode, spec.mode * spec.mode,
              call, call * call, seq, seq * seq]
    if device.type == "cpu":
        tail = torch.tensor(values, dtype=torch.float64)
    else:
        tail = torch.tensor(values, dtype=torch.float64, pin_memory=True).to(
            device, non_blocking=True)
    pad = spec.size - numel - 11
    if not pad:
        return [tail]
    key = ("zeros", device, pad)
    zeros = _constants.get(key)
    if zeros is None:
        zeros = _constants[key] = torch.zeros(pad, dtype=torch.float64, device=device)
    return [zeros, tail]


def _device_tail(spec: Any, numel: int) -> Tensor:
    """The same tail from the device counters, advanced in place (what a CUDA-graph
    replay must do): the two counters together, the constant middle cached."""
    device = spec.guard.device
    counters = torch.cat([spec.guard[2:3], spec.seq[:1]]).add_(1).remainder_(spec.modulus)
    # [[call, call²], [seq, seq²]] in one op
    advanced = torch.pow(counters.view(2, 1), _constant(device, torch.float64, ((1.0, 2.0),)))
    torch._foreach_copy_([spec.guard[2:4], spec.seq], [advanced[0], advanced[1]])
    return torch.cat([_template(spec, numel), advanced.view(-1)])


def pack(parts: List[Tensor], numel: int, spec: Optional[Any]) -> Tensor:
    """The float64 packet of a payload given as ``parts`` (``numel`` numbers): the
    plain payload for ``spec`` None, else what ``collectives._pack_on_device``
    computes — the payload, zeros, the guard's tail — in a few eager ops.

    Outside a CUDA-graph capture the tail comes from the host's counters
    (``spec.host``, one pinned copy): they equal the device counters on
    every rank alike, and the guard only compares ranks. Inside a capture the
    device counters are advanced, so that replays advance them."""
    device = parts[0].device
    if spec is None:
        return torch.cat(parts)
    if _capturing(device):
        tail = [_device_tail(spec, numel)]
    else:
        tail = _host_tail(spec, numel, device)
    packet = torch.cat(parts + tail)
    if spec.check:
        # A NaN or ±Inf anywhere makes the sum non-finite, and s − s NaN: the payload
        # goes as zeros and the flag (right after the padding) as this rank's bit.
        total = packet[:numel].sum()
        bad = torch.isnan(total - total)
        region = packet[:spec.size - 10]
        torch.where(bad, _flag_fill(device, region.numel(), float(spec.bit)), region,
                    out=region)
    return packet


# -- forward -------------------------------------------------------------------------------
def _moment_sums(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(count, sums)``: the ``(1,)`` float64 count and ``(2, C)`` ``[Σx; Σx²]`` of
    the local slice, from ``batch_norm_stats`` (one kernel) and three C-sized ops."""
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    count_t = _constant(x.device, torch.float64, ((float(count),),)).view(1)
    if count == 0:  # a shape fact
        return count_t, torch.zeros((2, channels), dtype=torch.float64, device=x.device)
    mean, invstd = batch_norm_stats(x, _TINY)
    # [μ; invstd⁻² = σ² + tiny] in float64, then Σx² = m·(σ² + μ²), Σx = m·μ
    rows = torch.pow(torch.stack([mean, invstd]),
                     _constant(x.device, torch.float64, ((1.0,), (-2.0,))))
    first, second = rows.unbind()
    second.addcmul_(first, first)
    return count_t, rows.mul_(count)


def _mean_invstd(sums: Tensor, channels: int, eps: float, dtype: torch.dtype
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """``([μ; σ²] float64, [μ; 1/sqrt(σ² + eps)] in dtype, divisors)`` from reduced
    sums, ``divisors`` being ``[[max(M, 1)], [max(M − 1, 1)]]`` (the running update's
    Bessel correction is their ratio); a group with no element gives zeros."""
    device = sums.device
    divisors = (sums[:1] - _constant(device, torch.float64, ((0.0,), (1.0,)))).clamp_(min=1)
    moments = sums[1:packed_size(channels)].view(2, channels) / divisors[:1]
    moments[1].addcmul_(moments[0], moments[0], value=-1).clamp_(min=0)
    mean_invstd = torch.empty((2, channels), dtype=dtype, device=device)
    torch.pow(moments + _constant(device, torch.float64, ((0.0,), (eps,))),
              _constant(device, torch.float64, ((1.0,), (-0.5,))), out=mean_invstd)
    return moments, mean_invstd, divisors


def _update_running(sums: Tensor, moments: Tensor, divisors: Tensor,
                    running: cuda_ops.Running) -> None:
    """torch's running update with the group moments, in place, without a host read:
    nothing changes for an empty group; half-precision buffers are updated in
    float32 and saturate at their largest finite value (as
    :func:`distnorm.functional.update_running_stats`)."""
    has_data = unpack_sums(sums, running.mean.numel())[0] > 0
    if running.tracked is not None:
        running.tracked.add_(has_data)
    dtype = running.mean.dtype if running.mean.dtype in (torch.float32, torch.float64) \
        else torch.float32
    if running.momentum is None:
        if running.tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        factor = (has_data / running.tracked.clamp(min=1)).to(dtype)
    else:
        factor = has_data * _constant(sums.device, dtype, ((float(running.momentum),),)).view(())
    # [μ; σ²·M/(M − 1)] (M ≤ 1: σ², which is 0) in the update's dtype
    target = torch.empty_like(moments, dtype=dtype)
    torch.mul(moments, divisors[:1] / divisors, out=target)
    for buffer, stat in ((running.mean, target[0]), (running.var, target[1])):
        if buffer.dtype == dtype:
            buffer.lerp_(stat, factor)
        else:  # half precision: never inf, then NaN (docs/faults.md, row 8)
            limit = torch.finfo(buffer.dtype).max
            blended = buffer.to(dtype).clamp_(-limit, limit).lerp_(stat, factor)
            buffer.copy_(blended.clamp_(-limit, limit))


class _NativeSyncBatchNorm(torch.autograd.Function):
    """A synced BatchNorm in torch's CUDA kernels: forward ``batch_norm_stats``, the
    guarded all-reduce of ``[m, Σx, Σx²]``, the running update, ``batch_norm_elemt``;
    backward ``batch_norm_backward_reduce``, the guarded all-reduce of
    ``[Σg, Σg·(x − μ)]`` (μ is the group's, so these add over ranks),
    ``batch_norm_backward_elemt``. Saved: x, the weight, ``[μ; invstd]`` and the
    reduced count."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                running: Optional[cuda_ops.Running], eps: float, group: Optional[Any],
                context: Optional[Any]) -> Tensor:

        channels = x.shape[1]
        size = packed_size(channels)
        with torch.no_grad():
            count, local = _moment_sums(x)
            payload = Written(size, x.device,
                              lambda spec: pack([count, local.view(-1)], size, spec))
            sums = all_reduce(payload, group, context, "forward",
                              context.nonfinite if context is not None else None)
            dtype = stats_dtype(x)
            moments, mean_invstd, divisors = _mean_invstd(sums, channels, eps, dtype)
            if running is not None:
                _update_running(sums, moments, divisors, running)
            if x.numel():
                y = batch_norm_elemt(x, None if weight is None else weight.to(dtype),
                                     None if bias is None else bias.to(dtype),
                                     mean_invstd[0], mean_invstd[1], eps)
            else:
                y = torch.empty_like(x)
        ctx.save_for_backward(x, weight, mean_invstd, sums[:1])
        ctx.group, ctx.context = _weak(group), context
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]

        x, weight, mean_invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        mean, invstd = mean_invstd[0], mean_invstd[1]
        w = None if weight is None else weight.to(mean.dtype)
        if grad_out.stride() != x.stride():  # the kernels read both in x's layout
            grad_out = torch.empty_like(x).copy_(grad_out)
        if x.numel():
            sum_dy, sum_dy_xmu, grad_w, grad_b = batch_norm_backward_reduce(
                grad_out, x, mean, invstd, w, True, need_w and w is not None, need_b)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=mean.dtype, device=x.device)
            grad_w = torch.zeros_like(sum_dy) if need_w and w is not None else None
            grad_b = torch.zeros_like(sum_dy) if need_b else None
        if grad_w is not None and weight is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype if weight is not None else mean.dtype)
        grad_x = None
        if need_x:
            local = torch.stack([sum_dy, sum_dy_xmu]).to(torch.float64)
            payload = Written(2 * channels, x.device,
                              lambda spec: pack([local.view(-1)], 2 * channels, spec))
            reduced = all_reduce(payload, _strong(ctx.group), ctx.context, "backward",
                                 _backward_policy(ctx.context))
            sum_g, sum_gxmu = reduced[:2 * channels].view(2, channels).to(mean.dtype).unbind()
            if x.numel():
                grad_x = batch_norm_backward_elemt(grad_out, x, mean, invstd, w, sum_g,
                                                   sum_gxmu, count.to(torch.int32))
            else:
                grad_x = torch.empty_like(x)
        return grad_x, grad_w if need_w else None, grad_b, None, None, None, None


def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running: Optional[cuda_ops.Running], eps: float, group: Optional[Any],
                    context: Optional[Any]) -> Tensor:
    """:func:`distnorm.functional.sync_batch_norm` where :func:`applies`."""
    if running is not None and running.momentum is None and running.tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    return _NativeSyncBatchNorm.apply(x, weight, bias, running, eps, group, context)
