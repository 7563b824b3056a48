"""The normalization catalogue: each layer against its formula, written out here in
float64 independently of the library; gradients by ``torch.autograd.gradcheck``; the
synced BatchNorm parts (BIN, Switchable Norm, conditional BN, SPADE) over W = 2 gloo
ranks with uneven (and empty) shards against the same layer, unsynced, on the
concatenated batch; ``convert_model(mode="bin" | "switchable")``; bad input.

Loss convention of the synced tests: L = Σ over the global batch of y · G, G a fixed
random tensor split like the input, so that rank r's input gradient is the r-th shard
of the reference's, and parameter gradients summed over ranks are the reference's.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import distnorm

TOL = dict(rtol=1e-9, atol=1e-10)
SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 4)]  # (N, C), 1-D, 2-D, 3-D
SPATIAL = SHAPES[1:]
IDS = ["0d", "1d", "2d", "3d"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Channels with different means and scales, so per-channel mistakes show."""
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    mean = (torch.arange(c, dtype=torch.float64) * 0.7 - 0.5).view(view)
    std = (torch.arange(c, dtype=torch.float64) * 0.5 + 0.5).view(view)
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * std + mean


def _randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default values for every parameter (ρ inside (0, 1))."""
    gen = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("rho"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.6 + 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5
                        + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    return module


# -- reference formulas (float64, no library code) ---------------------------------

def _cv(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _moments(x: torch.Tensor, dims) -> tuple:
    """Mean and biased variance over ``dims`` (keepdim), written out."""
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.sum(dim=dims, keepdim=True) / count
    var = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / count
    return mean, var, count


def ref_bn_stats(x):
    return _moments(x, tuple(d for d in range(x.dim()) if d != 1))


def ref_in_stats(x):
    if x.dim() == 2:
        return x, torch.zeros_like(x)
    mean, var, _ = _moments(x, tuple(range(2, x.dim())))
    return mean, var


def ref_running(x, momentum=0.1):
    """Running statistics of a fresh layer after one training batch."""
    mean, var, count = ref_bn_stats(x)
    return momentum * mean.flatten(), (1 - momentum) + momentum * var.flatten() * count / (count - 1)


# -- Batch-Instance Norm ---------------------------------------------------------------

def ref_bin(layer, x, running=None):
    if running is None:
        mean_b, var_b, _ = ref_bn_stats(x)
    else:
        mean_b, var_b = _cv(running[0], x), _cv(running[1], x)
    mean_i, var_i = ref_in_stats(x)
    eps = layer.eps
    x_bn = (x - mean_b) / torch.sqrt(var_b + eps)
    x_in = (x - mean_i) / torch.sqrt(var_i + eps)
    rho = _cv(layer.rho.detach(), x)
    return _cv(layer.weight.detach(), x) * (rho * x_bn + (1 - rho) * x_in) + _cv(layer.bias.detach(), x)


def test_batch_instance_norm_rho_is_clipped_after_each_step():
    layer = distnorm.BatchInstanceNorm(3).double()
    with torch.no_grad():
        layer.rho.copy_(torch.tensor([0.5, 0.99, 0.01], dtype=torch.float64))
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)
    x = _input((4, 3, 5))
    # Used twice in one graph: the clamp must not break the backward of the first use.
    (layer(x) * _input((4, 3, 5), seed=1) + layer(x * 2).square()).sum().backward()
    opt.step()
    grad = layer.rho.grad.clone()
    assert (layer.rho < 0).any() or (layer.rho > 1).any(), "the step left ρ in range: no test"
    expected = (torch.tensor([0.5, 0.99, 0.01], dtype=torch.float64) - 10 * grad).clamp(0, 1)
    layer.eval()(x)  # the next forward (eval too) clips before using ρ
    torch.testing.assert_close(layer.rho.detach(), expected)
    torch.testing.assert_close(layer(x), ref_bin(layer, x, (layer.running_mean, layer.running_var)),
                               **TOL)


# -- Switchable Norm ---------------------------------------------------------------------

def ref_switchable(layer, x, running=None):
    w = torch.softmax(layer.mean_weight.detach(), 0)
    v = torch.softmax(layer.var_weight.detach(), 0)
    mean_i, var_i = ref_in_stats(x)
    mean_l, var_l, _ = _moments(x, tuple(range(1, x.dim())))
    if running is None:
        mean_b, var_b, _ = ref_bn_stats(x)
    else:
        mean_b, var_b = _cv(running[0], x), _cv(running[1], x)
    mean = w[0] * mean_i + w[1] * mean_l + w[2] * mean_b
    var = v[0] * var_i + v[1] * var_l + v[2] * var_b
    return (_cv(layer.weight.detach(), x) * (x - mean) / torch.sqrt(var + layer.eps)
            + _cv(layer.bias.detach(), x))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("cls, reference", [(distnorm.BatchInstanceNorm, ref_bin),
                                            (distnorm.SwitchableNorm, ref_switchable)],
                         ids=["bin", "switchable"])
def test_mixture_formula(cls, reference, shape):
    layer = _randomize(cls(shape[1]).double())
    x = _input(shape)
    torch.testing.assert_close(layer(x), reference(layer, x), **TOL)
    rm, rv = ref_running(x)
    torch.testing.assert_close(layer.running_mean, rm, **TOL)
    torch.testing.assert_close(layer.running_var, rv, **TOL)
    x2 = _input(shape, seed=5)
    torch.testing.assert_close(layer.eval()(x2), reference(layer, x2, (rm, rv)), **TOL)


def test_switchable_norm_default_weights_are_uniform():
    w_mean, w_var = distnorm.SwitchableNorm(4).mixture_weights()
    torch.testing.assert_close(w_mean, torch.full((3,), 1 / 3))
    torch.testing.assert_close(w_var, torch.full((3,), 1 / 3))


# -- FRN + TLU -----------------------------------------------------------------------------

@pytest.mark.parametrize("learnable_eps", [False, True], ids=["eps", "learned-eps"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_filter_response_norm_formula(shape, learnable_eps):
    layer = _randomize(distnorm.FilterResponseNorm(shape[1], learnable_eps=learnable_eps).double())
    x = _input(shape)
    nu2 = x ** 2 if x.dim() == 2 else _moments(x ** 2, tuple(range(2, x.dim())))[0]
    eps = 1e-6 + (layer.eps_learned.detach().abs() if learnable_eps else 0.0)
    y = _cv(layer.weight.detach(), x) * x / torch.sqrt(nu2 + eps) + _cv(layer.bias.detach(), x)
    expected = torch.where(y > _cv(layer.tau.detach(), x), y, _cv(layer.tau.detach(), x))
    torch.testing.assert_close(layer(x), expected, **TOL)
    torch.testing.assert_close(layer.eval()(x), expected, **TOL)  # no batch dependence
    assert ("eps_learned" in layer.state_dict()) == learnable_eps


# -- PONO + moment shortcut ------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_positional_norm_formula_and_moment_shortcut(shape):
    layer = distnorm.PositionalNorm(eps=1e-5)
    x = _input(shape)
    y, mean, std = layer(x)
    ref_mean, ref_var, _ = _moments(x, (1,))
    ref_std = torch.sqrt(ref_var + 1e-5)
    torch.testing.assert_close(mean, ref_mean, **TOL)
    torch.testing.assert_close(std, ref_std, **TOL)
    torch.testing.assert_close(y, (x - ref_mean) / ref_std, **TOL)
    assert mean.shape == (shape[0], 1) + tuple(shape[2:])
    h = _input((shape[0], 5) + tuple(shape[2:]), seed=3)
    torch.testing.assert_close(distnorm.moment_shortcut(h, mean, std), h * ref_std + ref_mean, **TOL)
    torch.testing.assert_close(layer.moment_shortcut(y, mean, std), x, **TOL)  # round trip


# -- cosine normalization --------------------------------------------------------------------

@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["NxD", "NxTxD"])
def test_cosine_norm_formula(batch):
    layer = distnorm.CosineNorm(7, 4).double()
    x = torch.randn(batch + (7,), generator=_gen(), dtype=torch.float64) * 3
    w = layer.weight.detach()
    dots = torch.einsum("...i,oi->...o", x, w)
    expected = dots / (x.norm(dim=-1, keepdim=True) * w.norm(dim=-1))
    y = layer(x)
    torch.testing.assert_close(y, expected, **TOL)
    assert y.abs().max() <= 1 + 1e-12
    torch.testing.assert_close(layer(x * 100), y, **TOL)  # scale invariant


# -- conditional BN ---------------------------------------------------------------------------

def ref_cbn(layer, x, cond, running=None):
    if running is None:
        mean, var, _ = ref_bn_stats(x)
    else:
        mean, var = _cv(running[0], x), _cv(running[1], x)
    x_hat = (x - mean) / torch.sqrt(var + layer.norm.eps)
    lin1, lin2 = layer.mlp[0], layer.mlp[2]
    hidden = torch.clamp(cond @ lin1.weight.detach().T + lin1.bias.detach(), min=0)
    out = hidden @ lin2.weight.detach().T + lin2.bias.detach()
    c = x.shape[1]
    view = (x.shape[0], c) + (1,) * (x.dim() - 2)
    return x_hat * (1 + out[:, :c].reshape(view)) + out[:, c:].reshape(view)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conditional_batch_norm_formula(shape):
    layer = distnorm.ConditionalBatchNorm(shape[1], 4, hidden=6).double()
    x, cond = _input(shape), torch.randn(shape[0], 4, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(layer(x, cond), ref_cbn(layer, x, cond), **TOL)  # fresh: plain BN
    torch.testing.assert_close(layer(x, cond * 0 + 1), ref_cbn(layer, x, cond), **TOL)
    _randomize(layer)
    layer.norm.reset_running_stats()
    torch.testing.assert_close(layer(x, cond), ref_cbn(layer, x, cond), **TOL)
    rm, rv = ref_running(x)
    torch.testing.assert_close(layer.norm.running_mean, rm, **TOL)
    torch.testing.assert_close(layer.norm.running_var, rv, **TOL)
    torch.testing.assert_close(layer.eval()(x, cond), ref_cbn(layer, x, cond, (rm, rv)), **TOL)


# -- conditional instance norm -------------------------------------------------------------

@pytest.mark.parametrize("shape", SPATIAL, ids=IDS[1:])
def test_conditional_instance_norm_formula(shape):
    layer = _randomize(distnorm.ConditionalInstanceNorm(shape[1], num_styles=5).double())
    x = _input(shape)
    styles = torch.tensor([4, 0, 2, 4, 1, 3][:shape[0]])
    mean, var = ref_in_stats(x)
    x_hat = (x - mean) / torch.sqrt(var + 1e-5)
    view = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    expected = (x_hat * layer.weight.detach()[styles].reshape(view)
                + layer.bias.detach()[styles].reshape(view))
    torch.testing.assert_close(layer(x, styles), expected, **TOL)
    torch.testing.assert_close(layer(x, styles.tolist()), expected, **TOL)
    single = x_hat * _cv(layer.weight.detach()[2], x) + _cv(layer.bias.detach()[2], x)
    torch.testing.assert_close(layer(x, 2), single, **TOL)


# -- AdaIN -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SPATIAL, ids=IDS[1:])
def test_adain_formula(shape):
    content = _input(shape)
    style_shape = tuple(shape[:2]) + tuple(s + 1 for s in shape[2:])  # other spatial size
    style = _input(style_shape, seed=4) * 3 + 2
    mean_c, var_c = ref_in_stats(content)
    mean_s, var_s = ref_in_stats(style)
    expected = torch.sqrt(var_s + 1e-5) * (content - mean_c) / torch.sqrt(var_c + 1e-5) + mean_s
    y = distnorm.AdaIN()(content, style)
    torch.testing.assert_close(y, expected, **TOL)
    mean_y, _ = ref_in_stats(y)  # the output carries the style's moments
    torch.testing.assert_close(mean_y, mean_s, **TOL)


# -- SPADE -------------------------------------------------------------------------------------

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _nearest(segmap, size):
    """Nearest-neighbour resize, written out: source index floor(i · in / out)."""
    out = segmap
    for axis, n_out in enumerate(size, start=2):
        n_in = out.shape[axis]
        index = torch.div(torch.arange(n_out) * n_in, n_out, rounding_mode="floor")
        out = out.index_select(axis, index)
    return out


def ref_spade(layer, x, segmap, running=None):
    if running is None:
        mean, var, _ = ref_bn_stats(x)
    else:
        mean, var = _cv(running[0], x), _cv(running[1], x)
    x_hat = (x - mean) / torch.sqrt(var + layer.param_free_norm.eps)
    conv = _CONV_FN[layer.spatial_dims]
    m = _nearest(segmap, x.shape[2:])

    def apply(c, t):
        return conv(t, c.weight.detach(), c.bias.detach(), padding=c.kernel_size[0] // 2)

    actv = torch.clamp(apply(layer.mlp_shared[0], m), min=0)
    return x_hat * (1 + apply(layer.mlp_gamma, actv)) + apply(layer.mlp_beta, actv)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_spade_formula(dims):
    shape = (3, 2) + (4,) * dims
    layer = distnorm.SPADE(2, label_channels=3, hidden=5, spatial_dims=dims).double()
    x = _input(shape)
    labels = torch.randint(0, 3, (3,) + (2,) * dims, generator=_gen(6))
    segmap = F.one_hot(labels, 3).movedim(-1, 1).double()  # 2× coarser than x
    torch.testing.assert_close(layer(x, segmap), ref_spade(layer, x, segmap), **TOL)
    rm, rv = ref_running(x)
    torch.testing.assert_close(layer.param_free_norm.running_mean, rm, **TOL)
    torch.testing.assert_close(layer.eval()(x, segmap), ref_spade(layer, x, segmap, (rm, rv)), **TOL)


def test_spade_state_dict_has_the_authors_names():
    keys = set(distnorm.SPADE(4, 3).state_dict())
    assert {"param_free_norm.running_mean", "mlp_shared.0.weight", "mlp_gamma.weight",
            "mlp_beta.bias"} <= keys


# -- gradcheck ---------------------------------------------------------------------------------

def _gradcheck(layer: nn.Module, inputs: Sequence[torch.Tensor], params: Sequence[str] = ()) -> None:
    """gradcheck of layer(*inputs) with respect to the inputs and the named parameters."""
    named = dict(layer.named_parameters())
    values = [named[n].detach().clone().requires_grad_() for n in params]
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    k = len(inputs)

    def fn(*args):
        return functional_call(layer, dict(zip(params, args[k:])), tuple(args[:k]))

    assert torch.autograd.gradcheck(fn, (*inputs, *values), eps=1e-6, atol=1e-5, rtol=1e-4)


GRADCHECK: Dict[str, Callable[[], tuple]] = {
    "bin": lambda: (_randomize(distnorm.BatchInstanceNorm(2).double()), [_input((3, 2, 3))],
                    ["rho", "weight", "bias"]),
    "bin-0d": lambda: (_randomize(distnorm.BatchInstanceNorm(2).double()), [_input((4, 2))],
                       ["rho", "weight", "bias"]),
    "switchable": lambda: (_randomize(distnorm.SwitchableNorm(2).double()), [_input((3, 2, 2, 2))],
                           ["mean_weight", "var_weight", "weight", "bias"]),
    "switchable-eval": lambda: (_randomize(distnorm.SwitchableNorm(2).double()).eval(),
                                [_input((3, 2, 3))], ["mean_weight", "var_weight"]),
    "frn": lambda: (_randomize(distnorm.FilterResponseNorm(2, learnable_eps=True).double()),
                    [_input((2, 2, 3))], ["weight", "bias", "tau", "eps_learned"]),
    "pono": lambda: (distnorm.PositionalNorm(), [_input((2, 3, 2, 2))], []),
    "cosine": lambda: (distnorm.CosineNorm(4, 3).double(),
                       [torch.randn(2, 4, generator=_gen(), dtype=torch.float64)], ["weight"]),
    "cbn": lambda: (_randomize(distnorm.ConditionalBatchNorm(2, 3, hidden=4).double()),
                    [_input((3, 2, 2)), torch.randn(3, 3, generator=_gen(), dtype=torch.float64)],
                    ["mlp.2.weight"]),
    "cin": lambda: (_randomize(distnorm.ConditionalInstanceNorm(2, 3).double()),
                    [_input((2, 2, 3)), torch.tensor([2, 0])], ["weight", "bias"]),
    "adain": lambda: (distnorm.AdaIN(), [_input((2, 2, 3)), _input((2, 2, 4), seed=1)], []),
    "spade": lambda: (distnorm.SPADE(2, 2, hidden=3).double(),
                      [_input((2, 2, 2, 2)), torch.rand(2, 2, 1, 1, generator=_gen(),
                                                        dtype=torch.float64)],
                      ["mlp_gamma.bias"]),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck(name):
    layer, inputs, params = GRADCHECK[name]()
    _gradcheck(layer, inputs, params)


# -- synced over W = 2 gloo ranks ----------------------------------------------------------------

C = 3
SIZES = [(3, 1), (0, 2), (2, 2), (0, 0)]  # uneven, one rank empty, even, all empty


def _factory(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bin":
        return distnorm.BatchInstanceNorm(C).double()
    if kind == "switchable":
        return distnorm.SwitchableNorm(C).double()
    if kind == "cbn":
        return distnorm.ConditionalBatchNorm(C, 4, hidden=5).double()
    return distnorm.SPADE(C, 2, hidden=4).double()


def _extra_input(kind: str, n: int, gen: torch.Generator):
    if kind == "cbn":
        return torch.randn(n, 4, generator=gen, dtype=torch.float64)
    if kind == "spade":
        return torch.rand(n, 2, 2, 2, generator=gen, dtype=torch.float64)
    return None


def _synced_case(kind: str) -> Dict[str, Any]:
    gen = _gen(11)
    tail = (5,) if kind == "switchable" else (4, 4)  # 1-D and 2-D
    steps = []
    for sizes in SIZES:
        steps.append({
            "x": [torch.randn((n, C) + tail, generator=gen, dtype=torch.float64) * 1.5 + 0.3
                  for n in sizes],
            "g": [torch.randn((n, C) + tail, generator=gen, dtype=torch.float64) for n in sizes],
            "c": [_extra_input(kind, n, gen) for n in sizes],
        })
    state = _randomize(_factory(kind), seed=3).state_dict()
    return {"kind": kind, "state": state, "steps": steps}


def _run_steps(layer: nn.Module, steps: List[Dict[str, Any]], rank=None) -> List[Dict[str, Any]]:
    """Training steps; ``rank=None``: the whole (concatenated) batch."""
    out = []
    for step in steps:
        pick = (lambda parts: torch.cat(parts)) if rank is None else (lambda parts: parts[rank])
        x = pick(step["x"]).clone().requires_grad_()
        extra = [] if step["c"][0] is None else [pick(step["c"]).clone().requires_grad_()]
        y = layer(x, *extra)
        (y * pick(step["g"])).sum().backward()
        out.append({
            "y": y.detach(), "grad": x.grad,
            "extra_grad": extra[0].grad if extra else None,
            "params": {n: p.grad.clone() for n, p in layer.named_parameters()},
            "buffers": {n: b.clone() for n, b in layer.named_buffers()},
        })
        layer.zero_grad(set_to_none=False)
    return out


def _w_synced(rank: int, world: int, cases: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    results = []
    for case in cases:
        layer = _factory(case["kind"])
        layer.load_state_dict(case["state"])
        results.append(_run_steps(layer, case["steps"], rank))
    return results


def test_synced_parts_equal_the_local_layer_on_the_concatenated_batch(world2):
    cases = [_synced_case(kind) for kind in ("bin", "switchable", "cbn", "spade")]
    results = world2.run(_w_synced, cases)
    for c, case in enumerate(cases):
        kind = case["kind"]
        reference = _factory(kind)
        reference.load_state_dict(case["state"])
        expected = _run_steps(reference, case["steps"])
        previous = None
        for s, exp in enumerate(expected):
            outs = [results[r][c][s] for r in range(2)]
            where = (kind, "step", s, SIZES[s])
            torch.testing.assert_close(torch.cat([o["y"] for o in outs]), exp["y"], **TOL, msg=str(where))
            torch.testing.assert_close(torch.cat([o["grad"] for o in outs]), exp["grad"], **TOL,
                                       msg=str(where))
            if exp["extra_grad"] is not None:
                torch.testing.assert_close(torch.cat([o["extra_grad"] for o in outs]),
                                           exp["extra_grad"], **TOL, msg=str(where))
            for name, grad in exp["params"].items():
                torch.testing.assert_close(outs[0]["params"][name] + outs[1]["params"][name], grad,
                                           **TOL, msg=str(where + (name,)))
            for r, out in enumerate(outs):
                for name, value in out["buffers"].items():
                    if sum(SIZES[s]) == 0:
                        # Empty over the whole group: running statistics and counter
                        # untouched (API.md). (torch's own BatchNorm — the unsynced
                        # SyncBatchNorm inside cbn/spade — counts an empty batch.)
                        assert torch.equal(value, previous[r]["buffers"][name]), where + (name,)
                    else:
                        torch.testing.assert_close(value, exp["buffers"][name], **TOL,
                                                   msg=str(where + (name,)))
            previous = outs
        # Non-trivial: the statistics moved.
        assert not torch.equal(expected[0]["buffers"][_running_mean_key(kind)],
                               torch.zeros(C, dtype=torch.float64))


def _running_mean_key(kind: str) -> str:
    return {"cbn": "norm.running_mean", "spade": "param_free_norm.running_mean"}.get(
        kind, "running_mean")


# -- convert_model(mode="bin" | "switchable") ----------------------------------------------------

def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5),
                          nn.Flatten(), nn.Linear(5 * 6 * 6, 6), nn.BatchNorm1d(6))
    gen = _gen(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("mode, bound", [("bin", 1e-6), ("switchable", 2e-3)])
def test_convert_starts_close_to_batch_norm(mode, bound):
    """bin: ρ = 1 is BatchNorm (float32 rounding only). switchable: logits (0, 0, 8)
    put 99.93 % of both mixtures on BN; measured max |y − y_BN| / max |y_BN| ≈ 5e-4
    in training and 4e-4 in eval on this model (bin: ≈ 3e-7, float32 rounding)."""
    reference = _bn_model()
    checkpoint = copy.deepcopy(reference.state_dict())
    model = distnorm.convert_model(copy.deepcopy(reference), mode=mode)
    cls = distnorm.variants()[mode]
    assert sum(type(m) is cls for m in model.modules()) == 3
    x = torch.randn(8, 3, 6, 6, generator=_gen(7)) * 2 + 0.5
    errors = {}
    for training in (True, False):
        model.train(training), reference.train(training)
        with torch.no_grad():
            errors[training] = _max_relative(model(x), reference(x))
    assert max(errors.values()) < bound, errors
    if mode == "switchable":
        assert min(errors.values()) > 0  # not BatchNorm exactly: the mixture is live
        w_mean, _ = model[1].mixture_weights()
        torch.testing.assert_close(w_mean[2], torch.tensor(1 / (1 + 2 * math.exp(-8))))
    # Running statistics moved as BatchNorm's (the BN part is BatchNorm): exactly in the
    # first layer; later layers see the (slightly different) output of the one before.
    for key, value in reference.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")) \
                and (mode == "bin" or key.startswith("1.")):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7)

    # A plain BatchNorm checkpoint loads strictly; the mixture's parameters keep their values.
    extra = {k: v.clone() for k, v in model.state_dict().items() if k not in checkpoint}
    assert extra and all(k.endswith(("rho", "mean_weight", "var_weight")) for k in extra)
    with torch.no_grad():
        for k in extra:
            model.get_parameter(k).mul_(0.5)
    model.load_state_dict(checkpoint, strict=True)
    for k, v in model.state_dict().items():
        if k in checkpoint:
            assert torch.equal(v, checkpoint[k]), k
        else:
            torch.testing.assert_close(v, extra[k] * 0.5)
    # A checkpoint of the converted model itself loads into a fresh converted model.
    again = distnorm.convert_model(_bn_model(), mode=mode)
    again.load_state_dict(model.state_dict(), strict=True)
    # And reverting gives BatchNorm back with the same BatchNorm state.
    reverted = distnorm.revert_model(again)
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in reverted.modules()) == 3
    assert set(reverted.state_dict()) == set(checkpoint)


def test_converting_a_mixture_again_keeps_what_it_learned():
    model = distnorm.convert_model(_bn_model(), mode="bin")
    with torch.no_grad():
        model[1].rho.fill_(0.25)
    again = distnorm.convert_model(model, mode="bin")
    assert again[1].rho is not None and torch.equal(again[1].rho, torch.full((4,), 0.25))


# -- bad input ----------------------------------------------------------------------------------

def test_groups_must_divide_channels():
    # The grouped layers are torch's (nn.GroupNorm, distnorm.GroupNorm built on it).
    # None of the catalogue's own layers has groups; torch's message names both numbers.
    with pytest.raises(ValueError, match=r"num_channels \(8\) must be divisible by num_groups \(3\)"):
        distnorm.GroupNorm(3, 8)
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        nn.GroupNorm(4, 6)


def test_condition_of_the_wrong_size():
    cbn = distnorm.ConditionalBatchNorm(3, 4)
    x = torch.randn(2, 3, 4, 4)
    for cond in (torch.randn(2, 5), torch.randn(3, 4), torch.randn(2, 4, 1)):
        with pytest.raises(ValueError, match=r"ConditionalBatchNorm: expected a condition of shape "
                                             r"\(N=2, cond_features=4\).*got"):
            cbn(x, cond)
    spade = distnorm.SPADE(3, label_channels=2, hidden=4)
    with pytest.raises(ValueError, match=r"SPADE: expected a segmentation map.*label_channels=2"):
        spade(x, torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"SPADE: expected a segmentation map.*N=2"):
        spade(x, torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"SPADE: expected an \(N, C\) \+ 2 spatial dims"):
        spade(torch.randn(2, 3, 4), torch.rand(2, 2, 4))


def test_adain_style_content_mismatch():
    adain = distnorm.AdaIN()
    content = torch.randn(2, 3, 4, 4)
    for style in (torch.randn(3, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(2, 4, 4, 4),
                  torch.randn(2, 3, 16)):
        with pytest.raises(ValueError, match=r"AdaIN: style and content must agree.*content "
                                             r"\(2, 3, 4, 4\), style"):
            adain(content, style)
    with pytest.raises(ValueError, match=r"AdaIN: instance statistics need .* content"):
        adain(torch.randn(2, 3), torch.randn(2, 3))


def test_style_index_out_of_range():
    cin = distnorm.ConditionalInstanceNorm(3, num_styles=4)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"ConditionalInstanceNorm: style index 4 out of range "
                                         r"\[0, 4\)"):
        cin(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"style index -1 out of range"):
        cin(x, -1)
    with pytest.raises(ValueError, match=r"one style index per sample, shape \(2,\)"):
        cin(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"must hold integers"):
        cin(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"ConditionalInstanceNorm: instance statistics need"):
        cin(torch.randn(2, 3, 1, 1), 0)


@pytest.mark.parametrize("make, x", [
    (lambda: distnorm.BatchInstanceNorm(4), torch.randn(2, 3, 5)),
    (lambda: distnorm.SwitchableNorm(4), torch.randn(2, 3, 5)),
    (lambda: distnorm.FilterResponseNorm(4), torch.randn(2, 3, 5)),
    (lambda: distnorm.ConditionalInstanceNorm(4, 2), torch.randn(2, 3, 5)),
    (lambda: distnorm.CosineNorm(4, 2), torch.randn(2, 3)),
    (lambda: distnorm.PositionalNorm(), torch.randn(5)),
], ids=["bin", "switchable", "frn", "cin", "cosine", "pono"])
def test_wrong_shape_names_the_layer(make, x):
    layer = make()
    name = type(layer).__name__
    args = (x, 0) if name == "ConditionalInstanceNorm" else (x,)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        layer(*args)


def test_half_precision_inputs_keep_their_dtype():
    x = (torch.randn(4, 3, 4, 4) * 100 + 1000).half()  # squares overflow float16
    for layer in (distnorm.BatchInstanceNorm(3), distnorm.SwitchableNorm(3),
                  distnorm.FilterResponseNorm(3)):
        y = layer(x)
        assert y.dtype == torch.float16 and torch.isfinite(y).all(), type(layer).__name__
