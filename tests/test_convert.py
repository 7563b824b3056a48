"""convert_model / revert_model on real models (single process, no process group).

References are the unconverted models themselves: without a process group a
converted SyncBatchNorm must be exactly ``nn.BatchNorm*d``, so outputs, gradients
and running statistics are compared bit-exactly (``torch.equal``).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict

import warnings

import pytest
import torch
import torchvision
from torch import nn

import distnorm
from distnorm.registry import _VARIANTS


PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# -- helpers -----------------------------------------------------------------------

def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default weights and statistics, so that a copy that
    dropped them (ones / zeros / 0 / 1 defaults) cannot pass for a bit-exact one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=gen)))
    return model


def _plain_bns(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PLAIN_BN)}


def _same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _clone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


_RESNET18 = None


def _resnet18() -> nn.Module:
    global _RESNET18
    if _RESNET18 is None:  # built once per session (0.5 s), deep-copied per test
        torch.manual_seed(0)
        _RESNET18 = _randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    return copy.deepcopy(_RESNET18)


_DETECTOR = None


def _detector() -> nn.Module:
    global _DETECTOR
    if _DETECTOR is None:
        # weights=None, weights_backbone=None: nothing is downloaded, and the backbone
        # uses nn.BatchNorm2d (torchvision uses FrozenBatchNorm2d only when pretrained).
        torch.manual_seed(0)
        _DETECTOR = _randomize_bn(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None))
    return copy.deepcopy(_DETECTOR)


MODELS: Dict[str, Callable[[], nn.Module]] = {"resnet18": _resnet18, "fasterrcnn_mnv3": _detector}
BN_COUNT = {"resnet18": 20, "fasterrcnn_mnv3": 46}


class Mixed(nn.Module):
    """BatchNorm1d on (N, C) and (N, C, L), BatchNorm2d, BatchNorm3d, nn.SyncBatchNorm,
    with a few non-default options."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn_fc = nn.BatchNorm1d(6)
        self.conv1 = nn.Conv1d(6, 4, 1)
        self.bn1 = nn.BatchNorm1d(4, eps=1e-3, momentum=None)
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.bn2 = nn.BatchNorm2d(3, momentum=0.3)
        self.conv3 = nn.Conv3d(3, 2, 1)
        self.bn3 = nn.BatchNorm3d(2)
        self.sync = nn.SyncBatchNorm(2, eps=1e-4)
        self.bn_noaffine = nn.BatchNorm2d(2, affine=False)
        self.bn_notrack = nn.BatchNorm2d(2, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 5)
        h = self.bn_fc(self.fc(x))                               # (N, 6)
        h = self.bn1(self.conv1(h[:, :, None].expand(-1, -1, 3)))  # (N, 4, 3)
        h = self.bn2(self.conv2(h[:, :, :, None].expand(-1, -1, -1, 2)))  # (N, 3, 3, 2)
        h = self.bn3(self.conv3(h[:, :, None]))                  # (N, 2, 1, 3, 2)
        h = self.sync(h)
        h = self.bn_noaffine(h[:, :, 0])
        return self.bn_notrack(h)


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(Mixed())


MIXED_CLASSES = {"bn_fc": nn.BatchNorm1d, "bn1": nn.BatchNorm1d, "bn2": nn.BatchNorm2d,
                 "bn3": nn.BatchNorm3d, "sync": nn.SyncBatchNorm, "bn_noaffine": nn.BatchNorm2d,
                 "bn_notrack": nn.BatchNorm2d}


def _bn_attrs(m: nn.Module):
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def _revertible(mode: str) -> bool:
    return _VARIANTS[mode][1]


