"""Per-layer benchmark: synced batch norm implementations side by side on CPU/gloo.

For ResNet-50 layer shapes and W gloo ranks (one thread each), times forward and
forward+backward of one layer for

* ``local``      — ``torch.nn.BatchNorm2d`` on the local slice (no communication),
* ``distnorm``   — ``distnorm.SyncBatchNorm``,
* ``distnorm_eager`` — the same with its compiled kernels off (``DISTNORM_COMPILE=0``),
* ``distnorm_bare`` — the same with its collectives bare ``dist.all_reduce`` calls (no
  header, guard or non-finite flag: what the fault checks cost),
* ``distnorm_local`` — the same with every collective skipped: distnorm's local math
  alone (its outputs are then local BN's; timed, not checked),
* ``brn``, ``cmbn`` — distnorm's synced BatchRenorm and CmBN (a call is one
  micro-batch of a 4-step cycle); CBN is timed per model step (``model.py``) only,
  since its compensation needs the producing layer,
* ``fairscale``  — ``fairscale.experimental.nn.SyncBatchNorm`` (if installed),
* ``torch_algo`` — torch's ``nn.SyncBatchNorm`` algorithm re-implemented for CPU
  (``benchmarks/torch_sync_bn.py``; torch's own class refuses CPU), with the same
  native local-statistics kernel as ``nn.BatchNorm2d``,
* ``torch_algo_var_mean`` — the same with ``torch.var_mean`` for the local statistics
  (shown for reference: on CPU ``var_mean`` is a Welford loop several times slower
  than the native batch-norm kernel, so a baseline built on it would measure that
  kernel rather than torch's algorithm; ratios use ``torch_algo``),

plus the *collective floor* of each synced implementation: the very collectives it
issued (recorded from one real step), replayed back to back with nothing else. Local
BN plus distnorm's floor is the *bound*: what a synced layer computing as fast as
local BN and communicating as fast as the bare collectives would cost, so
torch-algo / bound is the largest speed-up over torch's algorithm that any
implementation could show on the machine at hand. All
candidates of a shape run interleaved rep by rep (``_common.time_interleaved``);
medians of the slowest rank per rep. Bytes per rank are counted by intercepting
``torch.distributed.all_reduce`` / ``all_gather`` during one step: the size of each
collective's result buffer (all-reduce: the buffer; all-gather: W times the input).

Usage::

    python benchmarks/layer.py            # W = 2 and 4, 7 shapes (~4 min on 2 cores)
    python benchmarks/layer.py --quick    # W = 2, one shape, few reps (smoke test)
    python benchmarks/layer.py --check    # torch_algo (and others) vs nn.BatchNorm2d on
                                          # the concatenated batch, W = 2, float64
    python benchmarks/layer.py --profile  # torch.profiler per op, (2, 256, 56, 56), W = 2

Results: ``<out>/layer_cpu.json`` and ``<out>/layer_cpu.md`` (``--out``, default
``./distnorm-bench-results``; ``--out benchmarks/results``
refreshes the committed results); ``--profile`` writes ``<out>/layer_profile_cpu.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (DEFAULT_OUT, OUT_HELP, Case, distnorm_provenance, machine_info, provenance_lines, run_ranks, summarize,  # noqa: F401
                     time_interleaved)

Shape = tuple[int, int, int, int]

SHAPES: list[Shape] = [(2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28), (2, 1024, 14, 14),
                       (2, 2048, 7, 7), (1, 256, 56, 56), (4, 64, 56, 56)]
QUICK_SHAPES: list[Shape] = [(2, 256, 28, 28)]
PROFILE_SHAPE: Shape = (2, 256, 56, 56)

IMPLS = ["local", "distnorm", "distnorm_eager", "distnorm_bare", "distnorm_local", "brn", "cmbn",
         "fairscale", "torch_algo", "torch_algo_var_mean"]
# Variants whose training output is not BatchNorm's (no correctness check against it).
NOT_BATCH_NORM = ("brn", "cmbn", "distnorm_local")
# distnorm's layer run in a modified mode (see ``distnorm_mode``).
DISTNORM_MODES = {"distnorm_eager": "eager", "distnorm_bare": "bare", "distnorm_local": "local"}
LABELS = {"local": "local BN", "distnorm": "distnorm", "distnorm_eager": "distnorm, eager ops",
          "distnorm_bare": "distnorm, bare all-reduce", "distnorm_local": "distnorm, no collectives",
          "brn": "distnorm BRN", "cmbn": "distnorm CmBN",
          "fairscale": "fairscale",
          "torch_algo": "torch-algo", "torch_algo_var_mean": "torch-algo (var_mean)"}
FAIRSCALE_HINT = ("fairscale is not installed: its column is skipped. "
                  "Install it with `pip install fairscale` (or `pip install -e .[bench]`).")


# -- implementations --------------------------------------------------------------------

def fairscale_available() -> bool:
    try:
        _fairscale_cls()
    except Exception as exc:  # noqa: BLE001 - missing, or broken against this torch
        if not isinstance(exc, ImportError):
            print(f"fairscale does not import here ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False
    return True


def _fairscale_cls() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fairscale.experimental.nn import SyncBatchNorm  # lazy: optional dependency
    return SyncBatchNorm


def make_layer(name: str, channels: int, dtype: Any = None, group: Any = None) -> Any:
    """A fresh layer of implementation ``name`` (distnorm's over ``group``, default the
    world)."""
    import torch
    from torch_sync_bn import TorchSyncBatchNorm

    import distnorm

    if name == "local":
        layer = torch.nn.BatchNorm2d(channels)
    elif name == "distnorm" or name in DISTNORM_MODES:
        layer = distnorm.SyncBatchNorm(channels, process_group=group)
    elif name == "brn":  # renormalizing from the first step: the r/d path is timed
        layer = distnorm.BatchRenorm(channels, process_group=group)
    elif name == "cmbn":  # one call = one micro-batch of a 4-step cycle
        layer = distnorm.CrossMiniBatchNorm(channels, accumulation_steps=4, process_group=group)
    elif name == "fairscale":
        layer = _fairscale_cls()(channels)
    elif name == "torch_algo":
        layer = TorchSyncBatchNorm(channels, stats="native")
    elif name == "torch_algo_var_mean":
        layer = TorchSyncBatchNorm(channels, stats="var_mean")
    else:
        raise ValueError(f"unknown implementation {name!r} (expected one of {IMPLS})")
    return layer.to(dtype) if dtype is not None else layer


def expected_bytes(name: str, channels: int, world: int) -> dict[str, int] | None:
    """Bytes per rank per step from each implementation's code (float32 activations)."""
    from torch_sync_bn import torch_algo_bytes

    if name in ("local", "distnorm_local"):
        return {"forward": 0, "backward": 0}
    if name == "distnorm_bare":  # the payloads alone; backward's in the activations' float32
        return {"forward": (2 * channels + 1) * 8, "backward": 2 * channels * 4}
    if name in ("distnorm", "distnorm_eager", "brn", "cmbn"):
        # float64 all-reduces of the group's packet size: the widest payload seen on
        # the group — [m, Σx (C), Σx² (C)] forward, [Σg (C), Σg·x̂ (C)] backward, or a
        # header's W rows — plus the guard's tail (distnorm.distributed.collectives).
        # The benchmark gives each shape a group of its own: its forward payload sets it.
        from distnorm.distributed._guard import _ROW, _TAIL

        packet = (max(2 * channels + 1, world * _ROW) + _TAIL) * 8
        return {"forward": packet, "backward": packet}
    if name == "fairscale":  # all-reduce count (1), all-reduce [mean, E[x²]] (2C); backward 2C
        return {"forward": (1 + 2 * channels) * 4, "backward": 2 * channels * 4}
    if name.startswith("torch_algo"):
        return torch_algo_bytes(channels, world)
    return None


