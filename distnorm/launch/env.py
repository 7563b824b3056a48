"""A process's place in the job, read from its launcher's environment, and the one
function that starts ``torch.distributed`` from it.

Every launcher hands a worker its place through environment variables:

* torchrun (single or multi-node), :func:`distnorm.launch.local.run_local`, or the
  user: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (required) and
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (0 and 1 when absent), read by :func:`env_from`;
* a Slurm task (``srun``): ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...,
  mapped to the variables above by :class:`SlurmEnvironment`.

:func:`init_from_env` initializes the default process group in any of these
processes (NCCL when CUDA is available, gloo otherwise) and turns the usual
failures into messages that say what to do: a variable that is missing (the
script was started with ``python`` instead of a launcher), and a rank that never
joins (a node that was not started or cannot reach ``MASTER_ADDR``), which raises
:class:`TimeoutError` instead of hanging. ``init_distributed`` is its former name,
kept as a deprecated alias.

A clean exit: :func:`init_from_env` calls
:func:`distnorm.distributed.import_before_init` before it starts the group (``import
distnorm`` already did), so that torch modules imported later cannot keep the
default process group alive past ``destroy_process_group`` (an abort at interpreter
exit otherwise, after a job that succeeded). This module depends on
:mod:`distnorm.distributed`, never the reverse.

Everything here can be tested by faking the environment: :func:`env_from` and
:class:`SlurmEnvironment` read any mapping given to them.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional

import torch
import torch.distributed as dist

from ..distributed import import_before_init
from .hostlist import expand_hostlist, expand_tasks_per_node

__all__ = ["DEFAULT_TIMEOUT_S", "DistEnv", "PORT_MIN", "PORT_SPAN", "REQUIRED", "RendezvousError",
           "SlurmEnvironment", "SlurmEnvironmentError", "TORCH_VARIABLES", "default_backend", "env_from",
           "init_distributed", "init_from_env"]

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: The variables of torch.distributed's ``env://`` method that :class:`SlurmEnvironment` sets.
TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
#: Time-out of the deprecated :func:`init_distributed` and of the Slurm jobs (torch's own default).
DEFAULT_TIMEOUT_S = 1800.0
#: ``MASTER_PORT`` derived from the job id lies in [PORT_MIN, PORT_MIN + PORT_SPAN).
PORT_MIN, PORT_SPAN = 20000, 40000



_HOW_TO_LAUNCH = (
    "start the script with a launcher that sets them, e.g.\n"
    "  torchrun --standalone --nproc_per_node=2 SCRIPT ...          (one machine)\n"
    "  launchers/torchrun_multi_node.sh SCRIPT ...                   (several machines)\n"
    "  srun python SCRIPT ...                                        (Slurm tasks: init_from_env maps SLURM_*)\n"
    "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself")


class RendezvousError(RuntimeError):
    """The environment does not say where this process belongs in the job."""


class SlurmEnvironmentError(RendezvousError):
    """The Slurm or torch.distributed variables of this process are missing, malformed,
    or disagree with each other. The message names the variables and what they hold.
    A :class:`RendezvousError` (a ``RuntimeError``)."""


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


# ------------------------------------------------------------------ Slurm

class SlurmEnvironment:
    """What torch.distributed needs, read from the variables of one Slurm task.

    ==================  ===================================================================
    ``MASTER_ADDR``     ``$MASTER_ADDR`` if set, else the first host of
                        ``SLURM_STEP_NODELIST`` (``SLURM_JOB_NODELIST``): rank 0 runs there
    ``MASTER_PORT``     ``$MASTER_PORT`` if set, else 20000 + a hash of job and step id
                        (< 60000), the same on every task of the step
    ``RANK``            ``SLURM_PROCID``
    ``WORLD_SIZE``      ``SLURM_STEP_NUM_TASKS`` (``SLURM_NTASKS``)
    ``LOCAL_RANK``      ``SLURM_LOCALID``
    ``LOCAL_WORLD_SIZE`` this node's entry (``SLURM_NODEID``) of ``SLURM_STEP_TASKS_PER_NODE``
                        (``SLURM_TASKS_PER_NODE``): uneven layouts such as ``3,1`` are right
    ==================  ===================================================================

    Also ``node_rank`` (``SLURM_NODEID``), ``num_nodes``, ``hostnames`` and ``job_id``.
    Step variables win over job variables: an ``srun`` may use part of the allocation.

    Args:
        environ: the variables to read; default ``os.environ``.

    Raises:
        SlurmEnvironmentError: a variable is missing (all missing ones are named), or
            they contradict each other, or this is the batch script of a multi-task
            job rather than one of its tasks (run the command with ``srun``).

    Example:
        >>> env = SlurmEnvironment().export()   # in each task; then
        >>> torch.distributed.init_process_group("gloo")   # env://

    Semantics:
        :meth:`export` never overwrites: a variable already set to another value is
        an error. Under ``srun torchrun`` the workers hold torchrun's ``RANK`` etc.
        (the Slurm task is then a node, not a rank); :func:`init_from_env` uses
        those as they are and builds no ``SlurmEnvironment``.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ

        def first(*names: str) -> Optional[str]:
            return next((env[n] for n in names if env.get(n, "") != ""), None)

        needed = {
            "SLURM_JOB_ID": first("SLURM_JOB_ID", "SLURM_JOBID"),
            "SLURM_PROCID": first("SLURM_PROCID"),
            "SLURM_NTASKS": first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
            "SLURM_LOCALID": first("SLURM_LOCALID"),
            "SLURM_NODEID": first("SLURM_NODEID"),
            "SLURM_JOB_NODELIST": first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
            "SLURM_TASKS_PER_NODE": first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
        }
        missing = [name for name, value in needed.items() if value is None]
        if missing:
            raise SlurmEnvironmentError(
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: this process is "
                "not a Slurm task. Start it with srun (inside sbatch or salloc), with the templates in "
                "slurm/, or with `distnorm slurm submit`; under torchrun, RANK/WORLD_SIZE/MASTER_ADDR/"
                "MASTER_PORT are used instead (distnorm.launch.env.init_from_env)")
        ints: Dict[str, int] = {}
        for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"):
            try:
                ints[name] = int(str(needed[name]))
            except ValueError:
                raise SlurmEnvironmentError(f"{name}={needed[name]!r} is not an integer") from None
        try:
            hostnames = expand_hostlist(str(needed["SLURM_JOB_NODELIST"]))
            tasks = expand_tasks_per_node(str(needed["SLURM_TASKS_PER_NODE"]))
        except ValueError as error:
            raise SlurmEnvironmentError(str(error)) from None

        self.job_id: int = ints["SLURM_JOB_ID"]
        step = first("SLURM_STEP_ID", "SLURM_STEPID")
        self.step_id: Optional[int] = int(step) if step is not None and step.isdigit() else None
        self.rank: int = ints["SLURM_PROCID"]
        self.world_size: int = ints["SLURM_NTASKS"]
        self.local_rank: int = ints["SLURM_LOCALID"]
        self.node_rank: int = ints["SLURM_NODEID"]
        self.hostnames: List[str] = hostnames
        self.num_nodes: int = len(hostnames)
        self.tasks_per_node: List[int] = tasks

        layout = (f"SLURM_PROCID={self.rank}, SLURM_NTASKS={self.world_size}, SLURM_LOCALID="
                  f"{self.local_rank}, SLURM_NODEID={self.node_rank}, nodes {needed['SLURM_JOB_NODELIST']!r}, "
                  f"tasks per node {needed['SLURM_TASKS_PER_NODE']!r}")
        if self.step_id is None and self.world_size > 1:
            raise SlurmEnvironmentError(
                f"this is the batch script (or salloc shell) of a job with {self.world_size} tasks, not one "
                "of its tasks (no SLURM_STEP_ID): start the command with `srun` so that every rank runs")
        if len(tasks) != len(hostnames) or sum(tasks) != self.world_size:
            raise SlurmEnvironmentError(f"inconsistent Slurm layout: {len(hostnames)} hosts, tasks per node "
                                        f"{tasks} (sum {sum(tasks)}) for {self.world_size} tasks ({layout})")
        if not (0 <= self.rank < self.world_size and 0 <= self.node_rank < self.num_nodes
                and 0 <= self.local_rank < tasks[self.node_rank]):
            raise SlurmEnvironmentError(f"inconsistent Slurm layout: {layout}")
        self.local_world_size: int = tasks[self.node_rank]
        self.master_addr: str = env.get("MASTER_ADDR") or hostnames[0]
        port = env.get("MASTER_PORT")
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise SlurmEnvironmentError(f"MASTER_PORT={port!r} is not a TCP port number")
            self.master_port: int = int(port)
        else:
            self.master_port = PORT_MIN + (self.job_id * 1009 + (self.step_id or 0)) % PORT_SPAN

    def variables(self) -> Dict[str, str]:
        """The six ``env://`` variables as strings, in :data:`TORCH_VARIABLES` order."""
        values = (self.master_addr, self.master_port, self.rank, self.world_size, self.local_rank,
                  self.local_world_size)
        return {k: str(v) for k, v in zip(TORCH_VARIABLES, values)}

    def export(self, environ: Optional[MutableMapping[str, str]] = None,
               overwrite: bool = False) -> "SlurmEnvironment":
        """Set the variables of :meth:`variables` in ``environ`` (default ``os.environ``).

        Args:
            environ: where to set them.
            overwrite: replace variables that are set to other values (default: refuse).

        Returns:
            ``self``, so that ``env = SlurmEnvironment().export()`` reads well.

        Raises:
            SlurmEnvironmentError: ``overwrite`` is false and a variable already holds a
                different value; nothing is set then. A variable holding the same value is fine.
        """
        env = os.environ if environ is None else environ
        values = self.variables()
        clashes = [f"{k}={env[k]!r} (Slurm gives {v!r})" for k, v in values.items()
                   if k in env and env[k] != v]
        if clashes and not overwrite:
            raise SlurmEnvironmentError(
                f"refusing to overwrite {', '.join(clashes)}: already set, by torchrun or the job script? "
                "Unset them, use them as they are (init_from_env does when RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT are all set), or pass overwrite=True")
        env.update(values)
        return self

    def __repr__(self) -> str:
        return (f"SlurmEnvironment(job_id={self.job_id}, rank={self.rank}/{self.world_size}, "
                f"local_rank={self.local_rank}/{self.local_world_size}, node={self.node_rank}/{self.num_nodes}, "
                f"master={self.master_addr}:{self.master_port})")


