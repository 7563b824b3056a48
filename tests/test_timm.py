"""timm models convert with ``distnorm.convert_model`` and train unchanged.

Families: ResNet (``resnet26d``: ResNet-D, deep stem and average-pool downsampling), ConvNeXt built with BatchNorm (``convnext_atto`` with
``conv_mlp=True, norm_layer="batchnorm2d"``: 17 ``nn.BatchNorm2d``, one of them on
the pooled (N, C, 1, 1) features of the head) and EfficientNet (``efficientnet_b0``).
All are built with ``pretrained=False`` (nothing is downloaded).

EfficientNet, like MobileNetV3, RegNet and most newer timm families, uses timm's
``BatchNormAct2d`` (a *subclass* of ``nn.BatchNorm2d`` that also applies an
activation): ``convert_model`` converts its normalization and keeps its ``drop`` and
``act`` children, applied after it; ``revert_model`` gives the BatchNormAct2d back.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm

if importlib.util.find_spec("timm") is None:
    if os.environ.get("CI"):
        raise ImportError("timm is part of the dev extra: pip install -e '.[dev]'")
    pytest.skip("timm is not installed (pip install -e '.[dev]')", allow_module_level=True)

CLASSES = 10

# id -> (timm name, create_model kwargs)
MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "resnet26d": ("resnet26d", {}),
    "convnext_atto_bn": ("convnext_atto", {"conv_mlp": True, "norm_layer": "batchnorm2d"}),
    "efficientnet_b0": ("efficientnet_b0", {}),
}
MODES = sorted(distnorm.variants())
# Mixtures add parameters of their own to BatchNorm's state_dict keys.
MIXTURES = {"bin": (".rho",), "switchable": (".mean_weight", ".var_weight")}
CASES = [(key, mode) for key in MODELS for mode in MODES]


def _create(key: str, seed: int = 0) -> nn.Module:
    import timm

    name, kwargs = MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def _batch_norms(model: nn.Module) -> List[nn.Module]:
    """Every BatchNorm-like layer (torch's, timm's subclasses, distnorm's)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _data(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen, dtype=dtype) * 1.3 + 0.2
    return x, torch.randint(0, CLASSES, (n,), generator=gen)


RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("key,mode", CASES)
def test_convert_train_and_state_dict(key: str, mode: str) -> None:
    torch.set_num_threads(1)
    reference = _create(key)
    n_norms = len(_batch_norms(reference))
    assert n_norms > 0
    model = distnorm.convert_model(copy.deepcopy(reference), mode=mode)

    # Every BatchNorm became the mode's layer; nothing is left behind.
    target = distnorm.variants()[mode]
    variant_types = tuple(distnorm.variants().values())
    left = [type(m).__name__ for m in _batch_norms(model) if not isinstance(m, variant_types)]
    assert not left, f"{len(left)} of {n_norms} BatchNorm layers not converted: {sorted(set(left))}"
    assert sum(isinstance(m, target) for m in model.modules()) == n_norms

    # The unconverted model's checkpoint loads into the converted one.
    fresh = _create(key, seed=1)
    if mode == "gn":  # GroupNorm keeps gamma/beta, has no running statistics
        result = model.load_state_dict(fresh.state_dict(), strict=False)
        assert not result.missing_keys
        assert result.unexpected_keys and all(k.endswith(RUNNING) for k in result.unexpected_keys)
    else:
        model.load_state_dict(fresh.state_dict())
    loaded, source = model.state_dict(), fresh.state_dict()
    for name, value in source.items():
        if not name.endswith(RUNNING):
            assert torch.equal(loaded[name], value), name

    # Single process, no process group: sync is exactly nn.BatchNorm.
    if mode == "sync":
        x, _ = _data(4, seed=3)
        plain = copy.deepcopy(fresh).train()
        torch.testing.assert_close(model.train()(x), plain(x), rtol=1e-5, atol=1e-5)
        model.load_state_dict(fresh.state_dict())

    # Two SGD steps, unchanged training code.
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        # cbn: a norm fed by pooling (ConvNeXt's head) has no producer -> rho = 0 warning
        warnings.simplefilter("ignore", UserWarning)
        for step in range(2):
            x, y = _data(4, seed=10 + step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "fc.weight" in changed or "head.fc.weight" in changed or "classifier.weight" in changed
    if mode != "frozen":  # frozen + timm's zero-init last gamma of a block: its convs get no gradient
        assert len(changed) >= len(before) // 2, f"only {changed} changed"
    for layer in (m for m in model.modules() if isinstance(m, target)):
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
            if isinstance(p, nn.Parameter):
                assert p.grad is not None and torch.isfinite(p.grad).all()

    # ... and the trained checkpoint loads back into the unconverted model, which then
    # computes what the converted model computes in eval mode.
    back = _create(key, seed=2)
    if mode == "gn":
        result = back.load_state_dict(model.state_dict(), strict=False)
        assert not result.unexpected_keys
        assert result.missing_keys and all(k.endswith(RUNNING) for k in result.missing_keys)
    elif mode in MIXTURES:  # BN's keys plus the mixture's own parameters (rho, logits)
        result = back.load_state_dict(model.state_dict(), strict=False)
        assert not result.missing_keys
        assert result.unexpected_keys and all(k.endswith(MIXTURES[mode])
                                              for k in result.unexpected_keys)
    else:
        back.load_state_dict(model.state_dict())
        x, _ = _data(3, seed=20)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), back.eval()(x), rtol=1e-4, atol=1e-5)


