"""The cluster benchmark: ``benchmarks/layer.py`` on every node of a Slurm job, and
one results table for the whole job.

:func:`bench_node` is the body of one task per node (``slurm/bench.sbatch`` or
:func:`submit_bench`); :func:`collect_bench` rebuilds the table from the node
folders afterwards, without Slurm. The table is also written to the job's standard
output, which ``distnorm slurm bench --wait`` shows.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

from .env import DEFAULT_TIMEOUT_S, SlurmEnvironment, SlurmEnvironmentError, init_from_env
from .submit import submit

__all__ = ["DEFAULT_BENCH_OUT", "bench_node", "collect_bench", "default_script", "submit_bench"]


def default_script() -> str:
    """The per-layer benchmark script of this installation (``benchmarks/layer.py``).

    Raises:
        FileNotFoundError: this installation ships no benchmark scripts.
    """
    from .._scripts import script_path

    path = script_path("bench", "layer.py")
    if path is None:
        raise FileNotFoundError("the per-layer benchmark (benchmarks/layer.py) is not in this installation: "
                                "install distnorm from a checkout, or pass script=")
    return str(path)


# Under the directory the job is submitted from, never the checkout's committed results.
DEFAULT_BENCH_OUT = os.path.join("distnorm-bench-results", "slurm-{job_id}")


def _read_node(node_dir: str) -> Dict[str, Any]:
    payload: Dict[str, Any] = {"dir": node_dir}
    for name, key in (("layer_cpu.json", "json"), ("layer_cpu.md", "markdown")):
        path = os.path.join(node_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                payload[key] = json.load(f) if key == "json" else f.read()
    return payload


def bench_node(out: str = DEFAULT_BENCH_OUT, args: Sequence[str] = (), script: Optional[str] = None,
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

    script = script or default_script()
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
    init_from_env("gloo", timeout=timeout_s)
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
                 script: Optional[str] = None, cpus_per_task: int = 4, **slurm: Any) -> Any:
    """Submit the cluster benchmark (:func:`bench_node` on ``nodes`` nodes) with submitit.

    ``out`` and ``script`` are made absolute here (the job runs in the submission
    directory on a shared file system); ``slurm`` goes to :func:`submit`. Returns the job.
    """
    script = script or default_script()
    if not os.path.isfile(script):
        raise FileNotFoundError(f"benchmark script {script!r} not found")
    if slurm.pop("tasks_per_node", None) not in (None, 1):
        raise ValueError("the benchmark runs one task per node (it spawns its own ranks): "
                         "give it cores with cpus_per_task instead of tasks_per_node")
    return submit(bench_node, kwargs=dict(out=os.path.abspath(out), args=list(args),
                                          script=os.path.abspath(script)),
                  nodes=nodes, tasks_per_node=1, cpus_per_task=cpus_per_task,
                  init_process_group=False, **slurm)
