"""accelerate: a model converted with ``distnorm.convert_model`` before
``accelerator.prepare`` trains like BatchNorm on the concatenated batch.

Runs on the 2-rank gloo pool with torchrun's variables set in each rank (RANK,
WORLD_SIZE, LOCAL_RANK, ...), as ``torchrun`` or ``accelerate launch --cpu`` would set
them. ``Accelerator(cpu=True)`` then reports ``DistributedType.MULTI_CPU``, finds the
process group already initialized and uses it, and wraps the model in DDP. Shards of
3 and 5 samples, float64, loss convention of tests/test_ddp.py: weights and running
statistics after two steps equal the unconverted model's on the concatenated batch.

On a machine without GPU a plain ``Accelerator()`` in the same setting reports
``DistributedType.NO`` and wraps nothing, although a process group of 2 ranks exists:
distnorm would sync statistics across ranks whose gradients are never averaged.
``check_accelerator`` refuses that, naming ``Accelerator(cpu=True)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm.integrations.accelerate import check_accelerator

if importlib.util.find_spec("accelerate") is None:
    if os.environ.get("CI"):
        raise ImportError("accelerate is part of the dev extra: pip install -e '.[dev]'")
    pytest.skip("accelerate is not installed (pip install -e '.[dev]')", allow_module_level=True)

SHARDS = (3, 5)
STEPS = 2
LR = 0.1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    total = sum(SHARDS)
    return [(torch.randn(total, 3, 6, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3,
             torch.randint(0, 3, (total,), generator=gen)) for _ in range(STEPS)]


@contextlib.contextmanager
def _torchrun_env(rank: int, world: int) -> Iterator[None]:
    """torchrun's variables in a pool rank; afterwards no accelerate state and the
    environment as it was (the pool's ranks serve other tests)."""
    from accelerate.state import AcceleratorState, GradientState

    saved = dict(os.environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500", OMP_NUM_THREADS="1")
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        os.environ.clear()
        os.environ.update(saved)


def _accelerate_job(rank: int, world: int, mode: str) -> Dict[str, Any]:
    from accelerate import Accelerator

    with _torchrun_env(rank, world):
        accelerator = Accelerator(cpu=True)
        check_accelerator(accelerator)
        model = distnorm.convert_model(_net(), mode=mode)        # before prepare
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        start = sum(SHARDS[:rank])
        for x, y in _batches():
            opt.zero_grad()
            out = model(x[start:start + SHARDS[rank]])
            # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
            loss = F.cross_entropy(out, y[start:start + SHARDS[rank]], reduction="sum")
            accelerator.backward(loss * (world / sum(SHARDS)))
            opt.step()
        net = accelerator.unwrap_model(model)
        return {"type": accelerator.distributed_type.value, "processes": accelerator.num_processes,
                "wrapper": type(model).__name__,
                "norms": [type(m).__name__ for m in net if "Norm" in type(m).__name__],
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def _plain_accelerator_job(rank: int, world: int) -> List[str]:
    from accelerate import Accelerator

    with _torchrun_env(rank, world):
        accelerator = Accelerator()
        with pytest.raises(RuntimeError, match=r"Accelerator\(cpu=True\)") as info:
            check_accelerator(accelerator)
        return [accelerator.distributed_type.value, str(info.value)]


@pytest.mark.slow
def test_accelerator_cpu_trains_like_batch_norm_on_concatenated_batch(world2) -> None:
    results = world2.run(_accelerate_job, "sync")
    reference = _net().train()
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for x, y in _batches():
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    expected = reference.state_dict()
    for rank, result in enumerate(results):
        assert result["type"] == "MULTI_CPU" and result["processes"] == 2, result["type"]
        assert result["wrapper"] == "DistributedDataParallel"
        assert result["norms"] == ["SyncBatchNorm", "SyncBatchNorm"]
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {name} differs from the reference")


def test_check_accelerator_refuses_a_single_process_accelerator_in_a_group(world2) -> None:
    for kind, message in world2.run(_plain_accelerator_job):
        assert kind == "NO"
        assert "a process group of 2 ranks" in message


def test_check_accelerator_outside_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    single = SimpleNamespace(distributed_type=SimpleNamespace(value="NO"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_accelerator(single)                       # one process, nothing to average
    monkeypatch.setenv("WORLD_SIZE", "4")           # a launcher's job, yet no group
    with pytest.raises(RuntimeError, match="WORLD_SIZE says 4 ranks"):
        check_accelerator(single)
    check_accelerator(SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_GPU")))
