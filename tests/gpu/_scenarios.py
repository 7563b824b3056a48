"""GPU scenarios that need a one-rank NCCL group, run by tests/gpu/test_gpu.py as
``python3 -m tests.gpu._scenarios [--jsonl FILE] NAME...``.

Each scenario forces synchronisation over a one-rank NCCL group (one GPU cannot hold
two NCCL ranks; distnorm treats a group of one rank as local, so without forcing no
collective would run). The scenarios named on the command line run one after the
other in one process, so that they share torch's import and the compile warm-ups;
each prints ``RESULT {json}`` (name, status, seconds, findings or error) as soon as
it ends, and appends the same line to ``FILE``, so that a run cut short still
reports what it finished. The exit status is 0 when all passed.

:data:`GROUPS` splits them in two processes: the scenarios that capture CUDA graphs
run apart from the others, as a failed capture spoils the process's CUDA state (its
RNG, its allocator's pools) for what runs after it; within that group the scenario
that provokes capture errors on purpose runs last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List

import torch
import torch.distributed as dist
from torch import nn

import distnorm
import distnorm.modules._base as _base
import distnorm.modules._mixture as _mixture

SCENARIOS: Dict[str, Callable[[], Dict[str, Any]]] = {}


def scenario(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def init_one_rank_nccl() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))


@contextlib.contextmanager
def forced_sync() -> Iterator[None]:
    """Synced layers reduce over the world group even though it holds one rank."""
    def resolve(process_group: Any = None, owner: Any = None) -> Any:
        return process_group if process_group is not None else dist.group.WORLD

    saved = _base.resolve_group, _mixture.resolve_group
    _base.resolve_group = _mixture.resolve_group = resolve
    try:
        yield
    finally:
        _base.resolve_group, _mixture.resolve_group = saved


def resnet(depth: int = 50, channels_last: bool = False, dtype: torch.dtype = torch.float32
           ) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=10)
    model = model.cuda().to(dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x).float(), target)
    loss.backward()
    opt.step()
    return loss.detach()


@scenario
def nccl_parity() -> Dict[str, Any]:
    """At W = 1 with synchronisation forced over NCCL, every synced variant equals
    itself unsynced (its local path), and SyncBatchNorm equals nn.BatchNorm: outputs,
    input and parameter gradients, running statistics; dtypes, layouts, 1-D/2-D/3-D,
    an empty batch."""
    failures: List[str] = []
    cases = [("sync", (4, 8, 6, 6), torch.float32, False), ("sync", (4, 8, 6, 6), torch.float32, True),
             ("sync", (4, 8), torch.float32, False), ("sync", (4, 8, 10), torch.float32, False),
             ("sync", (2, 8, 3, 4, 5), torch.float32, False), ("sync", (0, 8, 6, 6), torch.float32, False),
             ("sync", (4, 8, 6, 6), torch.bfloat16, True), ("sync", (4, 8, 6, 6), torch.float16, False),
             ("sync", (4, 8, 6, 6), torch.float64, False),
             ("brn", (4, 8, 6, 6), torch.float32, False), ("cmbn", (4, 8, 6, 6), torch.float32, False),
             ("cbn", (4, 8, 6, 6), torch.float32, False), ("bin", (4, 8, 6, 6), torch.float32, False),
             ("switchable", (4, 8, 6, 6), torch.float32, False)]
    for mode, shape, dtype, channels_last in cases:
        dims = len(shape) - 2
        bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        torch.manual_seed(1)
        ref = nn.Sequential(nn.Conv2d(8, 8, 1) if dims == 2 else nn.Identity(), bn_cls(8)).cuda()
        with torch.no_grad():
            ref[1].weight.uniform_(0.5, 1.5)
            ref[1].bias.uniform_(-1, 1)
        ref = ref.to(dtype)
        local = distnorm.convert_model(copy.deepcopy(ref), mode=mode) if mode != "sync" else ref
        synced = distnorm.convert_model(copy.deepcopy(ref), mode=mode)
        results = []
        for model, force in ((local, False), (synced, True)):
            with forced_sync() if force else contextlib.nullcontext():
                outs = []
                for step in range(3):
                    gen = torch.Generator(device="cuda").manual_seed(step)
                    x = (torch.randn(shape, device="cuda", generator=gen) * 3 + 5).to(dtype)
                    if channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_()
                    y = model(x)
                    (y.float() * torch.linspace(-1, 1, 8, device="cuda").view(
                        (1, 8) + (1,) * dims)).sum().backward()
                    outs.append((y.detach(), x.grad))
                outs.append((model[1].running_mean, model[1].running_var))
                outs.append(tuple(p.grad for p in model[1].parameters()))
                if channels_last and not outs[0][0].is_contiguous(memory_format=torch.channels_last):
                    failures.append(f"{mode} {shape} {dtype}: channels_last not kept")
            results.append(outs)
        tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-2)
        per_channel = max(1, torch.Size(shape).numel() // shape[1])
        for index, (a_group, b_group) in enumerate(zip(*results)):
            # parameter gradients (the last group) are sums over a channel's elements
            atol = tol * per_channel if index == len(results[0]) - 1 else tol
            for a, b in zip(a_group, b_group):
                if a is None and b is None:
                    continue
                try:
                    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=atol)
                except AssertionError as error:
                    failures.append(f"{mode} {shape} {dtype} channels_last={channels_last}: "
                                    f"{str(error).splitlines()[0]}")
                    break
    return {"failures": failures, "cases": len(cases)}


@scenario
def host_syncs() -> Dict[str, Any]:
    """No host synchronisation in whole training steps after the first ones
    (torch.cuda.set_sync_debug_mode("error") raises at any)."""
    model = distnorm.convert_model(resnet(18))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    target = torch.tensor([1, 3], device="cuda")
    with forced_sync():
        for _ in range(2):  # first calls: headers (one synchronisation each), compiles
            sgd_step(model, opt, x, target)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                sgd_step(model, opt, x, target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        # the deferred checks still run and pass at later calls
        sgd_step(model, opt, x, target)
    return {"ok": True}


@scenario
def graph_capture() -> Dict[str, Any]:
    """A converted ResNet-50 training step (forward, backward, SGD) captured in a CUDA
    graph replays equal to the same steps run eagerly."""
    eager = distnorm.convert_model(resnet(50))
    graphed = copy.deepcopy(eager)
    xs = [torch.randn(2, 3, 64, 64, device="cuda", generator=torch.Generator(device="cuda")
                      .manual_seed(i)) for i in range(6)]
    target = torch.tensor([1, 3], device="cuda")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9, foreach=True)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.01, momentum=0.9, foreach=True)
    static_x = xs[0].clone()
    with forced_sync():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, as torch asks before capture
            for i in range(3):
                static_x.copy_(xs[i])
                sgd_step(graphed, opt_g, static_x, target)
                sgd_step(eager, opt_e, xs[i], target)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt_g.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            static_loss = sgd_step(graphed, opt_g, static_x, target)
        losses = []
        for i in range(3, 6):
            static_x.copy_(xs[i])
            graph.replay()
            want = sgd_step(eager, opt_e, xs[i], target)
            losses.append((static_loss.item(), want.item()))
        torch.cuda.synchronize()
    diffs = [abs(a - b) for a, b in losses]
    state_diff = max((a.float() - b.float()).abs().max().item() for a, b in
                     zip(graphed.state_dict().values(), eager.state_dict().values())
                     if a.is_floating_point())
    assert max(diffs) < 1e-3 and state_diff < 1e-3, (losses, state_diff)
    return {"losses": losses, "max_state_diff": state_diff}


@scenario
def empty_batch_under_capture() -> Dict[str, Any]:
    """An empty batch over the whole group inside a CUDA graph: distnorm leaves the
    running statistics untouched (decided on the device); torch's SyncBatchNorm
    Function skips its empty-rank mask while capturing (read in its code) — what it
    gives is recorded side by side."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    layer = distnorm.SyncBatchNorm(8).cuda()
    torch_bn = nn.BatchNorm2d(8).cuda()
    full = torch.randn(4, 8, 5, 5, device="cuda")
    empty = torch.empty(0, 8, 5, 5, device="cuda")
    static = full.clone()
    out: Dict[str, Any] = {}
    with forced_sync():
        def torch_step(x: torch.Tensor) -> torch.Tensor:
            return TorchSyncFunction.apply(x, torch_bn.weight, torch_bn.bias, torch_bn.running_mean,
                                           torch_bn.running_var, 1e-5, 0.1, dist.group.WORLD, 1)

        layer(full)  # warm-up eagerly with data
        torch.cuda.synchronize()
        before = layer.running_mean.clone(), layer.running_var.clone()
        graph = torch.cuda.CUDAGraph()
        static = empty.clone()
        with torch.cuda.graph(graph):
            y = layer(static)
        graph.replay()
        torch.cuda.synchronize()
        out["distnorm_untouched"] = bool(torch.equal(before[0], layer.running_mean)
                                         and torch.equal(before[1], layer.running_var))
        out["distnorm_output_shape"] = list(y.shape)
        try:
            torch_step(full)
            torch.cuda.synchronize()
            graph2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph2):
                torch_step(static)
            graph2.replay()
            torch.cuda.synchronize()
            out["torch_running_var_finite"] = bool(torch_bn.running_var.isfinite().all())
        except Exception as error:  # noqa: BLE001 - recorded, not a failure of distnorm
            out["torch_error"] = str(error).splitlines()[0]
    assert out["distnorm_untouched"], out
    return out


