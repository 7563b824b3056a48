"""The two-minute demo: synced BN over 2 ranks × 2 samples is BN over 4 samples.

Spawns ``world`` CPU processes over gloo (:func:`distnorm.launch.local.spawn`),
converts a torchvision ResNet-18 with :func:`distnorm.convert_model`, trains it a few SGD steps under
``DistributedDataParallel`` at 2 samples per rank, and compares against the same
model trained in one process on the concatenated batch with plain
``nn.BatchNorm2d``. Local BN (each rank normalizing its own 2 samples) is shown
beside it: it drifts away, which is the whole problem distnorm solves.

Run it with ``distnorm demo`` (or ``python -m distnorm.demo``).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm.launch.local import spawn


def _model(num_classes: int) -> nn.Module:
    try:
        from torchvision.models import resnet18
    except ImportError as error:  # pragma: no cover - depends on the install
        raise SystemExit("the demo needs torchvision: pip install 'distnorm[examples]'") from error
    torch.manual_seed(0)
    # float64 so that the comparison shows the algorithm, not rounding noise.
    return resnet18(weights=None, num_classes=num_classes).double()


def _data(steps: int, batch: int, size: int, num_classes: int):
    """A fixed synthetic classification set: class-dependent blobs plus noise."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, 3, size, size, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (steps, batch), generator=gen)
    x += y.view(steps, batch, 1, 1, 1) * 0.5  # learnable signal per class
    return x, y


def _train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> List[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    model.train()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _rank_main(rank: int, world: int, args: argparse.Namespace) -> Optional[bytes]:
    """One rank's runs (the process group is started by :func:`distnorm.launch.local.spawn`)."""
    xs, ys = _data(args.steps, args.per_rank * world, args.size, args.classes)
    shard = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
    results: Dict[str, Dict[str, torch.Tensor]] = {}
    for label, mode in (("distnorm sync", "sync"), ("local BN", None)):
        model = _model(args.classes)
        if mode is not None:
            model = distnorm.convert_model(model, mode=mode)
        ddp = nn.parallel.DistributedDataParallel(model)
        losses = torch.stack(_train(ddp, xs[:, shard], ys[:, shard], args.lr))
        # The loss of the global batch: mean of the ranks' means (equal shards).
        dist.all_reduce(losses)
        results[label] = {"loss": losses / world,
                          "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if rank != 0:
        return None
    buffer = io.BytesIO()  # bytes, not shared tensors: this process exits right after
    torch.save(results, buffer)
    return buffer.getvalue()


def _compare(state: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    def worst(keys):
        return max(((state[k].double() - ref[k].double()).abs().max().item() for k in keys), default=0.0)
    params = [k for k in ref if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in ref if k.endswith(("running_mean", "running_var"))]
    return {"params": worst(params), "stats": worst(stats)}


def run(world: int = 2, per_rank: int = 2, steps: int = 5, size: int = 32, classes: int = 4,
        lr: float = 0.02, status: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """Run the demo and return its table rows (also printed by :func:`main`).

    ``status``, if given, is called with a line before each part that takes a while.
    """
    say = status or (lambda line: None)
    args = argparse.Namespace(world=world, per_rank=per_rank, steps=steps, size=size,
                              classes=classes, lr=lr)
    xs, ys = _data(steps, per_rank * world, size, classes)
    say(f"training the reference: one process, nn.BatchNorm2d, batches of {per_rank * world} …")
    reference = _model(classes)
    ref_losses = torch.stack(_train(reference, xs, ys, lr))
    ref_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    # Every rank must also exit cleanly: spawn fails on an abort at interpreter exit
    # after destroy_process_group, a failed job for torchrun, Slurm or CI.
    say(f"starting {world} ranks (CPU, gloo), each training synced BN and then local BN on "
        f"its {per_rank} samples (15-60 s: each rank imports torch and torchvision first) …")
    payload = spawn(_rank_main, world, args, timeout=600.0, pg_timeout=120.0)[0]
    results = torch.load(io.BytesIO(payload))

    rows: List[Dict[str, object]] = [{
        "run": f"nn.BatchNorm2d, 1 process × {per_rank * world}", "final loss": ref_losses[-1].item(),
        "max |Δ loss|": 0.0, "max |Δ weights|": 0.0, "max |Δ running stats|": 0.0}]
    for label, res in results.items():
        diff = _compare(res["state"], ref_state)
        rows.append({
            "run": f"{label}, {world} ranks × {per_rank}", "final loss": res["loss"][-1].item(),
            "max |Δ loss|": (res["loss"] - ref_losses).abs().max().item(),
            "max |Δ weights|": diff["params"], "max |Δ running stats|": diff["stats"]})
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    """A markdown table of the rows."""
    keys = list(rows[0])
    cells = [[r[k] if isinstance(r[k], str) else f"{r[k]:.3g}" for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths])] + [line(c) for c in cells])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="distnorm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes (gloo, CPU)")
    parser.add_argument("--per-rank", type=int, default=2, help="samples per rank")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.world > cores:
        print(f"distnorm demo: warning: {args.world} ranks on {cores} CPU cores; they will take "
              f"turns and the demo will be slower", file=sys.stderr, flush=True)
    start = time.perf_counter()

    def status(line: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f} s] {line}", flush=True)

    rows = run(world=args.world, per_rank=args.per_rank, steps=args.steps, size=args.size,
               status=status)
    status("done\n")
    print(f"ResNet-18 (torchvision), {args.steps} SGD steps, differences against one process "
          f"with nn.BatchNorm2d on the batch of {args.world * args.per_rank}:\n")
    print(format_table(rows))
    sync, local = rows[1], rows[2]
    ok = float(sync["max |Δ weights|"]) < 1e-6 < float(local["max |Δ weights|"])  # type: ignore[arg-type]
    print("\n" + ("synced BN matches the big batch; local BN does not." if ok else
                  "UNEXPECTED: synced BN did not match the big batch better than local BN."))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
