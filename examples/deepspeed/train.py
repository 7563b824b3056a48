"""DeepSpeed + distnorm: convert the BatchNorm layers *before* ``deepspeed.initialize``.

A small Conv-BN CNN trained under DeepSpeed (ZeRO stage 0, 1, 2 or 3) on synthetic
images, each rank with its own data. After training the script compares every
BatchNorm layer's running statistics across ranks:

* ``--norm bn``: plain ``nn.BatchNorm2d``. Each rank normalizes with its own
  micro-batch's moments, so the running statistics drift apart across ranks
  (DeepSpeed, like DDP, only averages gradients; it never syncs BN buffers).
* ``--norm sync``: ``distnorm.convert_model(model, mode="sync")``. Every rank
  normalizes with the moments of the whole global batch, so the running statistics
  stay bit-identical on every rank.
* ``--norm cmbn``: Cross mini-Batch Normalization over DeepSpeed's gradient
  accumulation. The cycle length comes from DeepSpeed: the config before
  ``initialize`` and the engine after it (``distnorm.modules.cross_mini_batch.
  accumulation_steps_from``), so CmBN cycles line up with the optimizer steps.
* any other mode of ``distnorm.variants()`` (``brn``, ``cbn``, ``frozen``, ``gn``).

Run (CPU, gloo; the same command works on GPUs with NCCL)::

    torchrun --standalone --nproc_per_node=2 examples/deepspeed/train.py --norm bn sync --zero-stage 0 1 2 3
    torchrun --standalone --nproc_per_node=2 examples/deepspeed/train.py --norm cmbn --grad-accum 4

Several ``--norm`` and ``--zero-stage`` values run one after another in the same
processes (one engine each), which saves the start-up of torch and DeepSpeed. Rank 0
prints one line per run and, with ``--out``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm.modules.cross_mini_batch import accumulation_steps_from

NUM_CLASSES = 10
IMAGE_SIZE = 16


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    modes = ["bn"] + sorted(distnorm.variants())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", nargs="+", default=["sync"], choices=modes,
                        help="norm layer(s): plain BatchNorm ('bn') or a distnorm mode; "
                             "several run one after another (default: sync)")
    parser.add_argument("--zero-stage", nargs="+", type=int, default=[2], choices=[0, 1, 2, 3],
                        help="ZeRO stage(s) to run (default: 2)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default: 4)")
    parser.add_argument("--micro-batch", type=int, default=4,
                        help="samples per rank and micro-batch (default: 4)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per optimizer step (default: 2 for cmbn, else 1); "
                             "DeepSpeed derives it from train_batch_size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the per-run results here (JSON, rank 0)")
    parser.add_argument("--build-shm-op", action="store_true",
                        help="let DeepSpeed JIT-compile its CPU shared-memory all-reduce op "
                             "(30-95 s the first time; only its inference all-reduce uses it)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.micro_batch < 1 or (args.grad_accum is not None and args.grad_accum < 1):
        parser.error("--steps, --micro-batch and --grad-accum must be >= 1")
    return args


def make_model() -> nn.Module:
    """A small CNN with three Conv-BN-ReLU blocks."""
    def block(cin: int, cout: int, stride: int) -> List[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_CLASSES))


def make_batch(seed: int, rank: int, micro_step: int, size: int) -> tuple:
    """Rank ``rank``'s micro-batch ``micro_step``: class-dependent patterns plus noise."""
    patterns = torch.randn(NUM_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE,
                           generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + micro_step + 1)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
    x = patterns[y] + 0.5 * torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return x, y


