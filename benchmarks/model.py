"""Per-model benchmark: ResNet-50 training steps with every normalization, CPU/gloo.

A torchvision ResNet-50 (``weights=None``, float32, NCHW) takes forward + backward +
SGD steps (momentum 0.9) on ``--batch`` random images per rank (default 2, at
``--size`` = 224 px), on W gloo ranks with one thread each, for

* ``local``      — ``nn.BatchNorm2d`` on each rank's own 2 images (no communication),
* ``sync``       — ``distnorm.convert_model(mode="sync")``,
* ``cbn``, ``brn``, ``cmbn``, ``gn`` — the other distnorm variants with their
  defaults (CBN window 4; BRN r_max 3, d_max 5; CmBN 4 micro-batches per cycle,
  so a step here is one micro-batch and the cycle position advances every step;
  GN 32 groups, no communication),
* ``sync_eager`` — the same with distnorm's compiled kernels turned off
  (``DISTNORM_COMPILE=0``): what fusing the passes over the activation saves,
* ``fairscale``  — ``fairscale.experimental.nn.SyncBatchNorm.convert_sync_batchnorm``
  (if installed),
* ``torch_algo`` — torch's ``nn.SyncBatchNorm`` algorithm re-implemented for CPU
  (``benchmarks/torch_sync_bn.py``; every ``nn.BatchNorm2d`` swapped for it),

plus the **collective floor** of each method that communicates: the very
collectives one of its steps issued (recorded by intercepting
``torch.distributed`` during one steady-state step, as ``layer.py`` does), replayed
back to back with nothing else. The headline is ``(sync − local) / floor(sync)``:
the time distnorm adds to a training step, in units of the bare communication it
needs. Beside it, the *bound*: local BN's step plus sync's floor, a synced step whose
normalization cost what local BN's does and whose collectives cost no more than
alone; torch-algo / bound is the largest speed-up over torch's algorithm any
implementation of the one-all-reduce design could show on the machine at hand.
There is no DistributedDataParallel: the gradient all-reduce would be the
same for every method and is left out, so that the differences are the
normalization's.

All candidates run interleaved rep by rep (``_common.time_interleaved``, one round
per call so that the run can stop at a time budget); medians over reps of the
slowest rank per rep. The optimizer's ``zero_grad`` runs untimed
before each step.

Usage::

    python benchmarks/model.py                 # W = 2, 224 px, 30 reps or 7 min of timing
    python benchmarks/model.py --worlds 2 4    # also W = 4 (oversubscribes 2 cores)
    python benchmarks/model.py --quick         # W = 2, 32 px, 2 reps (smoke test)
    python benchmarks/model.py --profile       # torch.profiler: local, sync, torch-algo; W = 2
    python benchmarks/model.py --report results/model_cpu.json  # rebuild .md/.png, no run

Results: ``<out>/model_cpu.json``, ``<out>/model_cpu.md`` and ``<out>/model_cpu.png``
(``--out``, default ``./distnorm-bench-results``; ``--out benchmarks/results``
refreshes the committed results); ``--profile`` writes
``<out>/model_profile_cpu.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_OUT, OUT_HELP, Case, distnorm_provenance, machine_info, provenance_lines, run_ranks, summarize, time_interleaved
from layer import (
    FAIRSCALE_HINT,
    _fairscale_cls,
    _quiet,
    _replay,
    count_collectives,
    eager_kernels,
    fairscale_available,
)

METHODS = ["local", "sync", "sync_eager", "cbn", "brn", "cmbn", "gn", "fairscale", "torch_algo"]
LABELS = {"local": "local BN", "sync": "distnorm sync", "sync_eager": "sync, eager ops", "cbn": "CBN", "brn": "BRN",
          "cmbn": "CmBN", "gn": "GN", "fairscale": "fairscale", "torch_algo": "torch-algo"}
DISTNORM_MODES = ("sync", "cbn", "brn", "cmbn", "gn")
DEFAULT_SIZE, QUICK_SIZE = 224, 32
LR, MOMENTUM, NUM_CLASSES = 1e-3, 0.9, 1000


# -- models ------------------------------------------------------------------------------

def convert_torch_algo(module: Any) -> Any:
    """Swap every ``nn.BatchNorm2d`` of ``module`` for ``TorchSyncBatchNorm``, same state."""
    import torch
    from torch_sync_bn import TorchSyncBatchNorm

    if type(module) is torch.nn.BatchNorm2d:
        layer = TorchSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        layer.load_state_dict(module.state_dict())
        return layer.train(module.training)
    for name, child in list(module.named_children()):
        setattr(module, name, convert_torch_algo(child))
    return module


def build_model(name: str, seed: int = 0) -> Any:
    """ResNet-50 with method ``name``'s normalization; the same initial weights for every method."""
    import torch
    import torchvision

    import distnorm

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    if name == "local":
        pass
    elif name in DISTNORM_MODES:
        model = distnorm.convert_model(model, mode=name)
    elif name == "sync_eager":
        model = distnorm.convert_model(model, mode="sync")
    elif name == "fairscale":
        model = _fairscale_cls().convert_sync_batchnorm(model)
    elif name == "torch_algo":
        model = convert_torch_algo(model)
    else:
        raise ValueError(f"unknown method {name!r} (expected one of {METHODS})")
    return model.train()


