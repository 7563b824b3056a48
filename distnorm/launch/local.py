"""Starting ranks on this machine: a script as ``nproc`` processes, or a function on
``world`` gloo ranks.

* :func:`run_local` is a small stand-in for ``torchrun --standalone``: one Python
  process per rank on a script, with the rendezvous variables set (the script calls
  :func:`distnorm.launch.env.init_from_env`).
* :func:`spawn` runs a picklable, module-level ``fn(rank, world, *args)`` on
  ``world`` spawned processes, each with a gloo process group, and returns what each
  rank returned. The demo and the benchmarks use it; the tests' worker pool and the
  fault tests start their processes with :func:`start_ranks` and judge their exits
  with :func:`bad_exits`, so that every launcher fails the same way on a rank that
  did not exit cleanly.

A finished rank must exit 0: one that returned its result and then aborted at
interpreter exit (``terminate called without an active exception``, SIGABRT) is a
failed job for torchrun, Slurm or CI, and :func:`spawn` raises :class:`SpawnError`.
"""

from __future__ import annotations

import datetime
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["EXIT_TIMEOUT_S", "SpawnError", "bad_exits", "describe_exit", "free_port", "run_local",
           "spawn", "start_ranks"]

#: How long a rank that returned its result may take to leave (destroying the group
#: and interpreter shutdown take well under a second when nothing is wrong).
EXIT_TIMEOUT_S = 30.0


class SpawnError(RuntimeError):
    """A spawned rank raised, died, or did not exit cleanly; the message says which
    ranks and how (their tracebacks, exit codes or signals)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def describe_exit(code: Optional[int]) -> str:
    """``exit code 1``, ``killed by SIGABRT`` or ``still running`` for an exit code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def start_ranks(target: Callable[..., Any], world: int, args: Callable[[int], tuple], *,
                start_method: str = "spawn", daemon: bool = True) -> List[Any]:
    """Start ``world`` processes running ``target(*args(rank))``; return them, by rank.

    Args:
        target: a picklable, module-level function.
        world: how many processes.
        args: the arguments of rank ``r``'s process, as ``args(r)``.
        start_method: ``"spawn"`` (a fresh interpreter, the default) or
            ``"forkserver"``; never ``"fork"`` (a forked torch with threads can hang).
        daemon: killed with the parent if it dies first.
    """
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"start_ranks: world must be >= 1 (got {world})")
    ctx = mp.get_context(start_method)
    procs = [ctx.Process(target=target, args=args(r), daemon=daemon) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def bad_exits(procs: Sequence[Any], wait: float = EXIT_TIMEOUT_S) -> List[str]:
    """Wait up to ``wait`` seconds in all for ``procs`` to exit; kill those that do
    not; return, described, every one that did not exit 0 by itself."""
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.1))
    bad = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
            bad.append(f"rank {r} (pid {p.pid}): did not exit within {wait:g} s (killed)")
        elif p.exitcode != 0:
            bad.append(f"rank {r} (pid {p.pid}): {describe_exit(p.exitcode)}")
    return bad


def _spawned(rank: int, world: int, init_file: str, threads: int, pg_timeout: float,
             backend: str, fn: Callable[..., Any], args: tuple, results: Any, path: List[str]) -> None:
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    # As a user's script does: distnorm imported before init_process_group (its import
    # prepares a clean exit, see distnorm.distributed.import_before_init).
    import distnorm  # noqa: F401

    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Flush the result to the parent before tearing down (a rank that aborts at
        # exit must not lose it), then leave the group cleanly.
        results.close()
        results.join_thread()
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600.0, threads: int = 1,
          pg_timeout: float = 300.0, backend: str = "gloo") -> List[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; results by rank.

    Each rank is a fresh interpreter with ``torch.set_num_threads(threads)`` and a
    default process group (``backend``, rendezvous through a temporary file;
    collectives time out after ``pg_timeout`` seconds), destroyed before it exits.
    Results travel through a queue (tensors in shared memory: return detached ones,
    or bytes).

    Args:
        fn: a picklable, module-level function.
        world: number of ranks.
        *args: ``fn``'s arguments after ``rank`` and ``world`` (picklable).
        timeout: seconds for every rank to return.
        threads: intra-op threads per rank.
        pg_timeout: the process group's time-out, seconds.
        backend: ``"gloo"`` (CPU) or another backend torch.distributed knows.

    Returns:
        ``[fn's value on rank 0, on rank 1, ...]``.

    Raises:
        SpawnError: a rank raised (every failing rank's traceback is in the message),
            died without a result, or returned and then did not exit 0 within
            :data:`EXIT_TIMEOUT_S` (an abort at interpreter exit is a failure).
        TimeoutError: the ranks did not all return within ``timeout``.
    """
    import torch.multiprocessing as mp

    name = getattr(fn, "__name__", repr(fn))
    results = mp.get_context("spawn").Queue()
    tmp = tempfile.mkdtemp(prefix="distnorm-spawn-")
    init_file = os.path.join(tmp, "init")
    procs = start_ranks(_spawned, world, lambda r: (r, world, init_file, threads, pg_timeout, backend,
                                                    fn, args, results, list(sys.path)))
    out: List[Any] = [None] * world
    received: set = set()
    errors: List[str] = []
    deadline = time.monotonic() + timeout
    dead_since: Optional[float] = None
    try:
        while len(received) < world and not errors:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: {world} spawned ranks did not finish within "
                                       f"{timeout:.0f} s") from None
                lost = [r for r, p in enumerate(procs) if r not in received and p.exitcode not in (None, 0)]
                if lost:  # a rank died without a result: give the pipe a moment, then fail
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > 5.0:
                        raise SpawnError(f"{name}: rank(s) died without a result: " + "; ".join(
                            f"rank {r}: {describe_exit(procs[r].exitcode)}" for r in lost)) from None
                continue
            received.add(rank)
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")  # the others may be stuck in a collective
    finally:
        # After a failure the survivors may wait for a dead peer: do not wait long.
        bad = bad_exits(procs, EXIT_TIMEOUT_S if len(received) == world and not errors else 1.0)
        results.cancel_join_thread()
        try:
            os.remove(init_file)
            os.rmdir(tmp)
        except OSError:
            pass
    if errors:
        raise SpawnError(f"{name} failed on {len(errors)} rank(s) (exits: "
                         + ("; ".join(bad) or "clean") + "):\n" + "\n".join(errors))
    if bad:
        raise SpawnError(f"{name}: every rank returned, but not every rank exited cleanly (a launcher "
                         "calls that job failed; the ranks' stderr, e.g. 'terminate called without "
                         "an active exception', says why): " + "; ".join(bad))
    return out


def run_local(script: str, argv: Sequence[str], nproc: int, *, port: Optional[int] = None,
              env: Optional[Dict[str, str]] = None, poll: float = 0.2) -> int:
    """Run ``python script *argv`` as ``nproc`` ranks on this machine (like
    ``torchrun --standalone --nproc_per_node=nproc``), and wait for them.

    Each process gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
    (127.0.0.1) and MASTER_PORT. When one rank fails, the others are stopped (they
    would otherwise wait for it until their timeout).

    Returns:
        0 when every rank succeeded, else the first non-zero exit code.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1 (got {nproc})")
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    procs: List[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(subprocess.Popen([sys.executable, script, *argv], env=rank_env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
