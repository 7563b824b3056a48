"""Slurm: submit distnorm jobs with submitit, and start torch.distributed inside them.

Three pieces, usable separately:

* :class:`SlurmEnvironment` reads the variables Slurm gives every task
  (``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...) and maps them to those of
  ``torch.distributed``'s ``env://`` initialization: ``MASTER_ADDR``, ``MASTER_PORT``,
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``. It has the contract
  of submitit's ``helpers.TorchDistributedEnvironment`` without needing submitit
  (and without its two shortcuts: it reads the tasks of *this* node from
  ``SLURM_STEP_TASKS_PER_NODE`` instead of dividing evenly, and it leaves
  ``CUDA_VISIBLE_DEVICES`` alone). :meth:`SlurmEnvironment.export` refuses to
  overwrite a variable that is already set to another value.
* :func:`init_distributed` initializes the default process group in any task:
  under torchrun (its variables are used as they are) or as a Slurm task (mapped by
  :class:`SlurmEnvironment`); gloo on CPU, NCCL on GPU.
* :func:`submit` sends a Python callable, a module (``distnorm.demo``) or a script
  (``examples/detection/train.py``) with its arguments to Slurm through submitit:
  ``nodes`` × ``tasks_per_node`` tasks, each of which maps its environment and runs
  the target. :func:`submit_bench` runs ``benchmarks/layer.py`` on N nodes and
  writes one results table for the job.

The same, from a shell (``distnorm slurm ...`` or ``python -m distnorm.launch.slurm``)::

    distnorm slurm submit --nodes 2 --tasks-per-node 4 --gpus-per-node 4 \\
        --partition gpu --time 120 --wait examples/detection/train.py --norm sync
    distnorm slurm bench --nodes 4 --quick --wait
    srun python -m distnorm.launch.slurm run train.py ...   # what slurm/*.sbatch do
    srun python -m distnorm.launch.slurm env                # print the mapping per task

submitit is the optional extra ``slurm`` (``pip install 'distnorm[slurm]'``); it is
imported only by :func:`submit`. Everything that runs *inside* a job needs only torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Union

from ..distributed.launch import RendezvousError

__all__ = [
    "DistributedTask",
    "SlurmEnvironment",
    "SlurmEnvironmentError",
    "bench_node",
    "collect_bench",
    "expand_hostlist",
    "expand_tasks_per_node",
    "init_distributed",
    "main",
    "submit",
    "submit_bench",
]

#: The variables of torch.distributed's ``env://`` method that :class:`SlurmEnvironment` sets.
TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
#: Default collective / rendezvous time-out of :func:`init_distributed` (torch's own default).
DEFAULT_TIMEOUT_S = 1800.0
#: ``MASTER_PORT`` derived from the job id lies in [PORT_MIN, PORT_MIN + PORT_SPAN).
PORT_MIN, PORT_SPAN = 20000, 40000

INSTALL_SUBMITIT = ("submitting to Slurm needs submitit, the optional extra `slurm` of distnorm: "
                    "pip install 'distnorm[slurm]'  (or: pip install submitit)")
INSTALL_SLURM = ("Slurm's `sbatch` was not found on PATH. Submit from a login node of a Slurm "
                 "cluster (where `sbatch --version` works). For a one-machine Slurm to try it "
                 "(Debian/Ubuntu): apt-get install slurmctld slurmd slurm-client munge, then start "
                 "munged, slurmctld and slurmd with a one-node slurm.conf (see the README, section "
                 "'Slurm', and tests/test_slurm.py, which does exactly that).")


class SlurmEnvironmentError(RendezvousError):
    """The Slurm or torch.distributed variables of this process are missing, malformed,
    or disagree with each other. The message names the variables and what they hold.
    A :class:`distnorm.distributed.launch.RendezvousError` (a ``RuntimeError``)."""


# --------------------------------------------------------------------------- parsing

def _split_top_level(text: str) -> List[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(item: str) -> List[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    hosts: List[str] = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])  # Slurm keeps the zero padding of the lower bound
            values = [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"bad range {part!r} in Slurm host list item {item!r}")
        for value in values:
            hosts.extend(_expand_one(head + value + tail))  # later brackets: cross product
    return hosts


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a Slurm host list as ``scontrol show hostnames`` does, without Slurm.

    Example:
        >>> expand_hostlist("gpu[01-03,7],login")
        ['gpu01', 'gpu02', 'gpu03', 'gpu7', 'login']
        >>> expand_hostlist("r[1-2]n[1-2]")
        ['r1n1', 'r1n2', 'r2n1', 'r2n2']

    Raises:
        ValueError: unbalanced brackets or a range that is not ``lo-hi`` digits.
    """
    hosts: List[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def expand_tasks_per_node(spec: str) -> List[int]:
    """Expand ``SLURM_TASKS_PER_NODE`` syntax: ``"2(x3),1"`` → ``[2, 2, 2, 1]``.

    Raises:
        ValueError: an item is neither ``N`` nor ``N(xK)``.
    """
    counts: List[int] = []
    for item in spec.strip().split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"bad item {item!r} in Slurm tasks-per-node {spec!r} (expected N or N(xK))")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# ------------------------------------------------------------------ the environment

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
        (the Slurm task is then a node, not a rank); :func:`init_distributed` uses
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
                "MASTER_PORT are used instead (distnorm.launch.slurm.init_distributed)")
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
                "Unset them, use them as they are (init_distributed does when RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT are all set), or pass overwrite=True")
        env.update(values)
        return self

    def __repr__(self) -> str:
        return (f"SlurmEnvironment(job_id={self.job_id}, rank={self.rank}/{self.world_size}, "
                f"local_rank={self.local_rank}/{self.local_world_size}, node={self.node_rank}/{self.num_nodes}, "
                f"master={self.master_addr}:{self.master_port})")