def _count_norm_layers(model: Any) -> int:
    import torch

    return sum(1 for m in model.modules()
               if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)))


# -- the rank programs ---------------------------------------------------------------------

class _Trainer:
    """One method's model, optimizer and training step on this rank's fixed batch."""

    def __init__(self, name: str, x: Any, target: Any) -> None:
        import torch

        self.name = name
        self.model = build_model(name)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.x, self.target = x, target
        self.loss = float("nan")

    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, lap: Callable[[str], None], phase: list[str] | None = None) -> None:
        with eager_kernels(self.name == "sync_eager"):
            self._step(lap, phase)

    def _step(self, lap: Callable[[str], None], phase: list[str] | None = None) -> None:
        import torch.nn.functional as F

        loss = F.cross_entropy(self.model(self.x), self.target)
        lap("forward")
        if phase is not None:
            phase[0] = "backward"
        loss.backward()
        lap("backward")
        if phase is not None:
            phase[0] = "optimizer"
        self.opt.step()
        self.loss = float(loss.detach())

    def counted_step(self) -> list[dict[str, Any]]:
        """One step with every collective recorded (after a first, uncounted one)."""
        self.zero()
        self.step(lambda _: None)
        log: list[dict[str, Any]] = []
        phase = ["forward"]
        self.zero()
        with count_collectives(log, phase):
            self.step(lambda _: None, phase)
        return log


