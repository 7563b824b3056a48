"""GPU benchmark: distnorm's synced layers beside torch's SyncBatchNorm on one CUDA device.

One GPU, one process, a one-rank NCCL group. Both synced implementations are made
to synchronize over it, although each would run as local BatchNorm at W = 1:
torch's through its autograd Function (``torch.nn.modules._functions.SyncBatchNorm``;
its module falls back to ``F.batch_norm`` at W = 1, the Function does not), distnorm's
through :func:`force_distnorm_sync`. What a synced layer costs beyond local BatchNorm
on one GPU is then what it adds on every GPU of a job, less the wire time of the
collectives (the *floor* below measures them at W = 1). Side by side, in one run:

**Per layer** (ResNet-50 and detection shapes; batch 2 and 32; float32 NCHW and
bfloat16 channels_last with float32 parameters, as under autocast), forward +
backward of

* ``local``    — ``nn.BatchNorm2d`` in training mode;
* ``torch``    — ``nn.SyncBatchNorm`` routed through torch's autograd Function over
  the group (all-gather forward, all-reduce backward, 3 host syncs);
* ``distnorm`` — ``distnorm.SyncBatchNorm`` over the group;
* ``floor``    — one all-reduce of 2C + 1 float64 and one of 2C float32 numbers, alone:
  what any one-all-reduce-per-direction design must pay;

each timed eager (CUDA events, the GPU idle before each step) and captured in a CUDA
graph (replays), plus GPU kernels per step (torch.profiler; memcpy and memset counted
apart), host synchronizations per step (``torch.cuda.set_sync_debug_mode("warn")``),
agreement with local BatchNorm on the first step, and the achieved memory bandwidth
(see :data:`IDEAL_PASSES`).

**Per ResNet-50 training step** (torchvision ``resnet50(weights=None)``, 224 px,
forward + backward + SGD with momentum; batch 2 float32, batch 2 and 32 bfloat16
autocast with channels_last): local BN, torch's SyncBN (``convert_sync_batchnorm``,
each layer through the Function) and distnorm (``convert_model``), eager and with the
whole step captured in a CUDA graph (static inputs, as torch's "whole network
capture" recipe); the first replay is checked against an eager step of a copy taken
just before capture. Kernels and host syncs per step too. The issue's targets are
printed with whether each is met.

The run is a list of items (one ResNet-50 configuration, or one layer shape with its
four candidates); the timing items come first, the counting ones (profiler, sync
debug mode) last. The GPU time is scarce, so the run always finishes and writes its
results: the items run in a worker process; a candidate that fails (a capture, say)
becomes a row with the error's first line; a worker that dies or hangs
(:data:`ITEM_TIMEOUT`) is restarted for the items left; items not started within the
time budget (``--budget``) are listed as skipped.

Usage::

    python benchmarks/gpu.py              # all shapes; a 210 s budget, about 4 minutes in all
    python benchmarks/gpu.py --quick      # 3 layer shapes, fewer reps (a 150 s budget)
    python benchmarks/gpu.py --smoke      # CPU, gloo, tiny shapes: runs every line of
                                          # Python but the CUDA-only measurements

Results: ``<out>/gpu_<device>.md`` and ``.json`` (``--out``, default
``benchmarks/results``; ``--smoke`` writes ``gpu_smoke_cpu.*`` to a temporary folder
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import faulthandler
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import Case, distnorm_provenance, machine_info, summarize, time_interleaved  # noqa: E402
from layer import count_collectives  # noqa: E402
from model import MOMENTUM, NUM_CLASSES  # noqa: E402

DEFAULT_OUT = "distnorm-bench-results"  # in the current directory; never the checkout's results

# (C, H, W) of a layer's input: ResNet-50's stages at 224 px and an FPN level of a
# detector at 800×1216 px; in the order they run (a run out of time skips the last).
LAYER_SHAPES: list[tuple[int, int, int]] = [(256, 56, 56), (256, 100, 152), (2048, 7, 7),
                                            (64, 56, 56), (1024, 14, 14), (512, 28, 28)]
QUICK_LAYER_SHAPES = LAYER_SHAPES[:3]
SMOKE_LAYER_SHAPES = [(8, 6, 6), (16, 3, 3)]
BATCHES = (2, 32)
SMOKE_BATCHES = (2, 4)
# dtype key -> (torch dtype name, memory format name, label)
DTYPES = {"fp32": ("float32", "contiguous_format", "float32 NCHW"),
          "bf16_cl": ("bfloat16", "channels_last", "bf16 channels_last")}
MODEL_CONFIGS: list[tuple[int, str]] = [(2, "fp32"), (2, "bf16_cl"), (32, "bf16_cl")]
# bf16 autocast runs every line float32 does, and a smoke run must stay short.
SMOKE_MODEL_CONFIGS: list[tuple[int, str]] = [(2, "bf16_cl")]

BN_CANDIDATES = ("local", "torch", "distnorm")
LAYER_CANDIDATES = BN_CANDIDATES + ("floor",)
MODEL_CANDIDATES = BN_CANDIDATES
LABELS = {"local": "local BN", "torch": "torch SyncBN", "distnorm": "distnorm", "floor": "floor"}

# The compulsory traffic of a BatchNorm forward + backward, in passes over the
# activation (its dtype): read x, write y; read dy and x, write dx. The "achieved
# bandwidth" is that many bytes over the step's time (an effective bandwidth). An
# implementation whose every direction reads its input once for the sums and again
# for the elementwise pass moves 8 passes, so it tops out at 5/8 of the memory's peak.
IDEAL_PASSES = 5

# The targets (ResNet-50 step, one-rank NCCL group, synchronisation forced).
TARGET_EAGER = 0.5     # (distnorm − local) ≤ 0.5 × (torch − local), eager
TARGET_GRAPHED = 1.0   # (distnorm − local) ≤ 1.0 × (torch − local), graphed
TARGET_KERNELS = 10    # GPU kernels per layer forward + backward
TARGET_SYNCS = 0       # host synchronizations per layer forward + backward

# Graphed vs eager step from the same state: the largest relative differences still
# called equal (loss; parameter update; running statistics), per dtype. cuDNN's
# backward kernels are not bitwise deterministic, so local BN's own graphed-vs-eager
# difference is shown beside distnorm's as the noise floor.
EQUAL_TOL = {"fp32": 1e-4, "bf16_cl": 2e-2}

MAX_RESTARTS = 4
# Faults injected by the tests, ";"-separated: "exit:<item id>" ends the worker at the
# start of that item; "capture:<candidate>@<item id>" makes that capture fail.
FAULT_ENV = "DISTNORM_GPU_BENCH_FAULT"
_CURRENT_ITEM = {"id": ""}
# Seconds an item may run before its worker dumps every thread's stack and exits (a
# hang, e.g. in a collective); the first ResNet-50 item also compiles distnorm's kernels.
ITEM_TIMEOUT = {"model": 180.0, "model_counts": 120.0, "layer": 60.0, "layer_counts": 60.0}


@dataclass
class Settings:
    """Repetitions and sizes of one run (see :func:`settings_for`)."""

    layer_warmup: int
    layer_reps: int
    replay_warmup: int
    replay_reps: int
    capture_warmup: int
    model_warmup: int
    model_reps: int
    model_replay_reps: int
    layer_profile_steps: int
    model_profile_steps: int
    image_size: int
    # SGD's learning rate: small, so that some fifty steps on one fixed batch neither
    # diverge nor memorize it (the graph check then compares real gradients). At the
    # smoke run's 32 px, ResNet-50's last stage normalizes 2 values per channel, whose
    # gradients explode at any larger rate.
    lr: float


def settings_for(smoke: bool, quick: bool, reps: int | None) -> Settings:
    if smoke:
        s = Settings(1, 2, 0, 2, 1, 0, 1, 1, 1, 1, 32, 1e-5)
    elif quick:
        s = Settings(3, 10, 3, 20, 3, 2, 8, 10, 2, 1, 224, 1e-4)
    else:
        s = Settings(5, 25, 5, 50, 3, 3, 15, 25, 3, 1, 224, 1e-4)
    if reps:
        s.layer_reps = s.model_reps = reps
        s.replay_reps = s.model_replay_reps = 2 * reps
    return s


# -- errors ---------------------------------------------------------------------------------

class Poisoned(RuntimeError):
    """The device (or the group) no longer works in this process: restart the worker."""


def _fault(where: str, what: str) -> None:
    """Inject the fault :data:`FAULT_ENV` names for ``where:what``, if any."""
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        if entry == f"{where}:{what}":
            if where == "exit":
                os._exit(9)
            raise RuntimeError(f"injected fault ({entry})")


def describe(error: BaseException) -> str:
    """``Type: first line`` of an error, with the error it interrupted if any (a failed
    capture's ``capture_end`` error hides the one that broke the capture)."""
    def line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    inner = error.__cause__ or error.__context__
    if inner is not None and inner is not error:
        return f"{line(error)} (while handling {line(inner)})"
    return line(error)


# -- the device -------------------------------------------------------------------------------

class _HostMark:
    """A CPU stand-in for ``torch.cuda.Event(enable_timing=True)``."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_HostMark") -> float:
        return (end.t - self.t) * 1e3


class Device:
    """The device measured, the one-rank group, and what differs between CUDA and the
    CPU smoke run (timing marks, synchronisation, graph capture)."""

    def __init__(self, smoke: bool) -> None:
        import torch
        import torch.distributed as dist

        self.cuda = not smoke
        if self.cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device (use --smoke to check the script on CPU)")
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            self.name = torch.cuda.get_device_name(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            self.name = "cpu"
            backend = "gloo"
        from distnorm.launch.local import free_port

        init = f"tcp://127.0.0.1:{free_port()}"
        kwargs: dict[str, Any] = {"device_id": self.device} if self.cuda else {}
        try:
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1, **kwargs)
        except TypeError:  # a torch without device_id
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
        self.backend = backend
        self.group = dist.group.WORLD

    def sync(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)

    def marker(self) -> Any:
        if self.cuda:
            import torch
            return torch.cuda.Event(enable_timing=True)
        return _HostMark()

    def randn(self, shape: Sequence[int], seed: int) -> Any:
        """Standard normal float32 values, drawn with a generator of their own (a failed
        capture leaves the default CUDA generator unusable in this process)."""
        import torch

        try:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            return torch.randn(tuple(shape), generator=gen, device=self.device)
        except RuntimeError:
            gen = torch.Generator().manual_seed(seed)
            return torch.randn(tuple(shape), generator=gen).to(self.device)

    def recover(self) -> None:
        """After a failure: back on the default stream (a failed capture leaves its
        capture stream current), and check that the device and the group still work.

        Raises:
            Poisoned: they do not; the worker must be restarted.
        """
        if not self.cuda:
            return
        import torch
        import torch.distributed as dist

        try:
            torch.cuda.set_stream(torch.cuda.default_stream(self.device))
            torch.cuda.synchronize(self.device)
            probe = torch.ones(4, device=self.device)
            dist.all_reduce(probe, group=self.group)
            if float(probe.sum()) != 4.0:
                raise RuntimeError(f"a one-rank all-reduce of ones summed to {float(probe.sum())}")
        except Exception as error:  # noqa: BLE001 - any failure here means: restart
            raise Poisoned(describe(error)) from error

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _dtype(key: str) -> tuple[Any, Any]:
    import torch

    dtype, fmt, _ = DTYPES[key]
    return getattr(torch, dtype), getattr(torch, fmt)


# -- the candidates ---------------------------------------------------------------------------

def force_distnorm_sync() -> Callable[[], None]:
    """Make distnorm's layers synchronize over a group of one rank; returns the undo.

    distnorm runs a layer whose group has a single rank as local BatchNorm, with no
    collective at all — right for users, but on one GPU the only NCCL group has one
    rank (one GPU cannot hold two NCCL ranks), so the synced path would never run.
    The layers look their group up through the name ``resolve_group`` imported into
    ``distnorm.modules._base`` (and ``_mixture``); this replaces that name with a
    version that returns the group at W = 1 too.
    """
    import importlib

    import torch.distributed as dist

    from distnorm import distributed

    original = distributed.resolve_group

    def resolve_even_alone(process_group: Any = None, owner: Any = None) -> Any:
        group = original(process_group, owner)
        if group is None and dist.is_available() and dist.is_initialized():
            group = process_group if process_group is not None else dist.group.WORLD
        return group

    modules = []
    for name in ("_base", "_mixture"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"distnorm.modules.{name}"))
    saved = {m: m.resolve_group for m in modules if getattr(m, "resolve_group", None) is original}
    if not saved:
        raise RuntimeError("distnorm.modules._base no longer imports resolve_group: "
                           "force_distnorm_sync() must follow how its layers find their group")
    for module in saved:
        module.resolve_group = resolve_even_alone  # type: ignore[attr-defined]

    def undo() -> None:
        for module, fn in saved.items():
            module.resolve_group = fn  # type: ignore[attr-defined]
    return undo


_TORCH_FORCED: dict[bool, type] = {}


def torch_sync_function(cuda: bool) -> Callable[..., Any]:
    """``apply`` of torch's SyncBatchNorm autograd Function; on CPU (smoke runs, where
    its kernels do not exist) the same algorithm from ``torch_sync_bn.py``."""
    if cuda:
        from torch.nn.modules._functions import SyncBatchNorm as Function
        return Function.apply
    from torch_sync_bn import _TorchSyncBatchNormFunction

    def apply(*args: Any) -> Any:
        return _TorchSyncBatchNormFunction.apply(*args, "native")
    return apply


def torch_forced_class(cuda: bool) -> type:
    """``nn.SyncBatchNorm`` whose training forward always goes through torch's
    Function over its group: the module itself falls back to ``F.batch_norm`` at W = 1.
    The bookkeeping is the module's own (``num_batches_tracked``, momentum)."""
    if cuda in _TORCH_FORCED:
        return _TORCH_FORCED[cuda]
    import torch
    import torch.distributed as dist

    apply = torch_sync_function(cuda)

    class TorchSyncBatchNormForced(torch.nn.SyncBatchNorm):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(input)
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            factor = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats:
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / self.num_batches_tracked.item()
            group = self.process_group or dist.group.WORLD
            running_mean = self.running_mean if self.track_running_stats else None
            running_var = self.running_var if self.track_running_stats else None
            return apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                         factor, group, dist.get_world_size(group))

    _TORCH_FORCED[cuda] = TorchSyncBatchNormForced
    return TorchSyncBatchNormForced


