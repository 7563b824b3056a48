"""Start torch.distributed from the environment a launcher set, with clear failures.

``torchrun`` (single or multi-node), Slurm wrappers and :func:`run_local` all hand a
worker its place in the job through environment variables::

    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT     (required)
    LOCAL_RANK, LOCAL_WORLD_SIZE                   (optional: 0 and 1 when absent)

:func:`init_from_env` reads them, picks the backend (NCCL when CUDA is available,
gloo otherwise), and turns the two usual failures into messages that say what to do:
a variable that is missing (the script was started with ``python`` instead of a
launcher), and a rank that never joins (a node that was not started or cannot reach
``MASTER_ADDR``), which raises :class:`TimeoutError` after ``timeout`` seconds instead
of hanging.

:func:`run_local` is a small stand-in for ``torchrun --standalone`` on one machine:
it starts one Python process per rank on a script with those variables set.

A clean exit: importing this module (``import distnorm`` does) runs
:func:`import_before_init`, so that torch modules imported later cannot keep the
default process group alive past ``destroy_process_group`` (an abort at interpreter
exit otherwise, after a job that succeeded).
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "RendezvousError", "env_from", "import_before_init", "init_from_env",
           "run_local"]

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

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

    Called when distnorm is imported, by :func:`init_from_env` and by the demo's
    ranks; a no-op once a process group exists (importing then would pin it).
    """
    if not dist.is_available() or dist.is_initialized():
        return
    for name in _CAPTURES_DEFAULT_GROUP:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - optional part of torch; nothing to pin then
                pass


_HOW_TO_LAUNCH = (
    "start the script with a launcher that sets them, e.g.\n"
    "  torchrun --standalone --nproc_per_node=2 SCRIPT ...          (one machine)\n"
    "  launchers/torchrun_multi_node.sh SCRIPT ...                   (several machines)\n"
    "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself")


class RendezvousError(RuntimeError):
    """The environment does not say where this process belongs in the job."""


@dataclass(frozen=True)
class DistEnv:
    """A worker's place in the job, as a launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise RendezvousError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise RendezvousError(f"{name} must be an integer (got {raw!r})") from None


def env_from(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read and check the launcher's variables (``os.environ`` by default).

    Raises:
        RendezvousError: a required variable is missing or malformed, or the values
            contradict each other (``RANK >= WORLD_SIZE``, a port out of range, ...).
    """
    env = os.environ if environ is None else environ
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise RendezvousError(
            f"torch.distributed rendezvous variable{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} not set (this process was not started by a distributed "
            f"launcher); {_HOW_TO_LAUNCH}")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", 1)
    port = _int(env, "MASTER_PORT")
    if world < 1:
        raise RendezvousError(f"WORLD_SIZE must be >= 1 (got {world})")
    if not 0 <= rank < world:
        raise RendezvousError(f"RANK must be in [0, WORLD_SIZE) = [0, {world}) (got {rank})")
    if not 0 <= local_rank < max(local_world, 1):
        raise RendezvousError(f"LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE) = [0, {local_world}) "
                              f"(got {local_rank})")
    if not 0 < port < 65536:
        raise RendezvousError(f"MASTER_PORT must be a TCP port in 1..65535 (got {port})")
    return DistEnv(rank, world, local_rank, local_world, env["MASTER_ADDR"], port)


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, ``"gloo"`` otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(backend: Optional[str] = None, timeout: float = 300.0) -> DistEnv:
    """Initialize the default process group from the launcher's environment.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... (``None``: NCCL when CUDA is available,
            gloo otherwise). With NCCL the current CUDA device is set to ``LOCAL_RANK``.
        timeout: seconds to wait for every rank to join (and for each collective
            afterwards) before giving up.

    Returns:
        This worker's :class:`DistEnv`. An already-initialized process group is
        left as it is (its rank and size are returned).

    Raises:
        RendezvousError: a rendezvous variable is missing or malformed.
        TimeoutError: not all ``WORLD_SIZE`` ranks joined within ``timeout`` seconds.

    Example::

        >>> from distnorm.distributed.launch import init_from_env
        >>> env = init_from_env()                    # under torchrun, Slurm, run_local
        >>> model = DistributedDataParallel(distnorm.convert_model(model), ...)
    """
    if dist.is_available() and dist.is_initialized():
        env = os.environ
        return DistEnv(dist.get_rank(), dist.get_world_size(), _int(env, "LOCAL_RANK", 0),
                       _int(env, "LOCAL_WORLD_SIZE", 1), env.get("MASTER_ADDR", ""),
                       _int(env, "MASTER_PORT", 0))
    info = env_from()
    import_before_init()
    backend = backend or default_backend()
    if backend == "nccl":
        # Modulo: with --gpus-per-task=1 (Slurm) each task sees only its own GPU.
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    try:
        dist.init_process_group(backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        if info.world_size > 1:
            # Every rank must have joined before the job starts: fail here, with a
            # message, rather than at the first collective of the model.
            dist.barrier()
    except Exception as error:  # the store and the backends raise different types
        text = str(error)
        if isinstance(error, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower():
            if dist.is_initialized():
                dist.destroy_process_group()
            if info.rank != 0 and "connect" in text.lower():
                raise TimeoutError(
                    f"rank {info.rank}: could not reach the rendezvous at {info.master_addr}:"
                    f"{info.master_port} within {timeout:g} s. Is rank 0 (the first node) "
                    f"running, does MASTER_ADDR resolve to it from this node, and is port "
                    f"{info.master_port} open? ({type(error).__name__}: "
                    f"{text.splitlines()[0] if text else ''})") from error
            raise TimeoutError(
                f"rank {info.rank}: not all {info.world_size} ranks joined the job at "
                f"{info.master_addr}:{info.master_port} within {timeout:g} s. Check that every "
                f"node was started with the same WORLD_SIZE / --nnodes, that MASTER_ADDR "
                f"({info.master_addr}) resolves and is reachable from every node, and that "
                f"port {info.master_port} is open. ({type(error).__name__}: "
                f"{text.splitlines()[0] if text else ''})") from error
        raise
    return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_local(script: str, argv: Sequence[str], nproc: int, *, port: Optional[int] = None,
              env: Optional[Dict[str, str]] = None, poll: float = 0.2) -> int:
    """Run ``python script *argv`` as ``nproc`` ranks on this machine (like
    ``torchrun --standalone --nproc_per_node=nproc``), and wait for them.

    Each process gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
    (127.0.0.1) and MASTER_PORT. When one rank fails, the others are stopped (they
    would otherwise wait for it until their timeout).

    Returns:
        0 when every rank succeeded, else the first non-zero exit code.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1 (got {nproc})")
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    procs: List[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(subprocess.Popen([sys.executable, script, *argv], env=rank_env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# distnorm imports this module, usually before the script's init_process_group.
import_before_init()
