"""distnorm.precise_bn (PreciseBN / AdaBN) against a float64 oracle of the union.

The oracle is written here, independently of the library: it replays the rounds
precise_bn runs — round i holds every rank's i-th batch — through a plain float64
copy of the model in training mode (a synced model normalizes each round's
concatenation; a model of local ``nn.BatchNorm`` layers each batch alone), records
every BatchNorm layer's input, and takes the mean and unbiased variance of the
concatenation of those inputs.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import distnorm

_CHANNELS = 3


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(_CHANNELS, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3), nn.BatchNorm1d(3))


def _batch(rank: int, index: int, size: int, dtype: torch.dtype = torch.float64,
           loc: float = 2.0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + index)
    x = torch.randn(size, _CHANNELS, 6, 5, generator=g, dtype=torch.float64)
    return (x * scale + loc).to(dtype)


def _batches(rank: int, sizes: List[List[int]], **kwargs: Any) -> List[torch.Tensor]:
    return [_batch(rank, i, n, **kwargs) for i, n in enumerate(sizes[rank])]


def _bn_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(m, key).detach().clone()
            for name, m in model.named_modules() if isinstance(m, _BatchNorm)
            for key in ("running_mean", "running_var", "num_batches_tracked")}


def _oracle(model: nn.Module, sizes: List[List[int]], synced: bool,
            **kwargs: Any) -> Dict[str, torch.Tensor]:
    """Mean and unbiased variance of the union of each BN layer's inputs (float64)."""
    ref = copy.deepcopy(model).double().train()
    inputs: Dict[str, List[torch.Tensor]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, []).append(
                    args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1)))
    rounds = max(len(s) for s in sizes)
    with torch.no_grad():
        for i in range(rounds):
            here = [_batch(r, i, s[i], **kwargs).double()
                    for r, s in enumerate(sizes) if i < len(s)]
            if synced:
                ref(torch.cat(here))
            else:
                for x in here:
                    ref(x)
    out = {}
    for name, parts in inputs.items():
        union = torch.cat(parts, dim=1)
        out[f"{name}.running_mean"] = union.mean(1)
        out[f"{name}.running_var"] = union.var(1)  # unbiased
    return out


def _check(state: Dict[str, torch.Tensor], oracle: Dict[str, torch.Tensor],
           rtol: float = 1e-9, atol: float = 1e-12) -> None:
    for key, expected in oracle.items():
        torch.testing.assert_close(state[key].double(), expected, rtol=rtol, atol=atol,
                                   msg=lambda m, key=key: f"{key}: {m}")


# -- workers (module-level: sent to the gloo ranks) ------------------------------------
def _union_work(rank: int, world: int, sizes: List[List[int]], mode: Optional[str],
                wrap: str = "") -> Dict[str, Any]:
    model = _model().double()
    if mode is not None:
        distnorm.convert_model(model, mode)
    model.eval()
    model[4].train()  # a mixed set of flags, to be restored
    flags = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    target: nn.Module = model
    if wrap == "ddp":
        target = nn.parallel.DistributedDataParallel(model)
    batches = [(x, torch.zeros(len(x))) for x in _batches(rank, sizes)]  # (input, label)
    used = distnorm.precise_bn(target, batches)
    return {"state": _bn_state(model), "used": used,
            "flags": [m.training for m in model.modules()] == flags,
            "params": all(torch.equal(a, b) for a, b in zip(params, model.parameters()))}


def _float32_work(rank: int, world: int, sizes: List[List[int]]) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(_CHANNELS)))
    batches = _batches(rank, sizes, dtype=torch.float32, loc=1e4, scale=1.0)
    distnorm.precise_bn(model, iter(batches))  # a lazy iterable
    return _bn_state(model)


def _subgroup_work(rank: int, world: int, sizes: List[List[int]]) -> Dict[str, Any]:
    group = distnorm.distributed.group_by(1)
    model = distnorm.convert_model(_model().double(), "sync", process_group=group)
    distnorm.precise_bn(model, _batches(rank, sizes), process_group=group)
    # A model synced over the world cannot be recomputed over a subgroup.
    wide = distnorm.convert_model(_model().double())
    try:
        distnorm.precise_bn(wide, _batches(rank, sizes), process_group=group)
        error = ""
    except ValueError as e:
        error = str(e)
    return {"state": _bn_state(model), "error": error}


