"""A pool of real gloo processes reused across test cases.

Starting a process and importing torch costs seconds, so each world size gets one
pool per test session. A test sends a picklable, module-level function; every rank
runs ``fn(rank, world_size, *args)`` with ``torch.distributed`` initialized (gloo,
CPU) and the results come back as a list indexed by rank. Tensors in results are
moved through shared memory by torch.multiprocessing.

Usage (see tests/conftest.py for the fixtures)::

    def _work(rank, world, shards):
        ...
        return {"y": y.detach()}

    def test_x(world2):
        results = world2.run(_work, shards)
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import tempfile
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

TIMEOUT_S = float(os.environ.get("DISTNORM_TEST_TIMEOUT", "120"))


def _worker(rank: int, world: int, init_file: str, inbox: Any, outbox: Any, path: List[str]) -> None:
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S / 2))
    try:
        while True:
            job = inbox.get()
            if job is None:
                break
            fn, args, kwargs = job
            try:
                outbox.put((rank, True, fn(rank, world, *args, **kwargs)))
            except BaseException:  # report, keep serving
                outbox.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A rank raised: the message holds every failing rank's traceback."""


class Pool:
    """``world`` spawned ranks, each with a process group, serving jobs."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="distnorm-pool-")
        init_file = os.path.join(self._dir, "init")
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, self.world, init_file, self._inboxes[r],
                                         self._outbox, list(sys.path)))
                       for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT_S,
            **kwargs: Any) -> List[Any]:
        """Run ``fn(rank, world, *args, **kwargs)`` on every rank; results by rank.

        Raises :class:`WorkerError` if any rank raised; restarts the pool (and
        raises ``TimeoutError``) if the ranks do not all answer within ``timeout``.
        """
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        results: List[Any] = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, ok, value = self._outbox.get(timeout=timeout)
            except queue.Empty:
                self.restart()
                raise TimeoutError(f"{fn.__name__}: ranks did not answer within {timeout} s")
            if ok:
                results[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise WorkerError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def restart(self) -> None:
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
