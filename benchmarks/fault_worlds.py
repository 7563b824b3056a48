"""Fault worlds: ``world`` fresh gloo ranks that may fail, and a record of how each ended.

Used by the fault tests (``tests/test_faults.py``, ``tests/test_reliability.py``)
and the fault-matrix benchmark (``benchmarks/faults.py``). Unlike
:func:`distnorm.launch.local.spawn`, a failure is the result here: every rank
reports what it returned or raised (with the time from :func:`start_clock` to the
error), then sleeps until the parent kills it, so that no rank closes its sockets
early and changes what its peers see. :func:`run_fault` returns a
:class:`FaultRun`: each rank ``ok``, ``raised``, ``died`` (with its exit code) or
``missing`` (a hang), the ranks left alive, and the ranks that exited on their own
after reporting (an abort, e.g. SIGABRT at interpreter exit).

Scaffolding beside the benchmark (imported as the top-level module ``fault_worlds``
with ``benchmarks/`` on ``sys.path``), not part of the product package.

Ranks are started from a ``forkserver`` that has torch and distnorm imported
(:func:`preload` adds the modules that hold the workers), about 0.1 s per case
instead of seconds per spawned interpreter.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from distnorm.errors import NonFiniteError, SyncError
from distnorm.launch.local import start_ranks

__all__ = ["CASE_TIMEOUT_S", "PG_TIMEOUT_S", "FaultRun", "elapsed", "preload", "run_fault", "start_clock"]

#: The group timeout of every fault world, and the bound every case must end in.
PG_TIMEOUT_S = 10.0
CASE_TIMEOUT_S = 60.0

_PRELOAD: List[str] = ["torch", "torch.distributed", "distnorm", __name__]


def preload(*modules: str) -> None:
    """Have the forkserver import ``modules`` (the workers' modules) before it forks
    ranks; effective until the first fault world starts in this process."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


_T0: Optional[float] = None


def start_clock() -> None:
    """Called by a rank right before its faulty step: time to error counts from here."""
    global _T0
    _T0 = time.monotonic()


def elapsed() -> Optional[float]:
    """Seconds since this rank's :func:`start_clock` (``None`` before it)."""
    return None if _T0 is None else time.monotonic() - _T0


def _describe(error: BaseException) -> Dict[str, Any]:
    return {"type": type(error).__name__, "sync": isinstance(error, SyncError),
            "nonfinite": isinstance(error, NonFiniteError), "message": str(error),
            "elapsed": None if _T0 is None else time.monotonic() - _T0,
            "traceback": traceback.format_exc()}


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(rank: int, world: int, init_file: str, pg_timeout: float,
               fn: Callable[..., Any], args: tuple, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        report = (rank, "ok", _dumps(fn(rank, world, *args)))
    except BaseException as error:  # noqa: BLE001 - every failure is the result here
        report = (rank, "raised", _describe(error))
    # Plain bytes through the pipe (no shared-memory tensors whose owner gets killed).
    results.put(report)
    results.close()
    results.join_thread()
    time.sleep(3600)  # until the parent kills us: exiting would close our sockets


_CONTEXT: Optional[Any] = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        ctx = mp.get_context("forkserver")
        # Effective only if no forkserver runs yet in this process; otherwise the
        # children import these themselves (slower, same behaviour).
        ctx.set_forkserver_preload(list(_PRELOAD))
        _CONTEXT = ctx
    return _CONTEXT


@dataclass
class FaultRun:
    """What every rank of one fault case did, and how long the case took."""

    name: str
    world: int
    results: List[Dict[str, Any]]   # per rank: status ok | raised | died | missing
    wall_s: float                   # start of the ranks to the last report
    alive_after: List[int] = field(default_factory=list)
    # rank -> exit code of ranks that reported, then exited before being killed (a
    # reporting rank sleeps until killed: such an exit is an abort, e.g. SIGABRT).
    exited_after_report: Dict[int, int] = field(default_factory=dict)

    def raised(self) -> List[int]:
        return [r for r, res in enumerate(self.results) if res["status"] == "raised"]

    def time_to_error(self) -> Optional[float]:
        """Seconds from the faulty step to the error on the *last* rank that raised."""
        times = [self.results[r]["elapsed"] for r in self.raised()
                 if self.results[r]["elapsed"] is not None]
        return max(times) if times else None

    def value(self, rank: int) -> Any:
        res = self.results[rank]
        assert res["status"] == "ok", f"{self.name}: rank {rank}: {res}"
        return res["value"]

    def summary(self) -> str:
        lines = [f"{self.name}: wall {self.wall_s:.2f} s"]
        for r, res in enumerate(self.results):
            shown = {k: v for k, v in res.items() if k not in ("traceback", "value")}
            lines.append(f"  rank {r}: {shown}")
        return "\n".join(lines)


def run_fault(name: str, fn: Callable[..., Any], world: int, *args: Any,
              pg_timeout: float = PG_TIMEOUT_S, timeout: float = CASE_TIMEOUT_S) -> FaultRun:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo ranks; kill them all after.

    Returns when every rank has reported or died (a dead rank is given 1 s for a
    report still in the pipe), or after ``timeout`` seconds; ranks that did neither
    are ``missing`` — a hang. Every rank is SIGKILLed and joined before returning.
    """
    ctx = _context()
    tmp = tempfile.mkdtemp(prefix="distnorm-fault-")
    reports = ctx.Queue()
    procs: List[Any] = []
    results: List[Optional[Dict[str, Any]]] = [None] * world
    start = time.monotonic()
    try:
        # The library's process start (the forkserver context preloaded by _context()).
        procs = start_ranks(_rank_main, world, lambda r: (r, world, os.path.join(tmp, "init"),
                                                          pg_timeout, fn, args, reports),
                            start_method="forkserver")
        dead_since: Dict[int, float] = {}
        while any(r is None for r in results) and time.monotonic() - start < timeout:
            try:
                rank, status, payload = reports.get(timeout=0.05)
            except queue.Empty:
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if results[r] is None and p.exitcode is not None:
                        if now - dead_since.setdefault(r, now) > 1.0:
                            results[r] = {"status": "died", "exitcode": p.exitcode}
                continue
            if status == "ok":
                results[rank] = {"status": "ok", "value": torch.load(io.BytesIO(payload))}
            else:
                results[rank] = {"status": "raised", **payload}
        wall = time.monotonic() - start
        exited = {r: p.exitcode for r, p in enumerate(procs)
                  if p.exitcode is not None and results[r] is not None
                  and results[r]["status"] != "died"}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        reports.close()
        shutil.rmtree(tmp, ignore_errors=True)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    final = [res if res is not None else {"status": "missing"} for res in results]
    return FaultRun(name, world, final, wall, alive, exited)
