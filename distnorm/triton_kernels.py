"""The Triton kernels of a synced layer on CUDA (launched by :mod:`distnorm.cuda_ops`).

A training step of ``SyncBatchNorm`` is six launches and two all-reduces:

forward
    :func:`channel_partials_kernel` (shifted float64 sums, each channel's reduction
    split over several programs) → :func:`finish_moments_kernel` (the guarded packet
    ``[m, Σx, Σx², 0…, tail]`` written in place) → all-reduce →
    :func:`normalize_kernel` (``y`` and, in its first program, the running update).
backward
    :func:`channel_partials_kernel` (``Σg``, ``Σg·(x − μ)``) →
    :func:`finish_grads_kernel` (packet ``[Σg, Σg·x̂, 0…, tail]``, local weight and
    bias gradients) → all-reduce → :func:`input_grad_kernel`.

Every activation-sized kernel sees its tensor as a contiguous ``(P, C, Q)`` block
(``(N, C, H·W)`` for NCHW, ``(N·H·W, C, 1)`` for channels_last and ``(N, C)``) and
walks it in *chunks*: tiles of ``BLOCK_P`` rows by ``BLOCK_Q`` columns, where the
columns are positions ``q`` of one channel (``CHANNELS_LAST`` false; program axis 0 is
the channel) or ``BLOCK_Q`` adjacent channels (``CHANNELS_LAST`` true, ``Q = 1``;
axis 0 is a block of channels). Program axis 1 is the *split*: each split takes
``chunks_per_split`` consecutive chunks. Index arithmetic is int32 unless ``WIDE``.

Statistics come either from a packed, reduced buffer ``sums = [m, Σx (C), Σx² (C)]``
(``FROM_SUMS``: mean and biased variance formed in float64, as
:func:`distnorm.stats.moments_from_sums` does) or from ``(count, mean, var)``
tensors (variants that form their own moments). They are rounded to the compute
dtype (float32; float64 for float64 inputs) before use, as the layer's eager path
rounds them, and ``invstd = 1/sqrt(var + eps)`` is formed there.

The guard's tail (layout owned by :mod:`distnorm.distributed.collectives`, 11
float64 numbers): ``[non-finite flag, no-autograd bit, 0 (header bits), tag, tag²,
mode, mode², call, call², seq, seq²]``; the ``guard`` ``[tag, tag², call, call²]`` and
``seq`` ``[seq, seq²]`` counters are advanced in place, modulo ``modulus``.

Integer shape arguments are not specialized (``do_not_specialize``): one compiled
kernel per dtype and flag combination, whatever the sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

_SHAPES = ["P", "C", "Q", "n_q", "n_chunks", "chunks_per_split"]
# The guard's tail: TAIL numbers, written as one masked vector of TAIL_LANES lanes.
TAIL = 11
TAIL_LANES = 16


@triton.jit
def _channels(pid_c, C, BLOCK_Q: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """The channels a program serves (a vector of 1 or ``BLOCK_Q``) and their mask."""
    if CHANNELS_LAST:
        ch = pid_c * BLOCK_Q + tl.arange(0, BLOCK_Q)
    else:
        ch = pid_c + tl.arange(0, 1)
    return ch, ch < C


@triton.jit
def _tile(k, ch, P, C, Q, n_q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
          CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr):
    """Element offsets and mask of chunk ``k`` (a ``BLOCK_P × BLOCK_Q`` tile)."""
    if CHANNELS_LAST:
        rows = k * BLOCK_P + tl.arange(0, BLOCK_P)
        if WIDE:
            rows = rows.to(tl.int64)
        offs = rows[:, None] * C + ch[None, :]
        mask = (rows < P)[:, None] & (ch < C)[None, :]
    else:
        row_block = k // n_q  # one scalar division per chunk, none per element
        cols = (k - row_block * n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rows = row_block * BLOCK_P + tl.arange(0, BLOCK_P)
        if WIDE:
            rows = rows.to(tl.int64)
        offs = rows[:, None] * C * Q + ch * Q + cols[None, :]
        mask = (rows < P)[:, None] & (cols < Q)[None, :]
    return offs, mask


@triton.jit
def _stats(ch, mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr, FROM_SUMS: tl.constexpr,
           CT: tl.constexpr):
    """``(count, mean, var)`` of channels ``ch``: count float64, the others in ``CT``."""
    count = tl.load(count_ptr).to(tl.float64)
    if FROM_SUMS:
        safe = tl.maximum(count, 1.0)
        mean = tl.load(sums_ptr + 1 + ch, mask=mask, other=0.0) / safe
        square = tl.load(sums_ptr + 1 + C + ch, mask=mask, other=0.0) / safe
        var = tl.maximum(square - mean * mean, 0.0)
        return count, mean.to(CT), var.to(CT)
    mean = tl.load(mean_ptr + ch, mask=mask, other=0.0).to(CT)
    var = tl.load(var_ptr + ch, mask=mask, other=0.0).to(CT)
    return count, mean, var


@triton.jit
def _exact(hi, lo):
    """A float64 number passed as two float32 arguments (``hi + lo``; Triton passes
    Python floats as float32): momentum and eps as exact as torch's doubles."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _split_range(n_chunks, chunks_per_split):
    start = tl.program_id(1) * chunks_per_split
    return start, tl.minimum(start + chunks_per_split, n_chunks)


