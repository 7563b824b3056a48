"""Process groups: the one place where distnorm decides who it synchronizes with.

Layers resolve their group in ``forward`` (models are usually built before
``torch.distributed.init_process_group``), through :func:`resolve_group`.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

ProcessGroup = dist.ProcessGroup if dist.is_available() else object

__all__ = ["group_by", "resolve_group", "world_size"]


def resolve_group(process_group: Optional["ProcessGroup"] = None) -> Optional["ProcessGroup"]:
    """The group a synced layer reduces over, or ``None`` when it should run locally.

    ``None`` is returned when torch.distributed is unavailable or not initialized, or
    when the group holds a single rank: a synced layer then behaves exactly like its
    local counterpart and makes no collective call.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def world_size(process_group: Optional["ProcessGroup"] = None) -> int:
    """Number of ranks a layer with this ``process_group`` synchronizes over (1 = local)."""
    group = resolve_group(process_group)
    return 1 if group is None else dist.get_world_size(group)


def group_by(size: int) -> "ProcessGroup":
    """Split the world into groups of ``size`` consecutive ranks; return the caller's.

    Like apex's ``group_size``: with 8 ranks and ``size=4``, ranks 0-3 and 4-7 each
    normalize over their own 4 ranks. Every rank must call this (collectively, in the
    same order), as ``torch.distributed.new_group`` requires.

    Args:
        size: ranks per group; must divide the world size.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: ``size`` is not a positive divisor of the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group_by() needs torch.distributed to be initialized "
                           "(call torch.distributed.init_process_group first)")
    world = dist.get_world_size()
    if not isinstance(size, int) or size < 1 or world % size != 0:
        raise ValueError(f"group_by(size={size!r}): size must be a positive divisor of "
                         f"the world size {world}")
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, size):
        # new_group is collective: every rank creates every group, in the same order.
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    assert mine is not None
    return mine