# -- counting collectives -----------------------------------------------------------------

@contextlib.contextmanager
def count_collectives(log: list[dict[str, Any]], phase: list[str]) -> Iterator[None]:
    """Record every ``all_reduce`` / ``all_gather`` issued inside, with ``phase[0]``."""
    import torch.distributed as dist

    originals = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather,
                 "all_gather_into_tensor": dist.all_gather_into_tensor}

    def all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        log.append({"op": "all_reduce", "phase": phase[0], "dtype": str(tensor.dtype).replace("torch.", ""),
                    "numel": tensor.numel(), "bytes": tensor.numel() * tensor.element_size()})
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_gather(tensor_list: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        log.append({"op": "all_gather", "phase": phase[0], "dtype": str(tensor.dtype).replace("torch.", ""),
                    "numel": tensor.numel(), "bytes": len(tensor_list) * tensor.numel() * tensor.element_size()})
        return originals["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_gather_into_tensor(output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        log.append({"op": "all_gather_into_tensor", "phase": phase[0],
                    "dtype": str(input.dtype).replace("torch.", ""), "numel": input.numel(),
                    "bytes": output.numel() * output.element_size()})
        return originals["all_gather_into_tensor"](output, input, *args, **kwargs)

    dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor = (  # type: ignore[assignment]
        all_reduce, all_gather, all_gather_into_tensor)
    try:
        yield
    finally:
        dist.all_reduce = originals["all_reduce"]  # type: ignore[assignment]
        dist.all_gather = originals["all_gather"]  # type: ignore[assignment]
        dist.all_gather_into_tensor = originals["all_gather_into_tensor"]  # type: ignore[assignment]