@scenario
def compiled() -> Dict[str, Any]:
    """torch.compile(fullgraph=True) of a converted layer and mode="reduce-overhead" of
    a converted small model equal eager, with synchronisation forced over NCCL."""
    out: Dict[str, Any] = {}
    with forced_sync():
        layer = distnorm.SyncBatchNorm(16).cuda()
        twin = copy.deepcopy(layer)
        fn = torch.compile(layer, fullgraph=True)
        for i in range(3):
            x = torch.randn(4, 16, 8, 8, device="cuda") * 2 + 3
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = fn(xa), twin(xb)
            ya.square().sum().backward()
            yb.square().sum().backward()
            torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-5, atol=1e-6)
        model = distnorm.convert_model(resnet(18))
        ref = copy.deepcopy(model)
        fast = torch.compile(model, mode="reduce-overhead")
        x = torch.randn(2, 3, 64, 64, device="cuda")
        for _ in range(4):
            a = fast(x).float()
            b = ref(x).float()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        out["ok"] = True
    return out


@scenario
def peak_memory() -> Dict[str, Any]:
    """Peak memory of a synced ResNet-50 training step against nn.BatchNorm's."""
    peaks = {}
    for name in ("local", "distnorm"):
        torch.cuda.empty_cache()
        model = resnet(50)
        if name == "distnorm":
            model = distnorm.convert_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(8, 3, 224, 224, device="cuda")
        target = torch.arange(8, device="cuda") % 10
        with forced_sync() if name == "distnorm" else contextlib.nullcontext():
            for _ in range(2):
                sgd_step(model, opt, x, target)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            sgd_step(model, opt, x, target)
            torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated()
        del model, opt
    ratio = peaks["distnorm"] / peaks["local"]
    assert ratio <= 1.02, peaks
    return {"peaks": peaks, "ratio": ratio}