# -- every BN converted, state kept ----------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_and_revert_real_models(name):
    model = MODELS[name]()
    originals = _plain_bns(model)
    assert len(originals) == BN_COUNT[name]
    classes = {n: type(m) for n, m in originals.items()}
    before = _clone_state(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    out = distnorm.convert_model(model)
    assert out is model
    assert not _plain_bns(model), "a torch BatchNorm survived convert_model"
    converted = {n: m for n, m in model.named_modules() if isinstance(m, distnorm.SyncBatchNorm)}
    assert sorted(converted) == sorted(originals)
    for n, m in converted.items():
        assert _bn_attrs(m) == _bn_attrs(originals[n])
    _same_state(before, model.state_dict())
    # The very same tensors, not copies.
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(dict(model.named_parameters())) == list(params)
    assert all(b is buffers[n] for n, b in model.named_buffers())

    back = distnorm.revert_model(model)
    assert back is model
    assert not any(isinstance(m, distnorm.SyncBatchNorm) for m in model.modules())
    reverted = _plain_bns(model)
    assert {n: type(m) for n, m in reverted.items()} == classes
    for n, m in reverted.items():
        assert _bn_attrs(m) == _bn_attrs(originals[n])
    _same_state(before, model.state_dict())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())


def test_detector_backbone_forward_after_conversion_matches():
    model = _detector()
    ref = copy.deepcopy(model)
    distnorm.convert_model(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):   # batch statistics + running updates, then eval
        model.train(training), ref.train(training)
        with torch.no_grad():
            y, y_ref = model.backbone(x), ref.backbone(x)
        assert list(y) == list(y_ref)
        for k in y:
            assert torch.equal(y[k], y_ref[k]), k
        _same_state(ref.state_dict(), model.state_dict())


