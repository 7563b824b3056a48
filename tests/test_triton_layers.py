"""Whole synced layers on the Triton device path (CUDA's code, run on CPU by Triton's
interpreter with the device guard forced) over real gloo ranks with uneven and empty
shards, against nn.BatchNorm on the concatenated batch (SyncBatchNorm) and against
the CPU path (the variants that share the kernels); and the launch count of a
steady-state training step of each synced variant.

Run by tests/test_triton_kernels.py::test_triton_path_in_the_interpreter in a child
pytest with ``TRITON_INTERPRET=1`` (the interpreter must be chosen before triton is
imported).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

import distnorm
from tests._device_cases import (STEPS, OpRecord, assert_matches_batch_norm, batch_norm,
                                 classify_ops, loss_weights, shards)
from tests._triton_path import INTERPRETED, triton_path

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="run by "
                                "test_triton_path_in_the_interpreter in a child process")

CASES = {  # name: (input shape after N, channels_last, dtype, .half() model)
    "nchw": ((4, 5, 5), False, torch.float32, False),
    "channels_last": ((4, 3, 5), True, torch.float32, False),
    "1d": ((4,), False, torch.float64, False),
    "ncl": ((4, 7), False, torch.bfloat16, False),
    "3d": ((4, 2, 3, 3), True, torch.float32, False),
    "half_model": ((4, 3, 3), False, torch.float16, True),
}


def _w_steps(rank: int, world: int, mode: str, case: str, triton: bool) -> Dict[str, Any]:
    layer = distnorm.convert_model(batch_norm(CASES[case]), mode=mode)
    out: Dict[str, Any] = {"y": [], "dx": []}
    with triton_path() if triton else nullcontext():
        for step in range(STEPS):  # the deferred checks of step k run at step k + 1
            x = shards(CASES[case], step)[rank].requires_grad_()
            y = layer(x)
            (y.double() * loss_weights(x)).sum().backward()
            out["y"].append(y.detach())
            out["dx"].append(x.grad)
    out.update({k: v.detach().clone() for k, v in layer.state_dict().items()
                if v.is_floating_point()})
    out.update(weight_grad=layer.weight.grad, bias_grad=layer.bias.grad)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_sync_batch_norm_matches_batch_norm_of_the_concatenated_batch(case, world3):
    """SyncBatchNorm on the Triton path: outputs, input gradients, summed parameter
    gradients and running statistics equal nn.BatchNorm's on the whole batch."""
    results = world3.run(_w_steps, "sync", case, True)
    assert_matches_batch_norm(results, CASES[case])


@pytest.mark.parametrize("mode,case", [("brn", "nchw"), ("cmbn", "channels_last"),
                                       ("cbn", "nchw"), ("bin", "channels_last"),
                                       ("switchable", "nchw")])
def test_variants_on_the_triton_path_match_their_cpu_path(mode, case, world3):
    """The variants that share the kernels give, on the Triton path, what their CPU
    path gives (itself tested against its oracles), empty rank included."""
    triton = world3.run(_w_steps, mode, case, True)
    plain = world3.run(_w_steps, mode, case, False)
    for rank in range(3):
        for key in ("y", "dx"):
            for a, b in zip(triton[rank][key], plain[rank][key]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for key, value in plain[rank].items():
            if key not in ("y", "dx") and value is not None:
                torch.testing.assert_close(triton[rank][key], value, rtol=1e-4, atol=1e-4,
                                           msg=f"{mode} rank {rank}: {key}")




def _w_launches(rank: int, world: int, mode: str) -> Dict[str, List[str]]:
    """Every Triton launch, every device-launching ATen op, every collective and every
    host read of a steady-state training step (forward + backward) of one synced
    layer on the Triton path, its deferred guard checks (an asynchronous copy of 11
    numbers to pinned memory on CUDA) counted apart."""
    from torch.utils._python_dispatch import _disable_current_modes

    from distnorm import cuda_ops
    from distnorm.distributed import collectives

    tail_copies: List[int] = []
    original = collectives._DeferredCheck.__init__

    def deferred(self: Any, tail: torch.Tensor, check: Any) -> None:
        tail_copies.append(tail.numel())
        with _disable_current_modes():
            original(self, tail, check)

    launch = cuda_ops._launch

    def interpreted_launch(*args: Any, **meta: Any) -> None:
        with _disable_current_modes():  # the interpreter's own copies of the arguments
            launch(*args, **meta)

    layer = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(4)), mode=mode)[0]
    collectives._DeferredCheck.__init__ = deferred  # type: ignore[method-assign]
    cuda_ops._launch = interpreted_launch
    try:
        with triton_path():
            for step in range(2):  # the first call exchanges headers; the second is steady
                x = torch.randn(2 + rank, 4, 3, 3, requires_grad=True)
                grad = torch.randn(2 + rank, 4, 3, 3)
                layer.weight.grad = layer.bias.grad = None  # no accumulation kernels
                if step == 0:
                    layer(x).backward(grad)
                    continue
                cuda_ops.launch_log = []
                tail_copies.clear()
                with OpRecord() as record:
                    layer(x).backward(grad)
                launches = cuda_ops.launch_log
    finally:
        cuda_ops.launch_log = None
        cuda_ops._launch = launch
        collectives._DeferredCheck.__init__ = original  # type: ignore[method-assign]
    return {"triton": launches, "tail_copies": tail_copies, **classify_ops(record.ops)}


