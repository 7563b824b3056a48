"""The collectives of synced layers and the guards around them, in one place.

Every synced layer reduces through :func:`all_reduce`, which takes a small
:class:`SyncContext` (the layer's name and identity, its non-finite policy and its
call counters) rather than the layer itself (docs/algorithms.md §6).

When ranks disagree about a collective — one skipped the layer, they call layers
in another order, the channel counts differ, a rank is in eval mode — the payloads
no longer line up. gloo aborts the process when all-reduced buffers differ in size
and NCCL hangs, so the check must come *before* the payload:

* **Header** (first call of each layer and direction; every call with
  ``DISTNORM_DEBUG=1``): a fixed-size all-gather of (layer tag, call count,
  payload size, training flag), on the payload's device (an NCCL group has no CPU
  backend). Fixed size means it cannot abort; a mismatch raises
  :class:`~distnorm.errors.SyncError` on every rank, naming the ranks. It is read on
  the host: the one synchronisation of a layer, at its first call.
* **Guard** (every call, in the payload): the layer tag and call counter ride in the
  all-reduce with their squares; all ranks agree exactly when ``W·Σt² = (Σt)²``. On
  CPU the tail is read on the host at once. On CUDA the counter lives on the device
  and the tail is copied back asynchronously into pinned memory and checked at the
  layer's next call, so the training path never waits on the device and a CUDA
  graph can capture it (inside a capture no host work is done at all).
* **Failures** of the collective itself (a dead peer, the group's timeout — e.g. a
  rank in eval mode makes no call) are re-raised as ``SyncError`` naming the layer.

Non-finite inputs: a rank whose payload is not finite contributes zeros, and its
bit (2^rank) rides in the same all-reduce, so every rank learns which ranks were
hit and raises :class:`~distnorm.errors.NonFiniteError` (policy ``"raise"``) or goes
on without them (``"skip"``). On CUDA the decision is made on the device and the
error is raised at the layer's next call.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import kernels
from ..errors import NonFiniteError, SyncError

__all__ = ["DEBUG_ENV", "NONFINITE_POLICIES", "SyncContext", "all_reduce"]

DEBUG_ENV = "DISTNORM_DEBUG"
NONFINITE_POLICIES = ("raise", "skip")
# Tags and counters modulo 2^16: their squares summed over up to 1024 ranks, and the
# square of their sum, stay exact in float64.
_MOD = 1 << 16
_MAX_EXACT_WORLD = 1024
# The tail appended to every guarded payload: [non-finite rank bits, tag, tag², call, call²].
_TAIL = 5


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


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
    holds it can be pickled or deep-copied at any point: a copy keeps the name and
    policy and starts its counters and checks afresh.

    Attributes:
        name: the layer as messages name it (``"SyncBatchNorm 'layer1.0.bn1'"``).
        identity: equal on every rank for the same layer (its qualified name, or its
            creation index), hashed into the tag that tells layers apart.
        nonfinite: ``"raise"``, ``"skip"`` or ``None`` (no check) for the forward.
        training: the layer's mode, sent in the header.
    """

    name: str = "synced layer"
    identity: str = ""
    nonfinite: Optional[str] = "raise"
    training: bool = True
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
        if not self._pending or (torch.cuda.is_available()
                                 and torch.cuda.is_current_stream_capturing()):
            return
        landed = [check for check in self._pending if check.landed()]
        self._pending = [check for check in self._pending if check not in landed]
        for check in landed:
            check.run()

    def __getstate__(self) -> Dict[str, Any]:
        # Counters, device tensors and CUDA events stay with this process's run.
        return {"name": self.name, "identity": self.identity, "nonfinite": self.nonfinite,
                "training": self.training}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


