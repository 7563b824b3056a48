"""accelerate: convert before ``prepare``, and check the accelerator really is distributed.

distnorm needs no adapter for accelerate: its layers synchronize over the default
process group, which accelerate creates (or finds) for a multi-process run::

    accelerator = Accelerator()                 # Accelerator(cpu=True) on CPU
    model = distnorm.convert_model(model, mode="sync")
    check_accelerator(accelerator)              # optional, see below
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

The trap :func:`check_accelerator` catches: on a machine without GPU, a plain
``Accelerator()`` in a job started by ``torchrun`` (accelerate 1.x) initializes a
process group of all ranks but reports ``DistributedType.NO`` and does not wrap the
model in DDP. distnorm's layers then synchronize their statistics over that group
while each rank applies its own, unaveraged gradients: the ranks' weights drift
apart and nothing says so. ``Accelerator(cpu=True)`` (or ``accelerate launch --cpu``)
gives ``MULTI_CPU`` and DDP.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

__all__ = ["check_accelerator"]


def check_accelerator(accelerator: Any) -> None:
    """Raise if ``accelerator`` will not average gradients over the ranks that
    distnorm's layers synchronize over.

    Args:
        accelerator: an ``accelerate.Accelerator``.

    Raises:
        RuntimeError: the accelerator runs as a single process
            (``DistributedType.NO``) while a process group of several ranks exists,
            or while ``WORLD_SIZE`` says the job has several processes.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind != "NO":
        return
    grouped = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if grouped else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return
    where = ("a process group of" if grouped else "WORLD_SIZE says")
    raise RuntimeError(
        f"distnorm: accelerate runs this process as DistributedType.NO (no DDP, gradients "
        f"not averaged) while {where} {world} ranks; distnorm's layers would synchronize "
        "statistics across ranks whose weights drift apart. On CPU create the accelerator "
        "with Accelerator(cpu=True) (or launch with `accelerate launch --cpu`).")
