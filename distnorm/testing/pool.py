"""A pool of real gloo ranks reused across many jobs (a test session's, say).

Starting a process and importing torch costs seconds, so a test suite starts one
pool per world size and sends it every multi-rank job. A job is a picklable,
module-level function; every rank runs ``fn(rank, world_size, *args)`` with
``torch.distributed`` initialized (gloo, CPU) and the results come back as a list
indexed by rank. Tensors in results are moved through shared memory by
torch.multiprocessing. For a single job, :func:`distnorm.testing.spawn_ranks` is
simpler (fresh processes, torn down at the end).

Usage (e.g. as a session-scoped pytest fixture)::

    def _work(rank, world, shards):
        ...
        return {"y": y.detach()}

    pool = RankPool(2)
    try:
        results = pool.run(_work, shards)
    finally:
        pool.close()

Exit codes are checked: a rank that dies while the pool serves (a gloo abort, a
crash) fails the job it was running at once with :class:`WorkerExitError`, and
:meth:`RankPool.close` joins every rank with a bounded wait and raises
:class:`WorkerExitError` when one exited non-zero or by a signal — an abort at
interpreter exit (``terminate called without an active exception``, SIGABRT) after
``destroy_process_group`` is a failure, as torchrun would report it.
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

# The library's launcher of local ranks: the same process start and the same verdict
# on exits (describe_exit is imported by tests that report exit codes).
from ..launch.local import EXIT_TIMEOUT_S, bad_exits, describe_exit, start_ranks

__all__ = ["EXIT_TIMEOUT_S", "RankPool", "TIMEOUT_S", "WorkerError", "WorkerExitError", "describe_exit"]

#: Default seconds a job may take (``DISTNORM_TEST_TIMEOUT``; the ranks' process group
#: times out after half of it).
TIMEOUT_S = float(os.environ.get("DISTNORM_TEST_TIMEOUT", "120"))
# How often run() looks at the ranks' liveness while it waits for their answers.
_POLL_S = 0.5


def _worker(rank: int, world: int, init_file: str, inbox: Any, outbox: Any, path: List[str]) -> None:
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    # As a user's script does: distnorm imported before init_process_group (its
    # import prepares a clean exit, see distnorm.distributed.import_before_init).
    import distnorm  # noqa: F401

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


class WorkerExitError(RuntimeError):
    """A rank died while serving, or exited non-zero or by a signal at close."""


class RankPool:
    """``world`` spawned ranks, each with a gloo process group, serving jobs.

    Args:
        world: the number of ranks.

    Raises:
        WorkerError: (from :meth:`run`) a rank raised.
        WorkerExitError: a rank died, or exited badly at :meth:`close`.
    """

    def __init__(self, world: int) -> None:
        if world < 1:
            raise ValueError(f"RankPool: world must be >= 1 (got {world})")
        self.world = world
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="distnorm-pool-")
        init_file = os.path.join(self._dir, "init")
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._outbox = ctx.Queue()
        self._procs = start_ranks(_worker, self.world,
                                  lambda r: (r, self.world, init_file, self._inboxes[r],
                                             self._outbox, list(sys.path)))

    def _dead(self) -> List[str]:
        """The ranks that are no longer running, described."""
        return [f"rank {r} (pid {p.pid}): {describe_exit(p.exitcode)}"
                for r, p in enumerate(self._procs) if not p.is_alive()]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT_S,
            **kwargs: Any) -> List[Any]:
        """Run ``fn(rank, world, *args, **kwargs)`` on every rank; results by rank.

        Raises :class:`WorkerError` if any rank raised; restarts the pool and raises
        :class:`WorkerExitError` if a rank died (its exit code or signal in the
        message), or ``TimeoutError`` if the ranks do not all answer within ``timeout``.
        """
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        results: List[Any] = [None] * self.world
        errors = []
        deadline = time.monotonic() + timeout
        answered = 0
        while answered < self.world:
            try:
                rank, ok, value = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                dead = self._dead()
                if dead:
                    # Ranks only leave when told to: one that is gone died (a gloo
                    # abort, a crash), and its peers may wait for it in vain.
                    self.restart()
                    raise WorkerExitError(f"{fn.__name__}: a rank died while running it: "
                                          + "; ".join(dead) + "".join("\n" + e for e in errors)) from None
                if time.monotonic() > deadline:
                    self.restart()
                    raise TimeoutError(f"{fn.__name__}: ranks did not answer within {timeout} s") from None
                continue
            answered += 1
            if ok:
                results[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise WorkerError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def restart(self) -> None:
        """Kill the ranks (whatever they are doing) and start fresh ones."""
        self._stop(graceful=False)
        self._start()

    def _stop(self, graceful: bool) -> List[str]:
        """Stop every rank; return those that exited badly (after being told to leave,
        when ``graceful``), described."""
        bad: List[str] = []
        if graceful:
            for box in self._inboxes:
                box.put(None)
            # Waits for each rank, kills the late ones, names every bad exit.
            bad = bad_exits(self._procs, EXIT_TIMEOUT_S)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for box in [*self._inboxes, self._outbox]:
            # The ranks are gone: do not wait to flush what they will never read.
            box.cancel_join_thread()
            box.close()
        return bad

    def close(self, graceful: bool = True) -> None:
        """Tell every rank to leave and wait for it (at most :data:`EXIT_TIMEOUT_S`).

        Raises:
            WorkerExitError: (``graceful`` only) a rank exited non-zero or by a signal
                — e.g. SIGABRT at interpreter exit after ``destroy_process_group`` —
                or did not exit in time.
        """
        bad = self._stop(graceful)
        if bad:
            raise WorkerExitError(
                f"gloo worker pool of {self.world} ranks: {len(bad)} rank(s) did not exit "
                "cleanly after destroy_process_group (a finished job exits 0; the ranks' "
                "stderr, e.g. 'terminate called without an active exception', says why): "
                + "; ".join(bad))