def to_torch_sync(model: Any, cuda: bool) -> Any:
    """``convert_sync_batchnorm``, then every converted layer through torch's Function."""
    import torch

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    forced = torch_forced_class(cuda)
    for module in model.modules():
        if type(module) is torch.nn.SyncBatchNorm:
            module.__class__ = forced
    return model


@dataclass
class Runnable:
    """One candidate's step on fixed inputs. ``step`` writes what it produced into
    ``held`` (the graph's static outputs when captured); ``zero`` sets gradients to
    None (untimed; before a capture, so that backward allocates them in the graph's
    pool)."""

    name: str
    step: Callable[[], None]
    zero: Callable[[], None]
    held: dict[str, Any] = field(default_factory=dict)
    outputs: Callable[[], dict[str, Any]] = lambda: {}


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

        dtype, fmt = _dtype(dkey)
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


# -- measuring ------------------------------------------------------------------------------------

@contextlib.contextmanager
def attempt(row: dict[str, Any], phase: str, dev: Device) -> Iterator[dict[str, bool]]:
    """Run a block; on failure note ``phase: error`` in ``row["errors"]`` and go on
    (``Poisoned`` propagates: the worker must restart)."""
    box = {"ok": False}
    try:
        yield box
        box["ok"] = True
    except Poisoned:
        raise
    except Exception as error:  # noqa: BLE001 - a failing candidate is a result
        row.setdefault("errors", {})[phase] = describe(error)
        print(f"    {row.get('candidate')}: {phase} failed: {describe(error)}", file=sys.stderr)
        traceback.print_exc(limit=6, file=sys.stderr)
        dev.recover()