def _replay(ops: Sequence[dict[str, Any]], world: int) -> Callable[[Callable[[str], None]], None]:
    """A step issuing exactly ``ops`` (zero buffers, same dtypes and sizes), back to back."""
    import torch
    import torch.distributed as dist

    bufs = []
    for op in ops:
        t = torch.zeros(op["numel"], dtype=getattr(torch, op["dtype"]))
        outs = [torch.empty_like(t) for _ in range(world)] if op["op"] != "all_reduce" else None
        bufs.append((op, t, outs))

    def step(lap: Callable[[str], None]) -> None:
        backward_started = False
        for op, t, outs in bufs:
            if op["phase"] == "backward" and not backward_started:
                lap("forward")
                backward_started = True
            if outs is None:
                dist.all_reduce(t)
            else:
                dist.all_gather(outs, t)
        if not backward_started:
            lap("forward")
    return step


# -- the rank programs ----------------------------------------------------------------------

def _quiet() -> None:
    """Silence the deprecation chatter of fairscale / TorchScript in the ranks' output."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _zero_grads(layer: Any, x: Any) -> Callable[[], None]:
    def setup() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return setup


@contextlib.contextmanager
def eager_kernels(active: bool = True) -> Iterator[None]:
    """Turn distnorm's compiled kernels off while active (``DISTNORM_COMPILE=0``)."""
    from distnorm.kernels import COMPILE_ENV

    saved = os.environ.get(COMPILE_ENV)
    if active:
        os.environ[COMPILE_ENV] = "0"
    try:
        yield
    finally:
        if active:
            if saved is None:
                os.environ.pop(COMPILE_ENV, None)
            else:
                os.environ[COMPILE_ENV] = saved


@contextlib.contextmanager
def distnorm_mode(mode: str | None) -> Iterator[None]:
    """Run distnorm's layers in a modified mode while active, for the breakdown.

    ``"eager"``: compiled kernels off. ``"bare"``: every checked collective becomes a
    bare ``dist.all_reduce`` of the payload. ``"local"``: every checked collective is
    skipped (the buffer comes back as it went in), leaving distnorm's local math.
    """
    from distnorm.distributed import collectives

    if mode in (None, "eager"):
        with eager_kernels(mode == "eager"):
            yield
        return
    import torch.distributed as dist

    def bare(buffer: Any, group: Any, *args: Any, **kwargs: Any) -> Any:
        dist.all_reduce(buffer, group=group)
        return buffer

    def skip(buffer: Any, *args: Any, **kwargs: Any) -> Any:
        return buffer

    original = collectives._guarded_all_reduce
    collectives._guarded_all_reduce = {"bare": bare, "local": skip}[mode]  # type: ignore[assignment]
    try:
        yield
    finally:
        collectives._guarded_all_reduce = original  # type: ignore[assignment]


def _train_step(layer: Any, x: Any, dy: Any, mode: str | None = None) -> Callable[[Callable[[str], None]], None]:
    def step(lap: Callable[[str], None]) -> None:
        with distnorm_mode(mode):
            y = layer(x)
            lap("forward")
            y.backward(dy)
    return step


