"""The CUDA path without Triton (distnorm/_native_cuda.py), run on CPU: the CUDA
branches forced (the device guard, as tests/test_device_path.py does), Triton off
(``DISTNORM_TRITON=0``), and torch's four SyncBatchNorm CUDA kernels — which have
no CPU kernels — replaced by the reference implementations below. Whole synced
layers over uneven and empty gloo shards against nn.BatchNorm on the concatenated
batch, an empty group, and the launch count of a steady-state training step.
What only a GPU can show (the real kernels, their launch count under a profiler,
NCCL) is listed in docs/algorithms.md §1, "Without Triton".
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

import distnorm
from tests._device_cases import (STEPS, OpRecord, assert_matches_batch_norm, batch_norm,
                                 classify_ops, loss_weights, shards)
from distnorm import _native_cuda, cuda_ops, functional
from distnorm.distributed import collectives

CASES = {  # name: (input shape after N, channels_last, dtype, .half() model)
    "nchw": ((4, 5, 5), False, torch.float32, False),
    "channels_last": ((4, 3, 5), True, torch.float32, False),
    "float64_1d": ((4, 3), False, torch.float64, False),
    "half_model": ((4, 3, 3), True, torch.float16, True),
}
# The substituted kernels append their names here while a step is recorded.
calls: Optional[List[str]] = None


# -- reference implementations of torch's CUDA kernels -------------------------------------
def _dims(x: Tensor) -> List[int]:
    return [d for d in range(x.dim()) if d != 1]


def _col(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: Tensor, value: Tensor) -> Tensor:
    return torch.empty_like(x).copy_(value)  # x's dtype and memory format


def _kernel(name: str):
    def wrap(fn):
        def run(*args: Any) -> Any:
            if calls is not None:
                calls.append(f"native.{name}")
            with _disable_current_modes():
                return fn(*args)
        return run
    return wrap


@_kernel("batch_norm_stats")
def ref_stats(x: Tensor, eps: float):
    var, mean = torch.var_mean(x.double(), _dims(x), correction=0)
    return mean.to(_stats_dtype(x)), (var + eps).rsqrt().to(_stats_dtype(x))


@_kernel("batch_norm_elemt")
def ref_elemt(x: Tensor, weight, bias, mean: Tensor, invstd: Tensor, eps: float) -> Tensor:
    y = (x.to(mean.dtype) - _col(mean, x)) * _col(invstd, x)
    if weight is not None:
        y = y * _col(weight, x)
    if bias is not None:
        y = y + _col(bias, x)
    return _like(x, y)


@_kernel("batch_norm_backward_reduce")
def ref_backward_reduce(g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight,
                        input_g: bool, weight_g: bool, bias_g: bool):
    g = g.to(mean.dtype)
    sum_dy = g.sum(_dims(x))
    sum_dy_xmu = (g * (x.to(mean.dtype) - _col(mean, x))).sum(_dims(x))
    grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
    grad_b = sum_dy.to(weight.dtype if weight is not None else mean.dtype) if bias_g else None
    return sum_dy, sum_dy_xmu, grad_w, grad_b


@_kernel("batch_norm_backward_elemt")
def ref_backward_elemt(g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight,
                       sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    n = count.sum().to(mean.dtype)
    xmu = x.to(mean.dtype) - _col(mean, x)
    grad = (g.to(mean.dtype) - _col(sum_dy / n, x)
            - xmu * _col(invstd * invstd * sum_dy_xmu / n, x)) * _col(invstd, x)
    if weight is not None:
        grad = grad * _col(weight, x)
    return _like(x, grad)


@contextmanager
def native_path() -> Iterator[None]:
    """Run the CUDA-without-Triton path on CPU tensors."""
    saved = (collectives._on_host, set(_native_cuda.DEVICES), os.environ.get(cuda_ops.TRITON_ENV),
             {name: getattr(_native_cuda, name) for name in _KERNELS})
    collectives._on_host = lambda tensor: False
    _native_cuda.DEVICES.add("cpu")
    os.environ[cuda_ops.TRITON_ENV] = "0"
    for name, fn in _KERNELS.items():
        setattr(_native_cuda, name, fn)
    try:
        yield
    finally:
        collectives._on_host = saved[0]
        _native_cuda.DEVICES.clear()
        _native_cuda.DEVICES.update(saved[1])
        if saved[2] is None:
            os.environ.pop(cuda_ops.TRITON_ENV, None)
        else:
            os.environ[cuda_ops.TRITON_ENV] = saved[2]
        for name, fn in saved[3].items():
            setattr(_native_cuda, name, fn)


_KERNELS = {"batch_norm_stats": ref_stats, "batch_norm_elemt": ref_elemt,
            "batch_norm_backward_reduce": ref_backward_reduce,
            "batch_norm_backward_elemt": ref_backward_elemt}


# -- parity ------------------------------------------------------------------------------------
def _w_steps(rank: int, world: int, case: str, device_counters: bool = False
             ) -> Dict[str, Any]:
    layer = distnorm.convert_model(batch_norm(CASES[case]), mode="sync")
    out: Dict[str, Any] = {"y": [], "dx": []}
    capturing = _native_cuda._capturing
    if device_counters:  # the guard's tail as inside a CUDA-graph capture
        _native_cuda._capturing = lambda device: True
    with native_path():
        for step in range(STEPS):
            x = shards(CASES[case], step)[rank].requires_grad_()
            y = layer(x)
            (y.double() * loss_weights(x)).sum().backward()
            out["y"].append(y.detach())
            out["dx"].append(x.grad)
        out.update({k: v.detach().clone() for k, v in layer.state_dict().items()})
        out.update(weight_grad=layer.weight.grad, bias_grad=layer.bias.grad)
        # an empty group: every rank's slice empty; the running statistics stay
        empty = shards(CASES[case], 0)[1].requires_grad_()
        y = layer(empty)
        y.sum().backward()
        out["after_empty"] = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        layer(shards(CASES[case], 0)[rank])  # the empty step's deferred checks run here
    _native_cuda._capturing = capturing
    return out


@pytest.mark.parametrize("case,device_counters", [(case, False) for case in CASES]
                         + [("nchw", True)])
def test_sync_batch_norm_matches_batch_norm_of_the_concatenated_batch(case, device_counters,
                                                                      world3):
    """SyncBatchNorm on the native CUDA path: outputs (dtype and layout), input
    gradients, summed parameter gradients and running statistics equal nn.BatchNorm's
    on the whole batch; an empty group changes no running statistic. Also with the
    guard's counters advanced on the device (what a CUDA-graph capture records)."""
    results = world3.run(_w_steps, case, device_counters)
    assert_matches_batch_norm(results, CASES[case])
    for result in results:
        for key, value in result["after_empty"].items():
            torch.testing.assert_close(value, result[key], rtol=0, atol=0)
        assert int(result["num_batches_tracked"]) == STEPS


