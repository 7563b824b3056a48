"""A small synced-BN job for the Slurm tests (tests/test_slurm.py).

Every rank normalizes its own, uneven shard (rank r holds 2 + r samples) of one fixed
float64 batch with ``distnorm.SyncBatchNorm``, runs one forward/backward, and saves its
running statistics, its place in the job and the torch.distributed variables it was
given to ``OUT/rank<R>.pt``. With correct synchronization every rank's running
statistics equal ``nn.BatchNorm2d``'s on the concatenated batch (:func:`reference`).

Run it as a script under any launcher (``srun python -m distnorm.launch.slurm run``,
``srun torchrun``, ``torchrun``) or call :func:`bn_job` with the process group started.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

CHANNELS = 3
VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "SLURM_PROCID", "SLURM_JOB_ID")


def sizes(world: int) -> List[int]:
    return [2 + r for r in range(world)]


def batch(world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(sum(sizes(world)), CHANNELS, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1


def reference(world: int) -> Dict[str, torch.Tensor]:
    """Running statistics of nn.BatchNorm2d after one step on the whole batch."""
    bn = torch.nn.BatchNorm2d(CHANNELS).double()
    bn(batch(world))
    return {"running_mean": bn.running_mean, "running_var": bn.running_var}


def bn_job(out: str) -> Dict[str, object]:
    """One synced-BN step on this rank's shard; needs torch.distributed initialized."""
    import distnorm

    rank, world = dist.get_rank(), dist.get_world_size()
    start = sum(sizes(world)[:rank])
    x = batch(world)[start:start + sizes(world)[rank]].requires_grad_()
    bn = distnorm.SyncBatchNorm(CHANNELS).double()
    bn(x).square().sum().backward()
    result = {"rank": rank, "world": world, "host": socket.gethostname(),
              "env": {k: os.environ.get(k) for k in VARIABLES},
              "running_mean": bn.running_mean.detach().clone(),
              "running_var": bn.running_var.detach().clone()}
    os.makedirs(out, exist_ok=True)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    return {"rank": rank, "world": world, "host": result["host"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from distnorm.launch.env import init_from_env

    torch.set_num_threads(1)
    init_from_env(timeout=120)
    try:
        print(bn_job(args.out), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