def time_steps(cases: dict[str, tuple[Callable[[], None], Callable[[], None]]], dev: Device,
               reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per step of each case, interleaved rep by rep (``_common.time_interleaved``).

    Each case is ``(step, zero)``. Before every step ``zero`` runs and the device
    synchronizes (untimed), so each step starts on an idle GPU; the step is timed by
    two device marks (CUDA events) around it — its span on the GPU, host launch gaps
    included — and ``host_ms`` is the host time to issue it.
    """
    marks: dict[str, list[tuple[Any, Any]]] = {name: [] for name in cases}

    def timed(name: str, step: Callable[[], None]) -> Callable[[Callable[[str], None]], None]:
        def run(_lap: Callable[[str], None]) -> None:
            start, end = dev.marker(), dev.marker()
            start.record()
            step()
            end.record()
            marks[name].append((start, end))
        return run

    def before(zero: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            zero()
            dev.sync()
        return run

    host = time_interleaved([Case(name, timed(name, step), before(zero))
                             for name, (step, zero) in cases.items()], reps=reps, warmup=warmup)
    dev.sync()
    host_ms = summarize([host])
    out = {}
    for name in cases:
        ms = [start.elapsed_time(end) for start, end in marks[name][-reps:]]
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        out[name] = {"ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2],
                     "host_ms": host_ms[name]["total"]["median_ms"], "reps": reps}
    return out


def time_group(cases: dict[str, tuple[Callable[[], None], Callable[[], None]]],
               rows: dict[str, dict[str, Any]], key: str, dev: Device, reps: int,
               warmup: int) -> None:
    """:func:`time_steps` into ``rows[name][key]``; if the interleaved run fails, each
    case alone, so that a failure is charged to its candidate."""
    if not cases:
        return
    try:
        result = time_steps(cases, dev, reps, warmup)
    except Poisoned:
        raise
    except Exception as error:  # noqa: BLE001 - find out which candidate failed
        print(f"    interleaved timing failed ({describe(error)}); timing each alone",
              file=sys.stderr)
        dev.recover()
        result = {}
        for name, case in cases.items():
            with attempt(rows[name], key, dev):
                result.update(time_steps({name: case}, dev, reps, warmup))
    for name, value in result.items():
        rows[name][key] = value


def capture(run: Runnable, dev: Device, warmup: int,
            ready: Callable[[], None] | None = None) -> tuple[Callable[[], None], str]:
    """``run.step`` captured in a CUDA graph as torch's documentation shows (warm-up on a
    side stream, gradients None before capture); returns the replay and the capture
    mode that worked. "global" is tried first, then "thread_local" (which tolerates
    CUDA calls from other threads, e.g. a communicator's watchdog, during capture).
    ``ready`` runs between the warm-up and the capture (e.g. to snapshot the state the
    first replay starts from: capturing records the step without running it).

    On CPU (smoke runs) nothing is captured: the "replay" runs the step eagerly, so
    that everything around it is exercised.
    """
    _fault("capture", f"{run.name}@{_CURRENT_ITEM['id']}")
    if not dev.cuda:
        def replay() -> None:
            run.zero()
            run.step()
        for _ in range(warmup):
            replay()
        run.zero()
        if ready is not None:
            ready()
        return replay, "emulated on CPU"
    import torch

    errors = []
    for mode in ("global", "thread_local"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run.zero()
                run.step()
        torch.cuda.current_stream().wait_stream(side)
        run.zero()
        if ready is not None:
            dev.sync()
            ready()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):
                run.step()
        except Exception as error:  # noqa: BLE001 - reported; the next mode is tried
            errors.append(f"[{mode}] {describe(error)}")
            graph = None  # drops the failed graph and its memory pool
            dev.recover()
            continue
        return graph.replay, mode
    raise RuntimeError("capture failed: " + "; ".join(errors))


def count_device_work(run: Runnable, dev: Device, steps: int) -> dict[str, Any]:
    """GPU kernels, memcpys and memsets per step, from torch.profiler (CPU activity
    only in smoke runs, where every count is 0)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # past the first calls (compiles, first-call checks)
        run.zero()
        run.step()
    dev.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.zero()
            run.step()
        dev.sync()
    counts, names = classify_device_events(raw_profiler_events(prof))
    out: dict[str, Any] = {k: v / steps for k, v in counts.items()}
    out["kernel_names"] = {name: n / steps for name, n in names.most_common(40)}
    return out


def raw_profiler_events(prof: Any) -> list[Any]:
    """The profiler's events with ``name()``, ``device_type()`` (and, where torch has
    it, ``activity_type()``): kineto's own, else adapted FunctionEvents."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        return list(results.events())

    class _Adapted:
        def __init__(self, evt: Any) -> None:
            self.evt = evt

        def name(self) -> str:
            return self.evt.name

        def device_type(self) -> Any:
            return self.evt.device_type
    return [_Adapted(e) for e in prof.events()]


_ACTIVITY_KIND = {"kernel": "kernels", "concurrent_kernel": "kernels", "gpu_memcpy": "memcpy",
                  "gpu_memset": "memset"}


def classify_device_events(events: Sequence[Any]) -> tuple[dict[str, int], collections.Counter]:
    """Count device activities: ``kernels``, ``memcpy``, ``memset`` (and kernel names).

    Kineto's activity type decides where torch reports it ("kernel", "gpu_memcpy",
    "gpu_memset"; anything else — CPU ops, runtime calls — is not device work);
    otherwise an event on a CUDA device is a memcpy or memset by its name
    ("Memcpy HtoD ...", "Memset (Device)"), else a kernel.
    """
    counts = {"kernels": 0, "memcpy": 0, "memset": 0}
    names: collections.Counter = collections.Counter()
    for event in events:
        kind = None
        activity = getattr(event, "activity_type", None)
        activity = str(activity()).lower() if callable(activity) else None
        if activity is not None and activity not in ("", "unknown"):
            kind = _ACTIVITY_KIND.get(activity.split(".")[-1])
        elif "cuda" in str(event.device_type()).lower():
            name = event.name()
            kind = ("memcpy" if name.lower().startswith("memcpy")
                    else "memset" if name.lower().startswith("memset") else "kernels")
        if kind is None:
            continue
        counts[kind] += 1
        if kind == "kernels":
            names[_short_kernel_name(event.name())] += 1
    return counts, names


def _short_kernel_name(name: str) -> str:
    """A kernel's name without its template arguments and parameters."""
    name = re.sub(r"^void ", "", name)
    depth, out = 0, []
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip()[:80] or name[:80]