# -- launches ----------------------------------------------------------------------------------
# What a steady-state SyncBatchNorm training step launches here (docs/algorithms.md
# §1, "Without Triton"): a ceiling, so that a change that adds launches is seen.
# Counted: the four native kernels, the ATen ops that launch, and the two
# host-to-device copies of the guards' tails; nonfinite="skip" also checks the
# backward payload (4 launches more).
MAX_LAUNCHES = {"raise": 34, "skip": 38}


def _w_launches(rank: int, world: int, nonfinite: str) -> Dict[str, List[str]]:
    global calls

    original = collectives._DeferredCheck.__init__

    def deferred(self: Any, tail: Tensor, check: Any) -> None:
        with _disable_current_modes():  # an asynchronous copy of 11 numbers on CUDA
            original(self, tail, check)

    host_tail = _native_cuda._host_tail

    def copied_tail(*args: Any) -> Tensor:
        if calls is not None:  # on CUDA: one copy from pinned memory (none on CPU)
            calls.append("copy.host_tail")
        return host_tail(*args)

    layer = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(4)), mode="sync")[0]
    layer.nonfinite = nonfinite
    collectives._DeferredCheck.__init__ = deferred  # type: ignore[method-assign]
    _native_cuda._host_tail = copied_tail
    try:
        with native_path():
            for step in range(2):  # the first call exchanges headers; the second is steady
                x = torch.randn(2 + rank, 4, 3, 3, requires_grad=True)
                grad = torch.randn(2 + rank, 4, 3, 3)
                layer.weight.grad = layer.bias.grad = None  # no accumulation kernels
                if step == 0:
                    layer(x).backward(grad)
                    continue
                calls = []
                with OpRecord() as record:
                    layer(x).backward(grad)
                native = calls
    finally:
        calls = None
        collectives._DeferredCheck.__init__ = original  # type: ignore[method-assign]
        _native_cuda._host_tail = host_tail
    return {"native": [name for name in native if name.startswith("native.")],
            "copies": [name for name in native if name.startswith("copy.")],
            **classify_ops(record.ops)}


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_launches_of_a_steady_state_training_step(nonfinite, world2):
    """A steady-state SyncBatchNorm training step (forward + backward, guard included):
    the four native kernels, the eager glue, 2 collectives, no host read. The counts
    are printed (-s)."""
    for rank, counts in enumerate(world2.run(_w_launches, nonfinite)):
        launches = len(counts["native"]) + len(counts["aten"]) + len(counts["copies"])
        print(f"nonfinite={nonfinite} rank {rank}: {launches} launches "
              f"({counts['native']} + {counts['copies']} + {len(counts['aten'])} ATen "
              f"{counts['aten']}), "
              f"{len(counts['collectives'])} collectives, host reads {counts['host_reads']}")
        assert counts["host_reads"] == [] and counts["other"] == [], counts
        assert len(counts["native"]) == 4 and len(counts["collectives"]) == 2, counts
        assert len(counts["copies"]) == 2, counts
        assert not any("compile" in op for op in counts["aten"]), counts
        assert launches <= MAX_LAUNCHES[nonfinite], counts


