"""distnorm on a GPU: NCCL, gloo with CUDA tensors, host syncs, CUDA graphs, compile,
memory. Marked ``gpu``: collected everywhere, skipped without CUDA.

Two ways to get several ranks on one GPU (which cannot hold two NCCL ranks):

* W = 2 and 3 processes of the shared gloo pools, each putting its shard on the
  GPU: gloo carries CUDA tensors. Every synced variant, uneven and empty shards,
  float32 / bfloat16 autocast / float16 models, channels_last, 1-D/2-D/3-D, against
  the same variant run in float64 on the CPU on the concatenated batch (for
  ``sync``: ``nn.BatchNorm``), through SGD steps.
* A one-rank NCCL group with synchronisation forced (tests/gpu/_scenarios.py): NCCL
  itself, no host syncs, CUDA-graph capture, ``torch.compile``, peak memory, when a
  non-finite input raises. The scenarios run in two processes started together at
  the first scenario test (those that capture CUDA graphs apart from the others),
  each running its scenarios one after the other and writing each result as it
  ends to ``$DISTNORM_GPU_OUT/scenarios_<group>.jsonl`` and ``.log``; a test reads
  its scenario's line. ``DISTNORM_GPU_SCENARIO_TIMEOUT`` (seconds, default 300)
  bounds each process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ["sync", "brn", "cmbn", "cbn", "bin", "switchable"]
SHARDS = {2: [3, 0], 3: [2, 0, 1]}
SHAPES = {"1d": (4,), "1d-seq": (4, 7), "2d": (4, 6, 5), "3d": (4, 3, 4, 5)}  # (C, *spatial)


def _model(channels: int, dims: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    producer = nn.Linear(channels, channels) if dims == 0 else conv[dims](channels, channels, 1)
    model = nn.Sequential(producer, bn(channels))
    gen = torch.Generator().manual_seed(0)  # the same weights in every process
    with torch.no_grad():
        for p in model[0].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model[1].weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        model[1].bias.copy_(torch.rand(channels, generator=gen) * 2 - 1)
    return model


def _steps(dtype_name: str) -> int:
    # Reduced precision: one step (SGD steps amplify bf16/fp16 rounding away from a
    # float64 reference); float32/float64: three.
    return 1 if dtype_name in ("autocast", "float16") else 3


def _batches(world: int, shape: tuple, steps: int = 3) -> List[List[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [[torch.randn((n,) + shape, generator=gen, dtype=torch.float64) * 2 + 3
             for n in SHARDS[world]] for _ in range(steps)]


def _train(model: nn.Module, batches: List[torch.Tensor], *, device: str, dtype: torch.dtype,
           autocast: bool, channels_last: bool, sum_grads: bool) -> Dict[str, Any]:
    """SGD steps with L = Σ y·w over the batch; grads summed over ranks if synced."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    for x in batches:
        x = x.to(device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        weights = torch.linspace(-1, 1, y.shape[1], device=device).view(
            (1, -1) + (1,) * (y.dim() - 2))
        (y.float() * weights).sum().backward()
        if sum_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        if channels_last and x.dim() == 4 and x.shape[0]:
            assert y.is_contiguous(memory_format=torch.channels_last)
        outputs.append({"y": y.detach().double().cpu(), "dx": x.grad.double().cpu()})
    bn = model[1]
    return {"steps": outputs, "running_mean": bn.running_mean.double().cpu(),
            "running_var": bn.running_var.double().cpu(),
            "params": [p.detach().double().cpu() for p in model.parameters()]}


def _w_gpu(rank: int, world: int, mode: str, shape_name: str, dtype_name: str,
           channels_last: bool) -> Dict[str, Any]:
    shape = SHAPES[shape_name]
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(dtype_name, torch.float32)
    model = distnorm.convert_model(_model(shape[0], len(shape) - 1), mode=mode).cuda().to(dtype)
    batches = [step[rank] for step in _batches(world, shape, _steps(dtype_name))]
    return _train(model, batches, device="cuda", dtype=dtype, autocast=dtype_name == "autocast",
                  channels_last=channels_last, sum_grads=True)


def _reference(world: int, mode: str, shape_name: str, dtype_name: str) -> Dict[str, Any]:
    shape = SHAPES[shape_name]
    model = _model(shape[0], len(shape) - 1).double()
    if mode != "sync":  # the same variant, one process, the concatenated batch
        model = distnorm.convert_model(model, mode=mode)
    batches = [torch.cat(step) for step in _batches(world, shape, _steps(dtype_name))]
    return _train(model, batches, device="cpu", dtype=torch.float64, autocast=False,
                  channels_last=False, sum_grads=False)


CASES = ([(m, "2d", "float64", False) for m in MODES]
         + [("sync", s, "float64", False) for s in ("1d", "1d-seq", "3d")]
         + [("sync", "2d", "float32", False), ("sync", "2d", "float32", True),
            ("cbn", "2d", "float32", True), ("sync", "2d", "autocast", True),
            ("sync", "2d", "float16", False), ("brn", "2d", "autocast", True),
            ("cmbn", "2d", "float16", False)])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode,shape,dtype,channels_last", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_gloo_with_cuda_tensors_matches_the_concatenated_batch(world, mode, shape, dtype,
                                                               channels_last, world2, world3):
    pool = {2: world2, 3: world3}[world]
    results = pool.run(_w_gpu, mode, shape, dtype, channels_last)
    ref = _reference(world, mode, shape, dtype)
    tol = {"float64": dict(rtol=1e-7, atol=1e-9),
           "float32": dict(rtol=1e-4, atol=1e-4)}.get(dtype, dict(rtol=5e-2, atol=5e-2))
    offsets = [0]
    for n in SHARDS[world]:
        offsets.append(offsets[-1] + n)
    for rank, res in enumerate(results):
        lo, hi = offsets[rank], offsets[rank + 1]
        for got, want in zip(res["steps"], ref["steps"]):
            torch.testing.assert_close(got["y"], want["y"][lo:hi], **tol)
            torch.testing.assert_close(got["dx"], want["dx"][lo:hi], **tol)
        torch.testing.assert_close(res["running_mean"], ref["running_mean"], **tol)
        torch.testing.assert_close(res["running_var"], ref["running_var"], **tol)
        for got, want in zip(res["params"], ref["params"]):
            torch.testing.assert_close(got, want, **tol)


