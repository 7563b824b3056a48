"""What ``distnorm.precise_bn`` costs: B batches through it vs B plain forward passes.

A torchvision ResNet-50 (``weights=None``, float32, NCHW) converted with
``distnorm.convert_model(mode="sync")`` runs on W = 2 gloo ranks (one thread each),
``--batch`` images per rank (default 2) at ``--size`` px, for ``--batches`` B
batches per rank (default 200). Two cases, interleaved rep by rep
(``_common.time_interleaved``; medians over reps of the slowest rank):

* ``forward``    — B forward passes of the model in training mode under
  ``torch.no_grad()`` (what collecting statistics needs at least: the synced layers
  normalize with the group's batch statistics);
* ``precise_bn`` — ``distnorm.precise_bn(model, batches)`` over the same B batches:
  the same forwards plus the per-layer float64 sums, one small all-reduce per round,
  and the final packed all-reduce.

The headline is the ratio precise_bn / forward (target: at most 1.2), from wall time
and from the ranks' CPU time (steadier on a shared machine).

Usage::

    python benchmarks/precise_bn.py                   # B = 200, 224 px, 3 reps
    python benchmarks/precise_bn.py --batches 20 --size 128
    python benchmarks/precise_bn.py --quick           # B = 2, 32 px, 1 rep (smoke test)

Also ``distnorm bench precise_bn``. Results: ``<out>/precise_bn_cpu.json`` and
``<out>/precise_bn_cpu.md``; ``--out`` defaults to ``./distnorm-bench-results`` in the
current directory, like every benchmark (give ``--out benchmarks/results`` to update
the committed results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_OUT, OUT_HELP, Case, distnorm_provenance, machine_info, run_ranks, summarize, time_interleaved

TARGET_RATIO = 1.2


def _bench_rank(rank: int, world: int, batches: int, batch: int, size: int, reps: int,
                warmup: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torchvision

    import distnorm

    torch.manual_seed(0)
    model = distnorm.convert_model(torchvision.models.resnet50(weights=None), "sync")
    generator = torch.Generator().manual_seed(rank)
    data = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(batches)]

    def forward(lap: Any) -> None:
        model.train()
        with torch.no_grad():
            for x in data:
                model(x)

    used: list[int] = []

    def precise(lap: Any) -> None:
        used.append(distnorm.precise_bn(model, data))

    cases = [Case("forward", forward), Case("precise_bn", precise)]
    samples = time_interleaved(cases, reps, warmup=warmup, barrier=dist.barrier)
    return {"samples": samples, "used": used[-1] if used else None}


def build_results(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary = summarize([o["samples"] for o in outputs])
    forward, precise = summary["forward"], summary["precise_bn"]
    return {
        "summary": summary,
        "ratio_wall": precise["total"]["median_ms"] / forward["total"]["median_ms"],
        "ratio_cpu": precise["cpu"]["median_ms"] / forward["cpu"]["median_ms"],
        "samples_used": outputs[0]["used"],
    }


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    s = results["summary"]
    b = meta["batches"]
    lines = [
        "# precise_bn cost (CPU, gloo)",
        "",
        f"ResNet-50 (`weights=None`, float32) converted to `sync`, W = {meta['world']} ranks "
        f"× 1 thread, {meta['batch']} images per rank at {meta['size']} px, B = {b} batches "
        f"per rank, {meta['reps']} timed reps (medians of the slowest rank per rep).",
        "",
        "| case | wall, ms (q1–q3) | wall per batch, ms | CPU, ms |",
        "|---|---|---|---|",
    ]
    for case in ("forward", "precise_bn"):
        t, c = s[case]["total"], s[case]["cpu"]
        lines.append(f"| {case} | {t['median_ms']:.0f} ({t['q1_ms']:.0f}–{t['q3_ms']:.0f}) | "
                     f"{t['median_ms'] / b:.1f} | {c['median_ms']:.0f} |")
    verdict = "meets" if results["ratio_wall"] <= TARGET_RATIO else "misses"
    lines += [
        "",
        f"**precise_bn / forward: {results['ratio_wall']:.3f} (wall), "
        f"{results['ratio_cpu']:.3f} (CPU time)** — {verdict} the target of "
        f"≤ {TARGET_RATIO}× (wall). Samples used by the group: {results['samples_used']}.",
        "",
        f"Machine: {meta['cpu_count']} cores, load average {meta['loadavg_at_start'][0]:.1f} at "
        f"the start and {meta['loadavg_at_end'][0]:.1f} at the end; torch {meta['torch']}; "
        f"commit {meta.get('git_head', '?')[:12]}"
        + (" (uncommitted changes)" if meta.get("distnorm_uncommitted_changes") else "") + ".",
    ]
    if meta["quick"]:
        lines.append("\n`--quick`: a smoke test, not a measurement.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=2, 32 px, 1 rep (smoke test)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=OUT_HELP)
    parser.add_argument("--batches", type=int, default=None, help="batches per rank (default 200)")
    parser.add_argument("--batch", type=int, default=2, help="images per rank (default 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 224)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    args = parser.parse_args(argv)
    batches = args.batches or (2 if args.quick else 200)
    size = args.size or (32 if args.quick else 224)
    reps = args.reps or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    world = 2
    import torchvision

    meta = dict(machine_info(), torchvision=torchvision.__version__, **distnorm_provenance(),
                world=world, batches=batches, batch=args.batch, size=size, reps=reps,
                warmup=warmup, quick=args.quick, threads_per_rank=1, backend="gloo")
    started = time.monotonic()
    outputs = run_ranks(_bench_rank, world, batches, args.batch, size, reps, warmup)
    results = build_results(outputs)
    meta["loadavg_at_end"] = list(os.getloadavg())
    meta["wall_s"] = time.monotonic() - started
    report = markdown(results, meta)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "precise_bn_cpu.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "precise_bn_cpu.md"), "w") as f:
        f.write(report)
    print(f"saved {os.path.join(args.out, 'precise_bn_cpu.json')} and precise_bn_cpu.md",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
