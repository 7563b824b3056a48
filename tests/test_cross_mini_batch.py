"""CrossMiniBatchNorm (CmBN, docs/algorithms.md §3), local and synced over gloo.

The reference is written here from §3 with plain autograd ops in float64: at
micro-batch j of a cycle the layer normalizes with the mean and biased variance of
the concatenation of micro-batches 1..j, the earlier ones detached (constants), so
autograd gives exactly ∂L/∂x = γ/σ̂ (g − A_j/M − x̂ B_j/M). Running statistics move
once per cycle with the moments of the whole cycle (unbiased variance).
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import distnorm
from distnorm.modules.cross_mini_batch import accumulation_steps_from

EPS = 1e-5
C = 3


# -- the reference ------------------------------------------------------------------

def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def reference_cycle(micro: Sequence[Tensor], grads: Sequence[Tensor], weight: Tensor,
                    bias: Tensor, eps: float = EPS):
    """Outputs, input gradients and accumulated (weight, bias) gradients of one cycle,
    with loss_j = Σ y_j · grads[j] back-propagated after every micro-batch."""
    w = weight.detach().double().clone().requires_grad_()
    b = bias.detach().double().clone().requires_grad_()
    seen: List[Tensor] = []
    outs, xgrads = [], []
    for x, g in zip(micro, grads):
        x = x.detach().double().clone().requires_grad_()
        together = torch.cat(seen + [x])          # earlier micro-batches: constants
        dims = [0] + list(range(2, x.dim()))
        mean = together.mean(dims, keepdim=True)
        var = (together - mean).square().mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps) * _view(w, x) + _view(b, x)
        (y * g.double()).sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
        seen.append(x.detach())
    return outs, xgrads, w.grad, b.grad


def reference_running(cycles: Sequence[Sequence[Tensor]], momentum: Optional[float]):
    """running_mean, running_var after one update per cycle with the cycle's moments."""
    mean = torch.zeros(C, dtype=torch.float64)
    var = torch.ones(C, dtype=torch.float64)
    for n, cycle in enumerate(cycles, start=1):
        together = torch.cat([x.double() for x in cycle])
        dims = [0] + list(range(2, together.dim()))
        f = momentum if momentum is not None else 1.0 / n
        mean = (1 - f) * mean + f * together.mean(dims)
        var = (1 - f) * var + f * together.var(dims, unbiased=True)
    return mean, var


def run_layer(layer: nn.Module, micro: Sequence[Tensor], grads: Sequence[Tensor]):
    """Forward + backward of each micro-batch; parameter gradients accumulate."""
    outs, xgrads = [], []
    for x, g in zip(micro, grads):
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * g).sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
    return outs, xgrads


