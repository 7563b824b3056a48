"""Process groups: the one place where distnorm decides who it synchronizes with.

Layers resolve their group in ``forward`` (models are usually built before
``torch.distributed.init_process_group``), through :func:`resolve_group`.

This package sits below the launchers: :mod:`distnorm.launch` imports it, never the
reverse. ``distnorm.distributed.init_from_env`` is a deprecated alias of
:func:`distnorm.launch.env.init_from_env` (it warns with a ``FutureWarning``).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import layer_name

ProcessGroup = dist.ProcessGroup if dist.is_available() else object

__all__ = ["NoProcessGroupWarning", "group_by", "import_before_init", "launcher_world_size",
           "resolve_group", "world_size"]

# The variables launchers set to tell a process how many processes the job has, in
# the order they are read: torchrun / accelerate / deepspeed / any env:// launcher,
# an srun step (SLURM_STEP_NUM_TASKS is set for the tasks of a step, not for the batch
# script itself, which is one process whatever --ntasks says), Open MPI, MPICH / PMI.
_LAUNCHER_SIZES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class NoProcessGroupWarning(UserWarning):
    """A launcher started several processes, but this one has no process group: its
    synced layers normalize over its own batch only (local BatchNorm)."""


# Whether this process was told already (one warning per process, not per layer or step).
_warned_no_group = False


def launcher_world_size(environ: Optional[Mapping[str, str]] = None) -> Optional[Tuple[str, int]]:
    """``(variable, size)`` when a launcher's variables say this job runs more than one
    process, else ``None``.

    Reads ``WORLD_SIZE`` (torchrun, accelerate, deepspeed), ``SLURM_STEP_NUM_TASKS``
    (the tasks of an ``srun`` step, with ``SLURM_PROCID``), ``OMPI_COMM_WORLD_SIZE``
    (Open MPI) and ``PMI_SIZE`` (MPICH, Intel MPI), in that order; the first one set
    decides.
    """
    env = os.environ if environ is None else environ
    for name in _LAUNCHER_SIZES:
        raw = env.get(name, "")
        if not raw:
            continue
        if name == "SLURM_STEP_NUM_TASKS" and not env.get("SLURM_PROCID"):
            continue
        try:
            size = int(raw)
        except ValueError:
            continue
        return (name, size) if size > 1 else None
    return None


def _owner_name(owner: Any) -> str:
    if owner is None:
        return "a distnorm synced layer"
    return owner if isinstance(owner, str) else layer_name(owner)


def _warn_no_group(owner: Any) -> None:
    global _warned_no_group
    # Inside a torch.compile graph a warning cannot be issued (fullgraph would fail):
    # compiled models are told by check_model, and by any eager forward.
    if torch.compiler.is_compiling() or _warned_no_group:
        return
    found = launcher_world_size()
    if found is None:
        return
    _warned_no_group = True
    name, size = found
    warnings.warn(
        f"{_owner_name(owner)}: {name}={size} says this job runs {size} processes, but torch.distributed "
        "has no process group in this one, so its synced layers normalize over this "
        "process's batch only (local BatchNorm). Call torch.distributed.init_process_group() "
        "or distnorm.launch.env.init_from_env() before the model's first forward "
        "(warned once per process).", NoProcessGroupWarning, stacklevel=3)


def resolve_group(process_group: Optional["ProcessGroup"] = None,
                  owner: Any = None) -> Optional["ProcessGroup"]:
    """The group a synced layer reduces over, or ``None`` when it should run locally.

    ``None`` is returned when torch.distributed is unavailable or not initialized, or
    when the group holds a single rank: a synced layer then behaves exactly like its
    local counterpart and makes no collective call. When no process group exists but
    a launcher's variables say the job has several processes (see
    :func:`launcher_world_size`), a :class:`NoProcessGroupWarning` says so, once per
    process (from an eager forward: a torch.compile graph cannot warn, and
    :func:`distnorm.check_model` reports it too).

    Args:
        process_group: the layer's group (``None``: the world).
        owner: the layer asking, or its name, for messages (a layer is named by
            :func:`distnorm.errors.layer_name` only when a message is written).

    Raises:
        ValueError: this rank is not a member of ``process_group`` (a group made by
            ``torch.distributed.new_group`` on other ranks): the layer would
            otherwise run as local BatchNorm on this rank without a word.
    """
    if not (dist.is_available() and dist.is_initialized()):
        _warn_no_group(owner)
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size < 0:
        raise ValueError(_not_a_member(group, owner))
    if size <= 1:
        return None
    return group


def _not_a_member(group: Any, owner: Any) -> str:
    try:
        ranks = f"ranks {dist.get_process_group_ranks(group)}"
    except Exception:  # noqa: BLE001 - torch's placeholder for non-members has no ranks
        ranks = "other ranks"
    return (f"{_owner_name(owner)}: rank {dist.get_rank()} is not a member of "
            f"the layer's process_group (a group of {ranks}), so it cannot synchronize with it. "
            "Run the layer only on the ranks of its group, or give every rank a group it "
            "belongs to, e.g. distnorm.distributed.group_by(size) or "
            "torch.distributed.new_subgroups().")


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


# torch modules that evaluate ``group.WORLD`` in function defaults when they are
# imported: imported after ``init_process_group``, they hold the default group for
# good. torch._dynamo imports the first (DDP and torch.compile import dynamo lazily).
_CAPTURES_DEFAULT_GROUP = ("torch.distributed.nn.functional",)


def import_before_init() -> None:
    """Import the torch modules that would pin the default process group, while
    there is none, so that ``destroy_process_group`` really ends the group.

    ``torch.distributed.nn.functional`` evaluates ``group.WORLD`` in ten function
    defaults at import. Imported after ``init_process_group`` (torch._dynamo imports
    it, and DDP, torch.compile and distnorm's compiled kernels import dynamo on
    first use), it keeps the group alive after ``destroy_process_group``: the gloo
    worker threads then run on into interpreter shutdown, and one that releases the
    last reference to a finished collective's tensors must take the GIL, which a
    finalizing interpreter refuses by ending the thread inside a destructor —
    ``terminate called without an active exception`` and SIGABRT after a job that
    succeeded. Imported first, the defaults hold ``None``.

    Called when distnorm is imported (here) and by
    :func:`~distnorm.launch.env.init_from_env` (launching imports it from here: this
    package never imports the launchers); a no-op once a process group exists
    (importing then would pin it).
    """
    if not dist.is_available() or dist.is_initialized():
        return
    for name in _CAPTURES_DEFAULT_GROUP:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - optional part of torch; nothing to pin then
                pass


import_before_init()


def __getattr__(name: str) -> Any:
    # Deprecated alias: init_from_env lives with the launchers (distnorm.launch.env), a
    # floor above the process groups. Launching depends on this package, never the
    # reverse, so the alias resolves the name on first use only (no import at load).
    if name == "init_from_env":
        warnings.warn("distnorm.distributed.init_from_env is deprecated and will be removed; "
                      "import it from distnorm.launch.env (the same function)",
                      FutureWarning, stacklevel=2)
        from ..launch.env import init_from_env

        return init_from_env
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
