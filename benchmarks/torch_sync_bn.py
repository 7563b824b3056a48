"""torch's ``nn.SyncBatchNorm`` algorithm, re-implemented for CPU as a benchmark baseline.

``torch.nn.SyncBatchNorm`` refuses CPU tensors in training, and the kernels it calls
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``,
``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``) have no CPU
implementation. This module follows the algorithm of torch 2.14's
``torch/nn/modules/_functions.py`` step by step and replaces each CUDA-only kernel by
the fastest CPU op that computes the same thing, so that a comparison against it
measures the *algorithm* (communication volume and pattern, host-side filtering),
not a slow CPU stand-in:

Forward
    1. local mean and ``invstd = 1/sqrt(var + eps)`` of the slice (CUDA:
       ``batch_norm_stats``; here ``torch.batch_norm_update_stats``, the native kernel
       that ``nn.BatchNorm2d`` itself uses on CPU — or ``torch.var_mean`` with
       ``stats="var_mean"``, which is several times slower on CPU);
    2. pack ``[mean (C), invstd (C), count (1)]`` in the input's dtype and
       **all-gather** it: every rank receives ``(2C + 1)·W`` numbers (gloo: list
       ``all_gather`` + ``stack``, as torch does for gloo);
    3. drop the rows of empty ranks on the host (``count_all[mask]``, a
       data-dependent shape: a device→host synchronization on CUDA);
    4. combine the per-rank (mean, invstd, count) into the group's mean and invstd
       and update the running statistics (``batch_norm_gather_stats_with_counts``:
       the same Chan/Welford combination, written vectorized over ranks);
    5. normalize (``batch_norm_elemt``; here one eval-mode ``torch.batch_norm`` pass).

Backward
    1. local ``sum_dy = Σ dy`` and ``sum_dy_xmu = Σ dy·(x − μ)`` (``batch_norm_backward_reduce``;
       here one fused ``native_batch_norm_backward`` pass with a unit invstd);
    2. **one all-reduce** of ``[sum_dy, sum_dy_xmu]`` (2C numbers);
    3. ``dx = w·invstd·(dy − sum_dy/M − (x − μ)·invstd²·sum_dy_xmu/M)`` with ``M`` the
       sum of the gathered counts (``batch_norm_backward_elemt``; here one eval-mode
       ``torch.batch_norm`` pass for the ``x`` terms plus one ``addcmul_`` for ``dy``).

Communication per layer and step: ``(2C + 1)·W`` input-dtype numbers gathered
forward, ``2C`` reduced backward — O(W·C), where distnorm sends O(C).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["TorchSyncBatchNorm", "torch_algo_bytes"]

_REDUCED = (torch.float16, torch.bfloat16)


def torch_algo_bytes(channels: int, world: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes each rank receives per layer and step: all-gather forward, all-reduce backward."""
    return {"forward": (2 * channels + 1) * world * itemsize, "backward": 2 * channels * itemsize}


