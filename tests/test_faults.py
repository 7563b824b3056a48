"""The fault matrix of issue 10: never hang, never lose the run.

Every way ranks can disagree about a synced layer must end in a clear error within a
bounded time, naming the layer (its qualified name from ``convert_model``) and, where
the library can know them, the ranks — and leave no process behind. One test (or one
parametrized family) per row of the issue's matrix:

====  ==========================================  ==========================================
row   fault                                       asserted
====  ==========================================  ==========================================
 1    a rank calls a synced layer fewer times     SyncError on every rank at the first call
      (branch skipped, early exit)                (header); later: guard (one packet size
                                                  per group: no gloo abort) / DISTNORM_DEBUG=1
 2    different call order                        SyncError on every rank, first call
 3    one rank in eval, the others train          SyncError on the training ranks after the
                                                  group's timeout or distnorm's deadline,
                                                  whichever is shorter (row 12)
 4    channel count differs                       SyncError on every rank, first call
 5    empty batch on every / on some ranks        no error; empty output, zero parameter
                                                  gradients, running stats untouched (all
                                                  empty); BatchNorm of the concatenation
 6    a peer SIGKILLed mid-step                   SyncError on the survivors, well before
                                                  the group's timeout
 7    NaN/Inf in one rank's input                 NonFiniteError on every rank naming layer
                                                  and rank; "skip": BN over healthy ranks
 8    fp16 inputs whose squares overflow fp16     finite, accurate statistics (fp32 sums)
 9    |mean|/std up to 1e5, tiny variances        as accurate as nn.BatchNorm (fp32), both
                                                  measured against float64
10    checkpoint / resume, variant switch          bit-identical resume; loads across variants
====  ==========================================  ==========================================

Rows 1, 2, 4, 5, 6, 7 (and 8-10 where it applies) run for every synced variant in
``distnorm.variants()`` (``SYNCED``).

How the faulty runs are isolated. A fault that breaks a process group must not touch
the session-wide worker pools of ``tests/_dist.py``, so each fault case gets W fresh
ranks (:func:`distnorm.launch.faults.run_fault`): forked from a forkserver that has torch and distnorm
imported already (about 0.1 s per case instead of seconds per spawned interpreter),
each with its own gloo group whose timeout is ``PG_TIMEOUT_S``. Every rank runs
``fn(rank, world, *args)``; a rank that raises reports the error's type, message and
the seconds from its :func:`start_clock` (the start of the faulty step) to the raise,
then *sleeps until killed* — a rank that exited would close its sockets and turn its
peers' wait into a "connection closed" error instead of the fault under test. The
parent waits at most ``CASE_TIMEOUT_S``, SIGKILLs every rank in ``finally`` and
checks that none is alive. Rows 5, 8, 9 and 10 break nothing and run on the shared
``world2`` pool. ``benchmarks/faults.py`` runs the same ``fault_*`` scenarios once and
tabulates them (docs/faults.md). Rows 11-16 (extra forwards, distnorm's deadline,
uneven inputs under ``Join``, compiled models, activation checkpointing) are in
tests/test_reliability.py.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm.errors import NonFiniteError
from distnorm.launch import faults
from distnorm.launch.faults import FaultRun, run_fault, start_clock  # noqa: F401 - shared with test_reliability
from distnorm.modules._base import BatchNormBase

# The group timeout of every dedicated fault world, and the bound every case must end in.
PG_TIMEOUT_S, CASE_TIMEOUT_S = faults.PG_TIMEOUT_S, faults.CASE_TIMEOUT_S
# A disagreement that a check detects must surface long before the group's timeout.
DETECTED_S = PG_TIMEOUT_S / 2

#: Every registered variant that synchronizes batch statistics over a process group.
SYNCED: List[str] = sorted(mode for mode, cls in distnorm.variants().items()
                           if issubclass(cls, BatchNormBase))
#: Options under which a variant's *first* training step is exactly BatchNorm of the
#: group batch (docs/algorithms.md §2-§4: BRN with r_max = 1, d_max = 0; CmBN with one
#: micro-batch per cycle; CBN's window holds only the current iteration at its first step).
BN_EQUIVALENT: Dict[str, Dict[str, Any]] = {
    "sync": {}, "brn": {"r_max": 1.0, "d_max": 0.0}, "cmbn": {"accumulation_steps": 1}, "cbn": {},
}
#: Variants that stay exactly BatchNorm at *every* step under BN_EQUIVALENT.
BN_EVERY_STEP = ("sync", "brn", "cmbn")


# =====================================================================================
# Dedicated fault worlds
# =====================================================================================
# The harness (fault worlds: start, record, kill) is distnorm.launch.faults, shared with
# benchmarks/faults.py; the forkserver preloads this module, which holds the workers.
faults.preload(__name__)


# -- assertions ----------------------------------------------------------------------
def assert_bounded(run: FaultRun, limit: float = CASE_TIMEOUT_S) -> None:
    """Ended in time, every rank answered or died (none hung), none left alive, none
    that answered died on its own afterwards (an abort)."""
    assert not run.alive_after, f"processes left behind: ranks {run.alive_after}\n{run.summary()}"
    assert not run.exited_after_report, (
        f"ranks exited after reporting (rank: exit code, negative = signal): "
        f"{run.exited_after_report}\n{run.summary()}")
    assert all(res["status"] != "missing" for res in run.results), "a rank hung\n" + run.summary()
    assert run.wall_s < limit, f"took {run.wall_s:.1f} s > {limit} s\n{run.summary()}"


def assert_sync_error(run: FaultRun, rank: int, layer: str, *, ranks: Optional[str] = None,
                      nonfinite: bool = False, within: float = DETECTED_S) -> Dict[str, Any]:
    """Rank ``rank`` raised SyncError (NonFiniteError) naming ``layer`` (and ``ranks``)."""
    res = run.results[rank]
    assert res["status"] == "raised", f"rank {rank} did not raise\n{run.summary()}"
    kind = "nonfinite" if nonfinite else "sync"
    assert res[kind], f"rank {rank} raised {res['type']}, not " \
                      f"{'NonFiniteError' if nonfinite else 'SyncError'}\n{res['traceback']}"
    assert f"'{layer}'" in res["message"], (layer, res["message"])
    if ranks is not None:
        assert ranks in res["message"], (ranks, res["message"])
    assert res["elapsed"] is not None and res["elapsed"] < within, \
        f"rank {rank}: error after {res['elapsed']} s (bound {within} s)\n{run.summary()}"
    return res


# =====================================================================================
# The model of the call-pattern faults (rows 1-4, 6)
# =====================================================================================
class Net(nn.Module):
    """stem → branch → head, each ``Linear`` + ``BatchNorm1d``: after
    ``convert_model`` the synced layers are ``'stem.1'``, ``'branch.1'``, ``'head.1'``.

    The flags make one rank's forward differ the way real code does: a branch taken
    on some ranks only, an early exit, another call order.
    """

    def __init__(self, channels: int = 4, head_channels: Optional[int] = None) -> None:
        super().__init__()
        head = channels if head_channels is None else head_channels
        self.stem = nn.Sequential(nn.Linear(3, channels), nn.BatchNorm1d(channels))
        self.branch = nn.Sequential(nn.Linear(channels, channels), nn.BatchNorm1d(channels))
        self.head = nn.Sequential(nn.Linear(channels, head), nn.BatchNorm1d(head))
        self.skip_branch = False
        self.exit_early = False
        self.swap = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if self.exit_early:
            return x
        if self.swap:  # head before branch (needs head_channels == channels)
            return self.branch(torch.relu(self.head(x)))
        if not self.skip_branch:
            x = torch.relu(self.branch(x))
        return self.head(x)


def _net(mode: str, seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(seed)
    return distnorm.convert_model(Net(**kwargs), mode=mode)


def _step(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    y = model(torch.randn(6, 3, generator=gen))
    y.square().mean().backward()
    return y.detach()


# -- row 1: a rank calls a synced layer fewer times ------------------------------------
def _w_skip_branch(rank: int, world: int, mode: str, skip_at: int, debug: bool,
                   head_channels: Optional[int]) -> str:
    """Rank 1 skips the branch (one synced layer fewer) at step ``skip_at``."""
    if debug:
        os.environ["DISTNORM_DEBUG"] = "1"
    model = _net(mode, head_channels=head_channels)
    for step in range(skip_at + 1):
        if step == skip_at:
            start_clock()
            model.skip_branch = rank == 1
        _step(model, rank, step)
    return "finished"


def _w_early_exit(rank: int, world: int, mode: str) -> str:
    """Rank 1 returns after the stem: it goes to backward while rank 0 goes on."""
    model = _net(mode)
    model.exit_early = rank == 1
    start_clock()
    _step(model, rank, 0)
    return "finished"


def fault_skip_first(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 1: branch skipped on rank 1 at the first step [{mode}]",
                     _w_skip_branch, 2, mode, 0, False, None)


def fault_early_exit(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 1: early exit on rank 1 at the first step [{mode}]", _w_early_exit, 2, mode)


def fault_skip_later(mode: str = "sync", *, debug: bool = False,
                     head_channels: Optional[int] = None) -> FaultRun:
    what = "equal payloads" if head_channels is None else "payload sizes differ"
    return run_fault(f"row 1: branch skipped on rank 1 at step 2 ({what}, "
                     f"DISTNORM_DEBUG={int(debug)}) [{mode}]",
                     _w_skip_branch, 2, mode, 2, debug, head_channels)


@pytest.mark.parametrize("mode", SYNCED)
def test_row1_branch_skipped_on_one_rank_at_first_call(mode):
    run = fault_skip_first(mode)
    assert_bounded(run)
    # Rank 0 waits at 'branch.1', rank 1 already at 'head.1': the header exchange of
    # the first call catches it on both, each naming its own layer and the other rank.
    assert_sync_error(run, 0, "branch.1", ranks="ranks [1] differ")
    assert_sync_error(run, 1, "head.1", ranks="ranks [0] differ")


@pytest.mark.parametrize("mode", SYNCED)
def test_row1_early_exit_on_one_rank_inside_a_model(mode):
    run = fault_early_exit(mode)
    assert_bounded(run)
    assert_sync_error(run, 0, "branch.1", ranks="ranks [1] differ")
    res = assert_sync_error(run, 1, "stem.1", ranks="ranks [0] differ")
    assert "backward" in res["message"]  # rank 1 was already in backward


# A divergence that first appears after the first step. The header is exchanged only
# on the first call of each layer and direction (DISTNORM_DEBUG=1: every call); after
# that, the guard folded into every packet remains. Every guarded collective of a
# group has the same packet size (the largest payload plus the tail, zero-padded), so
# two ranks at different layers exchange equal-sized buffers whatever their channel
# counts — gloo cannot abort on a size mismatch (before the fixed size it SIGABRTed the
# rank that received the longer buffer) — and the guard raises SyncError on every
# rank, naming the layer but not the culprit (the sums cannot tell which rank: "ranks
# [0, 1] were not all at the same layer and call"). With DISTNORM_DEBUG=1 the header
# runs at every call, so the same late divergence is caught before the payload, on
# every rank, naming layer and ranks.
@pytest.mark.parametrize("mode", SYNCED)
def test_row1_later_divergence_equal_payloads_caught_by_the_guard(mode):
    run = fault_skip_later(mode)
    assert_bounded(run)
    for rank, layer in ((0, "branch.1"), (1, "head.1")):
        res = assert_sync_error(run, rank, layer, ranks="ranks [0, 1]")
        assert "not all at the same layer and call" in res["message"]


@pytest.mark.parametrize("mode", SYNCED)
def test_row1_later_divergence_different_payloads_raises_without_an_abort(mode):
    run = fault_skip_later(mode, head_channels=6)
    assert_bounded(run)
    for rank, layer in ((0, "branch.1"), (1, "head.1")):  # no rank dies: equal packet sizes
        res = assert_sync_error(run, rank, layer, ranks="ranks [0, 1]")
        assert "not all at the same layer and call" in res["message"]


@pytest.mark.parametrize("mode", SYNCED)
def test_row1_later_divergence_caught_with_debug(mode):
    run = fault_skip_later(mode, debug=True, head_channels=6)
    assert_bounded(run)
    res0 = assert_sync_error(run, 0, "branch.1", ranks="ranks [1] differ")
    assert_sync_error(run, 1, "head.1", ranks="ranks [0] differ")
    assert "call 3" in res0["message"]  # the third call, seen at the header


class DirectNet(nn.Module):
    """Net's shape with ``distnorm.SyncBatchNorm`` built directly (no ``convert_model``):
    the layers have no qualified name, so ``layer_name`` is ``'SyncBatchNorm'`` for all."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 4), distnorm.SyncBatchNorm(4))
        self.branch = nn.Sequential(nn.Linear(4, 4), distnorm.SyncBatchNorm(4))
        self.head = nn.Sequential(nn.Linear(4, 4), distnorm.SyncBatchNorm(4))
        self.skip_branch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if not self.skip_branch:
            x = torch.relu(self.branch(x))
        return self.head(x)


