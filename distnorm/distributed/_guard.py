"""The guard of every synced collective: the packet layout, the header, and the
checks that tell ranks at different collectives apart (docs/algorithms.md §6).
:mod:`.collectives` makes the collectives; this module says what travels in them
and what a received packet means.

* **One size per group.** Every guarded collective of a process group is an
  all-reduce of the same number of float64 numbers: the group's *packet size*,
  the largest payload seen on the group plus the guard's tail, padded with zeros.
  Two ranks at different collectives therefore exchange buffers of equal size:
  gloo cannot abort, and the tail tells them apart. The packet size grows at
  header exchanges only, which every rank makes at the same calls.
* **Header** (first call of each layer and direction, a payload larger than the
  packet size, every call with ``DISTNORM_DEBUG=1``): each rank fills its own row —
  (layer tag, call count, payload size, autograd, sequence number) — so that every
  rank sees every rank's row; a mismatch raises :class:`~distnorm.errors.SyncError`
  on every rank, naming the ranks. It is read on the host: the one synchronisation
  of a layer, at its first call.
* **Tail** (every call): rank bit fields (non-finite input, forward run without
  autograd, header), and the layer tag, a mode (header or payload, with or without
  autograd), the layer's call counter and the group's *sequence number*, each with
  its square: all ranks agree exactly when ``W·Σt² = (Σt)²``. A forward run under
  ``torch.no_grad()`` on some ranks only is told apart from the training forward it
  would pair with, so its batch is never mixed into the others' statistics. On CUDA
  the counters live on the device and a kernel writes the whole packet
  (:class:`DevicePacket`); inside a CUDA-graph capture, whatever would need the host
  raises before anything reaches the stream (:func:`_check_capturable`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import cuda_ops, kernels
from ..errors import NonFiniteError, SyncError
from . import nonfinite as _nonfinite
from ._readback import TOP_BIT as _TOP_BIT
from ._readback import ranks_in as _ranks_in

__all__ = ["DEBUG_ENV", "DevicePacket", "Written"]

DEBUG_ENV = "DISTNORM_DEBUG"
# Tags and counters modulo 2^16: their squares summed over up to 1024 ranks, and the
# square of their sum, stay exact in float64.
_MOD = 1 << 16
_MAX_EXACT_WORLD = 1024
# The tail of every packet: [non-finite bits, no-autograd bits, header bits, tag, tag²,
# mode, mode², call, call², seq, seq²]; mode = 2·header + no-autograd.
_TAIL = 11
# A header row: [tag, call, payload size, autograd, seq].
_ROW = 5


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _bit(rank: int) -> float:
    return float(2 ** min(rank, _TOP_BIT))


@dataclass
class _Direction:
    """Counters of one direction (forward or backward) of one layer."""

    tag: int
    calls: int = 0
    checked: bool = False
    # device -> float64 [tag, tag², call, call²], advanced on that device every call.
    guard: Dict[torch.device, Tensor] = field(default_factory=dict)


def _ranks(group: Any) -> List[int]:
    return dist.get_process_group_ranks(group)


def _header_packet(shared: Any, state: _Direction, rank: int, numel: int,
                   autograd: bool, device: torch.device) -> Tensor:
    """This rank's header row in its slot, zeros elsewhere, and the guard's tail."""
    seq = shared.seq % _MOD
    call = state.calls % _MOD
    nograd = 0.0 if autograd else _bit(rank)
    mode = 2.0 + (0.0 if autograd else 1.0)
    packet = torch.zeros(shared.size, dtype=torch.float64)
    packet[rank * _ROW:(rank + 1) * _ROW] = torch.tensor(
        [state.tag, call, numel, float(autograd), seq], dtype=torch.float64)
    packet[-_TAIL:] = torch.tensor([0.0, nograd, _bit(rank), state.tag, state.tag ** 2, mode,
                                    mode * mode, call, call * call, seq, seq * seq],
                                   dtype=torch.float64)
    return packet.to(device)


def _pack_on_device(payload: Tensor, guard: Tensor, bit: float, check: bool,
                    *extra: Any) -> Tensor:
    """``[payload, 0 × pad, flag, nograd, 0, tag, tag², mode, mode², call, call², seq,
    seq²]``, advancing the call counter in ``guard`` (and ``seq``) in place; a
    non-finite payload is replaced by zeros and sets ``flag`` to ``bit``. No host
    synchronisation (one fused kernel where compiled).

    ``extra``: ``(seq, pad, nograd)`` — the group's ``[seq, seq²]`` counter, the
    zeros up to the packet size, and this rank's no-autograd bit; without them, no
    padding and no sequence number. (Positional: ``kernels.fused`` compiles a copy
    of the function's code, without default values.)
    """
    seq, pad, nograd = extra if extra else (None, 0, 0.0)
    call = torch.remainder(guard[2:3] + 1, _MOD)
    guard[2:3].copy_(call)
    guard[3:4].copy_(call * call)
    if check:
        # A NaN or ±Inf anywhere makes the sum non-finite (sums of finite moment
        # buffers never overflow float64): one reduction instead of an isfinite pass.
        bad = payload.sum(0, keepdim=True).isfinite().logical_not()
        payload = torch.where(bad, torch.zeros_like(payload), payload)
        flag = bad.to(payload.dtype) * bit
    else:
        flag = torch.zeros_like(payload[:1])
    mode = 1.0 if nograd else 0.0
    # [nograd, 0] and [mode, mode²] filled on the device: torch.tensor(...,
    # device=cuda) would be a pageable host-to-device copy (a host synchronisation,
    # and illegal inside a CUDA-graph capture) whenever this runs eagerly.
    fixed, modes = payload.new_zeros(2), payload.new_empty(2)
    fixed[:1].fill_(nograd)  # fill_ takes the number as a kernel argument
    modes[:1].fill_(mode)
    modes[1:].fill_(mode * mode)
    parts = [payload, payload.new_zeros(pad), flag, fixed, guard[:2], modes, guard[2:]]
    if seq is not None:
        step = torch.remainder(seq[:1] + 1, _MOD)
        seq[:1].copy_(step)
        seq[1:2].copy_(step * step)
        parts.append(seq)
    return torch.cat(parts)


class DevicePacket(NamedTuple):
    """What a device kernel needs to write a guarded packet in one launch: the
    payload, zeros up to ``size``, then this module's tail (:data:`_TAIL` numbers:
    ``[non-finite flag, nograd, 0, tag, tag², mode, mode², call, call², seq, seq²]``,
    the flag ``bit`` when ``check`` finds the payload non-finite, which then goes
    as zeros), advancing ``guard[2:]`` (``[call, call²]``) and ``seq`` modulo
    ``modulus`` in place, as :func:`_pack_on_device` does."""

    size: int
    guard: Tensor  # float64 [tag, tag², call, call²] on the device
    seq: Tensor  # float64 [seq, seq²] on the device
    bit: float
    check: bool
    nograd: float
    mode: float
    modulus: int
    # The host's (tag, call, seq) of this call (what the device guard holds unless a
    # CUDA-graph replay advanced it): a packer that writes the tail from the host
    # (distnorm._native_cuda, outside a capture) reads these instead.
    host: Tuple[float, float, float] = (0.0, 0.0, 0.0)


class Written:
    """A float64 payload that a device kernel writes straight into its guarded
    packet (one launch fewer than packing a finished payload), for :func:`all_reduce`.

    ``write(spec)`` returns the whole packet for a :class:`DevicePacket`, or the
    plain ``numel``-long payload for ``None`` (no group, no guard, on the host).
    """

    dtype = torch.float64

    def __init__(self, numel: int, device: torch.device,
                 write: Callable[[Optional[DevicePacket]], Tensor]) -> None:
        self._numel, self.device, self.write = numel, device, write

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def numel(self) -> int:
        return self._numel


def _pack(payload: Any, shared: Any, state: _Direction, rank: int, check: bool,
          autograd: bool, on_host: bool) -> Tensor:
    """The packet of a payload (float64, or :class:`Written`), padded to the group's
    packet size (``shared``: the group's state in :mod:`.collectives`). ``on_host``:
    whether the payload's device is read on the host (CPU), so checks run there."""
    bit = _bit(rank)
    nograd = 0.0 if autograd else bit
    pad = shared.size - payload.numel() - _TAIL
    if isinstance(payload, Written) and on_host:
        payload = payload.write(None)
    if on_host:
        flag = 0.0
        if check and not math.isfinite(payload.sum().item()):
            payload = torch.zeros_like(payload)
            flag = bit
        call = state.calls % _MOD
        seq = shared.seq % _MOD
        mode = 0.0 if autograd else 1.0
        tail = torch.tensor([flag, nograd, 0.0, state.tag, state.tag ** 2, mode, mode * mode,
                             call, call * call, seq, seq * seq], dtype=torch.float64)
        parts = [payload, payload.new_zeros(pad), tail] if pad else [payload, tail]
        return torch.cat(parts)
    device = payload.device
    guard = state.guard.get(device)
    if guard is None:  # first call on this device: the header has just synchronised
        call = (state.calls - 1) % _MOD  # advanced to `calls` by the packing below
        guard = torch.tensor([state.tag, state.tag ** 2, call, call * call],
                             dtype=torch.float64).to(device)
        state.guard[device] = guard
    seq_guard = shared.seq_guard.get(device)
    if seq_guard is None:
        seq = (shared.seq - 1) % _MOD
        seq_guard = shared.seq_guard[device] = torch.tensor(
            [seq, seq * seq], dtype=torch.float64).to(device)
    if isinstance(payload, Written) or cuda_ops.applies(payload):
        spec = DevicePacket(shared.size, guard, seq_guard, bit, check, nograd,
                            0.0 if autograd else 1.0, _MOD,
                            (float(state.tag), float(state.calls % _MOD),
                             float(shared.seq % _MOD)))
        return payload.write(spec) if isinstance(payload, Written) else cuda_ops.pack(payload, spec)
    return kernels.fused(_pack_on_device, payload, guard, bit, check, seq_guard, pad, nograd)


def _agree(world: int, total: float, squares: float) -> bool:
    return world > _MAX_EXACT_WORLD or world * squares == total * total


def _tail_verifier(context: Any, what: str, group: Any, world: int,
                   nonfinite: Optional[str]) -> Callable[[List[float]], None]:
    def verify(values: List[float]) -> None:
        (flags, nograd, headers, tag_sum, tag_sq, mode_sum, mode_sq, call_sum, call_sq,
         seq_sum, seq_sq) = values
        if not (_agree(world, tag_sum, tag_sq) and _agree(world, mode_sum, mode_sq)
                and _agree(world, call_sum, call_sq) and _agree(world, seq_sum, seq_sq)):
            raise _mismatch(context, what, group, nograd, headers)
        if nonfinite == "raise" and flags:
            _raise_nonfinite(context, group, flags)

    return verify


def _mismatch(context: Any, what: str, group: Any, nograd: float,
              headers: float) -> SyncError:
    ranks = _ranks(group)
    at_header = _ranks_in(headers, ranks)
    without = _ranks_in(nograd, ranks)
    if at_header and len(at_header) < len(ranks):
        detail = (f"ranks {at_header} were at a layer's first call (its header) while ranks "
                  f"{[r for r in ranks if r not in at_header]} were at a later call: they skipped "
                  "a layer, called layers in another order or ran an extra forward.")
    elif without and len(without) < len(ranks):
        detail = (f"ranks {without} ran this forward under torch.no_grad() (or inference mode) "
                  f"while ranks {[r for r in ranks if r not in without]} ran a forward with "
                  "autograd: an extra training-mode forward on some ranks only (e.g. a logging "
                  "or EMA-teacher forward under no_grad with the model in train mode) would mix "
                  "its batch into the others' statistics. Run it on every rank, or in eval mode "
                  "(model.eval()), or on a copy made with distnorm.revert_model.")
    else:
        return SyncError(
            f"{context.name}: ranks {ranks} were not all at the same layer and call in the "
            f"{what} all-reduce (layer tags, call counters or collective sequence numbers differ "
            "across ranks). A rank skipped this layer, called synced layers in another order, "
            f"ran an extra forward, or is in eval mode; set {DEBUG_ENV}=1 to check every call "
            "and name the ranks.")
    return SyncError(f"{context.name}: ranks {ranks} were not all at the same layer and call in "
                     f"the {what} all-reduce: {detail}")


def _check_header(context: Any, what: str, group: Any, shared: Any, rank: int,
                  mine: List[float], result: Tensor) -> None:
    """Compare every rank's header row; grow the packet size to the largest payload."""
    world = shared.world
    values = result.tolist()
    _, nograd, headers, _, _, mode_sum, mode_sq = values[-_TAIL:][:7]
    ranks = _ranks(group)
    if world <= _TOP_BIT + 1:
        all_headers = len(_ranks_in(headers, ranks)) == world
    else:
        all_headers = _agree(world, mode_sum, mode_sq) and mode_sum >= 2 * world
    if not all_headers:  # some ranks sent a payload: the rows are not all rows
        raise _mismatch(context, what, group, nograd, headers)
    rows = [values[r * _ROW:(r + 1) * _ROW] for r in range(world)]
    if all(row == rows[0] for row in rows):
        shared.size = max(shared.size, int(rows[0][2]) + _TAIL)
        return
    described = []
    for r, (tag, calls, size, autograd, seq) in zip(ranks, rows):
        where = "this layer" if tag == mine[0] else f"another layer (tag {int(tag)})"
        grad = "with autograd" if autograd else "under torch.no_grad()"
        described.append(f"rank {r}: {where}, call {int(calls)}, payload {int(size)} numbers, "
                         f"training, {grad}, collective #{int(seq)}")
    odd = [r for r, row in zip(ranks, rows) if row != mine]
    hint = ""
    if any(row[3] != mine[3] for row in rows):
        hint = (" A forward run under torch.no_grad() on some ranks only (a logging or "
                "EMA-teacher forward with the model in train mode) must run on every rank, "
                "or in eval mode.")
    raise SyncError(
        f"{context.name}: ranks disagree before the {what} all-reduce "
        f"(seen from rank {ranks[rank]}: ranks {odd} differ from it): " + "; ".join(described)
        + ". Every rank must call the same synced layers in the same order, with the same "
          "channel count, all in training mode." + hint)


def _needs_header(shared: Any, state: _Direction, numel: int) -> bool:
    return not state.checked or numel + _TAIL > shared.size or _debug()


def _header_row(shared: Any, state: _Direction, numel: int, autograd: bool) -> List[float]:
    return [float(state.tag), float(state.calls % _MOD), float(numel), float(autograd),
            float(shared.seq % _MOD)]


def _check_capturable(context: Any, what: str, shared: Any, state: _Direction,
                      numel: int, device: torch.device, nonfinite: Optional[str],
                      group_name: str) -> None:
    """Raise, before anything reaches the stream, where a call inside a CUDA-graph
    capture would need the host (which invalidates the capture with an obscure CUDA
    error): a layer's first call on the device (its header is read on the host, its
    device counters are made from host numbers), or a payload wider than the group's
    packets (a header grows them)."""
    problem = None
    if not state.checked or device not in state.guard or device not in shared.seq_guard:
        problem = (f"this is its first {what} call on {device}, whose header is read on the "
                   "host")
    elif numel + _TAIL > shared.size:
        problem = (f"its {what} payload ({numel} numbers) is wider than any the process group "
                   f"has carried ({shared.size - _TAIL}), which takes a header read on the host")
    elif nonfinite == "raise" and (context.identity, group_name, str(device)) not in (
            _nonfinite._REPLAYS):
        problem = ("its non-finite flag is made at an eager call with nonfinite='raise', "
                   "and there was none")
    if problem is not None:
        raise RuntimeError(
            f"{context.name}: cannot be captured in a CUDA graph: {problem}. Run one eager "
            "training step (forward and backward, with the shapes and settings to be "
            "captured) before capturing, as torch asks for CUDA graphs anyway. Nothing that "
            "would invalidate the capture was done.")


def _raise_nonfinite(context: Any, group: Any, bits: float) -> None:
    hit = _ranks_in(bits, _ranks(group))
    raise NonFiniteError(
        f"{context.name}: non-finite values (NaN/Inf) in the input on rank(s) {hit}; "
        "they were left out of the group statistics. Set the layer's nonfinite='skip' "
        "(or convert_model(..., nonfinite='skip')) to go on without them.")