def count_host_syncs(run: Runnable, dev: Device, steps: int) -> dict[str, Any]:
    """Host synchronizations per step, from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    import torch

    for _ in range(2):
        run.zero()
        run.step()
    dev.sync()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                run.zero()
                run.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dev.sync()
    syncs = sync_warnings([str(w.message) for w in caught])
    return {"host_syncs": len(syncs) / steps, "sync_examples": syncs[:3]}


def sync_warnings(messages: Sequence[str]) -> list[str]:
    """The first lines of the warnings that ``set_sync_debug_mode("warn")`` issues
    ("called a synchronizing CUDA operation"), among any others."""
    return [m.strip().splitlines()[0][:160] for m in messages
            if "synchroniz" in m.lower() and "cuda" in m.lower()]


def relative_error(a: Any, b: Any) -> float | None:
    """max |a − b| / max |b| in float64 (None when either is missing)."""
    if a is None or b is None:
        return None
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _warned(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:200]}"
        if text not in seen:
            seen.append(text)
    return seen[:5]


# -- the items ------------------------------------------------------------------------------------

def _layer_inputs(item: dict[str, Any], dev: Device) -> tuple[Any, Any]:
    dtype, fmt = _dtype(item["dtype"])
    shape = [item["batch"], *item["shape"]]
    seed = 1000 + 7 * item["batch"] + item["shape"][0]
    x = dev.randn(shape, seed).to(dtype=dtype, memory_format=fmt)
    dy = dev.randn(shape, seed + 1).to(dtype=dtype, memory_format=fmt)
    return x, dy


def _row(item: dict[str, Any], candidate: str) -> dict[str, Any]:
    row = {"kind": item["kind"].replace("_counts", ""), "candidate": candidate,
           "batch": item["batch"], "dtype": item["dtype"], "errors": {}}
    if "shape" in item:
        row["shape"] = [item["batch"], *item["shape"]]
    return row


def _first_calls(runs: dict[str, Runnable], rows: dict[str, dict[str, Any]], dev: Device,
                 key: str) -> None:
    """One step of each candidate (compiles, first-call checks), with the collectives it
    issued (evidence that the synced ones synchronized); drops the failures."""
    for name in list(runs):
        log: list[dict[str, Any]] = []
        with attempt(rows[name], "first step", dev) as ok, \
                warnings.catch_warnings(record=True) as caught, count_collectives(log, ["step"]):
            warnings.simplefilter("always")
            start = time.perf_counter()
            runs[name].zero()
            runs[name].step()
            dev.sync()
            rows[name][key] = time.perf_counter() - start
        if caught:
            rows[name]["warnings"] = _warned(caught)
        rows[name]["collectives"] = (
            [f"{op['op']} {op['dtype']}×{op['numel']}" for op in log] if len(log) <= 8
            else dict(collections.Counter(f"{op['op']} {op['dtype']}" for op in log)))
        if not ok["ok"]:
            del runs[name]


def run_layer(item: dict[str, Any], dev: Device, s: Settings) -> list[dict[str, Any]]:
    """One layer shape: eager and graphed timings, agreement with local BN."""
    x, dy = _layer_inputs(item, dev)
    rows = {name: _row(item, name) for name in LAYER_CANDIDATES}
    runs: dict[str, Runnable] = {}
    for name in LAYER_CANDIDATES:
        with attempt(rows[name], "build", dev):
            runs[name] = layer_candidate(name, x, dy, dev)
    _first_calls(runs, rows, dev, "first_step_s")
    if "local" in runs:
        reference = runs["local"].outputs()
        for name in ("torch", "distnorm"):
            if name in runs:
                got = runs[name].outputs()
                rows[name]["parity"] = {k: relative_error(got[k], reference[k]) for k in reference}

    time_group({n: (r.step, r.zero) for n, r in runs.items()}, rows, "eager", dev,
               s.layer_reps, s.layer_warmup)
    replays = {}
    for name, run in runs.items():
        with attempt(rows[name], "capture", dev) as ok:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                replay, mode = capture(run, dev, s.capture_warmup)
        if caught:  # e.g. distnorm's notice that a kernel fell back to eager ops
            rows[name]["capture_warnings"] = _warned(caught)
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
    rows = {name: _row(item, name) for name in LAYER_CANDIDATES}
    for name in LAYER_CANDIDATES:
        with attempt(rows[name], "build", dev):
            run = layer_candidate(name, x, dy, dev)
        if name not in rows or "build" in rows[name]["errors"]:
            continue
        with attempt(rows[name], "profile", dev):
            rows[name]["counts"] = count_device_work(run, dev, s.layer_profile_steps)
        if dev.cuda:
            with attempt(rows[name], "sync count", dev):
                rows[name].update(count_host_syncs(run, dev, s.layer_profile_steps))
    return list(rows.values())


def _model_inputs(item: dict[str, Any], dev: Device, s: Settings) -> tuple[Any, Any]:
    import torch

    _, fmt = _dtype(item["dtype"])
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
    rows = {name: _row(item, name) for name in MODEL_CANDIDATES}
    trainers: dict[str, Trainer] = {}
    for name in MODEL_CANDIDATES:
        with attempt(rows[name], "build", dev):
            trainers[name] = Trainer(name, item["dtype"], x, target, dev, s.lr)
    runs = {name: t.runnable() for name, t in trainers.items()}
    _first_calls(runs, rows, dev, "first_step_s")
    time_group({n: (r.step, r.zero) for n, r in runs.items()}, rows, "eager", dev,
               s.model_reps, s.model_warmup)

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
            rows[name]["capture_warnings"] = _warned(caught)
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
    rows = {name: _row(item, name) for name in MODEL_CANDIDATES}
    for name in MODEL_CANDIDATES:
        with attempt(rows[name], "build", dev) as ok:
            run = Trainer(name, item["dtype"], x, target, dev, s.lr).runnable()
        if not ok["ok"]:
            continue
        with attempt(rows[name], "profile", dev):
            rows[name]["counts"] = count_device_work(run, dev, s.model_profile_steps)
        if dev.cuda:
            with attempt(rows[name], "sync count", dev):
                rows[name].update(count_host_syncs(run, dev, s.model_profile_steps))
        del run
    return list(rows.values())


RUNNERS = {"model": run_model, "layer": run_layer, "layer_counts": run_layer_counts,
           "model_counts": run_model_counts}


# -- the worker -------------------------------------------------------------------------------

def worker_meta(dev: Device, smoke: bool) -> dict[str, Any]:
    import torch

    import distnorm
    from distnorm import kernels

    meta: dict[str, Any] = dict(machine_info(), **distnorm_provenance())
    meta.update(device=dev.name, backend=dev.backend, smoke=smoke,
                distnorm_compiled_kernels=kernels.enabled(),
                distnorm_version=getattr(distnorm, "__version__", None))
    try:
        import torchvision
        meta["torchvision"] = torchvision.__version__
    except ImportError:
        meta["torchvision"] = None
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}",
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return meta


def _dynamo_counters() -> dict[str, Any]:
    """torch.compile's counters in this worker (graphs compiled, recompilations): how
    much of distnorm's compiled work ran, and whether a cache limit was hit."""
    try:
        from torch._dynamo.utils import counters
        return {group: dict(values) for group, values in counters.items()
                if group in ("stats", "frames", "recompiles", "graph_break", "inductor")
                and values}
    except Exception as error:  # noqa: BLE001 - informational only
        return {"error": describe(error)}


