"""How the GPU benchmark measures a step: timing with device events, CUDA-graph
capture, GPU kernels per step (torch.profiler), host synchronizations per step
(``torch.cuda.set_sync_debug_mode``), peak memory, and the bookkeeping that lets a
failing candidate become a row of the report instead of ending the run.

Every function takes a :class:`gpu_device.Device`: on CUDA it measures; in a
``--smoke`` run (CPU, gloo) it runs the same Python with host timers and no capture,
so that the script can be checked without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import Case, summarize, time_interleaved
from gpu_device import CURRENT_ITEM, Device, Poisoned, describe, inject_fault
from layer import count_collectives

@dataclass


class Runnable:
    """One candidate's step on fixed inputs. ``step`` writes what it produced into
    ``held`` (the graph's static outputs when captured); ``zero`` sets gradients to
    None (untimed; before a capture, so that backward allocates them in the graph's
    pool)."""

    name: str
    step: Callable[[], None]
    zero: Callable[[], None]
    held: dict[str, Any] = field(default_factory=dict)
    outputs: Callable[[], dict[str, Any]] = lambda: {}


@contextlib.contextmanager


def attempt(row: dict[str, Any], phase: str, dev: Device) -> Iterator[dict[str, bool]]:
    """Run a block; on failure note ``phase: error`` in ``row["errors"]`` and go on
    (``Poisoned`` propagates: the worker must restart)."""
    box = {"ok": False}
    try:
        yield box
        box["ok"] = True
    except Poisoned:
        raise
    except Exception as error:  # noqa: BLE001 - a failing candidate is a result
        row.setdefault("errors", {})[phase] = describe(error)
        print(f"    {row.get('candidate')}: {phase} failed: {describe(error)}", file=sys.stderr)
        traceback.print_exc(limit=6, file=sys.stderr)
        dev.recover()


def time_steps(cases: dict[str, tuple[Callable[[], None], Callable[[], None]]], dev: Device,
               reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per step of each case, interleaved rep by rep (``_common.time_interleaved``).

    Each case is ``(step, zero)``. Before every step ``zero`` runs and the device
    synchronizes (untimed), so each step starts on an idle GPU; the step is timed by
    two device marks (CUDA events) around it — its span on the GPU, host launch gaps
    included — and ``host_ms`` is the host time to issue it.
    """
    marks: dict[str, list[tuple[Any, Any]]] = {name: [] for name in cases}

    def timed(name: str, step: Callable[[], None]) -> Callable[[Callable[[str], None]], None]:
        def run(_lap: Callable[[str], None]) -> None:
            start, end = dev.marker(), dev.marker()
            start.record()
            step()
            end.record()
            marks[name].append((start, end))
        return run

    def before(zero: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            zero()
            dev.sync()
        return run

    host = time_interleaved([Case(name, timed(name, step), before(zero))
                             for name, (step, zero) in cases.items()], reps=reps, warmup=warmup)
    dev.sync()
    host_ms = summarize([host])
    out = {}
    for name in cases:
        ms = [start.elapsed_time(end) for start, end in marks[name][-reps:]]
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        out[name] = {"ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2],
                     "host_ms": host_ms[name]["total"]["median_ms"], "reps": reps}
    return out


def time_group(cases: dict[str, tuple[Callable[[], None], Callable[[], None]]],
               rows: dict[str, dict[str, Any]], key: str, dev: Device, reps: int,
               warmup: int) -> None:
    """:func:`time_steps` into ``rows[name][key]``; if the interleaved run fails, each
    case alone, so that a failure is charged to its candidate."""
    if not cases:
        return
    try:
        result = time_steps(cases, dev, reps, warmup)
    except Poisoned:
        raise
    except Exception as error:  # noqa: BLE001 - find out which candidate failed
        print(f"    interleaved timing failed ({describe(error)}); timing each alone",
              file=sys.stderr)
        dev.recover()
        result = {}
        for name, case in cases.items():
            with attempt(rows[name], key, dev):
                result.update(time_steps({name: case}, dev, reps, warmup))
    for name, value in result.items():
        rows[name][key] = value


def capture(run: Runnable, dev: Device, warmup: int,
            ready: Callable[[], None] | None = None) -> tuple[Callable[[], None], str]:
    """``run.step`` captured in a CUDA graph as torch's documentation shows (warm-up on a
    side stream, gradients None before capture); returns the replay and the capture
    mode that worked. "global" is tried first, then "thread_local" (which tolerates
    CUDA calls from other threads, e.g. a communicator's watchdog, during capture).
    ``ready`` runs between the warm-up and the capture (e.g. to snapshot the state the
    first replay starts from: capturing records the step without running it).

    On CPU (smoke runs) nothing is captured: the "replay" runs the step eagerly, so
    that everything around it is exercised.
    """
    inject_fault("capture", f"{run.name}@{CURRENT_ITEM['id']}")
    if not dev.cuda:
        def replay() -> None:
            run.zero()
            run.step()
        for _ in range(warmup):
            replay()
        run.zero()
        if ready is not None:
            ready()
        return replay, "emulated on CPU"
    import torch

    errors = []
    for mode in ("global", "thread_local"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run.zero()
                run.step()
        torch.cuda.current_stream().wait_stream(side)
        run.zero()
        if ready is not None:
            dev.sync()
            ready()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):
                run.step()
        except Exception as error:  # noqa: BLE001 - reported; the next mode is tried
            errors.append(f"[{mode}] {describe(error)}")
            graph = None  # drops the failed graph and its memory pool
            dev.recover()
            continue
        return graph.replay, mode
    raise RuntimeError("capture failed: " + "; ".join(errors))


def count_device_work(run: Runnable, dev: Device, steps: int) -> dict[str, Any]:
    """GPU kernels, memcpys and memsets per step, from torch.profiler (CPU activity
    only in smoke runs, where every count is 0)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # past the first calls (compiles, first-call checks)
        run.zero()
        run.step()
    dev.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.zero()
            run.step()
        dev.sync()
    counts, names = classify_device_events(raw_profiler_events(prof))
    out: dict[str, Any] = {k: v / steps for k, v in counts.items()}
    out["collective_kernels"] = sum(n for name, n in names.items() if "nccl" in name.lower()) / steps
    out["kernel_names"] = {name: n / steps for name, n in names.most_common(40)}
    return out


def raw_profiler_events(prof: Any) -> list[Any]:
    """The profiler's events with ``name()``, ``device_type()`` (and, where torch has
    it, ``activity_type()``): kineto's own, else adapted FunctionEvents."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        return list(results.events())

    class _Adapted:
        def __init__(self, evt: Any) -> None:
            self.evt = evt

        def name(self) -> str:
            return self.evt.name

        def device_type(self) -> Any:
            return self.evt.device_type
    return [_Adapted(e) for e in prof.events()]


_ACTIVITY_KIND = {"kernel": "kernels", "concurrent_kernel": "kernels", "gpu_memcpy": "memcpy",
                  "gpu_memset": "memset"}


def classify_device_events(events: Sequence[Any]) -> tuple[dict[str, int], collections.Counter]:
    """Count device activities: ``kernels``, ``memcpy``, ``memset`` (and kernel names).

    Kineto's activity type decides where torch reports it ("kernel", "gpu_memcpy",
    "gpu_memset"; anything else — CPU ops, runtime calls — is not device work);
    otherwise an event on a CUDA device is a memcpy or memset by its name
    ("Memcpy HtoD ...", "Memset (Device)"), else a kernel.
    """
    counts = {"kernels": 0, "memcpy": 0, "memset": 0}
    names: collections.Counter = collections.Counter()
    for event in events:
        kind = None
        activity = getattr(event, "activity_type", None)
        activity = str(activity()).lower() if callable(activity) else None
        if activity is not None and activity not in ("", "unknown"):
            kind = _ACTIVITY_KIND.get(activity.split(".")[-1])
        elif "cuda" in str(event.device_type()).lower():
            name = event.name()
            kind = ("memcpy" if name.lower().startswith("memcpy")
                    else "memset" if name.lower().startswith("memset") else "kernels")
        if kind is None:
            continue
        counts[kind] += 1
        if kind == "kernels":
            names[_short_kernel_name(event.name())] += 1
    return counts, names


def _short_kernel_name(name: str) -> str:
    """A kernel's name without its template arguments and parameters."""
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip()[:80] or name[:80]


def count_host_syncs(run: Runnable, dev: Device, steps: int) -> dict[str, Any]:
    """Host synchronizations per step, from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    import torch

    for _ in range(2):
        run.zero()
        run.step()
    dev.sync()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                run.zero()
                run.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dev.sync()
    syncs = sync_warnings([str(w.message) for w in caught])
    return {"host_syncs": len(syncs) / steps, "sync_examples": syncs[:3]}


def count_work(row: dict[str, Any], run: Runnable, dev: Device, steps: int) -> None:
    """Into ``row``: the device work per step (``counts``) and, on CUDA, the host
    synchronizations per step; a failure of either is recorded in the row."""
    with attempt(row, "profile", dev):
        row["counts"] = count_device_work(run, dev, steps)
    if dev.cuda:
        with attempt(row, "sync count", dev):
            row.update(count_host_syncs(run, dev, steps))


def sync_warnings(messages: Sequence[str]) -> list[str]:
    """The first lines of the warnings that ``set_sync_debug_mode("warn")`` issues
    ("called a synchronizing CUDA operation"), among any others."""
    return [m.strip().splitlines()[0][:160] for m in messages
            if "synchroniz" in m.lower() and "cuda" in m.lower()]


def relative_error(a: Any, b: Any) -> float | None:
    """max |a − b| / max |b| in float64 (None when either is missing)."""
    if a is None or b is None:
        return None
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def warned(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:200]}"
        if text not in seen:
            seen.append(text)
    return seen[:5]


def first_calls(runs: dict[str, Runnable], rows: dict[str, dict[str, Any]], dev: Device,
                 key: str) -> None:
    """One step of each candidate (compiles, first-call checks), with the collectives it
    issued (evidence that the synced ones synchronized); drops the failures."""
    for name in list(runs):
        log: list[dict[str, Any]] = []
        with attempt(rows[name], "first step", dev) as ok, \
                warnings.catch_warnings(record=True) as caught, count_collectives(log, ["step"]):
            warnings.simplefilter("always")
            start = time.perf_counter()
            runs[name].zero()
            runs[name].step()
            dev.sync()
            rows[name][key] = time.perf_counter() - start
        if caught:
            rows[name]["warnings"] = warned(caught)
        rows[name]["collectives"] = (
            [f"{op['op']} {op['dtype']}×{op['numel']}" for op in log] if len(log) <= 8
            else dict(collections.Counter(f"{op['op']} {op['dtype']}" for op in log)))
        if not ok["ok"]:
            del runs[name]


def step_peak_memory(run: Runnable, dev: Device) -> dict[str, float] | None:
    """One step's peak device memory (torch's caching allocator): ``peak_mb`` in all,
    and ``step_mb`` above what was allocated when the step began (activations,
    gradients, workspaces: what the normalization layers change). None on CPU."""
    if not dev.cuda:
        return None
    import torch

    run.zero()
    dev.sync()
    torch.cuda.reset_peak_memory_stats(dev.device)
    before = torch.cuda.memory_allocated(dev.device)
    run.step()
    dev.sync()
    peak = torch.cuda.max_memory_allocated(dev.device)
    return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}
