"""The detection job on two "hosts": two network namespaces joined by a veth pair,
each with its own hostname and /etc/hosts, one torchrun per host (through
launchers/torchrun_multi_node.sh), 2 nodes × 2 ranks.

The namespaces, the veth pair and the addresses are created by the test, under names
unique to the run, and deleted afterwards whatever happens. The test skips only when
namespaces cannot be created (not root, no ``ip`` / ``nsenter`` / ``unshare``, or
the kernel refuses).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests._detection import ROOT, TINY, load_train


SUBNET = "10.213.7"  # only ever assigned inside the namespaces this test creates
# nsenter (not `ip netns exec`) + private UTS and mount namespaces: the host gets its own
# hostname and /etc/hosts (bind-mounted; the machine's own file is never touched).
_ON_HOST = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


@dataclass
class Host:
    netns: str
    hostname: str
    address: str
    hosts_file: Path

    def command(self, argv: List[str]) -> List[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount",
                "sh", "-c", _ON_HOST, str(self.hosts_file), self.hostname, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts(tmp_path):
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"network namespaces need {', '.join(missing)} (iproute2 / util-linux)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (creating them and bind-mounting /etc/hosts)")
    tag = secrets.token_hex(3)  # unique per run: other jobs may use the same recipe at once
    names = {"A": f"dn{tag}a", "B": f"dn{tag}b"}
    hosts_file = tmp_path / "hosts"
    hosts = {n: Host(names[n], f"node{n.lower()}-{tag}", f"{SUBNET}.{i + 1}", hosts_file)
             for i, n in enumerate("AB")}
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
        f"{h.address} {h.hostname}\n" for h in hosts.values()))
    created: List[str] = []
    try:
        result = _ip("netns", "add", names["A"])
        if result.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {result.stderr.strip()}")
        created.append(names["A"])
        steps = [("netns", "add", names["B"]),
                 ("link", "add", names["A"], "type", "veth", "peer", "name", names["B"])]
        for n in "AB":
            steps.append(("link", "set", names[n], "netns", names[n]))
        for n, h in hosts.items():
            steps += [("-n", names[n], "addr", "add", f"{h.address}/24", "dev", names[n]),
                      ("-n", names[n], "link", "set", names[n], "up"),
                      ("-n", names[n], "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if step[:2] == ("netns", "add"):
                created.append(step[2])
            if result.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)}: {result.stderr.strip()}")
        yield hosts
    finally:
        for netns in created:
            _ip("netns", "del", netns)  # removes the veth ends inside it too
        _ip("link", "del", names["A"])  # in case it never left the root namespace
        leftover = _ip("netns", "list").stdout
        assert not any(n in leftover for n in names.values()), leftover


def _stop(proc: subprocess.Popen) -> None:
    """End a host's process group (nsenter → torchrun → its workers), started by us."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.mark.slow
def test_two_hosts_two_ranks_each_see_the_same_synced_statistics(two_hosts, tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("mlxtend")
    stats, out = tmp_path / "stats", tmp_path / "out"
    first = two_hosts["A"]
    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"{first.hostname}:29500",
               RDZV_ID=f"job-{first.netns}", JOIN_TIMEOUT="120",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    job = [str(ROOT / "launchers" / "torchrun_multi_node.sh"), *TINY, "--norm", "sync",
           "--steps", "1", "--batch-size", "2", "--val-images", "0", "--checkpoint-every", "0",
           "--timeout", "120", "--out", str(out), "--stats-dir", str(stats)]
    procs: Dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for n, host in two_hosts.items():
            logs[n] = open(tmp_path / f"host{n}.log", "w+")
            procs[n] = subprocess.Popen(host.command(job), env=env, stdout=logs[n],
                                        stderr=subprocess.STDOUT, start_new_session=True)
        codes = {n: p.wait(timeout=300) for n, p in procs.items()}
    finally:
        for p in procs.values():
            _stop(p)
        text = {}
        for n, f in logs.items():
            f.seek(0)
            text[n] = f.read()
            f.close()
    assert codes == {"A": 0, "B": 0}, "\n".join(f"--- host {n}:\n{t[-3000:]}" for n, t in text.items())

    ranks = [torch.load(stats / f"rank{r}.pt") for r in range(4)]
    assert all(r["world"] == 4 for r in ranks)
    names = list(ranks[0]["running_mean"])
    assert len(names) == 70  # every BatchNorm of ssdlite, converted
    for key in ("running_mean", "running_var"):
        for name in names:
            for r in ranks[1:]:
                assert torch.equal(r[key][name], ranks[0][key][name]), (key, name)

    # ... and they are nn.BatchNorm2d's statistics of the 4 ranks' concatenated batch.
    train = load_train()
    indices = [i for r in ranks for i in r["batches"][0]]
    assert sorted(indices) == sorted(train.global_batch(0, 16, 4, 2, 0))
    dataset = train.DigitDetection(16, 64, "train", 0, "mnist", 2)
    images, targets = train.collate([dataset[i] for i in indices])
    reference = train.build_model("ssdlite", 64, 0)
    reference.train()
    torch.set_num_threads(1)
    reference(images, targets)
    modules = dict(reference.named_modules())
    for name in names:
        bn = modules[name]
        assert isinstance(bn, torch.nn.BatchNorm2d)
        torch.testing.assert_close(ranks[0]["running_mean"][name], bn.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[0]["running_var"][name], bn.running_var, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_node_that_never_joins_times_out(tmp_path):
    """One node of a 2-node job started alone: torchrun gives up after JOIN_TIMEOUT with
    RendezvousTimeoutError instead of waiting forever."""
    from distnorm.launch.local import free_port

    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
               RDZV_ID=f"lonely-{secrets.token_hex(3)}", JOIN_TIMEOUT="3",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([str(ROOT / "launchers" / "torchrun_multi_node.sh"), *TINY, "--steps", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "RendezvousTimeoutError" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "results.json").exists()


def test_multi_node_launcher_names_missing_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT", "RDZV_ID")}
    proc = subprocess.run([str(ROOT / "launchers" / "torchrun_multi_node.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "set NNODES RDZV_ENDPOINT RDZV_ID (the same on every node)" in proc.stderr


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_launcher_scripts_parse(script):
    path = ROOT / "launchers" / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


# -- distnorm.launch.local.spawn: results by rank, and every exit judged ---------------
def _returns_then_aborts_at_exit(rank: int, world: int, value: int) -> int:
    import atexit

    atexit.register(os.abort)  # as a C++ std::terminate at interpreter shutdown would
    return value + rank


def test_spawn_delivers_the_result_and_fails_an_abort_at_exit():
    from distnorm.launch.local import SpawnError, spawn

    with pytest.raises(SpawnError, match=r"every rank returned.*rank 0 \(pid \d+\): killed by SIGABRT"):
        spawn(_returns_then_aborts_at_exit, 1, 41, timeout=120)
