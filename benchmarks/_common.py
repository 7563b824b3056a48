"""Shared by the benchmarks: spawning W gloo ranks, and one timing helper.

Timing is done by :func:`time_interleaved` and only there (the xformers rule: every
script times its candidates through one helper). It is not
``torch.utils.benchmark.Timer`` because a collective layer must be timed with every
rank in step and the candidates *interleaved rep by rep* (these machines are shared
and their speed drifts): each rep runs every case once, in an order rotated from rep
to rep, after a barrier, and records wall time with ``time.perf_counter`` (CPU ops
are synchronous). A case may mark laps (e.g. the end of the forward) inside its
step. :func:`summarize` takes, per rep, the slowest rank (a synced layer is as
fast as its last rank), then the median and quartiles over reps.
"""

from __future__ import annotations

import datetime
import gc
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["Case", "run_ranks", "summarize", "time_interleaved", "machine_info"]


# -- spawning ranks ----------------------------------------------------------------------

def _rank_main(rank: int, world: int, init_file: str, threads: int, fn: Callable[..., Any],
               args: tuple, results: Any, path: List[str]) -> None:
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
              timeout: float = 1800.0) -> List[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; results by rank.

    ``fn`` must be a module-level function. Each rank gets ``torch.set_num_threads(threads)``
    and an initialized default process group; it is destroyed before the rank exits.
    Raises ``RuntimeError`` with every failing rank's traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="distnorm-bench-")
    init_file = os.path.join(tmp, "init")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(r, world, init_file, threads, fn, args, results, list(sys.path)))
             for r in range(world)]
    for p in procs:
        p.start()
    out: List[Any] = [None] * world
    errors = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world):
            try:
                rank, ok, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__}: ranks did not finish within {timeout:.0f} s")
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    return out


def machine_info() -> Dict[str, Any]:
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

    ``step`` may call ``lap("name")`` to record the time since the step began
    (e.g. ``lap("forward")`` between forward and backward); the whole step is
    recorded as ``"total"``.
    """

    name: str
    step: Callable[[Callable[[str], None]], Any]
    setup: Optional[Callable[[], Any]] = None


@dataclass
class _Samples:
    laps: Dict[str, List[float]] = field(default_factory=dict)


def time_interleaved(cases: Sequence[Case], reps: int, warmup: int = 2,
                     barrier: Optional[Callable[[], None]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Time ``cases`` interleaved: ``reps`` rounds, each running every case once.

    The order of the cases is rotated by one every round; ``barrier`` (e.g.
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
            shift = rnd % len(cases)
            for case in list(cases[shift:]) + list(cases[:shift]):
                if case.setup is not None:
                    case.setup()
                if barrier is not None:
                    barrier()
                laps: Dict[str, float] = {}
                start = time.perf_counter()
                case.step(lambda name: laps.__setitem__(name, time.perf_counter() - start))
                laps["total"] = time.perf_counter() - start
                if rnd >= warmup:
                    for name, value in laps.items():
                        samples[case.name].laps.setdefault(name, []).append(value)
    finally:
        if was_enabled:
            gc.enable()
    return {name: s.laps for name, s in samples.items()}


def summarize(per_rank: Sequence[Mapping[str, Mapping[str, List[float]]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Median and quartiles in milliseconds of the per-rep slowest rank.

    Args:
        per_rank: :func:`time_interleaved` results of every rank.

    Returns:
        ``{case: {lap: {"median_ms", "q1_ms", "q3_ms", "reps"}}}``.
    """
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for case in per_rank[0]:
        out[case] = {}
        for lap in per_rank[0][case]:
            series = [r[case][lap] for r in per_rank]
            worst = [max(vals) * 1e3 for vals in zip(*series)]
            q = statistics.quantiles(worst, n=4) if len(worst) > 1 else [worst[0]] * 3
            out[case][lap] = {"median_ms": statistics.median(worst), "q1_ms": q[0],
                              "q3_ms": q[2], "reps": len(worst)}
    return out
