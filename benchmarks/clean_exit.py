"""Does a finished 2-rank job exit cleanly? Many runs of a small script, with and without distnorm.

A job whose ranks all finished can still be reported FAILED: after
``destroy_process_group`` returned, a rank dies at interpreter exit with
``terminate called without an active exception`` and SIGABRT (exit code -6; torchrun
then reports the job failed). It happens when a gloo process group outlives
``destroy_process_group`` — something still references it — and one of its worker
threads releases the last reference to a finished collective's tensors while the
interpreter shuts down: that needs the GIL, and a finalizing interpreter ends the
thread inside a C++ destructor. It is a race, rare per run, so it is counted here
over many runs (issue 17, item 7).

Each run starts 2 ranks of this file (``--worker MODE``) as ``torchrun`` would start a
script (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; gloo, CPU, one
thread each) and waits for both. The script, for ``MODE``:

* ``distnorm``: ``import distnorm`` first (as scripts do); a float64 parity step of a
  ``SyncBatchNorm`` against ``nn.BatchNorm2d`` on the concatenated batch (checked);
  a small conv net converted with ``distnorm.convert_model`` trained 3 SGD steps
  under DDP (float64; DDP imports torch._dynamo on first use); a last training-mode
  forward, so that a synced layer's collective is the job's last; then
  ``destroy_process_group`` and a normal exit.
* ``torch``: the same script without distnorm (``nn.BatchNorm2d``, no parity step).

A run is *clean* when both ranks exit 0 with no ``terminate called`` line; an
*abort* is a rank killed by SIGABRT or printing ``terminate called``; an *error* any
other non-zero exit; a *hang* a run past ``--timeout`` (its ranks are killed). The
modes alternate run by run, so that both see the same machine load.

Usage::

    python benchmarks/clean_exit.py                  # 50 runs per mode, writes results/clean_exit.md
    python benchmarks/clean_exit.py --runs 10 --modes distnorm
    PYTHONPATH=/other/checkout python benchmarks/clean_exit.py ...   # another distnorm
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("distnorm", "torch")
WORLD = 2


# -- one rank ----------------------------------------------------------------------------
def worker(mode: str) -> None:
    """One rank of one run (started with the launcher's variables set)."""
    import torch

    if mode == "distnorm":
        import distnorm  # first, as a script does: before init_process_group
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)

    if mode == "distnorm":
        # Parity: 8 samples per rank of 16×32×32 (above the compiled kernels' size
        # threshold, so their checks run; float64 never compiles).
        batch = torch.randn(8 * world, 16, 32, 32, dtype=torch.float64, generator=gen)
        shard = batch[rank * 8:(rank + 1) * 8].clone().requires_grad_()
        synced = distnorm.SyncBatchNorm(16).double()
        y = synced(shard)
        y.square().sum().backward()
        reference = nn.BatchNorm2d(16).double()(batch)[rank * 8:(rank + 1) * 8]
        if not torch.allclose(y, reference, rtol=1e-9, atol=1e-9):
            raise SystemExit(f"rank {rank}: SyncBatchNorm differs from BatchNorm2d on the "
                             f"whole batch by {(y - reference).abs().max().item():.3g}")

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).double()
    if mode == "distnorm":
        model = distnorm.convert_model(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=gen)
        target = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), target).backward()
        opt.step()
    with torch.no_grad():  # the job's last collective: a synced forward (distnorm)
        model(x)
    dist.destroy_process_group()


# -- the runs ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _describe(code: Optional[int]) -> str:
    if code is None:
        return "hung (killed)"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def run_once(mode: str, timeout: float) -> Dict[str, Any]:
    """One 2-rank run; its outcome, exit codes and the ranks' stderr tails."""
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), PYTHONUNBUFFERED="1")
    # This checkout's distnorm, unless PYTHONPATH names another one.
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [base.get("PYTHONPATH"), ROOT]))
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              errors="replace")
             for r in range(WORLD)]
    stderr: List[str] = []
    codes: List[Optional[int]] = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(timeout - (time.monotonic() - start), 1.0))
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            codes.append(None)
        stderr.append(err)
    wall = time.monotonic() - start
    terminate = sum(err.count("terminate called") for err in stderr)
    if any(c is None for c in codes):
        outcome = "hang"
    elif terminate or any(c == -signal.SIGABRT for c in codes):
        outcome = "abort"
    elif any(c != 0 for c in codes):
        outcome = "error"
    else:
        outcome = "clean"
    return {"mode": mode, "outcome": outcome, "codes": codes, "terminate_lines": terminate,
            "wall_s": round(wall, 2),
            "stderr_tails": [] if outcome == "clean" else [e[-1500:] for e in stderr]}


