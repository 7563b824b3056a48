"""GPU scenarios that need a process of their own, run as
``python -m tests.gpu._scenarios NAME`` by tests/gpu/test_gpu.py.

Each initializes a one-rank NCCL group (one GPU cannot hold two NCCL ranks) and
forces synchronisation over it: distnorm treats a group of one rank as local, so
without forcing no collective would run. A scenario prints one JSON line with its
findings and exits 0; any exception exits non-zero. A process of its own also keeps
a failed CUDA-graph capture (which corrupts the process's CUDA RNG state) from
spoiling other tests.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import sys
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


def main(argv: List[str]) -> int:
    name = argv[0]
    init_one_rank_nccl()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = SCENARIOS[name]()
        print("RESULT " + json.dumps(result, default=str))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