@scenario
def nonfinite_on_cuda() -> Dict[str, Any]:
    """A NaN with nonfinite="raise": decided on the device in the same all-reduce,
    raised at the layer's next call; "skip": never raised, running statistics finite."""
    out: Dict[str, Any] = {}
    with forced_sync():
        for policy in ("raise", "skip"):
            layer = distnorm.convert_model(nn.BatchNorm2d(4).cuda(), nonfinite=policy)
            good = torch.randn(2, 4, 3, 3, device="cuda")
            bad = good.clone()
            bad[0, 0, 0, 0] = float("nan")
            raised_at = None
            for call, x in enumerate([good, bad, good, good]):
                try:
                    layer(x)
                except distnorm.NonFiniteError:
                    raised_at = call
                    break
                torch.cuda.synchronize()  # the copy has landed before the next call
            out[policy] = {"raised_at": raised_at,
                           "finite": bool(layer.running_var.isfinite().all())}
    assert out["raise"]["raised_at"] == 2 and out["skip"]["raised_at"] is None, out
    assert out["skip"]["finite"] and out["raise"]["finite"], out
    return out


@scenario
def pickle_mid_training() -> Dict[str, Any]:
    """torch.save, copy.deepcopy and torch.load of a whole converted model on CUDA right
    after a training step (deferred checks still in flight), and the copies train on."""
    import io

    model = distnorm.convert_model(resnet(18))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    target = torch.tensor([1, 3], device="cuda")
    with forced_sync():
        for _ in range(2):
            sgd_step(model, opt, x, target)      # no synchronize: checks in flight
        buffer = io.BytesIO()
        torch.save(model, buffer)
        clone = copy.deepcopy(model)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for copy_ in (clone, loaded):
            sgd_step(copy_, torch.optim.SGD(copy_.parameters(), lr=0.01), x, target)
        torch.cuda.synchronize()
    return {"ok": True}


