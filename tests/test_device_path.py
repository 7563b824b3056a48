"""The CUDA code path of the core, run on CPU; pickling; half-precision parameters;
dtype checks before the collective.

On a GPU the core packs the guard on the device (a device-side call counter, the
non-finite decision by masks), reads the guard back asynchronously and checks it at
the layer's next call, and runs its C-sized glue as compiled (fused) calls. These
tests force both choices on CPU — ``collectives._on_host`` answers False and
``kernels._FUSED_DEVICES`` includes the CPU — so that the code a GPU runs is
exercised by the CPU suite against the same oracle (``nn.BatchNorm`` on the
concatenated batch). What only a GPU can show (NCCL, no host syncs, CUDA-graph
capture, kernel counts) is in tests/gpu/.
"""

from __future__ import annotations

import copy
import io
import math
from contextlib import nullcontext
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm import kernels
from distnorm.distributed import _guard, collectives
from tests._triton_path import device_path

SIZES = [3, 0, 2]  # uneven, one empty rank (world3)


def _shards(seed: int, dtype: torch.dtype, channels: int = 4) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, channels, 5, 5, generator=gen) * 3 + 10).to(dtype) for n in SIZES]


def _w_parity(rank: int, world: int, mode: str, fused: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    layer = distnorm.convert_model(nn.BatchNorm2d(4), mode=mode)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    out: Dict[str, Any] = {"y": [], "dx": []}
    with device_path() if fused else nullcontext():
        for step in range(3):  # the deferred checks of step k run at step k + 1
            x = _shards(step, torch.float32)[rank].requires_grad_()
            y = layer(x)
            (y * torch.arange(1.0, 5.0).view(1, 4, 1, 1)).sum().backward()
            out["y"].append(y.detach())
            out["dx"].append(x.grad)
    out.update(weight_grad=layer.weight.grad, bias_grad=layer.bias.grad,
               running_mean=layer.running_mean, running_var=layer.running_var)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "cmbn"])
def test_device_path_matches_batch_norm_of_the_concatenated_batch(mode, world3):
    """Forced CUDA branches (fused glue compiled on CPU, device guard), uneven and
    empty shards: outputs, input/parameter gradients and running statistics equal
    nn.BatchNorm's on the concatenated batch, as the CPU branches do."""
    fused = world3.run(_w_parity, mode, True)
    plain = world3.run(_w_parity, mode, False)
    for rank in range(3):
        for key in ("y", "dx"):
            for a, b in zip(fused[rank][key], plain[rank][key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for key in ("weight_grad", "bias_grad", "running_mean", "running_var"):
            torch.testing.assert_close(fused[rank][key], plain[rank][key], rtol=1e-5, atol=1e-5)
    if mode == "sync":  # and both equal the oracle
        ref = nn.BatchNorm2d(4)
        torch.manual_seed(0)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        for step in range(3):
            x = torch.cat(_shards(step, torch.float32))
            y = ref(x)
            (y * torch.arange(1.0, 5.0).view(1, 4, 1, 1)).sum().backward()
        torch.testing.assert_close(fused[0]["running_var"], ref.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(r["weight_grad"] for r in fused), ref.weight.grad,
                                   rtol=1e-4, atol=1e-4)


def test_fused_glue_matches_its_eager_expression():
    """Each function the CUDA path runs compiled gives its eager result."""
    from distnorm import functional, stats

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, 4, generator=gen) * 2 + 7
    sums = stats.moment_sums(x)
    eager = stats._unpack(sums, torch.float32)
    with device_path():
        compiled = kernels.fused(stats._unpack, sums, torch.float32)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b)
        count, mean, var = eager
        invstd = torch.rsqrt(var + 1e-5)
        weight = torch.rand(5, generator=gen)
        grads = torch.randn(10, dtype=torch.float64, generator=gen)
        for fused_pass in (False, True):
            got = kernels.fused(functional._input_grad_coefficients, grads, weight, invstd, count,
                                mean, fused_pass)
            want = functional._input_grad_coefficients(grads, weight, invstd, count, mean,
                                                       fused_pass)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
        sum_g, sum_gxmu = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        got = kernels.fused(functional._grad_sums_and_payload, sum_g, sum_gxmu, invstd)
        want = functional._grad_sums_and_payload(sum_g, sum_gxmu, invstd)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert got[2].dtype == torch.float64
        torch.testing.assert_close(got[2], torch.cat([sum_g, sum_gxmu * invstd]).double())
        payload = torch.randn(7, dtype=torch.float64, generator=gen)
        for check in (False, True):
            guard_a = torch.tensor([5.0, 25.0, 2.0, 4.0], dtype=torch.float64)
            guard_b = guard_a.clone()
            got = kernels.fused(_guard._pack_on_device, payload.clone(), guard_a, 4.0, check)
            want = _guard._pack_on_device(payload.clone(), guard_b, 4.0, check)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(guard_a, guard_b)
            torch.testing.assert_close(guard_a, torch.tensor([5.0, 25.0, 3.0, 9.0],
                                                             dtype=torch.float64))


def _w_guard_on_device(rank: int, world: int) -> Dict[str, Any]:
    """Rank 1's device-side call counter runs one ahead from the second call on (as if
    it had made an extra call): the mismatch is raised at the call after it."""
    layer = distnorm.SyncBatchNorm(3)
    context = layer._sync_context()
    out: Dict[str, Any] = {}
    with device_path():
        try:
            for call in range(3):
                buffer = torch.ones(7, dtype=torch.float64)
                if rank == 1 and call == 1:  # advance rank 1's device counter only
                    context.direction("forward").guard[buffer.device][2] += 1
                collectives.all_reduce(buffer, dist.group.WORLD, context, "forward", "raise")
        except distnorm.SyncError as error:
            out["error"], out["call"] = str(error), call
    return out


