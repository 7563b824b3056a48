"""Shared by the benchmarks: spawning W gloo ranks, and one timing helper.

Timing is done by :func:`time_interleaved` and only there (the xformers rule: every
script times its candidates through one helper). It is not
``torch.utils.benchmark.Timer`` because a collective layer must be timed with every
rank in step and the candidates *interleaved rep by rep* (these machines are shared
and their speed drifts): each rep runs every case once, in a fresh order drawn
from the rep's number (no case always follows the same one), after a barrier, and records wall time with ``time.perf_counter`` (CPU ops
are synchronous). A case may mark laps (e.g. the end of the forward) inside its
step. :func:`summarize` takes, per rep, the slowest rank (a synced layer is as
fast as its last rank), then the median and quartiles over reps.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_OUT", "OUT_HELP", "Case", "distnorm_provenance", "machine_info", "provenance_lines",
           "run_ranks", "summarize", "time_interleaved"]


# Every benchmark writes where its user is: a folder in the current directory, never
# the installed package's files nor a checkout's committed benchmarks/results (those
# are refreshed only on purpose, with --out benchmarks/results).
DEFAULT_OUT = "distnorm-bench-results"
OUT_HELP = ("results folder (default: ./distnorm-bench-results in the current directory; "
            "--out benchmarks/results refreshes the results committed in a checkout)")


# -- spawning ranks ----------------------------------------------------------------------

def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
              timeout: float = 1800.0, pg_timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; results by rank.

    :func:`distnorm.launch.local.spawn` with the benchmarks' time-outs. ``fn`` must be
    a module-level function. Each rank gets ``torch.set_num_threads(threads)`` and an
    initialized default process group (collectives time out after ``pg_timeout``
    seconds); it is destroyed before the rank exits. Raises ``RuntimeError``
    (``SpawnError``) with every failing rank's traceback, and also when every rank
    returned but one then exited non-zero, by a signal (an abort at interpreter
    exit), or not within 30 s.
    """
    from distnorm.launch.local import spawn

    return spawn(fn, world, *args, threads=threads, timeout=timeout, pg_timeout=pg_timeout)


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- timing --------------------------------------------------------------------------------

@dataclass
class Case:
    """One candidate: ``step(lap)`` is timed; ``setup()`` runs before it, untimed.

    ``step`` may call ``lap("name")`` to record the wall time since the step began
    (e.g. ``lap("forward")`` between forward and backward); the whole step is
    recorded as ``"total"`` (wall) and ``"cpu"`` (CPU time of the process, all its
    threads: what the step computed, without the time spent waiting for peers or
    descheduled on a busy machine).
    """

    name: str
    step: Callable[[Callable[[str], None]], Any]
    setup: Callable[[], Any] | None = None


class _Clock:
    """Wall laps since construction, plus the step's total wall and CPU time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu_start = time.process_time()
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        self.laps[name] = time.perf_counter() - self.start

    def stop(self) -> dict[str, float]:
        self.laps["total"] = time.perf_counter() - self.start
        self.laps["cpu"] = time.process_time() - self.cpu_start
        return self.laps


@dataclass
class _Samples:
    laps: dict[str, list[float]] = field(default_factory=dict)


def round_order(cases: Sequence[Case], rnd: int) -> list[Case]:
    """The order of round ``rnd``: a permutation seeded by ``rnd``, equal on all ranks."""
    order = list(cases)
    random.Random(rnd).shuffle(order)
    return order


def time_interleaved(cases: Sequence[Case], reps: int, warmup: int = 2,
                     barrier: Callable[[], None] | None = None,
                     first_round: int = 0) -> dict[str, dict[str, list[float]]]:
    """Time ``cases`` interleaved: ``reps`` rounds, each running every case once.

    Every round runs the cases in a fresh order, a permutation drawn from a seed
    equal to the round's number (the same on every rank): a case's cost can depend
    on what ran just before it (allocator and cache state), and a fixed cyclic
    order — a rotation — would always give it the same predecessor. ``barrier`` (e.g.
    ``torch.distributed.barrier``) runs before every timed step so all ranks start
    together; garbage collection is off while timing. Every rank must call this
    with the same cases in the same order.

    Returns:
        ``{case: {lap: [seconds per rep]}}``, this rank's samples (``"total"`` always
        present). Warm-up rounds are not recorded.
    """
    samples = {c.name: _Samples() for c in cases}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(warmup + reps):
            for case in round_order(cases, first_round + rnd):
                if case.setup is not None:
                    case.setup()
                if barrier is not None:
                    barrier()
                clock = _Clock()
                case.step(clock.lap)
                laps = clock.stop()
                if rnd >= warmup:
                    for name, value in laps.items():
                        samples[case.name].laps.setdefault(name, []).append(value)
    finally:
        if was_enabled:
            gc.enable()
    return {name: s.laps for name, s in samples.items()}


def summarize(per_rank: Sequence[Mapping[str, Mapping[str, list[float]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median and quartiles in milliseconds of the per-rep slowest rank.

    Args:
        per_rank: :func:`time_interleaved` results of every rank.

    Returns:
        ``{case: {lap: {"median_ms", "q1_ms", "q3_ms", "reps"}}}``.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case in per_rank[0]:
        out[case] = {}
        for lap in per_rank[0][case]:
            series = [r[case][lap] for r in per_rank]
            worst = [max(vals) * 1e3 for vals in zip(*series)]
            q = statistics.quantiles(worst, n=4) if len(worst) > 1 else [worst[0]] * 3
            out[case][lap] = {"median_ms": statistics.median(worst), "q1_ms": q[0],
                              "q3_ms": q[2], "reps": len(worst)}
    return out


def distnorm_provenance(paths: Sequence[str] = ("distnorm",)) -> dict[str, Any]:
    """Which distnorm was measured: its file, its version, the git commit of its
    checkout and whether ``paths`` (relative to the checkout) differ from it.

    The one provenance helper of the benchmarks. Outside a git checkout (an
    installed copy, or a ``git archive`` snapshot) the commit comes from
    ``DISTNORM_BENCH_COMMIT`` when it is set, else it is left out.

    Returns:
        ``distnorm_file``, ``distnorm_version`` and, when known, ``git_head`` (the full
        hash) and ``distnorm_uncommitted_changes``.
    """
    import distnorm

    info: dict[str, Any] = {"distnorm_file": distnorm.__file__,
                            "distnorm_version": getattr(distnorm, "__version__", None)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(distnorm.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False)
        if head.returncode == 0:
            info["git_head"] = head.stdout.strip()
            info["distnorm_uncommitted_changes"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("DISTNORM_BENCH_COMMIT"):  # a snapshot outside the repository (git archive)
        info["git_head"] = os.environ["DISTNORM_BENCH_COMMIT"]
        info["distnorm_uncommitted_changes"] = False
    return info


def provenance_lines(meta: dict, results: list) -> list:
    """The commit line and, where W exceeds the cores, the oversubscription warning."""
    lines = []
    if meta.get("git_head"):
        dirty = " + uncommitted changes" if meta.get("distnorm_uncommitted_changes") else ""
        lines.append(f"distnorm at commit {meta['git_head'][:10]}{dirty}.")
    if any(r["world"] > (meta["cpu_count"] or 0) for r in results):
        lines.append(f"**W = 4 oversubscribes this {meta['cpu_count']}-core machine** (4 single-threaded "
                     "ranks on fewer cores): those times include CPU contention and scheduling delays "
                     "inside the collectives; compare ratios within a W, not across.")
    return lines
