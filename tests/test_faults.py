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
ranks (:func:`fault_worlds.run_fault`, in ``benchmarks/``): forked from a forkserver that has torch and distnorm
imported already (about 0.1 s per case instead of seconds per spawned interpreter),
each with its own gloo group whose timeout is ``PG_TIMEOUT_S``. Every rank runs
``fn(rank, world, *args)``; a rank that raises reports the error's type, message and
the seconds from its :func:`start_clock` (the start of the faulty step) to the raise,
then *sleeps until killed* — a rank that exited would close its sockets and turn its
peers' wait into a "connection closed" error instead of the fault under test. The
parent waits at most ``CASE_TIMEOUT_S``, SIGKILLs every rank in ``finally`` and
checks that none is alive. Rows 5, 8, 9 and 10 break nothing and run on the shared
``world2`` pool. The scenarios themselves (models, data, workers and the ``fault_*``
runs) live in ``benchmarks/fault_scenarios.py``, which ``benchmarks/faults.py``
runs once and tabulates (docs/faults.md); the assertions are here. Rows 11-16 (extra forwards, distnorm's deadline,
uneven inputs under ``Join``, compiled models, activation checkpointing) are in
tests/test_reliability.py.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm.errors import NonFiniteError
from tests._fault_matrix import BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)

import fault_worlds as faults  # noqa: E402
from fault_scenarios import (  # noqa: E402
    BN_EQUIVALENT, BN_EVERY_STEP, EMPTY_SIZES, OFFSETS,
    SYNCED, _empty_case, _empty_model, _fp16_case,
    _offset_shards, _skip_case, _w_cross_variant,
    _w_direct_skip, _w_fp16_long, FP16_LONG_STEPS, _w_empty, _w_fp16, _w_nonfinite_skip,
    _w_offsets, _w_resume, fault_call_order,
    fault_channels, fault_early_exit, fault_eval_rank,
    fault_killed, fault_nonfinite, fault_skip_first,
    fault_skip_later)
from fault_worlds import FaultRun, run_fault  # noqa: E402

# The group timeout of every dedicated fault world, and the bound every case must end in.
PG_TIMEOUT_S, CASE_TIMEOUT_S = faults.PG_TIMEOUT_S, faults.CASE_TIMEOUT_S
# A disagreement that a check detects must surface long before the group's timeout.
DETECTED_S = PG_TIMEOUT_S / 2


# =====================================================================================
# Dedicated fault worlds
# =====================================================================================
# The harness (fault worlds: start, record, kill) is benchmarks/fault_worlds.py; the scenarios
# (models, data, the workers and the fault_* runs of every row) are
# benchmarks/fault_scenarios.py, shared with benchmarks/faults.py. What stays here is
# what the tests assert.


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


# -- row 1: a rank calls a synced layer fewer times ------------------------------------
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


@pytest.mark.parametrize("mode", SYNCED)
def test_row4_channel_count_differs(mode):
    run = fault_channels(mode)
    assert_bounded(run)
    for rank in (0, 1):
        res = assert_sync_error(run, rank, "stem.1", ranks=f"ranks [{1 - rank}] differ")
        assert "payload" in res["message"]  # the sizes 2C + 1 (+ extras) are listed


# -- row 6: a peer killed mid-step ------------------------------------------------------


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


@pytest.mark.parametrize("mode", ["sync", "brn"])
def test_row8_fp16_running_variance_saturates_past_the_half_range(mode, world2):
    """A .half() layer whose running variance passes 65504 keeps it at 65504 (never
    inf, so never NaN), eval outputs stay finite, and it recovers afterwards;
    nn.BatchNorm.half() stores inf (eval outputs 0) and never recovers."""
    for out in _pool_run(world2, _w_fp16_long, mode, BN_EQUIVALENT.get(mode, {}),
                         FP16_LONG_STEPS):
        history = out["history"]
        assert all(h["finite"] and h["eval_finite"] for h in history)
        high = FP16_LONG_STEPS[0][0]
        assert (history[high - 1]["var"] == 65504.0).all()  # saturated, not inf
        assert (history[-1]["var"] < 3.0).all()  # back with the batches' variance (1)


# -- row 9: large offsets and tiny variances -------------------------------------------------


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


@pytest.mark.parametrize("mode", SYNCED)
def test_row10_resume_from_rank0_checkpoint_is_bit_identical(mode, world2, tmp_path):
    for rank, out in enumerate(_pool_run(world2, _w_resume, mode, str(tmp_path))):
        assert torch.equal(out["y_straight"], out["y_resumed"]), (mode, rank)
        assert out["straight"].keys() == out["resumed"].keys()
        for key, value in out["straight"].items():
            assert torch.equal(value, out["resumed"][key]), (mode, rank, key)


def test_row10_checkpoint_loads_across_variants(world2, tmp_path):
    modes = ["bn"] + [m for m in SYNCED if m in ("sync", "brn", "cmbn", "cbn")]
    for rank, out in enumerate(_pool_run(world2, _w_cross_variant, modes, str(tmp_path))):
        for (source, target), res in out.items():
            assert res == {"same_eval": True, "finite": True, "missing": []}, (rank, source, target, res)
