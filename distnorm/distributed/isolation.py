"""distnorm's own process groups: the synced layers' collectives meet no one else's.

The guarded collectives of :mod:`~distnorm.distributed.collectives` tell two
distnorm collectives apart, but not a distnorm collective from someone else's. On a
shared process group, a rank that skips its synced layers (one rank left in eval
mode after validation, a rank that ran out of data) makes its *next* collective —
DDP's gradient bucket, a metric all-reduce — while its peers wait in a synced
layer: the two meet. gloo aborts the process when the sizes differ ("Received data
size doesn't match"); NCCL, which checks no size, hangs or sums unrelated buffers.

So the synced layers reduce over a process group of their own: the same ranks as
the layer's group (the *user's group*), made once per user group, at its first
guarded collective, with ``torch.distributed.new_group(ranks,
use_local_synchronization=True)`` — only the group's ranks take part, so the
subgroups of :func:`~distnorm.distributed.group_by` need no call from other ranks.
Every rank of the user's group reaches that first call at the same point (the header
of the group's first synced layer), and the creation waits at most the group's
timeout or distnorm's deadline, whichever is shorter, so a rank that never comes
ends in a ``SyncError`` rather than a hang. The new group has the user group's
backend and timeout.

Creating a group normally advances the counter torch names its groups by on the
member ranks only (``use_local_synchronization``); ranks outside the user's group
would then name their next ``new_group`` differently and deadlock. The counter is
therefore set to a name space of distnorm's own (derived from the user group's
name, equal on its ranks) for the creation and restored after it: the user's later
groups are named exactly as without distnorm.

``DISTNORM_ISOLATE=0`` (the same on every rank) shares the user's group instead: no
extra group (an extra NCCL communicator on GPUs), and the faults above abort or hang
as with torch's own ``SyncBatchNorm``. ``distnorm.join`` uses the own group while a
``Join`` is active either way.

Groups are keyed weakly: a destroyed user group is not kept alive here, and
``destroy_process_group()`` shuts the own groups down with the rest of the world.
"""

from __future__ import annotations

import datetime
import os
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .._compat import group_names_from

__all__ = ["ISOLATE_ENV", "isolating", "own_group", "transport"]

ISOLATE_ENV = "DISTNORM_ISOLATE"
# Group-name salts of distnorm's own groups start here: far above any count of groups
# a job makes, so that no name torch gives a user's group can equal one of ours.
_NAME_SPACE = 1 << 40


def isolating() -> bool:
    """Whether synced layers reduce over a process group of their own
    (``DISTNORM_ISOLATE``, default on; ``0``/``off`` shares the layer's group)."""
    return os.environ.get(ISOLATE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@dataclass(eq=False)
class _Own:
    """distnorm's own group of one user group, and whether it is the default."""

    isolate: bool
    group: Optional[Any] = None


# user group -> its _Own (keyed weakly; the own group never refers back to it).
_OWN: "weakref.WeakKeyDictionary[Any, _Own]" = weakref.WeakKeyDictionary()


def _entry(group: Any) -> _Own:
    entry = _OWN.get(group)
    if entry is None:  # decided once per group: every collective of it agrees
        entry = _OWN[group] = _Own(isolate=isolating())
    return entry


def transport(group: Any, timeout: Optional[float] = None) -> Any:
    """The group the guarded collectives of ``group`` run on outside a ``Join``: its
    own group (made on this first call, see :func:`own_group`) or, with
    ``DISTNORM_ISOLATE=0``, ``group`` itself."""
    entry = _entry(group)
    if not entry.isolate:
        return group
    if entry.group is None and _capturing():
        return group  # no group can be made inside a CUDA-graph capture: warm up first
    return entry.group if entry.group is not None else own_group(group, timeout)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def own_group(group: Any, timeout: Optional[float] = None) -> Any:
    """distnorm's own process group of ``group``'s ranks, made on the first call.

    The first call is collective over ``group``'s ranks (and only theirs): each must
    make it at the same point.

    Args:
        group: the user's group (a synced layer's process group).
        timeout: the longest wait in seconds for the other ranks to make it (``None``:
            the group's timeout); the new group keeps the group's own timeout.

    Raises:
        RuntimeError: a rank of ``group`` did not come in time.
    """
    entry = _entry(group)
    if entry.group is None:
        entry.group = _new_group_like(group, timeout)
    return entry.group


def _group_timeout(group: Any) -> Optional[datetime.timedelta]:
    """The timeout ``group`` was made with (its backends'), or ``None`` if unknown."""
    found: List[datetime.timedelta] = []
    for device in getattr(group, "_device_types", []):
        try:
            found.append(group._get_backend(device).options._timeout)
        except (AttributeError, RuntimeError):
            continue
    return max(found) if found else None


def _new_group_like(group: Any, wait: Optional[float]) -> Any:
    ranks = dist.get_process_group_ranks(group)
    keep = _group_timeout(group)
    bounded = keep
    if wait is not None:
        deadline = datetime.timedelta(seconds=wait)
        bounded = deadline if keep is None else min(keep, deadline)
    with group_names_from(_NAME_SPACE + zlib.crc32(f"distnorm|{group.group_name}".encode())):
        own = dist.new_group(ranks, timeout=bounded, backend=str(dist.get_backend(group)),
                             use_local_synchronization=True, group_desc="distnorm")
    if keep is not None and keep != bounded and hasattr(dist.distributed_c10d, "set_timeout"):
        dist.distributed_c10d.set_timeout(keep, own)
    return own
