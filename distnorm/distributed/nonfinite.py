"""How ``nonfinite="raise"`` reaches the user where the eager guard does not run:
compiled steps and CUDA-graph replays.

Eagerly, a synced layer's guard reads the non-finite bits of each forward all-reduce
on the host: at once on CPU, one call later on CUDA (:mod:`.collectives`). A compiled
graph cannot read the host while it is traced, and a CUDA graph's replay runs no
Python at all. In both, a non-finite rank's contribution is still zeroed on the
device (the statistics are those of the finite ranks), and the bits (rank ``r`` of
the group sets ``2^r``) reach the user as follows:

* **Compiled steps** (``torch.compile``): :func:`raise_recorded`, a custom operator
  opaque to the compiler (``torch.ops.distnorm.raise_nonfinite``), runs inside the
  graph after each forward all-reduce of a layer. It records the step's bits (on
  CPU a free host read; on CUDA an asynchronous copy into pinned memory) and raises
  :class:`~distnorm.errors.NonFiniteError` for the bits recorded at the layer's
  *previous* forward: the step after the bad one, compiled or eager. On CUDA it waits
  for that copy only if it has not landed a whole step later, that is, when the
  host runs more than a step ahead of the GPU: never in a training loop's steady
  state.
* **CUDA-graph replays** (``torch.cuda.graph`` of eager steps, or
  ``torch.compile(mode="reduce-overhead")``): the captured work ORs the bits into a
  flag on the device (made at a warm-up call, before the capture). Nothing can raise
  there; :func:`check_nonfinite`, called by the user every few steps, reads every
  synced layer's flags and records in one host read, raises naming the layers and
  ranks, and clears them.

Records are kept per layer (its identity, equal on every rank), process group and
device, so a deep copy of a model (an EMA copy) shares its layers' records.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import NonFiniteError
from ._readback import DeferredCheck, ranks_in

__all__ = ["OPERATOR", "check_nonfinite", "message", "raise_pending", "raise_recorded",
           "replay_flags"]

OPERATOR = "distnorm::raise_nonfinite"

# (layer identity, group name, device) of one synced layer's forward collectives.
Key = Tuple[str, str, str]


class _Record:
    """The bits a compiled forward saw: read on CPU, or a copy in flight on CUDA."""

    def __init__(self, name: str, flags: Tensor) -> None:
        self.name = name
        self.copy = None
        self.value = 0.0
        if flags.device.type == "cpu":
            self.value = float(flags.item())
        else:
            self.copy = DeferredCheck(flags, lambda values: None)

    def bits(self) -> float:
        """The bits recorded (waiting for the copy only if it has not landed)."""
        if self.copy is not None:
            self.copy.wait()
            return float(self.copy.host.tolist()[0])
        return self.value


# Bits recorded at each layer's last compiled forward, raised at its next forward.
_RECORDED: Dict[Key, _Record] = {}
# Device flags that captured work ORs the bits into at every CUDA-graph replay.
_REPLAYS: Dict[Key, Tuple[str, Tensor]] = {}


def message(hits: List[Tuple[str, List[int]]], where: str = "") -> str:
    """The text of a :class:`NonFiniteError` for ``(layer name, ranks hit)`` pairs."""
    layers = "; ".join(f"{name} on rank(s) {ranks}" for name, ranks in hits)
    return (f"non-finite values (NaN/Inf) in the input of {layers}{where}; they were left "
            "out of the group statistics. Set the layer's nonfinite='skip' (or "
            "convert_model(..., nonfinite='skip')) to go on without them.")


def _ranks_hit(bits: float, group_name: str) -> List[int]:
    """The global ranks whose bits are set (group ranks if the group is gone)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        ranks = dist.get_process_group_ranks(_resolve_process_group(group_name))
    except Exception:  # noqa: BLE001 - a destroyed or unknown group
        ranks = list(range(64))
    return ranks_in(bits, ranks)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def raise_pending(identity: str, name: str, group_name: str, device: torch.device) -> None:
    """Raise :class:`NonFiniteError` for the bits the layer's last compiled forward
    recorded on ``device``, if any (forgetting them either way)."""
    record = _RECORDED.pop((identity, group_name, str(device)), None)
    if record is not None:
        _raise_bits(name, group_name, record.bits())