def _channel(t: Tensor, like: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _local_stats(x: Tensor, eps: float, method: str) -> tuple[Tensor, Tensor]:
    """Mean and invstd of each channel (``batch_norm_stats``), in float32 for reduced inputs."""
    xs = x.float() if x.dtype in _REDUCED else x  # batch_norm_stats returns accscalar_t
    if method == "var_mean":
        dims = [d for d in range(xs.dim()) if d != 1]
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
    else:
        mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return mean, torch.rsqrt(var + eps)


def _gather_stats_with_counts(mean_all: Tensor, invstd_all: Tensor, counts: Tensor,
                              running_mean: Tensor | None, running_var: Tensor | None,
                              momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """Group mean and invstd from per-rank rows (``batch_norm_gather_stats_with_counts``).

    The CUDA kernel merges ranks one at a time (Welford); the sum below is the same
    combination in closed form: M = Σn, μ = Σn·μ_r/M, M2 = Σn·var_r + Σn·(μ_r − μ)².
    """
    n = counts.to(mean_all.dtype).unsqueeze(1)                  # (W', 1)
    total = n.sum()
    mean = (n * mean_all).sum(0) / total
    var_r = invstd_all.pow(-2) - eps                             # back from invstd, as torch does
    m2 = (n * var_r).sum(0) + (n * (mean_all - mean).pow(2)).sum(0)
    invstd = torch.rsqrt(m2 / total + eps)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = m2 / (total - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mean, invstd


class _TorchSyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                momentum: float, group: Any, world: int, stats: str) -> Tensor:
        if not input.is_contiguous(memory_format=torch.channels_last):
            input = input.contiguous()
        channels = input.shape[1]
        per_channel = input.numel() // channels
        if per_channel == 1 and world < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {per_channel}")

        if input.numel() > 0:
            mean, invstd = _local_stats(input, eps, stats)
            count = torch.full((1,), per_channel, dtype=mean.dtype, device=mean.device)
            packed = torch.cat([mean, invstd, count])
        else:  # an empty rank still joins the collective, with a zero count
            packed = torch.zeros(2 * channels + 1, dtype=input.dtype, device=input.device)

        # The all-gather: (2C + 1)·W numbers arrive on every rank (gloo: the list form).
        rows = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(rows, packed, group)
        table = torch.stack(rows)
        mean_all, invstd_all, count_all = table.split([channels, channels, 1], dim=1)

        # Host-side filtering of empty ranks (a data-dependent shape: a host sync on CUDA).
        keep = count_all.squeeze(-1) >= 1
        mean_all, invstd_all, count_all = mean_all[keep], invstd_all[keep], count_all[keep]

        counts = count_all.view(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = _gather_stats_with_counts(mean_all, invstd_all, counts, running_mean,
                                                 running_var, momentum, eps)

        ctx.save_for_backward(input, weight, mean, invstd, count_all.to(torch.int32))
        ctx.group = group
        if input.numel() == 0:
            return torch.empty_like(input)
        # batch_norm_elemt: (x − μ)·invstd·w + b, one native pass (eval-mode kernel).
        var = invstd.pow(-2) - eps
        return torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        if not grad_output.is_contiguous(memory_format=torch.channels_last):
            grad_output = grad_output.contiguous()
        x, weight, mean, invstd, count_all = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        channels = x.shape[1]

        if x.numel() > 0:
            # batch_norm_backward_reduce: Σdy and Σdy·(x − μ) in one fused pass
            # (a unit invstd makes the kernel's "grad_weight" Σdy·(x − μ)).
            ones = torch.ones_like(invstd)
            _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_output, x, None, None, None, mean, ones, True, 0.0, [False, True, True])
            if need_x:
                packed = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(packed, dist.ReduceOp.SUM, ctx.group)
                total_dy, total_dy_xmu = packed.split(channels)
                # batch_norm_backward_elemt with M = Σ count_all:
                # dx = k·dy + a·x + c, k = w·invstd, a = −k·invstd²·Σdy(x−μ)/M,
                # c = −k·Σdy/M − a·μ.
                m = count_all.sum().to(invstd.dtype)
                k = invstd if weight is None else invstd * weight.to(invstd.dtype)
                a = -k * invstd * invstd * total_dy_xmu / m
                c = -k * total_dy / m - a * mean
                # a·x + c as one eval-mode batch_norm pass, then + k·dy in place.
                zeros, unit = torch.zeros_like(a), torch.ones_like(a)
                grad_input = torch.batch_norm(x, a, c, zeros, unit, False, 0.0, 0.0, False)
                grad_input.addcmul_(grad_output, _channel(k, grad_output).to(grad_input.dtype))
            if weight is not None and need_w:
                grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
            if weight is not None and need_b:
                grad_bias = sum_dy.to(weight.dtype)
        elif need_x:
            # Empty slice: join the all-reduce so that the other ranks are not blocked.
            packed = torch.zeros(2 * channels, dtype=x.dtype, device=x.device)
            dist.all_reduce(packed, dist.ReduceOp.SUM, ctx.group)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class TorchSyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm``'s module logic over :class:`_TorchSyncBatchNormFunction`.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        process_group: ``None`` = the world group.
        stats: ``"native"`` (``torch.batch_norm_update_stats``) or ``"var_mean"``
            (``torch.var_mean``) for the local moments.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, stats: str = "native",
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if stats not in ("native", "var_mean"):
            raise ValueError(f"stats must be 'native' or 'var_mean' (got {stats!r})")
        self.process_group = process_group
        self.stats = stats

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Same bookkeeping as torch.nn.SyncBatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            group = self.process_group or dist.group.WORLD
            world = dist.get_world_size(group)
            need_sync = world > 1
        if not need_sync:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, factor, self.eps)
        return _TorchSyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                                 running_var, self.eps, factor, group, world,
                                                 self.stats)
