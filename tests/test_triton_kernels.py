"""Each Triton kernel of the CUDA path (distnorm/triton_kernels.py, launched by
distnorm/cuda_ops.py) against a float64 oracle written here, run on CPU by Triton's
interpreter: dtypes, NCHW and channels_last, 1-D/2-D/3-D, empty slices, a mean 1e4
standard deviations from zero, and the guarded packet against the layout
collectives.py packs on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch

from distnorm import cuda_ops
from distnorm.cuda_ops import Running, Stats
from distnorm.distributed import _guard, collectives
from tests._triton_path import INTERPRETED, triton_path

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
# The interpreter must be chosen before triton is first imported (its own library
# functions are decorated then): this process runs the tests of both files in a
# child pytest with TRITON_INTERPRET=1, where they run.
CHILD_FILES = ["tests/test_triton_kernels.py", "tests/test_triton_layers.py"]


@pytest.mark.skipif(INTERPRETED, reason="runs in the child itself")
def test_triton_path_in_the_interpreter():
    """The kernel and layer tests of the Triton path, in a child process under
    Triton's interpreter (one import of torch, pools shared)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            *CHILD_FILES], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    print(child.stdout[-6000:])
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by "
                                       "test_triton_path_in_the_interpreter in a child process")

EPS = 1e-5
# (shape, channels_last): (N, C), (N, C, L) both layouts, 2-D and 3-D both layouts.
SHAPES = [((5, 3), False), ((3, 4, 6), False), ((3, 4, 6), True), ((2, 3, 4, 5), False),
          ((2, 3, 4, 5), True), ((2, 3, 2, 3, 2), True), ((0, 3, 4, 4), False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture()
def _interpreted() -> Iterator[None]:
    with triton_path():
        yield


def _input(shape, channels_last: bool, dtype: torch.dtype, seed: int = 0,
           loc: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + loc).to(dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert not x.is_contiguous() or x.shape[0] == 0
    return x


def _dims(x: torch.Tensor) -> List[int]:
    return [d for d in range(x.dim()) if d != 1]


def _oracle_moments(x: torch.Tensor):
    x64 = x.double()
    count = x.numel() // x.shape[1]
    if count == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float64)
        return 0, zeros, zeros
    mean = x64.mean(_dims(x))
    var = (x64 - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().mean(_dims(x))
    return count, mean, var


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_moment_packet(shape, channels_last, dtype):
    x = _input(shape, channels_last, dtype)
    packet = cuda_ops.moment_packet(x, None)
    x64 = x.double()
    want = torch.cat([torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64),
                      x64.sum(_dims(x)), x64.square().sum(_dims(x))])
    torch.testing.assert_close(packet, want, rtol=1e-13, atol=1e-10)


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
def test_moment_packet_keeps_the_variance_when_the_mean_is_far_from_zero():
    """|μ|/σ = 1e4: the shifted float64 sums give the variance of the data as
    exactly as a two-pass computation does."""
    x = _input((4, 3, 8, 8), False, torch.float32, loc=3e4)  # σ = 2, μ ≈ 3e4
    packet = cuda_ops.moment_packet(x, None)
    count, mean, var = _oracle_moments(x)
    got_mean = packet[1:4] / count
    got_var = packet[4:7] / count - got_mean * got_mean
    torch.testing.assert_close(got_mean, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(got_var, var, rtol=1e-6, atol=0)


def _spec(size: int, check: bool, nograd: float = 0.0, bit: float = 2.0):
    guard = torch.tensor([7.0, 49.0, 3.0, 9.0], dtype=torch.float64)
    seq = torch.tensor([65535.0, 65535.0 ** 2], dtype=torch.float64)
    return collectives.DevicePacket(size, guard, seq, bit, check, nograd,
                                    1.0 if nograd else 0.0, collectives._MOD)


def _eager_packet(payload: torch.Tensor, spec) -> torch.Tensor:
    """collectives' own device packing (eager ops) of the same payload."""
    guard, seq = spec.guard.clone(), spec.seq.clone()
    pad = spec.size - payload.numel() - collectives._TAIL
    return _guard._pack_on_device(payload.clone(), guard, spec.bit, spec.check, seq, pad,
                                       spec.nograd)


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("nograd", [0.0, 2.0])
def test_guarded_packets_match_the_collectives_layout(nonfinite, nograd):
    """The forward packet, the backward packet and the generic packing give exactly
    the packet _guard._pack_on_device makes (zeros for a non-finite payload,
    its flag), and advance the call and sequence counters in place (wrapping)."""
    x = _input((3, 4, 5), False, torch.float32)
    if nonfinite:
        x[1, 2, 3] = float("nan")
    payload = cuda_ops.moment_packet(x, None, extra=torch.arange(3.0))
    spec = _spec(40, True, nograd)
    want = _eager_packet(payload, spec)
    got = cuda_ops.moment_packet(x, spec, extra=torch.arange(3.0))
    torch.testing.assert_close(got, want, equal_nan=True)
    assert spec.guard.tolist() == [7.0, 49.0, 4.0, 16.0] and spec.seq.tolist() == [0.0, 0.0]
    assert (got[-collectives._TAIL] != 0) == nonfinite
    spec = _spec(40, True, nograd)
    torch.testing.assert_close(cuda_ops.pack(payload, spec), want)
    sums = Stats.of_sums(cuda_ops.moment_packet(x.nan_to_num(), None))
    grad_out = _input((3, 4, 5), False, torch.float32, seed=1)
    if nonfinite:
        grad_out[0, 0, 0] = float("inf")
    payload = cuda_ops.grad_packet(grad_out, x.nan_to_num(), sums, EPS, None, None, None)
    spec = _spec(30, True, nograd)
    got = cuda_ops.grad_packet(grad_out, x.nan_to_num(), sums, EPS, spec, None, None)
    torch.testing.assert_close(got, _eager_packet(payload, _spec(30, True, nograd)),
                               equal_nan=True)


def _stats_of(x: torch.Tensor, kind: str, dtype: torch.dtype):
    """The oracle moments and the kernels' view of them: reduced sums or tensors."""
    count, mean, var = _oracle_moments(x)
    if kind == "sums":
        sums = torch.cat([torch.tensor([float(count)], dtype=torch.float64),
                          mean * count, (var + mean * mean) * count])
        return Stats.of_sums(sums), count, mean, var
    return (Stats(torch.tensor(float(count), dtype=torch.float64), None, mean.to(dtype),
                  var.to(dtype)), count, mean, var)


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("kind", ["sums", "moments"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_normalize_and_input_gradient(shape, channels_last, dtype, kind):
    x = _input(shape, channels_last, dtype)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    stats, count, mean, var = _stats_of(x, kind, stats_dtype)
    gen = torch.Generator().manual_seed(5)
    weight = torch.rand(x.shape[1], generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
    y = cuda_ops.normalize(x, stats, weight.to(stats_dtype), bias.to(stats_dtype), EPS)
    invstd = (var + EPS).rsqrt()
    x64 = x.double()
    xhat = (x64 - _channel(mean, x)) * _channel(invstd, x)
    want = xhat * _channel(weight, x) + _channel(bias, x)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), want, rtol=TOL[dtype], atol=4 * TOL[dtype])
    # backward: the local packet [Σg, Σg·x̂], the parameter gradients, then dx from a
    # "reduced" packet (here: this slice's own, M = its count)
    grad_out = _input(shape, channels_last, dtype, seed=2, loc=0.0)
    grad_w = torch.empty(x.shape[1], dtype=stats_dtype)
    grad_b = torch.empty(x.shape[1], dtype=stats_dtype)
    packet = cuda_ops.grad_packet(grad_out, x, stats, EPS, None, grad_w, grad_b)
    g64 = grad_out.double()
    sum_g, sum_gxhat = g64.sum(_dims(x)), (g64 * xhat).sum(_dims(x))
    torch.testing.assert_close(packet, torch.cat([sum_g, sum_gxhat]), rtol=2 * TOL[dtype],
                               atol=TOL[dtype] * max(1, x.numel()) ** 0.5)
    torch.testing.assert_close(grad_w.double(), sum_gxhat, rtol=2 * TOL[dtype],
                               atol=TOL[dtype] * max(1, x.numel()) ** 0.5)
    torch.testing.assert_close(grad_b.double(), sum_g, rtol=2 * TOL[dtype],
                               atol=TOL[dtype] * max(1, x.numel()) ** 0.5)
    reduced = torch.cat([sum_g, sum_gxhat])
    dx = cuda_ops.input_grad(grad_out, x, stats, reduced, weight.to(stats_dtype), EPS)
    m = max(count, 1)
    want_dx = _channel(weight * invstd, x) * (g64 - _channel(sum_g / m, x)
                                              - xhat * _channel(sum_gxhat / m, x))
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), want_dx, rtol=TOL[dtype], atol=4 * TOL[dtype])


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("empty_group", [False, True])
def test_running_update(momentum, buffer_dtype, empty_group):
    """In the normalize launch and alone: torch's update with the unbiased variance,
    cumulative for momentum=None, and nothing at all when the group count is 0."""
    x = _input((0 if empty_group else 4, 3, 5), False, torch.float32)
    stats, count, mean, var = _stats_of(x, "sums", torch.float32)
    for alone in (False, True):
        running_mean = torch.tensor([0.5, -1.0, 2.0], dtype=buffer_dtype)
        running_var = torch.tensor([1.5, 2.0, 0.5], dtype=buffer_dtype)
        tracked = torch.tensor(3, dtype=torch.long)
        running = Running(running_mean, running_var, tracked, momentum)
        if alone:
            cuda_ops.running_update(stats, running)
        else:
            cuda_ops.normalize(x, stats, None, None, EPS, running)
        if empty_group:
            assert tracked.item() == 3
            torch.testing.assert_close(running_mean, torch.tensor([0.5, -1.0, 2.0]).to(buffer_dtype))
            continue
        factor = 0.1 if momentum is not None else 1 / 4
        unbiased = var * count / (count - 1)
        assert tracked.item() == 4
        tol = dict(rtol=1e-3, atol=1e-3) if buffer_dtype == torch.float16 else {}
        torch.testing.assert_close(
            running_mean.double(),
            (torch.tensor([0.5, -1.0, 2.0]).to(buffer_dtype).double() * (1 - factor)
             + factor * mean), **tol)
        torch.testing.assert_close(
            running_var.double(),
            (torch.tensor([1.5, 2.0, 0.5]).to(buffer_dtype).double() * (1 - factor)
             + factor * unbiased), **tol)


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("alone", [False, True])
def test_half_running_statistics_saturate(alone):
    """A float16 running variance driven past 65504 stops there, as the eager update
    does (never inf, and so never NaN at the next blend), and comes back down."""
    limit = torch.finfo(torch.float16).max
    for scale, want_saturated in ((1e3, True), (1.0, False)):
        x = _input((4, 2, 5), False, torch.float32) * scale  # batch variance ~1e6, then ~1
        stats = _stats_of(x, "sums", torch.float32)[0]
        running_mean = torch.zeros(2, dtype=torch.float16)
        running_var = torch.full((2,), limit if scale == 1.0 else 6e4, dtype=torch.float16)
        running = Running(running_mean, running_var, torch.tensor(0), 0.5)
        for _ in range(3):
            if alone:
                cuda_ops.running_update(stats, running)
            else:
                cuda_ops.normalize(x, stats, None, None, EPS, running)
        assert torch.isfinite(running_var).all() and torch.isfinite(running_mean).all()
        assert bool((running_var == limit).all()) == want_saturated


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
@pytest.mark.parametrize("empty", [False, True])
def test_unpack(empty):
    x = _input((0 if empty else 5, 4, 3), False, torch.float32, loc=100.0)
    sums = cuda_ops.moment_packet(x, None)
    count, mean, var = cuda_ops.unpack(sums, 4, torch.float32)
    _, want_mean, want_var = _oracle_moments(x)
    assert count.item() == x.numel() // 4
    torch.testing.assert_close(mean, want_mean.float())
    torch.testing.assert_close(var, want_var.float(), rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
def test_int64_indices_are_chosen_for_large_tensors():
    """Index arithmetic is int32 unless the tensor reaches 2^31 elements."""
    small = torch.empty(2, 3, 4, 5)
    assert cuda_ops._plan(cuda_ops._view(small)).meta["WIDE"] is False
    big = torch.empty((2 ** 16, 8, 2 ** 12), device="meta")
    assert cuda_ops._plan(big).meta["WIDE"] is True


@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
def test_plan_splits_each_channel_over_several_programs():
    """Few channels over many elements: each channel's reduction is split so that
    the launch has enough programs (here on the interpreter's target of 2)."""
    plan = cuda_ops._plan(cuda_ops._view(torch.empty(4, 1, 64, 64)))
    assert plan.grid[0] == 1 and plan.grid[1] >= 2
    assert plan.chunks_per_split * plan.grid[1] >= plan.n_chunks



@needs_interpreter
@pytest.mark.usefixtures("_interpreted")
def test_distnorm_triton_0_turns_the_kernels_off(monkeypatch):
    x = torch.zeros(2, 3)
    assert cuda_ops.applies(x)
    monkeypatch.setenv(cuda_ops.TRITON_ENV, "0")
    assert not cuda_ops.applies(x)
    assert not cuda_ops.applies(x.to(torch.int64))