def worker_main(plan_path: str) -> int:
    """Run the plan's items in order, one JSON line per event in the results file.

    Returns 0, or 3 when the device stopped working (the parent restarts a worker
    for the items left).
    """
    with open(plan_path) as f:
        plan = json.load(f)
    settings = Settings(**plan["settings"])
    smoke = plan["smoke"]
    if smoke:
        # Tiny CPU tensors stay below distnorm's compile threshold anyway; this keeps a
        # smoke run from ever waiting on a C++ compiler.
        os.environ.setdefault("DISTNORM_COMPILE", "0")
        import torch
        # One thread: on a busy machine, OpenMP threads spinning on shared cores make
        # steps 10× slower and erratic (a smoke run measures nothing anyway).
        torch.set_num_threads(1)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    out = open(plan["results"], "a", buffering=1)

    def emit(record: dict[str, Any]) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    dev = Device(smoke)
    force_distnorm_sync()
    emit({"event": "meta", "meta": worker_meta(dev, smoke)})
    code = 0
    try:
        for item in plan["items"]:
            if time.time() > item["deadline"]:
                emit({"event": "skipped", "id": item["id"], "reason": "time budget"})
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {item['id']}", file=sys.stderr, flush=True)
            emit({"event": "start", "id": item["id"]})
            _CURRENT_ITEM["id"] = item["id"]
            _fault("exit", item["id"])
            start = time.perf_counter()
            faulthandler.dump_traceback_later(ITEM_TIMEOUT[item["kind"]], exit=True)
            try:
                rows = RUNNERS[item["kind"]](item, dev, settings)
                emit({"event": "result", "id": item["id"], "rows": rows,
                      "seconds": time.perf_counter() - start})
            except Poisoned as error:
                emit({"event": "died", "id": item["id"], "error": f"device unusable: {error}"})
                code = 3
                break
            except Exception as error:  # noqa: BLE001 - the item fails, the run goes on
                traceback.print_exc(file=sys.stderr)
                emit({"event": "died", "id": item["id"], "error": describe(error)})
                try:
                    dev.recover()
                except Poisoned:
                    code = 3
                    break
            finally:
                faulthandler.cancel_dump_traceback_later()
            if dev.cuda:
                import torch
                torch.cuda.empty_cache()
        emit({"event": "compiles", "counters": _dynamo_counters()})
    finally:
        out.close()
    if code == 0:
        dev.close()
    return code


# -- the parent: planning, supervising, reporting -----------------------------------------------

def plan_items(smoke: bool, quick: bool, only: str | None, budget: float,
               start: float) -> list[dict[str, Any]]:
    """Timing items first, then the counting ones (the profiler's CUPTI, once loaded,
    may slow later launches), each with the time after which it is skipped."""
    shapes = SMOKE_LAYER_SHAPES if smoke else QUICK_LAYER_SHAPES if quick else LAYER_SHAPES
    batches = SMOKE_BATCHES if smoke else BATCHES
    models = SMOKE_MODEL_CONFIGS if smoke else MODEL_CONFIGS
    # Keep time for the counts at the end (they are among the targets).
    timing_deadline = start + budget - min(65.0, 0.3 * budget)
    count_deadline = start + budget
    items: list[dict[str, Any]] = []
    if only in (None, "model"):
        items += [{"kind": "model", "batch": b, "dtype": d, "deadline": timing_deadline}
                  for b, d in models]
    if only in (None, "layers"):
        items += [{"kind": "layer", "batch": b, "dtype": d, "shape": list(sh), "deadline": timing_deadline}
                  for sh in shapes for b in batches for d in DTYPES]
        items += [{"kind": "layer_counts", "batch": b, "dtype": d, "shape": list(sh),
                   "deadline": count_deadline} for sh in shapes for b in batches for d in DTYPES]
    if only in (None, "model"):
        items += [{"kind": "model_counts", "batch": b, "dtype": d, "deadline": count_deadline}
                  for b, d in models]
    for item in items:
        where = "x".join(map(str, [item["batch"], *item.get("shape", [])]))
        item["id"] = f"{item['kind']} {where} {item['dtype']}"
    return items


