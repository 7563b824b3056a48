"""Guards around synced collectives: ranks that disagree fail fast and clearly.

When ranks disagree about a synced layer's collective — one skipped the layer, they
call layers in another order, the channel counts differ, a rank is in eval mode —
the payloads no longer line up. gloo aborts the process when all-reduced buffers
differ in size and NCCL hangs, so the check must come *before* the payload:

* **Header** (first call of each layer and direction; every call with
  ``DISTNORM_DEBUG=1``): a fixed-size all-gather of (layer tag, call count,
  payload size, training flag). Fixed size means it cannot abort; a mismatch
  raises :class:`~distnorm.errors.SyncError` on every rank, naming the ranks.
* **Guard** (every call, free): the layer tag and call counter ride in the payload
  with their squares; all ranks agree exactly when ``W·Σt² = (Σt)²``. Read on the
  host for CPU tensors; on CUDA it is copied asynchronously and checked at the
  layer's next call, so the training path never waits on the device.
* **Failures** of the collective itself (a dead peer, the group's timeout — e.g. a
  rank in eval mode makes no call) are re-raised as ``SyncError`` naming the layer.

Non-finite inputs: a rank whose moment sums are not finite contributes zeros, and
its bit (2^rank) rides in the same all-reduce, so every rank learns which ranks
were hit and raises :class:`~distnorm.errors.NonFiniteError` (policy ``"raise"``)
or goes on without them (``"skip"``).
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import NonFiniteError, SyncError, layer_name

__all__ = ["DEBUG_ENV", "NONFINITE_POLICIES", "checked_all_reduce"]

DEBUG_ENV = "DISTNORM_DEBUG"
NONFINITE_POLICIES = ("raise", "skip")
# Tags and counters modulo 2^16: their squares summed over up to 1024 ranks, and the
# square of their sum, stay exact in float64.
_MOD = 1 << 16
_MAX_EXACT_WORLD = 1024


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _state(layer: Any) -> Dict[str, Any]:
    """Per-layer bookkeeping, kept out of the module's state_dict."""
    state = layer.__dict__.get("_distnorm_sync")
    if state is None:
        state = {"calls": {}, "checked": set(), "pending": []}
        layer.__dict__["_distnorm_sync"] = state
    return state


def _identity(layer: Any) -> str:
    """What tells layers apart across ranks: the qualified name ``convert_model``
    recorded, else the layer's creation index in this process (models are built the
    same way on every rank, so the n-th layer built is the same layer everywhere)."""
    name = getattr(layer, "_distnorm_name", None)
    return f"{type(layer).__name__} {name}" if name else f"#{getattr(layer, '_distnorm_index', -1)}"


def _ranks(group: Any) -> List[int]:
    return dist.get_process_group_ranks(group)


def _collective(fn: Callable[..., Any], layer: Any, what: str, group: Any, *args: Any,
                **kwargs: Any) -> None:
    """Run a collective; turn a failure (dead peer, timeout) into a SyncError."""
    try:
        fn(*args, group=group, **kwargs)
    except SyncError:
        raise
    except RuntimeError as error:
        raise SyncError(
            f"{layer_name(layer)}: the {what} collective over ranks {_ranks(group)} failed "
            f"(on rank {dist.get_rank()}): {str(error).strip().splitlines()[0]}. A peer process "
            "may have died or timed out, be in eval mode while this rank trains, or have "
            "skipped this layer or called layers in another order; set DISTNORM_DEBUG=1 to "
            "check every call.") from error


def _exchange_header(layer: Any, what: str, group: Any, header: List[float]) -> None:
    mine = torch.tensor(header, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _collective(dist.all_gather, layer, f"{what} header", group, gathered, mine)
    rows = [g.tolist() for g in gathered]
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
        f"{layer_name(layer)}: ranks disagree before the {what} all-reduce "
        f"(seen from rank {dist.get_rank()}: ranks {odd} differ from it): " + "; ".join(described)
        + ". Every rank must call the same synced layers in the same order, with the same "
          "channel count, all in training mode.")


