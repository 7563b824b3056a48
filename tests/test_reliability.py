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
tests/test_faults.py: every rank reports, raises or dies, and none is left alive);
the rest use the shared pools. ``benchmarks/faults.py`` runs the ``fault_*``
scenarios here and tabulates them (docs/faults.md).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import distnorm
from distnorm.errors import NonFiniteError
from tests.test_faults import (BN_EQUIVALENT, DETECTED_S, PG_TIMEOUT_S, SYNCED, FaultRun,
                               _net, _step, assert_bounded, assert_sync_error, run_fault,
                               start_clock)

# distnorm's deadline in the cases that wait for a peer: well under the group's 10 s.
DEADLINE_S = 2.0


# =====================================================================================
# Row 11: an extra training-mode forward on one rank
# =====================================================================================
def _w_extra_forward(rank: int, world: int, mode: str, at: int, autograd: bool) -> str:
    """Rank 0 runs one more forward than rank 1 at step ``at`` (a logging or
    EMA-teacher forward with the model in train mode), under no_grad or not."""
    model = _net(mode)
    for step in range(at + 1):
        if step == at:
            start_clock()
            if rank == 0:
                x = torch.randn(6, 3, generator=torch.Generator().manual_seed(999))
                with torch.set_grad_enabled(autograd):
                    model(x)
        _step(model, rank, step)
    return "finished"


def fault_extra_forward(mode: str = "sync", at: int = 2, autograd: bool = False) -> FaultRun:
    how = "with autograd" if autograd else "under torch.no_grad()"
    return run_fault(f"row 11: extra forward {how} on rank 0 at step {at} [{mode}]",
                     _w_extra_forward, 2, mode, at, autograd)


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
def _w_eval_rank_deadline(rank: int, world: int, timeout: float) -> str:
    os.environ["DISTNORM_TIMEOUT"] = str(timeout)
    model = _net("sync")
    model.train(rank == 0)
    start_clock()
    _step(model, rank, 0) if rank == 0 else model(torch.randn(6, 3))
    return "finished"


def fault_eval_rank_deadline(timeout: float = DEADLINE_S) -> FaultRun:
    return run_fault(f"row 12: rank 1 in eval mode, DISTNORM_TIMEOUT={timeout:g}",
                     _w_eval_rank_deadline, 2, timeout)


def test_row12_eval_rank_ends_at_distnorms_deadline_not_the_groups_timeout():
    run = fault_eval_rank_deadline()
    assert_bounded(run)
    res = assert_sync_error(run, 0, "stem.1", ranks="[0, 1]", within=DEADLINE_S + 3)
    assert res["elapsed"] >= 0.9 * DEADLINE_S, res["elapsed"]
    assert f"within {DEADLINE_S:g} s" in res["message"] and "eval mode" in res["message"]
    assert run.results[1]["status"] == "ok"


def _w_uneven_without_join(rank: int, world: int, counts: Sequence[int],
                           skip: Optional[int]) -> Dict[str, Any]:
    """``counts[rank]`` steps; rank 1 skips its step ``skip`` (a bad batch)."""
    model = _net("sync")
    for layer in (model.stem[1], model.branch[1], model.head[1]):
        layer.timeout = DEADLINE_S  # the layer's own deadline (convert_model(timeout=...))
    done = 0
    for step in range(counts[rank]):
        if rank == 1 and step == skip:
            continue
        if step == counts[rank] - 1:
            start_clock()
        _step(model, rank, step)
        done += 1
    return {"steps": done}


def fault_uneven_without_join(skip: Optional[int] = None) -> FaultRun:
    what = f"rank 1 skips batch {skip}" if skip is not None else "rank 1 has 2 batches, rank 0 3"
    counts = (3, 3) if skip is not None else (3, 2)
    return run_fault(f"row 12: {what}, no Join", _w_uneven_without_join, 2, counts, skip)


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
def _join_net(mode: str, options: Dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)).double()
    return net if mode == "bn" else distnorm.convert_model(net, mode=mode, **options)


def _join_batches(counts: Sequence[int]) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(13)
    return [[(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1,
              torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)) for _ in range(n)]
            for n in counts]


