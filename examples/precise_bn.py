"""PreciseBN in a plain PyTorch training loop: recompute BatchNorm statistics before
each evaluation with ``distnorm.precise_bn``.

A small Conv-BN classifier, converted with ``distnorm.convert_model`` and wrapped in
``DistributedDataParallel``, trains on synthetic images (each class a faint pattern
under noise) at a small batch per rank. After every epoch it is evaluated twice:

* ``ema``     — with the running statistics training left (an exponential moving
  average of small-batch statistics of ever-changing weights);
* ``precise`` — after ``distnorm.precise_bn(model, train_loader, num_batches=N)``:
  the exact population statistics of N training batches per rank, pooled over every
  rank, for the weights as they are now.

Run (CPU, gloo; the same command works on GPUs with NCCL)::

    python examples/precise_bn.py                                   # one process
    torchrun --standalone --nproc_per_node=2 examples/precise_bn.py --epochs 3

Rank 0 prints one line per epoch and, with ``--out``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import distnorm
from distnorm.launch.env import init_from_env

CLASSES, SIZE = 4, 12


def synthetic_images(n: int, seed: int) -> TensorDataset:
    """``n`` images of ``CLASSES`` classes: a class pattern at low contrast under noise."""
    patterns = torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    images = 0.6 * patterns[labels] + torch.randn(n, 3, SIZE, SIZE, generator=g) + 2.0
    return TensorDataset(images, labels)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> Dict[str, float]:
    """Loss and accuracy over every rank's share of the validation set."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                   (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return {"loss": loss / count, "accuracy": correct / count}


def statistics_agree(model: nn.Module) -> bool:
    """Whether every rank holds the same BatchNorm buffers (it must after precise_bn)."""
    if not dist.is_initialized():
        return True
    flat = torch.cat([t.double().flatten() for m in model.modules() if isinstance(m, _BatchNorm)
                      for t in (m.running_mean, m.running_var)])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def main(argv: List[str] | None = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--train-size", type=int, default=512, help="training images in all")
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--precise-batches", type=int, default=100,
                        help="training batches per rank that precise_bn uses")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="write the per-epoch results as JSON here")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        init_from_env()
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")

    model = distnorm.convert_model(build_model()).to(device)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    train_set, val_set = synthetic_images(args.train_size, 1), synthetic_images(args.val_size, 2)
    sampler = DistributedSampler(train_set, seed=0) if distributed else None
    train_loader = DataLoader(train_set, batch_size=args.batch, sampler=sampler,
                              shuffle=sampler is None, drop_last=True)
    val_sampler = DistributedSampler(val_set, shuffle=False) if distributed else None
    val_loader = DataLoader(val_set, batch_size=64, sampler=val_sampler)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)

    history = []
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        for x, y in train_loader:
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ema = evaluate(net, val_loader, device)
        # PreciseBN: the population statistics of the current weights, over all ranks.
        # (train_loader's items are (images, labels): precise_bn feeds the images.)
        used = distnorm.precise_bn(net, ((x.to(device), y) for x, y in train_loader),
                                   num_batches=args.precise_batches)
        precise = evaluate(net, val_loader, device)
        row = {"epoch": epoch, "ema": ema, "precise": precise, "precise_bn_samples": used,
               "statistics_agree": statistics_agree(model)}
        history.append(row)
        if rank == 0:
            print(f"epoch {epoch}: val accuracy {ema['accuracy']:.3f} (EMA statistics) → "
                  f"{precise['accuracy']:.3f} (precise_bn on {used} images); val loss "
                  f"{ema['loss']:.3f} → {precise['loss']:.3f}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(history, f, indent=1)
    if distributed:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
