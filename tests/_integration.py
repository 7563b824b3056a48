"""What the framework-integration tests share: a small float64 net, uneven shards of
a fixed set of batches, the reference (the unconverted net trained in one process on
the concatenated batches), a torchrun launcher that checks every rank, and the
comparison of every rank's state with the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distnorm.testing import split_batch

ROOT = Path(__file__).resolve().parents[1]
SHARDS = (3, 5)     # uneven on purpose: statistics must be count-weighted
STEPS = 2
LR = 0.1

Batch = Tuple[torch.Tensor, torch.Tensor]


def net() -> nn.Module:
    """Two convolution + BatchNorm blocks and a linear head, float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def batches(seed: int, size: Sequence[int] = (3, 6, 5), classes: int = 3, scale: float = 1.5,
            offset: float = 0.3, shards: Sequence[int] = SHARDS, steps: int = STEPS) -> List[Batch]:
    """``steps`` batches of ``sum(shards)`` float64 inputs and class labels."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(shards)
    return [(torch.randn((total, *size), generator=gen, dtype=torch.float64) * scale + offset,
             torch.randint(0, classes, (total,), generator=gen)) for _ in range(steps)]


def shard(batch: Batch, rank: int, shards: Sequence[int] = SHARDS) -> Batch:
    """Rank ``rank``'s part of ``batch`` (:func:`distnorm.testing.split_batch`)."""
    return split_batch(batch, shards)[rank]  # type: ignore[return-value]


def reference_state(model: nn.Module, data: List[Batch], lr: float = LR) -> Dict[str, torch.Tensor]:
    """``model`` trained with SGD and the mean cross-entropy on whole batches."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def torchrun(args: Sequence[str], out: Path, world: int = len(SHARDS)) -> List[Any]:
    """Run ``python -m torch.distributed.run --standalone ... args`` with ``world``
    ranks; check its exit code and load each rank's ``out/rank<r>.pt``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = []
    for rank in range(world):
        path = out / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result:\n{proc.stderr[-4000:]}"
        results.append(torch.load(path))
    return results


def assert_states_match(results: List[Dict[str, Any]], expected: Dict[str, torch.Tensor],
                        check: Callable[[Dict[str, Any]], None] = lambda result: None) -> None:
    """Every rank's ``result["state"]`` equals ``expected`` (float64 tolerance)."""
    for rank, result in enumerate(results):
        check(result)
        assert result["state"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {name} differs from the reference")