def make_layer(accumulation_steps: int, momentum: Optional[float] = 0.1, seed: int = 0,
               **kwargs) -> distnorm.CrossMiniBatchNorm:
    layer = distnorm.CrossMiniBatchNorm(C, momentum=momentum, accumulation_steps=accumulation_steps,
                                        dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    return layer


def data(sizes: Sequence[int], tail: Tuple[int, ...] = (4, 3), seed: int = 0,
         offset: float = 2.0) -> Tuple[List[Tensor], List[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn((n, C) + tail, generator=gen, dtype=torch.float64) * 1.5 + offset
          for n in sizes]
    gs = [torch.randn((n, C) + tail, generator=gen, dtype=torch.float64) for n in sizes]
    return xs, gs


def assert_all_close(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
    assert len(actual) == len(expected)
    for j, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8, msg=lambda m: f"micro-batch {j}: {m}")


# -- local: the §3 reference ---------------------------------------------------------

@pytest.mark.parametrize("tail", [(), (5,), (4, 3)], ids=["1d", "2d-seq", "2d"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_matches_reference_over_two_cycles(tail, momentum):
    layer = make_layer(3, momentum=momentum)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    cycles = []
    for k, sizes in enumerate([(2, 5, 3), (4, 0, 2)]):   # an empty micro-batch too
        xs, gs = data(sizes, tail, seed=k)
        cycles.append(xs)
        layer.zero_grad()
        outs, xgrads = run_layer(layer, xs, gs)
        ref_out, ref_xgrad, ref_w, ref_b = reference_cycle(xs, gs, w0, b0)
        assert_all_close(outs, ref_out)
        assert_all_close(xgrads, ref_xgrad)
        torch.testing.assert_close(layer.weight.grad, ref_w)   # accumulated over the cycle
        torch.testing.assert_close(layer.bias.grad, ref_b)
        assert layer.position == 0
        assert int(layer.num_batches_tracked) == k + 1     # counts cycles
    mean, var = reference_running(cycles, momentum)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)


def test_running_stats_move_once_per_cycle():
    layer = make_layer(3)
    xs, _ = data((2, 3, 2))
    for j, x in enumerate(xs[:2]):
        layer(x)
        assert layer.position == j + 1
        torch.testing.assert_close(layer.running_mean, torch.zeros(C, dtype=torch.float64))
        torch.testing.assert_close(layer.running_var, torch.ones(C, dtype=torch.float64))
        assert int(layer.num_batches_tracked) == 0
    layer(xs[2])
    assert layer.position == 0 and int(layer.num_batches_tracked) == 1


def test_last_micro_batch_is_batch_norm_of_the_cycle():
    a = 4
    layer = make_layer(a)
    xs, gs = data((2, 1, 3, 2), seed=3)
    outs, _ = run_layer(layer, xs, gs)
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    bn.load_state_dict(make_layer(a).state_dict())   # same γ, β
    full = bn(torch.cat(xs)).detach()
    torch.testing.assert_close(outs[-1], full[-xs[-1].shape[0]:])
    # ... and the one running update is BatchNorm's single step over the whole cycle.
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_step_cycles_are_batch_norm(dtype):
    layer = distnorm.CrossMiniBatchNorm(C, accumulation_steps=1, dtype=dtype)
    bn = nn.BatchNorm2d(C, dtype=dtype)
    with torch.no_grad():
        for m in (layer, bn):
            m.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for step, sizes in enumerate([(4,), (3,), (5,)]):
        xs, gs = data(sizes, seed=10 + step)
        x, g = xs[0].to(dtype), gs[0].to(dtype)
        (y1,), (gx1,) = run_layer(layer, [x], [g])
        (y2,), (gx2,) = run_layer(bn, [x], [g])
        torch.testing.assert_close(y1, y2, **tol)
        torch.testing.assert_close(gx1, gx2, **tol)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, bn.bias.grad, **tol)
    torch.testing.assert_close(layer.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(layer.running_var, bn.running_var, **tol)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 3


# -- the cycle: reset, eval, bad input ------------------------------------------------

def test_reset_accumulation_discards_a_partial_cycle():
    model = nn.Sequential(nn.Identity(), nn.Sequential(make_layer(3)))
    layer = model[1][0]
    partial, _ = data((3, 2), seed=7, offset=50.0)  # would show up in any statistic
    for x in partial:
        layer(x)
    assert layer.position == 2
    distnorm.reset_accumulation(model)
    assert layer.position == 0
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_mean, torch.zeros(C, dtype=torch.float64))

    xs, gs = data((2, 3, 1), seed=8)
    outs, xgrads = run_layer(layer, xs, gs)
    fresh = make_layer(3)
    ref_outs, ref_xgrads = run_layer(fresh, xs, gs)
    assert_all_close(outs, ref_outs)
    assert_all_close(xgrads, ref_xgrads)
    torch.testing.assert_close(layer.running_mean, fresh.running_mean)
    torch.testing.assert_close(layer.running_var, fresh.running_var)
    assert int(layer.num_batches_tracked) == 1


def test_eval_in_the_middle_of_a_cycle_does_not_disturb_it():
    xs, gs = data((2, 3, 2, 2, 4, 1), seed=9)        # two cycles of 3
    probe, _ = data((5,), seed=10)
    plain = make_layer(3)
    ref_outs, ref_xgrads = run_layer(plain, xs, gs)

    layer = make_layer(3)
    outs, xgrads = [], []
    for j, (x, g) in enumerate(zip(xs, gs)):
        o, gx = run_layer(layer, [x], [g])
        outs += o
        xgrads += gx
        if j in (0, 4):                               # mid-cycle, in both cycles
            running = (layer.running_mean.clone(), layer.running_var.clone())
            position = layer.position
            layer.eval()
            with torch.no_grad():
                y = layer(probe[0])
            expected = nn.functional.batch_norm(probe[0], *running, layer.weight, layer.bias,
                                                False, 0.0, EPS)
            torch.testing.assert_close(y, expected)
            layer.train()
            assert layer.position == position
            torch.testing.assert_close(layer.running_mean, running[0])
    assert_all_close(outs, ref_outs)
    assert_all_close(xgrads, ref_xgrads)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)
    assert int(layer.num_batches_tracked) == int(plain.num_batches_tracked) == 2


def test_channel_mismatch_mid_cycle_is_rejected_and_keeps_the_cycle():
    layer = make_layer(3)
    layer._distnorm_name = "neck.bn"
    xs, _ = data((2, 2))
    layer(xs[0])
    with pytest.raises(ValueError, match=r"CrossMiniBatchNorm 'neck\.bn'.*expected 3 channels.*"
                                         r"\(2, 5, 4, 3\)"):
        layer(torch.randn(2, 5, 4, 3, dtype=torch.float64))
    assert layer.position == 1
    reference = make_layer(3)
    reference(xs[0])
    torch.testing.assert_close(layer(xs[1]), reference(xs[1]))


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "4", None])
def test_bad_accumulation_steps(value):
    with pytest.raises(ValueError, match=r"CrossMiniBatchNorm: accumulation_steps must be an "
                                         r"integer >= 1 \(got "):
        distnorm.CrossMiniBatchNorm(C, accumulation_steps=value)