def _bench_rank(rank: int, world: int, shapes: Sequence[Shape], impls: Sequence[str], reps: int,
                warmup: int, check: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    _quiet()

    out: dict[str, Any] = {"check": _check_rank(rank, world, impls) if check else None, "shapes": []}
    for shape in shapes:
        channels = shape[1]
        gen = torch.Generator().manual_seed(7919 * rank + channels)
        x = torch.randn(shape, generator=gen).requires_grad_()
        dy = torch.randn(shape, generator=gen)
        # A group of its own per shape: distnorm pads every packet on a group to the
        # group's widest layer, and this measures each layer as the only one there.
        group = dist.new_group(list(range(world)))
        layers = {name: make_layer(name, channels, group=group) for name in impls}

        zero = functools.partial(_zero_grads, x=x)
        train_step = functools.partial(_train_step, x=x, dy=dy)

        # One counted step per implementation, after a first one (distnorm exchanges a
        # one-time header on a layer's first call): steady-state bytes, and the
        # collectives to replay as the floor.
        collectives: dict[str, list[dict[str, Any]]] = {}
        for name, layer in layers.items():
            with distnorm_mode(DISTNORM_MODES.get(name)):
                zero(layer)()
                layer(x).backward(dy)
                log: list[dict[str, Any]] = []
                phase = ["forward"]
                zero(layer)()
                with count_collectives(log, phase):
                    y = layer(x)
                    phase[0] = "backward"
                    y.backward(dy)
            collectives[name] = log

        cases = [Case(name, train_step(layer, mode=DISTNORM_MODES.get(name)), zero(layer))
                 for name, layer in layers.items()]
        cases += [Case(f"floor:{name}", _replay(collectives[name], world))
                  for name in layers if collectives[name]]
        samples = time_interleaved(cases, reps=reps, warmup=warmup, barrier=dist.barrier)
        out["shapes"].append({"shape": list(shape), "samples": samples, "collectives": collectives})
        if rank == 0:
            print(f"  W={world} {tuple(shape)} done", file=sys.stderr, flush=True)
    return out


def _check_rank(rank: int, world: int, impls: Sequence[str]) -> dict[str, Any]:
    """Each synced implementation against ``nn.BatchNorm2d`` on the concatenated batch.

    float64, 3 training steps with fresh data (running statistics compounding), shard
    sizes uneven and with an empty rank; the loss is Σ y·g over the global batch, so
    parameter gradients summed over ranks must equal the reference's.
    Returns ``{case: {impl: {quantity: max relative error}}}`` (``"error"`` if it raised).
    """
    import torch.distributed as dist
    _quiet()

    channels, hw = 5, (4, 3)
    cases = {"uneven": [3, 1, 2, 2][:world], "empty_rank": [0, 2, 3, 1][:world]}
    report: dict[str, Any] = {}
    for case, sizes in cases.items():
        report[case] = {}
        for name in impls:
            if name == "local" or name in NOT_BATCH_NORM:
                continue
            try:
                with distnorm_mode(DISTNORM_MODES.get(name)):
                    report[case][name] = _check_one(name, rank, world, sizes, channels, hw)
            except Exception as exc:  # noqa: BLE001 - reported, judged by the caller
                report[case][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                # A raising rank may leave the others inside a collective: resync.
                dist.barrier()
    return report


def _check_one(name: str, rank: int, world: int, sizes: Sequence[int], channels: int,
               hw: tuple[int, int]) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    def rel(a: Any, b: Any) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0

    gen = torch.Generator().manual_seed(1234)
    layer = make_layer(name, channels, torch.float64)
    ref = torch.nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        w = torch.randn(channels, generator=gen, dtype=torch.float64)
        b = torch.randn(channels, generator=gen, dtype=torch.float64)
        for m in (layer, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    start = sum(sizes[:rank])
    errors: dict[str, float] = {}
    for _ in range(3):
        full = 3.0 + 2.0 * torch.randn(sum(sizes), channels, *hw, generator=gen, dtype=torch.float64)
        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
        xr = full.clone().requires_grad_()
        yr = ref(xr)
        (yr * grad).sum().backward()
        x = full[start:start + sizes[rank]].clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        y = layer(x)
        (y * grad[start:start + sizes[rank]]).sum().backward()
        gx = x.grad if x.grad is not None else torch.zeros_like(x)
        gw = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(w)
        gb = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(b)
        gwb = torch.cat([gw, gb]).detach().clone()
        dist.all_reduce(gwb)
        got = {"output": (y.detach(), yr.detach()[start:start + sizes[rank]]),
               "grad_input": (gx, xr.grad[start:start + sizes[rank]]),
               "grad_weight_bias": (gwb, torch.cat([ref.weight.grad, ref.bias.grad])),
               "running_mean": (layer.running_mean, ref.running_mean),
               "running_var": (layer.running_var, ref.running_var)}
        ref.zero_grad(set_to_none=True)
        for key, (a, r) in got.items():
            err = rel(a, r)
            errors[key] = max(errors.get(key, 0.0), float("inf") if math.isnan(err) else err)
    # The worst over ranks.
    vals = torch.tensor(list(errors.values()), dtype=torch.float64).nan_to_num(nan=float("inf"), posinf=float("inf"))
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist()))


def _profile_rank(rank: int, world: int, shape: Shape, impls: Sequence[str], steps: int) -> dict[str, Any]:
    """torch.profiler over ``steps`` forward+backward steps of each implementation.

    Per op: calls and self/total CPU ms per step, and whether it reads or writes an
    activation-sized tensor (a pass over the activation).
    """
    import torch
    import torch.distributed as dist
    _quiet()
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    channels = shape[1]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(shape, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)
    out: dict[str, Any] = {}
    for name in impls:
        layer = make_layer(name, channels)
        for _ in range(5):
            x.grad = None
            layer(x).backward(dy)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True):
            # Warm-up under the profiler too: an active profiler can make compiled
            # code (distnorm's kernels) recompile once, which is not the layer's cost.
            x.grad = None
            layer(x).backward(dy)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with record_function("## forward"):
                    y = layer(x)
                with record_function("## backward"):
                    y.backward(dy)
        rows: dict[str, dict[str, Any]] = {}
        for ev in prof.key_averages(group_by_input_shape=True):
            shapes = [list(s) for s in (ev.input_shapes or []) if s]
            big = sum(1 for s in shapes if s == list(shape))
            row = rows.setdefault(ev.key, {"op": ev.key, "calls_per_step": 0.0, "self_ms_per_step": 0.0,
                                           "total_ms_per_step": 0.0, "activation_calls_per_step": 0.0})
            row["calls_per_step"] += ev.count / steps
            row["self_ms_per_step"] += ev.self_cpu_time_total / 1e3 / steps
            row["total_ms_per_step"] += ev.cpu_time_total / 1e3 / steps
            if big:
                row["activation_calls_per_step"] += ev.count / steps
        out[name] = sorted(rows.values(), key=lambda r: -r["self_ms_per_step"])
    return out