def _w_direct_skip(rank: int, world: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = DirectNet()
    model.skip_branch = rank == 1
    start_clock()
    with torch.no_grad():  # a forward-only pass in training mode (e.g. BN recalibration)
        model(torch.randn(6, 3))
    return {"finished": True}


def test_row1_skipped_layer_built_without_convert_model_is_caught_at_first_call():
    run = run_fault("row 1: branch skipped on rank 1, layers built directly", _w_direct_skip, 2,
                    pg_timeout=3.0)
    if run.alive_after or any(res["status"] == "missing" for res in run.results):
        raise RuntimeError("not the expected failure: " + run.summary())
    # Every rank must refuse the step whose statistics would mix two layers.
    for rank in (0, 1):
        assert run.results[rank]["status"] == "raised" and run.results[rank]["sync"], run.summary()
        assert run.results[rank]["elapsed"] < DETECTED_S, run.summary()


# -- row 2: different call order ------------------------------------------------------
def _w_call_order(rank: int, world: int, mode: str, swap_at: int) -> str:
    model = _net(mode)
    for step in range(swap_at + 1):
        if step == swap_at:
            start_clock()
            model.swap = rank == 1
        _step(model, rank, step)
    return "finished"


def fault_call_order(mode: str = "sync", swap_at: int = 0) -> FaultRun:
    return run_fault(f"row 2: call order branch/head swapped on rank 1 at step {swap_at} [{mode}]",
                     _w_call_order, 2, mode, swap_at)


@pytest.mark.parametrize("mode", SYNCED)
def test_row2_different_call_order(mode):
    run = fault_call_order(mode)
    assert_bounded(run)
    assert_sync_error(run, 0, "branch.1", ranks="ranks [1] differ")
    assert_sync_error(run, 1, "head.1", ranks="ranks [0] differ")


def test_row2_different_call_order_after_the_first_step():
    # Equal payload sizes: the guard in the payload catches it (see row 1's comment).
    run = fault_call_order("sync", swap_at=2)
    assert_bounded(run)
    assert_sync_error(run, 0, "branch.1", ranks="ranks [0, 1]")
    assert_sync_error(run, 1, "head.1", ranks="ranks [0, 1]")


# -- row 3: one rank in eval mode -----------------------------------------------------
def _w_eval_rank(rank: int, world: int, mode: str) -> str:
    model = _net(mode)
    model.train(rank != world - 1)  # the last rank evaluates
    start_clock()
    _step(model, rank, 0) if rank != world - 1 else model(torch.randn(6, 3))
    return "finished"


def fault_eval_rank(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 3: rank 1 in eval mode, rank 0 trains [{mode}]", _w_eval_rank, 2, mode)


def test_row3_one_rank_in_eval_mode_times_out_with_a_sync_error():
    # Eval mode makes no collective call (API.md), so the eval rank cannot know; the
    # training rank's first collective (the header of 'stem.1') waits for it until the
    # group's timeout (10 s here, shorter than distnorm's default deadline; row 12 has
    # the deadline shorter) and then raises SyncError naming the layer.
    run = fault_eval_rank("sync")
    assert_bounded(run)
    res = assert_sync_error(run, 0, "stem.1", ranks="ranks [0, 1]",
                            within=PG_TIMEOUT_S + 10)
    assert res["elapsed"] >= 0.9 * PG_TIMEOUT_S, res["elapsed"]  # the timeout, not a check
    assert "eval mode" in res["message"]
    assert run.results[1]["status"] == "ok"  # the eval rank itself sees nothing


# -- row 4: channel count differs -------------------------------------------------------
def _w_channels(rank: int, world: int, mode: str) -> str:
    model = _net(mode, channels=4 + 2 * rank)
    start_clock()
    _step(model, rank, 0)
    return "finished"


def fault_channels(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 4: 4 channels on rank 0, 6 on rank 1 [{mode}]", _w_channels, 2, mode)


@pytest.mark.parametrize("mode", SYNCED)
def test_row4_channel_count_differs(mode):
    run = fault_channels(mode)
    assert_bounded(run)
    for rank in (0, 1):
        res = assert_sync_error(run, rank, "stem.1", ranks=f"ranks [{1 - rank}] differ")
        assert "payload" in res["message"]  # the sizes 2C + 1 (+ extras) are listed


# -- row 6: a peer killed mid-step ------------------------------------------------------
def _w_killed(rank: int, world: int, mode: str) -> str:
    model = _net(mode)
    y = model(torch.randn(6, 3, generator=torch.Generator().manual_seed(rank)))
    if rank == world - 1:  # the victim: forward done, dies while the others are in backward
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    start_clock()
    y.square().mean().backward()
    _step(model, rank, 1)
    return "finished"


def fault_killed(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 6: rank 2 of 3 SIGKILLed between forward and backward [{mode}]",
                     _w_killed, 3, mode)


@pytest.mark.parametrize("mode", SYNCED)
def test_row6_peer_killed_mid_step(mode):
    run = fault_killed(mode)
    assert_bounded(run)
    assert run.results[2] == {"status": "died", "exitcode": -signal.SIGKILL}, run.summary()
    for rank in (0, 1):
        # Backward runs head first; the closed connection is noticed, not timed out.
        res = assert_sync_error(run, rank, "head.1", ranks="ranks [0, 1, 2]")
        assert "backward" in res["message"]


# -- row 7: NaN / Inf in one rank's input ----------------------------------------------
def _shard(rank: int, n: int = 5, channels: int = 4, step: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, channels, generator=gen, dtype=torch.float64) * (1 + rank) + rank


def _w_nonfinite(rank: int, world: int, mode: str, bad_rank: int, value: float) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = distnorm.convert_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double(),
                                   mode=mode)
    x = _shard(rank)
    if rank == bad_rank:
        x[2, 1] = value
    out: Dict[str, Any] = {}
    start_clock()
    try:
        model(x).sum().backward()
        out["error"] = None
    except NonFiniteError as error:
        out["error"] = {"message": str(error), "elapsed": faults.elapsed()}
    # The error is raised on every rank after the same collective: the group is
    # intact and the run goes on with the next (finite) batch.
    model.zero_grad()
    out["next_y"] = _step_double(model, rank)
    return out


def _step_double(model: nn.Module, rank: int) -> torch.Tensor:
    y = model(_shard(rank, step=1))
    y.sum().backward()
    return y.detach()


def fault_nonfinite(mode: str = "sync", value: float = math.nan) -> FaultRun:
    return run_fault(f"row 7: {value} in rank 1's input, policy 'raise' [{mode}]",
                     _w_nonfinite, 3, mode, 1, value)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("mode", SYNCED)
def test_row7_nonfinite_input_raises_on_every_rank(mode, value):
    run = fault_nonfinite(mode, value)
    assert_bounded(run)
    for rank in range(3):
        out = run.value(rank)
        assert out["error"] is not None, f"rank {rank} did not raise NonFiniteError"
        assert "'1'" in out["error"]["message"] and "rank(s) [1]" in out["error"]["message"], out
        assert out["error"]["elapsed"] < DETECTED_S
        assert torch.isfinite(out["next_y"]).all()  # the run goes on


def _w_nonfinite_skip(rank: int, world: int, mode: str, options: Dict[str, Any],
                      shards: List[torch.Tensor], grads: List[torch.Tensor]) -> Dict[str, Any]:
    bn = distnorm.convert_model(nn.Sequential(nn.BatchNorm1d(4).double()), mode=mode,
                                nonfinite="skip", **options)[0]
    x = shards[rank].clone().requires_grad_()
    y = bn(x)
    (y * grads[rank]).sum().backward()
    return {"y": y.detach(), "grad": x.grad, "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone()}


def _skip_case(bad_rank: int = 1):
    shards = [_shard(r) for r in range(3)]
    shards[bad_rank][2, 1] = math.nan
    grads = [torch.randn(5, 4, generator=torch.Generator().manual_seed(7 + r), dtype=torch.float64)
             for r in range(3)]
    healthy = [r for r in range(3) if r != bad_rank]
    ref = nn.BatchNorm1d(4).double()
    x = torch.cat([shards[r] for r in healthy]).requires_grad_()
    y = ref(x)
    (y * torch.cat([grads[r] for r in healthy])).sum().backward()
    ref_y = dict(zip(healthy, y.detach().split(5)))
    ref_grad = dict(zip(healthy, x.grad.split(5)))
    return shards, grads, healthy, ref, ref_y, ref_grad


@pytest.mark.parametrize("mode", SYNCED)
def test_row7_nonfinite_skip_healthy_ranks_equal_batchnorm_over_healthy_ranks(mode):
    shards, grads, healthy, ref, ref_y, _ = _skip_case()
    options = BN_EQUIVALENT.get(mode)
    if options is None:
        pytest.skip(f"no options make {mode!r} plain BatchNorm")
    run = run_fault(f"row 7: NaN on rank 1, policy 'skip' [{mode}]", _w_nonfinite_skip, 3,
                    mode, options, shards, grads)
    assert_bounded(run)
    for rank in healthy:
        out = run.value(rank)
        torch.testing.assert_close(out["y"], ref_y[rank], rtol=1e-10, atol=1e-10)
    for rank in range(3):  # every rank, the NaN one too, keeps the healthy statistics
        out = run.value(rank)
        torch.testing.assert_close(out["running_mean"], ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["running_var"], ref.running_var, rtol=1e-10, atol=1e-12)
    bad = run.value(1)["y"]
    assert bad[2, 1].isnan() and torch.isfinite(bad[torch.arange(5) != 2]).all()


def test_row7_nonfinite_skip_healthy_ranks_backward_equals_batchnorm_over_healthy_ranks():
    shards, grads, healthy, _, _, ref_grad = _skip_case()
    run = run_fault("row 7: NaN on rank 1, policy 'skip', backward", _w_nonfinite_skip, 3,
                    "sync", {}, shards, grads)
    try:
        assert_bounded(run)
    except AssertionError as error:  # not the expected failure
        raise RuntimeError(str(error)) from None
    for rank in healthy:
        torch.testing.assert_close(run.value(rank)["grad"], ref_grad[rank], rtol=1e-8, atol=1e-10)


# =====================================================================================
# Rows that break nothing: the shared world2 pool
# =====================================================================================
def _pool_run(pool: Any, fn: Callable[..., Any], *args: Any) -> List[Any]:
    start = time.monotonic()
    results = pool.run(fn, *args, timeout=CASE_TIMEOUT_S)
    assert time.monotonic() - start < CASE_TIMEOUT_S
    return results


# -- row 7, both branches of the check ----------------------------------------------------
def _w_nonfinite_branch(rank: int, world: int, on_host: bool, policy: str) -> Dict[str, Any]:
    """Checked all-reduces with a NaN on rank 1 in the first, the non-finite check
    forced onto the host branch (CPU: decided and raised at once) or the device
    branch (what CUDA runs: masks, no host read; raised at the layer's next call)."""
    from distnorm.distributed import collectives

    context = distnorm.SyncBatchNorm(3)._sync_context()
    out: Dict[str, Any] = {}
    saved = collectives._on_host
    collectives._on_host = lambda tensor: on_host
    try:
        for call in range(2):
            buffer = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (rank + 1)
            if rank == 1 and call == 0:
                buffer[1] = math.nan
            out[f"sum{call}"] = collectives.all_reduce(buffer, dist.group.WORLD, context,
                                                       "forward", policy)
    except NonFiniteError as error:
        out["error"], out["raised_at"] = str(error), call
    finally:
        collectives._on_host = saved
    return out


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
def test_row7_both_branches_of_the_nonfinite_check(on_host, world2):
    skipped = _pool_run(world2, _w_nonfinite_branch, on_host, "skip")
    for out in skipped:  # rank 1 contributed zeros: the sum is rank 0's buffer
        torch.testing.assert_close(out["sum0"], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        torch.testing.assert_close(out["sum1"], torch.tensor([3.0, 6.0, 9.0], dtype=torch.float64))
        assert "error" not in out
    raised = _pool_run(world2, _w_nonfinite_branch, on_host, "raise")
    for out in raised:  # every rank raises, naming rank 1 only: at once, or one call later
        assert "rank(s) [1]" in out["error"], out
        assert out["raised_at"] == (0 if on_host else 1), out
        if not on_host:  # the bad rank was left out of the first call's sum
            torch.testing.assert_close(out["sum0"],
                                       torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


# -- row 5: empty batches -----------------------------------------------------------------
EMPTY_SIZES = [(0, 0), (3, 0), (0, 0), (0, 2), (4, 1)]  # all, some, all, some, none empty


def _empty_case(channels: int = 3) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    steps = []
    for sizes in EMPTY_SIZES:
        xs = [torch.randn(n, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1 for n in sizes]
        gs = [torch.randn(n, channels, 3, 3, generator=gen, dtype=torch.float64) for n in sizes]
        steps.append({"x": xs, "g": gs})
    return {"C": channels, "steps": steps}


def _empty_model(mode: Optional[str], channels: int, options: Dict[str, Any]) -> nn.Module:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, channels, 1), nn.BatchNorm2d(channels)).double()
    with torch.no_grad():  # distinct initial running statistics, to see them untouched
        model[1].running_mean.fill_(0.25)
        model[1].running_var.fill_(2.0)
    return model if mode is None else distnorm.convert_model(model, mode=mode, **options)


def _w_empty(rank: int, world: int, mode: str, options: Dict[str, Any], case: Dict[str, Any]):
    model = _empty_model(mode, case["C"], options)
    bn = model[1]
    out = []
    for step in case["steps"]:
        x = step["x"][rank].clone().requires_grad_()
        y = model(x)
        (y * step["g"][rank]).sum().backward()
        out.append({
            "y": y.detach(), "grad": x.grad.clone(),
            "param_grads": {n: (None if p.grad is None else p.grad.clone())
                            for n, p in model.named_parameters()},
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "nbt": bn.num_batches_tracked.clone()})
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", SYNCED)
def test_row5_empty_batch_on_every_rank_and_on_some_ranks(mode, world2):
    case = _empty_case()
    options = BN_EQUIVALENT.get(mode, {})
    results = _pool_run(world2, _w_empty, mode, options, case)
    ref = _empty_model(None, case["C"], {})
    initial = {"running_mean": ref[1].running_mean.clone(), "running_var": ref[1].running_var.clone(),
               "nbt": ref[1].num_batches_tracked.clone()}
    nonempty_steps = 0
    for s, (sizes, step) in enumerate(zip(EMPTY_SIZES, case["steps"])):
        outs = [results[r][s] for r in range(2)]
        for r, out in enumerate(outs):
            assert out["y"].shape == (sizes[r], case["C"], 3, 3)
            assert out["grad"].shape == step["x"][r].shape
            assert all(torch.isfinite(t).all() for t in (out["y"], out["grad"]))
        if sum(sizes) == 0:
            for r, out in enumerate(outs):
                for name, grad in out["param_grads"].items():
                    assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), \
                        (mode, s, r, name, grad)
                before = initial if s == 0 else results[r][s - 1]
                for key in initial:  # untouched, bit for bit, num_batches_tracked too
                    assert torch.equal(out[key], before[key]), (mode, s, r, key)
            continue
        # Some (or no) ranks empty: BatchNorm of the concatenated batch.
        x = torch.cat(step["x"]).requires_grad_()
        y = ref(x)
        (y * torch.cat(step["g"])).sum().backward()
        nonempty_steps += 1
        if mode in BN_EVERY_STEP or (mode in BN_EQUIVALENT and nonempty_steps == 1):
            tol = dict(rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(torch.cat([o["y"] for o in outs]), y.detach(), **tol)
            torch.testing.assert_close(torch.cat([o["grad"] for o in outs]), x.grad, **tol)
            for name, p in ref.named_parameters():
                summed = sum(o["param_grads"][name] for o in outs)
                torch.testing.assert_close(summed, p.grad, **tol)
            for out in outs:
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    mine = out["nbt" if key == "num_batches_tracked" else key]
                    torch.testing.assert_close(mine, getattr(ref[1], key), **tol)
        ref.zero_grad(set_to_none=True)


# -- row 8: fp16 inputs whose squares overflow fp16 ------------------------------------------
def _fp16_case() -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    # mean 1000, std 100: x² ≈ 1e6 and the per-channel sum ≈ 4e5 both overflow fp16
    # (max 65504); mean and variance (1e4) themselves are representable.
    return [(torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 100 + 1000).half()
            for n in (6, 2)]


def _w_fp16(rank: int, world: int, mode: str, options: Dict[str, Any],
            shards: List[torch.Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    moments = distnorm.stats.group_moments(shards[rank], dist.group.WORLD)
    out["moments"] = (moments.count, moments.mean, moments.var)
    for param_dtype in (torch.float32, torch.float16):
        layer = distnorm.convert_model(nn.BatchNorm2d(3, momentum=1.0), mode=mode,
                                       **options).to(param_dtype)
        x = shards[rank].clone().requires_grad_()
        y = layer(x)
        y.float().square().mean().backward()
        out[str(param_dtype)] = {"y": y.detach(), "grad": x.grad,
                                 "running_mean": layer.running_mean.clone(),
                                 "running_var": layer.running_var.clone()}
    return out


@pytest.mark.parametrize("mode", SYNCED)
def test_row8_fp16_inputs_whose_squares_overflow(mode, world2):
    shards = _fp16_case()
    x64 = torch.cat(shards).double()
    assert torch.isinf(shards[0].square()).any()  # the premise: squares overflow fp16
    mean64 = x64.mean((0, 2, 3))
    var64 = x64.var((0, 2, 3), unbiased=False)
    unbiased64 = x64.var((0, 2, 3), unbiased=True)
    y64 = (x64 - mean64.view(1, 3, 1, 1)) / (var64.view(1, 3, 1, 1) + 1e-5).sqrt()
    rows = {0: slice(0, 6), 1: slice(6, 8)}
    options = BN_EQUIVALENT.get(mode)
    for rank, out in enumerate(_pool_run(world2, _w_fp16, mode, options or {}, shards)):
        count, mean, var = out["moments"]
        assert mean.dtype == torch.float32 and var.dtype == torch.float32  # fp32 statistics
        assert int(count) == x64.numel() // 3
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)
        for param_dtype, rtol in (("torch.float32", 1e-5), ("torch.float16", 1e-3)):
            res = out[param_dtype]
            for key in ("y", "grad", "running_mean", "running_var"):
                assert torch.isfinite(res[key]).all(), (param_dtype, key)
            assert res["y"].dtype == torch.float16
            if options is None:
                continue  # a variant we cannot reduce to BatchNorm: finite is what we know
            torch.testing.assert_close(res["running_mean"].double(), mean64, rtol=rtol, atol=0)
            torch.testing.assert_close(res["running_var"].double(), unbiased64, rtol=rtol, atol=0)
            # fp16 output (|y| < 5): an fp16 rounding (2e-3) plus the statistics' error.
            torch.testing.assert_close(res["y"].double(), y64[rows[rank]], rtol=0, atol=1e-2)


# -- row 9: large offsets and tiny variances -------------------------------------------------
OFFSETS = [(1e4, 1.0), (-1e3, 0.1), (1e2, 1e-3), (0.0, 1e-3)]  # (mean, std): |mean|/std to 1e5


def _offset_shards(mean: float, std: float) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    return [(torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) * std * scale + mean).float()
            for n in (3, 5)]


def _w_offsets(rank: int, world: int, modes: Sequence[str],
               cases: List[List[torch.Tensor]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for mode in modes:
        for c, shards in enumerate(cases):
            layer = distnorm.convert_model(nn.BatchNorm2d(3, momentum=1.0), mode=mode,
                                           **BN_EQUIVALENT[mode])
            y = layer(shards[rank])
            out[mode, c] = {"y": y.detach(), "running_mean": layer.running_mean.clone(),
                            "running_var": layer.running_var.clone()}
    return out


def _errors(y, rm, rv, y64, mean64, var64, std) -> Dict[str, float]:
    return {"mean": ((rm.double() - mean64).abs() / std).max().item(),   # in units of σ
            "var": ((rv.double() - var64).abs() / var64).max().item(),   # relative
            "y": (y.double() - y64).abs().max().item()}


def test_row9_large_offsets_and_tiny_variances_as_accurate_as_batchnorm(world2):
    modes = [m for m in SYNCED if m in BN_EQUIVALENT]
    cases = [_offset_shards(mean, std) for mean, std in OFFSETS]
    results = _pool_run(world2, _w_offsets, modes, cases)
    report = []
    for c, ((mean, std), shards) in enumerate(zip(OFFSETS, cases)):
        x32 = torch.cat(shards)
        x64 = x32.double()
        mean64 = x64.mean((0, 2, 3))
        var64 = x64.var((0, 2, 3), unbiased=True)
        biased64 = x64.var((0, 2, 3), unbiased=False)
        y64 = (x64 - mean64.view(1, 3, 1, 1)) / (biased64.view(1, 3, 1, 1) + 1e-5).sqrt()
        bn = nn.BatchNorm2d(3, momentum=1.0)  # torch's own, float32
        y_bn = bn(x32).detach()
        err_bn = _errors(y_bn, bn.running_mean, bn.running_var, y64, mean64, var64, std)
        assert err_bn["var"] < 1e-3  # the oracle itself is sound here
        for mode in modes:
            for rank, res in enumerate(results):
                rows = slice(0, 3) if rank == 0 else slice(3, 8)
                err = _errors(res[mode, c]["y"], res[mode, c]["running_mean"],
                              res[mode, c]["running_var"], y64[rows], mean64, var64, std)
                report.append((mode, mean, std, rank, err, err_bn))
                # "As accurate": within twice torch's error, plus two float32 ulps of
                # the value stored (mean: of |mean|, in units of σ; var: relative). The
                # output is computed in float32 from the mean rounded to float32, as
                # nn.BatchNorm does: that rounding, ulp(|mean|)/σ̂, is its floor.
                ulp_mean = 2.0 ** (math.frexp(abs(mean))[1] - 24) if mean else 0.0
                sigma_hat = math.sqrt((0.5 * std) ** 2 + 1e-5)  # smallest channel scale 0.5
                assert err["mean"] <= 2 * err_bn["mean"] + 2 * ulp_mean / std + 2.5e-7, report[-1]
                assert err["var"] <= 2 * err_bn["var"] + 2.5e-7, report[-1]
                assert err["y"] <= 2 * err_bn["y"] + 2 * ulp_mean / sigma_hat + 1e-6, report[-1]


# -- row 10: checkpoint / resume, and loading across variants ----------------------------------
RESUME_STEPS, RESUME_AT = 6, 4  # CmBN (2 micro-batches per cycle) saves at a cycle boundary
RESUME_OPTIONS: Dict[str, Dict[str, Any]] = {"cmbn": {"accumulation_steps": 2}, "cbn": {"window": 3}}


def _resume_model(mode: Optional[str], seed: int, options: Optional[Dict[str, Any]] = None) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    if mode is None or mode == "bn":
        return model
    return distnorm.convert_model(model, mode=mode, **(options or {}))


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, steps: range,
           synced: bool = True) -> torch.Tensor:
    y = torch.empty(0)
    for s in steps:
        gen = torch.Generator().manual_seed(1000 * s + rank)
        x = torch.randn(2, 3, 5, 5, generator=gen)
        y = model(x)
        (y * torch.randn(y.shape, generator=gen)).mean().backward()
        if synced:  # DDP's averaging, written out (deterministic order)
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return y.detach()


def _histories(model: nn.Module) -> Dict[str, Any]:
    cls = getattr(distnorm, "CrossIterationBatchNorm", None)
    return {n: m.history_state() for n, m in model.named_modules()
            if cls is not None and isinstance(m, cls)}


def _w_resume(rank: int, world: int, mode: str, directory: str) -> Dict[str, Any]:
    options = RESUME_OPTIONS.get(mode, {})
    model = _resume_model(mode, seed=0, options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, rank, world, range(RESUME_AT))
    path = os.path.join(directory, f"{mode}.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    # CBN's window history is per rank and lives outside the state_dict (its docs):
    # each rank saves its own next to the checkpoint.
    torch.save(_histories(model), os.path.join(directory, f"{mode}.history{rank}.pt"))
    dist.barrier()
    y_straight = _train(model, opt, rank, world, range(RESUME_AT, RESUME_STEPS))

    resumed = _resume_model(mode, seed=123, options=options)  # other weights until loaded
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    checkpoint = torch.load(path)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    for name, state in torch.load(os.path.join(directory, f"{mode}.history{rank}.pt")).items():
        resumed.get_submodule(name).load_history_state(state)
    y_resumed = _train(resumed, opt2, rank, world, range(RESUME_AT, RESUME_STEPS))
    return {"straight": model.state_dict(), "resumed": resumed.state_dict(),
            "y_straight": y_straight, "y_resumed": y_resumed}


@pytest.mark.parametrize("mode", SYNCED)
def test_row10_resume_from_rank0_checkpoint_is_bit_identical(mode, world2, tmp_path):
    for rank, out in enumerate(_pool_run(world2, _w_resume, mode, str(tmp_path))):
        assert torch.equal(out["y_straight"], out["y_resumed"]), (mode, rank)
        assert out["straight"].keys() == out["resumed"].keys()
        for key, value in out["straight"].items():
            assert torch.equal(value, out["resumed"][key]), (mode, rank, key)


def _w_cross_variant(rank: int, world: int, modes: Sequence[str], directory: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for source in modes:
        model = _resume_model(source, seed=1, options=RESUME_OPTIONS.get(source, {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # nn.BatchNorm is not synced: its ranks train apart; rank 0's checkpoint counts.
        _train(model, opt, rank, world, range(2), synced=source != "bn")
        path = os.path.join(directory, f"cross-{source}.pt")
        if rank == 0:
            torch.save(model.state_dict(), path)
        dist.barrier()
        state = torch.load(path)
        x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(77))
        reference = _resume_model("bn", seed=5).eval()
        reference.load_state_dict(state)
        with torch.no_grad():
            expected = reference(x)
        for target in modes:
            loaded = _resume_model(target, seed=5, options=RESUME_OPTIONS.get(target, {}))
            missing = loaded.load_state_dict(state, strict=True)
            with torch.no_grad():
                same_eval = torch.equal(loaded.eval()(x), expected)
            loaded.train()
            opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
            y = _train(loaded, opt, rank, world, range(2, 4), synced=target != "bn")
            out[source, target] = {"same_eval": same_eval, "finite": bool(torch.isfinite(y).all()),
                                   "missing": list(missing.missing_keys) + list(missing.unexpected_keys)}
    return out


def test_row10_checkpoint_loads_across_variants(world2, tmp_path):
    modes = ["bn"] + [m for m in SYNCED if m in ("sync", "brn", "cmbn", "cbn")]
    for rank, out in enumerate(_pool_run(world2, _w_cross_variant, modes, str(tmp_path))):
        for (source, target), res in out.items():
            assert res == {"same_eval": True, "finite": True, "missing": []}, (rank, source, target, res)