def test_bad_accumulation_steps_on_convert_and_assignment():
    model = nn.Sequential(nn.Conv2d(2, C, 1), nn.BatchNorm2d(C))
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1 \\(got 0\\)"):
        distnorm.convert_model(model, mode="cmbn", accumulation_steps=0)
    assert isinstance(model[1], nn.BatchNorm2d)
    distnorm.convert_model(model, mode="cmbn", accumulation_steps=2)
    with pytest.raises(ValueError, match=r"CrossMiniBatchNorm '1': accumulation_steps"):
        model[1].accumulation_steps = 0
    assert model[1].accumulation_steps == 2


def test_partial_cycle_sums_stay_float64_through_casts():
    layer = make_layer(3)
    xs, _ = data((2, 2))
    layer(xs[0])
    before = layer._cycle_sums.clone()
    assert "_cycle_sums" not in dict(layer.named_buffers())   # DDP must not broadcast it
    layer.float()
    assert layer.weight.dtype == torch.float32
    assert layer._cycle_sums.dtype == torch.float64
    assert torch.equal(layer._cycle_sums, before)
    layer.double()
    reference = make_layer(3)
    reference(xs[0])
    torch.testing.assert_close(layer(xs[1]), reference(xs[1]))


# -- state_dict, convert_model --------------------------------------------------------

def test_state_dict_is_batch_norms():
    layer = distnorm.CrossMiniBatchNorm(C, accumulation_steps=2)
    bn = nn.BatchNorm2d(C)
    state, plain = layer.state_dict(), bn.state_dict()
    assert list(state) == list(plain)
    assert all(state[k].shape == plain[k].shape and state[k].dtype == plain[k].dtype for k in state)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    layer.load_state_dict(bn.state_dict(), strict=True)
    bn.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(layer.running_mean, bn.running_mean)
    assert "accumulation_steps=2" in repr(layer)