@triton.jit(do_not_specialize=_SHAPES)
def channel_partials_kernel(x_ptr, g_ptr, count_ptr, sums_ptr, mean_ptr, var_ptr, part_ptr,
                            P, C, Q, n_q, n_chunks, chunks_per_split,
                            GRAD: tl.constexpr, FROM_SUMS: tl.constexpr, CT: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                            CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr):
    """Per-split float64 partial sums of each channel.

    Forward (``GRAD`` false): ``Σ(x − s)`` and ``Σ(x − s)²`` with ``s = x[0, c, 0]``,
    the shift that keeps the variance exact whatever ``|μ|/σ``. Backward: ``Σg`` and
    ``Σg·(x − μ)``, with ``μ`` from the statistics.

    Args:
        x_ptr: the ``(P, C, Q)`` input (float16/bfloat16/float32/float64), read.
        g_ptr: the output gradient, same layout as ``x`` (backward only), read.
        count_ptr, sums_ptr, mean_ptr, var_ptr: the statistics (backward only; see
            the module docstring), read.
        part_ptr: float64 ``(2, splits, C)`` workspace, written (uninitialized before).
    """
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    ch, ch_mask = _channels(pid_c, C, BLOCK_Q, CHANNELS_LAST)
    if GRAD:
        _, mean, _ = _stats(ch, ch_mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr, FROM_SUMS, CT)
        shift = mean.to(tl.float64)
    else:  # row 0 of the channel: offset c·Q in both layouts
        shift = tl.load(x_ptr + ch * Q, mask=ch_mask, other=0.0).to(tl.float64)
    first = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float64)
    second = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float64)
    start, end = _split_range(n_chunks, chunks_per_split)
    for k in range(start, end):
        offs, mask = _tile(k, ch, P, C, Q, n_q, BLOCK_P, BLOCK_Q, CHANNELS_LAST, WIDE)
        centred = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                           - shift[None, :], 0.0)
        if GRAD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            first += g
            second += g * centred
        else:
            first += centred
            second += centred * centred
    splits = tl.num_programs(1)
    if CHANNELS_LAST:
        tl.store(part_ptr + split * C + ch, tl.sum(first, 0), mask=ch_mask)
        tl.store(part_ptr + (splits + split) * C + ch, tl.sum(second, 0), mask=ch_mask)
    else:
        tl.store(part_ptr + split * C + pid_c, tl.sum(tl.sum(first, 1), 0))
        tl.store(part_ptr + (splits + split) * C + pid_c, tl.sum(tl.sum(second, 1), 0))