def running_stats(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every norm layer's running statistics (and update counts), by layer name."""
    stats: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(module, key, None)
            if isinstance(value, torch.Tensor):
                stats[f"{name}.{key}"] = value.detach()
    return stats


def spread_across_ranks(stats: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Max |rank r - rank 0| of the running statistics, and whether they are bit-identical."""
    result: Dict[str, Any] = {"max_abs_diff_running_mean": None, "max_abs_diff_running_var": None,
                              "identical": None}
    if not stats:  # e.g. GroupNorm: nothing to compare
        return result
    world = dist.get_world_size()
    identical = True
    for kind in ("running_mean", "running_var", "num_batches_tracked"):
        parts = [v.reshape(-1).to(torch.float64) for k, v in stats.items() if k.endswith(kind)]
        if not parts:
            continue
        local = torch.cat(parts).cpu()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        diffs = [(g - gathered[0]).abs().max().item() for g in gathered[1:]]
        identical &= all(torch.equal(g, gathered[0]) for g in gathered[1:])
        if kind != "num_batches_tracked":
            result[f"max_abs_diff_{kind}"] = max(diffs, default=0.0)
    result["identical"] = identical
    return result


def ds_config(args: argparse.Namespace, stage: int, world: int, accum: int) -> Dict[str, Any]:
    # gradient_accumulation_steps is left out on purpose: DeepSpeed derives it as
    # train_batch_size / (micro batch x world size), and so does accumulation_steps_from.
    return {
        "train_batch_size": args.micro_batch * accum * world,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "zero_optimization": {"stage": stage},
        # A torch optimizer under ZeRO >= 1 needs this, else DeepSpeed asserts.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def train_one(args: argparse.Namespace, norm: str, stage: int) -> Dict[str, Any]:
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    accum = args.grad_accum if args.grad_accum is not None else (2 if norm == "cmbn" else 1)
    config = ds_config(args, stage, world, accum)

    torch.manual_seed(args.seed)          # same initial weights everywhere
    model = make_model()
    # Convert BEFORE deepspeed.initialize: the engine (and ZeRO's hooks and
    # partitioning) must wrap the distnorm layers, not the BatchNorm ones.
    if norm == "cmbn":
        model = distnorm.convert_model(model, mode="cmbn",
                                       accumulation_steps=accumulation_steps_from(config))
    elif norm != "bn":
        model = distnorm.convert_model(model, mode=norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    started = time.perf_counter()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   model_parameters=model.parameters(),
                                                   config=config)
    init_s = time.perf_counter() - started

    cmbn_layers = [m for m in engine.module.modules() if isinstance(m, distnorm.CrossMiniBatchNorm)]
    engine_accum = accumulation_steps_from(engine)   # engine.gradient_accumulation_steps()
    for layer in cmbn_layers:
        # The engine has the final word (e.g. a config with "auto" values).
        layer.accumulation_steps = engine_accum

    engine.train()
    losses: List[float] = []
    aligned = True
    started = time.perf_counter()
    for micro_step in range(args.steps * engine_accum):
        x, y = make_batch(args.seed, rank, micro_step, args.micro_batch)
        x, y = x.to(engine.device), y.to(engine.device)
        loss = F.cross_entropy(engine(x), y)
        if cmbn_layers:   # a cycle closes exactly on DeepSpeed's optimizer steps
            at_boundary = engine.is_gradient_accumulation_boundary()
            aligned &= all((layer.position == 0) == at_boundary for layer in cmbn_layers)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - started

    stats = running_stats(engine.module)
    result: Dict[str, Any] = {
        "norm": norm, "zero_stage": stage, "world_size": world,
        "micro_batch": args.micro_batch,
        "gradient_accumulation_steps": engine_accum,
        "optimizer_steps": int(engine.global_steps),
        "loss_first": losses[0], "loss_last": losses[-1],
        "init_s": round(init_s, 3), "train_s": round(train_s, 3),
        **spread_across_ranks(stats),
    }
    if cmbn_layers:
        result["cmbn_accumulation_steps"] = sorted({layer.accumulation_steps for layer in cmbn_layers})
        result["cmbn_cycles_aligned"] = bool(aligned)
        result["cmbn_running_updates"] = sorted(
            {int(v) for k, v in stats.items() if k.endswith("num_batches_tracked")})
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # DeepSpeed's ZeRO calls all_gather_into_tensor / reduce_scatter_tensor, which
    # torch 2.14 flags as deprecated at every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed

    if not args.build_shm_op:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op in
        # init_distributed (30-95 s the first time). Only its *inference* all-reduce
        # uses it; training goes through torch.distributed either way.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    rank = dist.get_rank()

    results = []
    try:
        for norm in args.norm:
            for stage in args.zero_stage:
                result = train_one(args, norm, stage)
                results.append(result)
                if rank == 0:
                    line = (f"[distnorm-deepspeed] norm={norm:6s} zero={stage} "
                            f"world={result['world_size']} accum={result['gradient_accumulation_steps']} "
                            f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}  ")
                    if result["identical"] is None:
                        line += "no running statistics"
                    else:
                        line += (f"max|d running_mean| across ranks = "
                                 f"{result['max_abs_diff_running_mean']:.3g}, identical: "
                                 f"{result['identical']}")
                    if "cmbn_cycles_aligned" in result:
                        line += f", cmbn cycles aligned: {result['cmbn_cycles_aligned']}"
                    print(line, flush=True)
        if rank == 0 and args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
