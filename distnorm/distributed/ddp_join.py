"""torch's own ``Join([ddp])`` around synced layers, without ``distnorm.joinable``.

torch documents ``with Join([ddp_model]):`` for uneven inputs. A rank that runs out
of data then shadows DDP's collectives only; its peers' synced layers wait for it in
a collective it never makes (before distnorm had a process group of its own, DDP's
shadow all-reduce met the synced layers' packet and gloo aborted the process). So
the first synced forward call inside such a ``Join`` raises ``ValueError`` on every
rank — each rank runs that forward before any can run out — pointing at
``Join([distnorm.joinable(model), model])``. torch's documented pattern for its own
``SyncBatchNorm``, ``Join([ddp_model], throw_on_early_termination=True)``, is left
alone: every rank raises torch's "exhausted inputs" error when one runs out.

The DDP module is found once per process group, on the Python stack of a synced
layer's first forward call (its header, a host-side step anyway): a synced layer
does not know the module that wraps it. Afterwards each forward call reads two
attributes of it.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Optional

__all__ = ["find_ddp", "mark_joinable", "refuse_plain_join"]

# DDP modules given to distnorm.joinable: their Join shadows the synced layers too.
_WITH_JOINABLE: "weakref.WeakSet[Any]" = weakref.WeakSet()
# How far up the stack a DDP forward is looked for (DDP.forward → module → ... → layer).
_MAX_DEPTH = 64


def mark_joinable(model: Any) -> None:
    """Record that ``model`` has a ``distnorm.joinable``: its ``Join`` is distnorm's."""
    _WITH_JOINABLE.add(model)


def _ddp_forward_code() -> Optional[Any]:
    parallel = sys.modules.get("torch.nn.parallel.distributed")
    if parallel is None:  # DDP never imported: no DDP can be on the stack
        return None
    return parallel.DistributedDataParallel.forward.__code__


def find_ddp() -> Optional["weakref.ReferenceType[Any]"]:
    """A weak reference to the ``DistributedDataParallel`` whose forward is running
    (the innermost one), or ``None``."""
    code = _ddp_forward_code()
    if code is None:
        return None
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            module = frame.f_locals.get("self")
            return weakref.ref(module) if module is not None else None
        frame = frame.f_back
    return None


def refuse_plain_join(ddp: "weakref.ReferenceType[Any]", name: str) -> None:
    """Raise ``ValueError`` when ``ddp`` runs under torch's ``Join`` without
    ``distnorm.joinable`` and without ``throw_on_early_termination``."""
    module = ddp()
    config = getattr(module, "_join_config", None)
    if (config is None or not config.enable or config.throw_on_early_termination
            or module in _WITH_JOINABLE):
        return
    raise ValueError(
        f"{name}: the model runs under torch's Join([ddp_model]) without distnorm.joinable: a "
        "rank that runs out of data would shadow DDP's collectives but not the synced layers', "
        "and its peers would wait for it. Use Join([distnorm.joinable(ddp_model), ddp_model]) "
        "(the synced layers are shadowed too, the others train on with the data that exists), "
        "or Join([ddp_model], throw_on_early_termination=True) to stop every rank when one "
        "runs out.")
