"""Submitting distnorm jobs to Slurm with submitit, and the body every task runs.

* :class:`DistributedTask` is a picklable job body: it maps the task's ``SLURM_*``
  variables to those of ``torch.distributed`` (:class:`~distnorm.launch.env.SlurmEnvironment`)
  and runs a callable, a module or a script, like torchrun hands its workers.
* :func:`submit` sends such a target with its arguments to Slurm through submitit:
  ``nodes`` × ``tasks_per_node`` tasks.

submitit is the optional extra ``slurm`` (``pip install 'distnorm[slurm]'``); it is
imported only by :func:`submit`. Everything that runs *inside* a job needs only torch.
"""

from __future__ import annotations

import importlib
import os
import re
import runpy
import shutil
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

from .env import DEFAULT_TIMEOUT_S, TORCH_VARIABLES, SlurmEnvironment, init_from_env

__all__ = ["INSTALL_SLURM", "INSTALL_SUBMITIT", "DistributedTask", "Target", "submit"]

INSTALL_SUBMITIT = ("submitting to Slurm needs submitit, the optional extra `slurm` of distnorm: "
                    "pip install 'distnorm[slurm]'  (or: pip install submitit)")
INSTALL_SLURM = ("Slurm's `sbatch` was not found on PATH. Submit from a login node of a Slurm "
                 "cluster (where `sbatch --version` works). For a one-machine Slurm to try it "
                 "(Debian/Ubuntu): apt-get install slurmctld slurmd slurm-client munge, then start "
                 "munged, slurmctld and slurmd with a one-node slurm.conf (see the README, section "
                 "'Slurm', and tests/test_slurm.py, which does exactly that).")


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
      with the default process group initialized by :func:`~distnorm.launch.env.init_from_env` and
      destroyed afterwards; its return value is the task's result;
    * a module (``"distnorm.demo"``, or ``"-m", "pkg.mod"``) or a script
      (``"examples/detection/train.py"``, made absolute at construction): run as
      ``python -m MODULE ARGS`` / ``python SCRIPT ARGS`` would, with the variables of
      :class:`SlurmEnvironment` exported — exactly what torchrun hands its workers —
      and the process group left to the script (``init_process_group("nccl")`` or
      :func:`~distnorm.launch.env.init_from_env`). A non-zero ``SystemExit`` becomes a ``RuntimeError``.

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
            init_from_env(self.backend, timeout=self.timeout_s)
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
