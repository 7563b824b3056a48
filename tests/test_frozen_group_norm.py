"""FrozenBatchNorm and GroupNorm conversion (docs/algorithms.md §5), single process.

References are written here in float64 from the formulas:
frozen y = x·s + b, s = γ/sqrt(running_var + eps), b = β − running_mean·s;
GroupNorm normalizes each (sample, group of C/G channels) with its own biased moments.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import distnorm


BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _random_bn(cls=nn.BatchNorm2d, c: int = 5, eps: float = 1e-5, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    bn = cls(c, eps=eps)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.01)
        bn.num_batches_tracked.fill_(17)
    return bn


def _frozen_reference(x: torch.Tensor, state: dict, eps: float) -> torch.Tensor:
    """y = x·s + b in float64, per channel (dim 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = state["weight"].double() / torch.sqrt(state["running_var"].double() + eps)
    b = state["bias"].double() - state["running_mean"].double() * s
    return x.double() * s.view(shape) + b.view(shape)


def _scale(state: dict, eps: float) -> torch.Tensor:
    return state["weight"].double() / torch.sqrt(state["running_var"].double() + eps)


# -- FrozenBatchNorm ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 7), (3, 5, 4, 6), (2, 5, 3, 4, 2)],
                         ids=["N,C", "1d", "2d", "3d"])
@pytest.mark.parametrize("training", [False, True])
def test_frozen_is_an_affine_map(shape, training):
    eps = 1e-3
    bn = _random_bn(eps=eps)
    layer = distnorm.FrozenBatchNorm(5, eps=eps)
    layer.load_state_dict(bn.state_dict())
    layer.train(training)
    x = torch.randn(shape) * 3 + 1
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), _frozen_reference(x, bn.state_dict(), eps),
                               rtol=1e-5, atol=1e-5)


def test_frozen_float64_tight():
    bn = _random_bn().double()
    layer = distnorm.FrozenBatchNorm(5).double()
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _frozen_reference(x, bn.state_dict(), 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_frozen_has_buffers_not_parameters():
    layer = distnorm.FrozenBatchNorm(5)
    assert list(layer.parameters()) == []
    assert sorted(n for n, _ in layer.named_buffers()) == sorted(BN_KEYS)
    assert all(not b.requires_grad for b in layer.buffers())


def test_frozen_no_gradient_no_update_in_training():
    bn = _random_bn()
    layer = distnorm.FrozenBatchNorm(5)
    layer.load_state_dict(bn.state_dict())
    layer.train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.manual_seed(0)
    for _ in range(3):
        x = (torch.randn(4, 5, 3, 3) * 5 + 2).requires_grad_()
        grad_out = torch.randn_like(x)
        layer(x).backward(grad_out)
        # ∂L/∂x = g · s per channel
        expected = grad_out.double() * _scale(bn.state_dict(), 1e-5).view(1, -1, 1, 1)
        torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(b.grad is None for b in layer.buffers())


def test_frozen_state_dict_keys_match_batchnorm():
    assert list(distnorm.FrozenBatchNorm(5).state_dict()) == list(nn.BatchNorm2d(5).state_dict())


def test_frozen_loads_bn_checkpoint_and_back():
    bn = _random_bn()
    layer = distnorm.FrozenBatchNorm(5)
    layer.load_state_dict(bn.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(layer.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(layer(x), bn.eval()(x), rtol=1e-6, atol=1e-6)


def test_frozen_loads_checkpoint_without_num_batches_tracked():
    # torchvision's (and detectron2's) FrozenBatchNorm2d have no counter.
    tv = torchvision.ops.FrozenBatchNorm2d(5)
    bn = _random_bn()
    for k in ("weight", "bias", "running_mean", "running_var"):
        tv.get_buffer(k).copy_(bn.get_parameter(k) if k in ("weight", "bias") else bn.get_buffer(k))
    checkpoint = tv.state_dict()
    assert "num_batches_tracked" not in checkpoint
    keys = list(checkpoint)
    layer = distnorm.FrozenBatchNorm(5)
    layer.load_state_dict(checkpoint, strict=True)
    assert list(checkpoint) == keys, "load_state_dict changed the caller's checkpoint"
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(layer(x), tv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).double(), _frozen_reference(x, checkpoint, 1e-5),
                               rtol=1e-5, atol=1e-5)
    # ... also nested in a model.
    model = nn.Sequential(nn.Identity(), distnorm.FrozenBatchNorm(5))
    model.load_state_dict({f"1.{k}": v for k, v in checkpoint.items()}, strict=True)
    assert torch.equal(model[1].running_var, checkpoint["running_var"])


def test_convert_frozen_and_revert_restores_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), _random_bn(seed=1), nn.ReLU(),
                          nn.Conv2d(5, 4, 1),
                          _random_bn(c=4, seed=2))
    model[1].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    model[4].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    model[4].eval()

    distnorm.convert_model(model, mode="frozen")
    assert type(model[1]) is distnorm.FrozenBatchNorm and type(model[4]) is distnorm.FrozenBatchNorm
    assert sorted(n for n, _ in model.named_parameters()) == ["0.bias", "0.weight",
                                                              "3.bias", "3.weight"]
    assert model[1].training and not model[4].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # In training mode a frozen model computes what the BN model computes in eval.
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    assert model[0].weight.grad is not None

    distnorm.revert_model(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm2d
    assert model[1].training and not model[4].training
    for n, p in model.named_parameters():
        assert isinstance(p, nn.Parameter)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- GroupNorm conversion ----------------------------------------------------------

def _reference_groups(channels: int, num_groups: int) -> int:
    return max(g for g in range(1, num_groups + 1) if channels % g == 0)


@pytest.mark.parametrize("channels, options, groups", [
    (64, {}, 32), (24, {}, 24), (48, {"num_groups": 32}, 24), (7, {}, 7), (1, {}, 1),
    (96, {}, 32), (100, {}, 25), (64, {"num_groups": 16}, 16), (96, {"num_groups": 20}, 16),
    (12, {"num_groups": 5}, 4), (64, {"num_groups": 1}, 1), (31, {}, 31), (37, {}, 1),
])
def test_gn_group_count(channels, options, groups):
    assert groups == _reference_groups(channels, options.get("num_groups", 32))
    gn = distnorm.convert_model(nn.BatchNorm2d(channels), mode="gn", **options)
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels) == (groups, channels)


