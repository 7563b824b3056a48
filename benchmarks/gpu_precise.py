"""The GPU benchmark's ``precise_bn`` item (issue 25's cost target): recomputing the
population statistics of a synced ResNet-50 with ``distnorm.precise_bn`` over B
batches, beside B plain training-mode forward passes of the same model under
``torch.no_grad()`` — what collecting the statistics needs at least."""

from __future__ import annotations

from typing import Any

from gpu_device import Device
from gpu_measure import Runnable, attempt, first_calls, time_group
from gpu_settings import PRECISE_BN_CANDIDATES, Settings, item_row


def run_precise_bn(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """B forwards vs ``precise_bn`` over the same B batches, timed interleaved with CUDA
    events (each pass as one step); the samples ``precise_bn`` reports are recorded."""
    import torch
    import torchvision

    import distnorm

    rows = {name: item_row(item, name) for name in PRECISE_BN_CANDIDATES}
    for row in rows.values():
        row.update(batches=s.precise_bn_batches, image_size=s.image_size)
    with attempt(rows["precise_bn"], "build", dev) as ok:
        torch.default_generator.manual_seed(0)  # the CPU generator only: init runs on CPU
        model = distnorm.convert_model(torchvision.models.resnet50(weights=None), mode="sync")
        model = model.to(dev.device).train()
        # One tensor drawn once, cut into B views: the batches cost no time while timed.
        data = dev.randn((s.precise_bn_batches * item["batch"], 3, s.image_size, s.image_size), 79)
        batches = list(data.split(item["batch"]))
    if not ok["ok"]:
        rows["forward"]["errors"].update(rows["precise_bn"]["errors"])
        return list(rows.values())
    used: list[int] = []

    def forward() -> None:
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)

    def precise() -> None:
        used.append(distnorm.precise_bn(model, batches))

    runs = {"forward": Runnable("forward", forward, lambda: None),
            "precise_bn": Runnable("precise_bn", precise, lambda: None)}
    first_calls(runs, rows, dev, "first_pass_s")  # also the warm-up: B batches each
    time_group({n: (r.step, r.zero) for n, r in runs.items()}, rows, "eager", dev,
               s.precise_bn_reps, 0)
    if used:
        rows["precise_bn"]["samples_used"] = used[-1]
    return list(rows.values())
