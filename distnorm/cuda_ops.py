"""Launchers of the Triton kernels (:mod:`distnorm.triton_kernels`): a synced layer
on CUDA in a handful of launches, no ``torch.compile`` and no host synchronisation.

Shapes are runtime arguments of the kernels; launch parameters (tile sizes, how
many programs share a channel's reduction) come from :func:`_plan`, a fixed
heuristic on the sizes, so no shape, width, dtype or layout recompiles anything
after the first call of each dtype/flag combination. Workspaces are
``torch.empty`` (no memset launches).

When they apply (:func:`applies`): CUDA tensors (or CPU tensors under Triton's
interpreter, ``TRITON_INTERPRET=1``, when tests put ``"cpu"`` in
``kernels._FUSED_DEVICES``), float16/bfloat16/float32/float64, Triton importable,
``DISTNORM_TRITON`` not ``0``. Elsewhere the callers keep their own paths, the CPU
path unchanged. Triton is imported on the first call that needs it, never by
``import distnorm``.

Inside a user's ``torch.compile`` the same kernels run as custom operators
(``torch.ops.distnorm.*``, registered below with fake implementations and their
mutated arguments declared): opaque to the compiler, no graph break, and CUDA graphs
capture them. Eagerly the launchers are called directly (no dispatcher overhead).
"""

from __future__ import annotations

import os
import struct
from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import kernels
from ._packing import packed_size, unpack_sums

__all__ = ["TRITON_ENV", "Running", "Stats", "applies", "grad_packet", "input_grad",
           "moment_packet", "normalize", "pack", "running_update", "unpack"]

TRITON_ENV = "DISTNORM_TRITON"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per tile of the activation-sized kernels; threads per program = 32·_WARPS.
_TILE = 1024
_WARPS = 4
# The C-sized, one-program kernels walk channels in blocks of this many.
_BLOCK_C = 256
# Programs per streaming multiprocessor the reductions aim for.
_WAVES = 4
_MISSING = object()
_module: Any = _MISSING
_sm_count: dict = {}
# Tests set a list here: every launch appends its kernel's name.
launch_log: Optional[List[str]] = None


