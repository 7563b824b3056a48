"""Guards of the CUDA path that a CPU can check (issue 22, items 6, 8, 9 and 10).

* The deferred check of a guard's tail records its CUDA event on the stream of the
  tensor's own device, where the copy runs, not on the current device's (a fake
  torch.cuda records what is called).
* ``kernels._run`` falls back to eager ops only when compiling failed (nothing ran);
  a failure while running is re-raised, never run a second time (in-place counters
  and running statistics would advance twice).
* Inside a CUDA-graph capture a layer's first call, or a payload wider than the
  group's packets, raises a clear error before any collective or host read (the CUDA
  branches forced on CPU, the capture query patched), and the ranks go on in step.
* The NCCL timeout the documentation states is torch's default.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist

import distnorm
from distnorm import kernels
from distnorm.distributed import collectives
from tests._triton_path import device_path

ROOT = Path(__file__).resolve().parents[1]


# -- item 6: the event of a deferred check ----------------------------------------------
class _OnCudaOne(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (the copy itself runs on CPU)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 1)


def test_deferred_check_records_its_event_on_the_tensors_device_stream(monkeypatch):
    calls: List[Any] = []

    class Stream:
        def __init__(self, device: Any) -> None:
            self.device = torch.device(device) if device is not None else "current device"

    class Event:
        def record(self, stream: Any = None) -> None:
            calls.append(("record", getattr(stream, "device", "current device")))

        def query(self) -> bool:
            return True

    @contextmanager
    def on_device(device: Any) -> Iterator[None]:
        calls.append(("device", torch.device(device)))
        yield
        calls.append(("device restored", None))

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    seen: List[List[float]] = []
    tail = torch.Tensor._make_subclass(_OnCudaOne, torch.arange(3, dtype=torch.float64))
    check = collectives._DeferredCheck(tail, seen.append)
    cuda1 = torch.device("cuda", 1)
    assert calls == [("device", cuda1), ("record", cuda1), ("device restored", None)], calls
    assert check.landed()
    check.run()
    assert seen == [[0.0, 1.0, 2.0]]


# -- item 8: what _run falls back on ----------------------------------------------------
def _kernel_under_test(x: torch.Tensor) -> torch.Tensor:  # never run: a stand-in's name
    return x


@pytest.fixture
def stand_in(monkeypatch):
    """Install a 'compiled' stand-in for _kernel_under_test; yields a setter."""
    key = (_kernel_under_test.__name__, torch.float32)
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setitem(kernels._compiled, key, None)

    def install(fn):
        kernels._compiled[key] = fn
        return key

    return install


def test_run_reraises_a_failure_while_running_without_a_second_run(stand_in):
    counter = torch.zeros(1)

    def runs_then_fails(x: torch.Tensor) -> torch.Tensor:
        counter.add_(1)  # an in-place write (a call counter, running statistics)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    key = stand_in(runs_then_fails)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernels._run(_kernel_under_test, torch.float32, torch.ones(2))
    assert counter.item() == 1  # not re-run eagerly
    assert kernels._compiled[key] is runs_then_fails  # and the kernel is kept
    with pytest.raises(torch.OutOfMemoryError):
        stand_in(lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
        kernels._run(_kernel_under_test, torch.float32, torch.ones(2))


def backend_compiler_failed(inner: Exception) -> Exception:
    """dynamo's wrapper of a backend's failure (its arguments vary across torch)."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return BackendCompilerFailed(lambda *a: None, inner, None)
    except TypeError:
        return BackendCompilerFailed(lambda *a: None, inner)


def _compile_errors() -> List[BaseException]:
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    inner = inductor_exc.CppCompileError(["c++", "kernel.cpp"], "c++: command not found")
    return [backend_compiler_failed(inner),
            dynamo_exc.TorchRuntimeError("fake tensor propagation failed"),
            dynamo_exc.FailOnRecompileLimitHit("recompile limit (8) reached"),
            inner]


