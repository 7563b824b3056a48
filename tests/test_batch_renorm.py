"""BatchRenorm against an independent float64 reference of docs/algorithms.md §2.

The reference below is written from the formulas alone, with plain autograd ops:
batch moments of the (concatenated) batch, r and d from the running statistics
*before* the update, detached, clipped; y = γ·(x̂·r + d) + β; torch's running
update with the unbiased variance. Synced runs use the session's gloo pools
(tests/conftest.py) and compare every rank against the reference on the
concatenated batch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distnorm
from distnorm.schedules import LinearRamp, Schedule, paper_d_max, paper_r_max, paper_schedule

C = 4


# -- the reference ----------------------------------------------------------------

def _value(bound: Any, step: int) -> float:
    return float(bound(step)) if callable(bound) else float(bound)


class RefBRN:
    """docs/algorithms.md §2 in float64, state kept by hand."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.rm = cfg["running_mean"].clone()
        self.rv = cfg["running_var"].clone()
        self.nbt = cfg.get("num_batches_tracked", 0)
        self.r_clips = torch.zeros(C, dtype=torch.long)
        self.d_clips = torch.zeros(C, dtype=torch.long)
        self.clip_steps = 0

    def step(self, x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tensor:
        cfg = self.cfg
        eps, momentum = cfg["eps"], cfg["momentum"]
        view = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        if count == 0:  # empty batch over the group: empty output, nothing updated
            return x * 1.0 if gamma is None else x * gamma.view(view) + beta.view(view)
        mu = x.mean(dims)
        var = ((x - mu.view(view)) ** 2).mean(dims)
        sigma_b = torch.sqrt(var + eps)
        sigma = torch.sqrt(self.rv + eps)
        step = self.nbt
        r_max, d_max = _value(cfg["r_max"], step), _value(cfg["d_max"], step)
        r_raw = sigma_b.detach() / sigma
        d_raw = (mu.detach() - self.rm) / sigma
        r = r_raw.clamp(1.0 / r_max, r_max)
        d = d_raw.clamp(-d_max, d_max)
        if step < cfg["warmup_steps"]:
            r, d = torch.ones_like(r), torch.zeros_like(d)
        else:
            self.r_clips += (r != r_raw).long()
            self.d_clips += (d != d_raw).long()
            self.clip_steps += 1
        y = (x - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        if gamma is not None:
            y = gamma.view(view) * y + beta.view(view)
        # running statistics, torch's convention, from this batch
        self.nbt += 1
        f = 1.0 / self.nbt if momentum is None else momentum
        with torch.no_grad():
            self.rm = (1 - f) * self.rm + f * mu
            self.rv = (1 - f) * self.rv + f * var * count / (count - 1)
        return y


def _config(**kw: Any) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(kw.pop("seed", 0))
    cfg = dict(eps=1e-5, momentum=0.1, affine=True, r_max=3.0, d_max=5.0, warmup_steps=0,
               weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
               bias=torch.randn(C, generator=gen, dtype=torch.float64),
               running_mean=torch.zeros(C, dtype=torch.float64),
               running_var=torch.ones(C, dtype=torch.float64))
    cfg.update(kw)
    return cfg


def _make_layer(cfg: Dict[str, Any], dtype: torch.dtype = torch.float64) -> distnorm.BatchRenorm:
    layer = distnorm.BatchRenorm(C, cfg["eps"], cfg["momentum"], cfg["affine"], r_max=cfg["r_max"],
                                 d_max=cfg["d_max"], warmup_steps=cfg["warmup_steps"],
                                 dtype=dtype)
    with torch.no_grad():
        if cfg["affine"]:
            layer.weight.copy_(cfg["weight"])
            layer.bias.copy_(cfg["bias"])
        layer.running_mean.copy_(cfg["running_mean"])
        layer.running_var.copy_(cfg["running_var"])
        layer.num_batches_tracked.fill_(cfg.get("num_batches_tracked", 0))
    return layer


def _data(sizes: Sequence[int], spatial: Sequence[int] = (3,), seed: int = 1):
    """One (x, g) per step; channels get different scales and shifts, so that with
    running statistics starting at (0, 1) some r and d fall outside small clips."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.5, 3.0, 1.0], dtype=torch.float64).view((1, C) + (1,) * len(spatial))
    shift = torch.tensor([0.2, -2.0, 3.0, 0.0], dtype=torch.float64).view((1, C) + (1,) * len(spatial))
    xs, gs = [], []
    for n in sizes:
        shape = (n, C) + tuple(spatial)
        xs.append(torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift)
        gs.append(torch.randn(shape, generator=gen, dtype=torch.float64))
    return xs, gs


def _ref_steps(cfg: Dict[str, Any], xs: List[Tensor], gs: List[Tensor]) -> Dict[str, Any]:
    ref = RefBRN(cfg)
    out: Dict[str, Any] = {k: [] for k in ("y", "gx", "gw", "gb", "rm", "rv", "nbt")}
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        gamma = cfg["weight"].clone().requires_grad_() if cfg["affine"] else None
        beta = cfg["bias"].clone().requires_grad_() if cfg["affine"] else None
        y = ref.step(x, gamma, beta)
        (y * g).sum().backward()
        out["y"].append(y.detach())
        out["gx"].append(x.grad if x.grad is not None else torch.zeros_like(x))
        if cfg["affine"]:
            out["gw"].append(gamma.grad if gamma.grad is not None else torch.zeros(C, dtype=torch.float64))
            out["gb"].append(beta.grad if beta.grad is not None else torch.zeros(C, dtype=torch.float64))
        out["rm"].append(ref.rm.clone())
        out["rv"].append(ref.rv.clone())
        out["nbt"].append(ref.nbt)
    out["r_clips"], out["d_clips"], out["clip_steps"] = ref.r_clips, ref.d_clips, ref.clip_steps
    return out


def _layer_steps(layer: nn.Module, xs: List[Tensor], gs: List[Tensor],
                 call: Optional[Any] = None) -> Dict[str, Any]:
    """Each step: fresh parameter gradients, loss Σ y·g, state after the step.
    ``call``: what runs the layer (a compiled wrapper); the layer itself by default."""
    layer.train()
    dtype = (layer.weight if layer.weight is not None else layer.running_mean).dtype
    out: Dict[str, Any] = {k: [] for k in ("y", "gx", "gw", "gb", "rm", "rv", "nbt")}
    for x, g in zip(xs, gs):
        if layer.weight is not None:
            layer.weight.grad = torch.zeros_like(layer.weight)
            layer.bias.grad = torch.zeros_like(layer.bias)
        x = x.to(dtype).clone().requires_grad_()
        y = (layer if call is None else call)(x)
        (y * g.to(y.dtype)).sum().backward()
        out["y"].append(y.detach())
        out["gx"].append(x.grad)
        if layer.weight is not None:
            out["gw"].append(layer.weight.grad.clone())
            out["gb"].append(layer.bias.grad.clone())
        if layer.running_mean is not None:
            out["rm"].append(layer.running_mean.clone())
            out["rv"].append(layer.running_var.clone())
            out["nbt"].append(int(layer.num_batches_tracked))
    if isinstance(layer, distnorm.BatchRenorm):
        out["r_clips"] = layer.r_clip_count.clone()
        out["d_clips"] = layer.d_clip_count.clone()
        out["clip_steps"] = int(layer.clip_steps)
    return out


def _assert_same(got: Dict[str, Any], ref: Dict[str, Any], keys=("y", "gx", "gw", "gb", "rm", "rv"),
                 **tol: float) -> None:
    for key in keys:
        assert len(got[key]) == len(ref[key]), key
        for step, (a, b) in enumerate(zip(got[key], ref[key])):
            torch.testing.assert_close(a, b.to(a.dtype), msg=lambda m: f"{key} step {step}: {m}", **tol)
    assert got["nbt"] == ref["nbt"]


# -- local parity with the reference ----------------------------------------------

CLIPPED = dict(r_max=1.5, d_max=0.5)
UNCLIPPED = dict(r_max=10.0, d_max=10.0)


@pytest.mark.parametrize("spatial", [(), (3,), (2, 3), (2, 1, 2)], ids=["1d", "1d-L", "2d", "3d"])
@pytest.mark.parametrize("clips", ["clipped", "unclipped"])
def test_matches_reference(spatial, clips):
    cfg = _config(**(CLIPPED if clips == "clipped" else UNCLIPPED))
    xs, gs = _data([5, 3, 6, 4, 2], spatial)
    ref = _ref_steps(cfg, xs, gs)
    layer = _make_layer(cfg)
    got = _layer_steps(layer, xs, gs)
    _assert_same(got, ref)
    torch.testing.assert_close(got["r_clips"], ref["r_clips"], rtol=0, atol=0)
    torch.testing.assert_close(got["d_clips"], ref["d_clips"], rtol=0, atol=0)
    r_frac, d_frac = layer.clip_fractions()
    if clips == "clipped":  # the clips bind on some channels, not all
        assert 0 < r_frac < 1 and 0 < d_frac < 1
    else:
        assert (r_frac, d_frac) == (0.0, 0.0)
    assert r_frac == pytest.approx(float(ref["r_clips"].sum()) / (C * ref["clip_steps"]))


@pytest.mark.parametrize("momentum,affine", [(None, True), (0.3, False)])
def test_matches_reference_momentum_and_affine(momentum, affine):
    cfg = _config(momentum=momentum, affine=affine, **CLIPPED)
    xs, gs = _data([4, 6, 3, 5], (2, 2))
    _assert_same(_layer_steps(_make_layer(cfg), xs, gs), _ref_steps(cfg, xs, gs))


def test_float32_layer_close_to_reference():
    cfg = _config(**CLIPPED)
    xs, gs = _data([8, 8, 8, 8], (3, 3))
    got = _layer_steps(_make_layer(cfg, torch.float32), xs, gs)
    _assert_same(got, _ref_steps(cfg, xs, gs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_r1_d0_is_batch_norm(dtype, momentum):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    brn = distnorm.BatchRenorm(C, momentum=momentum, r_max=1.0, d_max=0.0, dtype=dtype)
    brn.load_state_dict(bn.state_dict())
    xs, gs = _data([4, 2, 5, 3], (3, 3))
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    _assert_same(_layer_steps(brn, xs, gs), _layer_steps(bn, xs, gs), **tol)


def test_warmup_steps_are_batch_norm():
    cfg = _config(warmup_steps=2, **CLIPPED)
    xs, gs = _data([4, 4, 4, 4, 4], (3,))
    layer = _make_layer(cfg)
    got = _layer_steps(layer, xs, gs)
    ref = _ref_steps(cfg, xs, gs)
    _assert_same(got, ref)
    assert got["clip_steps"] == ref["clip_steps"] == 3
    # the first two steps are exactly BatchNorm's
    bn = nn.BatchNorm1d(C, dtype=torch.float64)
    bn.load_state_dict(_make_layer(cfg).state_dict())
    plain = _layer_steps(bn, xs[:2], gs[:2])
    _assert_same({k: v[:2] for k, v in got.items() if isinstance(v, list)}, plain)
    # and the third is not (the clips bind)
    assert not torch.allclose(got["y"][2], _layer_steps(bn, xs[2:3], gs[2:3])["y"][0])


def test_schedules_in_layer():
    cfg = _config(r_max=LinearRamp(1.0, 2.0, 1, 3), d_max=LinearRamp(0.0, 1.0, 0, 2),
                  warmup_steps=1)
    xs, gs = _data([4, 3, 5, 4, 6], (2,))
    _assert_same(_layer_steps(_make_layer(cfg), xs, gs), _ref_steps(cfg, xs, gs))


def test_foreign_callable_schedule_in_layer():
    cfg = _config(r_max=lambda step: 1.0 + 0.25 * step, d_max=lambda step: torch.tensor(0.2 * step))
    xs, gs = _data([4, 3, 5, 4], (2,))
    _assert_same(_layer_steps(_make_layer(cfg), xs, gs), _ref_steps(cfg, xs, gs))


def test_step_comes_from_num_batches_tracked():
    """The step is num_batches_tracked: a loaded checkpoint moves the schedule on."""
    cfg = _config(num_batches_tracked=7, warmup_steps=8, r_max=paper_r_max(1e-3),
                  d_max=paper_d_max(1e-3))
    xs, gs = _data([4, 4, 4], (2,))
    layer = _make_layer(cfg)
    got = _layer_steps(layer, xs, gs)
    _assert_same(got, _ref_steps(cfg, xs, gs))
    assert got["nbt"] == [8, 9, 10] and got["clip_steps"] == 2


def test_training_forward_makes_no_host_sync(monkeypatch):
    """Numbers and distnorm.schedules are evaluated on the device; a foreign
    callable needs the step on the host (and this test would see it)."""
    layer = distnorm.BatchRenorm(C, warmup_steps=1, **paper_schedule(1e-4))
    xs, gs = _data([4, 4, 4], (3,))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the training path")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, forbidden)
        for x, g in zip(xs, gs):
            x = x.float().requires_grad_()
            (layer(x) * g.float()).sum().backward()
        with pytest.raises(AssertionError, match="host synchronisation"):
            distnorm.BatchRenorm(C, r_max=lambda s: 2.0)(xs[0].float())
    assert int(layer.num_batches_tracked) == 3 and int(layer.clip_steps) == 2


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
def test_compiled_fullgraph_matches_reference(backend):
    """torch.compile (2.14) would recompute r and d in the backward from the buffers
    after their update (wrong γ gradient, or a version-counter error); see the
    comment at the end of BatchRenorm._renorm_factors."""
    cfg = _config(warmup_steps=1, r_max=LinearRamp(1.0, 1.5, 0, 2), d_max=0.5)
    xs, gs = _data([4, 4, 4, 4], (3,))
    layer = _make_layer(cfg)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    _assert_same(_layer_steps(layer, xs, gs, call=compiled), _ref_steps(cfg, xs, gs))


# -- schedules ----------------------------------------------------------------------

PAPER = {0: (1.0, 0.0), 5000: (1.0, 0.0), 10000: (1 + 2 * 5 / 35, 5 * 5 / 20),
         25000: (1 + 2 * 20 / 35, 5.0), 40000: (3.0, 5.0), 100000: (3.0, 5.0)}


@pytest.mark.parametrize("step", sorted(PAPER))
def test_paper_schedule_values(step):
    r_expected, d_expected = PAPER[step]
    sched = paper_schedule()
    for value in (sched["r_max"](step), paper_r_max()(torch.tensor(step))):
        assert float(value) == pytest.approx(r_expected, rel=1e-12)
    for value in (sched["d_max"](step), paper_d_max()(torch.tensor(step))):
        assert float(value) == pytest.approx(d_expected, rel=1e-12, abs=1e-12)
    # in the user's own step counts: a 10x shorter training reaches the same values 10x sooner
    assert paper_r_max(0.1)(step // 10) == pytest.approx(r_expected, rel=1e-12)
    assert paper_d_max(steps_scale=0.1)(step // 10) == pytest.approx(d_expected, abs=1e-12)


def test_linear_ramp():
    ramp = LinearRamp(1.0, 3.0, start_step=500, end_step=4000)
    assert [ramp(s) for s in (0, 500, 2250, 4000, 9000)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert ramp.bounds() == (1.0, 3.0)
    steps = torch.tensor([0, 500, 2250, 4000, 9000])
    torch.testing.assert_close(ramp(steps), torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64))
    jump = LinearRamp(0.0, 5.0, 10, 10)
    assert (jump(9), jump(10)) == (0.0, 5.0)
    assert float(jump(torch.tensor(9))) == 0.0 and float(jump(torch.tensor(10))) == 5.0
    assert isinstance(ramp, Schedule) and "LinearRamp(1, 3" in repr(ramp)


@pytest.mark.parametrize("args", [(1.0, float("nan"), 0, 10), (1.0, 2.0, -1, 10), (1.0, 2.0, 10, 5),
                                  (1.0, "2", 0, 10)])
def test_linear_ramp_bad_arguments(args):
    with pytest.raises(ValueError, match="LinearRamp"):
        LinearRamp(*args)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf")])
def test_paper_schedule_bad_scale(scale):
    with pytest.raises(ValueError, match="steps_scale"):
        paper_schedule(scale)


# -- eval, no running statistics, state_dict, conversion ------------------------------

def test_eval_is_batch_norm_with_running_stats():
    cfg = _config(**CLIPPED)
    layer = _make_layer(cfg)
    xs, gs = _data([4, 4, 4], (2, 2))
    _layer_steps(layer, xs, gs)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    clips = layer.r_clip_count.clone()
    layer.eval()
    x = xs[0] * 2
    y = layer(x)
    torch.testing.assert_close(y, F.batch_norm(x, layer.running_mean, layer.running_var,
                                               layer.weight, layer.bias, False, 0.0, layer.eps))
    bn = nn.BatchNorm2d(C, dtype=torch.float64).eval()
    bn.load_state_dict(state)
    torch.testing.assert_close(y, bn(x))
    for k, v in layer.state_dict().items():  # eval changes nothing
        assert torch.equal(v, state[k]), k
    assert torch.equal(layer.r_clip_count, clips)


def test_without_running_stats_is_batch_norm():
    layer = distnorm.BatchRenorm(C, track_running_stats=False, r_max=1.2, d_max=0.1, dtype=torch.float64)
    bn = nn.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        layer.weight.copy_(bn.weight)
    xs, gs = _data([4, 3], (2, 2))
    got, ref = _layer_steps(layer, xs, gs), _layer_steps(bn, xs, gs)
    for key in ("y", "gx", "gw", "gb"):
        for a, b in zip(got[key], ref[key]):
            torch.testing.assert_close(a, b)
    assert layer.clip_fractions() == (0.0, 0.0)
    assert "r_max=1.2" in repr(layer)


def test_state_dict_is_batch_norm_compatible():
    brn, bn = distnorm.BatchRenorm(C, warmup_steps=2), nn.BatchNorm2d(C)
    assert list(brn.state_dict()) == list(bn.state_dict())
    for (k, a), b in zip(brn.state_dict().items(), bn.state_dict().values()):
        assert a.shape == b.shape and a.dtype == b.dtype, k
    # a trained BatchNorm checkpoint loads (strict), and ours loads into BatchNorm
    bn.train()
    for x in _data([4, 4], (3, 3))[0]:
        bn(x.float())
    brn.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(brn.state_dict()[k], v), k
    brn(_data([4], (3, 3))[0][0].float())
    fresh = nn.BatchNorm2d(C)
    fresh.load_state_dict(brn.state_dict())
    assert int(fresh.num_batches_tracked) == 3
    # the monitoring counters are rank state: they move with the layer and keep
    # their dtype, but are neither buffers (DDP would broadcast them) nor state
    counters = {"r_clip_count", "d_clip_count", "clip_steps"}
    assert not counters & (dict(brn.named_buffers()).keys() | brn.state_dict().keys())
    brn.double()
    assert brn.r_clip_count.dtype == brn.clip_steps.dtype == torch.long
    brn.float()
    brn.reset_clip_stats()
    assert brn.clip_fractions() == (0.0, 0.0)
    r_pc, d_pc = brn.clip_fractions(per_channel=True)
    assert r_pc.shape == d_pc.shape == (C,)


def test_convert_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Flatten(),
                          nn.Linear(C * 4, 6), nn.BatchNorm1d(6))
    bn = model[1]
    distnorm.convert_model(model, mode="brn", warmup_steps=3, **paper_schedule(0.01))
    assert type(model[1]) is distnorm.BatchRenorm and type(model[5]) is distnorm.BatchRenorm
    assert model[1].weight is bn.weight and model[1].running_var is bn.running_var
    assert model[1].warmup_steps == 3 and isinstance(model[5].r_max, LinearRamp)
    x = torch.randn(5, 3, 4, 4)
    for _ in range(4):
        model(x).square().sum().backward()
    assert int(model[1].num_batches_tracked) == 4 and int(model[1].clip_steps) == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    y = model(x)
    distnorm.revert_model(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d
    torch.testing.assert_close(model(x), y)
    model.train()
    distnorm.convert_model(model, mode="brn", r_max=2.0, d_max=1.0)
    assert model[1].r_max == 2.0 and model[1].d_max == 1.0


# -- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(r_max=0.5), r"BatchRenorm: r_max must be >= 1 \(got 0.5\)"),
    (dict(r_max=float("nan")), "r_max must be >= 1"),
    (dict(d_max=-1.0), r"BatchRenorm: d_max must be >= 0 \(got -1.0\)"),
    (dict(d_max=float("nan")), "d_max must be >= 0"),
    (dict(r_max=LinearRamp(0.5, 3.0, 0, 100)), r"r_max schedule LinearRamp.*\[0.5, 3.0\]"),
    (dict(d_max=LinearRamp(0.0, -1.0, 0, 100)), r"d_max schedule .* must be >= 0"),
    (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
    (dict(warmup_steps=2.5), "warmup_steps must be an int >= 0"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distnorm.BatchRenorm(C, **kwargs)


def test_bad_option_types_and_setters():
    with pytest.raises(TypeError, match="r_max must be a number or a schedule"):
        distnorm.BatchRenorm(C, r_max="3")
    layer = distnorm.BatchRenorm(C)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        layer.r_max = 0.9
    assert layer.r_max == 3.0
    with pytest.raises(ValueError, match="d_max must be >= 0"):  # through convert_model
        distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(C)), mode="brn", d_max=-2)


@pytest.mark.parametrize("option,schedule,match", [
    ("r_max", lambda step: float("nan"), r"BatchRenorm '1\.0': r_max must be >= 1 \(got nan "
                                         r"\(schedule value at step 0\)\)"),
    ("r_max", lambda step: 1.0 if step < 1 else 0.5, r"BatchRenorm '1\.0'.*0\.5.*step 1"),
    ("d_max", lambda step: -0.1, r"BatchRenorm '1\.0': d_max must be >= 0"),
])
def test_bad_schedule_value_names_the_layer(option, schedule, match):
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.Sequential(nn.BatchNorm2d(C)))
    distnorm.convert_model(model, mode="brn", **{option: schedule})
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match=match):
        for _ in range(2):
            model(x)


def test_bad_input_shape_names_the_layer():
    with pytest.raises(ValueError, match="BatchRenorm: expected 4 channels"):
        distnorm.BatchRenorm(C)(torch.randn(2, 3, 5))


# -- synced: W = 2, 3 against the reference on the concatenated batch -------------------

def _synced_steps(rank: int, world: int, cfg: Dict[str, Any], xs: List[List[Tensor]],
                  gs: List[List[Tensor]]) -> Dict[str, Any]:
    layer = _make_layer(cfg)
    out = _layer_steps(layer, [x[rank] for x in xs], [g[rank] for g in gs])
    out["fractions"] = layer.clip_fractions()
    return out


def _check_synced(results: List[Dict[str, Any]], cfg: Dict[str, Any], xs, gs) -> None:
    ref = _ref_steps(cfg, [torch.cat(x) for x in xs], [torch.cat(g) for g in gs])
    for key in ("y", "gx"):  # concatenated over ranks
        for step in range(len(xs)):
            got = torch.cat([res[key][step] for res in results])
            torch.testing.assert_close(got, ref[key][step], msg=lambda m: f"{key} {step}: {m}")
    for key in ("gw", "gb") if cfg["affine"] else ():  # summed over ranks
        for step in range(len(xs)):
            got = sum(res[key][step] for res in results)
            torch.testing.assert_close(got, ref[key][step], msg=lambda m: f"{key} {step}: {m}")
    for res in results:  # identical on every rank
        _assert_same(res, ref, keys=("rm", "rv"))
        assert torch.equal(res["r_clips"], ref["r_clips"]) and torch.equal(res["d_clips"], ref["d_clips"])
        assert res["clip_steps"] == ref["clip_steps"]
        assert res["fractions"] == results[0]["fractions"]


def _shards(sizes: Sequence[Sequence[int]], spatial: Sequence[int], seed: int):
    xs, gs = _data([sum(s) for s in sizes], spatial, seed)
    return ([list(x.split(list(s))) for x, s in zip(xs, sizes)],
            [list(g.split(list(s))) for g, s in zip(gs, sizes)])


@pytest.mark.parametrize("case", ["clipped-schedule", "unclipped-cumulative"])
def test_synced_world2(world2, case):
    if case == "clipped-schedule":
        cfg = _config(r_max=LinearRamp(1.0, 1.5, 0, 2), d_max=0.5)
    else:
        cfg = _config(momentum=None, affine=False, **UNCLIPPED)
    xs, gs = _shards([(3, 1), (0, 4), (2, 2), (5, 0)], (3,), seed=2)
    _check_synced(world2.run(_synced_steps, cfg, xs, gs), cfg, xs, gs)


def test_synced_world3_uneven_and_empty(world3):
    cfg = _config(warmup_steps=1, **CLIPPED)
    sizes = [(3, 0, 5), (1, 2, 1), (0, 0, 0), (2, 0, 1), (1, 1, 1)]
    xs, gs = _shards(sizes, (2, 2), seed=3)
    results = world3.run(_synced_steps, cfg, xs, gs)
    _check_synced(results, cfg, xs, gs)
    # the all-empty step changed nothing
    for res in results:
        assert res["nbt"] == [1, 2, 2, 3, 4]
        assert torch.equal(res["rm"][2], res["rm"][1])
        assert res["y"][2].numel() == 0 and not res["gw"][2].any() and not res["gb"][2].any()