@pytest.mark.parametrize("mode", ["sync", "brn", "cmbn", "cbn", "bin", "switchable"])
def test_launches_of_a_steady_state_training_step(mode, world2):
    """SyncBatchNorm: at most 6 launches of distnorm's own (Triton) and its 2
    collectives; every variant: no host read. The counts are printed (-s)."""
    for rank, counts in enumerate(world2.run(_w_launches, mode)):
        kernels = len(counts["triton"]) + len(counts["aten"])
        print(f"{mode} rank {rank}: {kernels} kernels ({len(counts['triton'])} Triton "
              f"{counts['triton']}, {len(counts['aten'])} ATen {counts['aten']}), "
              f"{len(counts['collectives'])} collectives, {len(counts['tail_copies'])} "
              f"guard tail copies, host reads {counts['host_reads']}")
        assert counts["host_reads"] == [], counts
        assert counts["other"] == [], counts
        if mode == "sync":
            assert kernels <= 6 and len(counts["collectives"]) == 2, counts


def _w_compiled(rank: int, world: int, mode: str) -> Dict[str, Any]:
    """The same steps eagerly and inside torch.compile(fullgraph=True): the compiled
    graph calls the Triton kernels as custom operators (torch.ops.distnorm.*)."""
    from distnorm import cuda_ops

    out: Dict[str, Any] = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(4)), mode=mode)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        steps = []
        with triton_path():
            for step in range(2):
                gen = torch.Generator().manual_seed(step)
                x = (torch.randn(2 + rank, 4, 3, 3, generator=gen) * 3 + 5).requires_grad_()
                cuda_ops.launch_log = []
                y = run(x)
                y.square().sum().backward()
                steps.append((y.detach(), x.grad, list(cuda_ops.launch_log)))
        cuda_ops.launch_log = None
        out[str(compiled)] = (steps, {k: v.clone() for k, v in model.state_dict().items()},
                              model[0].weight.grad)
    return out


@pytest.mark.parametrize("mode", ["sync", "cmbn"])
def test_inside_torch_compile_the_kernels_are_custom_operators(mode, world2):
    for out in world2.run(_w_compiled, mode, timeout=600):
        (eager, eager_state, eager_grad), (compiled, state, grad) = out["False"], out["True"]
        for (y, dx, eager_launches), (y_c, dx_c, launches) in zip(eager, compiled):
            torch.testing.assert_close(y_c, y)
            torch.testing.assert_close(dx_c, dx)
            assert launches == eager_launches, (launches, eager_launches)
        for key, value in eager_state.items():
            torch.testing.assert_close(state[key], value)
        torch.testing.assert_close(grad, eager_grad)


def _w_nonfinite(rank: int, world: int, policy: str) -> Dict[str, Any]:
    """Rank 1's input holds a NaN at the first step."""
    layer = distnorm.SyncBatchNorm(3)
    layer.nonfinite = policy
    out: Dict[str, Any] = {"y0": None, "error": None, "running_mean": None}
    with triton_path():
        try:
            for step in range(3):
                gen = torch.Generator().manual_seed(10 * rank + step)
                x = torch.randn(2, 3, 4, generator=gen) + 5
                if rank == 1 and step == 0:
                    x[0, 1, 2] = float("nan")
                y = layer(x)
                y.sum().backward()
                if step == 0:
                    out["y0"] = y.detach()
                    out["running_mean"] = layer.running_mean.clone()
        except distnorm.NonFiniteError as error:
            out["error"], out["step"] = str(error), step
    return out


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_input_on_the_triton_path(policy, world2):
    """The finish kernel zeros a non-finite payload and raises its rank's bit: with
    "skip" the statistics are rank 0's alone; with "raise" every rank raises
    NonFiniteError naming rank 1 at the next guarded call (CUDA's deferred check)."""
    results = world2.run(_w_nonfinite, policy)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) + 5
    mean = x0.mean((0, 2))
    torch.testing.assert_close(results[0]["running_mean"], 0.1 * mean)
    if policy == "skip":
        assert all(r["error"] is None for r in results), results
        torch.testing.assert_close(results[0]["y0"], nn.functional.batch_norm(
            x0, None, None, training=True))
    else:
        for r in results:
            assert r["error"] is not None and "rank(s) [1]" in r["error"], r
            assert r["step"] == 1
