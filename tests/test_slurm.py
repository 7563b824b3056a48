"""Slurm: the SLURM_* → torch.distributed mapping, the launcher, and real Slurm jobs.

* Mapping, launcher and CLI with a faked environment: no Slurm needed, milliseconds.
* ``slow``: a real local Slurm (Debian's slurmctld + slurmd + munge, installed with
  apt-get when missing), one node: a 2-task gloo job submitted with the sbatch
  templates (one task per rank; srun torchrun) and with submitit through
  :func:`distnorm.launch.slurm.submit`, plus the cluster benchmark job; and two nodes
  in network namespaces: 2 × 2 ranks with both templates and ``distnorm slurm submit``.
  Every job runs ``tests/_slurm_job.py``: each rank's running statistics must equal
  ``nn.BatchNorm2d``'s on the concatenated batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List

import pytest
import torch

from distnorm.launch import slurm
from distnorm.launch.slurm import (DistributedTask, SlurmEnvironment, SlurmEnvironmentError, expand_hostlist,
                                   expand_tasks_per_node)
from tests import _slurm_job

pytestmark = pytest.mark.slurm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(REPO, "slurm")
JOB = os.path.join(REPO, "tests", "_slurm_job.py")


def fake_env(**override: str) -> Dict[str, str]:
    """Rank 3 of a 2-node × 2-task srun step (what Slurm gives the second task of node 1)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "PATH": "/usr/bin"}
    env.update(override)
    return {k: v for k, v in env.items() if v is not None}


# --------------------------------------------------------------------------- mapping

def test_mapping_values():
    env = SlurmEnvironment(fake_env())
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.hostnames, env.job_id) == (1, 2, ["gpu07", "gpu08"], 4242)
    assert env.master_addr == "gpu07"
    assert slurm.PORT_MIN <= env.master_port < slurm.PORT_MIN + slurm.PORT_SPAN
    assert list(env.variables()) == list(slurm.TORCH_VARIABLES)
    assert env.variables() == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(env.master_port), "RANK": "3",
                               "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_mapping_same_port_on_every_task_new_port_per_step():
    ports = {SlurmEnvironment(fake_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2)))
             .master_port for r in range(4)}
    assert len(ports) == 1
    assert SlurmEnvironment(fake_env(SLURM_STEP_ID="1")).master_port != ports.pop()


def test_mapping_uneven_layout_and_step_over_job():
    # The job has 3 + 1 tasks on n1, n3; this step runs on n3 only? No: the step is the
    # whole job, 3 tasks on node 0 and 1 on node 1: rank 3 is alone on its node.
    env = SlurmEnvironment(fake_env(SLURM_STEP_NODELIST="n1,n3", SLURM_STEP_TASKS_PER_NODE="3,1",
                                    SLURM_LOCALID="0"))
    assert (env.local_rank, env.local_world_size, env.hostnames) == (0, 1, ["n1", "n3"])
    # Step variables win over the job's: a 1-node step inside a 2-node allocation.
    env = SlurmEnvironment(fake_env(SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="0",
                                    SLURM_STEP_NODELIST="gpu08", SLURM_STEP_TASKS_PER_NODE="2"))
    assert (env.world_size, env.master_addr, env.local_world_size) == (2, "gpu08", 2)
    # Job variables are used when the step's are absent.
    env = SlurmEnvironment(fake_env(SLURM_STEP_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None,
                                    SLURM_STEP_NUM_TASKS=None, SLURM_JOB_NODELIST="a,b"))
    assert (env.master_addr, env.world_size) == ("a", 4)


