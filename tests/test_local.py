"""Single-process checks of the layers and of the core functions.

Without an initialized process group ``distnorm.SyncBatchNorm`` must be exactly
``nn.BatchNorm1d/2d/3d`` (bit-exact); ``distnorm.stats`` and ``distnorm.functional``
are checked against float64 references written here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm.functional import batch_norm_with_moments
from distnorm.stats import group_moments


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not (dist.is_available() and dist.is_initialized())


CASES = {  # name: (reference class, input shape)
    "1d-NC": (nn.BatchNorm1d, (6, 5)),
    "1d-NCL": (nn.BatchNorm1d, (4, 5, 7)),
    "2d": (nn.BatchNorm2d, (3, 5, 4, 6)),
    "3d": (nn.BatchNorm3d, (2, 5, 3, 4, 2)),
}
OPTIONS = {
    "default": {},
    "momentum-None": {"momentum": None},
    "eps-momentum": {"eps": 1e-3, "momentum": 0.3},
    "affine-False": {"affine": False},
    "no-running-stats": {"track_running_stats": False},
}


def _pair(cls, options, channels=5, seed=0):
    torch.manual_seed(seed)
    ref = cls(channels, **options)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    layer = distnorm.SyncBatchNorm(channels, **options)
    layer.load_state_dict(ref.state_dict())
    return layer, ref


def _assert_same_state(layer, ref):
    a, b = layer.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_sync_batch_norm_without_group_is_batch_norm(case, option):
    cls, shape = CASES[case]
    layer, ref = _pair(cls, OPTIONS[option])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(shape, generator=gen) * 2 + 0.5
        g = torch.randn(shape, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = layer(xa), ref(xb)
        assert torch.equal(y, y_ref)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(xa.grad, xb.grad)
        _assert_same_state(layer, ref)
    if ref.affine:
        assert torch.equal(layer.weight.grad, ref.weight.grad)
        assert torch.equal(layer.bias.grad, ref.bias.grad)
    if ref.track_running_stats:
        assert int(layer.num_batches_tracked) == 3
        assert not torch.equal(layer.running_mean, torch.zeros(5))
    layer.eval(), ref.eval()
    x = torch.randn(shape, generator=gen)
    assert torch.equal(layer(x), ref(x))
    _assert_same_state(layer, ref)


def test_sync_batch_norm_empty_batch_is_batch_norm():
    layer, ref = _pair(nn.BatchNorm2d, {})
    x = torch.randn(4, 5, 3, 3)
    layer(x), ref(x)   # non-default running statistics
    for net in (layer, ref):
        empty = torch.empty(0, 5, 3, 3, requires_grad=True)
        y = net(empty)
        assert y.shape == (0, 5, 3, 3)
        y.sum().backward()
        assert torch.equal(net.weight.grad, torch.zeros(5))
    _assert_same_state(layer, ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_preserved(dims):
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    shape = (3, 5, 4, 6) if dims == 2 else (2, 5, 3, 4, 2)
    layer, ref = _pair(cls, {})
    x = (torch.randn(shape) + 1).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    assert y.is_contiguous(memory_format=fmt)
    y_ref = ref(xb)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn(shape).contiguous(memory_format=fmt)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    _assert_same_state(layer, ref)
    layer.eval()
    assert layer(x).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4))
    model = distnorm.convert_model(copy.deepcopy(ref))
    for _ in range(2):
        x = torch.randn(2, 3, 10, 10) * 4 + 1
        with torch.autocast("cpu", dtype=dtype):
            y, y_ref = model(x), ref(x)
        assert y.dtype == y_ref.dtype == dtype
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        y.float().square().sum().backward()
        y_ref.float().square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        assert b.dtype == c.dtype, n
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert model[1].running_mean.dtype == torch.float32
    model.eval(), ref.eval()
    with torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_input_with_float32_parameters(dtype):
    layer, ref = _pair(nn.BatchNorm2d, {})
    x = (torch.randn(4, 5, 3, 3) * 3 + 2).to(dtype)
    y, y_ref = layer(x), ref(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    _assert_same_state(layer, ref)


# -- distnorm.stats.group_moments ------------------------------------------------------

def _reference_moments(x):
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dim=dims, unbiased=False)
    return x.numel() // x.shape[1], mean, var


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d",
                                    "NC", "NCL", "transposed"])
def test_group_moments_match_float64(layout, dtype):
    gen = torch.Generator().manual_seed(0)
    shape = {"contiguous": (3, 6, 5, 4), "channels_last": (3, 6, 5, 4),
             "channels_last_3d": (2, 6, 3, 4, 5), "NC": (7, 6), "NCL": (3, 6, 9),
             "transposed": (3, 9, 6)}[layout]
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = x.transpose(1, 2)  # a non-contiguous (N, C, L) view
    # A different scale and offset per channel.
    view = (1, -1) + (1,) * (x.dim() - 2)
    x = x * torch.linspace(0.1, 3, 6, dtype=dtype).view(view) + torch.arange(6, dtype=dtype).view(view)
    count, mean, var = _reference_moments(x)
    moments = group_moments(x, None)
    assert moments.count.dtype == torch.float64 and float(moments.count) == count
    assert moments.mean.dtype == dtype and moments.var.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(moments.mean.double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(moments.var.double(), var, rtol=tol, atol=tol)
    torch.testing.assert_close(moments.unbiased_var().double(), var * count / (count - 1),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_moments_reduced_precision_do_not_overflow(dtype):
    # x ≈ 1000 ± 100: every x² (≈ 1e6) overflows float16 (max 65504).
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 6, 6, generator=gen) * 100 + 1000).to(dtype)
    assert torch.isinf(x.float().square().to(torch.float16)).all()
    count, mean, var = _reference_moments(x)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        moments = group_moments(t, None)
        assert moments.mean.dtype == torch.float32 and moments.var.dtype == torch.float32
        assert torch.isfinite(moments.mean).all() and torch.isfinite(moments.var).all()
        assert float(moments.count) == count
        torch.testing.assert_close(moments.mean.double(), mean, rtol=1e-5, atol=0)
        torch.testing.assert_close(moments.var.double(), var, rtol=1e-4, atol=0)


def test_group_moments_constant_channel_in_reduced_precision():
    x = torch.full((2, 3, 4, 4), 7.0, dtype=torch.float16)
    moments = group_moments(x, None)
    assert torch.equal(moments.var, torch.zeros(3))
    assert torch.equal(moments.mean, torch.full((3,), 7.0))


@pytest.mark.parametrize("shape", [(8, 4, 16, 16), (64, 3, 24, 24)])
def test_group_moments_large_mean_as_accurate_as_batch_norm(shape):
    gen = torch.Generator().manual_seed(0)
    channel_mean = torch.tensor([1e4, -1e4, 3e3, 1e4][:shape[1]]).view(1, -1, 1, 1)
    x = torch.randn(shape, generator=gen) + channel_mean      # float32, mean 1e4, std 1
    count, mean, var = _reference_moments(x)
    # Naive float32 E[x²] − E[x]² has lost everything here: the test has teeth.
    naive = x.square().mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)).square()
    assert ((naive.double() - var).abs() / var).max() > 0.5
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        # nn.BatchNorm on the same tensor (same layout) is the bar to meet.
        bn = nn.BatchNorm2d(shape[1], momentum=1.0)
        bn(t)   # running_var ← unbiased batch variance
        bn_var = bn.running_var.double() * (count - 1) / count
        bn_err = ((bn_var - var).abs() / var).max().item()
        bn_mean_err = (bn.running_mean.double() - mean).abs().max().item()
        moments = group_moments(t, None)
        err = ((moments.var.double() - var).abs() / var).max().item()
        assert err <= bn_err * 1.01 + 1e-6, (err, bn_err)
        assert err < 1e-2   # (naive float32: > 0.5)
        mean_err = (moments.mean.double() - mean).abs().max().item()
        assert mean_err <= bn_mean_err * 1.01 + 1e-6, (mean_err, bn_mean_err)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (0, 4), (2, 4, 0, 5)])
def test_group_moments_empty(shape):
    for t in (torch.empty(shape), torch.empty(shape, dtype=torch.float16)):
        moments = group_moments(t, None)
        assert float(moments.count) == 0
        assert moments.mean.shape == (4,) and moments.var.shape == (4,)
        assert moments.mean.dtype == torch.float32
        assert torch.equal(moments.mean, torch.zeros(4)) and torch.equal(moments.var, torch.zeros(4))
        assert torch.equal(moments.unbiased_var(), torch.zeros(4))


# -- distnorm.functional.batch_norm_with_moments -------------------------------------

def _bn_with_own_moments(x, weight=None, bias=None, eps=1e-5):
    return batch_norm_with_moments(x, group_moments(x, None), weight, bias, eps, None)


@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 5), (2, 3, 2, 3)])
def test_batch_norm_with_moments_gradcheck(shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_bn_with_own_moments, (x, w, b), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda t: _bn_with_own_moments(t), (x,), eps=1e-6, atol=1e-7)


def test_batch_norm_with_moments_matches_training_batch_norm_float64():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 3 - 2)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w, b))
    y = _bn_with_own_moments(xa, wa, ba, eps=1e-3)
    # Reference from the formula: x̂ = (x − μ)/sqrt(σ² + eps), y = γ x̂ + β.
    var, mean = torch.var_mean(xb, dim=(0, 2, 3), unbiased=False, keepdim=True)
    y_ref = (xb - mean) / torch.sqrt(var + 1e-3) * wb.view(1, -1, 1, 1) + bb.view(1, -1, 1, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.backward(g)
    y_ref.backward(g)
    for a, r in ((xa, xb), (wa, wb), (ba, bb)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10)


def _saved_bytes(layer, x):
    """Bytes autograd keeps for backward across one forward (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def test_saves_no_more_for_backward_than_batch_norm():
    # The synced Function keeps the input and C-sized statistics, like nn.BatchNorm
    # (a layer built from plain autograd ops would keep several activation copies).
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    ours = _saved_bytes(distnorm.SyncBatchNorm(32), x)
    theirs = _saved_bytes(torch.nn.BatchNorm2d(32), x)
    from distnorm.functional import batch_norm_with_moments
    from distnorm.stats import group_moments

    fn = _saved_bytes(lambda t: batch_norm_with_moments(t, group_moments(t, None), None, None,
                                                        1e-5, None), x)
    assert fn <= theirs + 64 * 32, (fn, theirs)
    assert ours <= theirs + 64 * 32