def _child_env() -> dict[str, str]:
    """The worker's environment: this one, plus the checkout on PYTHONPATH when
    distnorm is not installed (``python benchmarks/gpu.py`` from a checkout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    checkout = os.path.dirname(HERE)
    if (importlib.util.find_spec("distnorm") is None
            and os.path.isdir(os.path.join(checkout, "distnorm"))):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (checkout, env.get("PYTHONPATH")) if p)
    return env


def _run_worker(plan: dict[str, Any], workdir: str, attempt_no: int,
                timeout: float) -> tuple[int | None, list[str]]:
    """Start a worker on ``plan``; echo its output; return its exit code (None: killed
    at the timeout) and its last lines."""
    plan_path = os.path.join(workdir, f"plan{attempt_no}.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", plan_path],
                            env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    tail: collections.deque = collections.deque(maxlen=30)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(line)
        sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    reader.join(timeout=10)
    return code, list(tail)


def _read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a dying worker
                pass
    return records


def supervise(items: list[dict[str, Any]], settings: Settings, smoke: bool,
              budget: float, start: float) -> list[dict[str, Any]]:
    """Run ``items`` in workers, restarting one that dies; every item ends up with a
    result, a skip or a failure record."""
    workdir = tempfile.mkdtemp(prefix="distnorm-gpu-")
    results = os.path.join(workdir, "results.jsonl")
    remaining = list(items)
    extra: list[dict[str, Any]] = []
    for attempt_no in range(MAX_RESTARTS + 1):
        plan = {"items": remaining, "settings": vars(settings), "smoke": smoke, "results": results}
        timeout = max(start + budget - time.time(), 0) + 150.0
        code, tail = _run_worker(plan, workdir, attempt_no, timeout)
        records = _read_records(results)
        finished = {r["id"] for r in records if r["event"] in ("result", "skipped", "died")}
        started = [r["id"] for r in records if r["event"] == "start"]
        remaining = [i for i in remaining if i["id"] not in finished]
        if not remaining:
            break
        lost = next((i for i in reversed(started) if i not in finished), None)
        why = ("killed at the time limit" if code is None else f"exited with code {code}")
        # faulthandler's "Timeout (0:01:30)!" says the item hung; else its last words.
        last = next((line for line in tail if line.startswith("Timeout (")), None) or \
            next((line for line in reversed(tail) if line.strip()), "")
        if lost is not None:  # it died inside this item: charge it, go on with the rest
            extra.append({"event": "died", "id": lost, "error": f"worker {why}; last output: {last}"})
            remaining = [i for i in remaining if i["id"] != lost]
        elif code != 3:  # it could not even start an item: no point in retrying
            extra += [{"event": "died", "id": i["id"], "error": f"worker {why} before this item; "
                       f"last output: {last}"} for i in remaining]
            remaining = []
        if not remaining:
            break
        if time.time() > start + budget:
            extra += [{"event": "skipped", "id": i["id"], "reason": "time budget"} for i in remaining]
            remaining = []
            break
        print(f"worker {why}; restarting for {len(remaining)} items", file=sys.stderr, flush=True)
    extra += [{"event": "died", "id": i["id"], "error": "not run: the worker kept dying"}
              for i in remaining]
    return _read_records(results) + extra


def collect(records: list[dict[str, Any]], items: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the workers' records: rows by kind (counts folded into the timing rows),
    failures and skips."""
    meta = next((r["meta"] for r in records if r["event"] == "meta"), {})
    meta["compile_counters"] = [r["counters"] for r in records if r["event"] == "compiles"]
    meta["workers_started"] = sum(1 for r in records if r["event"] == "meta")
    meta["item_seconds"] = {r["id"]: round(r["seconds"], 2) for r in records if r["event"] == "result"}
    by_id = {i["id"]: i for i in items}
    merged: dict[tuple, dict[str, Any]] = {}
    failures, skipped = [], []
    for record in records:
        if record["event"] == "result":
            for row in record["rows"]:
                key = (row["kind"], row["candidate"], row["batch"], row["dtype"],
                       tuple(row.get("shape", ())))
                into = merged.setdefault(key, {"errors": {}})
                errors = {**into.get("errors", {}), **row.get("errors", {})}
                into.update(row)
                into["errors"] = errors
        elif record["event"] == "skipped":
            skipped.append({"id": record["id"], "reason": record.get("reason", "")})
        elif record["event"] == "died":
            failures.append({"id": record["id"], "error": record["error"]})
    for record in failures:  # a failed item still has its rows, each with the error
        item = by_id.get(record["id"])
        if item is None:
            continue
        names = MODEL_CANDIDATES if item["kind"].startswith("model") else LAYER_CANDIDATES
        for name in names:
            row = _row(item, name)
            key = (row["kind"], name, row["batch"], row["dtype"], tuple(row.get("shape", ())))
            into = merged.setdefault(key, row)
            into.setdefault("errors", {})[item["kind"]] = record["error"]
    rows = list(merged.values())
    return {"meta": meta, "layers": [r for r in rows if r["kind"] == "layer"],
            "models": [r for r in rows if r["kind"] == "model"],
            "failures": failures, "skipped": skipped}