class Stats(NamedTuple):
    """Where the kernels read a layer's statistics: reduced sums ``[m, Σx, Σx²]``
    (``sums``; ``count`` is its first element) or ``(count, mean, var)`` tensors."""

    count: Tensor
    sums: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None

    @classmethod
    def of_sums(cls, sums: Tensor) -> "Stats":
        return cls(sums, sums)

    def pointers(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        if self.sums is not None:
            return self.sums, self.sums, self.sums, self.sums, True
        assert self.mean is not None and self.var is not None
        return self.count, self.mean, self.mean, self.var, False


class Running(NamedTuple):
    """The running statistics a forward updates (``tracked`` may be ``None``)."""

    mean: Tensor
    var: Tensor
    tracked: Optional[Tensor]
    momentum: Optional[float]


def _kernels() -> Any:
    """:mod:`distnorm.triton_kernels`, or ``None`` when Triton cannot be imported."""
    global _module
    if _module is _MISSING:
        try:
            from . import triton_kernels
            _module = triton_kernels
        except ImportError:
            _module = None
    return _module


def applies(x: Tensor) -> bool:
    """Whether the Triton kernels run for a tensor on ``x``'s device and dtype."""
    device = x.device.type
    if device not in kernels._FUSED_DEVICES or x.dtype not in _DTYPES:
        return False
    if os.environ.get(TRITON_ENV, "1") in ("", "0"):
        return False
    if device != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    return _kernels() is not None


def _launch(kernel: Any, grid: Tuple[int, ...], *args: Any, **meta: Any) -> None:
    if launch_log is not None:
        launch_log.append(kernel.__name__ if hasattr(kernel, "__name__") else str(kernel))
    device = args[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on the current device's current stream: make it the tensors'
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
        return
    kernel[grid](*args, **meta)


def _compute_dtype(dtype: torch.dtype) -> Any:
    tl = _kernels().tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter runs programs one after another
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_count.get(index)
    if count is None:
        count = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _WAVES * count


class _Plan(NamedTuple):
    """Launch parameters of an activation-sized kernel over a ``(P, C, Q)`` view."""

    shape: Tuple[int, int, int]
    grid: Tuple[int, int]
    n_q: int
    n_chunks: int
    chunks_per_split: int
    meta: dict


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _view(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``(P, C, Q)`` block (a view; a copy for other layouts)."""
    if x.numel() == 0:
        return x.new_empty((0, x.shape[1], 1))
    view = kernels._canonical(x)
    return view if view is not None else kernels._canonical(x.contiguous())


def _plan(x3: Tensor) -> _Plan:
    P, C, Q = x3.shape
    channels_last = Q == 1
    if channels_last:  # tiles of rows × adjacent channels
        block_q = min(_pow2(C), 64)
        block_p = max(1, min(_TILE // block_q, _pow2(P)))
        n_q, n_chunks, programs_c = 1, -(-P // block_p), -(-C // block_q)
    else:  # tiles of rows × positions of one channel
        block_q = max(16, min(_pow2(Q), _TILE))
        block_p = max(1, min(_TILE // block_q, _pow2(P)))
        n_q = -(-Q // block_q)
        n_chunks, programs_c = -(-P // block_p) * n_q, C
    splits = min(n_chunks, max(1, -(-_programs_wanted(x3.device) // programs_c)))
    per_split = -(-n_chunks // splits) if splits else 0
    splits = -(-n_chunks // per_split) if per_split else 0
    meta = dict(BLOCK_P=block_p, BLOCK_Q=block_q, CHANNELS_LAST=channels_last,
                WIDE=x3.numel() >= 2 ** 31 - _TILE, num_warps=_WARPS)
    return _Plan((P, C, Q), (programs_c, splits), n_q, n_chunks, per_split, meta)


def _exact(value: float) -> Tuple[float, float]:
    """``value`` as two float32 numbers whose float64 sum is ``value`` to ~1e-14
    (the kernels' ``_exact``)."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, struct.unpack("f", struct.pack("f", value - high))[0]


def _shape_args(plan: _Plan) -> Tuple[int, ...]:
    return plan.shape + (plan.n_q, plan.n_chunks, plan.chunks_per_split)


def _tail_args(spec: Any) -> Tuple[Any, ...]:
    return (spec.guard, spec.seq, spec.size, float(spec.bit), float(spec.nograd),
            float(spec.mode), float(spec.modulus))


def _moment_packet(x: Tensor, spec: Optional[Any], extra: Optional[Tensor] = None) -> Tensor:
    """Launches :func:`moment_packet`."""
    k = _kernels()
    x3 = _view(x)
    plan = _plan(x3)
    channels = x3.shape[1]
    splits = plan.grid[1]
    part = torch.empty(2 * splits * channels, dtype=torch.float64, device=x.device)
    if splits:
        _launch(k.channel_partials_kernel, plan.grid, x3, x3, part, part, part, part, part,
                *_shape_args(plan), GRAD=False, FROM_SUMS=False, CT=k.tl.float64, **plan.meta)
    n_extra = 0 if extra is None else extra.numel()
    extra = part if extra is None else extra.to(torch.float64).reshape(-1)
    size = spec.size if spec is not None else packed_size(channels) + n_extra
    packet = torch.empty(size, dtype=torch.float64, device=x.device)
    tail = _tail_args(spec) if spec is not None else (packet, packet, size, 0.0, 0.0, 0.0, 1.0)
    guard, seq, size, *numbers = tail
    _launch(k.finish_moments_kernel, (1,), x3, part, extra, packet, guard, seq, channels,
            plan.shape[2], splits, plan.shape[0] * plan.shape[2], n_extra, size, *numbers,
            CHECK=spec is not None and spec.check, TAIL=spec is not None, BLOCK=_BLOCK_C)
    return packet


def _grad_packet(grad_out: Tensor, x: Tensor, stats: Stats, eps: float, spec: Optional[Any],
                grad_weight: Optional[Tensor], grad_bias: Optional[Tensor]) -> Tensor:
    """Launches :func:`grad_packet`."""
    k = _kernels()
    x3, g3 = _view(x), _view(grad_out)
    plan = _plan(x3)
    channels = x3.shape[1]
    splits = plan.grid[1]
    count, sums, mean, var, from_sums = stats.pointers()
    ct = _compute_dtype(x.dtype)
    part = torch.empty(2 * splits * channels, dtype=torch.float64, device=x.device)
    if splits:
        _launch(k.channel_partials_kernel, plan.grid, x3, g3, count, sums, mean, var, part,
                *_shape_args(plan), GRAD=True, FROM_SUMS=from_sums, CT=ct, **plan.meta)
    size = spec.size if spec is not None else 2 * channels
    packet = torch.empty(size, dtype=torch.float64, device=x.device)
    guard, seq, size, *numbers = (_tail_args(spec) if spec is not None
                                  else (packet, packet, size, 0.0, 0.0, 0.0, 1.0))
    _launch(k.finish_grads_kernel, (1,), part, count, sums, mean, var,
            grad_weight if grad_weight is not None else part,
            grad_bias if grad_bias is not None else part, packet, guard, seq, channels, splits,
            *_exact(eps), size, *numbers, FROM_SUMS=from_sums, CT=ct,
            HAS_GRAD_W=grad_weight is not None, HAS_GRAD_B=grad_bias is not None,
            CHECK=spec is not None and spec.check, TAIL=spec is not None, BLOCK=_BLOCK_C)
    return packet


def pack(payload: Tensor, spec: Any) -> Tensor:
    """The guarded packet of a ready payload (one launch): what
    ``distributed._guard._pack_on_device`` computes."""
    k = _kernels()
    packet = torch.empty(spec.size, dtype=torch.float64, device=payload.device)
    guard, seq, size, *numbers = _tail_args(spec)
    _launch(k.pack_kernel, (1,), payload.reshape(-1), packet, guard, seq, payload.numel(), size,
            *numbers, CHECK=bool(spec.check), BLOCK=_BLOCK_C)
    return packet


def _saturation(dtype: torch.dtype) -> float:
    """Where a running buffer of ``dtype`` saturates (0: nowhere): half-precision
    buffers stop at their largest finite value, as :func:`distnorm.functional.
    update_running_stats` does, instead of becoming inf and then NaN."""
    return float(torch.finfo(dtype).max) if dtype in (torch.float16, torch.bfloat16) else 0.0


def _running_meta(running: Optional[Running]) -> Tuple[Tuple[Tensor, Tensor, Tensor], dict, float]:
    k = _kernels()
    if running is None:
        return (), {}, 0.0
    tracked = running.tracked if running.tracked is not None else running.mean
    meta = dict(UT=k.tl.float64 if running.mean.dtype == torch.float64 else k.tl.float32,
                CUMULATIVE=running.momentum is None, HAS_TRACKED=running.tracked is not None,
                LIMIT=_saturation(running.mean.dtype))
    momentum = 0.0 if running.momentum is None else float(running.momentum)
    return (running.mean, running.var, tracked), meta, momentum


def _normalize(x: Tensor, stats: Stats, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, running: Optional[Running] = None) -> Tensor:
    """Launches :func:`normalize`."""
    if running is not None and running.momentum is None and running.tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    k = _kernels()
    y = torch.empty_like(x)
    x3 = _view(x)
    y3 = _view(y) if y.numel() else x3
    plan = _plan(x3)
    count, sums, mean, var, from_sums = stats.pointers()
    buffers, running_meta, momentum = _running_meta(running)
    grid = (max(plan.grid[0], 1), max(plan.grid[1], 1))  # one program at least: the update
    if running is None and not plan.grid[1]:
        return y
    _launch(k.normalize_kernel, grid, x3, y3, weight if weight is not None else count,
            bias if bias is not None else count, count, sums, mean, var,
            *(buffers or (count, count, count)), *_shape_args(plan), *_exact(eps),
            *_exact(momentum),
            HAS_W=weight is not None, HAS_B=bias is not None, FROM_SUMS=from_sums,
            CT=_compute_dtype(x.dtype), RUNNING=running is not None,
            **(running_meta or dict(UT=k.tl.float32, CUMULATIVE=False, HAS_TRACKED=False, LIMIT=0.0)),
            BLOCK_C=_BLOCK_C, **plan.meta)
    return y


def _running_update(stats: Stats, running: Running) -> None:
    """Launches :func:`running_update`."""
    if running.momentum is None and running.tracked is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    k = _kernels()
    count, sums, mean, var, from_sums = stats.pointers()
    buffers, meta, momentum = _running_meta(running)
    dtype = torch.float64 if not from_sums and mean.dtype == torch.float64 else torch.float32
    _launch(k.running_update_kernel, (1,), count, sums, mean, var, *buffers,
            running.mean.numel(), *_exact(momentum), FROM_SUMS=from_sums, CT=_compute_dtype(dtype),
            BLOCK=_BLOCK_C, **meta)


def _unpack(sums: Tensor, channels: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Launches :func:`unpack`."""
    k = _kernels()
    mean = torch.empty(channels, dtype=dtype, device=sums.device)
    var = torch.empty(channels, dtype=dtype, device=sums.device)
    _launch(k.unpack_kernel, (1,), sums, mean, var, channels, CT=_compute_dtype(dtype),
            BLOCK=_BLOCK_C)
    return unpack_sums(sums, channels)[0], mean, var


def _input_grad(grad_out: Tensor, x: Tensor, stats: Stats, reduced: Tensor,
               weight: Optional[Tensor], eps: float) -> Tensor:
    """Launches :func:`input_grad`."""
    k = _kernels()
    dx = torch.empty_like(x)
    if not x.numel():
        return dx
    x3, g3, dx3 = _view(x), _view(grad_out), _view(dx)
    plan = _plan(x3)
    count, sums, mean, var, from_sums = stats.pointers()
    _launch(k.input_grad_kernel, plan.grid, g3, x3, dx3, weight if weight is not None else count,
            count, sums, mean, var, reduced, *_shape_args(plan), *_exact(eps),
            HAS_W=weight is not None, FROM_SUMS=from_sums, CT=_compute_dtype(x.dtype),
            **plan.meta)
    return dx


# -- custom operators: what a torch.compile graph calls --------------------------------
def _stats_of(count: Tensor, sums: Optional[Tensor], mean: Optional[Tensor],
              var: Optional[Tensor]) -> Stats:
    return Stats.of_sums(sums) if sums is not None else Stats(count, None, mean, var)


def _running_of(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                tracked: Optional[Tensor], momentum: Optional[float]) -> Optional[Running]:
    if running_mean is None or running_var is None:
        return None
    return Running(running_mean, running_var, tracked, momentum)


_STATS = "Tensor count, Tensor? sums, Tensor? mean, Tensor? var"


def _op(name: str, schema: str, mutates: Tuple[str, ...] = ()) -> Any:
    return torch.library.custom_op(f"distnorm::{name}", mutates_args=mutates, schema=schema)


@_op("moment_packet", "(Tensor x, Tensor? extra) -> Tensor")
def _moment_packet_op(x: Tensor, extra: Optional[Tensor]) -> Tensor:
    return _moment_packet(x, None, extra)


@_moment_packet_op.register_fake
def _(x: Tensor, extra: Optional[Tensor]) -> Tensor:
    extra_numel = 0 if extra is None else extra.numel()
    return x.new_empty(packed_size(x.shape[1]) + extra_numel, dtype=torch.float64)


@_op("grad_packet", f"(Tensor grad_out, Tensor x, {_STATS}, float eps, Tensor(a!)? grad_weight, "
     "Tensor(b!)? grad_bias) -> Tensor", ("grad_weight", "grad_bias"))
def _grad_packet_op(grad_out: Tensor, x: Tensor, count: Tensor, sums: Optional[Tensor],
                    mean: Optional[Tensor], var: Optional[Tensor], eps: float,
                    grad_weight: Optional[Tensor], grad_bias: Optional[Tensor]) -> Tensor:
    return _grad_packet(grad_out, x, _stats_of(count, sums, mean, var), eps, None, grad_weight,
                        grad_bias)


@_grad_packet_op.register_fake
def _(grad_out: Tensor, x: Tensor, *args: Any) -> Tensor:
    return x.new_empty(2 * x.shape[1], dtype=torch.float64)


@_op("normalize", f"(Tensor x, {_STATS}, Tensor? weight, Tensor? bias, float eps, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? tracked, "
     "float? momentum) -> Tensor", ("running_mean", "running_var", "tracked"))
def _normalize_op(x: Tensor, count: Tensor, sums: Optional[Tensor], mean: Optional[Tensor],
                  var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  tracked: Optional[Tensor], momentum: Optional[float]) -> Tensor:
    return _normalize(x, _stats_of(count, sums, mean, var), weight, bias, eps,
                      _running_of(running_mean, running_var, tracked, momentum))


@_normalize_op.register_fake
def _(x: Tensor, *args: Any) -> Tensor:
    return torch.empty_like(x)


@_op("running_update", f"({_STATS}, Tensor(a!) running_mean, Tensor(b!) running_var, "
     "Tensor(c!)? tracked, float? momentum) -> ()", ("running_mean", "running_var", "tracked"))
def _running_update_op(count: Tensor, sums: Optional[Tensor], mean: Optional[Tensor],
                       var: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                       tracked: Optional[Tensor], momentum: Optional[float]) -> None:
    _running_update(_stats_of(count, sums, mean, var),
                    Running(running_mean, running_var, tracked, momentum))


@_running_update_op.register_fake
def _(*args: Any) -> None:
    return None


@_op("unpack", "(Tensor sums, int channels, ScalarType dtype) -> (Tensor, Tensor)")
def _unpack_op(sums: Tensor, channels: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    _, mean, var = _unpack(sums, channels, dtype)
    return mean, var


@_unpack_op.register_fake
def _(sums: Tensor, channels: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    return sums.new_empty(channels, dtype=dtype), sums.new_empty(channels, dtype=dtype)


@_op("input_grad", f"(Tensor grad_out, Tensor x, {_STATS}, Tensor reduced, Tensor? weight, "
     "float eps) -> Tensor")
def _input_grad_op(grad_out: Tensor, x: Tensor, count: Tensor, sums: Optional[Tensor],
                   mean: Optional[Tensor], var: Optional[Tensor], reduced: Tensor,
                   weight: Optional[Tensor], eps: float) -> Tensor:
    return _input_grad(grad_out, x, _stats_of(count, sums, mean, var), reduced, weight, eps)


@_input_grad_op.register_fake
def _(grad_out: Tensor, x: Tensor, *args: Any) -> Tensor:
    return torch.empty_like(x)


# -- the entry points: launchers eagerly, the custom operators inside torch.compile ---
def _args(stats: Stats) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    return stats.count, stats.sums, stats.mean, stats.var


def moment_packet(x: Tensor, spec: Optional[Any], extra: Optional[Tensor] = None) -> Tensor:
    """The forward packet of ``x``: ``[m, Σx (C), Σx² (C), extra…]`` in float64, from
    sums shifted by each channel's first element; guarded and padded to
    ``spec.size`` when ``spec`` (a ``collectives.DevicePacket``) is given. Two launches.
    """
    if torch.compiler.is_compiling():  # the traced all-reduce packs (never a spec)
        return torch.ops.distnorm.moment_packet(x, extra)
    return _moment_packet(x, spec, extra)


def grad_packet(grad_out: Tensor, x: Tensor, stats: Stats, eps: float, spec: Optional[Any],
                grad_weight: Optional[Tensor], grad_bias: Optional[Tensor]) -> Tensor:
    """The backward packet ``[Σg (C), Σg·x̂ (C)]`` (float64; guarded when ``spec``),
    writing the local ``grad_weight = Σg·x̂`` and ``grad_bias = Σg`` when given. Two
    launches (one for an empty slice). ``grad_out`` has ``x``'s strides."""
    if torch.compiler.is_compiling():
        return torch.ops.distnorm.grad_packet(grad_out, x, *_args(stats), eps, grad_weight,
                                              grad_bias)
    return _grad_packet(grad_out, x, stats, eps, spec, grad_weight, grad_bias)


def normalize(x: Tensor, stats: Stats, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, running: Optional[Running] = None) -> Tensor:
    """``(x − μ)·invstd·w + b`` in ``x``'s dtype and layout (one launch), with the
    running update of ``running`` in the same launch."""
    if torch.compiler.is_compiling():
        mean, var, tracked, momentum = running if running is not None else (None,) * 4
        return torch.ops.distnorm.normalize(x, *_args(stats), weight, bias, eps, mean, var,
                                            tracked, momentum)
    return _normalize(x, stats, weight, bias, eps, running)


def running_update(stats: Stats, running: Running) -> None:
    """The running update alone, in place (one launch)."""
    if torch.compiler.is_compiling():
        torch.ops.distnorm.running_update(*_args(stats), *running)
        return
    _running_update(stats, running)


def unpack(sums: Tensor, channels: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, var)`` from reduced sums (one launch): ``count`` a 0-dim view of
    ``sums``, mean and biased variance in ``dtype``; zeros when the count is 0."""
    if torch.compiler.is_compiling():
        mean, var = torch.ops.distnorm.unpack(sums, channels, dtype)
        return unpack_sums(sums, channels)[0], mean, var
    return _unpack(sums, channels, dtype)


def input_grad(grad_out: Tensor, x: Tensor, stats: Stats, reduced: Tensor,
               weight: Optional[Tensor], eps: float) -> Tensor:
    """``∂L/∂x = w·invstd·(g − A/M − x̂·B/M)`` from the group's ``reduced = [A, B]``
    (one launch); ``x``'s dtype and layout. ``grad_out`` has ``x``'s strides."""
    if torch.compiler.is_compiling():
        return torch.ops.distnorm.input_grad(grad_out, x, *_args(stats), reduced, weight, eps)
    return _input_grad(grad_out, x, stats, reduced, weight, eps)
