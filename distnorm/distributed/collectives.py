"""The collectives of synced layers and the guards around them, in one place.

Every synced layer reduces through :func:`all_reduce`, which takes a small
:class:`SyncContext` (the layer's name and identity, its non-finite policy, its
deadline and its call counters) rather than the layer itself (docs/algorithms.md §6).

When ranks disagree about a collective — one skipped the layer, they call layers
in another order, the channel counts differ, one runs an extra forward, a rank is in
eval mode or ran out of data — the payloads no longer line up. gloo aborts a process
whose peer sends a longer buffer than it expects, and a rank waiting for a peer that
never comes waits for the process group's timeout (torch's defaults: 30 minutes for
gloo, 10 minutes for NCCL). So:

* **One size per group.** Every guarded collective of a process group is an
  all-reduce of the same number of float64 numbers: the group's *packet size*,
  the largest payload seen on the group plus the guard's tail, padded with zeros.
  Two ranks at different collectives therefore exchange buffers of equal size:
  gloo cannot abort, and the guard below tells them apart. The packet size grows at
  header exchanges only, which every rank makes at the same calls.
* **Header** (first call of each layer and direction, a payload larger than the
  packet size, every call with ``DISTNORM_DEBUG=1``): an all-reduce of the same
  packet size in which each rank fills its own row — (layer tag, call count,
  payload size, autograd, sequence number) — so that every rank sees every rank's
  row; a mismatch raises :class:`~distnorm.errors.SyncError` on every rank, naming
  the ranks. It is read on the host: the one synchronisation of a layer, at its
  first call.
* **Guard** (every call, in the packet's tail): rank bit fields (non-finite input,
  forward run without autograd, header), and the layer tag, a mode (header or
  payload, with or without autograd), the layer's call counter and the group's
  *sequence number* (this rank's guarded collectives on the group, across layers
  and directions), each with its square: all ranks agree exactly when
  ``W·Σt² = (Σt)²``. A forward run under ``torch.no_grad()`` on some ranks only (a
  logging or EMA-teacher forward in train mode) is told apart from the training
  forward it would pair with, so its batch is never mixed silently into the
  others' statistics. On CPU the tail is read on the host at once. On CUDA the
  counters live on the device and the tail is copied back asynchronously into
  pinned memory and checked at the next guarded call on the group, so the training
  path never waits on the device and a CUDA graph can capture it (inside a capture
  no host work is done at all, and what would need the host — a layer's first
  call, a payload wider than the group's packets — raises a clear error before
  anything reaches the stream; replays read no guard).
* **Deadline.** On CPU (gloo) each guarded collective waits at most the layer's
  ``timeout`` (``DISTNORM_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`;
  ``0`` turns it off), whatever the process group's timeout. On CUDA waiting with a
  deadline would block the host, so the bound there is NCCL's watchdog: the process
  group's ``timeout`` (10 minutes by default); set it as short as the job allows.
  What happens then is torch's, not distnorm's: with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (torch's default) the watchdog logs the
  timed-out collective and tears the process down (SIGABRT), so no ``SyncError``
  naming the layer is raised on CUDA (docs/faults.md, "Deadlines").
* **Failures** of the collective itself (a dead peer, a deadline, the group's
  timeout) are re-raised as ``SyncError`` naming the layer.

A ``SyncError`` leaves the group's ranks at different collectives: treat it as
fatal for the process group.

Non-finite inputs: a rank whose payload is not finite contributes zeros, and its
bit (2^rank) rides in the same all-reduce, so every rank learns which ranks were
hit and raises :class:`~distnorm.errors.NonFiniteError` (policy ``"raise"``) or goes
on without them (``"skip"``). On CUDA the decision is made on the device and the
error is raised at the next guarded call. Under ``torch.compile`` the same zeroing
is traced into the graph, and for ``"raise"`` the bits go to an operator opaque to
the compiler that raises them at the layer's next forward, compiled or eager; at
CUDA-graph replays they are kept on the device for
:func:`distnorm.check_nonfinite` (:mod:`.nonfinite`).

Isolation: the guarded collectives of a group run on distnorm's own group of the
same ranks (:mod:`~distnorm.distributed.isolation`), so that they only ever meet each
other, never DDP's or a metric's; torch's plain ``Join([ddp])`` is refused
(:mod:`~distnorm.distributed.ddp_join`).

Uneven inputs: :mod:`distnorm.join` records each iteration's guarded collectives
(:class:`Call`) and lets a rank that ran out of data shadow them with zero
contributions (:func:`shadow`), on distnorm's own group (:func:`set_transport`), so
that they never interleave with DDP's collectives.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import cuda_ops, kernels
from .._compat import functional_collectives
from ..errors import NonFiniteError, SyncError
from . import nonfinite as _nonfinite
from ._readback import TOP_BIT as _TOP_BIT
from ._readback import DeferredCheck as _DeferredCheck
from ._readback import ranks_in as _ranks_in
from . import ddp_join, isolation

__all__ = ["DEBUG_ENV", "DEFAULT_TIMEOUT_S", "NONFINITE_POLICIES", "TIMEOUT_ENV", "Call",
           "DevicePacket", "InFlight", "Written", "SyncContext", "all_reduce", "resolve_timeout", "set_transport",
           "shadow", "start_recording", "stop_recording"]

DEBUG_ENV = "DISTNORM_DEBUG"
TIMEOUT_ENV = "DISTNORM_TIMEOUT"
# A rank waits this long for its peers in a guarded collective on CPU. Long enough
# for a peer's first-call kernel compilation on a loaded machine, or a data-loader
# stall; a minute instead of gloo's default 30.
DEFAULT_TIMEOUT_S = 60.0
NONFINITE_POLICIES = ("raise", "skip")
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


def resolve_timeout(value: Optional[float] = None) -> Optional[float]:
    """The deadline in seconds a guarded collective waits on CPU, or ``None`` (none).

    Args:
        value: a layer's own ``timeout`` (``None``: ``DISTNORM_TIMEOUT``, else
            :data:`DEFAULT_TIMEOUT_S`); ``0`` turns the deadline off.

    Raises:
        ValueError: ``DISTNORM_TIMEOUT`` is neither a number of seconds nor ``off``.
    """
    if value is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT_S
        if text.lower() in ("off", "none"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds "
                             "(0 or 'off': no deadline)") from None
    return value if value > 0 and math.isfinite(value) else None


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


@dataclass(eq=False)
class SyncContext:
    """What a synced layer's collectives need to know about it.

    A layer owns one. It holds neither the module nor its tensors, so a layer that
    holds it can be pickled or deep-copied at any point: a copy keeps the name,
    policy and deadline and starts its counters and checks afresh.

    Attributes:
        name: the layer as messages name it (``"SyncBatchNorm 'layer1.0.bn1'"``).
        identity: equal on every rank for the same layer (its qualified name, or its
            creation index), hashed into the tag that tells layers apart.
        nonfinite: ``"raise"``, ``"skip"`` or ``None`` (no check) for the forward.
        training: the layer's mode (collectives are made in training mode only).
        autograd: whether the current forward runs with autograd enabled; a rank that
            runs it under ``torch.no_grad()`` while its peers do not is caught.
        timeout: the layer's deadline in seconds (``None``: ``DISTNORM_TIMEOUT`` or
            the default; ``0``: none); see :func:`resolve_timeout`.
    """

    name: str = "synced layer"
    identity: str = ""
    nonfinite: Optional[str] = "raise"
    training: bool = True
    autograd: bool = True
    timeout: Optional[float] = None
    _directions: Dict[str, _Direction] = field(default_factory=dict, repr=False)
    # Checks in flight on the device, run once their copies have landed.
    _pending: List["_DeferredCheck"] = field(default_factory=list, repr=False)

    def direction(self, what: str) -> _Direction:
        state = self._directions.get(what)
        if state is None:
            tag = zlib.crc32(f"{self.identity}|{what}".encode()) % _MOD
            state = self._directions[what] = _Direction(tag)
        return state

    def drain(self) -> None:
        """Run the deferred (CUDA) checks whose copies have landed; never wait (and do
        nothing inside a CUDA graph capture, where querying an event is illegal)."""
        if not self._pending or _capturing():
            return
        landed = [check for check in self._pending if check.landed()]
        self._pending = [check for check in self._pending if check not in landed]
        for check in landed:
            check.run()

    def __getstate__(self) -> Dict[str, Any]:
        # Counters, device tensors and CUDA events stay with this process's run.
        return {"name": self.name, "identity": self.identity, "nonfinite": self.nonfinite,
                "training": self.training, "timeout": self.timeout}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (tests patch this)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Call(NamedTuple):
    """One guarded collective as a rank made it: what a joined rank replays."""

    context: SyncContext
    what: str
    numel: int
    nonfinite: Optional[str]
    device: torch.device
    autograd: bool


@dataclass(eq=False)
class _Shared:
    """What a rank keeps about one process group's guarded collectives."""

    world: int
    # Every guarded packet on the group has this many float64 numbers.
    size: int
    # Guarded collectives this rank has made on the group (host count).
    seq: int = 0
    # device -> float64 [seq, seq²], advanced on that device by device-side packets.
    seq_guard: Dict[torch.device, Tensor] = field(default_factory=dict)
    # The group the collectives run on while a Join is active (distnorm.join); None:
    # the default, distnorm's own group of the same ranks (distributed.isolation).
    transport: Any = None
    # Calls recorded for distnorm.join (None: not recording).
    trace: Optional[List[Call]] = None
    # The DDP module whose forward runs the group's synced layers (a weak reference,
    # found at a header), checked for torch's Join without distnorm.joinable.
    ddp: Any = None
    # Contexts with deferred checks in flight.
    waiting: List[SyncContext] = field(default_factory=list)

    def drain(self) -> None:
        """Run the landed deferred checks of every layer on the group."""
        if not self.waiting or _capturing():
            return
        contexts, self.waiting = self.waiting, []
        for i, context in enumerate(contexts):
            try:
                context.drain()
            except BaseException:
                self.waiting = [c for c in contexts[i:] if c._pending] + self.waiting
                raise
            if context._pending:
                self.waiting.append(context)


