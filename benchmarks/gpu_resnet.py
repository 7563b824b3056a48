"""The GPU benchmark's ResNet-50 items: a training step (forward + backward + SGD) of
torchvision's ResNet-50 with local BN, torch's SyncBatchNorm or distnorm, eager and
captured in a CUDA graph (the first replay checked against an eager step from the
same state), with its peak memory, kernels and host syncs."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from gpu_candidates import to_torch_sync
from gpu_device import Device
from gpu_measure import (Runnable, attempt, capture, count_work,
                         first_calls, step_peak_memory, time_group, warned)
from gpu_settings import MODEL_CANDIDATES, Settings, dtype_of, item_row
from model import MOMENTUM, NUM_CLASSES


def build_model(name: str, dev: Device, fmt: Any) -> Any:
    """ResNet-50 (the same initial weights for every candidate) with ``name``'s norm."""
    import torch
    import torchvision

    import distnorm

    torch.default_generator.manual_seed(0)  # the CPU generator only: init runs on CPU
    model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    if name == "torch":
        model = to_torch_sync(model, dev.cuda)
    elif name == "distnorm":
        model = distnorm.convert_model(model)
    elif name != "local":
        raise ValueError(f"unknown model candidate {name!r} (expected one of {MODEL_CANDIDATES})")
    return model.to(dev.device, memory_format=fmt).train()


class Trainer:
    """One candidate's ResNet-50, SGD optimizer and training step on a fixed batch."""

    def __init__(self, name: str, dkey: str, x: Any, target: Any, dev: Device, lr: float) -> None:
        import torch

        dtype, fmt = dtype_of(dkey)
        self.name, self.dev, self.x, self.target, self.lr = name, dev, x, target, lr
        self.model = build_model(name, dev, fmt)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=MOMENTUM)
        # Autocast's weight cache must be off for graph capture; off everywhere, alike.
        self.amp = dtype if dtype != torch.float32 else None
        self.held: dict[str, Any] = {}

    def autocast(self) -> Any:
        import torch

        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.device.type, dtype=self.amp, cache_enabled=False)

    def step(self) -> None:
        run_step(self.model, self.opt, self.x, self.target, self.autocast, self.held)

    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def runnable(self) -> Runnable:
        return Runnable(self.name, self.step, self.zero, self.held)

    def snapshot(self) -> tuple[Any, Any]:
        """A copy of the model and optimizer in their current state (call with the
        gradients None: before a capture)."""
        import torch

        model = copy.deepcopy(self.model)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=MOMENTUM)
        # load_state_dict keeps tensors already of the right dtype and device: without
        # the deep copy both optimizers would share (and both advance) one momentum buffer.
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        return model, opt


def run_step(model: Any, opt: Any, x: Any, target: Any, autocast: Callable[[], Any],
             held: dict[str, Any]) -> None:
    import torch.nn.functional as F

    with autocast():
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    held["loss"] = loss.detach()


def _model_inputs(item: dict[str, Any], dev: Device, s: Settings) -> tuple[Any, Any]:
    import torch

    _, fmt = dtype_of(item["dtype"])
    x = dev.randn((item["batch"], 3, s.image_size, s.image_size), 77).to(memory_format=fmt)
    target = torch.randint(0, NUM_CLASSES, (item["batch"],),
                           generator=torch.Generator().manual_seed(78)).to(dev.device)
    return x, target


def _graph_check(trainer: Trainer, replay: Callable[[], None], ref: tuple[Any, Any],
                 dev: Device) -> dict[str, float]:
    """One replay against one eager step of the snapshot ``ref`` taken before capture:
    relative differences of the loss, the parameter update and the running statistics."""
    import torch

    ref_model, ref_opt = ref
    before = [p.detach().clone() for p in ref_model.parameters()]
    replay()
    dev.sync()
    held: dict[str, Any] = {}
    ref_opt.zero_grad(set_to_none=True)
    run_step(ref_model, ref_opt, trainer.x, trainer.target, trainer.autocast, held)
    dev.sync()

    def norm(ts: Sequence[Any]) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))

    update_g = [p.detach() - b for p, b in zip(trainer.model.parameters(), before)]
    update_e = [p.detach() - b for p, b in zip(ref_model.parameters(), before)]
    stats_g = [b for n, b in trainer.model.named_buffers() if "running" in n]
    stats_e = [b for n, b in ref_model.named_buffers() if "running" in n]
    loss_g, loss_e = float(trainer.held["loss"].float()), float(held["loss"].float())
    with torch.no_grad():
        return {
            "loss_graphed": loss_g, "loss_eager": loss_e,
            "loss_rel": abs(loss_g - loss_e) / max(abs(loss_e), 1e-30),
            "update_rel": norm([g - e for g, e in zip(update_g, update_e)]) / max(norm(update_e), 1e-30),
            "running_rel": norm([g.double() - e.double() for g, e in zip(stats_g, stats_e)])
            / max(norm(stats_e), 1e-30),
        }


def run_model(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """One ResNet-50 configuration: eager and graphed steps, graphed checked against eager."""
    x, target = _model_inputs(item, dev, s)
    rows = {name: item_row(item, name) for name in MODEL_CANDIDATES}
    trainers: dict[str, Trainer] = {}
    for name in MODEL_CANDIDATES:
        with attempt(rows[name], "build", dev):
            trainers[name] = Trainer(name, item["dtype"], x, target, dev, s.lr)
    runs = {name: t.runnable() for name, t in trainers.items()}
    first_calls(runs, rows, dev, "first_step_s")
    time_group({n: (r.step, r.zero) for n, r in runs.items()}, rows, "eager", dev,
               s.model_reps, s.model_warmup)
    for name, run in runs.items():  # before any capture: graphs keep memory pools
        with attempt(rows[name], "memory", dev):
            rows[name]["memory"] = step_peak_memory(run, dev)

    replays = {}
    for name in list(runs):
        trainer = trainers[name]
        snapshot: list[Any] = []

        def take(t: Trainer = trainer, into: list[Any] = snapshot) -> None:
            try:  # a failed copy fails the check, not the capture
                into.append(t.snapshot())
            except Exception as error:  # noqa: BLE001 - raised again by the check
                into.append(error)

        with attempt(rows[name], "capture", dev) as ok:
            # Warm-up, then a copy of the model and optimizer (the state the first
            # replay starts from), then the capture.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                replay, mode = capture(runs[name], dev, s.capture_warmup, ready=take)
        if caught:
            rows[name]["capture_warnings"] = warned(caught)
        if not ok["ok"]:
            continue
        rows[name]["capture_mode"] = mode
        with attempt(rows[name], "graph check", dev):
            if isinstance(snapshot[-1], Exception):
                raise snapshot[-1]
            rows[name]["graph_check"] = _graph_check(trainer, replay, snapshot[-1], dev)
        snapshot.clear()
        replays[name] = replay
    time_group({n: (r, lambda: None) for n, r in replays.items()}, rows, "graphed", dev,
               s.model_replay_reps, s.replay_warmup)
    del replays, runs, trainers
    return list(rows.values())


def run_model_counts(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """One ResNet-50 configuration: kernels and host syncs per training step."""
    x, target = _model_inputs(item, dev, s)
    rows = {name: item_row(item, name) for name in MODEL_CANDIDATES}
    for name in MODEL_CANDIDATES:
        with attempt(rows[name], "build", dev) as ok:
            run = Trainer(name, item["dtype"], x, target, dev, s.lr).runnable()
        if not ok["ok"]:
            continue
        count_work(rows[name], run, dev, s.model_profile_steps)
        del run
    return list(rows.values())