def _rank_state_work(rank: int, world: int, mode: str, options: Dict[str, Any],
                     sizes: List[List[int]]) -> Dict[str, Any]:
    model = distnorm.convert_model(_model().double(), mode, **options)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):  # build up per-rank state (history, partial cycle, counters)
        model(_batch(rank, 100 + step, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
    before = distnorm.rank_state_dict(model)
    nbt = {k: v for k, v in _bn_state(model).items() if k.endswith("num_batches_tracked")}
    distnorm.precise_bn(model, _batches(rank, sizes))
    after = distnorm.rank_state_dict(model)
    same = before.keys() == after.keys() and all(
        before[k].keys() == after[k].keys() and all(
            (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
            for a, b in ((before[k][n], after[k][n]) for n in before[k]))
        for k in before)
    state = _bn_state(model)
    return {"same": same, "nbt": all(torch.equal(state[k], v) for k, v in nbt.items()),
            "training": all(m.training for m in model.modules()), "state": state,
            "has_state": bool(before)}


def _error_work(rank: int, world: int, case: str) -> str:
    model = distnorm.convert_model(_model().double())
    before = _bn_state(model)
    try:
        if case == "no_data":
            distnorm.precise_bn(model, [])
        elif case == "non_tensor_uneven":
            # rank 1 runs out while rank 0's inputs are lists: no empty batch to send.
            class Head(nn.Module):
                def __init__(self, inner: nn.Module) -> None:
                    super().__init__()
                    self.inner = inner

                def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
                    return self.inner(torch.stack(xs))
            head = Head(model)
            data = [[x for x in _batch(rank, i, 2)] for i in range(2 - rank)]
            distnorm.precise_bn(head, [(d,) for d in data])
        else:
            raise AssertionError(case)
    except ValueError as e:
        after = _bn_state(model)
        untouched = all(torch.equal(before[k], after[k]) for k in before)
        return f"untouched={untouched}: {e}"
    return "no error"


# -- multi-rank tests --------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [
    [[3, 2, 4], [2, 5]],        # uneven sizes, rank 1 has fewer batches
    [[2, 3], []],               # rank 1 has no data at all
    [[], [4, 2, 2]],            # rank 0 (the progress rank) has none
], ids=["uneven", "empty-rank1", "empty-rank0"])
def test_synced_model_matches_union(world2: Any, sizes: List[List[int]]) -> None:
    results = world2.run(_union_work, sizes, "sync")
    oracle = _oracle(_model(), sizes, synced=True)
    for r in results:
        _check(r["state"], oracle)
        assert r["used"] == sum(map(sum, sizes))
        assert r["flags"] and r["params"]
        assert all(v == 0 for k, v in r["state"].items() if k.endswith("num_batches_tracked"))
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key])


def test_plain_torch_batch_norm_model(world2: Any) -> None:
    sizes = [[3, 2, 4], [2]]
    results = world2.run(_union_work, sizes, None)
    oracle = _oracle(_model(), sizes, synced=False)
    for r in results:
        _check(r["state"], oracle)
        assert r["flags"] and r["params"]


def test_ddp_wrapped(world2: Any) -> None:
    sizes = [[2, 3], [4]]
    results = world2.run(_union_work, sizes, "sync", "ddp")
    oracle = _oracle(_model(), sizes, synced=True)
    for r in results:
        _check(r["state"], oracle)


def test_float32_large_mean(world2: Any) -> None:
    """|μ|/σ = 1e4 in float32: the variance survives (a naive Σx² would lose it)."""
    sizes = [[4, 3], [5]]
    results = world2.run(_float32_work, sizes)
    union = torch.cat([_batch(r, i, n, dtype=torch.float32, loc=1e4, scale=1.0).double()
                       for r, s in enumerate(sizes) for i, n in enumerate(s)])
    union = union.transpose(0, 1).reshape(_CHANNELS, -1)
    for r in results:
        torch.testing.assert_close(r["0.running_mean"].double(), union.mean(1), rtol=1e-7, atol=0)
        torch.testing.assert_close(r["0.running_var"].double(), union.var(1), rtol=1e-5, atol=0)


def test_subgroups(world2: Any) -> None:
    sizes = [[3, 2], [4]]
    results = world2.run(_subgroup_work, sizes)
    for rank, r in enumerate(results):
        own = [s if i == rank else [] for i, s in enumerate(sizes)]
        _check(r["state"], _oracle(_model(), own, synced=True))
        assert "beyond precise_bn's group" in r["error"]


@pytest.mark.parametrize("mode,options", [
    ("cbn", {"window": 3}), ("cmbn", {"accumulation_steps": 2}), ("brn", {"warmup_steps": 5})])
def test_per_rank_state_untouched(world2: Any, mode: str, options: Dict[str, Any]) -> None:
    sizes = [[3, 2], [2]]
    results = world2.run(_rank_state_work, mode, options, sizes)
    for r in results:
        assert r["has_state"] and r["same"] and r["nbt"] and r["training"]
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key])


def test_no_data_anywhere(world2: Any) -> None:
    for message in world2.run(_error_work, "no_data"):
        assert message.startswith("untouched=True") and "no batches on any rank" in message


def test_non_tensor_input_with_uneven_ranks(world2: Any) -> None:
    for message in world2.run(_error_work, "non_tensor_uneven"):
        assert message.startswith("untouched=True") and "num_batches" in message