def _inputs(rank: int, batch: int, size: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, target


def _bench_rank(rank: int, world: int, methods: Sequence[str], batch: int, size: int,
                reps: int, warmup: int, budget_s: float, min_reps: int) -> dict[str, Any]:
    _quiet()

    x, target = _inputs(rank, batch, size)
    trainers = {name: _Trainer(name, x, target) for name in methods}
    collectives = {name: t.counted_step() for name, t in trainers.items()}
    layers = {name: _count_norm_layers(t.model) for name, t in trainers.items()}
    if rank == 0:
        print(f"  W={world}: models built, collectives counted; timing up to {reps} reps "
              f"(or {budget_s:.0f} s, at least {min_reps} reps)", file=sys.stderr, flush=True)

    cases = [Case(name, t.step, t.zero) for name, t in trainers.items()]
    cases += [Case(f"floor:{name}", _replay(collectives[name], world)) for name in methods if collectives[name]]
    samples = _time_within(cases, reps, warmup, budget_s, min_reps)
    return {"samples": samples, "collectives": collectives, "norm_layers": layers,
            "final_loss": {name: t.loss for name, t in trainers.items()}}


def _time_within(cases: Sequence[Case], reps: int, warmup: int, budget_s: float,
                 min_reps: int) -> dict[str, dict[str, list[float]]]:
    """``time_interleaved`` one round at a time, until ``reps`` or the time budget.

    Round k runs the cases in round k's order, as one ``time_interleaved`` call would; after
    each round the ranks agree (one all-reduce, untimed) whether ``budget_s`` seconds
    of timing have passed, and stop there once ``min_reps`` rounds are done. A
    shared machine's load decides how many reps fit; the JSON records how many ran.
    """
    import time

    import torch
    import torch.distributed as dist

    time_interleaved(cases, reps=0, warmup=warmup, barrier=dist.barrier)
    start = time.monotonic()
    merged: dict[str, dict[str, list[float]]] = {c.name: {} for c in cases}
    for k in range(reps):
        for name, laps in time_interleaved(cases, reps=1, warmup=0, barrier=dist.barrier,
                                           first_round=warmup + k).items():
            for lap, values in laps.items():
                merged[name].setdefault(lap, []).extend(values)
        over = torch.tensor([float(time.monotonic() - start > budget_s)])
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0 and (k + 1) % 5 == 0:
            print(f"    {k + 1} reps, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        if over.item() and k + 1 >= min_reps:
            break
    return merged


class _Phases:
    """``record_function`` ranges for the phases of a step, switched by ``lap``."""

    def __init__(self, record_function: Any) -> None:
        self.record_function = record_function
        self.current: Any = None

    def open(self, name: str) -> None:
        self.current = self.record_function(name)
        self.current.__enter__()

    def close(self) -> None:
        self.current.__exit__(None, None, None)
        self.current = None

    def lap(self, phase: str) -> None:
        self.close()
        self.open({"forward": "## backward", "backward": "## optimizer"}[phase])


def _profile_rank(rank: int, world: int, methods: Sequence[str], batch: int, size: int,
                  steps: int) -> dict[str, Any]:
    """torch.profiler over ``steps`` training steps of each method, interleaved step by step.

    Returns per method the per-op rows (calls, self and total ms per step) and the
    step's wall and process CPU time (medians over the profiled steps).
    """
    import time

    import torch.distributed as dist
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    _quiet()

    x, target = _inputs(rank, batch, size)
    trainers = {name: _Trainer(name, x, target) for name in methods}
    for trainer in trainers.values():
        for _ in range(2):
            trainer.zero()
            trainer.step(lambda _: None)
    rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in methods}
    clock: dict[str, dict[str, list[float]]] = {name: {"wall_ms": [], "cpu_ms": []} for name in methods}
    phases = _Phases(record_function)
    for i in range(steps):
        for name in list(methods[i % len(methods):]) + list(methods[:i % len(methods)]):
            trainer = trainers[name]
            trainer.zero()
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall, cpu = time.perf_counter(), time.process_time()
                phases.open("## forward")
                trainer.step(phases.lap)
                phases.close()
                clock[name]["wall_ms"].append((time.perf_counter() - wall) * 1e3)
                clock[name]["cpu_ms"].append((time.process_time() - cpu) * 1e3)
            for ev in prof.key_averages():
                row = rows[name].setdefault(ev.key, {"op": ev.key, "calls_per_step": 0.0,
                                                     "self_ms_per_step": 0.0, "total_ms_per_step": 0.0})
                row["calls_per_step"] += ev.count / steps
                row["self_ms_per_step"] += ev.self_cpu_time_total / 1e3 / steps
                row["total_ms_per_step"] += ev.cpu_time_total / 1e3 / steps
    return {name: {"ops": sorted(rows[name].values(), key=lambda r: -r["self_ms_per_step"]),
                   "wall_ms": statistics.median(clock[name]["wall_ms"]),
                   "cpu_ms": statistics.median(clock[name]["cpu_ms"])} for name in methods}


_CATEGORIES = [("collectives (c10d: transfer + waiting for the peer)", lambda op: op.startswith("c10d::")),
               ("convolutions (forward + backward)", lambda op: "conv" in op),
               ("batch-norm kernels and distnorm's autograd nodes",
                lambda op: "batch_norm" in op or "BatchNorm" in op),
               ("element-wise and reduction ops", lambda op: op.startswith("aten::") and any(
                   k in op for k in ("add", "sub", "mul", "div", "sum", "pow", "abs", "copy", "fill",
                                     "cat", "sqrt", "clamp", "threshold", "where", "neg", "mean")))]


def _category(op: str) -> str:
    return next((name for name, match in _CATEGORIES if match(op)), "other")


def profile_report(prof: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Step times, phase totals, time by kind of op, and the ops that differ most from local BN."""
    methods = list(prof)
    text = [(f"torch.profiler, CPU, W={meta['world']}, ResNet-50 training step (forward + backward + "
             f"SGD), {meta['batch']}×3×{meta['size']}×{meta['size']} per rank, one thread per rank, "
             f"rank 0, {meta['steps']} profiled steps per method after 2 warm-up steps, the methods "
             "interleaved step by step; ms per step. Profiler times are wall times: waiting for the "
             "peer inside a collective is the self time of the c10d op. '## x' rows are the phase "
             "totals. Load average after the run: "
             f"{', '.join(f'{v:.2f}' for v in meta['loadavg_at_end'])} on {meta['cpu_count']} cores "
             "(shared machine: compare within a run).")]
    text += ["", f"{'':56s}" + "".join(f"{LABELS[m]:>16s}" for m in methods)]
    for key, label in (("wall_ms", "step wall time (median, profiler on)"),
                       ("cpu_ms", "step CPU time of the process (median)")):
        text.append(f"{label:56s}" + "".join(f"{prof[m][key]:16.1f}" for m in methods))
    for ph in ("## forward", "## backward", "## optimizer"):
        vals = [next((r["total_ms_per_step"] for r in prof[m]["ops"] if r["op"] == ph), 0.0) for m in methods]
        text.append(f"{ph:56s}" + "".join(f"{v:16.1f}" for v in vals))
    text += ["", "Self time by kind of op, ms per step:"]
    for cat in [c for c, _ in _CATEGORIES] + ["other"]:
        vals = [sum(r["self_ms_per_step"] for r in prof[m]["ops"]
                    if not r["op"].startswith("## ") and _category(r["op"]) == cat) for m in methods]
        calls = [sum(r["calls_per_step"] for r in prof[m]["ops"]
                     if not r["op"].startswith("## ") and _category(r["op"]) == cat) for m in methods]
        text.append(f"  {cat[:54]:54s}" + "".join(f"{v:9.1f} ({c:4.0f})" for v, c in zip(vals, calls)))
    base = {r["op"]: r for r in prof["local"]["ops"]}
    for name in methods:
        if name == "local":
            continue
        rows = {r["op"]: r for r in prof[name]["ops"]}
        diffs = []
        for op in set(rows) | set(base):
            if op.startswith("## "):
                continue
            a = base.get(op, {"self_ms_per_step": 0.0, "calls_per_step": 0.0})
            b = rows.get(op, {"self_ms_per_step": 0.0, "calls_per_step": 0.0})
            diffs.append((b["self_ms_per_step"] - a["self_ms_per_step"], op, a, b))
        diffs.sort(key=lambda d: -abs(d[0]))
        total = sum(d[0] for d in diffs)
        text += ["", (f"=== {LABELS[name]} − local BN: self ms per step, the 20 largest differences "
                      f"(all ops together: {total:+.1f} ms) ==="),
                 f"{'op':48s} {'calls L':>8s} {'calls S':>8s} {'local ms':>9s} {'this ms':>9s} {'diff':>8s}"]
        for d, op, a, b in diffs[:20]:
            text.append(f"{op[:48]:48s} {a['calls_per_step']:8.0f} {b['calls_per_step']:8.0f} "
                        f"{a['self_ms_per_step']:9.2f} {b['self_ms_per_step']:9.2f} {d:+8.2f}")
        by_calls = sorted(diffs, key=lambda d: -(d[3]["calls_per_step"] - d[2]["calls_per_step"]))[:12]
        text += ["", f"--- {LABELS[name]} − local BN: the 12 largest increases in calls per step ---"]
        text += [f"{op[:48]:48s} {a['calls_per_step']:8.0f} {b['calls_per_step']:8.0f} "
                 f"{a['self_ms_per_step']:9.2f} {b['self_ms_per_step']:9.2f} {d:+8.2f}"
                 for d, op, a, b in by_calls]
    for name in methods:
        text += ["", f"=== {LABELS[name]}: top 15 ops by self time ===",
                 f"{'op':48s} {'calls':>7s} {'self ms':>9s} {'total ms':>9s}"]
        for r in [r for r in prof[name]["ops"] if not r["op"].startswith("## ")][:15]:
            text.append(f"{r['op'][:48]:48s} {r['calls_per_step']:7.0f} {r['self_ms_per_step']:9.2f} "
                        f"{r['total_ms_per_step']:9.2f}")
    return "\n".join(text) + "\n"


# -- reporting -------------------------------------------------------------------------------

def _worst_series(outputs: Sequence[dict[str, Any]], case: str, lap: str = "total") -> list[float]:
    """Per rep, the slowest rank's time (ms): what summarize() takes the median of."""
    return [max(v) * 1e3 for v in zip(*(o["samples"][case][lap] for o in outputs))]


def build_results(world: int, outputs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    stats = summarize([o["samples"] for o in outputs])
    first = outputs[0]
    row: dict[str, Any] = {"world": world, "reps": stats["local"]["total"]["reps"], "methods": {}, "ratios": {}}
    for name in methods:
        log = first["collectives"][name]
        by_phase = {ph: [op for op in log if op["phase"] == ph] for ph in ("forward", "backward", "optimizer")}
        entry: dict[str, Any] = {
            "step_ms": stats[name]["total"]["median_ms"],
            "step_iqr_ms": [stats[name]["total"]["q1_ms"], stats[name]["total"]["q3_ms"]],
            "step_ms_per_rep": _worst_series(outputs, name),
            "fwd_ms": stats[name]["forward"]["median_ms"],
            "fwd_bwd_ms": stats[name]["backward"]["median_ms"],
            "cpu_ms": stats[name]["cpu"]["median_ms"],
            "norm_layers": first["norm_layers"][name],
            "collectives_per_step": {ph: len(ops) for ph, ops in by_phase.items()},
            "bytes_per_step": {ph: sum(op["bytes"] for op in ops) for ph, ops in by_phase.items()},
            "final_loss": [o["final_loss"][name] for o in outputs],
            "floor": None,
        }
        floor = stats.get(f"floor:{name}")
        if floor is not None:
            entry["floor"] = {"step_ms": floor["total"]["median_ms"], "fwd_ms": floor["forward"]["median_ms"],
                              "cpu_ms": floor["cpu"]["median_ms"],
                              "step_ms_per_rep": _worst_series(outputs, f"floor:{name}")}
        row["methods"][name] = entry
    local = row["methods"]["local"]
    for name, entry in row["methods"].items():
        entry["vs_local"] = entry["step_ms"] / local["step_ms"]
        entry["overhead_ms"] = entry["step_ms"] - local["step_ms"]
        entry["overhead_over_floor"] = (entry["overhead_ms"] / entry["floor"]["step_ms"]
                                        if entry["floor"] else None)
    sync = row["methods"]["sync"]
    ratios = row["ratios"]
    ratios["(sync-local)/floor"] = sync["overhead_over_floor"]
    # The same from per-rep differences (the candidates are interleaved, so rep i of
    # sync and of local ran side by side): less sensitive to drift across the run.
    paired = [s - l for s, l in zip(_worst_series(outputs, "sync"), _worst_series(outputs, "local"))]
    ratios["(sync-local)/floor paired"] = statistics.median(paired) / sync["floor"]["step_ms"]
    ratios.update(bound_ratios(row))
    for other in ("local", "torch_algo", "fairscale"):
        if other in row["methods"]:
            ratios[f"sync/{other}"] = sync["step_ms"] / row["methods"][other]["step_ms"]
            ratios[f"cpu sync/{other}"] = sync["cpu_ms"] / row["methods"][other]["cpu_ms"]
    # The normalization's own share: the overhead over local BN of each synced method.
    for other in ("torch_algo", "fairscale"):
        if other in row["methods"] and row["methods"][other]["overhead_ms"] > 0:
            ratios[f"overhead sync/{other}"] = sync["overhead_ms"] / row["methods"][other]["overhead_ms"]
    row["collectives"] = {name: first["collectives"][name] for name in methods}
    return row


def bound_ms(row: dict[str, Any]) -> float:
    """The bound: local BN's step plus sync's floor, ms.

    What a synced step would take if its normalization computed as fast as local BN
    and its collectives cost no more than alone, back to back; so torch-algo / bound
    is the largest speed-up over torch's algorithm any implementation of the
    one-all-reduce design could show on the machine at hand.
    """
    return row["methods"]["local"]["step_ms"] + row["methods"]["sync"]["floor"]["step_ms"]


def bound_ratios(row: dict[str, Any]) -> dict[str, float]:
    """Each synced method's step over :func:`bound_ms`."""
    methods = row["methods"]
    return {f"{name}/bound": methods[name]["step_ms"] / bound_ms(row)
            for name in ("sync", "torch_algo", "fairscale") if name in methods}


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n else "0"


def markdown(results: Sequence[dict[str, Any]], methods: Sequence[str], meta: dict[str, Any]) -> str:
    load = f"load average (1, 5, 15 min) at start {', '.join(f'{v:.2f}' for v in meta['loadavg_at_start'])}"
    if "loadavg_at_end" in meta:
        load += f", at end {', '.join(f'{v:.2f}' for v in meta['loadavg_at_end'])}"
    size = meta["size"]
    lines = [
        "# Per-model benchmark, CPU / gloo",
        "",
        (f"torch {meta['torch']}, torchvision {meta['torchvision']}, Python {meta['python']}, "
         f"{meta['cpu_count']} CPU cores, {load}; {meta['date']}; wall time of the run "
         f"{meta.get('wall_s', 0):.0f} s. The machine is shared: absolute times drift, "
         "compare within a table."),
        (f"ResNet-50 (torchvision, weights=None), one training step = forward + backward + SGD "
         f"(momentum {MOMENTUM}) on {meta['batch']}×3×{size}×{size} random images per rank, float32, "
         f"one thread per rank, no DDP (the gradient all-reduce is the same for every method). "
         f"{', '.join(f'{n} (W = {w})' for w, n in meta['reps'].items())} interleaved reps after "
         f"{meta['warmup']} warm-up round(s); median of the "
         "slowest rank per rep (ms), IQR in brackets. floor = the collectives the method issued in "
         "one step, alone, back to back. CmBN: 4 micro-batches per cycle, a step is one micro-batch; "
         "GN: 32 groups; CBN: window 4; BRN: r_max 3, d_max 5."),
    ]
    lines += provenance_lines(meta, results)
    if "fairscale" not in methods:
        lines.append(f"_{FAIRSCALE_HINT}_")
    lines += ["", "Headline (time ratios of a whole training step; < 1: distnorm sync faster):", ""]
    for r in results:
        q = r["ratios"]
        parts = [(f"(sync − local) / floor = **{q['(sync-local)/floor']:.2f}** "
                  f"(paired per rep: {q['(sync-local)/floor paired']:.2f}; goal ≤ 1.2)")]
        sync, local = r["methods"]["sync"], r["methods"]["local"]
        parts.append(f"sync adds {sync['overhead_ms']:.0f} ms per step to local BN "
                     f"({sync['cpu_ms'] - local['cpu_ms']:.0f} ms of CPU time); its collectives alone "
                     f"take {sync['floor']['step_ms']:.0f} ms")
        for other in ("torch_algo", "fairscale"):
            if f"sync/{other}" in q:
                parts.append(f"sync / {LABELS[other]} = **{q[f'sync/{other}']:.3f}** "
                             f"(CPU time {q[f'cpu sync/{other}']:.3f})")
        bound = bound_ratios(r)  # computed here too: reports rebuilt from older results
        parts.append(f"bound = local BN + sync's floor = {bound_ms(r):.0f} ms: sync / bound = "
                     f"{bound['sync/bound']:.2f}" + (f", {LABELS['torch_algo']} / bound = "
                                                     f"{bound['torch_algo/bound']:.2f} (the largest "
                                                     "speed-up over it any one-all-reduce layer could "
                                                     "show here)" if "torch_algo/bound" in bound else ""))
        lines.append(f"- W = {r['world']}: " + "; ".join(parts))
    for r in results:
        head = ["method", "step ms [IQR]", "forward ms", "fwd+bwd ms", "CPU ms", "/ local",
                "collectives fwd / bwd", "bytes per rank fwd / bwd", "floor ms", "(− local) / floor"]
        lines += ["", f"## W = {r['world']}: one training step, ms", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in methods:
            e = r["methods"][name]
            n, b = e["collectives_per_step"], e["bytes_per_step"]
            comm = f"{n['forward']} / {n['backward']}" if n["forward"] + n["backward"] else "—"
            if n["optimizer"]:
                comm += f" (+{n['optimizer']} in SGD)"
            cells = [LABELS[name], f"{e['step_ms']:.0f} [{e['step_iqr_ms'][0]:.0f}–{e['step_iqr_ms'][1]:.0f}]",
                     f"{e['fwd_ms']:.0f}", f"{e['fwd_bwd_ms']:.0f}", f"{e['cpu_ms']:.0f}", f"{e['vs_local']:.3f}",
                     comm, f"{_fmt_bytes(b['forward'])} / {_fmt_bytes(b['backward'])}" if comm != "—" else "—",
                     f"{e['floor']['step_ms']:.1f}" if e["floor"] else "—",
                     f"{e['overhead_over_floor']:.2f}" if e["overhead_over_floor"] is not None else "—"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], methods: Sequence[str], meta: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 4.6), squeeze=False)
    colors = {"local": "#9e9e9e", "sync": "#1f77b4", "cbn": "#6baed6", "brn": "#9ecae1", "cmbn": "#c6dbef",
              "gn": "#bdbdbd", "fairscale": "#ff7f0e", "torch_algo": "#d62728"}
    for ax, r in zip(axes[0], results):
        ms = [r["methods"][n]["step_ms"] for n in methods]
        lo = [m - r["methods"][n]["step_iqr_ms"][0] for m, n in zip(ms, methods)]
        hi = [r["methods"][n]["step_iqr_ms"][1] - m for m, n in zip(ms, methods)]
        bars = ax.bar(range(len(methods)), ms, yerr=[lo, hi], capsize=3,
                      color=[colors.get(n, "#777777") for n in methods])
        for bar, value, top in zip(bars, ms, hi):
            ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value + top), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 4), textcoords="offset points")
        floor = r["methods"]["sync"]["floor"]["step_ms"]
        ax.axhline(bound_ms(r), color="#1f77b4", ls="--", lw=1,
                   label=f"local BN + sync's collective floor ({floor:.0f} ms)")
        ax.set_xticks(range(len(methods)), [LABELS[n] for n in methods], rotation=30, ha="right")
        ax.set_ylabel("ms per training step (median, IQR)")
        over = " (oversubscribed)" if r["world"] > (meta["cpu_count"] or 0) else ""
        ax.set_title(f"ResNet-50 step, W = {r['world']}{over}, {meta['batch']}×{meta['size']}² per rank")
        ax.set_ylim(0, max(m + h for m, h in zip(ms, hi)) * 1.12)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"CPU / gloo, one thread per rank, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"W=2, {QUICK_SIZE} px, 2 reps (smoke test)")
    parser.add_argument("--profile", action="store_true",
                        help="only the torch.profiler run (local BN, sync, torch-algo)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=OUT_HELP)
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default 2)")
    parser.add_argument("--size", type=int, default=None, help=f"image side in px (default {DEFAULT_SIZE})")
    parser.add_argument("--batch", type=int, default=2, help="images per rank (default 2)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="subset of methods (local and sync are always included)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps at most (default 30; quick 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="stop timing after this many seconds per W, once --min-reps are done "
                             "(default 420; quick: none)")
    parser.add_argument("--min-reps", type=int, default=None, help="timed reps at least (default 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1; quick 0: every model already took 2 steps)")
    parser.add_argument("--report", metavar="JSON", default=None,
                        help="no run: rebuild model_cpu.md and model_cpu.png in --out from a saved "
                             "model_cpu.json (after a change to the report)")
    args = parser.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        report = markdown(saved["results"], saved["meta"]["methods"], saved["meta"])
        print(report)
        with open(os.path.join(args.out, "model_cpu.md"), "w") as f:
            f.write(report)
        plot(saved["results"], saved["meta"]["methods"], saved["meta"], os.path.join(args.out, "model_cpu.png"))
        return 0

    methods = [m for m in METHODS if args.methods is None or m in args.methods or m in ("local", "sync")]
    if "fairscale" in methods and not fairscale_available():
        print(FAIRSCALE_HINT, file=sys.stderr)
        methods.remove("fairscale")
    size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    import torchvision

    base_meta = dict(machine_info(), torchvision=torchvision.__version__, **distnorm_provenance())

    if args.profile:
        steps = 6
        prof = run_ranks(_profile_rank, 2, ["local", "sync", "torch_algo"], args.batch, size, steps)[0]
        meta = dict(base_meta, world=2, batch=args.batch, size=size, steps=steps,
                    loadavg_at_end=list(os.getloadavg()))
        report = profile_report(prof, meta)
        print(report)
        with open(os.path.join(args.out, "model_profile_cpu.txt"), "w") as f:
            f.write(report)
        return 0

    worlds = args.worlds or [2]
    reps = args.reps or (2 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    budget = args.budget if args.budget is not None else (None if args.quick else 420.0)
    min_reps = min(reps, args.min_reps if args.min_reps is not None else 8)
    meta = dict(base_meta, max_reps=reps, min_reps=min_reps, budget_s=budget, warmup=warmup,
                worlds=worlds, quick=args.quick, size=size,
                batch=args.batch, methods=methods, threads_per_rank=1, backend="gloo", dtype="float32",
                model="torchvision resnet50, weights=None", optimizer=f"SGD lr={LR} momentum={MOMENTUM}")
    results = []
    for world in worlds:
        print(f"W={world}: spawning ranks ({len(methods)} models each, {size} px)", file=sys.stderr, flush=True)
        outputs = run_ranks(_bench_rank, world, methods, args.batch, size, reps, warmup,
                            float("inf") if budget is None else budget, min_reps)
        results.append(build_results(world, outputs, methods))
    meta["reps"] = {r["world"]: r["reps"] for r in results}

    meta["loadavg_at_end"] = list(os.getloadavg())
    meta["wall_s"] = time.monotonic() - started
    md = markdown(results, methods, meta)
    print(md)
    with open(os.path.join(args.out, "model_cpu.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "model_cpu.md"), "w") as f:
        f.write(md)
    plot(results, methods, meta, os.path.join(args.out, "model_cpu.png"))
    print(f"saved {os.path.join(args.out, 'model_cpu.json')}, model_cpu.md and model_cpu.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