def profile_report(prof: dict[str, list[dict[str, Any]]], shape: Shape, steps: int) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = [(f"torch.profiler, CPU, W=2, shape {shape} per rank (float32, NCHW), rank 0, {steps} steps "
             "of forward+backward, times per step. 'act' = calls per step with an activation-sized "
             "argument (a pass over the activation); '## forward' / '## backward' are the phase totals; "
             "waiting for the peers in a collective shows up in the c10d op or in the self time of "
             f"the enclosing phase / autograd node. Load average after the run: {load} on "
             f"{os.cpu_count()} cores (shared machine: absolute times drift, compare within a run). "
             "The profiler itself slows some ops: with record_shapes the eval-mode native kernel "
             "runs ~4× slower, and compiled regions (distnorm's kernels) ~2.4× slower, measured "
             "alone; read costs from the timing tables (layer_cpu.md), calls and passes from here.")]
    for name, rows in prof.items():
        text += ["", f"=== {LABELS[name]} ===",
                 f"{'op':52s} {'calls':>6s} {'act':>4s} {'self ms':>9s} {'total ms':>9s}"]
        phases = [r for r in rows if r["op"].startswith("## ")]
        for r in phases + [r for r in rows if not r["op"].startswith("## ")][:22]:
            text.append(f"{r['op'][:52]:52s} {r['calls_per_step']:6.1f} {r['activation_calls_per_step']:4.0f} "
                        f"{r['self_ms_per_step']:9.3f} {r['total_ms_per_step']:9.3f}")
    return "\n".join(text) + "\n"


# -- reporting -------------------------------------------------------------------------------