def test_device_guard_raises_one_call_late(world2):
    for out in world2.run(_w_guard_on_device):
        assert "not all at the same layer and call" in out["error"], out
        assert out["call"] == 2, out


def _w_pickle(rank: int, world: int, device_branch: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = distnorm.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                                 nn.ReLU(), nn.Conv2d(4, 4, 1),
                                                 nn.BatchNorm2d(4)), mode="sync")
    with device_path() if device_branch else nullcontext():
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        if device_branch:  # a check is still in flight: it must not be pickled
            assert model[1]._sync_context()._pending
        buffer = io.BytesIO()
        torch.save(model, buffer)
        clone = copy.deepcopy(model)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x = torch.randn(2, 3, 6, 6)
        y_loaded, y_clone = loaded(x), clone(x)  # both still sync (a fresh header)
        y_model = model(x)
    return {"same": torch.equal(y_loaded, y_model) and torch.equal(y_clone, y_model),
            "state": all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                           model.state_dict().values()))}


@pytest.mark.parametrize("device_branch", [False, True], ids=["cpu", "cuda-branch"])
def test_save_deepcopy_and_load_a_converted_model_mid_training(device_branch, world2):
    for out in world2.run(_w_pickle, device_branch):
        assert out["same"] and out["state"]


def _w_half_model(rank: int, world: int) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    data = (torch.randn(6, 3, 4, 4, generator=gen) * 300).half()  # variance ~9e4 > 65504
    layer = distnorm.SyncBatchNorm(3).half()
    x = data[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    y = layer(x)
    y.float().pow(2).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "running_var": layer.running_var,
            "running_mean": layer.running_mean}


def test_half_model_with_variance_beyond_the_half_range(world2):
    """A .half() model: statistics and normalization in float32, running statistics
    as nn.BatchNorm2d.half() keeps them (finite, float16)."""
    gen = torch.Generator().manual_seed(3)
    data = (torch.randn(6, 3, 4, 4, generator=gen) * 300).half()
    ref = nn.BatchNorm2d(3).half()
    x = data.clone().requires_grad_()
    y = ref(x)
    y.float().pow(2).sum().backward()
    results = world2.run(_w_half_model)
    for rank, out in enumerate(results):
        assert out["running_var"].dtype == torch.float16
        assert out["running_var"].isfinite().all() and out["y"].isfinite().all()
        torch.testing.assert_close(out["running_var"], ref.running_var, rtol=2e-3, atol=0)
        torch.testing.assert_close(out["running_mean"], ref.running_mean, rtol=2e-3, atol=1e-2)
        torch.testing.assert_close(out["y"], y[rank * 3:(rank + 1) * 3].detach(),
                                   rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out["dx"], x.grad[rank * 3:(rank + 1) * 3],
                                   rtol=2e-2, atol=2e-2)
    # and the written-out formula: the biased variance of the batch exceeds 65504
    assert data.float().var(dim=(0, 2, 3), unbiased=False).min() > 65504


def _w_wrong_dtype(rank: int, world: int) -> str:
    layer = distnorm.SyncBatchNorm(3)
    try:
        layer(torch.randn(2, 3, 4, dtype=torch.float64))
    except TypeError as error:
        # No collective was made: the group still pairs the next call correctly.
        y = layer(torch.randn(2, 3, 4))
        assert y.shape == (2, 3, 4)
        return str(error)
    return "no error"


def test_wrong_input_dtype_fails_before_the_collective(world2):
    for message in world2.run(_w_wrong_dtype):
        assert "SyncBatchNorm" in message and "torch.float64" in message, message


def test_unpack_of_an_empty_group_is_zero():
    sums = torch.zeros(7, dtype=torch.float64)
    with device_path():
        moments = distnorm.stats.moments_from_sums(sums)
    assert moments.count.item() == 0
    assert not moments.mean.any() and not moments.var.any()
    assert all(math.isfinite(v) for v in moments.var.tolist())


_HOST_OPS = ("lift_fresh", "_local_scalar_dense", "is_nonzero", "nonzero", "item")


def _w_no_host_data(rank: int, world: int, mode: str) -> List[str]:
    """ATen ops of a steady-state synced training step on the CUDA branches, eager
    (no compiled glue): the ones that on a GPU copy Python data to the device or read
    the device on the host."""
    import os

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: List[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            # t[i] = number lifts a 0-dim CPU scalar; on CUDA it is a fill kernel
            # (torch makes the scalar on the device), so only lifted data counts.
            if "lift_fresh" not in str(func) or args[0].dim() > 0:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    os.environ[kernels.COMPILE_ENV] = "0"
    try:
        layer = distnorm.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
                                       mode=mode)
        with device_path():
            for step in range(3):
                x = torch.randn(2 + rank, 3, 5, 5)
                if step == 2:
                    with Record() as record:
                        layer(x).square().sum().backward()
                else:
                    layer(x).square().sum().backward()
    finally:
        del os.environ[kernels.COMPILE_ENV]
    return [op for op in record.ops if any(name in op for name in _HOST_OPS)]


@pytest.mark.parametrize("mode", ["sync", "brn", "cmbn", "cbn", "bin", "switchable"])
def test_steady_state_step_builds_nothing_from_host_data(mode, world2):
    """After a layer's first call, its training step on the CUDA branches makes no
    tensor from Python data (on a GPU: a pageable copy, a host synchronisation, and
    illegal in a CUDA-graph capture) and reads nothing back on the host."""
    for ops in world2.run(_w_no_host_data, mode):
        assert ops == [], ops