# The state of each process group this process has guarded collectives on, keyed
# weakly: a destroyed group must not be kept alive (with its threads) by distnorm.
_SHARED: "weakref.WeakKeyDictionary[Any, _Shared]" = weakref.WeakKeyDictionary()


def _shared(group: Any) -> _Shared:
    shared = _SHARED.get(group)
    if shared is None:
        world = dist.get_world_size(group)
        # At least a header's rows and tail, so that a header and a payload never
        # differ in size.
        shared = _SHARED[group] = _Shared(world=world, size=world * _ROW + _TAIL)
    return shared


def set_transport(group: Any, transport: Optional[Any]) -> None:
    """Run ``group``'s guarded collectives on ``transport`` (a group of the same
    ranks), or on the default again with ``None`` (distnorm's own group of those
    ranks, or ``group`` itself with ``DISTNORM_ISOLATE=0``: see
    :mod:`~distnorm.distributed.isolation`). Counters, packet size and checks stay
    ``group``'s. Every rank must switch at the same point."""
    _shared(group).transport = transport


def start_recording(group: Any) -> List[Call]:
    """Record the guarded collectives this rank makes on ``group`` from now on into a
    new list (returned), replacing the previous recording."""
    trace: List[Call] = []
    _shared(group).trace = trace
    return trace