# -- selection ---------------------------------------------------------------------------------
def test_distnorm_triton_0_selects_the_native_path(monkeypatch):
    """With DISTNORM_TRITON=0 a CUDA tensor (here: the CPU standing in for it) takes
    the native path, not the Triton kernels nor the compiled glue."""
    taken: List[str] = []
    monkeypatch.setattr(_native_cuda, "sync_batch_norm",
                        lambda *args, **kwargs: taken.append("native") or args[0])
    monkeypatch.setattr(functional._SyncBatchNorm, "apply",
                        lambda *args: taken.append("triton") or args[0])
    monkeypatch.setattr(functional, "group_moments",
                        lambda *args, **kwargs: taken.append("generic"))
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(_native_cuda, "DEVICES", {"cpu"})
    monkeypatch.setenv("DISTNORM_TRITON", "0")
    assert not cuda_ops.applies(x) and _native_cuda.applies(x)
    functional.sync_batch_norm(x, None, None, None, 1e-5, None)
    assert taken == ["native"]
    monkeypatch.setattr(_native_cuda, "DEVICES", set())  # CPU: the path it always had
    taken.clear()
    with pytest.raises(AttributeError):  # the stubbed group_moments returns None
        functional.sync_batch_norm(x, None, None, None, 1e-5, None)
    assert taken == ["generic"]


# -- the non-finite check --------------------------------------------------------------------
def _w_nonfinite(rank: int, world: int, policy: str) -> Dict[str, Any]:
    """Two training steps, rank 1's first input holding a NaN."""
    from distnorm.errors import NonFiniteError

    layer = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(3)), mode="sync")[0]
    layer.nonfinite = policy
    out: Dict[str, Any] = {}
    with native_path():
        try:
            for step in range(2):
                x = torch.arange(24.0).view(2, 3, 2, 2) * (rank + 1)
                if rank == 1 and step == 0:
                    x[0, 1, 0, 0] = float("nan")
                out[f"y{step}"] = layer(x).detach()
        except NonFiniteError as error:
            out["error"], out["raised_at"] = str(error), step
    out["running_mean"] = layer.running_mean.clone()
    return out


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_non_finite_rank_is_left_out_and_raised(policy, world2):
    """A rank with a NaN contributes zeros to the statistics (the finite rank's output
    is its local BatchNorm's); with "raise" every rank raises at the next call,
    naming that rank."""
    results = world2.run(_w_nonfinite, policy)
    x0 = torch.arange(24.0).view(2, 3, 2, 2)
    want = nn.functional.batch_norm(x0, None, None, training=True)
    torch.testing.assert_close(results[0]["y0"], want, rtol=1e-5, atol=1e-5)
    for out in results:
        if policy == "raise":
            assert "rank(s) [1]" in out["error"] and out["raised_at"] == 1, out
        else:
            assert "error" not in out and torch.isfinite(out["running_mean"]).all(), out