@triton.jit
def _gather(part_ptr, ch, mask, C, splits):
    first = tl.zeros(ch.shape, dtype=tl.float64)
    second = tl.zeros(ch.shape, dtype=tl.float64)
    for j in range(0, splits):
        first += tl.load(part_ptr + j * C + ch, mask=mask, other=0.0)
        second += tl.load(part_ptr + (splits + j) * C + ch, mask=mask, other=0.0)
    return first, second


@triton.jit
def _moment_sums(x_ptr, part_ptr, ch, mask, C, Q, splits, m):
    """``Σx`` and ``Σx²`` from the shifted partial sums (float64)."""
    first, second = _gather(part_ptr, ch, mask, C, splits)
    loaded = ch < tl.where(m > 0, C, 0)  # an empty slice has no first element
    shift = tl.load(x_ptr + ch * Q, mask=loaded, other=0.0).to(tl.float64)
    return shift * m + first, second + shift * (2.0 * first + shift * m)


@triton.jit
def _grad_sums(part_ptr, ch, mask, C, splits, count_ptr, sums_ptr, mean_ptr, var_ptr, eps, eps_lo,
               FROM_SUMS: tl.constexpr, CT: tl.constexpr):
    """``Σg`` and ``Σg·x̂`` (float64) from the partial sums."""
    sum_g, sum_gxmu = _gather(part_ptr, ch, mask, C, splits)
    _, _, var = _stats(ch, mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr, FROM_SUMS, CT)
    invstd = 1.0 / tl.sqrt(var + _exact(eps, eps_lo).to(CT))
    return sum_g, sum_gxmu * invstd.to(tl.float64)


@triton.jit
def _nonfinite(total):
    return (total - total) != 0.0  # NaN or ±Inf