def _verify_guard(layer: Any, what: str, group: Any, world: int, guard: List[float]) -> None:
    tag_sum, tag_sq, call_sum, call_sq = guard
    if world * tag_sq == tag_sum * tag_sum and world * call_sq == call_sum * call_sum:
        return
    raise SyncError(
        f"{layer_name(layer)}: ranks {_ranks(group)} were not all at the same layer and call "
        f"in the {what} all-reduce (layer tags or call counters differ across ranks). A rank "
        "skipped this layer, called synced layers in another order, or is in eval mode; set "
        f"{DEBUG_ENV}=1 to check every call and name the ranks.")


def _drain(state: Dict[str, Any]) -> None:
    """Check the deferred (CUDA) guards whose copies have landed; never wait."""
    keep = []
    for event, host, check in state["pending"]:
        if event.query():
            check(host.tolist())
        else:
            keep.append((event, host, check))
    state["pending"] = keep


def _on_host(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host is free (CPU), so that a check may branch
    there instead of staying on the device."""
    return tensor.device.type == "cpu"


def _defer_or_check(tensor: Tensor, state: Dict[str, Any], check: Callable[[List[float]], None]) -> None:
    if tensor.device.type != "cuda":
        check(tensor.tolist())
        return
    if torch.cuda.is_current_stream_capturing():
        return  # inside a CUDA graph: no host work at all
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    state["pending"].append((event, host, check))


def checked_all_reduce(buffer: Tensor, group: Any, layer: Any, what: str,
                       nonfinite: Optional[str] = None) -> Tensor:
    """``dist.all_reduce(SUM)`` of ``buffer`` with the header and guard of this module.

    ``nonfinite``: ``None`` (no check), ``"raise"`` or ``"skip"``. With either, a rank
    whose buffer is not finite contributes zeros and sets its bit (2^rank) in a
    flag reduced with the payload; with ``"raise"`` every rank then raises
    :class:`NonFiniteError` naming those ranks. Everything — payload, flag and guard
    — travels in one buffer, and its tail is read back to the host once. ``buffer``
    is consumed (zeroed in place when not finite).
    """
    state = _state(layer)
    _drain(state)
    world = dist.get_world_size(group)
    calls = state["calls"].get(what, 0) + 1
    state["calls"][what] = calls
    tags = state.setdefault("tags", {})
    if what not in tags:
        tags[what] = zlib.crc32(f"{_identity(layer)}|{what}".encode()) % _MOD
    tag, count = tags[what], calls % _MOD
    if what not in state["checked"] or _debug():
        _exchange_header(layer, what, group,
                         [float(tag), float(count), float(buffer.numel()), float(layer.training)])
        state["checked"].add(what)
    payload = buffer.to(torch.float64)
    flag, bad = 0.0, None
    if nonfinite is not None:
        bit = float(2 ** min(dist.get_rank(group), 52))  # ranks past 52 share the top exact bit
        # A NaN or ±Inf anywhere makes the sum non-finite (the sums of finite moment
        # buffers never overflow float64): one reduction instead of an isfinite pass.
        if _on_host(payload):
            if not math.isfinite(payload.sum().item()):
                payload.zero_()  # the buffer is consumed (see all_reduce_sum)
                flag = bit
        else:  # on the device, without a host synchronisation
            bad = payload.sum().isfinite().logical_not_()
            payload.masked_fill_(bad, 0.0)
    # Tail: [non-finite rank bits, tag, tag², call, call²].
    tail = torch.tensor([flag, tag, tag * tag, count, count * count], dtype=torch.float64,
                        device=buffer.device)
    if bad is not None:
        tail[0] = bad * bit
    packed = torch.cat([payload, tail])
    _collective(dist.all_reduce, layer, what, group, packed, op=dist.ReduceOp.SUM)

    def verify(values: List[float]) -> None:
        if world <= _MAX_EXACT_WORLD:
            _verify_guard(layer, what, group, world, values[1:])
        if nonfinite == "raise" and values[0]:
            _raise_nonfinite(layer, group, int(values[0]))

    _defer_or_check(packed[-5:], state, verify)
    return packed[:-5].to(buffer.dtype)


def _raise_nonfinite(layer: Any, group: Any, bits: int) -> None:
    ranks = _ranks(group)
    hit = [ranks[i] for i in range(min(len(ranks), 53)) if bits >> i & 1]
    raise NonFiniteError(
        f"{layer_name(layer)}: non-finite values (NaN/Inf) in the input on rank(s) {hit}; "
        "they were left out of the group statistics. Set the layer's nonfinite='skip' "
        "(or convert_model(..., nonfinite='skip')) to go on without them.")
