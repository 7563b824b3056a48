"""``distnorm.CycleBatchNorm``: per-level statistics under one shared affine.

The oracle: ``length`` separate ``torch.nn.BatchNorm*d(affine=False)`` layers and one
shared weight and bias, level ℓ applied (in training) to the concatenation of every
rank's level-ℓ batch. Over 3 real gloo ranks with uneven and empty shards, in float64,
the layer's outputs, input gradients, weight/bias gradients (summed over ranks and
levels), each level's running statistics, and its eval outputs (each level with its
own statistics) equal the oracle's. Loss: L = Σ_ℓ Σ y_ℓ · G_ℓ over the global batch
(see tests/test_sync_parity.py), so rank r's input gradient is the r-th shard of the
oracle's and the oracle's parameter gradients are the ranks' sum.

Worker functions are module level: the pool pickles them by reference.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any, Dict, Sequence, Tuple

import pytest
import torch
from torch import nn

import distnorm
from distnorm.modules.cycle_batch_norm import LocalBatchNorm

TOL = dict(rtol=1e-7, atol=1e-9)
C = 3
MOMENTUM = 0.3
_BN_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# Per step, per level, per rank: batch sizes. Rank 1 holds nothing at level 0 of step
# 0, rank 2 nothing at level 2; no level is empty over the whole group.
SIZES = [[[2, 0, 3], [1, 2, 1], [3, 1, 0]],
         [[1, 1, 1], [0, 2, 2], [2, 2, 1]]]
EVAL_SIZES = [2, 0, 1]  # per rank, every level
# Spatial sizes per level, per input dimension: FPN-like levels shrink.
TAILS = {"1d-flat": [(), (), ()], "1d": [(5,), (3,), (2,)], "2d": [(4, 4), (2, 2), (1, 1)],
         "3d": [(2, 3, 3), (2, 2, 2), (1, 2, 1)]}


def _case(tails: Sequence[Tuple[int, ...]], seed: int = 0) -> Dict[str, Any]:
    """Inputs and loss weights per step, level and rank; each level with its own mean
    and scale (a level normalized with another's statistics shows)."""
    gen = torch.Generator().manual_seed(seed)

    def batch(n: int, level: int) -> torch.Tensor:
        tail = tuple(tails[level])
        shape = (1, C) + (1,) * len(tail)
        mean = (torch.arange(C, dtype=torch.float64) + 3.0 * level - 1.0).view(shape)
        std = (0.5 + torch.arange(C, dtype=torch.float64) * 0.3 + level).view(shape)
        return torch.randn((n, C) + tail, generator=gen, dtype=torch.float64) * std + mean

    steps = [[{"x": [batch(n, level) for n in sizes],
               "g": [batch(n, level) for n in sizes]}
              for level, sizes in enumerate(levels)] for levels in SIZES]
    return {"steps": steps,
            "eval_x": [[batch(n, level) for n in EVAL_SIZES] for level in range(len(tails))],
            "weight": 1.0 + 0.3 * torch.randn(C, generator=gen, dtype=torch.float64),
            "bias": 0.2 * torch.randn(C, generator=gen, dtype=torch.float64)}


def _run_cycle(layer: nn.Module, case: Dict[str, Any], rank: int) -> Dict[str, Any]:
    """Train ``layer`` on rank ``rank``'s shards (one cycle per step), then evaluate."""
    with torch.no_grad():
        layer.weight.copy_(case["weight"])
        layer.bias.copy_(case["bias"])
    out: Dict[str, Any] = {"y": [], "dx": []}
    for step in case["steps"]:
        xs = [level["x"][rank].clone().requires_grad_() for level in step]
        ys = [layer(x) for x in xs]
        sum((y * level["g"][rank]).sum() for y, level in zip(ys, step)).backward()
        out["y"].append([y.detach() for y in ys])
        out["dx"].append([x.grad for x in xs])
    out["dw"], out["db"] = layer.weight.grad, layer.bias.grad
    out["state"] = layer.state_dict()
    layer.eval()
    with torch.no_grad():
        out["eval"] = [layer(xs[rank]) for xs in case["eval_x"]]
    return out


def _cycle_rank(rank: int, world: int, case: Dict[str, Any], mode: str) -> Dict[str, Any]:
    layer = distnorm.CycleBatchNorm(C, len(case["eval_x"]), momentum=MOMENTUM, mode=mode,
                                    dtype=torch.float64)
    return _run_cycle(layer, case, rank)


def _oracle(case: Dict[str, Any], dim: int) -> Dict[str, Any]:
    """``length`` nn.BatchNorm layers and one affine, on the concatenated batches."""
    length = len(case["eval_x"])
    norms = [_BN_BY_DIM[dim](C, momentum=MOMENTUM, affine=False).double() for _ in range(length)]
    weight = case["weight"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_()
    shape = (1, C) + (1,) * (dim - 2)

    def apply(level: int, x: torch.Tensor) -> torch.Tensor:
        return norms[level](x) * weight.view(shape) + bias.view(shape)

    out: Dict[str, Any] = {"y": [], "dx": []}
    for step in case["steps"]:
        xs = [torch.cat(level["x"]).requires_grad_() for level in step]
        ys = [apply(index, x) for index, x in enumerate(xs)]
        sum((y * torch.cat(level["g"])).sum() for y, level in zip(ys, step)).backward()
        out["y"].append([y.detach() for y in ys])
        out["dx"].append([x.grad for x in xs])
    out["dw"], out["db"] = weight.grad, bias.grad
    out["norms"] = norms
    for norm in norms:
        norm.eval()
    with torch.no_grad():
        out["eval"] = [[apply(level, x) for x in xs] for level, xs in enumerate(case["eval_x"])]
    return out


@pytest.mark.parametrize("dims", sorted(TAILS))
def test_matches_separate_batch_norms_on_concatenated_batches(world3, dims: str) -> None:
    case = _case(TAILS[dims])
    results = world3.run(_cycle_rank, case, "sync")
    expected = _oracle(case, len(TAILS[dims][0]) + 2)
    for rank, result in enumerate(results):
        for s, step in enumerate(SIZES):
            for level, sizes in enumerate(step):
                start = sum(sizes[:rank])
                part = slice(start, start + sizes[rank])
                where = f"rank {rank}, step {s}, level {level}"
                torch.testing.assert_close(result["y"][s][level], expected["y"][s][level][part],
                                           **TOL, msg=f"output, {where}")
                torch.testing.assert_close(result["dx"][s][level], expected["dx"][s][level][part],
                                           **TOL, msg=f"input gradient, {where}")
        for level, norm in enumerate(expected["norms"]):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(result["state"][f"{level}.{key}"], getattr(norm, key),
                                           **TOL, msg=f"rank {rank}: {level}.{key}")
            torch.testing.assert_close(result["eval"][level], expected["eval"][level][rank],
                                       **TOL, msg=f"eval output, rank {rank}, level {level}")
    torch.testing.assert_close(sum(r["dw"] for r in results), expected["dw"], **TOL)
    torch.testing.assert_close(sum(r["db"] for r in results), expected["db"], **TOL)


def _composed_rank(rank: int, world: int, case: Dict[str, Any], mode: str,
                   options: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The layer against its definition: ``length`` separate ``mode`` layers with
    affine=False, each synced on its own, and one affine applied after them."""
    length = len(case["eval_x"])
    cls = distnorm.variants()[mode]
    cycle = distnorm.CycleBatchNorm(C, length, momentum=MOMENTUM, mode=mode, dtype=torch.float64,
                                    **options)
    assert all(type(level) is cls for level in cycle.levels) and cycle.mode == mode
    levels = [cls(C, momentum=MOMENTUM, affine=False, dtype=torch.float64, **options)
              for _ in range(length)]

    class Composed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.levels = nn.ModuleList(levels)
            self.weight = nn.Parameter(torch.ones(C, dtype=torch.float64))
            self.bias = nn.Parameter(torch.zeros(C, dtype=torch.float64))
            self.position = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (1, C) + (1,) * (x.dim() - 2)
            y = self.levels[self.position](x) * self.weight.view(shape) + self.bias.view(shape)
            self.position = (self.position + 1) % length
            return y

        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return {k.replace("levels.", ""): v for k, v in super().state_dict().items()}

    return _run_cycle(cycle, case, rank), _run_cycle(Composed(), case, rank)


@pytest.mark.filterwarnings("ignore:.*does not come straight from:UserWarning")  # cbn, no conv
@pytest.mark.parametrize("mode,options", [("brn", {"r_max": 1.5, "d_max": 0.5}),
                                          ("cbn", {"window": 2}),
                                          ("cmbn", {"accumulation_steps": 2})])
def test_each_level_is_synced_like_its_mode(world3, mode: str, options: Dict[str, Any]) -> None:
    case = _case(TAILS["2d"], seed=1)
    for rank, (cycle, composed) in enumerate(world3.run(_composed_rank, case, mode, options)):
        for key in ("y", "dx"):
            for s, levels in enumerate(composed[key]):
                for level, value in enumerate(levels):
                    torch.testing.assert_close(cycle[key][s][level], value, **TOL,
                                               msg=f"{mode} {key}, rank {rank}, step {s}, level {level}")
        for key in ("dw", "db", "state", "eval"):
            torch.testing.assert_close(cycle[key], composed[key], **TOL, msg=f"{mode} {key}")


# -- one process ------------------------------------------------------------------------

def _cycle_list(length: int, channels: int = C) -> nn.ModuleList:
    """``length`` nn.BatchNorm2d(affine=False) and a shared affine (detectron2's layout)."""
    layers = nn.ModuleList([nn.BatchNorm2d(channels, affine=False) for _ in range(length)])
    layers.weight = nn.Parameter(torch.rand(channels) + 0.5)
    layers.bias = nn.Parameter(torch.randn(channels))
    return layers


def test_local_mode_is_batch_norm_per_level_for_any_dimension() -> None:
    for shape in [(4, C), (4, C, 5), (2, C, 3, 3), (2, C, 2, 3, 2)]:
        torch.manual_seed(0)
        layer = distnorm.CycleBatchNorm(C, 2, mode="bn")
        assert all(type(level) is LocalBatchNorm for level in layer.levels)
        reference = [_BN_BY_DIM[len(shape)](C, affine=False) for _ in range(2)]
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
        view = (1, C) + (1,) * (len(shape) - 2)
        for train in (True, False):
            layer.train(train)
            for norm in reference:
                norm.train(train)
            for level in (0, 1, 0, 1):
                x = torch.randn(shape) * (level + 1) + 2 * level
                expected = reference[level](x) * layer.weight.view(view) + layer.bias.view(view)
                torch.testing.assert_close(layer(x), expected)


def test_state_dict_loads_from_separate_batch_norms_and_round_trips() -> None:
    source = _cycle_list(3)
    source.train()
    for level, norm in enumerate(source):
        norm(torch.randn(4, C, 2, 2) * (level + 1) + level)
    layer = distnorm.CycleBatchNorm(C, 3)
    assert set(layer.state_dict()) == set(source.state_dict())
    layer.load_state_dict(source.state_dict())
    layer.eval()
    source.eval()
    x = torch.randn(2, C, 2, 2)
    for norm in source:
        expected = norm(x) * source.weight.view(1, C, 1, 1) + source.bias.view(1, C, 1, 1)
        torch.testing.assert_close(layer(x), expected)
    local = distnorm.CycleBatchNorm(C, 3, mode="bn")
    local.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(local.state_dict()[key], value), key


def test_pickle_and_deepcopy_keep_statistics_and_position() -> None:
    layer = distnorm.CycleBatchNorm(C, 3, momentum=None)
    for level in range(4):
        layer(torch.randn(3, C, 2) + level)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert clone.position == layer.position == 1
        assert clone.levels[0].num_batches_tracked.item() == 2
        for level, original in zip(clone.levels, layer.levels):
            assert torch.equal(level.running_mean, original.running_mean)
            assert level.running_mean.data_ptr() != original.running_mean.data_ptr()
        clone.reset_cycle()
        assert set(clone.state_dict()) == {"weight", "bias"} | {
            f"{i}.{k}" for i in range(3) for k in ("running_mean", "running_var", "num_batches_tracked")}


def test_misalignment_is_named_at_mode_switches_and_saves() -> None:
    layer = distnorm.CycleBatchNorm(C, 3)
    model = nn.Sequential(nn.Conv2d(C, C, 1), layer)
    x = torch.randn(2, C, 2, 2)
    for _ in range(3):
        model(x)
    model.eval()  # a complete cycle: fine
    model.state_dict()
    model(x)
    with pytest.raises(RuntimeError, match=r"switching to training mode.*index 1.*reset_cycle"):
        model.train()
    with pytest.raises(RuntimeError, match=r"switching to eval mode.*1 call"):
        model.eval()
    with pytest.raises(RuntimeError, match=r"saving a state_dict.*statistics set 1"):
        model.state_dict()
    distnorm.reset_accumulation(model)
    assert layer.position == 0
    model.train()
    model(x)
    layer.reset_cycle()
    model.state_dict()


def test_bad_arguments_are_named() -> None:
    for length in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match="length must be an integer >= 1"):
            distnorm.CycleBatchNorm(C, length)
    for mode in ("gn", "frozen", "bin", "switchable", "nope"):
        with pytest.raises(ValueError, match=rf"mode must be one of .*'sync'.*\(got '{mode}'\)"):
            distnorm.CycleBatchNorm(C, 2, mode=mode)
    assert distnorm.CycleBatchNorm(C, 2, mode="cross_iteration").mode == "cbn"
    with pytest.raises(TypeError, match="bad options.*window"):
        distnorm.CycleBatchNorm(C, 2, window=3)
    with pytest.raises(TypeError, match="unsynced.*process_group"):
        distnorm.CycleBatchNorm(C, 2, mode="local", process_group=object())
    layer = distnorm.CycleBatchNorm(C, 2)
    with pytest.raises(ValueError, match=r"CycleBatchNorm: expected 3 channels"):
        layer(torch.randn(2, C + 1, 2))
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.randn(C))
    with pytest.raises(TypeError, match="cannot be normalized"):
        layer(torch.randn(2, C, dtype=torch.float64))
    assert layer.position == 0  # a refused input does not advance the cycle


def test_options_reach_every_level_and_affine_is_optional() -> None:
    layer = distnorm.CycleBatchNorm(C, 2, 1e-3, 0.05, mode="brn", r_max=2.0, nonfinite="skip",
                                    timeout=5, track_running_stats=True, dtype=torch.float64)
    assert (layer.eps, layer.momentum, layer.affine) == (1e-3, 0.05, True)
    assert layer.weight.dtype == torch.float64
    for level in layer.levels:
        assert (level.r_max, level.nonfinite, level.timeout, level.affine) == (2.0, "skip", 5.0, False)
    assert "length=2, mode='brn'" in repr(layer)
    assert len(layer) == 2 and layer[1] is layer.levels[1] and list(layer) == list(layer.levels)
    group = object()  # stored, resolved only in a training forward
    assert all(level.process_group is group
               for level in distnorm.CycleBatchNorm(C, 3, process_group=group))
    bare = distnorm.CycleBatchNorm(C, 2, affine=False)
    assert bare.weight is None and set(bare.state_dict()) == {
        f"{i}.{k}" for i in range(2) for k in ("running_mean", "running_var", "num_batches_tracked")}
    x = torch.randn(4, C)
    torch.testing.assert_close(bare(x), nn.functional.batch_norm(x, None, None, training=True))


def test_gradients_of_the_shared_affine_sum_over_levels() -> None:
    layer = distnorm.CycleBatchNorm(C, 2, mode="bn")
    xs = [torch.randn(3, C, 2) + level for level in range(2)]
    sum(layer(x).pow(2).sum() for x in xs).backward()
    grads = (layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    for x in xs:  # the same calls, one backward each: the gradients add up to the same
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close((layer.weight.grad, layer.bias.grad), grads)


def test_revert_and_convert_switch_the_levels_keeping_their_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(C, C, 1), distnorm.CycleBatchNorm(C, 3))
    for level in range(3):
        model(torch.randn(2, C, 2, 2) + level)
    before = {k: v for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(2, C, 2, 2)
    expected = [model(x) for _ in range(3)]
    reverted = distnorm.revert_model(model)
    layer = reverted[1]
    assert type(layer) is distnorm.CycleBatchNorm and layer.mode == "bn"
    assert all(type(level) is LocalBatchNorm for level in layer.levels)
    assert all(before[k] is v or torch.equal(before[k], v) for k, v in reverted.state_dict().items())
    assert layer.levels[0].running_mean.data_ptr() == before["1.0.running_mean"].data_ptr()
    for want in expected:
        torch.testing.assert_close(reverted(x), want)
    converted = distnorm.convert_model(reverted, mode="cmbn", accumulation_steps=2)
    assert converted[1].mode == "cmbn" and converted[1].levels[2].accumulation_steps == 2
    assert converted[1].levels[1]._distnorm_name == "1.1"
    assert distnorm.convert_model(converted, mode="sync")[1].mode == "sync"
    # Local levels are a source of convert_model, not "left unconverted".
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distnorm.convert_model(nn.Sequential(distnorm.CycleBatchNorm(C, 2, mode="bn")))


def test_from_batch_norm_shares_the_affine_and_starts_every_level_from_its_statistics() -> None:
    bn = nn.BatchNorm2d(C)
    bn(torch.randn(4, C, 2, 2) * 3 + 1)
    layer = distnorm.CycleBatchNorm.from_batch_norm(bn, 4, mode="sync")
    assert layer.weight is bn.weight and layer.bias is bn.bias and layer.length == 4
    for level in layer.levels:
        assert torch.equal(level.running_mean, bn.running_mean)
        assert level.running_mean.data_ptr() != bn.running_mean.data_ptr()
        assert level.num_batches_tracked.item() == 1
    bn.eval()
    layer.eval()
    x = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(layer(x), bn(x))
    frozen = distnorm.convert_model(bn, mode="frozen")
    layer = distnorm.CycleBatchNorm.from_batch_norm(frozen, 2, mode="bn")
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, frozen.weight)
    assert layer.weight.data_ptr() == frozen.weight.data_ptr() and layer.mode == "bn"


def test_reverted_model_traces_each_call_with_its_level() -> None:
    model = distnorm.revert_model(nn.Sequential(nn.Conv2d(C, C, 1), distnorm.CycleBatchNorm(C, 2)))
    levels = [torch.randn(2, C, 4, 4), torch.randn(2, C, 2, 2) * 3 + 2]
    for x in levels:
        model(x)
    model.eval()

    head = _TwoLevels(model)
    expected = head(*levels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer notes
        traced = torch.jit.trace(head, tuple(levels))
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile the level cycle"):
            torch.jit.script(model)
    torch.testing.assert_close(traced(*levels), expected)
    assert model[1].position == 0


class _TwoLevels(nn.Module):
    """A head applied to two levels in one forward (what torch.jit.trace records)."""

    def __init__(self, subnet: nn.Module) -> None:
        super().__init__()
        self.subnet = subnet

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.subnet(a), self.subnet(b)
