"""The GPU benchmark's per-layer items: one BatchNorm2d shape with its candidates
(local BN, torch's SyncBatchNorm, distnorm's SyncBatchNorm, the collectives alone),
timed eager and graphed; their kernels and host syncs; and every synced variant's
kernels and host syncs per layer."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

from gpu_candidates import torch_forced_class
from gpu_device import Device
from gpu_measure import (Runnable, attempt, capture, count_work,
                         first_calls, relative_error, step_peak_memory, time_group, warned)
from gpu_settings import (IDEAL_PASSES, LAYER_CANDIDATES, VARIANT_STEPS, VARIANTS, Settings, dtype_of,
                          item_row)


def layer_candidate(name: str, x: Any, dy: Any, dev: Device) -> Runnable:
    """A fresh layer of candidate ``name`` (float32 parameters) on its own copy of ``x``."""
    import torch
    import torch.distributed as dist

    import distnorm

    channels = x.shape[1]
    if name == "floor":
        f64 = torch.zeros(2 * channels + 1, dtype=torch.float64, device=dev.device)
        f32 = torch.zeros(2 * channels, dtype=torch.float32, device=dev.device)

        def collectives() -> None:
            dist.all_reduce(f64, group=dev.group)
            dist.all_reduce(f32, group=dev.group)
        return Runnable(name, collectives, lambda: None)
    if name == "local":
        layer: Any = torch.nn.BatchNorm2d(channels)
    elif name == "torch":
        layer = torch_forced_class(dev.cuda)(channels)
    elif name == "distnorm":
        layer = distnorm.SyncBatchNorm(channels)
    else:
        raise ValueError(f"unknown layer candidate {name!r} (expected one of {LAYER_CANDIDATES})")
    layer = layer.to(dev.device).train()
    xc = x.detach().clone().requires_grad_()
    held: dict[str, Any] = {}

    def step() -> None:
        y = layer(xc)
        y.backward(dy)
        held["y"] = y

    def zero() -> None:
        xc.grad = None
        layer.zero_grad(set_to_none=True)

    def outputs() -> dict[str, Any]:
        return {"y": held.get("y"), "dx": xc.grad, "dw": layer.weight.grad, "db": layer.bias.grad}
    return Runnable(name, step, zero, held, outputs)


def _layer_inputs(item: dict[str, Any], dev: Device) -> tuple[Any, Any]:
    dtype, fmt = dtype_of(item["dtype"])
    shape = [item["batch"], *item["shape"]]
    seed = 1000 + 7 * item["batch"] + item["shape"][0]
    x = dev.randn(shape, seed).to(dtype=dtype, memory_format=fmt)
    dy = dev.randn(shape, seed + 1).to(dtype=dtype, memory_format=fmt)
    return x, dy


def run_layer(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """One layer shape: eager and graphed timings, agreement with local BN."""
    x, dy = _layer_inputs(item, dev)
    rows = {name: item_row(item, name) for name in LAYER_CANDIDATES}
    runs: dict[str, Runnable] = {}
    for name in LAYER_CANDIDATES:
        with attempt(rows[name], "build", dev):
            runs[name] = layer_candidate(name, x, dy, dev)
    first_calls(runs, rows, dev, "first_step_s")
    if "local" in runs:
        reference = runs["local"].outputs()
        for name in ("torch", "distnorm"):
            if name in runs:
                got = runs[name].outputs()
                rows[name]["parity"] = {k: relative_error(got[k], reference[k]) for k in reference}

    time_group({n: (r.step, r.zero) for n, r in runs.items()}, rows, "eager", dev,
               s.layer_reps, s.layer_warmup)
    for name, run in runs.items():
        if name != "floor":
            with attempt(rows[name], "memory", dev):
                rows[name]["memory"] = step_peak_memory(run, dev)
    replays = {}
    for name, run in runs.items():
        with attempt(rows[name], "capture", dev) as ok:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                replay, mode = capture(run, dev, s.capture_warmup)
        if caught:  # e.g. distnorm's notice that a kernel fell back to eager ops
            rows[name]["capture_warnings"] = warned(caught)
        if ok["ok"]:
            replays[name] = replay
            rows[name]["capture_mode"] = mode
    time_group({n: (r, lambda: None) for n, r in replays.items()}, rows, "graphed", dev,
               s.replay_reps, s.replay_warmup)

    numel = math.prod(rows["local"]["shape"])
    itemsize = x.element_size()
    for name, row in rows.items():
        if name == "floor":
            continue
        row["ideal_bytes"] = IDEAL_PASSES * numel * itemsize
        for key in ("eager", "graphed"):
            if key in row:
                row[key]["gb_per_s"] = row["ideal_bytes"] / (row[key]["ms"] * 1e-3) / 1e9
    del replays, runs
    return list(rows.values())


def run_layer_counts(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """One layer shape: kernels and host syncs per forward + backward."""
    x, dy = _layer_inputs(item, dev)
    rows = {name: item_row(item, name) for name in LAYER_CANDIDATES}
    for name in LAYER_CANDIDATES:
        with attempt(rows[name], "build", dev):
            run = layer_candidate(name, x, dy, dev)
        if name not in rows or "build" in rows[name]["errors"]:
            continue
        count_work(rows[name], run, dev, s.layer_profile_steps)
    return list(rows.values())


def variant_candidate(mode: str, x: Any, dy: Any, dev: Device) -> Runnable:
    """A fresh layer of ``convert_model``'s ``mode`` (float32 parameters) on its own
    copy of ``x``: forward + backward of one layer, as :func:`layer_candidate`."""
    import torch

    import distnorm

    layer = distnorm.convert_model(torch.nn.BatchNorm2d(x.shape[1]), mode=mode)
    layer = layer.to(dev.device).train()
    xc = x.detach().clone().requires_grad_()

    def step() -> None:
        layer(xc).backward(dy)

    def zero() -> None:
        xc.grad = None
        layer.zero_grad(set_to_none=True)
    return Runnable(mode, step, zero)


def run_variant_counts(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """Every synced variant on one shape: GPU kernels (collectives among them) and host
    syncs per layer forward + backward, averaged over whole CrossMiniBatchNorm cycles."""
    x, dy = _layer_inputs(item, dev)
    steps = max(VARIANT_STEPS, s.layer_profile_steps)
    rows = {mode: item_row(item, mode) for mode in VARIANTS}
    for mode in VARIANTS:
        with attempt(rows[mode], "build", dev) as ok:
            run = variant_candidate(mode, x, dy, dev)
        if not ok["ok"]:
            continue
        with attempt(rows[mode], "first step", dev):
            start = time.perf_counter()
            run.zero()
            run.step()
            dev.sync()
            rows[mode]["first_step_s"] = time.perf_counter() - start
        count_work(rows[mode], run, dev, steps)
        del run
    return list(rows.values())

