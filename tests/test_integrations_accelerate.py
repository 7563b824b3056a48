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

import distnorm
from distnorm.integrations.accelerate import check_accelerator
from tests._integration import LR, SHARDS, assert_states_match, batches
from tests._integration import net as make_net
from tests._integration import reference_state, shard

if importlib.util.find_spec("accelerate") is None:
    if os.environ.get("CI"):
        raise ImportError("accelerate is part of the dev extra: pip install -e '.[dev]'")
    pytest.skip("accelerate is not installed (pip install -e '.[dev]')", allow_module_level=True)


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return batches(seed=4)


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
        model = distnorm.convert_model(make_net(), mode=mode)        # before prepare
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        for batch in _batches():
            x, y = shard(batch, rank)
            opt.zero_grad()
            # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
            loss = F.cross_entropy(model(x), y, reduction="sum")
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
    expected = reference_state(make_net(), _batches())
    for result in results:
        assert result["type"] == "MULTI_CPU" and result["processes"] == 2, result["type"]
        assert result["wrapper"] == "DistributedDataParallel"
        assert result["norms"] == ["SyncBatchNorm", "SyncBatchNorm"]
    assert_states_match(results, expected)


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