# ----------------------------------------------------------- the process group

def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in environ or "SLURM_JOB_ID" in environ


def init_from_env(backend: Optional[str] = None, timeout: float = 300.0) -> DistEnv:
    """Initialize the default process group in a torchrun worker, a Slurm task or any
    process whose rendezvous variables were set.

    * torch.distributed already initialized: nothing is done (its rank and size are
      returned).
    * ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` all set (torchrun,
      ``srun torchrun``, :func:`distnorm.launch.local.run_local`, or the user): used
      as they are.
    * otherwise a Slurm task (``SLURM_PROCID`` or ``SLURM_JOB_ID`` set):
      :meth:`SlurmEnvironment.export` fills in what is missing and refuses to
      overwrite what disagrees;
    * otherwise :func:`env_from` names the missing variables and how to launch.

    Then the group starts (``env://``) and every rank is waited for.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... (``None``: NCCL when CUDA is available,
            gloo otherwise). With NCCL the current CUDA device is set to ``LOCAL_RANK``.
        timeout: seconds to wait for every rank to join (and for each collective
            afterwards) before giving up.

    Returns:
        This worker's :class:`DistEnv`.

    Raises:
        RendezvousError: a rendezvous variable is missing or malformed
            (:class:`SlurmEnvironmentError` when Slurm's are inconsistent).
        TimeoutError: not all ``WORLD_SIZE`` ranks joined within ``timeout`` seconds.

    Example::

        >>> from distnorm.launch.env import init_from_env
        >>> env = init_from_env()                    # under torchrun, Slurm, run_local
        >>> model = DistributedDataParallel(distnorm.convert_model(model), ...)
    """
    if dist.is_available() and dist.is_initialized():
        env = os.environ
        return DistEnv(dist.get_rank(), dist.get_world_size(), _int(env, "LOCAL_RANK", 0),
                       _int(env, "LOCAL_WORLD_SIZE", 1), env.get("MASTER_ADDR", ""),
                       _int(env, "MASTER_PORT", 0))
    environ = os.environ
    if not all(environ.get(k) for k in REQUIRED) and _is_slurm_task(environ):
        SlurmEnvironment(environ).export(environ)
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


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Deprecated name of :func:`init_from_env` (with a 30-minute default time-out).

    Args:
        backend: see :func:`init_from_env`.
        timeout_s: its ``timeout``, seconds.
    """
    warnings.warn("distnorm: init_distributed(backend, timeout_s) is deprecated; call "
                  "distnorm.launch.env.init_from_env(backend, timeout=...) (the same function)",
                  DeprecationWarning, stacklevel=2)
    environ = os.environ
    if not (dist.is_available() and dist.is_initialized()) and not _is_slurm_task(environ):
        missing = [k for k in TORCH_VARIABLES[:4] if not environ.get(k)]
        if missing:  # the error this name always raised
            raise SlurmEnvironmentError(
                f"cannot start torch.distributed: {', '.join(missing)} not set (torchrun sets them) and "
                "this is not a Slurm task (no SLURM_PROCID). Launch with torchrun, srun, the templates "
                "in slurm/, or `distnorm slurm submit`")
    return init_from_env(backend, timeout=timeout_s)
