"""The collectives of synced layers, in one place.

Every synced layer reduces through :func:`all_reduce`, which takes a small
:class:`SyncContext` (the layer's name and identity, its non-finite policy, its
deadline and its call counters) rather than the layer itself (docs/algorithms.md §6).

When ranks disagree about a collective — one skipped the layer, they call layers
in another order, the channel counts differ, one runs an extra forward, a rank is in
eval mode or ran out of data — the payloads no longer line up. gloo aborts a process
whose peer sends a longer buffer than it expects, and a rank waiting for a peer that
never comes waits for the process group's timeout (torch's defaults: 30 minutes for
gloo, 10 minutes for NCCL). So every collective here is guarded — one packet size
per group, a header at a layer's first call, a tail of counters at every call; the
layout and its checks are :mod:`._guard`'s — and:

* **Deadline.** On CPU (gloo) each guarded collective waits at most the layer's
  ``timeout`` (``DISTNORM_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`;
  ``0`` turns it off), whatever the process group's timeout. On CUDA waiting with a
  deadline would block the host, so the bound there is NCCL's watchdog: the process
  group's ``timeout`` (10 minutes by default). With
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (torch's default) the watchdog tears the
  process down (SIGABRT), so no ``SyncError`` naming the layer is raised on CUDA
  (docs/faults.md, "Deadlines").
* **Failures** of the collective itself (a dead peer, a deadline, the group's
  timeout) are re-raised as ``SyncError`` naming the layer. A ``SyncError`` leaves
  the group's ranks at different collectives: treat it as fatal for the group.
* **Checks on CUDA** are read back without waiting: the tail is copied into pinned
  memory and checked at the next guarded call on the group, so the training path
  never waits on the device and a CUDA graph can capture it.

Non-finite inputs: a rank whose payload is not finite contributes zeros, and its
bit (2^rank) rides in the same all-reduce, so every rank learns which ranks were
hit and raises :class:`~distnorm.errors.NonFiniteError` (policy ``"raise"``) or goes
on without them (``"skip"``). On CUDA the error is raised at the next guarded call.
Under ``torch.compile`` the zeroing is traced into the graph, and for ``"raise"``
the bits go to an operator opaque to the compiler that raises them at the layer's
next forward; at CUDA-graph replays they are kept on the device for
:func:`distnorm.check_nonfinite` (:mod:`.nonfinite`).

Isolation: the guarded collectives of a group run on distnorm's own group of the
same ranks (:mod:`~distnorm.distributed.isolation`), so that they only ever meet each
other, never DDP's or a metric's; torch's plain ``Join([ddp])`` is refused
(:mod:`~distnorm.distributed.ddp_join`).

Uneven inputs: :mod:`distnorm.join` records each iteration's guarded collectives
(:class:`Call`) and lets a rank that ran out of data shadow them with zero
contributions (:func:`shadow`), on distnorm's own group (:func:`set_transport`).
"""

from __future__ import annotations

import datetime
import math
import os
import time
import weakref
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._compat import functional_collectives
from ..errors import SyncError
from . import ddp_join, isolation
from . import nonfinite as _nonfinite
from ._guard import (_MOD, _ROW, _TAIL, DEBUG_ENV, DevicePacket, Written, _bit,  # noqa: F401
                     _check_capturable, _check_header, _Direction, _header_packet, _header_row,
                     _needs_header, _pack, _ranks,
                     _tail_verifier)
from ._readback import DeferredCheck as _DeferredCheck

__all__ = ["DEBUG_ENV", "DEFAULT_TIMEOUT_S", "NONFINITE_POLICIES", "TIMEOUT_ENV", "Call",
           "DevicePacket", "InFlight", "Written", "SyncContext", "all_reduce", "resolve_timeout", "set_transport",
           "shadow", "start_recording", "stop_recording"]

TIMEOUT_ENV = "DISTNORM_TIMEOUT"
# A rank waits this long for its peers in a guarded collective on CPU. Long enough
# for a peer's first-call kernel compilation on a loaded machine, or a data-loader
# stall; a minute instead of gloo's default 30.
DEFAULT_TIMEOUT_S = 60.0
NONFINITE_POLICIES = ("raise", "skip")
# Packets per group kept referenced after their collective (see _Shared.recent).
_RECENT = 8


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
    # The last packets reduced on the group, held from Python: a gloo worker thread may
    # drop its reference to a finished collective's tensor after the caller has; the
    # tensor's Python object must then be released on that thread, with the GIL — which
    # at interpreter exit (a live DDP module keeping the group) ends in std::terminate.
    recent: Deque[Tensor] = field(default_factory=lambda: deque(maxlen=_RECENT))

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
    shared.recent.append(packet)
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
    packed = _pack(payload, shared, state, rank, nonfinite is not None, autograd,
                   _on_host(payload))
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


def _refuse_plain_join(shared: _Shared, state: _Direction, context: SyncContext) -> None:
    """ValueError on every rank at the first synced forward under torch's Join([ddp])
    without distnorm.joinable (see distributed.ddp_join)."""
    if shared.ddp is None and not state.checked:  # a header call: look for DDP once
        shared.ddp = ddp_join.find_ddp()
    if shared.ddp is not None and shared.transport is None:
        ddp_join.refuse_plain_join(shared.ddp, context.name)


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
        shared.recent.append(packet)
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
    packet = _pack(zeros, shared, state, rank, call.nonfinite is not None, call.autograd,
                   _on_host(zeros))
    shared.recent.append(packet)
    work = dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=transport, async_op=True)
    verify = _tail_verifier(context, what, group, shared.world, call.nonfinite)
    issued.append(InFlight(work, packet, context, what,
                           lambda result: verify(result[-_TAIL:].tolist())))
    return issued