def _ms(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or key not in row:
        return None
    return row[key]["ms"]


def _overhead_ratio(d: float | None, t: float | None, loc: float | None) -> float | None:
    """(distnorm − local) / (torch − local); None when undefined (torch no slower)."""
    if None in (d, t, loc) or t - loc <= 0:  # type: ignore[operator]
        return None
    return (d - loc) / (t - loc)  # type: ignore[operator]


def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    out: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["batch"], r["dtype"], tuple(r.get("shape", ()))), {})[r["candidate"]] = r
    return out


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met
    (``None``: not measured)."""
    targets = []
    models = _index(report["models"])
    for key in sorted(models):
        batch, dkey, _ = key
        c = models[key]
        label = f"batch {batch}, {DTYPES[dkey][2]}"
        for mode, factor in (("eager", TARGET_EAGER), ("graphed", TARGET_GRAPHED)):
            loc, t, d = (_ms(c.get(n), mode) for n in MODEL_CANDIDATES)
            met = None if None in (loc, t, d) else (d - loc) <= factor * (t - loc)  # type: ignore[operator]
            measured = ("not measured" if met is None else
                        f"distnorm − local = {d - loc:.2f} ms; {factor:g} × (torch − local) = "  # type: ignore[operator]
                        f"{factor * (t - loc):.2f} ms")  # type: ignore[operator]
            targets.append({"target": f"ResNet-50 step {mode}, {label}: distnorm − local ≤ "
                            f"{factor:g} × (torch SyncBN − local)", "measured": measured, "met": met})
        check = (c.get("distnorm") or {}).get("graph_check")
        if check is not None:
            tol = EQUAL_TOL[dkey]
            local_check = (c.get("local") or {}).get("graph_check") or {}
            floor = max(tol, 10 * local_check.get("update_rel", 0.0))
            met = check["loss_rel"] <= tol and check["update_rel"] <= floor
            targets.append({"target": f"ResNet-50 step graphed = eager (distnorm), {label}",
                            "measured": f"loss {check['loss_rel']:.1e}, update {check['update_rel']:.1e}, "
                                        f"running stats {check['running_rel']:.1e} (relative; "
                                        f"local BN's update {local_check.get('update_rel', float('nan')):.1e}"
                                        f"; tolerance {floor:.0e})", "met": met})
    if report["meta"].get("smoke"):  # nothing a smoke run measures can meet a target
        for target in targets:
            target["met"] = None
            target["measured"] = f"smoke run: {target['measured']}"
    layers = [r for r in report["layers"] if r["candidate"] == "distnorm"]
    kernels = [r["counts"]["kernels"] for r in layers if "counts" in r]
    syncs = [r["host_syncs"] for r in layers if "host_syncs" in r]
    measured_on_cpu = report["meta"].get("smoke")
    targets.append({"target": f"≤ {TARGET_KERNELS} GPU kernels per layer forward + backward (distnorm)",
                    "measured": (f"{min(kernels):g}–{max(kernels):g} over {len(kernels)} shapes"
                                 if kernels and not measured_on_cpu else "not measured"),
                    "met": (max(kernels) <= TARGET_KERNELS) if kernels and not measured_on_cpu else None})
    targets.append({"target": "0 host syncs per layer forward + backward (distnorm)",
                    "measured": (f"{min(syncs):g}–{max(syncs):g} over {len(syncs)} shapes"
                                 if syncs else "not measured"),
                    "met": (max(syncs) <= TARGET_SYNCS) if syncs else None})
    return targets


def _f(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _cell(row: dict[str, Any] | None, key: str, spec: str = ".2f") -> str:
    """A time cell: the value, "fail" when that phase failed, "—" when not measured."""
    if row is None:
        return "—"
    if key in row:
        return format(row[key]["ms"], spec)
    errors = row.get("errors", {})
    phases = {"eager": ("build", "first step", "eager", "layer", "model"),
              "graphed": ("build", "first step", "capture", "graph check", "graphed", "layer", "model")}
    return "fail" if any(p in errors for p in phases.get(key, ())) else "—"


def _count(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "—"
    if key == "host_syncs":
        return _f(row.get("host_syncs"), "g")
    counts = row.get("counts")
    return "—" if counts is None else format(counts[key], "g")


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    smoke = meta.get("smoke")
    s = report["settings"]
    title = "# GPU benchmark" + (" — smoke run on CPU (not a measurement)" if smoke else f": {meta.get('device', '?')}")
    versions = [f"torch {meta.get('torch')}"]
    if meta.get("cuda"):
        versions.append(f"CUDA {meta['cuda']}, cuDNN {meta.get('cudnn')}, NCCL {meta.get('nccl')}")
    versions += [f"triton {meta.get('triton')}", f"torchvision {meta.get('torchvision')}",
                 f"Python {meta.get('python')}"]
    lines = [title, "",
             f"{', '.join(versions)}; {meta.get('cpu_count')} CPU cores; {meta.get('date')}."]
    if meta.get("git_head"):
        dirty = " + uncommitted changes" if meta.get("distnorm_uncommitted_changes") else ""
        lines.append(f"distnorm at commit {meta['git_head'][:10]}{dirty}; compiled kernels "
                     f"{'on' if meta.get('distnorm_compiled_kernels') else 'off'}.")
    lines += [
        "",
        (f"One device, a one-rank {meta.get('backend', '?').upper()} group. torch's SyncBatchNorm "
         "(its autograd Function) and distnorm's SyncBatchNorm synchronize over it; both would "
         "otherwise run as local BatchNorm at W = 1. floor = one all-reduce of 2C + 1 float64 and "
         "one of 2C float32 numbers, alone. Times: median ms (CUDA events; the GPU idle before "
         "each step), candidates interleaved rep by rep; eager "
         f"{s['layer_reps']} reps per layer and {s['model_reps']} per step, graphed = the step "
         f"captured in a CUDA graph, {s['replay_reps']} / {s['model_replay_reps']} replays."),
    ]
    if smoke:
        lines += ["", ("**Smoke run**: CPU tensors, a gloo group, tiny shapes; torch's Function is "
                       "replaced by its CPU re-implementation (torch_sync_bn.py), \"graphed\" steps "
                       "run eagerly, and kernel and host-sync counts are not measured. It checks "
                       "that the script runs; its numbers mean nothing.")]
    lines += ["", "## Targets (issue 16)", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "—" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")

    models = _index(report["models"])
    if models:
        lines += ["", "## ResNet-50 training step (forward + backward + SGD), ms", "",
                  ("| batch, dtype | local eager | torch eager | distnorm eager | local graphed | "
                   "torch graphed | distnorm graphed | eager (d−l)/(t−l) | graphed (d−l)/(t−l) | "
                   "distnorm / torch eager | graphed |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(models):
            c = models[key]
            rl, rt, rd = (c.get(n) for n in MODEL_CANDIDATES)
            cells = [f"{key[0]}, {DTYPES[key[1]][2]}"]
            cells += [_cell(r, "eager") for r in (rl, rt, rd)] + [_cell(r, "graphed") for r in (rl, rt, rd)]
            for mode in ("eager", "graphed"):
                cells.append(_f(_overhead_ratio(_ms(rd, mode), _ms(rt, mode), _ms(rl, mode))))
            for mode in ("eager", "graphed"):
                d, t = _ms(rd, mode), _ms(rt, mode)
                cells.append(_f(None if None in (d, t) else d / t))  # type: ignore[operator]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", ("Per step: GPU kernels (memcpy + memset), host syncs, host time to issue "
                       "the eager step (ms), first step (s: compiles, first-call checks), and the "
                       "graphed step against an eager step from the same state (relative "
                       "difference of the loss / the parameter update)."), "",
                  "| batch, dtype | candidate | kernels | memcpy + memset | host syncs | host ms | first step s | graphed vs eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in sorted(models):
            for name in MODEL_CANDIDATES:
                r = models[key].get(name) or {}
                counts = r.get("counts")
                check = r.get("graph_check")
                lines.append("| " + " | ".join([
                    f"{key[0]}, {DTYPES[key[1]][2]}", LABELS[name], _count(r, "kernels"),
                    "—" if counts is None else f"{counts['memcpy'] + counts['memset']:g}",
                    _count(r, "host_syncs"), _f(r.get("eager", {}).get("host_ms")),
                    _f(r.get("first_step_s"), ".1f"),
                    "—" if check is None else f"{check['loss_rel']:.1e} / {check['update_rel']:.1e}",
                ]) + " |")

    layers = _index(report["layers"])
    for dkey in DTYPES:
        keys = sorted(k for k in layers if k[1] == dkey)
        if not keys:
            continue
        lines += ["", f"## Per layer, {DTYPES[dkey][2]}: forward + backward, ms", "",
                  ("| N×C×H×W | local | torch | distnorm | floor | local graphed | torch graphed | "
                   "distnorm graphed | floor graphed | distnorm / torch eager | graphed | "
                   "(d−l)/(t−l) eager | graphed |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            c = layers[key]
            cells = ["×".join(map(str, key[2]))]
            cells += [_cell(c.get(n), "eager") for n in LAYER_CANDIDATES]
            cells += [_cell(c.get(n), "graphed") for n in LAYER_CANDIDATES]
            for mode in ("eager", "graphed"):
                d, t = _ms(c.get("distnorm"), mode), _ms(c.get("torch"), mode)
                cells.append(_f(None if None in (d, t) else d / t))  # type: ignore[operator]
            for mode in ("eager", "graphed"):
                cells.append(_f(_overhead_ratio(*(_ms(c.get(n), mode) for n in ("distnorm", "torch", "local")))))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", (f"### Per layer, {DTYPES[dkey][2]}: GPU kernels (memcpy + memset) and host "
                       "syncs per forward + backward; host ms to issue the eager step; agreement "
                       "with local BN on the first step (max relative difference of y / dx)"), "",
                  ("| N×C×H×W | kernels local / torch / distnorm / floor | memcpy + memset "
                   "local / torch / distnorm / floor | host syncs local / torch / distnorm | "
                   "host ms local / torch / distnorm | torch vs local | distnorm vs local |"),
                  "|---|---|---|---|---|---|---|"]
        for key in keys:
            c = layers[key]
            other = []
            for n in LAYER_CANDIDATES:
                counts = (c.get(n) or {}).get("counts")
                other.append("—" if counts is None else f"{counts['memcpy'] + counts['memset']:g}")
            parity = []
            for n in ("torch", "distnorm"):
                p = (c.get(n) or {}).get("parity")
                parity.append("—" if not p else f"{_f(p.get('y'), '.1e')} / {_f(p.get('dx'), '.1e')}")
            lines.append("| " + " | ".join([
                "×".join(map(str, key[2])),
                " / ".join(_count(c.get(n), "kernels") for n in LAYER_CANDIDATES),
                " / ".join(other),
                " / ".join(_count(c.get(n), "host_syncs") for n in BN_CANDIDATES),
                " / ".join(_f((c.get(n) or {}).get("eager", {}).get("host_ms")) for n in BN_CANDIDATES),
                *parity]) + " |")

    big = [k for k in layers if k[0] == max((k[0] for k in layers), default=0)]
    if big:
        lines += ["", (f"## Achieved memory bandwidth, batch {big[0][0]}, GB/s "
                       f"({IDEAL_PASSES} passes over the activation — read x, write y; read dy "
                       "and x, write dx — divided by the step's time; an implementation that "
                       "reads its input twice per direction moves 8, so it tops out at 5/8 of "
                       "the memory's peak)"), "",
                  "| N×C×H×W, dtype | MB per pass | local eager / graphed | torch eager / graphed | distnorm eager / graphed |",
                  "|---|---|---|---|---|"]
        for key in sorted(big, key=lambda k: (k[1], -math.prod(k[2]))):
            c = layers[key]
            cells = [f"{'×'.join(map(str, key[2]))}, {DTYPES[key[1]][2]}"]
            ref = c.get("local") or {}
            cells.append(_f(ref["ideal_bytes"] / IDEAL_PASSES / 1e6, ".0f") if "ideal_bytes" in ref else "—")
            for n in BN_CANDIDATES:
                r = c.get(n) or {}
                cells.append(" / ".join(_f(r.get(m, {}).get("gb_per_s"), ".0f") for m in ("eager", "graphed")))
            lines.append("| " + " | ".join(cells) + " |")

    errors = [(r, phase, msg) for r in report["layers"] + report["models"]
              for phase, msg in sorted(r.get("errors", {}).items())
              if phase not in RUNNERS]  # a whole item's failure is listed once, below
    if errors or report["failures"]:
        lines += ["", "## Failures", ""]
        for r, phase, msg in errors:
            where = "×".join(map(str, r.get("shape", [r["batch"]])))
            lines.append(f"- {r['kind']} {where} {DTYPES[r['dtype']][2]}, {LABELS[r['candidate']]}, "
                         f"{phase}: `{msg}`")
        for f in report["failures"]:
            lines.append(f"- item {f['id']}: `{f['error']}`")
    # (torch's Function always communicates; layer.count_collectives may not see the
    # all-gather variant a torch version calls.)
    if any(r["candidate"] == "distnorm" and r.get("collectives") == []
           for r in report["layers"] + report["models"]):
        lines += ["", ("**distnorm issued no collective at its first step**: its rows measure "
                       "local BatchNorm, not synchronisation (force_distnorm_sync failed).")]
    warned = sorted({(LABELS[r["candidate"]], when, w) for r in report["layers"] + report["models"]
                     for when, key in (("first step", "warnings"), ("capture", "capture_warnings"))
                     for w in r.get(key, [])})
    if warned:
        lines += ["", "## Warnings", ""] + [f"- {n}, {when}: `{w}`" for n, when, w in warned]
    if report["skipped"]:
        lines += ["", f"## Skipped ({len(report['skipped'])} items: time budget)", "",
                  ", ".join(s["id"] for s in report["skipped"])]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    """The targets, for the end of the output."""
    lines = ["", "Targets (issue 16):"]
    for t in report["targets"]:
        met = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        lines.append(f"  [{met}] {t['target']}: {t['measured']}")
    if report["failures"] or any(r.get("errors") for r in report["layers"] + report["models"]):
        lines.append("  (some candidates failed: see the Failures section)")
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 layer shapes, fewer reps")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, tiny shapes: check the script (no CUDA needed)")
    parser.add_argument("--out", default=None,
                        help="results folder (default: ./distnorm-bench-results; --smoke: a temporary folder)")
    parser.add_argument("--only", choices=("layers", "model"), default=None,
                        help="only the per-layer or only the ResNet-50 part")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which items not yet started are skipped "
                             "(default 210; --quick 150)")
    parser.add_argument("--reps", type=int, default=None, help="timed eager reps (replays: twice as many)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if not args.smoke:
        import torch  # only to ask; the workers use the device

        if not torch.cuda.is_available():
            parser.error("no CUDA device here; --smoke checks the script on CPU")
    start = time.time()
    budget = args.budget or (600.0 if args.smoke else 150.0 if args.quick else 210.0)
    out = args.out or (tempfile.mkdtemp(prefix="distnorm-gpu-smoke-") if args.smoke else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    settings = settings_for(args.smoke, args.quick, args.reps)
    items = plan_items(args.smoke, args.quick, args.only, budget, start)
    print(f"{len(items)} items, budget {budget:.0f} s; results to {out}", file=sys.stderr, flush=True)
    records = supervise(items, settings, args.smoke, budget, start)
    report = collect(records, items)
    report["settings"] = vars(settings)
    report["meta"].setdefault("smoke", args.smoke)
    report["meta"].update(quick=args.quick, only=args.only, budget_s=budget,
                          wall_s=round(time.time() - start, 1), ideal_passes=IDEAL_PASSES)
    report["targets"] = evaluate_targets(report)
    if not report["meta"].get("device"):
        print("no worker reported a device: nothing was measured", file=sys.stderr)
    name = "smoke_cpu" if args.smoke else slug(report["meta"].get("device") or "unknown")
    md = markdown(report)
    with open(os.path.join(out, f"gpu_{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, f"gpu_{name}.md"), "w") as f:
        f.write(md)
    print(md)
    print(summary(report))
    print(f"saved {os.path.join(out, f'gpu_{name}.md')} and .json "
          f"({report['meta']['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if report["meta"].get("device") else 1


if __name__ == "__main__":
    sys.exit(main())
