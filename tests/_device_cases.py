"""Inputs and the plain-BatchNorm reference shared by the tests of the CUDA paths run
on CPU (tests/test_triton_layers.py, tests/test_native_cuda.py): uneven shards with
an empty rank, in a dtype and layout given per case."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

SIZES = [3, 0, 2]  # uneven, one empty rank (world3)
STEPS = 2  # the second runs the first one's deferred guard checks
# A case: (input shape after N, channels_last, dtype, a .half() model)
Case = Tuple[Tuple[int, ...], bool, torch.dtype, bool]


def shards(case: Case, step: int) -> List[Tensor]:
    """Every rank's input at ``step``: ``SIZES`` samples, mean 10, std 3."""
    rest, channels_last, dtype, _ = case
    gen = torch.Generator().manual_seed(step)
    out = []
    for n in SIZES:
        x = (torch.randn((n,) + rest, generator=gen, dtype=torch.float64) * 3 + 10).to(dtype)
        if channels_last:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        out.append(x)
    return out


def batch_norm(case: Case) -> nn.Module:
    """The plain ``nn.BatchNorm`` of 4 channels for the case's input, with a
    non-trivial affine, in the case's dtype."""
    rest, _, dtype, half = case
    classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
    bn = classes[len(rest)](4)
    torch.manual_seed(0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    if dtype == torch.float64:
        return bn.double()
    return bn.half() if half else bn


def loss_weights(x: Tensor) -> Tensor:
    """Per-channel weights of the test loss ``Σ y·w``, so every channel's gradient differs."""
    return torch.arange(1.0, 5.0, dtype=torch.float64).view((1, 4) + (1,) * (x.dim() - 2))


def tolerance(case: Case) -> Dict[str, float]:
    dtype = case[2]
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=2e-2, atol=5e-2)


def assert_matches_batch_norm(results: List[Dict[str, Any]], case: Case) -> nn.Module:
    """Every rank's outputs (dtype and layout), input gradients and running statistics,
    and the parameter gradients summed over ranks, equal ``nn.BatchNorm``'s on the
    concatenated batch of :func:`shards` over :data:`STEPS` steps, each rank's loss
    weighted by :func:`loss_weights`. Returns the reference layer."""
    ref = batch_norm(case)
    tol = tolerance(case)
    for step in range(STEPS):
        inputs = shards(case, step)
        x = torch.cat(inputs).detach().requires_grad_()
        y = ref(x)
        (y.double() * loss_weights(x)).sum().backward()
        for rank, (ys, dxs) in enumerate(zip(y.split(SIZES), x.grad.split(SIZES))):
            got = results[rank]
            assert got["y"][step].dtype == ys.dtype
            assert got["y"][step].stride() == inputs[rank].stride() or not ys.numel()
            torch.testing.assert_close(got["y"][step].double(), ys.double(), **tol)
            torch.testing.assert_close(got["dx"][step].double(), dxs.double(), **tol)
    for result in results:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(result[key].double(), getattr(ref, key).double(), **tol)
    for key, want in (("weight_grad", ref.weight.grad), ("bias_grad", ref.bias.grad)):
        got = sum(r[key].double() for r in results)
        assert results[0][key].dtype == want.dtype
        torch.testing.assert_close(got, want.double(), rtol=tol["rtol"] * 10,
                                   atol=tol["atol"] * 10)
    return ref


# ATen ops that launch nothing on a device (metadata, allocation, views).
NO_LAUNCH = ("empty", "new_empty", "view", "_unsafe_view", "slice", "select", "as_strided",
             "detach", "alias", "unsqueeze", "squeeze", "expand", "permute", "transpose", "t.",
             "_reshape_alias", "split", "unbind", "movedim", "lift_fresh", "set_")
HOST_READS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")


class OpRecord(TorchDispatchMode):
    """Records the name of every op dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def classify_ops(ops: List[str]) -> Dict[str, List[str]]:
    """Recorded ops sorted into what would launch on a device (``aten``), the
    collectives, the host reads and the rest; ops that launch nothing are left out."""
    ops = [op for op in ops if not op.startswith("aten.")
           or not any(op[5:].startswith(name) for name in NO_LAUNCH)]
    return {"aten": [op for op in ops if op.startswith("aten.")],
            "collectives": [op for op in ops if op.startswith("c10d")],
            "host_reads": [op for op in ops if any(f".{name}." in op or op.endswith(f".{name}")
                                                   for name in HOST_READS)],
            "other": [op for op in ops if not op.startswith(("aten.", "c10d"))]}