def test_convert_model_cmbn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(),
                          nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)).double()
    keys = list(model.state_dict())
    bn1 = model[1]
    reference = copy.deepcopy(model)
    distnorm.convert_model(model, mode="cmbn", accumulation_steps=2)
    assert all(type(model[i]) is distnorm.CrossMiniBatchNorm for i in (1, 4))
    assert model[1].accumulation_steps == model[4].accumulation_steps == 2
    assert model[1].weight is bn1.weight and model[1].running_mean is bn1.running_mean
    assert list(model.state_dict()) == keys

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64) for n in (2, 3)]
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    for x in xs:
        model(x).sum().backward()
    # The first layer's last micro-batch sees the whole cycle: BatchNorm on the
    # concatenation (later layers' inputs differ: earlier micro-batches were
    # normalized with partial moments).
    full = reference[:2](torch.cat(xs))
    torch.testing.assert_close(seen[-1], full[-3:])
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert [int(model[i].num_batches_tracked) for i in (1, 4)] == [1, 1]
    assert model[4].position == 0
    distnorm.revert_model(model)
    assert all(type(model[i]) is nn.BatchNorm2d for i in (1, 4))


# -- DeepSpeed's gradient_accumulation_steps --------------------------------------------

class _FakeEngine:
    """What distnorm reads from a ``deepspeed.DeepSpeedEngine``."""

    def __init__(self, steps: int) -> None:
        self._steps = steps

    def gradient_accumulation_steps(self) -> int:
        return self._steps


class _FakeConfig:
    """A ``DeepSpeedConfig``: the value is a plain attribute."""

    gradient_accumulation_steps = 6


def test_accumulation_steps_from_deepspeed(tmp_path, monkeypatch):
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    assert accumulation_steps_from(config) == 4
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    assert accumulation_steps_from(path) == 4
    assert accumulation_steps_from(str(path)) == 4
    assert accumulation_steps_from(_FakeEngine(8)) == 8
    assert accumulation_steps_from(_FakeConfig()) == 6
    # DeepSpeed's own rule when the value is left out.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accumulation_steps_from({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3}) == 4
    assert accumulation_steps_from({"train_batch_size": 24}) == 1
    with pytest.raises(ValueError, match="not divisible"):
        accumulation_steps_from({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3})
    with pytest.raises(ValueError, match="'auto'.*engine"):
        accumulation_steps_from({"gradient_accumulation_steps": "auto"})
    with pytest.raises(ValueError, match=r"integer >= 1 \(got 0\)"):
        accumulation_steps_from(_FakeEngine(0))
    with pytest.raises(TypeError, match="DeepSpeed engine.*got int"):
        accumulation_steps_from(3)

    model = distnorm.convert_model(nn.Sequential(nn.Conv2d(2, C, 1), nn.BatchNorm2d(C)),
                                   mode="cmbn", accumulation_steps=accumulation_steps_from(config))
    assert model[1].accumulation_steps == 4


# -- synced over gloo ----------------------------------------------------------------------

# Micro-batch sizes [rank][cycle][j]: uneven, empty on a rank, and (cycle 2, j = 2)
# empty on every rank.
SIZES = [[[3, 0, 2], [2, 0, 1]],
         [[1, 2, 0], [0, 0, 3]]]


def _synced_cycles(rank, world, shards, grads, momentum):
    layer = make_layer(3, momentum=momentum)
    out = {"y": [], "gx": [], "gw": [], "gb": []}
    for cycle_x, cycle_g in zip(shards[rank], grads[rank]):
        layer.zero_grad()
        y, gx = run_layer(layer, cycle_x, cycle_g)
        out["y"].append(y)
        out["gx"].append(gx)
        out["gw"].append(layer.weight.grad.clone())
        out["gb"].append(layer.bias.grad.clone())
    out.update(mean=layer.running_mean.clone(), var=layer.running_var.clone(),
               tracked=int(layer.num_batches_tracked), position=layer.position)
    return out