from tests.gpu._scenarios import GROUPS  # noqa: E402 - after the module's helpers

SCENARIO_TIMEOUT_S = float(os.environ.get("DISTNORM_GPU_SCENARIO_TIMEOUT", "300"))


class ScenarioRuns:
    """The scenario processes of both groups, started together; results on demand."""

    def __init__(self, out: str) -> None:
        self.out, self.start = out, time.monotonic()
        self.procs: Dict[str, subprocess.Popen] = {}
        self.logs: Dict[str, Any] = {}
        for group, names in GROUPS.items():
            jsonl = self.path(group, "jsonl")
            if os.path.exists(jsonl):
                os.remove(jsonl)
            self.logs[group] = open(self.path(group, "log"), "w")
            self.procs[group] = subprocess.Popen(
                [sys.executable, "-m", "tests.gpu._scenarios", "--jsonl", jsonl, *names],
                cwd=ROOT, stdout=self.logs[group], stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"})

    def path(self, group: str, ext: str) -> str:
        return os.path.join(self.out, f"scenarios_{group}.{ext}")

    def _lines(self, group: str) -> Dict[str, Dict[str, Any]]:
        try:
            with open(self.path(group, "jsonl")) as f:
                return {entry["name"]: entry for entry in map(json.loads, filter(None, f))}
        except FileNotFoundError:
            return {}

    def result(self, name: str) -> Dict[str, Any]:
        """The scenario's line, waiting for it while its process runs (bounded)."""
        group = next(g for g, names in GROUPS.items() if name in names)
        proc = self.procs[group]
        while True:
            found = self._lines(group).get(name)
            if found is not None:
                return found
            left = SCENARIO_TIMEOUT_S - (time.monotonic() - self.start)
            if proc.poll() is not None or left <= 0:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                found = self._lines(group).get(name)
                if found is not None:
                    return found
                with open(self.path(group, "log")) as f:
                    tail = f.read()[-3000:]
                state = (f"exited with {proc.returncode}" if left > 0 else
                         f"killed after {SCENARIO_TIMEOUT_S:.0f} s")
                return {"name": name, "status": "not reached",
                        "error": f"the {group} scenarios' process {state} first", "log": tail}
            time.sleep(0.5)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in self.logs.values():
            log.close()


@pytest.fixture(scope="module")
def scenario_runs() -> Iterator[ScenarioRuns]:
    out = os.environ.get("DISTNORM_GPU_OUT") or tempfile.mkdtemp(prefix="distnorm-gpu-")
    os.makedirs(out, exist_ok=True)
    runs = ScenarioRuns(out)
    try:
        yield runs
    finally:
        runs.close()


@pytest.fixture(scope="module", autouse=True)
def _scenarios_started_first(request: pytest.FixtureRequest) -> None:
    """Start the scenario processes before the gloo tests when both are selected, so
    that they run side by side (the scenario tests, last in the file, collect)."""
    if any(item.name.startswith("test_scenario") for item in request.session.items):
        request.getfixturevalue("scenario_runs")


@pytest.mark.parametrize("name", [name for names in GROUPS.values() for name in names])
def test_scenario(name, scenario_runs):
    entry = scenario_runs.result(name)
    print(name, json.dumps(entry, default=str)[:2000])
    assert entry["status"] == "passed", json.dumps(entry, indent=1, default=str)


def test_converted_model_moves_between_devices():
    """state_dict round trip CPU → CUDA → CPU keeps nn.BatchNorm's keys and values."""
    model = distnorm.convert_model(_model(4, 2))
    state = copy.deepcopy(model.state_dict())
    model.cuda()
    back = distnorm.revert_model(copy.deepcopy(model)).cpu()
    for key, value in state.items():
        torch.testing.assert_close(back.state_dict()[key], value)