class _DeferredCheck:
    """A guard's tail copied back to the host without waiting, and the check to run
    on it once the copy has landed (a pinned buffer and an event on CUDA)."""

    def __init__(self, tail: Tensor, check: Callable[[List[float]], None]) -> None:
        self.check = check
        self.event: Optional[Any] = None
        if tail.is_cuda:
            self.host = torch.empty(tail.shape, dtype=tail.dtype, pin_memory=True)
            self.host.copy_(tail, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # a device read synchronously (tests run CUDA's branch on CPU this way)
            self.host = tail.clone()

    def landed(self) -> bool:
        return self.event is None or bool(self.event.query())

    def run(self) -> None:
        self.check(self.host.tolist())


def _ranks(group: Any) -> List[int]:
    return dist.get_process_group_ranks(group)


def _collective(fn: Callable[..., Any], context: SyncContext, what: str, group: Any,
                *args: Any, **kwargs: Any) -> None:
    """Run a collective; turn a failure (dead peer, timeout) into a SyncError."""
    try:
        fn(*args, group=group, **kwargs)
    except SyncError:
        raise
    except RuntimeError as error:
        raise SyncError(
            f"{context.name}: the {what} collective over ranks {_ranks(group)} failed "
            f"(on rank {dist.get_rank()}): {str(error).strip().splitlines()[0]}. A peer process "
            "may have died or timed out, be in eval mode while this rank trains, or have "
            "skipped this layer or called layers in another order; set DISTNORM_DEBUG=1 to "
            "check every call.") from error


def _exchange_header(context: SyncContext, what: str, group: Any, world: int,
                     header: List[float], device: torch.device) -> None:
    mine = torch.tensor(header, dtype=torch.float64).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    _collective(dist.all_gather, context, f"{what} header", group, gathered, mine)
    rows = torch.stack(gathered).tolist()
    if all(row == rows[0] for row in rows):
        return
    ranks = _ranks(group)
    described = []
    for rank, (tag, calls, size, training) in zip(ranks, rows):
        where = "this layer" if tag == header[0] else f"another layer (tag {int(tag)})"
        described.append(f"rank {rank}: {where}, call {int(calls)}, payload {int(size)} numbers, "
                         f"{'training' if training else 'eval'}")
    odd = [r for r, row in zip(ranks, rows) if row != header]
    raise SyncError(
        f"{context.name}: ranks disagree before the {what} all-reduce "
        f"(seen from rank {dist.get_rank()}: ranks {odd} differ from it): " + "; ".join(described)
        + ". Every rank must call the same synced layers in the same order, with the same "
          "channel count, all in training mode.")


def _on_host(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host is free (CPU), so that checks may branch
    there; elsewhere they stay on the device and are read back asynchronously."""
    return tensor.device.type == "cpu"


def _pack_on_device(payload: Tensor, guard: Tensor, bit: float, check: bool) -> Tensor:
    """``[payload, flag, tag, tag², call, call²]``, advancing the call counter in
    ``guard`` in place; a non-finite payload is replaced by zeros and sets ``flag``
    to ``bit``. No host synchronisation (one fused kernel where compiled)."""
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
    return torch.cat([payload, flag, guard])


def _pack(payload: Tensor, state: _Direction, bit: float, check: bool) -> Tensor:
    if _on_host(payload):
        flag = 0.0
        if check and not math.isfinite(payload.sum().item()):
            payload = torch.zeros_like(payload)
            flag = bit
        count = state.calls % _MOD
        tail = torch.tensor([flag, state.tag, state.tag ** 2, count, count * count],
                            dtype=torch.float64)
        return torch.cat([payload, tail])
    guard = state.guard.get(payload.device)
    if guard is None:  # first call on this device: the header has just synchronised
        count = (state.calls - 1) % _MOD  # advanced to `calls` by the packing below
        guard = torch.tensor([state.tag, state.tag ** 2, count, count * count],
                             dtype=torch.float64).to(payload.device)
        state.guard[payload.device] = guard
    return kernels.fused(_pack_on_device, payload, guard, bit, check)


def all_reduce(buffer: Tensor, group: Optional[Any], context: Optional[SyncContext] = None,
               what: str = "forward", nonfinite: Optional[str] = None) -> Tensor:
    """Sum ``buffer`` over ``group`` (``None``: no-op) and return the result.

    The buffer is consumed: eagerly it may be reduced in place (callers pack a fresh
    buffer); under ``torch.compile`` a functional collective returns a new tensor
    and traces into the graph.

    With a ``context`` (eager mode), the call is guarded as this module describes;
    ``what`` names the direction (``"forward"``, ``"backward"``). ``nonfinite``
    (``"raise"`` or ``"skip"``): a rank whose buffer is not finite contributes
    zeros; with ``"raise"`` every rank raises :class:`~distnorm.errors.NonFiniteError`
    naming the ranks (on CUDA at the layer's next call).
    """
    if group is None:
        return buffer
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(buffer, "sum", group))
    if context is None:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        return buffer
    return _guarded_all_reduce(buffer, group, context, what, nonfinite)


def _guarded_all_reduce(buffer: Tensor, group: Any, context: SyncContext, what: str,
                        nonfinite: Optional[str]) -> Tensor:
    capturing = buffer.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        context.drain()
    world = dist.get_world_size(group)
    state = context.direction(what)
    state.calls += 1
    if (not state.checked or _debug()) and not capturing:
        _exchange_header(context, what, group, world,
                         [float(state.tag), float(state.calls % _MOD), float(buffer.numel()),
                          float(context.training)], buffer.device)
        state.checked = True
    bit = float(2 ** min(dist.get_rank(group), 52))  # ranks past 52 share the top exact bit
    packed = _pack(buffer.to(torch.float64), state, bit, nonfinite is not None)
    _collective(dist.all_reduce, context, what, group, packed, op=dist.ReduceOp.SUM)

    def verify(values: List[float]) -> None:
        flags, tag_sum, tag_sq, call_sum, call_sq = values
        if world <= _MAX_EXACT_WORLD and (world * tag_sq != tag_sum * tag_sum
                                          or world * call_sq != call_sum * call_sum):
            raise SyncError(
                f"{context.name}: ranks {_ranks(group)} were not all at the same layer and "
                f"call in the {what} all-reduce (layer tags or call counters differ across "
                "ranks). A rank skipped this layer, called synced layers in another order, "
                f"or is in eval mode; set {DEBUG_ENV}=1 to check every call and name the ranks.")
        if nonfinite == "raise" and flags:
            _raise_nonfinite(context, group, int(flags))

    tail = packed[-_TAIL:]
    if _on_host(tail):
        verify(tail.tolist())
    elif not capturing:
        context._pending.append(_DeferredCheck(tail, verify))
    return packed[:-_TAIL].to(buffer.dtype)


def _raise_nonfinite(context: SyncContext, group: Any, bits: int) -> None:
    ranks = _ranks(group)
    hit = [ranks[i] for i in range(min(len(ranks), 53)) if bits >> i & 1]
    raise NonFiniteError(
        f"{context.name}: non-finite values (NaN/Inf) in the input on rank(s) {hit}; "
        "they were left out of the group statistics. Set the layer's nonfinite='skip' "
        "(or convert_model(..., nonfinite='skip')) to go on without them.")