def _raise_bits(name: str, group_name: str, bits: float) -> None:
    """Raise for ``bits`` if any, naming with this layer every other layer whose
    record holds bits too (forgetting them all): one error per bad step, however many
    layers it went through (a NaN input makes the layer's output NaN on its rank)."""
    if not bits:
        return
    hits = [(name, _ranks_hit(bits, group_name))]
    for key in list(_RECORDED):
        record = _RECORDED.pop(key)
        other = record.bits()
        if other:
            hits.append((record.name, _ranks_hit(other, key[1])))
    raise NonFiniteError(message(hits, " (at the previous compiled step)"))


def replay_flags(identity: str, name: str, group_name: str, device: torch.device) -> Tensor:
    """The layer's device flag for CUDA-graph replays, made on first use (call it
    outside a capture: made inside one, its zeroing would be replayed)."""
    key = (identity, group_name, str(device))
    entry = _REPLAYS.get(key)
    if entry is None:
        entry = _REPLAYS[key] = (name, torch.zeros(1, dtype=torch.float64, device=device))
    return entry[1]


@torch.library.custom_op(OPERATOR, mutates_args=("flags",))
def raise_recorded(flags: Tensor, identity: str, name: str, group_name: str) -> None:
    """Inside a compiled forward of a synced layer, after its all-reduce: raise
    :class:`NonFiniteError` for the bits recorded at the layer's previous forward,
    then record this step's ``flags`` (a float64 ``[bits]``; left unchanged: it is
    declared mutated only so that the compiler keeps the call).

    Inside a CUDA-graph capture the bits are ORed into the layer's replay flag
    instead (read by :func:`check_nonfinite`).
    """
    if flags.device.type != "cpu" and _capturing():
        key = (identity, group_name, str(flags.device))
        if key in _REPLAYS:  # made at the warm-up calls that precede any capture
            box = _REPLAYS[key][1]
            torch.maximum(box, flags, out=box)
        return
    key = (identity, group_name, str(flags.device))
    previous = _RECORDED.pop(key, None)
    _RECORDED[key] = _Record(name, flags)
    if flags.device.type != "cpu":
        replay_flags(identity, name, group_name, flags.device)
    if previous is not None:
        _raise_bits(name, group_name, previous.bits())


@raise_recorded.register_fake
def _raise_recorded_fake(flags: Tensor, identity: str, name: str, group_name: str) -> None:
    return None


def _identities(model: nn.Module) -> Set[str]:
    identities = set()
    for module in model.modules():
        context = module.__dict__.get("_sync")
        if context is not None:
            identities.add(context.identity)
    return identities


def check_nonfinite(model: nn.Module) -> None:
    """Raise :class:`~distnorm.errors.NonFiniteError` if a synced layer of ``model``,
    under ``nonfinite="raise"``, met a non-finite input in a step whose error has not
    been raised yet: a CUDA-graph replay (a captured training step,
    ``torch.compile(mode="reduce-overhead")``), where no Python runs to raise it, or
    the last compiled step (whose error the next step would raise). Clears what it
    read, so it raises once per bad step.

    Call it every few steps (and after the last one): it costs nothing in between,
    and one host read per device when called (which waits for the steps in flight).
    The ranks hit were left out of the statistics as with ``nonfinite="skip"``; every
    rank raises the same error when they all call it after the same steps. Eager and
    compiled steps raise by themselves (at once, or at the next step); this is for
    graphed steps, and for the last step of a run.

    Args:
        model: a module holding synced layers (only its own layers are read).

    Raises:
        NonFiniteError: naming each layer hit and the ranks whose input was not finite.
    """
    identities = _identities(model)
    found: Dict[Tuple[str, str], Tuple[str, float]] = {}  # (identity, group) -> name, bits

    def add(key: Key, name: str, bits: float) -> None:
        if bits:
            _, previous = found.get(key[:2], (name, 0.0))
            found[key[:2]] = (name, float(int(previous) | int(bits)))

    for key in [key for key in _RECORDED if key[0] in identities]:
        record = _RECORDED.pop(key)
        add(key, record.name, record.bits())
    mine = [(key, entry) for key, entry in _REPLAYS.items() if key[0] in identities]
    by_device: Dict[str, List[Tuple[Key, Tuple[str, Tensor]]]] = {}
    for key, entry in mine:
        by_device.setdefault(key[2], []).append((key, entry))
    for entries in by_device.values():
        flags = [box for _, (_, box) in entries]
        values = torch.cat(flags).tolist()  # the one host read on this device
        torch._foreach_zero_(flags)
        for (key, (name, _)), bits in zip(entries, values):
            add(key, name, bits)
    if found:
        hits = [(name, _ranks_hit(bits, group)) for (_, group), (name, bits) in found.items()]
        raise NonFiniteError(message(hits, " (in compiled steps or CUDA-graph replays)"))
