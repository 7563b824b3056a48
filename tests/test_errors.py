"""Bad input gets a clear error that says what was expected and what arrived."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn

import distnorm


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(weights=None)


# -- input shapes --------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make", [lambda: distnorm.SyncBatchNorm(4), lambda: distnorm.FrozenBatchNorm(4)],
                         ids=["sync", "frozen"])
def test_wrong_number_of_channels(make, training):
    layer = make().train(training)
    with pytest.raises(ValueError, match=r"expected 4 channels.*\(2, 3, 5\)"):
        layer(torch.randn(2, 3, 5))


@pytest.mark.parametrize("mode", ["sync", "frozen"])
def test_wrong_channels_names_the_layer_after_convert(mode):
    model = distnorm.convert_model(torchvision.models.resnet18(weights=None), mode=mode)
    with pytest.raises(ValueError, match=r"'layer1\.0\.bn1'.*expected 64 channels.*\(2, 32, 4, 4\)"):
        model.layer1[0].bn1(torch.randn(2, 32, 4, 4))
    model.eval()
    with pytest.raises(ValueError, match=r"'layer3\.1\.bn2'.*expected 256 channels"):
        model.layer3[1].bn2(torch.randn(2, 3, 4, 4))


def test_wrong_channels_inside_a_model_forward():
    # The conv before the BN is replaced by one producing the wrong width.
    model = distnorm.convert_model(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match=r"'1'.*expected 6 channels.*\(2, 8, 5, 5\)"):
        model(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("shape", [(4,), ()])
@pytest.mark.parametrize("make", [lambda: distnorm.SyncBatchNorm(4), lambda: distnorm.FrozenBatchNorm(4)],
                         ids=["sync", "frozen"])
def test_fewer_than_two_dims(make, shape):
    layer = make()
    with pytest.raises(ValueError, match=rf"at least 2D.*got {len(shape)}D"):
        layer(torch.randn(shape))


def test_group_moments_fewer_than_two_dims():
    with pytest.raises(ValueError, match=r"at least 2 dims.*1D"):
        distnorm.stats.group_moments(torch.randn(5), None)


# -- convert_model arguments ------------------------------------------------------------

def test_unknown_mode_lists_valid_modes(resnet18):
    with pytest.raises(ValueError, match="unknown mode 'batchnorm'") as info:
        distnorm.convert_model(resnet18, mode="batchnorm")
    for mode in distnorm.variants():
        assert repr(mode) in str(info.value), mode
    assert isinstance(resnet18.bn1, nn.BatchNorm2d)  # nothing half-converted


@pytest.mark.parametrize("mode, options, error, pattern", [
    ("sync", {"window": 8}, TypeError, r"bad options \['window'\].*SyncBatchNorm"),
    ("frozen", {"momentum": 0.1}, TypeError, r"bad options \['momentum'\].*FrozenBatchNorm"),
    ("gn", {"groups": 8}, TypeError, r"bad options \['groups'\].*GroupNorm"),
    ("gn", {"num_groups": 0}, ValueError, r"num_groups must be at least 1 \(got 0\)"),
])
def test_bad_options_for_a_mode(mode, options, error, pattern):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    with pytest.raises(error, match=pattern):
        distnorm.convert_model(model, mode=mode, **options)


@pytest.mark.parametrize("value", ["resnet", 3, None, [nn.BatchNorm2d(3)]])
def test_convert_of_a_non_module(value):
    with pytest.raises(TypeError, match=rf"expects an nn\.Module \(got {type(value).__name__}\)"):
        distnorm.convert_model(value)


def test_revert_of_a_non_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        distnorm.revert_model("resnet")


def test_freeze_without_running_stats():
    with pytest.raises(ValueError, match=r"cannot freeze BatchNorm2d.*track_running_stats=False"):
        distnorm.convert_model(nn.BatchNorm2d(3, track_running_stats=False), mode="frozen")


def test_revert_group_norm():
    model = distnorm.convert_model(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)), mode="gn")
    with pytest.raises(ValueError, match=re.escape("cannot revert GroupNorm '1'")):
        distnorm.revert_model(model)


# -- process groups -------------------------------------------------------------------

def test_group_by_without_process_group():
    if dist.is_initialized():  # pragma: no cover - this process never initializes it
        pytest.skip("torch.distributed is initialized in this process")
    with pytest.raises(RuntimeError, match=r"initialized.*init_process_group"):
        distnorm.distributed.group_by(2)