def test_gn_group_count_all_channels():
    for channels in range(1, 130):
        for num_groups in (1, 3, 8, 32):
            gn = distnorm.convert_model(nn.BatchNorm2d(channels), mode="gn", num_groups=num_groups)
            assert gn.num_groups == _reference_groups(channels, num_groups), (channels, num_groups)


def test_gn_copies_gamma_beta():
    bn = _random_bn(c=12, eps=1e-3)
    bn.bias.requires_grad_(False)
    bn.eval()
    gn = distnorm.convert_model(bn, mode="gn", num_groups=4)
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert isinstance(gn.weight, nn.Parameter) and isinstance(gn.bias, nn.Parameter)
    assert gn.weight.requires_grad and not gn.bias.requires_grad
    assert gn.eps == 1e-3 and gn.affine and not gn.training
    noaffine = distnorm.convert_model(nn.BatchNorm2d(6, affine=False), mode="gn")
    assert not noaffine.affine and noaffine.weight is None


def _gn_reference(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("shape", [(3, 12, 5, 4), (3, 12, 7), (2, 12, 2, 3, 4)])
def test_gn_output_matches_formula(shape):
    bn = _random_bn(c=12, eps=1e-3)
    gn = distnorm.convert_model(bn, mode="gn", num_groups=4)   # 4 groups of 3 channels
    x = torch.randn(shape) * 2 + 3
    y = gn(x)
    ref = _gn_reference(x, 4, bn.weight.detach(), bn.bias.detach(), 1e-3)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # No batch dependence: each sample alone gives the same output.
    torch.testing.assert_close(gn(x[1:2]), y[1:2], rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert bn.weight.grad is not None  # γ is the BN's own parameter


def test_gn_conversion_of_resnet18_replaces_every_bn():
    model = torchvision.models.resnet18(weights=None)
    widths = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    distnorm.convert_model(model, mode="gn", num_groups=32)
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [g.num_channels for g in gns] == widths
    assert all(g.num_groups == 32 for g in gns)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_frozen_model_can_be_scripted():
    """FrozenBatchNorm is a fixed affine map: a frozen model scripts and runs the same."""
    import warnings

    model = distnorm.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
                                   mode="frozen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(scripted(x), model(x))