def _fmt_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def build_results(world: int, rank_outputs: Sequence[dict[str, Any]], impls: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for i, entry in enumerate(rank_outputs[0]["shapes"]):
        shape = entry["shape"]
        channels = shape[1]
        stats = summarize([r["shapes"][i]["samples"] for r in rank_outputs])
        row: dict[str, Any] = {"world": world, "shape": shape, "impls": {}, "floors": {}}
        for name in impls:
            log = entry["collectives"][name]
            counted = {ph: sum(op["bytes"] for op in log if op["phase"] == ph) for ph in ("forward", "backward")}
            row["impls"][name] = {
                "fwd_bwd_ms": stats[name]["total"]["median_ms"],
                "fwd_bwd_iqr_ms": [stats[name]["total"]["q1_ms"], stats[name]["total"]["q3_ms"]],
                "fwd_ms": stats[name]["forward"]["median_ms"],
                "cpu_ms": stats[name]["cpu"]["median_ms"],
                "bytes": counted,
                "bytes_expected": expected_bytes(name, channels, world),
                "collectives": log,
            }
            floor = stats.get(f"floor:{name}")
            if floor is not None:
                row["floors"][name] = {"fwd_bwd_ms": floor["total"]["median_ms"],
                                       "fwd_ms": floor["forward"]["median_ms"],
                                       "cpu_ms": floor["cpu"]["median_ms"]}
        ms = {n: row["impls"][n]["fwd_bwd_ms"] for n in impls}
        fwd = {n: row["impls"][n]["fwd_ms"] for n in impls}
        cpu = {n: row["impls"][n]["cpu_ms"] for n in impls}
        ratios: dict[str, float] = {}
        for other in ("local", "distnorm_eager", "fairscale", "torch_algo", "torch_algo_var_mean"):
            if other in ms:
                ratios[f"distnorm/{other}"] = ms["distnorm"] / ms[other]
                ratios[f"fwd distnorm/{other}"] = fwd["distnorm"] / fwd[other]
                ratios[f"cpu distnorm/{other}"] = cpu["distnorm"] / cpu[other]
        if "distnorm" in row["floors"]:
            floor = row["floors"]["distnorm"]["fwd_bwd_ms"]
            ratios["(distnorm-local)/floor"] = (ms["distnorm"] - ms["local"]) / floor
            # The bound: local BN's compute plus the bare collectives, back to back.
            row["bound_ms"] = ms["local"] + floor
            ratios["distnorm/bound"] = ms["distnorm"] / row["bound_ms"]
            if "torch_algo" in ms:
                ratios["torch_algo/bound"] = ms["torch_algo"] / row["bound_ms"]
        row["ratios"] = ratios
        rows.append(row)
    return rows


def markdown(results: list[dict[str, Any]], impls: Sequence[str], meta: dict[str, Any],
             check: dict[str, Any] | None) -> str:
    def has(name: str) -> bool:
        return name in impls

    load = f"load average (1, 5, 15 min) at start {', '.join(f'{v:.2f}' for v in meta['loadavg_at_start'])}"
    if "loadavg_at_end" in meta:
        load += f", at end {', '.join(f'{v:.2f}' for v in meta['loadavg_at_end'])}"
    lines = [
        "# Per-layer benchmark, CPU / gloo",
        "",
        (f"torch {meta['torch']}, Python {meta['python']}, {meta['cpu_count']} CPU cores, {load}; "
         f"{meta['date']}. The machine is shared: under load, synced layers also wait for "
         "descheduled peers in every collective, which the CPU-time table leaves out."),
        (f"One thread per rank; {meta['reps']} interleaved reps after {meta['warmup']} warm-up rounds; "
         "median of the slowest rank per rep (ms). fwd+bwd = forward and backward of one layer, "
         "float32, NCHW. floor = the same collectives as distnorm's, alone, back to back."),
    ]
    lines += provenance_lines(meta, results)
    if not has("fairscale"):
        lines.append(f"_{FAIRSCALE_HINT}_")
    lines += ["", "Summary (range over shapes of distnorm's time divided by each other's; < 1: distnorm faster):", ""]
    for world in sorted({r["world"] for r in results}):
        rows = [r for r in results if r["world"] == world]
        parts = []
        for other in ("local", "fairscale", "torch_algo"):
            if not has(other):
                continue
            wall = [r["ratios"][f"distnorm/{other}"] for r in rows]
            cpu = [r["ratios"][f"cpu distnorm/{other}"] for r in rows]
            parts.append(f"/ {LABELS[other]} {min(wall):.2f}–{max(wall):.2f} (CPU time {min(cpu):.2f}–{max(cpu):.2f})")
        lines.append(f"- W = {world}: distnorm " + "; ".join(parts))
        if all("torch_algo/bound" in r["ratios"] for r in rows):
            best = [r["ratios"]["torch_algo/bound"] for r in rows]
            ours = [r["ratios"]["distnorm/bound"] for r in rows]
            lines.append(f"  - bound = local BN + floor: torch-algo / bound {min(best):.2f}–{max(best):.2f} "
                         "(the largest speed-up over torch's algorithm any synced layer could show "
                         f"here); distnorm / bound {min(ours):.2f}–{max(ours):.2f}")
    for world in sorted({r["world"] for r in results}):
        rows = [r for r in results if r["world"] == world]
        for title, key in (("forward + backward", "fwd_bwd_ms"), ("forward only", "fwd_ms"),
                           ("CPU time of forward + backward (process CPU time, no waiting)", "cpu_ms")):
            pre = {"fwd_bwd_ms": "", "fwd_ms": "fwd ", "cpu_ms": "cpu "}[key]
            cols = [LABELS[n] for n in impls] + ["floor"]
            ratio_cols = [c for c in ("local", "fairscale", "torch_algo") if has(c)]
            head = ["shape (per rank)"] + cols + [f"distnorm / {LABELS[c]}" for c in ratio_cols]
            if key == "fwd_bwd_ms":
                head.append("(distnorm − local) / floor")
            lines += ["", f"## W = {world}: {title}, ms", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            for r in rows:
                cells = ["×".join(map(str, r["shape"]))]
                cells += [f"{r['impls'][n][key]:.2f}" for n in impls]
                fl = r["floors"].get("distnorm")
                cells.append(f"{fl[key]:.2f}" if fl else "—")
                cells += [f"{r['ratios'][f'{pre}distnorm/{c}']:.2f}" for c in ratio_cols]
                if key == "fwd_bwd_ms":
                    cells.append(f"{r['ratios']['(distnorm-local)/floor']:.1f}")
                lines.append("| " + " | ".join(cells) + " |")
        lines += breakdown_table(world, rows, impls)
        synced = [n for n in impls if n in ("distnorm", "fairscale", "torch_algo")]
        head = ["C"] + [f"{LABELS[n]} fwd / bwd" for n in synced]
        lines += ["", (f"## W = {world}: bytes per rank per layer and step (counted: all-reduce buffer, "
                       "W × all-gather input)"), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        seen = set()
        for r in rows:
            c = r["shape"][1]
            if c in seen:
                continue
            seen.add(c)
            cells = [str(c)] + [f"{_fmt_bytes(r['impls'][n]['bytes']['forward'])} / "
                                f"{_fmt_bytes(r['impls'][n]['bytes']['backward'])}" for n in synced]
            lines.append("| " + " | ".join(cells) + " |")
        first = rows[0]
        lines.append("")
        for n in synced:
            ops = "; ".join(f"{op['phase']} {op['op']} {op['dtype']}×{op['numel']}"
                            for op in first["impls"][n]["collectives"])
            lines.append(f"- {LABELS[n]} (C = {first['shape'][1]}): {ops}")
    if check is not None:
        lines += ["", "## Correctness check (W = 2, float64, vs nn.BatchNorm2d on the concatenated batch)",
                  "", ("Max relative error over output, input gradient, summed parameter gradients and "
                       "running statistics after 3 steps."), "", "| case | " + " | ".join(check["uneven"]) + " |",
                  "|---|" + "---|" * len(check["uneven"])]
        for case, per_impl in check.items():
            cells = []
            for name in check["uneven"]:
                res = per_impl.get(name, {})
                cells.append("error" if "error" in res else f"{max(res.values()):.1e}")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        if any(math.isinf(v) for per_impl in check.values() for res in per_impl.values()
               for v in res.values() if isinstance(v, float)):
            lines += ["", ("inf: non-finite results (fairscale's statistics are NaN when a rank's slice "
                           "is empty: the mean of an empty tensor).")]
    return "\n".join(lines) + "\n"


def breakdown_table(world: int, rows: Sequence[dict[str, Any]], impls: Sequence[str]) -> list[str]:
    """Where distnorm's forward + backward time goes, against the bound."""
    steps = [n for n in ("local", "distnorm_local", "distnorm_bare", "distnorm", "torch_algo") if n in impls]
    if not all("bound_ms" in r for r in rows) or "distnorm" not in steps:
        return []
    algo = "torch_algo" in steps
    head = (["shape (per rank)"] + [LABELS[n] for n in steps[:2]] + ["floor", "bound = local BN + floor"]
            + [LABELS[n] for n in steps[2:]] + ["distnorm / bound"]
            + (["torch-algo / bound", "torch-algo's floor"] if algo else []))
    lines = ["", (f"## W = {world}: where distnorm's time goes (forward + backward, ms; wall). "
                  "no collectives = its local math alone; bare all-reduce = without the fault "
                  "checks; floor = its two all-reduces alone; torch-algo's floor = torch's "
                  "all-gather and all-reduce alone"), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = {n: r["impls"][n]["fwd_bwd_ms"] for n in steps}
        cells = (["×".join(map(str, r["shape"]))] + [f"{ms[n]:.2f}" for n in steps[:2]]
                 + [f"{r['floors']['distnorm']['fwd_bwd_ms']:.2f}", f"{r['bound_ms']:.2f}"]
                 + [f"{ms[n]:.2f}" for n in steps[2:]] + [f"{r['ratios']['distnorm/bound']:.2f}"])
        if algo:
            cells += [f"{r['ratios']['torch_algo/bound']:.2f}", f"{r['floors']['torch_algo']['fwd_bwd_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def check_passed(check: dict[str, Any], tol: float = 1e-6) -> bool:
    """torch_algo (both statistics kernels) must match the reference in every case."""
    for per_impl in check.values():
        for name in ("torch_algo", "torch_algo_var_mean"):
            res = per_impl.get(name)
            if res is None:
                continue
            if "error" in res or max(res.values()) > tol:
                return False
    return True


def _print_check(check: dict[str, Any]) -> None:
    for case, per_impl in check.items():
        for name, res in per_impl.items():
            text = res["error"] if "error" in res else ", ".join(f"{k} {v:.1e}" for k, v in res.items())
            print(f"  check {case:10s} {name:20s} {text}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="W=2, one small shape, few reps (smoke test)")
    parser.add_argument("--check", action="store_true", help="only the correctness check (W=2)")
    parser.add_argument("--profile", action="store_true", help="only the torch.profiler run")
    parser.add_argument("--out", default=DEFAULT_OUT, help=OUT_HELP)
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default 2 4)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxCxHxW",
                        help="per-rank shapes, e.g. 2x256x56x56 (default: 7 ResNet-50 layers)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps per shape")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    args = parser.parse_args(argv)

    impls = list(IMPLS)
    if not fairscale_available():
        print(FAIRSCALE_HINT, file=sys.stderr)
        impls.remove("fairscale")
    os.makedirs(args.out, exist_ok=True)

    if args.check:
        (check, *_) = run_ranks(_check_rank, 2, impls, pg_timeout=60.0)
        _print_check(check)
        ok = check_passed(check)
        print("CHECK_JSON " + json.dumps(check))
        print("check:", "PASSED" if ok else "FAILED (torch_algo differs from nn.BatchNorm2d)")
        return 0 if ok else 1

    if args.profile:
        steps = 20
        prof = run_ranks(_profile_rank, 2, PROFILE_SHAPE, impls, steps)[0]
        report = profile_report(prof, PROFILE_SHAPE, steps)
        print(report)
        with open(os.path.join(args.out, "layer_profile_cpu.txt"), "w") as f:
            f.write(report)
        return 0

    worlds = args.worlds or ([2] if args.quick else [2, 4])
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in text.lower().split("x")) for text in args.shapes]  # type: ignore[misc]
        if any(len(sh) != 4 for sh in shapes):
            parser.error(f"--shapes takes N x C x H x W, e.g. 2x256x56x56 (got {args.shapes})")
    reps = args.reps or (5 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    meta = dict(machine_info(), **distnorm_provenance(), reps=reps, warmup=warmup, worlds=worlds, quick=args.quick,
                impls=impls, threads_per_rank=1, backend="gloo", dtype="float32")

    results: list[dict[str, Any]] = []
    check = None
    for world in worlds:
        print(f"W={world}: spawning ranks", file=sys.stderr, flush=True)
        outputs = run_ranks(_bench_rank, world, shapes, impls, reps, warmup, world == worlds[0] and world == 2)
        if outputs[0]["check"] is not None:
            check = outputs[0]["check"]
        results += build_results(world, outputs, impls)

    meta["loadavg_at_end"] = list(os.getloadavg())
    md = markdown(results, impls, meta, check)
    print(md)
    payload = {"meta": meta, "check": check, "check_passed": check_passed(check) if check else None,
               "results": results}
    with open(os.path.join(args.out, "layer_cpu.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, "layer_cpu.md"), "w") as f:
        f.write(md)
    print(f"saved {os.path.join(args.out, 'layer_cpu.json')} and layer_cpu.md", file=sys.stderr)
    if check is not None and not check_passed(check):
        print("check FAILED: torch_algo differs from nn.BatchNorm2d", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
