"""The training loops people actually write: extra forwards, uneven data, compiled
models, activation checkpointing (issue 17; rows 11-16 of the fault matrix).

====  ==========================================  ==========================================
row   case                                        asserted
====  ==========================================  ==========================================
11    an extra training-mode forward on rank 0    SyncError on every rank at the extra
      only (under no_grad, or with autograd),     forward's first synced collective (or the
      at the first step and at a later one        one after), naming the layer; no abort,
                                                  no hang, no batch used unchecked
12    a rank waits for a peer that never comes    SyncError after distnorm's deadline
      (eval mode; one rank out of data or one     (DISTNORM_TIMEOUT), not the process
      batch short, without Join)                  group's timeout
13    uneven batches per rank under torch's       every rank finishes; parameters and
      Join with distnorm.joinable (DDP, many      running statistics equal BatchNorm on the
      buckets); a rank that skipped a batch       data actually seen, step by step
14    Join misuse: joinable not first; a rank     ValueError on every rank; SyncError
      with no batch at all                        within the deadline
15    torch.compile (and fullgraph=True) with     running statistics those of the finite
      NaN on one rank                             ranks on every rank (never NaN);
                                                  NonFiniteError at the next eager call
                                                  ("raise")
16    activation checkpointing                    equal to nn.BatchNorm under the same
                                                  checkpointing on the concatenated batch
                                                  (running statistics updated twice)
====  ==========================================  ==========================================

Faults that break a process group run on fresh ranks (``run_fault`` of
``benchmarks/fault_worlds.py``: every rank reports, raises or dies, and none is left
alive); the rest use the shared pools. The scenarios (the workers and ``fault_*``
runs of rows 11-16) live in ``benchmarks/fault_scenarios.py``, which
``benchmarks/faults.py`` runs once and tabulates (docs/faults.md); the assertions
are here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests._fault_matrix import BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)

from fault_scenarios import (  # noqa: E402
    DEADLINE_S, SYNCED, _compile_shards,
    _w_checkpointed, _w_compiled_nonfinite,
    checkpoint_difference, fault_eval_rank_deadline,
    fault_extra_forward, fault_join,
    fault_join_not_first, fault_join_without_a_batch,
    fault_uneven_without_join, join_matches_reference, fault_eval_then_collective,
    fault_plain_join, fault_registry_swap, fault_own_group_of_a_subgroup)
from tests.test_faults import assert_bounded, assert_sync_error


# =====================================================================================
# Row 11: an extra training-mode forward on one rank
# =====================================================================================
@pytest.mark.parametrize("at", [0, 2], ids=["first-step", "later-step"])
@pytest.mark.parametrize("mode", SYNCED)
def test_row11_extra_no_grad_forward_on_one_rank_is_caught_at_its_first_layer(mode, at):
    run = fault_extra_forward(mode, at, autograd=False)
    assert_bounded(run)
    for rank in (0, 1):  # both ranks, at the first synced layer, before using the sums
        res = assert_sync_error(run, rank, "stem.1")
        assert "torch.no_grad()" in res["message"], res["message"]


@pytest.mark.parametrize("at", [0, 2], ids=["first-step", "later-step"])
def test_row11_extra_forward_with_autograd_on_one_rank_raises_on_every_rank(at):
    # The extra forward's collectives pair consistently with rank 1's forward (same
    # layers, same calls); rank 0's training forward then meets rank 1's backward:
    # equal packet sizes (no gloo abort), different tags, modes or counters.
    run = fault_extra_forward("sync", at, autograd=True)
    assert_bounded(run)
    assert all(res["status"] == "raised" for res in run.results), run.summary()
    assert_sync_error(run, 0, "stem.1")
    res = assert_sync_error(run, 1, "head.1")
    assert "backward" in res["message"]


# =====================================================================================
# Row 12: a peer that never comes — bounded by distnorm's deadline
# =====================================================================================
def test_row12_eval_rank_ends_at_distnorms_deadline_not_the_groups_timeout():
    run = fault_eval_rank_deadline()
    assert_bounded(run)
    res = assert_sync_error(run, 0, "stem.1", ranks="[0, 1]", within=DEADLINE_S + 3)
    assert res["elapsed"] >= 0.9 * DEADLINE_S, res["elapsed"]
    assert f"within {DEADLINE_S:g} s" in res["message"] and "eval mode" in res["message"]
    assert run.results[1]["status"] == "ok"


@pytest.mark.parametrize("skip", [None, 1], ids=["fewer-batches", "skipped-batch"])
def test_row12_uneven_iterations_without_join_end_in_a_bounded_sync_error(skip):
    # A skipped batch is an uneven input: each step still pairs training forwards of
    # real data (step k+1 of rank 1 with step k of rank 0: consistent collectives,
    # nothing to detect); the step left without a partner waits and ends at the
    # deadline, naming the layer and pointing at Join.
    run = fault_uneven_without_join(skip)
    assert_bounded(run)
    res = assert_sync_error(run, 0, "stem.1", within=DEADLINE_S + 3)
    assert "Join" in res["message"]
    assert run.results[1]["status"] == "ok" and run.value(1)["steps"] == 2


# =====================================================================================
# Row 13: uneven inputs under Join
# =====================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "cmbn"])
def test_row13_join_with_uneven_batches_equals_batchnorm_on_the_data_seen(mode):
    run = fault_join(mode, (3, 1, 2))
    assert_bounded(run, limit=120)
    assert join_matches_reference(run, (3, 1, 2)) < 1e-10, run.summary()


@pytest.mark.slow
def test_row13_a_rank_that_skips_a_batch_under_join_trains_on_the_data_that_exists():
    skip = {1: 1}
    run = fault_join("sync", (3, 3), skip)
    assert_bounded(run, limit=120)
    assert join_matches_reference(run, (3, 3), skip) < 1e-10, run.summary()


# -- row 14: misuse ---------------------------------------------------------------------
def test_row14_joinable_after_ddp_is_refused_on_every_rank():
    run = fault_join_not_first()
    assert_bounded(run)
    for res in run.results:
        assert res["status"] == "raised" and res["type"] == "ValueError", run.summary()
        assert "must come first" in res["message"]


def test_row14_a_rank_with_no_batch_cannot_shadow_and_every_rank_fails_in_bounded_time():
    run = fault_join_without_a_batch()
    assert_bounded(run)
    assert "joined before it ran one training iteration" in run.results[1]["message"]
    assert_sync_error(run, 0, "1", within=DEADLINE_S + 3)


# =====================================================================================
# Row 15: compiled models with a NaN on one rank
# =====================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True], ids=["compile", "fullgraph"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_row15_compiled_nan_on_one_rank_never_poisons_the_running_statistics(policy, fullgraph,
                                                                            world2):
    results = world2.run(_w_compiled_nonfinite, policy, fullgraph, timeout=600)
    shards = _compile_shards()
    # Reference: BatchNorm's running statistics over the finite data of each step.
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(4).double()
    if not fullgraph:
        lin = nn.Linear(4, 4).double()
    for s in range(2):
        finite = [x for x in shards[s] if torch.isfinite(x).all()]
        x = torch.cat(finite)
        with torch.no_grad():
            ref(x if fullgraph else lin(x))
        for rank, out in enumerate(results):
            mean, var = out["running"][s]
            assert torch.isfinite(mean).all() and torch.isfinite(var).all(), (rank, s)
            torch.testing.assert_close(mean, ref.running_mean, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(var, ref.running_var, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(results[0]["y"][1]).all()  # the healthy rank's output
    for rank, out in enumerate(results):
        if policy == "raise":
            assert out["eager"] is not None and "rank(s) [1]" in out["eager"], out["eager"]
        else:
            assert out["eager"] is None


# =====================================================================================
# Row 16: activation checkpointing
# =====================================================================================
def test_row16_activation_checkpointing_equals_batchnorm_under_checkpointing(world2):
    assert checkpoint_difference(world2.run(_w_checkpointed)) < 1e-9


# =====================================================================================
# Row 17: a rank skips its synced layers and makes another collective (issue 23)
# =====================================================================================
@pytest.mark.parametrize("at, other", [(2, "ddp"), (2, "metric"), (0, "ddp")],
                         ids=["ddp-later-step", "metric-later-step", "ddp-first-step"])
def test_row17_eval_rank_then_another_collective_is_a_sync_error_not_an_abort(at, other):
    """Rank 1 forgets model.train(): its next collective is DDP's gradient bucket or a
    metric all-reduce. distnorm's collectives run on a group of their own, so they
    never meet it: rank 0 gets a SyncError naming the layer at the deadline (no gloo
    abort, no wrong-size match); rank 1's own collective has no partner and ends at
    the group's timeout (torch's RuntimeError)."""
    run = fault_eval_then_collective(at, other)
    assert_bounded(run, limit=120)  # DDP: as row 13
    res = assert_sync_error(run, 0, "stem.1", ranks="[0, 1]", within=DEADLINE_S + 3)
    assert res["elapsed"] >= 0.9 * DEADLINE_S, res["elapsed"]
    assert f"within {DEADLINE_S:g} s" in res["message"] and "eval mode" in res["message"]
    other_rank = run.results[1]
    assert other_rank["status"] == "raised" and other_rank["type"] == "RuntimeError", \
        run.summary()
    assert "Received data size" not in other_rank["message"]


def test_row17_sharing_the_users_group_is_the_documented_switch():
    """DISTNORM_ISOLATE=0: the synced layers share the user's group, and the same
    fault meets DDP's bucket there, as with torch's SyncBatchNorm (gloo aborts)."""
    run = fault_eval_then_collective(2, "ddp", isolate=False)
    assert not run.alive_after, run.summary()
    statuses = {r["status"] for r in run.results}
    assert "died" in statuses or run.exited_after_report, run.summary()


def test_row17_own_group_of_a_subgroup_leaves_torchs_group_names_alone():
    """distnorm's own group of a subgroup is made by its ranks only; the groups the
    user makes afterwards are named alike on every rank (else gloo would hang)."""
    run = fault_own_group_of_a_subgroup()
    assert_bounded(run)
    values = [run.value(rank) for rank in range(3)]
    assert {v["name"] for v in values} == {values[0]["name"]}
    assert all(v["sum"] == 3.0 for v in values)


# =====================================================================================
# Row 18: torch's own Join([ddp]) without distnorm.joinable (issue 23)
# =====================================================================================
def test_row18_plain_join_is_refused_on_every_rank_with_a_pointer_to_joinable():
    run = fault_plain_join(throw=False)
    assert_bounded(run, limit=120)  # DDP: as row 13
    for rank in (0, 1):
        res = run.results[rank]
        assert res["status"] == "raised" and res["type"] == "ValueError", run.summary()
        assert "Join([distnorm.joinable(ddp_model), ddp_model])" in res["message"]
        assert "throw_on_early_termination=True" in res["message"]
        assert res["elapsed"] < DEADLINE_S, res["elapsed"]


def test_row18_plain_join_throwing_on_early_termination_keeps_torchs_behaviour():
    run = fault_plain_join(throw=True)
    assert_bounded(run, limit=120)  # DDP: as row 13
    for rank in (0, 1):
        res = run.results[rank]
        assert res["status"] == "raised" and res["type"] == "RuntimeError", run.summary()
        assert "exhausted" in res["message"]
        assert res["elapsed"] < DEADLINE_S + 3, res["elapsed"]


# =====================================================================================
# Row 19: registry-built layers swapped by mmengine's sync_bn (issue 23)
# =====================================================================================
def test_row19_check_model_reports_registry_built_layers_swapped_away():
    pytest.importorskip("mmengine")
    pytest.importorskip("mmcv")
    run = fault_registry_swap()
    assert_bounded(run)
    for rank in (0, 1):
        value = run.value(rank)
        assert value["before"] == (True, 2)
        ok, swapped = value["after"]
        assert not ok and swapped == [("0.bn", "SyncBatchNorm", "sync"),
                                      ("1.bn", "SyncBatchNorm", "brn")], value["report"]
