"""The compiled CPU kernels (``distnorm.kernels``) against formulas written out here.

Each kernel is checked against float64 arithmetic on the same values, in every layout
and dtype it accepts, and for the cases where it must step aside (returning ``None``
so that the caller's eager ops run). Multi-rank parity with the kernels active is in
``test_sync_parity.py`` (``compiled`` cases).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from distnorm import kernels
from distnorm.stats import local_moments, moment_sums, moments_from_sums
from tests._optional import has_cxx_compiler


@pytest.fixture
def always_compiled(monkeypatch):
    """Use the kernels at any size (the tests' tensors are small)."""
    if not has_cxx_compiler():
        pytest.skip("no C++ compiler: TorchInductor cannot build the kernels")
    monkeypatch.setattr(kernels, "MIN_NUMEL", 0)
    monkeypatch.setattr(kernels, "MIN_NUMEL_AFFINE", 0)
    monkeypatch.delenv(kernels.COMPILE_ENV, raising=False)
    assert kernels.enabled()


def _data(shape, mean, std, dtype, fmt=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    offsets = torch.linspace(-1.0, 1.0, channels, dtype=torch.float64).view(view)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean + offsets * std)
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


LAYOUTS = {
    "NC": ((6, 5), None),
    "NCL": ((3, 4, 7), None),
    "NCHW": ((2, 3, 5, 6), None),
    "NCHW-N1": ((1, 3, 5, 6), None),
    "NCHW-long-rows": ((2, 3, 20, 20), None),  # spatial > SHORT_ROW: float64 loop
    "NCHW-channels_last": ((2, 3, 5, 6), torch.channels_last),
    "NCDHW": ((2, 3, 2, 3, 4), None),
    "NCDHW-channels_last_3d": ((2, 3, 2, 3, 4), torch.channels_last_3d),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_moment_sums_are_the_float64_sums(layout, dtype, always_compiled):
    shape, fmt = LAYOUTS[layout]
    x = _data(shape, 3.0, 2.0, dtype, fmt)
    sums = kernels.moment_sums(x)
    assert sums is not None and sums.dtype == torch.float64
    x64 = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    count = x.numel() // x.shape[1]
    expected = torch.cat([torch.tensor([float(count)], dtype=torch.float64),
                          x64.sum(dims), (x64 * x64).sum(dims)])
    # Short rows (spatial <= SHORT_ROW) are summed in float32 first: float32 rounding.
    rtol = 1e-6 if 1 < count // shape[0] <= kernels.SHORT_ROW else 1e-12
    torch.testing.assert_close(sums, expected, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("mean,std", [(1e4, 1.0), (-1e3, 0.1), (1e2, 1e-3), (0.0, 1e-3)])
@pytest.mark.parametrize("layout", ["NCHW", "NCHW-long-rows", "NCHW-channels_last", "NC"])
def test_moments_stay_exact_when_the_mean_dwarfs_the_spread(mean, std, layout, always_compiled):
    """docs/algorithms.md §0: at |mean|/std up to 1e5, where raw float32 sums of x²
    lose the variance entirely, the moments from the compiled sums are as accurate as
    nn.BatchNorm's own statistics (error <= 2 · nn.BatchNorm's + 2.5e-7, the
    convention of test_sync_parity), both against float64 on the same float32 values."""
    shape, fmt = LAYOUTS[layout]
    shape = (shape[0] * 8,) + shape[1:]  # more samples: more chances to cancel
    x = _data(shape, mean, std, torch.float32, fmt, seed=3)
    moments = moments_from_sums(kernels.moment_sums(x), torch.float64)
    dims = [d for d in range(x.dim()) if d != 1]
    var64, mean64 = torch.var_mean(x.double(), dims, correction=0)
    bn = (torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d)(shape[1], momentum=1.0)
    bn(x)
    count = x.numel() // shape[1]
    bn_var = bn.running_var.double() * (count - 1) / count

    def rel(var):
        return ((var - var64).abs() / var64).max().item()

    assert rel(moments.var) <= 2 * rel(bn_var) + 2.5e-7, (rel(moments.var), rel(bn_var))
    assert ((moments.mean - mean64).abs() / var64.sqrt()).max() < 1e-6


def test_compiled_and_eager_moment_sums_agree(always_compiled, monkeypatch):
    x = _data((4, 6, 9, 7), 50.0, 3.0, torch.float32)
    compiled = moment_sums(x)
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert kernels.moment_sums(x) is None
    eager = moment_sums(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-7, atol=1e-7)
    count, mean, var = local_moments(x)
    moments = moments_from_sums(compiled, torch.float64)
    assert moments.count.item() == count
    torch.testing.assert_close(moments.mean, mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(moments.var, var, rtol=1e-6, atol=1e-12)


def test_moment_sums_buffer_is_fresh_every_call(always_compiled):
    """Callers all-reduce the returned buffer in place: a second call must not see it."""
    x = _data((2, 3, 4, 4), 1.0, 1.0, torch.float32)
    first = kernels.moment_sums(x)
    expected = first.clone()
    first.mul_(7.0)
    torch.testing.assert_close(kernels.moment_sums(x), expected)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_affine_grad_is_k_g_plus_a_x_plus_c(layout, dtype, always_compiled, monkeypatch):
    monkeypatch.setattr(kernels, "SHORT_ROW", 1)  # by default short rows use eager ops
    shape, fmt = LAYOUTS[layout]
    x = _data(shape, 1.0, 2.0, dtype, fmt, seed=1)
    g = _data(shape, 0.0, 1.0, dtype, fmt, seed=2)
    gen = torch.Generator().manual_seed(5)
    k, a, c = (torch.randn(shape[1], generator=gen) for _ in range(3))
    out = kernels.affine_grad(g, x, k, a, c)
    assert out is not None
    view = (1, -1) + (1,) * (x.dim() - 2)
    expected = (g.double() * k.double().view(view) + x.double() * a.double().view(view)
                + c.double().view(view))
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride()  # the input's memory format is kept
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_kernels_step_aside_where_they_do_not_apply(always_compiled, monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    k = torch.ones(3)
    # an empty slice (the callers' own branch gives zeros)
    assert kernels.moment_sums(x[:0]) is None
    assert kernels.affine_grad(x[:0], x[:0], k, k, k) is None
    # float64: the native kernels are exact already
    assert kernels.moment_sums(x.double()) is None
    assert kernels.affine_grad(x.double(), x.double(), k, k, k) is None
    # a layout that is neither contiguous nor channels_last
    odd = torch.randn(2, 4, 4, 3).permute(0, 3, 2, 1)
    assert kernels.moment_sums(odd) is None
    # grad_out in another layout than x
    assert kernels.affine_grad(x.contiguous(memory_format=torch.channels_last), x, k, k, k) is None
    # the input gradient over short rows (e.g. 7×7): eager ops are faster
    assert kernels.affine_grad(x, x, k, k, k) is None
    # small tensors: a compiled call costs more than it saves
    monkeypatch.setattr(kernels, "MIN_NUMEL", x.numel() + 1)
    assert kernels.moment_sums(x) is None


def test_kernels_are_traced_inline_inside_a_users_compile(always_compiled):
    """Inside torch.compile the callers' plain expressions join the user's graph."""
    seen = []

    def fn(x):
        seen.append(kernels.moment_sums(x))
        return moment_sums(x)

    x = _data((2, 3, 4, 4), 2.0, 1.0, torch.float32)
    out = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert seen == [None]
    torch.testing.assert_close(out, moment_sums(x), rtol=1e-6, atol=1e-6)


def test_a_failed_compile_warns_once_and_falls_back(always_compiled, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):  # as torch reports a backend's failure: wrapped by dynamo
            from tests.test_cuda_guards import backend_compiler_failed

            raise backend_compiler_failed(RuntimeError("no C++ compiler here"))
        return call

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setattr(torch, "compile", broken)
    x = _data((2, 3, 4, 4), 2.0, 1.0, torch.float32)
    with pytest.warns(RuntimeWarning, match="no C.. compiler here.*DISTNORM_COMPILE=0"):
        sums = moment_sums(x)
    assert list(kernels._compiled.values()) == [None]  # not tried again
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")  # the eager reference
    torch.testing.assert_close(sums, moment_sums(x))
    monkeypatch.delenv(kernels.COMPILE_ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, for this kernel or another
        assert kernels.moment_sums(x) is None
        assert kernels.moment_sums(x.to(torch.bfloat16)) is None


def test_every_dtype_and_layout_keeps_its_compiled_kernel(always_compiled, monkeypatch):
    """Each (kernel, dtype) has its own graph cache: many layouts and dtypes in one
    process never exhaust dynamo's recompile limit (which would fall back to eager)."""
    for short_row in (kernels.SHORT_ROW, 1):  # both variants of moment_sums
        monkeypatch.setattr(kernels, "SHORT_ROW", short_row)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape, fmt in LAYOUTS.values():
                x = _data(shape, 1.0, 1.0, dtype, fmt)
                assert kernels.moment_sums(x) is not None, (dtype, shape, fmt)
                if short_row == 1:
                    assert kernels.affine_grad(x, x, *(torch.ones(shape[1]),) * 3) is not None
    assert None not in kernels._compiled.values()


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert not kernels.enabled()
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    assert kernels.enabled()
    with torch._dynamo.config.patch(disable=True):  # TORCHDYNAMO_DISABLE=1
        assert not kernels.enabled()


def test_compiling_a_kernel_prints_no_cuda_home_notice():
    """A CUDA build of torch without a GPU logs "No CUDA runtime is found, using
    CUDA_HOME=..." when inductor first builds a CPU kernel; distnorm keeps it out of
    users' logs (every rank printed it through the progress bar)."""
    import subprocess
    import sys

    code = ("import torch\nfrom distnorm import kernels, stats\nkernels.MIN_NUMEL = 0\n"
            "stats.moment_sums(torch.randn(4, 8, 16, 16))\n"
            "assert kernels._compiled and None not in kernels._compiled.values()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA runtime is found" not in proc.stderr
