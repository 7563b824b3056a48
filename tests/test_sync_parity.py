"""Multi-rank parity of ``distnorm.SyncBatchNorm`` against ``torch.nn.BatchNorm*d``.

The oracle (API.md, "Semantics every synced layer keeps"): over a process group of W
ranks holding n_1 … n_W samples (any of them 0), the training output, input gradient,
weight/bias gradients summed over ranks and the running statistics equal those of
``torch.nn.BatchNorm{1,2,3}d`` applied to the concatenated batch. The reference is
computed here, in the test process, with torch's own layer in float64; the workers of
the session-wide gloo pools (``world2``, ``world3``) only run the layer under test.

Loss convention: every step uses L = Σ over the *global* batch of y · G, with G a fixed
random tensor split into the same shards as the input, so that rank r's part of ∂L/∂x
is exactly the r-th shard of the reference's input gradient, and the reference's
parameter gradients equal the synced layer's summed over the ranks of the group.

Worker functions are module level: the pool pickles them by reference.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from tests._optional import has_cxx_compiler

F64_TOL = dict(rtol=1e-6, atol=1e-9)

_BN_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# ---------------------------------------------------------------------------------
# Case construction (test process)
# ---------------------------------------------------------------------------------
def _make_case(world: int, sizes_per_step: Sequence[Sequence[int]], tail: Sequence[int],
               channels: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float64,
               param_dtype: torch.dtype = torch.float64, eval_sizes: Optional[Sequence[int]] = None,
               offset: float = 0.5, **kwargs: Any) -> Dict[str, Any]:
    """Shards of the input and of the loss weights G for several training steps.

    ``sizes_per_step[s][r]`` is the batch size of rank r at step s. Channels get
    different means and scales so that per-channel mistakes show.
    """
    gen = torch.Generator().manual_seed(seed)
    chan = (1, channels) + (1,) * len(tail)
    mean = (torch.arange(channels, dtype=torch.float64) * 0.7 + offset).view(chan)
    std = (torch.arange(channels, dtype=torch.float64) * 0.5 + 0.5).view(chan)

    def batch(n: int) -> torch.Tensor:
        return (torch.randn((n, channels) + tuple(tail), generator=gen, dtype=torch.float64)
                * std + mean).to(dtype)

    steps = []
    for sizes in sizes_per_step:
        assert len(sizes) == world
        steps.append({
            "x": [batch(n) for n in sizes],
            # G is cast to the input dtype: under reduced precision the gradient that
            # reaches y is rounded to y's dtype, and the reference uses the same values.
            "g": [torch.randn((n, channels) + tuple(tail), generator=gen,
                              dtype=torch.float64).to(dtype) for n in sizes],
        })
    case: Dict[str, Any] = {
        "C": channels,
        "kwargs": kwargs,
        "param_dtype": param_dtype,
        "steps": steps,
        "weight": 1.0 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "bias": 0.2 * torch.randn(channels, generator=gen, dtype=torch.float64),
    }
    if eval_sizes is not None:
        case["eval_x"] = [batch(n) if n else None for n in eval_sizes]
    return case


# ---------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------
_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
                "all_gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "broadcast_object_list", "gather", "scatter", "all_to_all",
                "all_to_all_single", "barrier")


@contextlib.contextmanager
def _no_collectives():
    """Make every torch.distributed collective raise (instead of hang) while active."""
    import torch.distributed.distributed_c10d as c10d

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"collective torch.distributed.{name} called in eval mode")
        return call

    saved = []
    for module in (dist, c10d):
        for name in _COLLECTIVES:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, forbidden(name))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _make_group(rank: int, world: int, spec: Any):
    """``(process_group, ranks of the caller's group)`` for a group spec.

    ``None``: the default (world) group, by leaving ``process_group=None``.
    ``("new", [[0, 1], [2]])``: ``dist.new_group`` for every listed group, on every
    rank in the same order (it is collective); the caller's own is used.
    ``("by", k)``: ``distnorm.distributed.group_by(k)``.
    """
    if spec is None:
        return None, list(range(world))
    kind, arg = spec
    if kind == "new":
        mine = None
        for ranks in arg:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = (group, list(ranks))
        assert mine is not None
        return mine
    if kind == "by":
        group = distnorm.distributed.group_by(arg)
        start = rank - rank % arg
        return group, list(range(start, start + arg))
    raise ValueError(spec)


@contextlib.contextmanager
def _kernel_settings(settings: Optional[Dict[str, int]]):
    """Set distnorm.kernels' size thresholds (e.g. 0: compiled at any size) while active."""
    from distnorm import kernels

    saved = {name: getattr(kernels, name) for name in (settings or {})}
    for name, value in (settings or {}).items():
        setattr(kernels, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def _train_and_eval(rank: int, world: int, case: Dict[str, Any]) -> Dict[str, Any]:
    """Run the case's training steps (then an optional eval forward) on this rank."""
    with _kernel_settings(case.get("kernels")):
        out = _train_and_eval_steps(rank, world, case)
    from distnorm import kernels

    out["compiled"] = sorted(f"{name}:{str(dtype).split('.')[-1]}"
                             for (name, dtype), fn in kernels._compiled.items() if fn is not None)
    out["compile_failed"] = [key for key, fn in kernels._compiled.items() if fn is None]
    return out


def _train_and_eval_steps(rank: int, world: int, case: Dict[str, Any]) -> Dict[str, Any]:
    torch.manual_seed(1234)
    group, members = _make_group(rank, world, case.get("group"))
    prebuilt = case.get("prebuilt")
    if prebuilt is not None:
        # Built in the test process, where torch.distributed was never initialized.
        assert group is None
        layer = copy.deepcopy(prebuilt)
    else:
        layer = distnorm.SyncBatchNorm(case["C"], process_group=group, dtype=case["param_dtype"],
                                       **case["kwargs"])
        if layer.affine:
            with torch.no_grad():
                layer.weight.copy_(case["weight"])
                layer.bias.copy_(case["bias"])
    layer.train()
    fmt = case.get("memory_format", torch.contiguous_format)
    autocast = case.get("autocast")

    def amp():
        return torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()

    out: Dict[str, Any] = {"members": members, "y": [], "grad": [], "gw": [], "gb": [],
                           "y_format_ok": [], "y_dtype": [], "grad_dtype": []}
    for step in case["steps"]:
        x = step["x"][rank].clone().contiguous(memory_format=fmt).requires_grad_()
        with amp():
            y = layer(x)
            loss = (y * step["g"][rank]).sum()
        loss.backward()
        out["y"].append(y.detach().clone())
        out["grad"].append(x.grad.clone())
        out["y_format_ok"].append(y.is_contiguous(memory_format=fmt))
        out["y_dtype"].append(y.dtype)
        out["grad_dtype"].append(x.grad.dtype)
        if layer.affine:
            out["gw"].append(layer.weight.grad.clone())
            out["gb"].append(layer.bias.grad.clone())
        layer.zero_grad(set_to_none=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(layer, name)
        out[name] = None if value is None else value.clone()

    eval_x = case.get("eval_x")
    out["eval_y"] = None
    if eval_x is not None and eval_x[rank] is not None:
        # Only the ranks given an eval batch run this forward, and every collective
        # raises meanwhile: eval mode must not need the other ranks.
        layer.eval()
        with _no_collectives(), torch.no_grad(), amp():
            out["eval_y"] = layer(eval_x[rank].contiguous(memory_format=fmt)).clone()
    return out


# ---------------------------------------------------------------------------------
# Reference (test process): torch's BatchNorm on the concatenated batch, float64
# ---------------------------------------------------------------------------------
def _reference(case: Dict[str, Any], members: List[int]) -> Dict[str, Any]:
    kwargs = case["kwargs"]
    ndim = case["steps"][0]["x"][0].dim()
    bn = _BN_BY_DIM[ndim](case["C"], dtype=torch.float64, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(case["weight"])
            bn.bias.copy_(case["bias"])
    bn.train()
    ref: Dict[str, Any] = {"y": [], "grad": [], "gw": [], "gb": []}
    for step in case["steps"]:
        xs = [step["x"][r].double() for r in members]
        gs = [step["g"][r].double() for r in members]
        sizes = [x.shape[0] for x in xs]
        x = torch.cat(xs).requires_grad_()
        if x.shape[0] == 0 and len(members) > 1:
            # An empty batch over the whole group (API.md): empty outputs, zero
            # parameter gradients, running statistics and num_batches_tracked
            # untouched. (torch's own layer counts the batch in num_batches_tracked;
            # a group of one rank is "exactly the local counterpart" and does too.)
            ref["y"].append(xs)
            ref["grad"].append(xs)
            ref["gw"].append(torch.zeros(case["C"], dtype=torch.float64))
            ref["gb"].append(torch.zeros(case["C"], dtype=torch.float64))
            continue
        y = bn(x)
        (y * torch.cat(gs)).sum().backward()
        ref["y"].append(list(y.detach().split(sizes)))
        ref["grad"].append(list(x.grad.split(sizes)))
        if bn.affine:
            ref["gw"].append(bn.weight.grad.clone())
            ref["gb"].append(bn.bias.grad.clone())
        bn.zero_grad(set_to_none=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(bn, name)
        ref[name] = None if value is None else value.clone()
    eval_x = case.get("eval_x")
    if eval_x is not None:
        bn.eval()
        with torch.no_grad():
            # track_running_stats=False: torch's layer uses the (local) batch's own
            # statistics in eval, so the reference is the rank's shard alone.
            ref["eval_y"] = {r: bn(eval_x[r].double()) for r in members if eval_x[r] is not None}
    return ref


def _check(case: Dict[str, Any], results: List[Dict[str, Any]], tol: Optional[Dict] = None,
           stats_tol: Optional[Dict] = None) -> None:
    """Compare every rank against the reference of its own group."""
    tol = tol or F64_TOL
    stats_tol = stats_tol or tol
    groups = {tuple(res["members"]) for res in results}
    covered = set()
    for members in sorted(groups):
        ref = _reference(case, list(members))
        for pos, r in enumerate(members):
            res = results[r]
            assert res["members"] == list(members)
            covered.add(r)
            for s in range(len(case["steps"])):
                where = f"rank {r}, step {s}"
                torch.testing.assert_close(res["y"][s].double(), ref["y"][s][pos], **tol,
                                           msg=lambda m: f"output, {where}: {m}")
                torch.testing.assert_close(res["grad"][s].double(), ref["grad"][s][pos], **tol,
                                           msg=lambda m: f"input grad, {where}: {m}")
                assert res["y_format_ok"][s], f"output memory format, {where}"
            if res["running_mean"] is None:
                assert ref["running_mean"] is None and res["running_var"] is None
            else:
                torch.testing.assert_close(res["running_mean"].double(), ref["running_mean"],
                                           **stats_tol, msg=lambda m: f"running_mean, rank {r}: {m}")
                torch.testing.assert_close(res["running_var"].double(), ref["running_var"],
                                           **stats_tol, msg=lambda m: f"running_var, rank {r}: {m}")
                assert int(res["num_batches_tracked"]) == int(ref["num_batches_tracked"]), r
            if "eval_y" in ref and r in ref["eval_y"]:
                torch.testing.assert_close(res["eval_y"].double(), ref["eval_y"][r], **tol,
                                           msg=lambda m: f"eval output, rank {r}: {m}")
        # Parameter gradients summed over the ranks of the group.
        for name in ("gw", "gb"):
            if not ref[name]:
                assert all(not results[r][name] for r in members)
                continue
            for s in range(len(case["steps"])):
                total = sum(results[r][name][s].double() for r in members)
                torch.testing.assert_close(total, ref[name][s], **tol,
                                           msg=lambda m: f"{name} summed over {members}, step {s}: {m}")
    assert covered == set(range(len(results)))


# ---------------------------------------------------------------------------------
# float64 parity: shapes, layouts, options, uneven and empty shards
# ---------------------------------------------------------------------------------
# (world, sizes per step, spatial tail, memory format, layer kwargs)
PARITY = {
    "1d-NC-w2": (2, [(1, 4), (3, 2), (2, 0)], (), None, {}),
    "1d-NCL-w2": (2, [(0, 3), (1, 4), (2, 2)], (5,), None, {}),
    "1d-NCL-w3": (3, [(3, 0, 5), (0, 1, 1), (2, 2, 0)], (4,), None, {}),
    "2d-w3": (3, [(3, 0, 5), (1, 1, 1), (0, 4, 2)], (4, 3), None, {}),
    "2d-w2-eps-momentum": (2, [(1, 4), (0, 3), (2, 1)], (3, 3), None,
                           {"eps": 1e-3, "momentum": 0.3}),
    "3d-w3": (3, [(3, 0, 5), (0, 2, 1), (1, 1, 1)], (2, 3, 2), None, {}),
    "2d-channels_last-w2": (2, [(1, 4), (0, 3), (3, 3)], (4, 3), torch.channels_last, {}),
    "3d-channels_last-w3": (3, [(3, 0, 5), (1, 0, 1), (0, 0, 2)], (2, 2, 3),
                            torch.channels_last_3d, {}),
    "momentum-None-w3": (3, [(3, 0, 5), (1, 2, 0), (0, 1, 4), (2, 2, 2)], (3, 2), None,
                         {"momentum": None}),
    "affine-False-w2": (2, [(1, 4), (0, 3), (2, 2)], (3, 2), None, {"affine": False}),
    "no-running-stats-w3": (3, [(3, 0, 5), (1, 1, 2), (0, 3, 0)], (3, 2), None,
                            {"track_running_stats": False}),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_float64(name, world2, world3):
    world, sizes, tail, fmt, kwargs = PARITY[name]
    pool = world2 if world == 2 else world3
    # Eval on rank 0 only (plus the last rank for W=3): no other rank takes part.
    eval_sizes = [3] + [0] * (world - 2) + ([2] if world == 3 else [0])
    case = _make_case(world, sizes, tail, seed=list(PARITY).index(name), eval_sizes=eval_sizes, **kwargs)
    if fmt is not None:
        case["memory_format"] = fmt
    results = pool.run(_train_and_eval, case)
    _check(case, results)
    for res in results:
        assert all(d == torch.float64 for d in res["y_dtype"])


def test_layer_built_without_process_group_then_synced(world3):
    """A layer constructed where torch.distributed was never initialized (here, the
    test process) and shipped to the ranks resolves the world group at forward."""
    assert not dist.is_initialized()
    case = _make_case(3, [(3, 0, 5), (1, 2, 2), (0, 0, 3)], (3, 3), seed=7, eval_sizes=[2, 2, 0])
    layer = distnorm.SyncBatchNorm(case["C"], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(case["weight"])
        layer.bias.copy_(case["bias"])
    case["prebuilt"] = layer
    results = world3.run(_train_and_eval, case)
    _check(case, results)


# ---------------------------------------------------------------------------------
# An empty batch over the whole group
# ---------------------------------------------------------------------------------
def test_empty_batch_on_every_rank(world3):
    """Steps where every shard is empty: empty output, zero parameter gradients,
    running statistics and num_batches_tracked untouched, no hang; the steps around
    them stay exact (so the collectives stayed paired across ranks)."""
    sizes = [(0, 0, 0), (3, 0, 5), (0, 0, 0), (1, 2, 0), (0, 0, 0)]
    for kwargs in ({}, {"momentum": None}):
        case = _make_case(3, sizes, (3, 2), seed=11, **kwargs)
        results = world3.run(_train_and_eval, case)
        _check(case, results)
        for res in results:
            for s in (0, 2, 4):
                assert res["y"][s].shape == (0, 3, 3, 2)
                assert res["grad"][s].shape == (0, 3, 3, 2)
                assert torch.equal(res["gw"][s], torch.zeros(3, dtype=torch.float64))
                assert torch.equal(res["gb"][s], torch.zeros(3, dtype=torch.float64))
            assert int(res["num_batches_tracked"]) == 2


def _empty_only(rank, world, channels):
    """Only empty batches: the running statistics must keep their initial values."""
    layer = distnorm.SyncBatchNorm(channels)
    with torch.no_grad():
        layer.running_mean.fill_(0.25)
        layer.running_var.fill_(2.0)
    out = []
    for _ in range(3):
        x = torch.zeros(0, channels, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        out.append((tuple(y.shape), layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer.zero_grad()
    return {"out": out, "rm": layer.running_mean.clone(), "rv": layer.running_var.clone(),
            "nbt": int(layer.num_batches_tracked)}


def test_only_empty_batches(world2):
    for res in world2.run(_empty_only, 4):
        for shape, gw, gb in res["out"]:
            assert shape == (0, 4, 4)
            assert torch.equal(gw, torch.zeros(4)) and torch.equal(gb, torch.zeros(4))
        assert torch.equal(res["rm"], torch.full((4,), 0.25))
        assert torch.equal(res["rv"], torch.full((4,), 2.0))
        assert res["nbt"] == 0


# ---------------------------------------------------------------------------------
# Subgroups
# ---------------------------------------------------------------------------------
def test_new_group_subsets(world3):
    """Ranks 0, 1 normalize over their two shards; rank 2, alone in its group,
    behaves like a local nn.BatchNorm on its own shard."""
    case = _make_case(3, [(3, 1, 5), (0, 2, 2), (2, 0, 3)], (3, 2), seed=21, eval_sizes=[2, 0, 2])
    case["group"] = ("new", [[0, 1], [2]])
    results = world3.run(_train_and_eval, case)
    assert [res["members"] for res in results] == [[0, 1], [0, 1], [2]]
    _check(case, results)


def _group_by_errors(rank, world):
    errors = []
    for size in (2, 0, -3, 4):
        try:
            distnorm.distributed.group_by(size)
        except ValueError as exc:
            errors.append((size, str(exc)))
    return errors


def test_group_by_rejects_non_divisors(world3):
    for errors in world3.run(_group_by_errors):
        assert [size for size, _ in errors] == [2, 0, -3, 4]
        assert all("world size 3" in msg for _, msg in errors)


@pytest.mark.parametrize("size", [1, 3])
def test_group_by_sizes(size, world3):
    case = _make_case(3, [(3, 1, 5), (2, 0, 3), (1, 2, 2)], (4,), seed=31 + size)
    case["group"] = ("by", size)
    results = world3.run(_train_and_eval, case)
    expected = [[r] for r in range(3)] if size == 1 else [[0, 1, 2]] * 3
    assert [res["members"] for res in results] == expected
    _check(case, results)


# ---------------------------------------------------------------------------------
# float32 with the compiled CPU kernels (distnorm.kernels) doing the passes
# ---------------------------------------------------------------------------------
# The kernels apply to large float32/half activations only; here every size uses
# them. "short" keeps the default short-row rule (moments in float32 rows, eager
# input gradient); "long" treats every row as long (float64 moment loop, compiled
# input gradient). Against float64 BatchNorm on the same float32 values.
F32_TOL = dict(rtol=1e-4, atol=2e-5)
COMPILED = {
    "1d-NC-w2": (2, [(3, 4), (0, 5), (2, 2)], (), None),
    "1d-NCL-w3": (3, [(3, 0, 5), (0, 2, 1), (2, 2, 2)], (9,), None),
    "2d-w3": (3, [(3, 0, 5), (1, 1, 1), (0, 4, 2)], (6, 5), None),
    "2d-channels_last-w2": (2, [(1, 4), (0, 3), (3, 3)], (4, 6), torch.channels_last),
    "3d-channels_last-w2": (2, [(2, 1), (0, 2)], (2, 3, 4), torch.channels_last_3d),
}


@pytest.mark.parametrize("rows", ["short", "long"])
@pytest.mark.parametrize("name", list(COMPILED))
def test_parity_float32_compiled_kernels(name, rows, world2, world3):
    world, sizes, tail, fmt = COMPILED[name]
    pool = world2 if world == 2 else world3
    case = _make_case(world, sizes, tail, channels=4, seed=61 + list(COMPILED).index(name),
                      dtype=torch.float32, param_dtype=torch.float32, offset=3.0)
    case["kernels"] = {"MIN_NUMEL": 0, "MIN_NUMEL_AFFINE": 0}
    if rows == "long":
        case["kernels"]["SHORT_ROW"] = 1
    if fmt is not None:
        case["memory_format"] = fmt
    results = pool.run(_train_and_eval, case)
    _check(case, results, tol=F32_TOL)  # with or without a compiler (eager fallback)
    if not has_cxx_compiler():
        pytest.skip("no C++ compiler: parity checked with the eager fallback only")
    for res in results:
        assert not res["compile_failed"]
        assert any(k.startswith("_moment_sums") and k.endswith(":float32") for k in res["compiled"])
        if rows == "long":
            assert "_affine_grad:float32" in res["compiled"]
        assert all(ok for ok in res["y_format_ok"])


# ---------------------------------------------------------------------------------
# Reduced precision (CPU autocast): statistics kept in float32
# ---------------------------------------------------------------------------------
# Measured errors against float64 are ~1e-3 (fp16) and ~1e-2 (bf16) on outputs and
# input gradients; parameter gradients and statistics are accumulated in float32.
LOW_PRECISION = {
    torch.float16: dict(tol=dict(rtol=5e-3, atol=1e-2), stats_tol=dict(rtol=1e-5, atol=1e-6)),
    torch.bfloat16: dict(tol=dict(rtol=3e-2, atol=6e-2), stats_tol=dict(rtol=1e-5, atol=1e-6)),
}


def _torch_autocast_dtypes(x: torch.Tensor, g: torch.Tensor, low: torch.dtype):
    """Output and input-gradient dtypes of torch's own layer in the same setting."""
    bn = _BN_BY_DIM[x.dim()](x.shape[1])
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=low):
        y = bn(x)
        (y * g).sum().backward()
    return y.dtype, x.grad.dtype, bn.running_mean.dtype


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_reduced_precision(low, world3):
    case = _make_case(3, [(3, 0, 5), (1, 2, 1), (0, 3, 3)], (4, 4), seed=41, dtype=low,
                      param_dtype=torch.float32, eval_sizes=[2, 0, 0])
    case["autocast"] = low
    results = world3.run(_train_and_eval, case)
    y_dtype, grad_dtype, stat_dtype = _torch_autocast_dtypes(case["steps"][0]["x"][0],
                                                             case["steps"][0]["g"][0], low)
    assert stat_dtype == torch.float32
    for res in results:
        assert res["running_mean"].dtype == torch.float32
        assert res["running_var"].dtype == torch.float32
        assert torch.isfinite(res["running_mean"]).all() and torch.isfinite(res["running_var"]).all()
        assert all(d == y_dtype for d in res["y_dtype"]), (res["y_dtype"], y_dtype)
        assert all(d == grad_dtype for d in res["grad_dtype"]), (res["grad_dtype"], grad_dtype)
        assert all(torch.isfinite(y).all() for y in res["y"])
    _check(case, results, **LOW_PRECISION[low])


# ---------------------------------------------------------------------------------
# Precision: |mean| >> std in float32
# ---------------------------------------------------------------------------------
# float32 inputs of mean 1e3 / 1e4 and std ~1: the synced statistics and output must
# be as accurate as nn.BatchNorm2d in float32 on the concatenated batch, both measured
# against float64 on the same (float32) values (docs/algorithms.md §0: summing raw
# x² in float32 would be off by percents here). "As accurate" is checked as
# error <= 2 · error(nn.BatchNorm2d) + tiny, tiny = 2.5e-7 relative (two float32 ulps:
# the rounding of the stored result and of the float32 running update). momentum=None:
# the first step copies the batch variance into running_var, so variance errors show
# undamped. The last step has a single non-empty rank.
LARGE_MEAN_SIZES = [(1, 3), (2, 2), (3, 1), (4, 0)]
_large_mean_cache: Dict[Any, Dict[str, Any]] = {}


def _large_mean_errors(offset: float, pool, kernels: str = "eager") -> Dict[str, Any]:
    """Errors against float64 of the synced layer (per rank) and of nn.BatchNorm2d.

    ``kernels``: ``"eager"`` (the sizes here are below the compiled kernels'
    thresholds), or ``"short"`` / ``"long"`` rows with the compiled kernels forced on.
    """
    if (offset, kernels) in _large_mean_cache:
        return _large_mean_cache[offset, kernels]
    case = _make_case(2, LARGE_MEAN_SIZES, (4, 4), seed=51, dtype=torch.float32,
                      param_dtype=torch.float32, offset=offset, momentum=None)
    if kernels != "eager":
        case["kernels"] = {"MIN_NUMEL": 0, "MIN_NUMEL_AFFINE": 0}
        if kernels == "long":
            case["kernels"]["SHORT_ROW"] = 1
    results = pool.run(_train_and_eval, case)
    ref64 = _reference(case, [0, 1])
    bn32 = nn.BatchNorm2d(case["C"], momentum=None)
    with torch.no_grad():
        bn32.weight.copy_(case["weight"])
        bn32.bias.copy_(case["bias"])

    def rel(a, b):
        return ((a.double() - b) / b).abs().max().item()

    errors: Dict[str, Any] = {"y_bn": 0.0, "y_sync": 0.0}
    for s, step in enumerate(case["steps"]):
        y64 = torch.cat(ref64["y"][s])
        y32 = bn32(torch.cat(step["x"])).detach()
        y_sync = torch.cat([res["y"][s] for res in results])
        errors["y_bn"] = max(errors["y_bn"], (y32.double() - y64).abs().max().item())
        errors["y_sync"] = max(errors["y_sync"], (y_sync.double() - y64).abs().max().item())
    errors["var_bn"] = rel(bn32.running_var, ref64["running_var"])
    errors["mean_bn"] = rel(bn32.running_mean, ref64["running_mean"])
    errors["var_sync"] = [rel(res["running_var"], ref64["running_var"]) for res in results]
    errors["mean_sync"] = [rel(res["running_mean"], ref64["running_mean"]) for res in results]
    _large_mean_cache[offset, kernels] = errors
    return errors


TINY = 2.5e-7


@pytest.mark.parametrize("kernels", ["eager", "short", "long"])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_mean_float32_output_and_mean(offset, kernels, world2):
    err = _large_mean_errors(offset, world2, kernels)
    assert err["var_bn"] < 1e-5 and err["y_bn"] < 1e-2  # the oracle itself is accurate
    assert err["y_sync"] <= 2 * err["y_bn"] + 1e-5, err
    for mean_err in err["mean_sync"]:
        assert mean_err <= 2 * err["mean_bn"] + TINY, err


@pytest.mark.parametrize("kernels", ["eager", "short", "long"])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_mean_float32_running_var(offset, kernels, world2):
    err = _large_mean_errors(offset, world2, kernels)
    assert err["var_bn"] < 1e-5  # the oracle itself is accurate
    for var_err in err["var_sync"]:
        assert var_err <= 2 * err["var_bn"] + TINY, err

# ---------------------------------------------------------------------------------
# Without a process group: exactly nn.BatchNorm
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tail, fmt", [((), None), ((5,), None), ((4, 3), None),
                                       ((4, 3), torch.channels_last), ((2, 3, 2), None)],
                         ids=["NC", "NCL", "NCHW", "NHWC", "NCDHW"])
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-stats"])
def test_no_process_group_is_bit_exact(tail, fmt, kwargs):
    assert not dist.is_initialized()
    fmt = fmt or torch.contiguous_format
    gen = torch.Generator().manual_seed(3)
    ours = distnorm.SyncBatchNorm(3, **kwargs)
    ref = _BN_BY_DIM[len(tail) + 2](3, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(3, generator=gen) + 0.5)
            ref.bias.copy_(torch.randn(3, generator=gen))
            ours.weight.copy_(ref.weight)
            ours.bias.copy_(ref.bias)
    for n in (4, 2, 5):
        x = (torch.randn((n, 3) + tail, generator=gen) * 2 + 1).contiguous(memory_format=fmt)
        g = torch.randn((n, 3) + tail, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
        assert ya.is_contiguous(memory_format=fmt)
        if ref.affine:
            assert torch.equal(ours.weight.grad, ref.weight.grad)
            assert torch.equal(ours.bias.grad, ref.bias.grad)
        ours.zero_grad()
        ref.zero_grad()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    ours.eval()
    ref.eval()
    x = torch.randn((3, 3) + tail, generator=gen).contiguous(memory_format=fmt)
    assert torch.equal(ours(x), ref(x))


# ---------------------------------------------------------------------------------
# Copies (EMA models, deepcopy of a model) share the process group
# ---------------------------------------------------------------------------------
def _deepcopy_shares_group(rank, world):
    import copy

    group = dist.new_group(list(range(world)))
    bn = distnorm.SyncBatchNorm(3, process_group=group).double()
    twin = copy.deepcopy(bn)
    x = torch.arange(6 * (rank + 1), dtype=torch.float64).view(-1, 3)
    return {"same_group": twin.process_group is group, "fresh_weight": twin.weight is not bn.weight,
            "y": twin(x).detach(), "x": x}


def test_deepcopy_of_a_layer_with_a_process_group(world2):
    out = world2.run(_deepcopy_shares_group)
    assert all(o["same_group"] and o["fresh_weight"] for o in out)
    ref = torch.nn.BatchNorm1d(3).double()
    torch.testing.assert_close(torch.cat([o["y"] for o in out]), ref(torch.cat([o["x"] for o in out])).detach())