@pytest.mark.parametrize("index", range(4), ids=["backend", "tracing", "recompiles", "c++"])
def test_run_falls_back_when_compiling_fails(index, stand_in):
    error = _compile_errors()[index]

    def fails_to_compile(x: torch.Tensor) -> torch.Tensor:
        raise error

    key = stand_in(fails_to_compile)
    with pytest.warns(RuntimeWarning, match="compiling its fused kernels failed"):
        assert kernels._run(_kernel_under_test, torch.float32, torch.ones(2)) is kernels._FAILED
    assert kernels._compiled[key] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls go eager silently
        assert kernels._run(_kernel_under_test, torch.float32, torch.ones(2)) is kernels._FAILED


# -- item 9: what a capture cannot hold -------------------------------------------------
@contextmanager
def capturing() -> Iterator[None]:
    saved = collectives._capturing
    collectives._capturing = lambda: True
    try:
        yield
    finally:
        collectives._capturing = saved


def _w_capture(rank: int, world: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    group = dist.group.WORLD
    with device_path():
        # A layer's first call inside a capture.
        layer = distnorm.SyncBatchNorm(3)
        x = torch.randn(2, 3, 4, 4) + rank
        with capturing():
            try:
                layer(x)
            except RuntimeError as error:
                out["first"] = str(error)
        layer(x).sum().backward()  # the eager warm-up: the ranks are still in step
        # A payload wider than the group's packets, at the collectives.
        context = collectives.SyncContext(name="layer W", identity="W")
        collectives.all_reduce(torch.ones(7, dtype=torch.float64), group, context, "forward",
                               "raise")
        shared = collectives._shared(group)
        before = (shared.seq, context.direction("forward").calls)
        with capturing():
            try:
                collectives.all_reduce(torch.ones(shared.size, dtype=torch.float64), group,
                                       context, "forward", "raise")
            except RuntimeError as error:
                out["wide"] = str(error)
        out["untouched"] = before == (shared.seq, context.direction("forward").calls)
        # Warmed up, the same calls pass a "capture" (here run eagerly) and the ranks
        # still agree afterwards (a collective issued by one rank only would not).
        with capturing():
            y = layer(x)
        y.sum().backward()
        total = collectives.all_reduce(torch.ones(7, dtype=torch.float64), group, context,
                                       "forward", "raise")
        layer(x).sum().backward()  # the deferred checks of the calls above pass
        out["sum"] = total.tolist()
    return out


def test_capture_of_a_first_call_or_a_wider_payload_raises_before_the_stream(world2):
    for out in world2.run(_w_capture):
        assert "cannot be captured in a CUDA graph" in out["first"], out
        assert "first forward call" in out["first"], out
        assert "Run one eager training step" in out["first"], out
        assert "payload" in out["wide"] and "wider than any" in out["wide"], out
        assert out["untouched"], out
        assert out["sum"] == [2.0] * 7, out


# -- item 10: the documented NCCL timeout -----------------------------------------------
def test_documented_nccl_timeout_is_torchs_default():
    from torch.distributed import constants

    nccl = getattr(constants, "default_pg_nccl_timeout", None)
    if nccl is None:
        pytest.skip("this torch is built without NCCL")
    minutes = f"{nccl.total_seconds() / 60:g} minutes"
    faults = (ROOT / "docs" / "faults.md").read_text()
    row = next(line for line in faults.splitlines() if line.startswith("| CUDA tensors (NCCL)"))
    assert minutes in row, row
    assert f"{constants.default_pg_timeout.total_seconds() / 60:g} minutes" in faults
    for path in ("distnorm/distributed/collectives.py", "distnorm/modules/_base.py",
                 "docs/algorithms.md"):
        text = (ROOT / path).read_text()
        assert minutes in re.sub(r"\s+", " ", text), path
        assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in text, path