def test_mapping_uses_master_addr_and_port_already_set():
    env = SlurmEnvironment(fake_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"))
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_hostlist_and_tasks_per_node_syntax():
    assert expand_hostlist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand_hostlist("r[1-2]n[8-10]") == ["r1n8", "r1n9", "r1n10", "r2n8", "r2n9", "r2n10"]
    assert expand_hostlist("node-[009-011]-ib") == ["node-009-ib", "node-010-ib", "node-011-ib"]
    assert expand_hostlist("vm") == ["vm"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    for bad in ("gpu[1-", "gpu]1", "gpu[a-b]", "gpu[3-1]"):
        with pytest.raises(ValueError, match="host list"):
            expand_hostlist(bad)
    with pytest.raises(ValueError, match=r"N\(xK\)"):
        expand_tasks_per_node("2(3)")


def test_export_fills_in_and_refuses_to_clobber():
    environ = fake_env()
    env = SlurmEnvironment(environ).export(environ)
    assert {k: environ[k] for k in slurm.TORCH_VARIABLES} == env.variables()
    env.export(environ)  # the same values again: fine

    environ = fake_env(RANK="5", WORLD_SIZE="4")
    before = dict(environ)
    with pytest.raises(SlurmEnvironmentError, match=r"refusing to overwrite RANK='5' \(Slurm gives '3'\)"):
        SlurmEnvironment(environ).export(environ)
    assert environ == before  # nothing was set
    SlurmEnvironment(environ).export(environ, overwrite=True)
    assert environ["RANK"] == "3"


def test_missing_variables_are_all_named():
    with pytest.raises(SlurmEnvironmentError) as info:
        SlurmEnvironment({"SLURM_JOB_ID": "1", "SLURM_NODEID": "0"})
    text = str(info.value)
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE"):
        assert name in text
    assert "SLURM_JOB_ID" not in text.split(" are not set")[0] and "srun" in text
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("override, match", [
    (dict(SLURM_PROCID="x"), "SLURM_PROCID='x' is not an integer"),
    (dict(SLURM_PROCID="4"), "inconsistent Slurm layout"),
    (dict(SLURM_STEP_TASKS_PER_NODE="2,1"), r"tasks per node \[2, 1\] \(sum 3\) for 4 tasks"),
    (dict(SLURM_STEP_NODELIST="gpu[1-3]"), "3 hosts"),
    (dict(SLURM_STEP_ID=None), "batch script .* start the command with `srun`"),
    (dict(MASTER_PORT="http"), "MASTER_PORT='http' is not a TCP port"),
    (dict(SLURM_STEP_NODELIST="gpu[1-"), "unbalanced"),
])
def test_bad_slurm_variables(override, match):
    with pytest.raises(SlurmEnvironmentError, match=match):
        SlurmEnvironment(fake_env(**override))


# ----------------------------------------------------------------- launcher, no Slurm

def _one_task_env(port: int) -> Dict[str, str]:
    return {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "1", "MASTER_PORT": str(port)}


def _clean_env(monkeypatch, extra: Dict[str, str]) -> None:
    # Recorded first, so that what a test exports into os.environ is undone after it.
    for k in slurm.TORCH_VARIABLES:
        monkeypatch.setenv(k, "")
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in slurm.TORCH_VARIABLES:
            monkeypatch.delenv(k)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def test_init_from_env_in_a_faked_slurm_task(monkeypatch):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from distnorm.launch.local import free_port

    _clean_env(monkeypatch, _one_task_env(free_port()))
    info = slurm.init_from_env("gloo", timeout=30)
    try:
        assert (info.rank, info.world_size, dist.get_backend()) == (0, 1, "gloo")
        assert os.environ["RANK"] == "0" and os.environ["MASTER_ADDR"] == "localhost"
    finally:
        dist.destroy_process_group()


def test_init_from_env_keeps_torchrun_variables(monkeypatch):
    """Under `srun torchrun` workers hold torchrun's RANK; SLURM_PROCID counts nodes."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from distnorm.launch.local import free_port

    env = dict(fake_env(SLURM_PROCID="1"), RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    _clean_env(monkeypatch, env)
    info = slurm.init_from_env("gloo", timeout=30)
    try:
        assert (info.rank, info.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_init_from_env_without_any_launcher(monkeypatch):
    _clean_env(monkeypatch, {})
    with pytest.raises(slurm.RendezvousError, match=r"(?s)RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set.*srun"):
        slurm.init_from_env()


def test_init_distributed_is_a_deprecated_alias(monkeypatch):
    _clean_env(monkeypatch, {})
    with pytest.deprecated_call(match="init_from_env"), \
            pytest.raises(SlurmEnvironmentError, match="MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE not set .*srun"):
        slurm.init_distributed()


def test_distributed_task_runs_scripts_and_modules(monkeypatch, tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.environ['RANK'] + os.environ['MASTER_ADDR'])\n"
                      "sys.exit(int(sys.argv[2]))\n")
    _clean_env(monkeypatch, _one_task_env(29999))
    DistributedTask(str(script), [str(tmp_path / "out"), "0"])()
    assert (tmp_path / "out").read_text() == "0localhost"  # exported, not initialized
    with pytest.raises(RuntimeError, match="exited with status 3"):
        DistributedTask(str(script), [str(tmp_path / "out"), "3"])()

    assert DistributedTask("distnorm.demo").kind == "module"
    assert DistributedTask("-m", ["distnorm.demo", "--steps", "1"]).what == "distnorm.demo"
    task = DistributedTask("tests._slurm_job:bn_job", ["/tmp/x"])
    assert (task.kind, task.init_process_group) == ("callable", True)
    assert DistributedTask(str(script)).init_process_group is False
    with pytest.raises(FileNotFoundError, match="nope.py"):
        DistributedTask("nope.py")
    with pytest.raises(ValueError, match="neither a script"):
        DistributedTask("not a target")


def test_submit_without_submitit_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match=r"pip install 'distnorm\[slurm\]'"):
        slurm.submit("distnorm.demo")


def test_submit_without_slurm_says_how_to_install(monkeypatch, capsys):
    pytest.importorskip("submitit")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install slurmctld slurmd slurm-client munge"):
        slurm.submit("distnorm.demo")
    assert slurm.main(["submit", "distnorm.demo"]) == 2
    assert "sbatch` was not found" in capsys.readouterr().err


def test_cli_help_and_errors(capsys, monkeypatch):
    from distnorm.cli import main as cli_main

    for argv in (["slurm", "--help"], ["slurm", "submit", "--help"], ["slurm", "bench", "--help"]):
        with pytest.raises(SystemExit) as stop:
            cli_main(argv)
        assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--tasks-per-node" in out and "--quick" in out and "submit" in out
    _clean_env(monkeypatch, {})
    assert slurm.main(["env"]) == 2
    assert "not a Slurm task" in capsys.readouterr().err
    _clean_env(monkeypatch, _one_task_env(29999))
    assert slurm.main(["env"]) == 0
    assert '"RANK": "0"' in capsys.readouterr().out


def test_bench_table_from_node_folders(tmp_path):
    import json

    row = {"world": 2, "shape": [2, 8, 4, 4], "impls": {"local": {"fwd_bwd_ms": 1.0},
                                                       "distnorm": {"fwd_bwd_ms": 1.5}}}
    for node, host in ((0, "a"), (1, "b")):
        d = tmp_path / f"node{node}-{host}"
        d.mkdir()
        (d / "layer_cpu.json").write_text(json.dumps({"results": [row]}))
    (tmp_path / "node2-c").mkdir()  # a node whose benchmark wrote nothing
    path = slurm.collect_bench(str(tmp_path), job_id=9)
    text = open(path).read()
    assert "Slurm job 9: 3 node(s)" in text
    assert "| 0 | a | 2 | 2×8×4×4 | 1.00 | 1.50 | 1.50 |" in text and "| 1 | b |" in text
    assert "| 2 | c | failed" in text


# -------------------------------------------------------------------- real Slurm

def _master_env() -> Dict[str, str]:
    """Jobs find rank 0 by host name; where this machine's name does not resolve, say 127.0.0.1."""
    try:
        socket.gethostbyname(socket.gethostname().split(".")[0])
        return {}
    except OSError:
        return {"MASTER_ADDR": "127.0.0.1"}


def _check_ranks(out: str, world: int, label: str, log: str = "") -> List[dict]:
    files = sorted(os.listdir(out)) if os.path.isdir(out) else []
    assert files == [f"rank{r}.pt" for r in range(world)], f"{label}: rank files {files}\n{log}"
    ref = _slurm_job.reference(world)
    results = [torch.load(os.path.join(out, f), weights_only=False) for f in files]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"]) == (r, world), label
        assert res["env"]["RANK"] == str(r) and res["env"]["WORLD_SIZE"] == str(world), (label, res["env"])
        for key in ("running_mean", "running_var"):
            # Synced: every rank holds the statistics of the whole (uneven) batch.
            torch.testing.assert_close(res[key], ref[key], rtol=1e-12, atol=1e-12, msg=f"{label} rank {r} {key}")
            assert torch.equal(res[key], results[0][key]), f"{label}: ranks differ in {key}"
    return results


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return f"(no {path})"


@pytest.fixture(scope="module")
def installed():
    from tests._slurm_cluster import ensure_slurm

    return ensure_slurm()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_node_sbatch_templates_submitit_and_bench(installed, monkeypatch):
    pytest.importorskip("submitit")
    from tests._slurm_cluster import LocalSlurm

    t0 = time.monotonic()
    with LocalSlurm(nodes=1) as cluster:
        d, extra = cluster.dir, _master_env()
        jobs = {
            "tasks": cluster.sbatch(["-N1", "--ntasks-per-node=2", f"--chdir={REPO}", f"--output={d}/tasks.out",
                                     f"{TEMPLATES}/single_node_tasks.sbatch", JOB, "--out", f"{d}/tasks"], **extra),
            "torchrun": cluster.sbatch([f"--chdir={REPO}", f"--output={d}/torchrun.out",
                                        f"{TEMPLATES}/single_node_torchrun.sbatch", JOB, "--out", f"{d}/torchrun"],
                                       NPROC_PER_NODE="2"),
        }
        # submitit, through the launcher, from this process: a callable, run with the group initialized,
        # and the cluster benchmark (benchmarks/layer.py --quick) on one node.
        _clean_env(monkeypatch, dict(extra, SLURM_CONF=cluster.conf))
        # No accounting here: submitit warns at every poll that sacct failed ("Bypassing sacct error").
        monkeypatch.setattr(logging.getLogger("submitit"), "disabled", True)
        job = slurm.submit(_slurm_job.bn_job, [f"{d}/submitit"], tasks_per_node=2, time_min=5, timeout_s=120,
                           folder=f"{d}/submitit-logs/%j", sbatch={"chdir": REPO})
        bench = os.path.exists(os.path.join(REPO, "benchmarks", "layer.py"))
        if bench:
            bench_job = slurm.submit_bench(nodes=1, out=f"{d}/bench", args=["--quick"], cpus_per_task=2,
                                           script=os.path.join(REPO, "benchmarks", "layer.py"),
                                           time_min=5, folder=f"{d}/bench-logs/%j", sbatch={"chdir": REPO})
        submitted = time.monotonic()
        states = cluster.wait(list(jobs.values()), timeout=240)
        deadline = time.monotonic() + 240
        while not (job.done() and (not bench or bench_job.done())) and time.monotonic() < deadline:
            time.sleep(0.3)
        waited = time.monotonic() - submitted

        for name, job_id in jobs.items():
            assert states[job_id]["JobState"] == "COMPLETED", (name, states[job_id], _read(f"{d}/{name}.out"))
        tasks = _check_ranks(f"{d}/tasks", 2, "sbatch one task per rank", _read(f"{d}/tasks.out"))
        assert [r["env"]["SLURM_PROCID"] for r in tasks] == ["0", "1"]
        assert {r["env"]["LOCAL_WORLD_SIZE"] for r in tasks} == {"2"}
        torchrun = _check_ranks(f"{d}/torchrun", 2, "sbatch srun torchrun", _read(f"{d}/torchrun.out"))
        assert [r["env"]["SLURM_PROCID"] for r in torchrun] == ["0", "0"]  # one Slurm task; torchrun's ranks

        assert job.done(), f"submitit job {job.job_id} not done after 240 s"
        results = job.results()  # raises with the failing task's stderr
        assert [r["rank"] for r in results] == [0, 1]
        sub = _check_ranks(f"{d}/submitit", 2, "submitit")
        assert {r["env"]["MASTER_ADDR"] for r in sub} == {extra.get("MASTER_ADDR", cluster.hostnames[0])}

        if bench:
            assert bench_job.done(), f"benchmark job {bench_job.job_id} not done after 240 s"
            assert bench_job.result() == f"{d}/bench/results.md"
            table = _read(f"{d}/bench/results.md")
            assert f"Per-layer benchmark, Slurm job {bench_job.job_id}: 1 node(s)" in table, table
            assert f"| 0 | {socket.gethostname()} | 2 | 2×" in table, table
    print(f"\none-node Slurm: install {installed:.1f} s, start {cluster.timings['start_s']:.1f} s, "
          f"{len(jobs) + 1 + bench} jobs {waited:.1f} s, total {time.monotonic() - t0:.1f} s")


def _namespaces_possible() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"needs `{tool}`"
    probe = f"dnprobe{os.getpid() % 100000}"
    ok = subprocess.run(["ip", "netns", "add", probe], check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    subprocess.run(["ip", "netns", "del", probe], check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return "" if ok.returncode == 0 else f"cannot create network namespaces: {ok.stdout.strip()}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_in_namespaces(installed):
    pytest.importorskip("submitit")
    reason = _namespaces_possible()
    if reason:
        pytest.skip(reason)
    from tests._slurm_cluster import LocalSlurm

    t0 = time.monotonic()
    with LocalSlurm(nodes=2) as cluster:
        d = cluster.dir
        jobs = {
            "tasks": cluster.sbatch(["-N2", "--ntasks-per-node=2", f"--chdir={REPO}", f"--output={d}/tasks.out",
                                     f"{TEMPLATES}/multi_node_tasks.sbatch", JOB, "--out", f"{d}/tasks"]),
            "torchrun": cluster.sbatch(["-N2", f"--chdir={REPO}", f"--output={d}/torchrun.out",
                                        f"{TEMPLATES}/multi_node_torchrun.sbatch", JOB, "--out", f"{d}/torchrun"],
                                       NPROC_PER_NODE="2"),
        }
        bench = os.path.exists(os.path.join(REPO, "benchmarks", "layer.py"))
        if bench:  # the cluster benchmark over both nodes: one table for the job
            jobs["bench"] = cluster.sbatch(["-N2", "--cpus-per-task=2", f"--chdir={REPO}",
                                            f"--output={d}/bench.out", f"{TEMPLATES}/bench.sbatch", "--quick"],
                                           OUT=f"{d}/bench")
        # `distnorm slurm submit --wait`, run "on" nodeA (slurmctld listens on its veth address).
        cli = subprocess.Popen(cluster.wrap([sys.executable, "-m", "distnorm.launch.slurm", "submit", "-N", "2",
                                             "--tasks-per-node", "2", "--time", "5", "--timeout", "120",
                                             "--folder", f"{d}/submitit-logs/%j", "--sbatch", f"chdir={REPO}",
                                             "--wait", JOB, "--out", f"{d}/submitit"]),
                               env=cluster.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        try:
            states = cluster.wait(list(jobs.values()), timeout=240)
            cli_out, _ = cli.communicate(timeout=240)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        waited = time.monotonic() - t0

        for name, job_id in jobs.items():
            assert states[job_id]["JobState"] == "COMPLETED", (name, states[job_id], _read(f"{d}/{name}.out"))
        assert cli.returncode == 0 and "completed" in cli_out, cli_out
        for name in ("tasks", "torchrun", "submitit"):
            res = _check_ranks(f"{d}/{name}", 4, f"two nodes, {name}", _read(f"{d}/{name}.out"))
            assert [r["host"] for r in res] == ["nodeA", "nodeA", "nodeB", "nodeB"], name
            assert {r["env"]["MASTER_ADDR"] for r in res} == {"nodeA"} or name == "torchrun", name
            assert {r["env"]["LOCAL_WORLD_SIZE"] for r in res} == {"2"}, name
        if bench:
            table = _read(f"{d}/bench/results.md")
            assert f"Slurm job {jobs['bench']}: 2 node(s)" in table, table + _read(f"{d}/bench.out")
            assert "| 0 | nodeA | 2 | 2×" in table and "| 1 | nodeB | 2 | 2×" in table, table
    print(f"\ntwo-node Slurm: start {cluster.timings['start_s']:.1f} s, {len(jobs) + 1} jobs + cleanup "
          f"{time.monotonic() - t0:.1f} s (jobs {waited:.1f} s)")