# -- synced training over 2 gloo ranks equals the unconverted model on the whole batch --
SHARDS = (3, 1)   # uneven on purpose: statistics must be count-weighted
STEPS = 2
LR = 0.05


def _running_stats(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(RUNNING)}


def _synced_train(rank: int, world: int, key: str, state: Dict[str, torch.Tensor],
                  batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, Any]:
    import torch.distributed as dist

    model = _create(key).double()
    model.load_state_dict(state)
    model = distnorm.convert_model(model, mode="sync").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    offset = sum(SHARDS[:rank])
    outputs = []
    for x, y in batches:
        x, y = x[offset:offset + SHARDS[rank]], y[offset:offset + SHARDS[rank]]
        out = model(x)
        # Sum over this rank's samples; gradients summed over ranks = gradient of the
        # sum over the whole batch (the reference's loss).
        loss = F.cross_entropy(out, y, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        optimizer.step()
        outputs.append(out.detach())
    return {"stats": _running_stats(model), "outputs": outputs,
            "synced": sum(isinstance(m, distnorm.SyncBatchNorm) for m in model.modules())}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["resnet26d", "convnext_atto_bn"])
def test_synced_timm_equals_unconverted_on_concatenated_batch(world2, key: str) -> None:
    torch.set_num_threads(1)
    reference = _create(key).double().train()
    state = copy.deepcopy(reference.state_dict())
    batches = [_data(sum(SHARDS), seed=30 + step, dtype=torch.float64) for step in range(STEPS)]

    results = world2.run(_synced_train, key, state, batches)

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    outputs = []
    for x, y in batches:
        out = reference(x)
        optimizer.zero_grad()
        F.cross_entropy(out, y, reduction="sum").backward()
        optimizer.step()
        outputs.append(out.detach())
    expected = _running_stats(reference)

    assert results[0]["synced"] == len(_batch_norms(reference))
    for rank, result in enumerate(results):
        assert result["stats"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(result["stats"][name], value, rtol=1e-9, atol=1e-10,
                                       msg=f"rank {rank}: {name} differs from the reference")
        offset = sum(SHARDS[:rank])
        for step, out in enumerate(result["outputs"]):
            torch.testing.assert_close(out, outputs[step][offset:offset + SHARDS[rank]],
                                       rtol=1e-9, atol=1e-10)
    # The synced running statistics are identical on both ranks, bit for bit.
    for name in expected:
        assert torch.equal(results[0]["stats"][name], results[1]["stats"][name]), name
