"""``nonfinite="raise"`` in training loops whose every step is compiled (issue 23
item 4, issue 22 item 7): the error arrives without an eager call.

A compiled graph cannot read the host while it runs, so a non-finite rank's bits are
kept in a device flag of the layer's; a custom operator opaque to the compiler checks
it at the graph's next forward (on CPU at once: the step after the bad one; on CUDA
two steps after it, by an asynchronous copy), and ``distnorm.check_nonfinite(model)``
reads every layer's flags on demand (what a CUDA-graph replay needs). Real gloo
ranks of the shared pool (whose exit codes the pool checks), torch.compile on CPU.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import pytest
import torch
from torch import nn

import distnorm
from distnorm.distributed import nonfinite

BAD_STEP = 1  # rank 1's input of this step holds a NaN


def _model(policy: str) -> nn.Module:
    torch.manual_seed(0)
    return distnorm.convert_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(),
                                                nn.Linear(4, 4), nn.BatchNorm1d(4)).double(),
                                  nonfinite=policy)


def _batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64) * (1 + rank) + rank
    if rank == 1 and step == BAD_STEP:
        x[2, 1] = math.nan
    return x


def _w_compiled_loop(rank: int, world: int, steps: int, fullgraph: bool) -> Dict[str, Any]:
    """Every step compiled (forward and backward of the compiled module; no optimizer
    step, which a NaN gradient would poison): the step at which NonFiniteError is
    raised, its message, and the running statistics then."""
    torch._dynamo.reset()
    model = _model("raise")
    step = torch.compile(model, fullgraph=fullgraph)
    out: Dict[str, Any] = {"raised_at": None, "error": None}
    for s in range(steps):
        try:
            step(_batch(rank, s)).square().sum().backward()
        except distnorm.NonFiniteError as error:
            out["raised_at"], out["error"] = s, str(error)
            break
    out["finite"] = all(bool(b.isfinite().all()) for b in model.buffers())
    # Cleared when raised: the steps after it run on.
    try:
        for s in range(steps, steps + 2):
            step(_batch(rank, s)).sum().backward()
        out["after"] = "ok"
    except distnorm.NonFiniteError as error:
        out["after"] = str(error)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True], ids=["compile", "fullgraph"])
def test_every_step_compiled_raises_within_two_steps_on_every_rank(fullgraph, world2):
    results = world2.run(_w_compiled_loop, 5, fullgraph, timeout=600)
    for rank, out in enumerate(results):
        assert out["raised_at"] is not None, (rank, out)
        assert BAD_STEP < out["raised_at"] <= BAD_STEP + 2, (rank, out)
        # Both layers, once: rank 1's NaN makes its own output of layer 1 NaN too.
        assert "SyncBatchNorm '1' on rank(s) [1]" in out["error"], (rank, out)
        assert "SyncBatchNorm '4' on rank(s) [1]" in out["error"], (rank, out)
        assert out["finite"] and out["after"] == "ok", (rank, out)
    assert len({out["raised_at"] for out in results}) == 1, results


def _w_check_after_bad_step(rank: int, world: int) -> Dict[str, Any]:
    """Compiled steps up to and including the bad one, then check_nonfinite: it raises
    naming the layers and ranks, once (the flags are cleared)."""
    torch._dynamo.reset()
    model = _model("raise")
    step = torch.compile(model)
    for s in range(BAD_STEP + 1):
        step(_batch(rank, s)).sum().backward()
    out: Dict[str, Any] = {}
    try:
        distnorm.check_nonfinite(model)
        out["first"] = None
    except distnorm.NonFiniteError as error:
        out["first"] = str(error)
    distnorm.check_nonfinite(model)  # cleared: nothing left to raise
    step(_batch(rank, BAD_STEP + 1)).sum().backward()  # and the graph raises nothing either
    skip = _model("skip")
    out["skip"] = "ok"
    compiled_skip = torch.compile(skip)
    for s in range(BAD_STEP + 2):
        compiled_skip(_batch(rank, s)).sum().backward()
    distnorm.check_nonfinite(skip)  # "skip" records nothing to raise
    return out


@pytest.mark.slow
def test_check_nonfinite_after_a_bad_compiled_step(world2):
    for out in world2.run(_w_check_after_bad_step, timeout=600):
        assert out["first"] is not None, out
        # Rank 1's NaN went through both synced layers (its own output of the first
        # is NaN; the other rank's statistics stay finite).
        assert "SyncBatchNorm '1' on rank(s) [1]" in out["first"], out
        assert "SyncBatchNorm '4' on rank(s) [1]" in out["first"], out


def test_check_nonfinite_is_silent_without_synced_layers_and_on_fresh_ones():
    distnorm.check_nonfinite(nn.Sequential(nn.Linear(2, 2)))
    distnorm.check_nonfinite(_model("raise"))


def test_the_operator_raises_at_the_next_forward_once():
    """On CPU: the bits of one forward are raised at the layer's next forward, compiled
    (the operator) or eager (raise_pending), once; other layers are not affected."""
    bad, good = (torch.tensor([2.0], dtype=torch.float64),  # bit of group rank 1
                 torch.tensor([0.0], dtype=torch.float64))
    op = torch.ops.distnorm.raise_nonfinite
    op(bad, "#a", "layer A", "no such group")
    op(good, "#b", "layer B", "no such group")
    with pytest.raises(distnorm.NonFiniteError, match=r"layer A on rank\(s\) \[1\]"):
        op(good, "#a", "layer A", "no such group")
    op(good, "#a", "layer A", "no such group")
    op(bad, "#a", "layer A", "no such group")
    with pytest.raises(distnorm.NonFiniteError, match=r"layer A on rank\(s\) \[1\]"):
        nonfinite.raise_pending("#a", "layer A", "no such group", torch.device("cpu"))
    nonfinite.raise_pending("#a", "layer A", "no such group", torch.device("cpu"))
    assert bad.item() == 2.0  # the operator leaves its argument alone


def test_check_nonfinite_reads_replay_flags_and_records_once():
    """Flags CUDA-graph replays leave and the last compiled step's record are read,
    named and cleared; those of other models' layers are left alone. No process group
    needed (ranks named as group ranks)."""
    model, other = _model("raise"), distnorm.SyncBatchNorm(4)  # layers "1", "4"; "#n"
    layer, second = model[1]._sync_context(), model[4]._sync_context()
    stranger = other._sync_context()
    cpu = torch.device("cpu")
    nonfinite.replay_flags(second.identity, second.name, "g", cpu).fill_(1.0 + 4.0)
    nonfinite.replay_flags(stranger.identity, stranger.name, "g", cpu).fill_(2.0)
    torch.ops.distnorm.raise_nonfinite(torch.tensor([8.0], dtype=torch.float64), layer.identity,
                                       layer.name, "g")
    with pytest.raises(distnorm.NonFiniteError) as raised:
        distnorm.check_nonfinite(model)
    assert "SyncBatchNorm '4' on rank(s) [0, 2]" in str(raised.value), raised.value
    assert "SyncBatchNorm '1' on rank(s) [3]" in str(raised.value), raised.value
    distnorm.check_nonfinite(model)
    with pytest.raises(distnorm.NonFiniteError, match=r"rank\(s\) \[1\]"):
        distnorm.check_nonfinite(other)
    assert nonfinite.OPERATOR == "distnorm::raise_nonfinite"