def stop_recording(group: Any) -> None:
    shared = _SHARED.get(group)
    if shared is not None:
        shared.trace = None


def _ranks(group: Any) -> List[int]:
    return dist.get_process_group_ranks(group)


def _on_host(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host is free (CPU), so that checks may branch
    there and a wait may have a deadline; elsewhere they stay on the device and are
    read back asynchronously."""
    return tensor.device.type == "cpu"


def _deadline(context: SyncContext, tensor: Tensor) -> Optional[float]:
    # On CUDA, work.wait(timeout) would block the host until the collective ends.
    return resolve_timeout(context.timeout) if _on_host(tensor) else None


def _failure(context: SyncContext, what: str, group: Any, error: BaseException,
             timeout: Optional[float], waited: float) -> SyncError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    rank = dist.get_rank()
    # Ours, not the group's own timeout (which may be shorter): the wait lasted it.
    if timeout is not None and waited >= 0.99 * timeout and "timed out" in first.lower():
        return SyncError(
            f"{context.name}: not every rank of {_ranks(group)} reached the {what} all-reduce "
            f"within {timeout:g} s (seen from rank {rank}; distnorm's deadline, "
            f"{TIMEOUT_ENV}). A peer may have run out of data (uneven inputs: wrap the loop in "
            "torch.distributed.algorithms.Join with distnorm.joinable(model) first), be in "
            "eval mode, have skipped this layer, or be busy elsewhere (raise "
            f"{TIMEOUT_ENV} for long rank-0-only work between steps, or add a barrier after it).")
    return SyncError(
        f"{context.name}: the {what} collective over ranks {_ranks(group)} failed "
        f"(on rank {rank}): {first}. A peer process may have died or timed out, be in eval "
        "mode while this rank trains, or have skipped this layer or called layers in another "
        f"order; set {DEBUG_ENV}=1 to check every call.")


def _reduce(context: SyncContext, what: str, group: Any, shared: _Shared, packet: Tensor,
            timeout: Optional[float]) -> None:
    """Sum ``packet`` over the group in place, waiting at most ``timeout`` seconds."""
    transport = shared.transport
    start = time.monotonic()
    if transport is None:
        try:  # distnorm's own group, made at the group's first guarded call
            transport = isolation.transport(group, timeout)
        except RuntimeError as error:  # a peer did not come: as for the collective itself
            waited = time.monotonic() - start
            cause = RuntimeError(f"making distnorm's own process group timed out ({error})"
                                 if timeout is not None and waited >= 0.99 * timeout else error)
            raise _failure(context, what, group, cause, timeout, waited) from error
    try:
        if timeout is None:
            dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=transport)
        else:
            work = dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=transport, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=timeout))
    except SyncError:
        raise
    except RuntimeError as error:
        raise _failure(context, what, group, error, timeout,
                       time.monotonic() - start) from error


# -- packets ---------------------------------------------------------------------------
def _header_packet(shared: _Shared, state: _Direction, rank: int, numel: int,
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


def _pack(payload: Any, shared: _Shared, state: _Direction, rank: int, check: bool,
          autograd: bool) -> Tensor:
    """The packet of a payload (float64, or :class:`Written`), padded to the group's
    packet size."""
    bit = _bit(rank)
    nograd = 0.0 if autograd else bit
    pad = shared.size - payload.numel() - _TAIL
    if isinstance(payload, Written) and _on_host(payload):
        payload = payload.write(None)
    if _on_host(payload):
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


# -- checks ----------------------------------------------------------------------------
def _agree(world: int, total: float, squares: float) -> bool:
    return world > _MAX_EXACT_WORLD or world * squares == total * total


def _tail_verifier(context: SyncContext, what: str, group: Any, world: int,
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


def _mismatch(context: SyncContext, what: str, group: Any, nograd: float,
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


def _check_header(context: SyncContext, what: str, group: Any, shared: _Shared, rank: int,
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


def _needs_header(shared: _Shared, state: _Direction, numel: int) -> bool:
    return not state.checked or numel + _TAIL > shared.size or _debug()


def _header_row(shared: _Shared, state: _Direction, numel: int, autograd: bool) -> List[float]:
    return [float(state.tag), float(state.calls % _MOD), float(numel), float(autograd),
            float(shared.seq % _MOD)]


# -- the entry point -------------------------------------------------------------------
def all_reduce(buffer: Tensor, group: Optional[Any], context: Optional[SyncContext] = None,
               what: str = "forward", nonfinite: Optional[str] = None) -> Tensor:
    """Sum ``buffer`` over ``group`` (``None``: no-op) and return the result.

    The buffer is consumed: eagerly it may be reduced in place (callers pack a fresh
    buffer); under ``torch.compile`` a functional collective returns a new tensor
    and traces into the graph.

    With a ``context``, the call is guarded as this module describes; ``what`` names
    the direction (``"forward"``, ``"backward"``). ``nonfinite`` (``"raise"`` or
    ``"skip"``): a rank whose buffer is not finite contributes zeros; with
    ``"raise"`` every rank raises :class:`~distnorm.errors.NonFiniteError` naming
    the ranks (on CUDA at the next guarded call; under ``torch.compile`` at the
    layer's next forward; after CUDA-graph replays from
    :func:`distnorm.check_nonfinite`).
    """
    if isinstance(buffer, Written) and (group is None or context is None or _on_host(buffer)
                                        or torch.compiler.is_compiling()):
        buffer = buffer.write(None)  # the plain payload: packed (if at all) as any other
    if group is None:
        return buffer
    if torch.compiler.is_compiling():
        return _traced_all_reduce(buffer, group, context, nonfinite)
    if context is None:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        return buffer
    return _guarded_all_reduce(buffer, group, context, what, nonfinite)


def _traced_all_reduce(buffer: Tensor, group: Any, context: Optional[SyncContext],
                       nonfinite: Optional[str]) -> Tensor:
    """The compiled path: nothing here may read the host. A non-finite rank's
    contribution is zeroed on the device and its bit summed along, so every rank's
    statistics (and running statistics) are those of the finite ranks. For
    ``"raise"`` the bits go to the operator of :mod:`.nonfinite`, opaque to the
    compiler, which raises them at the layer's next forward (compiled or eager)."""
    funcol = functional_collectives()

    if context is None or nonfinite is None:
        return funcol.wait_tensor(funcol.all_reduce(buffer, "sum", group))
    payload = buffer.to(torch.float64)
    bad = payload.sum(0, keepdim=True).isfinite().logical_not()
    payload = torch.where(bad, torch.zeros_like(payload), payload)
    packed = torch.cat([payload, bad.to(torch.float64) * _bit(dist.get_rank(group))])
    reduced = funcol.wait_tensor(funcol.all_reduce(packed, "sum", group))
    if nonfinite == "raise":
        _nonfinite.raise_recorded(reduced[-1:], context.identity, context.name,
                                  str(funcol._resolve_group_name(group)))
    return reduced[:-1].to(buffer.dtype)


def _guarded_all_reduce(buffer: Tensor, group: Any, context: SyncContext, what: str,
                        nonfinite: Optional[str]) -> Tensor:
    capturing = not _on_host(buffer) and _capturing()
    shared = _shared(group)
    if not capturing:
        shared.drain()
        context.drain()
        if _nonfinite._RECORDED:  # a compiled forward of the layer came before
            _nonfinite.raise_pending(context.identity, context.name, group.group_name,
                                     buffer.device)
    rank = dist.get_rank(group)
    autograd = what != "forward" or context.autograd
    numel = buffer.numel()
    state = context.direction(what)
    if capturing:
        _check_capturable(context, what, shared, state, numel, buffer.device, nonfinite,
                          group.group_name)
    elif nonfinite == "raise" and not _on_host(buffer):  # made now: a capture cannot
        _nonfinite.replay_flags(context.identity, context.name, group.group_name, buffer.device)
    if what == "forward" and not capturing:
        _refuse_plain_join(shared, state, context)
    if shared.trace is not None and not capturing:
        shared.trace.append(Call(context, what, numel, nonfinite, buffer.device, autograd))
    timeout = _deadline(context, buffer)
    state.calls += 1
    if _needs_header(shared, state, numel) and not capturing:
        shared.seq += 1
        mine = _header_row(shared, state, numel, autograd)
        packet = _header_packet(shared, state, rank, numel, autograd, buffer.device)
        _reduce(context, f"{what} header", group, shared, packet, timeout)
        _check_header(context, what, group, shared, rank, mine, packet)
        state.checked = True
    shared.seq += 1
    payload = buffer if isinstance(buffer, Written) else buffer.to(torch.float64)
    packed = _pack(payload, shared, state, rank, nonfinite is not None, autograd)
    _reduce(context, what, group, shared, packed, timeout)
    verify = _tail_verifier(context, what, group, shared.world, nonfinite)
    tail = packed[-_TAIL:]
    if _on_host(tail):
        verify(tail.tolist())
    elif not capturing:
        context._pending.append(_DeferredCheck(tail, verify))
        if context not in shared.waiting:
            shared.waiting.append(context)
    elif nonfinite == "raise":  # no check runs at a replay: keep the bits for the user
        box = _nonfinite.replay_flags(context.identity, context.name, group.group_name,
                                      buffer.device)
        torch.maximum(box, tail[:1], out=box)
    return packed[:numel].to(buffer.dtype)


def _check_capturable(context: SyncContext, what: str, shared: _Shared, state: _Direction,
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


def _refuse_plain_join(shared: _Shared, state: _Direction, context: SyncContext) -> None:
    """ValueError on every rank at the first synced forward under torch's Join([ddp])
    without distnorm.joinable (see distributed.ddp_join)."""
    if shared.ddp is None and not state.checked:  # a header call: look for DDP once
        shared.ddp = ddp_join.find_ddp()
    if shared.ddp is not None and shared.transport is None:
        ddp_join.refuse_plain_join(shared.ddp, context.name)


def _raise_nonfinite(context: SyncContext, group: Any, bits: float) -> None:
    hit = _ranks_in(bits, _ranks(group))
    raise NonFiniteError(
        f"{context.name}: non-finite values (NaN/Inf) in the input on rank(s) {hit}; "
        "they were left out of the group statistics. Set the layer's nonfinite='skip' "
        "(or convert_model(..., nonfinite='skip')) to go on without them.")


# -- shadows for ranks that ran out of data (distnorm.join) ----------------------------
class InFlight:
    """A shadow collective issued without waiting, and its check."""

    def __init__(self, work: Any, packet: Tensor, context: SyncContext, what: str,
                 check: Callable[[Tensor], None]) -> None:
        self.work, self.packet, self.context, self.what = work, packet, context, what
        self._check = check

    def settle(self, group: Any, timeout: Optional[float]) -> None:
        """Wait for the collective (at most ``timeout`` seconds), then check it."""
        start = time.monotonic()
        try:
            if timeout is None:
                self.work.wait()
            else:
                self.work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            raise _failure(self.context, f"{self.what} (shadowed by a joined rank)", group,
                           error, timeout, time.monotonic() - start) from error
        self._check(self.packet)


def shadow(call: Call, group: Any) -> List[InFlight]:
    """Issue, without waiting, the collectives ``call`` would make on this rank with an
    empty batch: its header when one is due, then a packet whose payload is zeros
    (a count of 0: the other ranks' statistics are those of their data alone). The
    counters, sequence number and packet size advance exactly as for a real call."""
    context, what, numel = call.context, call.what, call.numel
    shared = _shared(group)
    rank = dist.get_rank(group)
    transport = shared.transport if shared.transport is not None else isolation.transport(group)
    state = context.direction(what)
    state.calls += 1
    issued: List[InFlight] = []
    if _needs_header(shared, state, numel):
        shared.seq += 1
        mine = _header_row(shared, state, numel, call.autograd)
        packet = _header_packet(shared, state, rank, numel, call.autograd, call.device)
        work = dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=transport, async_op=True)
        # The others' rows are checked once it lands; the packet size grows as theirs
        # will (every rank announces the same size when the ranks agree).
        before = _Shared(world=shared.world, size=shared.size)
        shared.size = max(shared.size, numel + _TAIL)
        state.checked = True
        issued.append(InFlight(work, packet, context, f"{what} header",
                               lambda result: _check_header(context, what, group, before,
                                                            rank, mine, result)))
    shared.seq += 1
    zeros = torch.zeros(numel, dtype=torch.float64, device=call.device)
    packet = _pack(zeros, shared, state, rank, call.nonfinite is not None, call.autograd)
    work = dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=transport, async_op=True)
    verify = _tail_verifier(context, what, group, shared.world, call.nonfinite)
    issued.append(InFlight(work, packet, context, what,
                           lambda result: verify(result[-_TAIL:].tolist())))
    return issued