@scenario
def nonfinite_compiled() -> Dict[str, Any]:
    """Every step compiled (torch.compile, fullgraph), a NaN at step 1 with
    nonfinite="raise": NonFiniteError by step 3 at the latest (the operator's copy of
    step 1's flag is checked at step 2, waiting only if it has not landed), with no
    host synchronisation in the steps before it (sync debug mode "error")."""
    torch._dynamo.reset()
    with forced_sync():
        model = distnorm.convert_model(nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)).cuda())
        step = torch.compile(model, fullgraph=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        xs = [torch.randn(2, 4, 5, 5, device="cuda", generator=gen) for _ in range(7)]
        for _ in range(2):  # warm-up: compile, headers
            step(xs[0]).square().sum().backward()
        torch.cuda.synchronize()
        xs[4][0, 0, 0, 0] = math.nan
        raised_at, error = None, None
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(2, 7):  # the NaN is at i = 4
                try:
                    step(xs[i]).square().sum().backward()
                except distnorm.NonFiniteError as caught:
                    raised_at, error = i, str(caught).splitlines()[0]
                    break
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        finite = bool(model[1].running_var.isfinite().all() and model[1].running_mean.isfinite().all())
    assert raised_at is not None and 4 < raised_at <= 6, (raised_at, error)
    assert "rank(s) [0]" in error and finite, (error, finite)
    return {"raised_at": raised_at, "bad_step": 4, "error": error}


@scenario
def deferred_check_devices() -> Dict[str, Any]:
    """Deferred guard checks whose copies run on a side stream (issue 22 item 6: the
    event is recorded on the current stream of the tensor's device): no false
    SyncError or NonFiniteError over 20 steps with the host running ahead. (A layer on
    another device than the current one needs two GPUs; tests/test_cuda_guards.py
    checks that case with a fake torch.cuda.)"""
    out: Dict[str, Any] = {"devices": torch.cuda.device_count()}
    with forced_sync():
        layer = distnorm.SyncBatchNorm(8).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(20):
                layer(torch.randn(4, 8, 6, 6, device="cuda")).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        layer(torch.randn(4, 8, 6, 6, device="cuda")).sum().backward()  # checks run
        out["side_stream"] = "ok"
    return out


@scenario
def graph_nonfinite() -> Dict[str, Any]:
    """A captured eager training step of a converted layer replayed with a NaN in the
    static input: replays raise nothing (no Python runs), the running statistics stay
    finite, and distnorm.check_nonfinite(model) raises naming the layer and rank 0,
    once (issue 22 item 7)."""
    with forced_sync():
        model = distnorm.convert_model(nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)).cuda())
        static = torch.randn(2, 4, 5, 5, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static).sum().backward()
        graph.replay()
        distnorm.check_nonfinite(model)  # nothing yet
        static[0, 0, 0, 0] = math.nan
        graph.replay()
        static[0, 0, 0, 0] = 1.0
        graph.replay()
        torch.cuda.synchronize()
        try:
            distnorm.check_nonfinite(model)
            error = None
        except distnorm.NonFiniteError as caught:
            error = str(caught).splitlines()[0]
        distnorm.check_nonfinite(model)  # cleared
        finite = bool(model[1].running_var.isfinite().all())
    assert error is not None and "SyncBatchNorm '1' on rank(s) [0]" in error, error
    assert finite
    return {"error": error}