@triton.jit
def _write_tail(packet_ptr, guard_ptr, seq_ptr, end, size, bad, bit, nograd, mode, modulus,
                BLOCK: tl.constexpr):
    """Zeros over ``[end, size − TAIL)``, then the guard's tail; advances the counters."""
    tail_at = size - 11
    for p0 in range(end, tail_at, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        tl.store(packet_ptr + offs, tl.zeros([BLOCK], dtype=tl.float64), mask=offs < tail_at)
    call = tl.load(guard_ptr + 2) + 1.0
    call = tl.where(call >= modulus, call - modulus, call)
    seq = tl.load(seq_ptr) + 1.0
    seq = tl.where(seq >= modulus, seq - modulus, seq)
    tag = tl.load(guard_ptr)
    tag_sq = tl.load(guard_ptr + 1)
    # Every thread of the program has read the counters before any writes them back
    # (scalars are loaded by all threads; a warp ahead must not advance them twice).
    tl.debug_barrier()
    tl.store(guard_ptr + 2, call)
    tl.store(guard_ptr + 3, call * call)
    tl.store(seq_ptr, seq)
    tl.store(seq_ptr + 1, seq * seq)
    flag = tl.where(bad, bit, 0.0)
    lane = tl.arange(0, 16)
    value = tl.where(lane == 0, flag, tl.where(lane == 1, nograd, 0.0)).to(tl.float64)
    value = tl.where(lane == 3, tag, tl.where(lane == 4, tag_sq, value))
    value = tl.where(lane == 5, mode, tl.where(lane == 6, mode * mode, value))
    value = tl.where(lane == 7, call, tl.where(lane == 8, call * call, value))
    value = tl.where(lane == 9, seq, tl.where(lane == 10, seq * seq, value))
    tl.store(packet_ptr + tail_at + lane, value, mask=lane < 11)


@triton.jit(do_not_specialize=["C", "Q", "splits", "count", "n_extra", "size"])
def finish_moments_kernel(x_ptr, part_ptr, extra_ptr, packet_ptr, guard_ptr, seq_ptr,
                          C, Q, splits, count, n_extra, size, bit, nograd, mode, modulus,
                          CHECK: tl.constexpr, TAIL: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the forward packet ``[m, Σx (C), Σx² (C), extra (n_extra)]``.

    With ``TAIL`` the packet is padded with zeros to ``size`` and ends in the guard's
    tail; with ``CHECK`` a non-finite payload is written as zeros and raises the flag.

    Args:
        x_ptr: the input (its shift ``x[0, c, 0]`` at offset ``c·Q``), read.
        part_ptr: float64 ``(2, splits, C)`` partials of :func:`channel_partials_kernel`.
        extra_ptr: float64 ``(n_extra,)`` reduced after the sums, read.
        packet_ptr: float64 ``(size,)`` (``2C + 1 + n_extra`` without ``TAIL``), written.
        guard_ptr: float64 ``[tag, tag², call, call²]``, call advanced (``TAIL`` only).
        seq_ptr: float64 ``[seq, seq²]``, advanced (``TAIL`` only).
    """
    m = count.to(tl.float64)
    bad = m != m  # False
    if CHECK:
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for c0 in range(0, C, BLOCK):
            ch = c0 + tl.arange(0, BLOCK)
            mask = ch < C
            sum_x, sum_sq = _moment_sums(x_ptr, part_ptr, ch, mask, C, Q, splits, m)
            total += tl.where(mask, sum_x + sum_sq, 0.0)
        for e0 in range(0, n_extra, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            total += tl.load(extra_ptr + offs, mask=offs < n_extra, other=0.0)
        bad = _nonfinite(tl.sum(total, 0))
    tl.store(packet_ptr, tl.where(bad, 0.0, m))
    for c0 in range(0, C, BLOCK):
        ch = c0 + tl.arange(0, BLOCK)
        mask = ch < C
        sum_x, sum_sq = _moment_sums(x_ptr, part_ptr, ch, mask, C, Q, splits, m)
        tl.store(packet_ptr + 1 + ch, tl.where(bad, 0.0, sum_x), mask=mask)
        tl.store(packet_ptr + 1 + C + ch, tl.where(bad, 0.0, sum_sq), mask=mask)
    for e0 in range(0, n_extra, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        value = tl.load(extra_ptr + offs, mask=offs < n_extra, other=0.0)
        tl.store(packet_ptr + 1 + 2 * C + offs, tl.where(bad, 0.0, value), mask=offs < n_extra)
    if TAIL:
        _write_tail(packet_ptr, guard_ptr, seq_ptr, 1 + 2 * C + n_extra, size, bad, bit,
                    nograd, mode, modulus, BLOCK)


@triton.jit(do_not_specialize=["C", "splits", "size"])
def finish_grads_kernel(part_ptr, count_ptr, sums_ptr, mean_ptr, var_ptr, grad_w_ptr,
                        grad_b_ptr, packet_ptr, guard_ptr, seq_ptr, C, splits, eps, eps_lo, size,
                        bit, nograd, mode, modulus, FROM_SUMS: tl.constexpr,
                        CT: tl.constexpr, HAS_GRAD_W: tl.constexpr, HAS_GRAD_B: tl.constexpr,
                        CHECK: tl.constexpr, TAIL: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the backward packet ``[Σg (C), Σg·x̂ (C)]`` and the local
    ``grad_weight = Σg·x̂``, ``grad_bias = Σg``.

    Args:
        part_ptr: float64 ``(2, splits, C)`` partials ``Σg``, ``Σg·(x − μ)``, read.
        count_ptr, sums_ptr, mean_ptr, var_ptr: the forward's statistics, read.
        grad_w_ptr, grad_b_ptr: ``(C,)`` in the weight's dtype, written.
        packet_ptr: float64 ``(size,)`` (``2C`` without ``TAIL``), written.
        guard_ptr, seq_ptr: the counters, advanced (``TAIL`` only).
    """
    bad = eps != eps  # False
    if CHECK:
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for c0 in range(0, C, BLOCK):
            ch = c0 + tl.arange(0, BLOCK)
            mask = ch < C
            sum_g, sum_gxhat = _grad_sums(part_ptr, ch, mask, C, splits, count_ptr, sums_ptr,
                                          mean_ptr, var_ptr, eps, eps_lo, FROM_SUMS, CT)
            total += tl.where(mask, sum_g + sum_gxhat, 0.0)
        bad = _nonfinite(tl.sum(total, 0))
    for c0 in range(0, C, BLOCK):
        ch = c0 + tl.arange(0, BLOCK)
        mask = ch < C
        sum_g, sum_gxhat = _grad_sums(part_ptr, ch, mask, C, splits, count_ptr, sums_ptr,
                                      mean_ptr, var_ptr, eps, eps_lo, FROM_SUMS, CT)
        tl.store(packet_ptr + ch, tl.where(bad, 0.0, sum_g), mask=mask)
        tl.store(packet_ptr + C + ch, tl.where(bad, 0.0, sum_gxhat), mask=mask)
        if HAS_GRAD_W:
            tl.store(grad_w_ptr + ch, sum_gxhat.to(grad_w_ptr.dtype.element_ty), mask=mask)
        if HAS_GRAD_B:
            tl.store(grad_b_ptr + ch, sum_g.to(grad_b_ptr.dtype.element_ty), mask=mask)
    if TAIL:
        _write_tail(packet_ptr, guard_ptr, seq_ptr, 2 * C, size, bad, bit, nograd, mode,
                    modulus, BLOCK)


@triton.jit(do_not_specialize=["n", "size"])
def pack_kernel(payload_ptr, packet_ptr, guard_ptr, seq_ptr, n, size, bit, nograd, mode,
                modulus, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the guarded packet of a ready payload.

    Args:
        payload_ptr: ``(n,)`` payload (any float dtype), read.
        packet_ptr: float64 ``(size,)``, written.
        guard_ptr, seq_ptr: the counters, advanced.
    """
    bad = n != n  # False
    if CHECK:
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for p0 in range(0, n, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            total += tl.load(payload_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
        bad = _nonfinite(tl.sum(total, 0))
    for p0 in range(0, n, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        value = tl.load(payload_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
        tl.store(packet_ptr + offs, tl.where(bad, 0.0, value), mask=offs < n)
    _write_tail(packet_ptr, guard_ptr, seq_ptr, n, size, bad, bit, nograd, mode, modulus, BLOCK)


@triton.jit
def _running_update(count_ptr, sums_ptr, mean_ptr, var_ptr, run_mean_ptr, run_var_ptr,
                    tracked_ptr, C, momentum, momentum_lo, FROM_SUMS: tl.constexpr,
                    CT: tl.constexpr, UT: tl.constexpr, CUMULATIVE: tl.constexpr,
                    HAS_TRACKED: tl.constexpr, LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """``running ← running + f·(stat − running)``: ``f = momentum``, or ``1/tracked``
    (cumulative); unbiased variance; nothing (``tracked`` included) when count is 0.
    ``LIMIT > 0`` (half-precision buffers): old and new values saturate at ±LIMIT, the
    buffer dtype's largest finite value, as the eager update does (never inf, then NaN)."""
    count = tl.load(count_ptr).to(tl.float64)
    has_data = count > 0
    factor = tl.where(has_data, _exact(momentum, momentum_lo), 0.0).to(UT)
    if HAS_TRACKED:
        tracked = tl.load(tracked_ptr) + has_data.to(tl.int64)
        tl.debug_barrier()  # read by every thread before it is written (as above)
        tl.store(tracked_ptr, tracked)
        if CUMULATIVE:
            factor = tl.where(has_data, 1.0 / tl.maximum(tracked, 1).to(tl.float64), 0.0).to(UT)
    correction = count / tl.maximum(count - 1.0, 1.0)
    for c0 in range(0, C, BLOCK):
        ch = c0 + tl.arange(0, BLOCK)
        mask = ch < C
        _, mean, var = _stats(ch, mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr, FROM_SUMS, CT)
        unbiased = (var * correction.to(CT)).to(UT)
        old_mean = tl.load(run_mean_ptr + ch, mask=mask, other=0.0).to(UT)
        old_var = tl.load(run_var_ptr + ch, mask=mask, other=0.0).to(UT)
        if LIMIT > 0:
            old_mean = tl.minimum(tl.maximum(old_mean, -LIMIT), LIMIT)
            old_var = tl.minimum(tl.maximum(old_var, -LIMIT), LIMIT)
        new_mean = old_mean + factor * (mean.to(UT) - old_mean)
        new_var = old_var + factor * (unbiased - old_var)
        if LIMIT > 0:
            new_mean = tl.minimum(tl.maximum(new_mean, -LIMIT), LIMIT)
            new_var = tl.minimum(tl.maximum(new_var, -LIMIT), LIMIT)
        tl.store(run_mean_ptr + ch, new_mean.to(run_mean_ptr.dtype.element_ty), mask=mask)
        tl.store(run_var_ptr + ch, new_var.to(run_var_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C"])
def running_update_kernel(count_ptr, sums_ptr, mean_ptr, var_ptr, run_mean_ptr, run_var_ptr,
                          tracked_ptr, C, momentum, momentum_lo, FROM_SUMS: tl.constexpr,
                          CT: tl.constexpr, UT: tl.constexpr, CUMULATIVE: tl.constexpr,
                          HAS_TRACKED: tl.constexpr, LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the running update alone (variants with their own moments).

    Args:
        count_ptr, sums_ptr, mean_ptr, var_ptr: the statistics, read.
        run_mean_ptr, run_var_ptr: ``(C,)`` running statistics, updated in place.
        tracked_ptr: int64 ``num_batches_tracked``, incremented when count > 0.
    """
    _running_update(count_ptr, sums_ptr, mean_ptr, var_ptr, run_mean_ptr, run_var_ptr,
                    tracked_ptr, C, momentum, momentum_lo, FROM_SUMS, CT, UT, CUMULATIVE,
                    HAS_TRACKED, LIMIT, BLOCK)


@triton.jit(do_not_specialize=["C"])
def unpack_kernel(sums_ptr, mean_ptr, var_ptr, C, CT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``mean`` and biased ``var`` (``(C,)`` in ``CT``'s dtype, written)
    from reduced sums ``[m, Σx, Σx²]`` (read); zeros when ``m = 0``."""
    for c0 in range(0, C, BLOCK):
        ch = c0 + tl.arange(0, BLOCK)
        mask = ch < C
        _, mean, var = _stats(ch, mask, C, sums_ptr, sums_ptr, sums_ptr, sums_ptr, True, CT)
        tl.store(mean_ptr + ch, mean, mask=mask)
        tl.store(var_ptr + ch, var, mask=mask)


@triton.jit(do_not_specialize=_SHAPES)
def normalize_kernel(x_ptr, y_ptr, w_ptr, b_ptr, count_ptr, sums_ptr, mean_ptr, var_ptr,
                     run_mean_ptr, run_var_ptr, tracked_ptr,
                     P, C, Q, n_q, n_chunks, chunks_per_split, eps, eps_lo, momentum,
                     momentum_lo,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, FROM_SUMS: tl.constexpr,
                     CT: tl.constexpr, RUNNING: tl.constexpr, UT: tl.constexpr,
                     CUMULATIVE: tl.constexpr, HAS_TRACKED: tl.constexpr, LIMIT: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y = (x − μ)·invstd·w + b`` in ``CT``, stored in ``y``'s dtype; program (0, 0)
    also does the running update (``RUNNING``).

    Args:
        x_ptr: ``(P, C, Q)`` input, read. y_ptr: same layout and dtype, written.
        w_ptr, b_ptr: ``(C,)`` weight and bias (any float dtype), read.
        count_ptr, sums_ptr, mean_ptr, var_ptr: the statistics, read.
        run_mean_ptr, run_var_ptr, tracked_ptr: see :func:`running_update_kernel`.
    """
    pid_c = tl.program_id(0)
    ch, ch_mask = _channels(pid_c, C, BLOCK_Q, CHANNELS_LAST)
    _, mean, var = _stats(ch, ch_mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr, FROM_SUMS, CT)
    scale = 1.0 / tl.sqrt(var + _exact(eps, eps_lo).to(CT))
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=ch_mask, other=0.0).to(CT)
    shift = tl.zeros(ch.shape, dtype=CT)
    if HAS_B:
        shift = tl.load(b_ptr + ch, mask=ch_mask, other=0.0).to(CT)
    start, end = _split_range(n_chunks, chunks_per_split)
    for k in range(start, end):
        offs, mask = _tile(k, ch, P, C, Q, n_q, BLOCK_P, BLOCK_Q, CHANNELS_LAST, WIDE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if RUNNING:
        if (pid_c == 0) & (tl.program_id(1) == 0):
            _running_update(count_ptr, sums_ptr, mean_ptr, var_ptr, run_mean_ptr, run_var_ptr,
                            tracked_ptr, C, momentum, momentum_lo, FROM_SUMS, CT, UT, CUMULATIVE,
                            HAS_TRACKED, LIMIT, BLOCK_C)


@triton.jit(do_not_specialize=_SHAPES)
def input_grad_kernel(g_ptr, x_ptr, dx_ptr, w_ptr, count_ptr, sums_ptr, mean_ptr, var_ptr,
                      reduced_ptr, P, C, Q, n_q, n_chunks, chunks_per_split, eps, eps_lo,
                      HAS_W: tl.constexpr, FROM_SUMS: tl.constexpr, CT: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr):
    """``dx = w·invstd·(g − A/M − x̂·B/M)`` with the group's ``[A, B] = [Σg, Σg·x̂]``.

    Args:
        g_ptr, x_ptr: ``(P, C, Q)`` output gradient and input (same layout), read.
        dx_ptr: same layout, ``x``'s dtype, written.
        w_ptr: ``(C,)`` weight, read.
        count_ptr, sums_ptr, mean_ptr, var_ptr: the forward's statistics (``M`` =
            their count), read.
        reduced_ptr: float64 ``[A (C), B (C)]`` summed over the group, read.
    """
    pid_c = tl.program_id(0)
    ch, ch_mask = _channels(pid_c, C, BLOCK_Q, CHANNELS_LAST)
    count, mean, var = _stats(ch, ch_mask, C, count_ptr, sums_ptr, mean_ptr, var_ptr,
                              FROM_SUMS, CT)
    invstd = 1.0 / tl.sqrt(var + _exact(eps, eps_lo).to(CT))
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=ch_mask, other=0.0).to(CT)
    safe = tl.maximum(count, 1.0)
    mean_g = (tl.load(reduced_ptr + ch, mask=ch_mask, other=0.0) / safe).to(CT)
    mean_gxhat = (tl.load(reduced_ptr + C + ch, mask=ch_mask, other=0.0) / safe).to(CT)
    start, end = _split_range(n_chunks, chunks_per_split)
    for k in range(start, end):
        offs, mask = _tile(k, ch, P, C, Q, n_q, BLOCK_P, BLOCK_Q, CHANNELS_LAST, WIDE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (g - mean_g[None, :] - xhat * mean_gxhat[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