# ------------------------------------------------------------- process group, inside a job

def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Initialize the default process group in a torchrun worker or a Slurm task.

    * torch.distributed already initialized: nothing is done.
    * ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` all set (torchrun,
      ``srun torchrun``, or the user): used as they are.
    * otherwise a Slurm task (``SLURM_PROCID`` set): :meth:`SlurmEnvironment.export`
      fills in what is missing and refuses to overwrite what disagrees.

    Then :func:`distnorm.distributed.launch.init_from_env` starts the group (``env://``;
    NCCL on GPU with the device set to ``LOCAL_RANK``, gloo on CPU) and waits for every
    rank, raising a ``TimeoutError`` that says where rank 0 was expected instead of hanging.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; default NCCL when CUDA is available, else gloo.
        timeout_s: time-out of the rendezvous and of every collective, seconds.

    Returns:
        This rank's :class:`distnorm.distributed.launch.DistEnv`.

    Raises:
        SlurmEnvironmentError: neither torchrun's nor Slurm's variables are there, or
            they are inconsistent.
        TimeoutError: not every rank joined within ``timeout_s``.
    """
    from ..distributed.launch import init_from_env

    env = os.environ
    if not all(env.get(k) for k in TORCH_VARIABLES[:4]):
        if "SLURM_PROCID" not in env and "SLURM_JOB_ID" not in env:
            missing = [k for k in TORCH_VARIABLES[:4] if not env.get(k)]
            raise SlurmEnvironmentError(
                f"cannot start torch.distributed: {', '.join(missing)} not set (torchrun sets them) and "
                "this is not a Slurm task (no SLURM_PROCID). Launch with torchrun, srun, the templates "
                "in slurm/, or `distnorm slurm submit`")
        SlurmEnvironment(env).export(env)
    return init_from_env(backend, timeout=timeout_s)


# ------------------------------------------------------------------------ job bodies

Target = Union[Callable[..., Any], str]


def _parse_target(target: Target, args: Sequence[Any]) -> tuple:
    """``(kind, what, args)``: kind is "callable", "module" or "script"."""
    if callable(target):
        return "callable", target, list(args)
    if not isinstance(target, str) or not target:
        raise TypeError(f"target must be a callable or a non-empty string, got {target!r}")
    if target == "-m":  # torchrun / python style: -m MODULE ARGS...
        if not args:
            raise ValueError("-m needs a module name")
        return "module", str(args[0]), list(args[1:])
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"script {target!r} not found (looked at {path})")
        return "script", path, list(args)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", target):
        return "callable", target, list(args)  # "package.module:function", imported in the job
    if re.fullmatch(r"[A-Za-z_][\w.]*", target):
        return "module", target, list(args)
    raise ValueError(f"target {target!r} is neither a script (*.py), a module (pkg.mod) nor a "
                     "callable (pkg.mod:function)")


def _resolve(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


class DistributedTask:
    """A picklable job body: map ``SLURM_*`` to torch.distributed, then run a target.

    ``target`` is one of

    * a callable (or ``"package.module:function"``): run as ``fn(*args, **kwargs)``
      with the default process group initialized by :func:`init_distributed` and
      destroyed afterwards; its return value is the task's result;
    * a module (``"distnorm.demo"``, or ``"-m", "pkg.mod"``) or a script
      (``"examples/detection/train.py"``, made absolute at construction): run as
      ``python -m MODULE ARGS`` / ``python SCRIPT ARGS`` would, with the variables of
      :class:`SlurmEnvironment` exported — exactly what torchrun hands its workers —
      and the process group left to the script (``init_process_group("nccl")`` or
      :func:`init_distributed`). A non-zero ``SystemExit`` becomes a ``RuntimeError``.

    ``init_process_group`` overrides that default (True for callables, False else).
    """

    def __init__(self, target: Target, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None, *,
                 init_process_group: Optional[bool] = None, backend: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.kind, self.what, self.args = _parse_target(target, args)
        self.kwargs = dict(kwargs or {})
        if self.kwargs and self.kind != "callable":
            raise ValueError(f"keyword arguments only go to callables, not to a {self.kind}")
        self.init_process_group = (self.kind == "callable") if init_process_group is None else init_process_group
        self.backend = backend
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        name = self.what if isinstance(self.what, str) else getattr(self.what, "__qualname__", repr(self.what))
        return f"DistributedTask({self.kind} {name}, args={self.args!r})"

    def __call__(self) -> Any:
        import torch.distributed as dist

        env = os.environ
        started = False
        if self.init_process_group:
            started = not (dist.is_available() and dist.is_initialized())
            init_distributed(self.backend, self.timeout_s)
        elif not all(env.get(k) for k in TORCH_VARIABLES[:4]):
            SlurmEnvironment(env).export(env)
        try:
            if self.kind == "callable":
                fn = _resolve(self.what) if isinstance(self.what, str) else self.what
                return fn(*self.args, **self.kwargs)
            return self._run_main()
        finally:
            if started and dist.is_initialized():
                dist.destroy_process_group()

    def _run_main(self) -> None:
        argv0 = self.what
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        sys.argv = [argv0] + [str(a) for a in self.args]
        try:
            if self.kind == "script":
                sys.path.insert(0, os.path.dirname(self.what))  # as `python SCRIPT` does
                runpy.run_path(self.what, run_name="__main__")
            else:
                runpy.run_module(self.what, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise RuntimeError(f"{self.what} exited with status {stop.code!r}") from None
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path


# ------------------------------------------------------------------------- submission

def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as error:
        raise ImportError(INSTALL_SUBMITIT) from error
    return submitit


def _require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise RuntimeError(INSTALL_SLURM)


def submit(target: Target, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None, *,
           nodes: int = 1, tasks_per_node: Optional[int] = None, cpus_per_task: int = 1,
           gpus_per_node: int = 0, time_min: int = 60, partition: Optional[str] = None,
           mem_gb: Optional[float] = None, job_name: str = "distnorm", folder: str = "slurm_logs/%j",
           setup: Iterable[str] = (), sbatch: Optional[Dict[str, Any]] = None,
           init_process_group: Optional[bool] = None, backend: Optional[str] = None,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Submit ``target`` to Slurm with submitit; every task runs a :class:`DistributedTask`.

    Args:
        target: a callable, ``"pkg.mod:function"``, a module (``"distnorm.demo"``) or a
            script path; see :class:`DistributedTask`.
        args, kwargs: its arguments (strings for modules and scripts: their argv).
        nodes: nodes to allocate.
        tasks_per_node: ranks per node; default ``gpus_per_node`` or 1.
        cpus_per_task: CPU cores per rank.
        gpus_per_node: GPUs per node (``--gpus-per-node``); 0 for none.
        time_min: wall-clock limit, minutes.
        partition: Slurm partition; default the cluster's.
        mem_gb: memory per node, GB; default the cluster's.
        job_name: ``--job-name``.
        folder: where submitit writes the batch file, pickles and logs (``%j`` = job id).
        setup: shell lines run before ``srun`` (``module load ...``, ``source venv/bin/activate``).
        sbatch: more ``#SBATCH`` options, e.g. ``{"account": "x", "constraint": "a100"}``.
        init_process_group, backend, timeout_s: see :class:`DistributedTask`.

    Returns:
        The ``submitit.Job``: ``job.job_id``, ``job.result()`` (rank 0's return value;
        waits and raises if the job failed), ``job.results()`` (every rank's),
        ``job.stdout()``, ``job.paths``.

    Raises:
        ImportError: submitit is not installed (the message says how to install it).
        RuntimeError: ``sbatch`` is not on PATH (the message says how to get Slurm).
    """
    task = DistributedTask(target, args, kwargs, init_process_group=init_process_group,
                           backend=backend, timeout_s=timeout_s)
    submitit = _import_submitit()
    _require_slurm()
    if tasks_per_node is None:
        tasks_per_node = gpus_per_node or 1
    for name, value in (("nodes", nodes), ("tasks_per_node", tasks_per_node), ("cpus_per_task", cpus_per_task),
                        ("time_min", time_min)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")
    params: Dict[str, Any] = dict(nodes=nodes, ntasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                                  time=time_min, job_name=job_name, setup=list(setup))
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["partition"] = partition
    if mem_gb:
        params["mem"] = f"{int(mem_gb * 1024)}MB"
    if sbatch:
        params["additional_parameters"] = dict(sbatch)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor.submit(task)


# -------------------------------------------------------------------- cluster benchmark

DEFAULT_BENCH_OUT = os.path.join("benchmarks", "results", "slurm-{job_id}")


def _read_node(node_dir: str) -> Dict[str, Any]:
    payload: Dict[str, Any] = {"dir": node_dir}
    for name, key in (("layer_cpu.json", "json"), ("layer_cpu.md", "markdown")):
        path = os.path.join(node_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                payload[key] = json.load(f) if key == "json" else f.read()
    return payload


def bench_node(out: str = DEFAULT_BENCH_OUT, args: Sequence[str] = (), script: str = "benchmarks/layer.py",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[str]:
    """The body of the cluster benchmark: one Slurm task per node.

    Runs ``python SCRIPT --out OUT/node<K>-<host> ARGS`` on this node (the script
    spawns its own ranks), then joins the other nodes over gloo and gathers their
    results; rank 0 writes ``OUT/results.md`` (one table for the whole job) and
    ``OUT/results.json``. ``{job_id}`` in ``out`` is replaced by ``SLURM_JOB_ID``.

    Returns:
        The path of ``results.md`` on rank 0, ``None`` on the other ranks.

    Raises:
        SlurmEnvironmentError: not one task per node.
        RuntimeError: the script failed on some node (after the table is written).
    """
    import torch.distributed as dist

    slurm = SlurmEnvironment()
    if slurm.local_world_size != 1:
        raise SlurmEnvironmentError(f"the benchmark runs one task per node (it spawns its own ranks), got "
                                    f"{slurm.local_world_size} on node {slurm.node_rank}: use --ntasks-per-node=1")
    out = os.path.abspath(out.format(job_id=slurm.job_id))
    host = socket.gethostname()
    node_dir = os.path.join(out, f"node{slurm.node_rank}-{host}")
    os.makedirs(node_dir, exist_ok=True)
    cmd = [sys.executable, script, "--out", node_dir, *map(str, args)]
    start = datetime.datetime.now()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(os.path.join(node_dir, "log.txt"), "w") as f:
        f.write(proc.stdout)
    payload = _read_node(node_dir)
    payload.update(node=slurm.node_rank, host=host, returncode=proc.returncode, command=cmd,
                   seconds=(datetime.datetime.now() - start).total_seconds(), log_tail=proc.stdout[-2000:])
    init_distributed("gloo", timeout_s)
    try:
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, payload)
    finally:
        dist.destroy_process_group()
    path = None
    if slurm.rank == 0:
        path = _write_bench(out, gathered, job_id=slurm.job_id)
    failed = [p["node"] for p in gathered if p["returncode"] != 0]
    if failed:
        raise RuntimeError(f"{script} failed on node(s) {failed}: see {out}/node*/log.txt")
    return path


def _bench_table(payloads: Sequence[Dict[str, Any]], job_id: Any) -> str:
    impls: List[str] = []
    for p in payloads:
        for r in (p.get("json") or {}).get("results", []):
            impls += [n for n in r.get("impls", {}) if n not in impls]
    note = ("`benchmarks/layer.py` on every node (its own gloo ranks, one thread each); fwd+bwd of one "
            "layer, median ms of the slowest rank. Per-node details: node*/layer_cpu.md.")
    lines = [f"# Per-layer benchmark, Slurm job {job_id}: {len(payloads)} node(s)", "", note, ""]
    head = ["node", "host", "W", "shape"] + [f"{n} ms" for n in impls]
    if "distnorm" in impls and "local" in impls:
        head.append("distnorm / local")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(payloads, key=lambda p: p["node"]):
        rows = (p.get("json") or {}).get("results", [])
        if p.get("returncode") != 0 or not rows:
            failed = f"| {p['node']} | {p['host']} | failed (exit {p.get('returncode')}) |"
            lines.append(failed + " |" * (len(head) - 3))
            continue
        for r in rows:
            ms = {n: v.get("fwd_bwd_ms") for n, v in r.get("impls", {}).items()}
            cells = [str(p["node"]), p["host"], str(r.get("world", "?")), "×".join(map(str, r.get("shape", [])))]
            cells += [f"{ms[n]:.2f}" if isinstance(ms.get(n), (int, float)) else "—" for n in impls]
            if head[-1] == "distnorm / local":
                a, b = ms.get("distnorm"), ms.get("local")
                cells.append(f"{a / b:.2f}" if isinstance(a, (int, float)) and b else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_bench(out: str, payloads: Sequence[Dict[str, Any]], job_id: Any) -> str:
    table = _bench_table(payloads, job_id)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"job_id": job_id, "nodes": [{k: v for k, v in p.items() if k != "markdown"}
                                               for p in payloads]}, f, indent=1)
    print(table)
    return os.path.join(out, "results.md")


def collect_bench(out: str, job_id: Any = None) -> str:
    """Rebuild ``OUT/results.md`` from the ``OUT/node*/`` folders (no Slurm needed).

    ``job_id`` defaults to the one recorded in ``OUT/results.json``, if any.
    """
    if job_id is None:
        try:
            with open(os.path.join(out, "results.json")) as f:
                job_id = json.load(f).get("job_id", "?")
        except (OSError, ValueError):
            job_id = "?"
    payloads = []
    for name in sorted(os.listdir(out)):
        match = re.fullmatch(r"node(\d+)-(.+)", name)
        if match and os.path.isdir(os.path.join(out, name)):
            p = _read_node(os.path.join(out, name))
            p.update(node=int(match.group(1)), host=match.group(2), returncode=0 if "json" in p else None)
            payloads.append(p)
    if not payloads:
        raise FileNotFoundError(f"no node*/ result folders in {out}")
    return _write_bench(out, payloads, job_id)


def submit_bench(nodes: int = 1, out: str = DEFAULT_BENCH_OUT, args: Sequence[str] = (),
                 script: str = "benchmarks/layer.py", cpus_per_task: int = 4, **slurm: Any) -> Any:
    """Submit the cluster benchmark (:func:`bench_node` on ``nodes`` nodes) with submitit.

    ``out`` and ``script`` are made absolute here (the job runs in the submission
    directory on a shared file system); ``slurm`` goes to :func:`submit`. Returns the job.
    """
    if not os.path.isfile(script):
        raise FileNotFoundError(f"benchmark script {script!r} not found: submit from the repository root")
    if slurm.pop("tasks_per_node", None) not in (None, 1):
        raise ValueError("the benchmark runs one task per node (it spawns its own ranks): "
                         "give it cores with cpus_per_task instead of tasks_per_node")
    return submit(bench_node, kwargs=dict(out=os.path.abspath(out), args=list(args),
                                          script=os.path.abspath(script)),
                  nodes=nodes, tasks_per_node=1, cpus_per_task=cpus_per_task,
                  init_process_group=False, **slurm)


# ----------------------------------------------------------------------------- the CLI

def _slurm_options(parser: argparse.ArgumentParser, cpus: int) -> None:
    g = parser.add_argument_group("Slurm resources")
    g.add_argument("-N", "--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, else 1)")
    g.add_argument("-c", "--cpus-per-task", type=int, default=cpus, help=f"CPU cores per rank (default {cpus})")
    g.add_argument("-G", "--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    g.add_argument("-t", "--time", type=int, default=60, help="time limit in minutes (default 60)")
    g.add_argument("-p", "--partition", default=None, help="partition (default: the cluster's)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB")
    g.add_argument("-J", "--job-name", default="distnorm", help="job name (default distnorm)")
    g.add_argument("--folder", default="slurm_logs/%j", help="submitit folder for logs and pickles "
                   "(%%j = job id; default slurm_logs/%%j)")
    g.add_argument("--setup", action="append", default=[], metavar="SHELL_LINE",
                   help="shell line run before srun, e.g. 'source venv/bin/activate' (repeatable)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=abc or constraint=a100 (repeatable)")
    g.add_argument("--wait", action="store_true", help="wait for the job, print rank 0's output, "
                   "exit non-zero if it failed")


def _sbatch_dict(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--sbatch expects KEY=VALUE (got {item!r})")
        out[key.lstrip("-").replace("-", "_")] = value
    return out


def _resources(a: argparse.Namespace) -> Dict[str, Any]:
    return dict(nodes=a.nodes, tasks_per_node=a.tasks_per_node, cpus_per_task=a.cpus_per_task,
                gpus_per_node=a.gpus_per_node, time_min=a.time, partition=a.partition, mem_gb=a.mem_gb,
                job_name=a.job_name, folder=a.folder, setup=a.setup, sbatch=_sbatch_dict(a.sbatch))


def _finish(job: Any, wait: bool) -> int:
    print(f"submitted Slurm job {job.job_id}; logs: {job.paths.folder}", flush=True)
    if not wait:
        return 0
    try:
        job.results()
    except Exception as error:  # submitit's FailedJobError carries the failing task's stderr
        print(f"Slurm job {job.job_id} failed: {error}", file=sys.stderr)
        return 1
    out = (job.task(0) if job.num_tasks > 1 else job).stdout()  # rank 0's
    if out:
        print(out, end="" if out.endswith("\n") else "\n")
    print(f"Slurm job {job.job_id} completed", flush=True)
    return 0


def _target_args(a: argparse.Namespace) -> tuple:
    rest = list(a.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return a.target, rest


def main(argv: Optional[List[str]] = None) -> int:
    """``distnorm slurm {submit,bench,run,bench-node,collect,env}``."""
    parser = argparse.ArgumentParser(
        prog="distnorm slurm", description="Run distnorm jobs on Slurm: submit with submitit, "
        "or start torch.distributed inside srun tasks (see slurm/*.sbatch).")
    sub = parser.add_subparsers(dest="command", required=True)
    target_help = ("SCRIPT.py, a module (distnorm.demo), or pkg.module:function (called with the "
                   "process group initialized); put -- before it if its arguments could be "
                   "mistaken for ours")

    p = sub.add_parser("submit", help="submit a script, module or function with submitit",
                       description="Submit TARGET ARGS... to Slurm (submitit): nodes × tasks-per-node "
                       "ranks, each with MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE "
                       "set from SLURM_* (never overwriting what is set). Example: distnorm slurm submit "
                       "-N 2 --tasks-per-node 4 -G 4 -p gpu --wait examples/detection/train.py --norm sync")
    _slurm_options(p, cpus=1)
    p.add_argument("--backend", default=None, help="process group backend (default nccl on GPU, else gloo)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="rendezvous/collective time-out, s")
    p.add_argument("--init", dest="init_pg", action="store_true", default=None,
                   help="initialize the process group before running a script or module "
                        "(default: only for pkg.module:function targets)")
    p.add_argument("target", help=target_help)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the target")

    p = sub.add_parser("bench", help="submit the per-layer benchmark on N nodes, one table per job",
                       description="Run benchmarks/layer.py on every node of a Slurm job (one task per "
                       "node) and write OUT/results.md with all nodes' rows. Run from the repository root.")
    _slurm_options(p, cpus=4)
    p.add_argument("--out", default=DEFAULT_BENCH_OUT, help="results folder ({job_id} is replaced; "
                   "default benchmarks/results/slurm-{job_id})")
    p.add_argument("--script", default="benchmarks/layer.py", help="benchmark script")
    p.add_argument("--quick", action="store_true", help="pass --quick to the benchmark (smoke test)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="more arguments of the benchmark script")

    p = sub.add_parser("run", help="inside an srun task: map SLURM_* and run TARGET (slurm/*.sbatch)",
                       description="Used as `srun python -m distnorm.launch.slurm run TARGET ARGS...` in a "
                       "batch script: exports the torch.distributed variables of this task (refusing to "
                       "overwrite different values) and runs TARGET like python would.")
    p.add_argument("--backend", default=None)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--init", dest="init_pg", action="store_true", default=None,
                   help="initialize the process group before running a script or module")
    p.add_argument("target", help=target_help)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("bench-node", help="inside a job, one task per node: the body of slurm/bench.sbatch")
    p.add_argument("--out", default=DEFAULT_BENCH_OUT)
    p.add_argument("--script", default="benchmarks/layer.py")
    p.add_argument("--quick", action="store_true")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("collect", help="rebuild OUT/results.md from OUT/node*/ (after a benchmark job)")
    p.add_argument("out")

    sub.add_parser("env", help="print this task's SLURM_* → torch.distributed mapping (srun ... env)")

    a = parser.parse_args(argv)
    try:
        if a.command == "submit":
            target, rest = _target_args(a)
            job = submit(target, rest, init_process_group=a.init_pg, backend=a.backend, timeout_s=a.timeout,
                         **_resources(a))
            return _finish(job, a.wait)
        if a.command == "bench":
            extra = (["--quick"] if a.quick else []) + [x for x in a.args if x != "--"]
            job = submit_bench(out=a.out, args=extra, script=a.script, **_resources(a))
            return _finish(job, a.wait)
        if a.command == "run":
            target, rest = _target_args(a)
            DistributedTask(target, rest, init_process_group=a.init_pg, backend=a.backend,
                            timeout_s=a.timeout)()
            return 0
        if a.command == "bench-node":
            extra = (["--quick"] if a.quick else []) + [x for x in a.args if x != "--"]
            bench_node(a.out, extra, a.script)
            return 0
        if a.command == "collect":
            collect_bench(a.out)
            return 0
        env = SlurmEnvironment()
        print(json.dumps(dict(env.variables(), NODE_RANK=str(env.node_rank), HOST=socket.gethostname())))
        return 0
    except (ImportError, RendezvousError, TimeoutError, FileNotFoundError, ValueError) as error:
        print(f"distnorm slurm {a.command}: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if str(error) == INSTALL_SLURM:
            print(f"distnorm slurm {a.command}: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
