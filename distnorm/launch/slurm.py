"""``distnorm slurm``: run distnorm jobs on Slurm, from a shell or from Python.

The pieces live in their own modules, and are re-exported here under the names
they always had:

* :mod:`distnorm.launch.env` — :class:`SlurmEnvironment` (``SLURM_*`` → the
  variables of ``torch.distributed``) and :func:`init_from_env`, which initializes
  the process group under torchrun, in a Slurm task or in any process whose
  variables are set (``init_distributed`` is its deprecated former name);
* :mod:`distnorm.launch.hostlist` — :func:`expand_hostlist`, :func:`expand_tasks_per_node`;
* :mod:`distnorm.launch.submit` — :class:`DistributedTask`, :func:`submit` (submitit);
* :mod:`distnorm.launch.cluster_bench` — :func:`bench_node`, :func:`collect_bench`,
  :func:`submit_bench`: the per-layer benchmark on N nodes, one table per job.

This module holds the command line (``distnorm slurm ...`` or
``python -m distnorm.launch.slurm``)::

    distnorm slurm submit --nodes 2 --tasks-per-node 4 --gpus-per-node 4 \\
        --partition gpu --time 120 --wait examples/detection/train.py --norm sync
    distnorm slurm bench --nodes 4 --quick --wait
    srun python -m distnorm.launch.slurm run train.py ...   # what slurm/*.sbatch do
    srun python -m distnorm.launch.slurm env                # print the mapping per task

submitit is the optional extra ``slurm`` (``pip install 'distnorm[slurm]'``); it is
imported only when a job is submitted. Everything that runs *inside* a job needs only torch.
"""

from __future__ import annotations

import argparse
import json
import shutil  # noqa: F401 - tests patch slurm.shutil.which (the module submit.py uses)
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence

from .cluster_bench import DEFAULT_BENCH_OUT, bench_node, collect_bench, submit_bench
from .env import (DEFAULT_TIMEOUT_S, PORT_MIN, PORT_SPAN, TORCH_VARIABLES, RendezvousError, SlurmEnvironment,
                  SlurmEnvironmentError, init_distributed, init_from_env)
from .hostlist import expand_hostlist, expand_tasks_per_node
from .submit import INSTALL_SLURM, INSTALL_SUBMITIT, DistributedTask, Target, submit

__all__ = [
    "DistributedTask",
    "SlurmEnvironment",
    "SlurmEnvironmentError",
    "bench_node",
    "collect_bench",
    "expand_hostlist",
    "expand_tasks_per_node",
    "init_distributed",
    "init_from_env",
    "main",
    "submit",
    "submit_bench",
]

# Re-exported for code that reads them from here.
_REEXPORTED = (DEFAULT_BENCH_OUT, DEFAULT_TIMEOUT_S, INSTALL_SUBMITIT, PORT_MIN, PORT_SPAN, TORCH_VARIABLES,
               Target)


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
                       "node) and write OUT/results.md with all nodes' rows.")
    _slurm_options(p, cpus=4)
    p.add_argument("--out", default=DEFAULT_BENCH_OUT, help="results folder ({job_id} is replaced; "
                   "default ./distnorm-bench-results/slurm-{job_id})")
    p.add_argument("--script", default=None, help="benchmark script (default: this installation's benchmarks/layer.py)")
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
    p.add_argument("--script", default=None)
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