def summarize(runs: List[Dict[str, Any]], mode: str) -> Dict[str, Any]:
    mine = [r for r in runs if r["mode"] == mode]
    count = {k: sum(r["outcome"] == k for r in mine) for k in ("clean", "abort", "error", "hang")}
    return {"mode": mode, "runs": len(mine), **count,
            "nonzero_runs": sum(any(c != 0 for c in r["codes"]) for r in mine),
            "nonzero_ranks": sum(c != 0 for r in mine for c in r["codes"]),
            "terminate_lines": sum(r["terminate_lines"] for r in mine),
            "median_wall_s": round(statistics.median(r["wall_s"] for r in mine), 1) if mine else None}


def _git() -> Dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_head": git("rev-parse", "HEAD"),
            "distnorm_uncommitted_changes": bool(git("status", "--porcelain", "--", "distnorm"))}


def report(meta: Dict[str, Any], summary: List[Dict[str, Any]], runs: List[Dict[str, Any]]) -> str:
    lines = ["# Clean exit: 2-rank runs that finish, counted over many runs", "",
             "Generated by `benchmarks/clean_exit.py` (its docstring says what each rank does). "
             "A run is *clean* when both ranks exit 0 and print no `terminate called`; an "
             "*abort* is a rank killed by SIGABRT or printing `terminate called` (after "
             "`destroy_process_group` returned: the job's work was done); an *error* any other "
             "non-zero exit; a *hang* a run past the timeout.", ""]
    head = meta.get("git_head", "")
    dirty = " + uncommitted changes" if meta.get("distnorm_uncommitted_changes") else ""
    lines += [f"distnorm at commit {head[:10]}{dirty}; torch {meta['torch']}, Python "
              f"{meta['python']}, {meta['cpu_count']} cores (load average at start "
              f"{meta['loadavg_at_start'][0]:.1f}); {meta['date']}; {meta['runs_per_mode']} runs "
              f"per mode, modes alternating; timeout {meta['timeout_s']:g} s per run.", ""]
    if meta.get("pythonpath"):
        lines += [f"PYTHONPATH={meta['pythonpath']}", ""]
    lines += ["| script | runs | clean | aborts | errors | hangs | ranks exiting non-zero "
              "| `terminate called` lines | median s / run |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        name = "with distnorm" if s["mode"] == "distnorm" else "without distnorm (torch only)"
        lines.append(f"| {name} | {s['runs']} | {s['clean']} | {s['abort']} | {s['error']} | "
                     f"{s['hang']} | {s['nonzero_ranks']} | {s['terminate_lines']} | "
                     f"{s['median_wall_s']} |")
    lines += ["", "The abort is a race, rare per run: none in N runs bounds its rate per run "
              f"below 3/N with 95% confidence (N = {meta['runs_per_mode']}: "
              f"{min(3 / max(meta['runs_per_mode'], 1), 1):.0%}). "
              "It needs a gloo group that outlives `destroy_process_group` (something still "
              "references it) and a collective's tensors released by gloo's worker thread "
              "during interpreter shutdown; `tests/test_clean_exit.py` checks the first "
              "deterministically."]
    bad = [r for r in runs if r["outcome"] != "clean"]
    if bad:
        lines += ["", "Runs that were not clean (exit per rank; the first few stderr tails):", ""]
        for r in bad:
            lines.append(f"- {r['mode']}: {r['outcome']}, ranks: "
                         + ", ".join(_describe(c) for c in r["codes"]))
        for r in bad[:3]:
            tail = "\n".join(t.strip()[-600:] for t in r["stderr_tails"] if t.strip())
            lines += ["", "```", tail or "(no stderr)", "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs per mode (default 50)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default both)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", default="distnorm-bench-results",
                        help="directory for clean_exit.md and clean_exit.json (default: "
                             "./distnorm-bench-results; --out benchmarks/results refreshes the "
                             "committed ones)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")

    import platform

    import torch

    meta: Dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "runs_per_mode": args.runs,
        "timeout_s": args.timeout, "pythonpath": os.environ.get("PYTHONPATH", ""), **_git()}
    runs: List[Dict[str, Any]] = []
    for i in range(args.runs):
        for mode in modes:
            run = run_once(mode, args.timeout)
            runs.append(run)
            print(f"run {i + 1}/{args.runs} {mode}: {run['outcome']} "
                  f"({', '.join(_describe(c) for c in run['codes'])}, {run['wall_s']:.1f} s)",
                  flush=True)
    summary = [summarize(runs, m) for m in modes]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "clean_exit.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    text = report(meta, summary, runs)
    with open(os.path.join(args.out, "clean_exit.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(s["clean"] == s["runs"] for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
