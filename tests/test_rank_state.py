"""Per-rank state declared once (modules/_rank_state.py): out of the state_dict and the
buffers DDP broadcasts, moved with the module in its own dtype, copied and pickled,
reset in place, saved and restored per layer and per model."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import distnorm

C = 4

# mode -> (options, the per-rank attributes the layer declares)
DECLARED = {
    "brn": ({"r_max": 1.5, "d_max": 0.5}, {"r_clip_count", "d_clip_count", "clip_steps"}),
    "cmbn": ({"accumulation_steps": 3}, {"_cycle_sums", "_position"}),
    "cbn": ({"window": 3}, {"_step", "_recorded", "_hist_count", "_hist_has_d", "_hist_mean",
                            "_hist_sq", "_hist_comp_sum", "_hist_comp_sq", "_hist_bias",
                            "_hist_dsum", "_hist_dsq", "_prev_weight"}),
}


def _net(mode: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                        nn.BatchNorm2d(C))
    return distnorm.convert_model(net, mode=mode, **DECLARED[mode][0])


def _train(net: nn.Module, steps: range) -> list:
    outs = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(2, 3, 6, 6, generator=gen) * 2 + 1
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.05 * p.grad
                p.grad = None
        outs.append(y.detach())
    return outs


@pytest.mark.parametrize("mode", sorted(DECLARED))
def test_declared_once_and_kept_out_of_checkpoints_and_buffers(mode):
    net = _net(mode)
    _train(net, range(2))
    layer = net[1]
    assert set(layer.rank_state_names()) == DECLARED[mode][1]
    assert set(net.state_dict()) == set(nn.Sequential(
        nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
        nn.BatchNorm2d(C)).state_dict())
    buffers = {name.split(".")[-1] for name, _ in net.named_buffers()}
    assert not buffers & DECLARED[mode][1]  # DDP's broadcast_buffers never sees them


@pytest.mark.parametrize("mode", sorted(DECLARED))
def test_moves_with_the_module_in_its_own_dtype(mode):
    net = _net(mode)
    _train(net, range(2))
    before = {k: v for k, v in net[1].rank_state_dict().items() if torch.is_tensor(v)}
    net.half()
    for name, value in before.items():
        now = getattr(net[1], name)
        assert now.dtype == value.dtype, name   # float64 sums survive model.half()
        assert torch.equal(now, value), name
    net.to("meta")
    assert all(getattr(net[1], n).device.type == "meta" for n in before)
    net.to_empty(device="cpu")
    assert all(getattr(net[1], n).device.type == "cpu" and getattr(net[1], n).dtype == v.dtype
               for n, v in before.items())


@pytest.mark.parametrize("mode", sorted(DECLARED))
def test_deepcopy_and_pickle_keep_the_state(mode):
    net = _net(mode)
    _train(net, range(2))
    saved = net[1].rank_state_dict()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)),
                  torch.load(buffer, weights_only=False)):
        state = other[1].rank_state_dict()
        assert set(state) == set(saved)
        for name, value in saved.items():
            if torch.is_tensor(value):
                assert torch.equal(state[name], value) and state[name] is not value, name
            else:
                assert state[name] == value, name
        # the copy declares its own table: resetting it leaves the original alone
        other[1].reset_rank_state()
        assert net[1].rank_state_dict().keys() == saved.keys()
    assert torch.equal(_train(copy.deepcopy(net), range(2, 3))[0],
                       _train(pickle.loads(pickle.dumps(net)), range(2, 3))[0])


@pytest.mark.parametrize("mode", sorted(DECLARED))
def test_model_rank_state_round_trip_resumes_exactly(mode):
    net = _net(mode)
    _train(net, range(2))
    saved = distnorm.rank_state_dict(net)
    assert sorted(saved) == ["1", "4"]
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "ranks": saved}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _net(mode, seed=7)
    resumed.load_state_dict(checkpoint["model"])
    distnorm.load_rank_state_dict(resumed, checkpoint["ranks"])
    for a, b in zip(_train(net, range(2, 5)), _train(resumed, range(2, 5))):
        assert torch.equal(a, b)


def test_reset_is_in_place_and_keeps_what_is_declared_to_outlive_it():
    bn = distnorm.CrossIterationBatchNorm(C, window=3)
    conv = nn.Conv2d(3, C, 3)
    for _ in range(3):
        bn(conv(torch.randn(2, 3, 6, 6))).sum().backward()
    count = bn._hist_count
    assert bn._step == 3 and bn._recorded == 3 and bn._hist_dsq is not None
    bn.reset_history()
    assert bn._hist_count is count and not count.any()   # zeroed in place
    assert bn._step == 3 and bn._recorded == 0 and bn._hist_dsq is None
    cm = distnorm.CrossMiniBatchNorm(C, accumulation_steps=3)
    cm(torch.randn(2, C, 3, 3))
    sums = cm._cycle_sums
    distnorm.reset_accumulation(cm)
    assert cm.position == 0 and cm._cycle_sums is sums and not sums.any()


def test_loading_refuses_state_of_another_layout():
    brn = distnorm.BatchRenorm(C)
    state = brn.rank_state_dict()
    with pytest.raises(ValueError, match=r"BatchRenorm: saved per-rank state 'r_clip_count' has "
                                         r"shape \(5,\)"):
        brn.load_rank_state_dict(distnorm.BatchRenorm(C + 1).rank_state_dict())
    del state["clip_steps"]
    with pytest.raises(KeyError, match="clip_steps"):
        brn.load_rank_state_dict(state)
    net = _net("brn")
    with pytest.raises(KeyError, match=r"\['9'\] are not in the model.*\['4'\]"):
        distnorm.load_rank_state_dict(net, {"1": net[1].rank_state_dict(),
                                            "9": net[4].rank_state_dict()})
    assert distnorm.rank_state_dict(distnorm.convert_model(nn.BatchNorm2d(C))) == {}
    with pytest.raises(TypeError, match="tensor of zeros, a number or None"):
        brn.add_rank_state("bad", "text")  # type: ignore[arg-type]


def test_history_state_alias_reads_the_earlier_keys():
    conv = nn.Conv2d(3, C, 3)
    bn = distnorm.CrossIterationBatchNorm(C, window=3).attach(conv)
    for _ in range(2):
        bn(conv(torch.randn(2, 3, 6, 6))).sum().backward()
    state = bn.history_state()
    assert state["window"] == 3 and state["_step"] == 2
    earlier = {k: v for k, v in state.items() if v is not None and k not in ("_step", "_recorded")}
    earlier.update(step=2, recorded=2)   # the format saved before per-rank state was declared
    other = distnorm.CrossIterationBatchNorm(C, window=3)
    other.load_history_state(earlier)
    assert other._step == 2 and other._recorded == 2
    assert torch.equal(other._hist_dsq, bn._hist_dsq)
    with pytest.raises(ValueError, match="window 3 cannot load into window 4"):
        distnorm.CrossIterationBatchNorm(C, window=4).load_history_state(state)