@scenario
def compiled_graphs_nonfinite() -> Dict[str, Any]:
    """torch.compile(mode="reduce-overhead") of a converted model (CUDA graphs replayed
    by torch): a NaN input is found by distnorm.check_nonfinite (replays run no
    Python), and the outputs equal an eager copy's on finite steps."""
    torch._dynamo.reset()
    with forced_sync():
        model = distnorm.convert_model(nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)).cuda())
        ref = copy.deepcopy(model)
        fast = torch.compile(model, mode="reduce-overhead")
        gen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(4):
            x = torch.randn(2, 4, 5, 5, device="cuda", generator=gen)
            a, b = fast(x), ref(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        x = torch.randn(2, 4, 5, 5, device="cuda", generator=gen)
        x[0, 0, 0, 0] = math.nan
        raised = None
        try:
            fast(x)
            fast(torch.randn(2, 4, 5, 5, device="cuda", generator=gen))
            torch.cuda.synchronize()
            distnorm.check_nonfinite(model)
        except distnorm.NonFiniteError as caught:
            raised = str(caught).splitlines()[0]
    assert raised is not None, "no NonFiniteError after a NaN under reduce-overhead"
    return {"error": raised}


@scenario
def capture_errors() -> Dict[str, Any]:
    """Inside a CUDA-graph capture, a layer's first call (its kernels already compiled
    by a twin layer) raises a clear RuntimeError before anything that would spoil the
    capture; the process then captures and replays a warmed-up layer normally
    (issue 22 item 9)."""
    out: Dict[str, Any] = {}
    with forced_sync():
        twin = distnorm.SyncBatchNorm(8).cuda()
        x = torch.randn(4, 8, 6, 6, device="cuda")
        twin(x).sum().backward()  # the kernels of this shape are compiled/loaded now
        fresh = distnorm.SyncBatchNorm(8).cuda()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fresh(x)
            out["first_call"] = "captured without an error"
        except RuntimeError as error:
            out["first_call"] = str(error).splitlines()[0]
        torch.cuda.synchronize()
        # The process is fine: warm the fresh layer up, capture it, replay = eager.
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fresh(static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fresh(static)
        graph.replay()
        torch.cuda.synchronize()
        twin.load_state_dict(fresh.state_dict())
        twin.eval(), fresh.eval()
        torch.testing.assert_close(fresh(static), twin(static))
        out["after"] = "captured and replayed"
        out["output_finite"] = bool(y.isfinite().all())
    assert "cannot be captured in a CUDA graph" in out["first_call"], out
    return out


GROUPS: Dict[str, List[str]] = {
    "plain": ["nonfinite_on_cuda", "deferred_check_devices", "host_syncs", "nccl_parity",
              "pickle_mid_training", "nonfinite_compiled", "peak_memory"],
    "capture": ["graph_capture", "empty_batch_under_capture", "graph_nonfinite",
                "compiled", "compiled_graphs_nonfinite", "capture_errors"],
}


def run(names: List[str], jsonl: str = "") -> int:
    """Run the scenarios ``names`` in order, reporting each as it ends; the number of
    failures."""
    failures = 0
    for name in names:
        start = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = SCENARIOS[name]()
            entry = {"name": name, "status": "passed", "result": found}
        except Exception as error:  # noqa: BLE001 - reported, and the next one runs
            failures += 1
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            entry = {"name": name, "status": "failed", "error": f"{type(error).__name__}: {first}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.time() - start, 1)
        line = json.dumps(entry, default=str)
        print("RESULT " + line, flush=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(line + "\n")
    return failures


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", default="", help="append each result to this file")
    parser.add_argument("names", nargs="+", help=f"scenarios, or a group: {sorted(GROUPS)}")
    args = parser.parse_args(argv)
    names = [n for name in args.names for n in GROUPS.get(name, [name])]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
    init_one_rank_nccl()
    try:
        failures = run(names, args.jsonl)
    finally:
        dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