def _w_join(rank: int, world: int, mode: str, options: Dict[str, Any], counts: Sequence[int],
            skip: Dict[int, int]) -> Dict[str, Any]:
    # Tiny buckets: DDP's gradient all-reduces interleave with the synced layers'
    # backward all-reduces, as in a large model.
    model = DDP(_join_net(mode, options), bucket_cap_mb=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Join([distnorm.joinable(model), model]):
        for step, (x, g) in enumerate(_join_batches(counts)[rank]):
            if skip.get(rank) == step:  # e.g. a batch that failed to load
                continue
            (model(x) * g).sum().backward()
            opt.step()
            opt.zero_grad()
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _join_reference(counts: Sequence[int], skip: Dict[int, int]) -> Dict[str, torch.Tensor]:
    """nn.BatchNorm on the batches the ranks actually process together: at iteration
    i, the i-th batch each rank still has (skipped ones left out); DDP averages the
    gradient over the initial world size."""
    world = len(counts)
    seen = [[b for s, b in enumerate(batches) if skip.get(r) != s]
            for r, batches in enumerate(_join_batches(counts))]
    model = _join_net("bn", {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(max(len(s) for s in seen)):
        active = [s[i] for s in seen if i < len(s)]
        x, g = torch.cat([b[0] for b in active]), torch.cat([b[1] for b in active])
        (model(x) * g).sum().div(world).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def fault_join(mode: str = "sync", counts: Sequence[int] = (3, 1, 2),
               skip: Optional[Dict[int, int]] = None) -> FaultRun:
    what = f"batches per rank {tuple(counts)}" + (f", skipped {skip}" if skip else "")
    return run_fault(f"row 13: DDP + Join, {what} [{mode}]", _w_join, len(counts), mode,
                     BN_EQUIVALENT.get(mode, {}), tuple(counts), dict(skip or {}))


def join_matches_reference(run: FaultRun, counts: Sequence[int],
                           skip: Optional[Dict[int, int]] = None) -> float:
    """The largest difference, over ranks, parameters and buffers, from the reference."""
    expected = _join_reference(counts, dict(skip or {}))
    worst = 0.0
    for rank in range(run.world):
        got = run.value(rank)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            worst = max(worst, (got[key].double() - value.double()).abs().max().item())
    return worst


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
def _w_join_not_first(rank: int, world: int) -> str:
    model = DDP(_join_net("sync", {}))
    start_clock()
    with Join([model, distnorm.joinable(model)]):
        x, g = _join_batches((1,))[0][0]
        (model(x) * g).sum().backward()
    return "finished"


def _w_join_without_a_batch(rank: int, world: int) -> str:
    os.environ["DISTNORM_TIMEOUT"] = str(DEADLINE_S)
    model = _join_net("sync", {})
    start_clock()
    with Join([distnorm.joinable(model)]):
        if rank == 0:
            x, g = _join_batches((1,))[0][0]
            (model(x) * g).sum().backward()
    return "finished"


def fault_join_not_first() -> FaultRun:
    return run_fault("row 14: Join([ddp, distnorm.joinable(ddp)])", _w_join_not_first, 2)


def fault_join_without_a_batch() -> FaultRun:
    return run_fault("row 14: Join, rank 1 has no batch at all", _w_join_without_a_batch, 2)


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
def _compile_shards() -> List[List[torch.Tensor]]:
    gen = torch.Generator().manual_seed(15)
    steps = [[torch.randn(5, 4, generator=gen, dtype=torch.float64) * (1 + r) + r
              for r in range(2)] for _ in range(3)]
    steps[1][1][2, 1] = math.nan  # rank 1's batch of step 1
    return steps


def _w_compiled_nonfinite(rank: int, world: int, policy: str, fullgraph: bool) -> Dict[str, Any]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    if fullgraph:  # one converted layer, traced whole
        model = distnorm.convert_model(nn.BatchNorm1d(4).double(), nonfinite=policy)
        layer = model
    else:
        model = distnorm.convert_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4),
                                                     nn.ReLU()).double(), nonfinite=policy)
        layer = model[1]
    step = torch.compile(model, fullgraph=fullgraph)
    out: Dict[str, Any] = {"y": [], "running": []}
    shards = _compile_shards()
    for s in range(2):
        x = shards[s][rank].clone().requires_grad_()
        y = step(x)
        y.square().sum().backward()
        out["y"].append(y.detach())
        out["running"].append((layer.running_mean.clone(), layer.running_var.clone()))
    try:  # the next eager call: where a compiled graph's record can be raised
        model(shards[2][rank])
        out["eager"] = None
    except NonFiniteError as error:
        out["eager"] = str(error)
    return out


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
class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, self.stem(x), use_reentrant=False))


def _checkpointed(synced: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Checkpointed().double()
    return distnorm.convert_model(model, mode="sync") if synced else model


def _checkpoint_data() -> List[List[torch.Tensor]]:
    gen = torch.Generator().manual_seed(16)
    return [[torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
             for n in (3, 2)] for _ in range(2)]


def _w_checkpointed(rank: int, world: int) -> Dict[str, Any]:
    model = _checkpointed(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in _checkpoint_data():
        x = step[rank].clone().requires_grad_()
        y = model(x)
        (y * torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1)).sum().backward()
        for p in model.parameters():  # DDP's sum, written out
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
    return {"y": y.detach(), "dx": x.grad, "state": model.state_dict()}


def checkpoint_difference(results: List[Dict[str, Any]]) -> float:
    """The largest difference of the ranks' outputs, input gradients, parameters and
    running statistics from nn.BatchNorm's under the same checkpointing, on the
    concatenated batch; asserts that both updated the running statistics twice."""
    ref = _checkpointed(False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in _checkpoint_data():
        x = torch.cat(step).requires_grad_()
        y = ref(x)
        (y * torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1)).sum().backward()
        opt.step()
        opt.zero_grad()
    # The recomputation in backward runs the block's forward again: its running
    # statistics are updated twice per step, by nn.BatchNorm as by distnorm.
    assert int(ref.block[0].num_batches_tracked) == 4 and int(ref.head.num_batches_tracked) == 2
    rows = {0: slice(0, 3), 1: slice(3, 5)}
    worst = 0.0
    for rank, out in enumerate(results):
        pairs = [(out["y"], y.detach()[rows[rank]]), (out["dx"], x.grad[rows[rank]])]
        pairs += [(out["state"][key], value) for key, value in ref.state_dict().items()]
        worst = max([worst] + [(a.double() - b.double()).abs().max().item() for a, b in pairs])
    return worst


def test_row16_activation_checkpointing_equals_batchnorm_under_checkpointing(world2):
    assert checkpoint_difference(world2.run(_w_checkpointed)) < 1e-9