def _split(sizes_by_rank, seed):
    """Per-rank micro-batches and the concatenated ones, [cycle][j]."""
    world = len(sizes_by_rank)
    shards = [[[], []] for _ in range(world)]
    grads = [[[], []] for _ in range(world)]
    full_x, full_g = [[], []], [[], []]
    for k in range(2):
        for j in range(3):
            per_rank = [sizes_by_rank[r][k][j] for r in range(world)]
            xs, gs = data([sum(per_rank)], seed=seed + 10 * k + j)
            full_x[k].append(xs[0])
            full_g[k].append(gs[0])
            for r, (x, g) in enumerate(zip(xs[0].split(per_rank), gs[0].split(per_rank))):
                shards[r][k].append(x.contiguous())
                grads[r][k].append(g.contiguous())
    return shards, grads, full_x, full_g


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_synced_equals_reference_on_concatenation(world2, momentum):
    shards, grads, full_x, full_g = _split(SIZES, seed=20)
    results = world2.run(_synced_cycles, shards, grads, momentum)
    w0, b0 = make_layer(3).weight.detach(), make_layer(3).bias.detach()
    for k in range(2):
        ref_out, ref_xgrad, ref_w, ref_b = reference_cycle(full_x[k], full_g[k], w0, b0)
        assert_all_close([torch.cat([r["y"][k][j] for r in results]) for j in range(3)], ref_out)
        assert_all_close([torch.cat([r["gx"][k][j] for r in results]) for j in range(3)], ref_xgrad)
        torch.testing.assert_close(sum(r["gw"][k] for r in results), ref_w)
        torch.testing.assert_close(sum(r["gb"][k] for r in results), ref_b)
    mean, var = reference_running(full_x, momentum)
    for r in results:
        torch.testing.assert_close(r["mean"], mean)
        torch.testing.assert_close(r["var"], var)
        assert r["tracked"] == 2 and r["position"] == 0


def _ddp_training(rank, world, shards, grads, steps, init):
    torch.manual_seed(0)
    model = _small_model()
    model.load_state_dict(init)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    outs = []
    for k in range(len(shards[rank])):
        for j, (x, g) in enumerate(zip(shards[rank][k], grads[rank][k])):
            last = j == steps - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                y = ddp(x)
                (y * g).sum().backward()
            outs.append(y.detach())
        opt.step()
        opt.zero_grad()
    return {"y": outs, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(C, C, 1), distnorm.CrossMiniBatchNorm(C, accumulation_steps=3),
                         nn.ReLU(), nn.Conv2d(C, C, 1)).double()


def test_ddp_no_sync_accumulation(world2):
    """Plain gradient accumulation under DDP: no_sync() for micro-batches 1..A-1, the
    optimizer steps every A. Equals one process on the concatenated micro-batches
    (DDP averages gradients over ranks: the reference loss is divided by W)."""
    shards, grads, full_x, full_g = _split(SIZES, seed=40)
    torch.manual_seed(0)
    model = _small_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    results = world2.run(_ddp_training, shards, grads, 3, init)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = []
    for k in range(2):
        for x, g in zip(full_x[k], full_g[k]):
            y = model(x)
            ((y * g).sum() / 2).backward()
            outs.append(y.detach())
        opt.step()
        opt.zero_grad()
    assert_all_close([torch.cat([r["y"][i] for r in results]) for i in range(6)], outs)
    for r in results:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, msg=lambda m: f"{key}: {m}")


def _ddp_local_cmbn(rank, world, shards):
    """A local CmBN per rank (a one-rank process group) under DDP, gradients
    synchronized at every micro-batch (no no_sync): DDP's buffer broadcast must not
    hand rank 0's partial cycle to rank 1."""
    torch.manual_seed(0)
    model = _small_model()
    plain = copy.deepcopy(model)
    model[1].process_group = plain[1].process_group = distnorm.distributed.group_by(1)
    ddp = nn.parallel.DistributedDataParallel(model)
    diffs = []
    for x in shards[rank][0]:
        y = ddp(x)
        y.sum().backward()
        diffs.append((y - plain(x)).abs().max().item())
    diffs.append((model[1].running_mean - plain[1].running_mean).abs().max().item())
    return diffs


def test_ddp_keeps_each_ranks_partial_cycle(world2):
    shards, _, _, _ = _split([[[2, 3, 2], [1, 1, 1]], [[3, 1, 2], [1, 1, 1]]], seed=60)
    shards[1] = [[x * 10 + 5 for x in cycle] for cycle in shards[1]]   # ranks differ
    for diffs in world2.run(_ddp_local_cmbn, shards):
        assert max(diffs) < 1e-12, diffs