def test_requires_grad_and_train_flags_kept():
    model = _resnet18()
    model.bn1.weight.requires_grad_(False)
    model.layer1[0].bn2.bias.requires_grad_(False)
    model.layer2.requires_grad_(False)
    model.train()
    model.layer1[1].bn1.eval()
    model.layer3.eval()
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train_flags = {n: m.training for n, m in model.named_modules()}
    assert not all(grad_flags.values()) and any(grad_flags.values())
    assert not all(train_flags.values()) and any(train_flags.values())

    distnorm.convert_model(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags
    assert {n: m.training for n, m in model.named_modules()} == train_flags
    assert not model.layer1[1].bn1.training and model.layer1[1].bn2.training

    distnorm.revert_model(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags
    assert {n: m.training for n, m in model.named_modules()} == train_flags


def test_optimizer_built_before_conversion_keeps_working():
    model = _resnet18()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    distnorm.convert_model(model)
    before = model.bn1.weight.detach().clone()
    torch.manual_seed(2)
    for _ in range(2):
        x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
        for net, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(net(x), target).backward()
            o.step()
    assert not torch.equal(model.bn1.weight, before), "the optimizer did not move the BN weight"
    _same_state(ref.state_dict(), model.state_dict())


def test_dtype_kept():
    model = _mixed().double()
    distnorm.convert_model(model)
    for n, t in model.state_dict().items():
        if not n.endswith("num_batches_tracked"):
            assert t.dtype == torch.float64, n
    y = model(torch.randn(4, 5, dtype=torch.float64))
    assert y.dtype == torch.float64
    distnorm.revert_model(model)
    for name in MIXED_CLASSES:
        m = getattr(model, name)
        for t in (m.weight, m.running_mean):
            assert t is None or t.dtype == torch.float64, name


def _devices():
    devices = ["cpu", "meta"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mode", ["sync", "frozen", "gn"])
def test_device_kept(device, mode):
    model = _mixed().to(device)
    if mode == "frozen":
        del model.bn_notrack  # no running statistics to freeze; forward is not run here
    distnorm.convert_model(model, mode=mode)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == device, n
    if _revertible(mode):
        distnorm.revert_model(model)
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            assert t.device.type == device, n


# -- revert to the exact classes -----------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "frozen"])
def test_revert_restores_exact_classes(mode):
    model = _mixed()
    if mode == "frozen":
        del model.bn_notrack
    expected = {n: c for n, c in MIXED_CLASSES.items() if hasattr(model, n)}
    attrs = {n: _bn_attrs(getattr(model, n)) for n in expected}
    before = _clone_state(model)
    target = distnorm.variants()[mode]
    distnorm.convert_model(model, mode=mode)
    for n in expected:
        assert type(getattr(model, n)) is target, n
    distnorm.revert_model(model)
    for n, cls in expected.items():
        m = getattr(model, n)
        assert type(m) is cls, (n, type(m))
        assert _bn_attrs(m) == attrs[n], n
    _same_state(before, model.state_dict())


def test_directly_built_layer_reverts_to_batchnorm2d():
    layer = distnorm.SyncBatchNorm(3, eps=1e-3, momentum=0.2)
    reverted = distnorm.revert_model(layer)
    assert type(reverted) is nn.BatchNorm2d
    assert _bn_attrs(reverted) == (3, 1e-3, 0.2, True, True)
    assert reverted.weight is layer.weight and reverted.running_var is layer.running_var


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_convert_root_batch_norm(cls):
    bn = _randomize_bn(cls(6, eps=1e-4, momentum=0.05))
    before = _clone_state(bn)
    layer = distnorm.convert_model(bn)
    assert type(layer) is distnorm.SyncBatchNorm
    assert layer.weight is bn.weight and layer.running_mean is bn.running_mean
    assert _bn_attrs(layer) == _bn_attrs(bn)
    _same_state(before, layer.state_dict())
    back = distnorm.revert_model(layer)
    assert type(back) is cls
    assert back.weight is bn.weight and back.running_mean is bn.running_mean
    _same_state(before, back.state_dict())


def test_sync_to_frozen_switch():
    bn = _randomize_bn(nn.BatchNorm3d(4))
    before = _clone_state(bn)
    layer = distnorm.convert_model(distnorm.convert_model(bn), mode="frozen")
    assert type(layer) is distnorm.FrozenBatchNorm
    back = distnorm.revert_model(layer)
    assert type(back) is nn.BatchNorm3d
    _same_state(before, back.state_dict())


def test_frozen_to_sync_switch():
    bn = _randomize_bn(nn.BatchNorm2d(4))
    before = _clone_state(bn)
    layer = distnorm.convert_model(distnorm.convert_model(bn, mode="frozen"), mode="sync")
    assert type(layer) is distnorm.SyncBatchNorm
    _same_state(before, layer.state_dict())


def test_batch_norm_shared_by_two_parents():
    bn = _randomize_bn(nn.BatchNorm2d(3))
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), bn), nn.Sequential(bn))
    distnorm.convert_model(model)
    assert not _plain_bns(model)
    a, b = model[0][1], model[1][0]
    assert a.weight is b.weight and a.running_mean is b.running_mean


def test_batch_norm_used_twice_in_one_parent():
    bn = _randomize_bn(nn.BatchNorm2d(3))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Conv2d(3, 3, 1), bn)
    distnorm.convert_model(model)
    assert not _plain_bns(model), "a torch BatchNorm survived convert_model"
    assert model[1].weight is model[3].weight


# -- checkpoints both ways -------------------------------------------------------------

def test_plain_checkpoint_loads_into_converted_model_and_back():
    trained = _resnet18()                      # randomized BN = a "trained" checkpoint
    checkpoint = _clone_state(trained)
    torch.manual_seed(5)
    converted = distnorm.convert_model(torchvision.models.resnet18(weights=None, num_classes=10))
    converted.load_state_dict(checkpoint, strict=True)
    _same_state(checkpoint, converted.state_dict())

    plain = torchvision.models.resnet18(weights=None, num_classes=10)
    plain.load_state_dict(converted.state_dict(), strict=True)
    _same_state(checkpoint, plain.state_dict())

    x = torch.randn(2, 3, 64, 64)
    trained.eval(), converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), trained(x))


# -- forward parity without a process group ---------------------------------------

