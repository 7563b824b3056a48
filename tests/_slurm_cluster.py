"""A real Slurm cluster for the tests: Debian's slurmctld + slurmd + munge, started
in a temporary directory and stopped by the PIDs in their pid files.

* :func:`ensure_slurm` installs the packages with apt-get when they are missing
  (skipping the test, with the reason, only when that is impossible).
* :class:`LocalSlurm` runs one node on this machine, or two "hosts" in network
  namespaces joined by a veth pair (each with its own hostname and a private
  /etc/hosts bind-mounted in its own mount namespace; the machine's own stay
  untouched). Its munged has its own socket in the temporary directory and the
  Slurm daemons listen on ports picked free at start, so other clusters on the
  machine (another test run, a system munged) are not disturbed.

Used as a context manager: whatever happens inside, ``__exit__`` cancels the jobs,
stops slurmd(s), slurmctld and munged by their pid files, kills leftover job
processes of this cluster by PID, deletes the namespaces and the directory.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged"]
APT = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
       "-o DPkg::Lock::Timeout=300 --no-install-recommends " + " ".join(PACKAGES))
TORCH_AND_SLURM = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                   "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.path.exists(p)), None)


def ensure_slurm() -> float:
    """Install Slurm and munge from Debian if missing; returns the seconds it took."""
    if all(_which(b) for b in BINARIES):
        return 0.0
    reason = None
    if os.geteuid() != 0:
        reason = "not root"
    elif not shutil.which("apt-get"):
        reason = "no apt-get on this machine"
    if reason:
        pytest.skip(f"Slurm is not installed and cannot be installed here ({reason}): "
                    f"as root on Debian/Ubuntu run `{APT}`")
    start = time.monotonic()
    proc = subprocess.run(APT, shell=True, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    if proc.returncode != 0 or not all(_which(b) for b in BINARIES):
        pytest.skip(f"apt-get could not install Slurm (no network or no Debian archive?): "
                    f"{proc.stdout[-1500:]}")
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # zombies count as gone
    except OSError:
        return False


def _stop_pid(pid: Optional[int], grace: float = 5.0) -> None:
    if pid is None or pid <= 1 or not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalSlurm:
    """A one-node (``nodes=1``) or two-node-in-namespaces (``nodes=2``) Slurm cluster."""

    def __init__(self, nodes: int = 1, cpus_per_node: int = 8) -> None:
        if nodes not in (1, 2):
            raise ValueError("nodes must be 1 or 2")
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.dir = tempfile.mkdtemp(prefix="distnorm-slurm-")
        os.chmod(self.dir, 0o755)  # munged (user munge) must reach its socket below
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.netns: List[str] = []
        self.job_ids: List[str] = []
        tag = f"{os.getpid() % 100000}{random.randint(0, 99)}"
        self._ns_names = [f"dnA{tag}", f"dnB{tag}"]
        self._veth = [f"dvA{tag}", f"dvB{tag}"]
        self.hostnames = ["nodeA", "nodeB"] if nodes == 2 else [socket.gethostname().split(".")[0]]
        self.addrs = ["10.213.7.1", "10.213.7.2"] if nodes == 2 else ["127.0.0.1"]
        self.timings: Dict[str, float] = {}

    # ------------------------------------------------------------------ environment
    def env(self, **extra: str) -> Dict[str, str]:
        """This process's environment without launcher variables, pointed at this cluster."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in TORCH_AND_SLURM}
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def wrap(self, cmd: Sequence[str], host: int = 0) -> List[str]:
        """``cmd`` as run "on" node ``host`` (inside its namespaces when nodes=2)."""
        if self.nodes == 1:
            return list(cmd)
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self._ns_names[host]}", "unshare", "--uts", "--mount",
                "sh", "-c", script, os.path.join(self.dir, "hosts"), self.hostnames[host], *cmd]

    def run(self, cmd: Sequence[str], host: int = 0, timeout: float = 60, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.wrap(cmd, host), env=self.env(**env), check=False, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{self.logs()}")
        return proc

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out.append(f"--- {name} (tail) ---\n" + "".join(f.readlines()[-15:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "LocalSlurm":
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        start = time.monotonic()
        d = self.dir
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(d, sub))
        if self.nodes == 2:
            self._make_namespaces()
        munge = os.path.join(d, "munge")
        os.makedirs(munge)
        shutil.chown(munge, "munge", "munge")
        os.chmod(munge, 0o755)
        self.munge_socket = os.path.join(munge, "munge.socket")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.munge_socket}",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/munged.seed"], check=True, timeout=30)
        self._write_conf()
        self.run([_which("slurmctld"), "-f", self.conf], host=0)
        for i in range(self.nodes):
            cmd = [_which("slurmd"), "-f", self.conf] + (["-N", self.hostnames[i]] if self.nodes == 2 else [])
            self.run(cmd, host=i)
        self._wait_idle()
        self.timings["start_s"] = time.monotonic() - start

    def _make_namespaces(self) -> None:
        a, b = self._ns_names
        va, vb = self._veth
        cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b]]
        self.netns = [a, b]
        cmds += [["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
                 ["ip", "link", "set", va, "netns", a], ["ip", "link", "set", vb, "netns", b],
                 ["ip", "-n", a, "addr", "add", f"{self.addrs[0]}/24", "dev", va],
                 ["ip", "-n", b, "addr", "add", f"{self.addrs[1]}/24", "dev", vb]]
        for ns, veth in ((a, va), (b, vb)):
            cmds += [["ip", "-n", ns, "link", "set", veth, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for cmd in cmds:
            subprocess.run(cmd, check=True, timeout=30, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        with open(os.path.join(self.dir, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for ip, h in zip(self.addrs, self.hostnames)))

    def _write_conf(self) -> None:
        d, per_node = self.dir, "-%n" if self.nodes == 2 else ""
        ctl_port, d_port = (6817, 6818) if self.nodes == 2 else (_free_port(), _free_port())
        lines = [
            "ClusterName=ci",
            f"SlurmctldHost={self.hostnames[0]}({self.addrs[0]})",
            f"SlurmctldPort={ctl_port}", f"SlurmdPort={d_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/slurmd{per_node}",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd{per_node}.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd{per_node}.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        ]
        for h, ip in zip(self.hostnames, self.addrs):
            lines.append(f"NodeName={h} NodeAddr={ip} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.hostnames)} Default=YES MaxTime=INFINITE "
                     "State=UP OverSubscribe=YES")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {out!r}\n{self.logs()}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        try:
            self._cancel_jobs()
        finally:
            pidfiles = [f"slurmd-{h}.pid" for h in self.hostnames] + ["slurmd.pid", "slurmctld.pid",
                                                                       "munge/munged.pid"]
            for name in pidfiles:
                _stop_pid(_read_pid(os.path.join(self.dir, name)))
            self._kill_leftovers()
            for ns in self.netns:
                subprocess.run(["ip", "netns", "del", ns], check=False, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _cancel_jobs(self) -> None:
        if not os.path.exists(os.path.join(self.dir, "slurmctld.pid")):
            return
        try:
            out = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
            if out:
                self.run(["scancel", *out], check=False, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False,
                                                                timeout=10).stdout.strip():
                    time.sleep(0.2)
        except (subprocess.SubprocessError, OSError):
            pass

    def _kill_leftovers(self) -> None:
        """Job processes (slurmstepd, ranks) of this cluster that outlived its daemons."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            if pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        _stop_pid(pid, grace=2.0)
            except OSError:
                continue

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: Sequence[str], host: int = 0, cwd: Optional[str] = None, **env: str) -> str:
        proc = subprocess.run(self.wrap(["sbatch", "--parsable", *args], host), env=self.env(**env), check=False,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed:\n{proc.stdout}\n{self.logs()}")
        job_id = proc.stdout.strip().split(";")[0].splitlines()[-1]
        self.job_ids.append(job_id)
        return job_id

    def state(self, job_id: str, host: int = 0) -> Dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", job_id], host=host, check=False, timeout=10).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_ids: Sequence[str], timeout: float = 180.0, host: int = 0) -> Dict[str, Dict[str, str]]:
        """Poll ``scontrol`` (no accounting here) until every job has ended; their states."""
        deadline = time.monotonic() + timeout
        done: Dict[str, Dict[str, str]] = {}
        while len(done) < len(job_ids):
            for j in job_ids:
                if j not in done:
                    info = self.state(j, host)
                    if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                        done[j] = info
            if len(done) < len(job_ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Slurm jobs {sorted(set(job_ids) - set(done))} still running after "
                                       f"{timeout} s\n{self.logs()}")
                time.sleep(0.3)
        return done