# -- single process -----------------------------------------------------------------------
def test_single_process_matches_torch_population_variance() -> None:
    model = _model().double().eval()
    sizes = [[3, 2, 4]]
    assert distnorm.precise_bn(model, _batches(0, sizes)) == 9
    _check(_bn_state(model), _oracle(_model(), sizes, synced=False))
    assert not any(m.training for m in model.modules())


def test_num_batches_caps_and_replaces() -> None:
    model = _model().double()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(100.0)
            m.num_batches_tracked.fill_(7)
    data = [(x, 0) for x in _batches(0, [[3, 2, 4, 5]])]
    assert distnorm.precise_bn(model, data, num_batches=2) == 5
    _check(_bn_state(model), _oracle(_model(), [[3, 2]], synced=False))
    assert all(m.num_batches_tracked == 7 for m in model.modules() if isinstance(m, _BatchNorm))


def test_torch_sync_batch_norm_and_timm_layers() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.SyncBatchNorm(_CHANNELS), nn.Conv2d(_CHANNELS, 4, 1),
                          timm_layers.BatchNormAct2d(4)).double()
    xs = _batches(0, [[3, 4]])
    distnorm.precise_bn(model, xs)
    ref = nn.Sequential(nn.BatchNorm2d(_CHANNELS), nn.Conv2d(_CHANNELS, 4, 1),
                        nn.BatchNorm2d(4)).double()
    ref.load_state_dict(model.state_dict())
    inputs: List[torch.Tensor] = []
    ref[2].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        for x in xs:
            ref.train()(x)
    union = torch.cat(inputs).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[2].running_var, union.var(1))
    x_union = torch.cat(xs).transpose(0, 1).reshape(_CHANNELS, -1)
    torch.testing.assert_close(model[0].running_mean, x_union.mean(1))


def test_compiled_model_is_unwrapped_and_compiled_submodule_refused() -> None:
    model = _model().double()
    compiled = torch.compile(model)
    xs = _batches(0, [[3, 2]])
    distnorm.precise_bn(compiled, xs)
    _check(_bn_state(model), _oracle(_model(), [[3, 2]], synced=False))
    outer = nn.Sequential(torch.compile(_model().double()))
    with pytest.raises(ValueError, match="uncompiled module"):
        distnorm.precise_bn(outer, xs)
    in_place = _model().double()
    in_place.compile()
    with pytest.raises(ValueError, match=r"the model \(model.compile\(\)\).*uncompiled"):
        distnorm.precise_bn(in_place, xs)


def test_bad_arguments() -> None:
    model = _model()
    xs = _batches(0, [[2]], dtype=torch.float32)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        distnorm.precise_bn("model", xs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        distnorm.precise_bn(model, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        distnorm.precise_bn(model, xs[0])
    with pytest.raises(TypeError, match="num_batches"):
        distnorm.precise_bn(model, xs, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_batches"):
        distnorm.precise_bn(model, xs, -1)
    with pytest.raises(TypeError, match="process_group"):
        distnorm.precise_bn(model, xs, process_group="world")
    with pytest.raises(TypeError, match="progress"):
        distnorm.precise_bn(model, xs, progress=1)  # type: ignore[arg-type]
    before = _bn_state(model)
    with pytest.raises(ValueError, match="no batches"):
        distnorm.precise_bn(model, xs, num_batches=0)
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_single_value_per_channel_and_non_finite_leave_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2)).double()
    model[0].running_var.fill_(4.0)
    # torch's own layer refuses one value per channel in training, before precise_bn.
    with pytest.raises(ValueError, match="single value per channel|more than 1 value"):
        distnorm.precise_bn(model, [torch.ones(1, 2, dtype=torch.float64)])
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not finite"):
        distnorm.precise_bn(model, [bad])
    assert torch.equal(model[0].running_var, torch.full((2,), 4.0, dtype=torch.float64))


def test_progress_bar(capsys: Any) -> None:
    pytest.importorskip("tqdm")
    model = _model().double()
    distnorm.precise_bn(model, _batches(0, [[2, 2]]), progress=True)
    assert "precise_bn" in capsys.readouterr().err


def test_called_under_inference_mode_leaves_trainable_state() -> None:
    """A validation loop runs under torch.inference_mode: the state precise_bn puts back
    (CmBN's partial cycle here) must stay ordinary tensors that training updates."""
    model = distnorm.convert_model(_model().double(), "cmbn", accumulation_steps=3)
    model.train()
    model(_batch(0, 50, 2)).sum().backward()  # a partial cycle
    with torch.inference_mode():
        distnorm.precise_bn(model, _batches(0, [[3, 2]]))
    assert not any(t.is_inference() for t in _bn_state(model).values())
    assert not model[1]._cycle_sums.is_inference()
    model(_batch(0, 51, 2)).sum().backward()  # training goes on, in place