def test_converted_resnet18_matches_unconverted_bit_exactly():
    model = _resnet18()
    ref = copy.deepcopy(model)
    distnorm.convert_model(model)
    torch.manual_seed(3)
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64)
        y, y_ref = model(x), ref(x)
        assert torch.equal(y, y_ref)
        (y * y).sum().backward()
        (y_ref * y_ref).sum().backward()
    _same_state(ref.state_dict(), model.state_dict())
    for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, p_ref.grad), n
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# -- the contract every registered variant gets ------------------------------------

@pytest.mark.parametrize("mode", sorted(distnorm.variants()))
def test_variant_contract_on_resnet18(mode):
    model = _resnet18()
    names = sorted(_plain_bns(model))
    checkpoint = _clone_state(model)
    cls = distnorm.variants()[mode]

    distnorm.convert_model(model, mode=mode)
    assert not _plain_bns(model)
    assert sorted(n for n, m in model.named_modules() if type(m) is cls) == names

    torch.manual_seed(4)
    model.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()

    if _revertible(mode):
        # BatchNorm's keys and shapes are kept (a variant may add buffers of its own),
        # and a plain checkpoint loads (its extra buffers keep their values).
        state = model.state_dict()
        for k, v in checkpoint.items():
            assert k in state and state[k].shape == v.shape, k
        model.load_state_dict(checkpoint, strict=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distnorm.revert_model(model)
        dropped = [w for w in caught if "drops its parameters" in str(w.message)]
        # Mixtures (BIN's rho, SwitchableNorm's logits) say what reverting drops.
        has_extras = any(n not in ("weight", "bias") for n, _ in
                         distnorm.variants()[mode](4).named_parameters(recurse=False))
        assert bool(dropped) == has_extras
        reverted = _plain_bns(model)
        assert sorted(reverted) == names
        assert all(type(m) is nn.BatchNorm2d for m in reverted.values())
        _same_state(checkpoint, model.state_dict())
    else:
        with pytest.raises(ValueError, match="cannot revert"):
            distnorm.revert_model(model)


def test_gn_is_one_way():
    model = distnorm.convert_model(_resnet18(), mode="gn")
    with pytest.raises(ValueError, match=r"cannot revert GroupNorm 'bn1'.*one-way"):
        distnorm.revert_model(model)


# -- BatchNorm subclasses ----------------------------------------------------------------

class _NormAct(nn.BatchNorm2d):
    """The shape of timm's BatchNormAct2d: BN, then parameter-free drop and act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


_NormAct.__name__ = "BatchNormActLike"


class _CustomBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_norm_act_subclass_keeps_its_activation_through_convert_and_revert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _NormAct(4))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    keys = list(model.state_dict())
    distnorm.convert_model(model, mode="sync")
    assert type(model[1]) is distnorm.SyncBatchNorm and isinstance(model[1].act, nn.SiLU)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    distnorm.convert_model(model, mode="frozen")  # a converted norm-act converts again
    assert isinstance(model[1].act, nn.SiLU)
    distnorm.convert_model(model, mode="brn")  # frozen → brn keeps it too
    assert isinstance(model[1].act, nn.SiLU)
    distnorm.revert_model(model)
    assert type(model[1]) is _NormAct and isinstance(model[1].act, nn.SiLU)
    model.eval()
    torch.testing.assert_close(model(x), nn.Sequential(model[0], _bn_eval_then_silu(model[1]))(x))


def _bn_eval_then_silu(layer):
    bn = nn.BatchNorm2d(layer.num_features).eval()
    bn.load_state_dict(layer.state_dict())
    return nn.Sequential(bn, nn.SiLU())


def test_unknown_batch_norm_subclass_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _CustomBN(4))
    with pytest.warns(UserWarning, match=r"left _CustomBN '1' unconverted"):
        distnorm.convert_model(model, mode="sync")
    assert type(model[1]) is _CustomBN
