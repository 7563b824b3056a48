"""The one core: per-channel moments of a batch and their reduction across ranks.

Every synced layer of distnorm computes its statistics here; the collective that
combines them across ranks, and its guards, live in
:mod:`distnorm.distributed.collectives`. The rules (docs/algorithms.md §0, §1):

* Local moments are exact: the mean to float64 precision, the variance centred —
  one compiled pass of sums shifted by a sample of each channel and accumulated in
  float64 (:mod:`distnorm.kernels`: on CPU above a size; on CUDA the Triton kernels
  of :mod:`distnorm.cuda_ops`, which also write the guarded packet), else a
  residual two-pass (accumulated in float32 at least).
* Across ranks they travel as count-weighted *sums* in float64,
  ``[m, m·μ, M2 + m·μ²]`` (2C + 1 numbers), so that a batch whose mean is 1e4
  standard deviations away from zero keeps its variance: the cancellation
  ``Σ(M2 + m·μ²) − M·μ²`` happens in float64.
* One all-reduce (SUM) per forward, of that packed buffer. A rank with an empty
  slice contributes zeros; a group whose every slice is empty yields ``count = 0``
  and zero moments, decided on the device (no host synchronisation), so the
  forward can be captured by a CUDA graph or compiled with ``fullgraph=True``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from . import cuda_ops, kernels
from ._packing import pack_sums, packed_size, unpack_sums
from .distributed.collectives import SyncContext, Written, all_reduce

__all__ = [
    "Moments",
    "group_moments",
    "group_sums",
    "local_moments",
    "moment_sums",
    "moments_from_sums",
    "stats_dtype",
]

_REDUCED = (torch.float16, torch.bfloat16)


class Moments(NamedTuple):
    """Per-channel moments of a (possibly group-wide) batch.

    Attributes:
        count: 0-dim tensor, elements per channel ``M`` (``N·spatial`` summed over
            ranks); float64.
        mean: ``(C,)`` mean ``μ``.
        var: ``(C,)`` biased variance ``σ²`` (divided by ``M``).
    """

    count: Tensor
    mean: Tensor
    var: Tensor

    def unbiased_var(self) -> Tensor:
        """``σ² · M / (M − 1)``, the variance that running statistics track.

        For ``M <= 1`` the biased variance (0) is returned rather than a 0/0.
        """
        # M/(M − 1) as a 0-dim tensor: it takes the variance's dtype in the product.
        return self.var * (self.count / (self.count - 1).clamp(min=1))


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics of ``x`` are accumulated and kept in (never below float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def local_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Count, mean and biased variance of each channel of an ``(N, C, *)`` tensor.

    Exact local moments (docs/algorithms.md §0): the mean is known to float64
    precision and the variance is centred (two-pass), so that a batch whose mean is
    1e4 standard deviations from zero keeps its variance once ranks are combined.
    Eager ops; :func:`moment_sums` uses one compiled pass instead where it applies.
    Works for contiguous and channels_last layouts alike; an empty ``x`` gives zeros.

    Returns:
        ``(m, mean, var)``: elements per channel (a Python int, from the shape), and
        two float64 ``(C,)`` tensors.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an (N, C, *) input of at least 2 dims (got {x.dim()}D input)")
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:  # a shape fact, not a data-dependent branch
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone()
    if x.dtype == torch.float64:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return count, mean, var
    if x.dtype in _REDUCED:
        # The mixed-precision native kernel accumulates in float32 and returns
        # float32 statistics (batch_norm_update_stats would return, and overflow in,
        # float16). It also writes an output we discard: still cheaper than an upcast.
        # Half-precision data carry far less precision than the float32 mean.
        ones = torch.ones(channels, dtype=torch.float32, device=x.device)
        _, mean, invstd = torch.native_batch_norm(x, ones, None, None, None, True, 0.0, _TINY)
        return count, mean.double(), (invstd.double().pow(-2) - _TINY).clamp_(min=0)
    dims = [d for d in range(x.dim()) if d != 1]
    view = (1, channels) + (1,) * (x.dim() - 2)
    if x.device.type == "cpu" and x.is_contiguous():
        # Two passes in plain ops: the float32 mean as a shift, then the centred
        # sums. On CPU this is 1.5–2× faster than batch_norm_update_stats for NCHW
        # (which has no vectorized kernel there) and as accurate.
        shift = x.sum(dims).div_(count)
        centred = x - shift.view(view)
        first = centred.sum(dims)
        second = centred.square_().sum(dims).double()
    else:
        # channels_last on CPU and CUDA have fast native kernels for the centred
        # variance; only the float32 rounding of their mean needs correcting.
        shift, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        first = (x - shift.view(view)).sum(dims)
        second = None
    # mean = shift + Σ(x − shift)/m to float64 precision: the float32 rounding δ of
    # the mean would otherwise enter the pooled variance as 2·(μ_r − μ)·δ_r,
    # 10–500× nn.BatchNorm's error at |μ|/σ = 1e3–1e4.
    offset = first.double() / count
    mean = shift.double() + offset
    if second is None:
        return count, mean, var.double()
    return count, mean, (second / count - offset * offset).clamp_(min=0)


# Recovering var from invstd = 1/sqrt(var + eps): eps must be tiny to keep the
# variance of nearly constant channels, yet non-zero so invstd stays finite.
_TINY = 1e-30


def moment_sums(x: Tensor) -> Tensor:
    """The packed float64 buffer ``[m, Σx (C), Σx² (C)]`` of the local slice.

    Σx² is formed as ``M2 + m·μ²`` from the exact centred ``M2`` (or, by the
    compiled kernel, from sums shifted by a sample of each channel). Sums of such
    buffers over ranks (or micro-batches) are the sums of the concatenated batch;
    :func:`moments_from_sums` turns them back into moments.
    """
    fused = kernels.moment_sums(x)
    if fused is not None:  # one compiled pass (see distnorm.kernels)
        return fused
    count, mean, var = local_moments(x)
    # The count is derived from a tensor of this call, never a Python constant:
    # inductor (torch 2.14, CPU) was seen sharing a constant across layers and
    # reading a buffer that an earlier all-reduce had already summed.
    count64 = (mean[:1] * 0).add_(count)
    return pack_sums(count64, mean * count, (var + mean * mean) * count)


def moments_from_sums(sums: Tensor, dtype: torch.dtype = torch.float32) -> Moments:
    """Moments from a packed buffer of :func:`moment_sums` (possibly reduced).

    The subtraction ``Q/M − μ²`` is done in float64; ``count == 0`` (an empty batch
    over the whole group) gives zero mean and variance, decided on the device.
    """
    if cuda_ops.applies(sums):  # one Triton launch on CUDA
        return Moments(*cuda_ops.unpack(sums, (sums.numel() - 1) // 2, dtype))
    return Moments(*kernels.fused(_unpack, sums, dtype))


def _unpack(sums: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    count, sum_x, sum_sq = unpack_sums(sums)
    safe = count.clamp(min=1)
    mean = sum_x / safe
    var = (sum_sq / safe - mean * mean).clamp_(min=0)
    return count, mean.to(dtype), var.to(dtype)


def group_sums(x: Tensor, group: Optional[Any], *, context: Optional[SyncContext] = None,
               extra: Optional[Tensor] = None) -> Tensor:
    """:func:`moment_sums` of ``x`` summed over ``group``: one all-reduce, no autograd.

    Sums add: CmBN accumulates these over the micro-batches of a cycle before
    :func:`moments_from_sums`.

    Args:
        x: ``(N, C, *)`` local slice.
        group: process group, or ``None`` (local).
        context: the calling layer's
            :class:`~distnorm.distributed.collectives.SyncContext`, for the guards and
            messages of the all-reduce. Its ``nonfinite`` policy applies: a rank whose
            sums are not finite contributes zeros, and with ``"raise"`` every rank
            raises :class:`~distnorm.errors.NonFiniteError` naming the layer and ranks.
        extra: a float64 vector reduced in the same all-reduce (CIBN's compensation
            terms), appended after the ``2C + 1`` moment sums in the result.

    Returns:
        float64 ``[m, Σx (C), Σx² (C), extra...]`` summed over the group.
    """
    with torch.no_grad():
        if cuda_ops.applies(x) and x.dim() >= 2:
            # On CUDA two Triton launches write the whole guarded packet
            # (distnorm.cuda_ops.moment_packet).
            numel = packed_size(x.shape[1]) + (0 if extra is None else extra.numel())
            payload = Written(numel, x.device,
                              lambda spec: cuda_ops.moment_packet(x, spec, extra))
            return all_reduce(payload, group, context, "forward",
                              context.nonfinite if context is not None else None)
        sums = moment_sums(x)
        if extra is not None:
            sums = torch.cat([sums, extra.to(torch.float64).flatten()])
        return all_reduce(sums, group, context, "forward",
                          context.nonfinite if context is not None else None)


def group_moments(x: Tensor, group: Optional[Any], *,
                  context: Optional[SyncContext] = None) -> Moments:
    """Moments of the concatenation of every rank's ``x`` in ``group``: one all-reduce.

    Args:
        x: ``(N, C, *)`` local slice; ``N`` may differ across ranks, and be 0.
        group: the process group, or ``None`` for the local batch alone.
        context: the calling layer's sync context, for the guards and messages of the
            all-reduce (see :func:`group_sums`).

    Returns:
        :class:`Moments` in :func:`stats_dtype` of ``x`` (count in float64). The result
        carries no autograd history: the gradient through the moments is written
        out by :func:`distnorm.functional.batch_norm_with_moments`.
    """
    return moments_from_sums(group_sums(x, group, context=context), stats_dtype(x))
