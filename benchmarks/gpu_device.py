"""The device the GPU benchmark measures, its one-rank group, and what it costs
beside the layers: the memory's peak bandwidth (and a large copy's), and one more
communicator of the same ranks. Also the errors that end a worker (:class:`Poisoned`)
and the faults the tests inject (:data:`FAULT_ENV`).

On CPU (``--smoke``) the same class runs a gloo group with host timers.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from gpu_settings import item_row

# Faults injected by the tests, ";"-separated: "exit:<item id>" ends the worker at the
# start of that item; "capture:<candidate>@<item id>" makes that capture fail.
FAULT_ENV = "DISTNORM_GPU_BENCH_FAULT"


CURRENT_ITEM = {"id": ""}


class Poisoned(RuntimeError):
    """The device (or the group) no longer works in this process: restart the worker."""


def inject_fault(where: str, what: str) -> None:
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


# Peak memory bandwidth, GB/s, of devices whose properties do not give the memory
# clock and bus width (older torch): the vendors' data sheets.
_PEAK_GB_S = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
              "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0}


def device_bandwidth(dev: Device, copy_mb: int | None = None) -> dict[str, Any]:
    """The memory's peak bandwidth (from the device's memory clock and bus width,
    else the data sheet's by name) and a large device-to-device copy's achieved
    bandwidth (read + write), GB/s: what the per-layer bandwidths are compared with."""
    import torch

    out: dict[str, Any] = {"peak_gb_s": None, "peak_source": None}
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:  # double data rate: two transfers per clock
            out.update(peak_gb_s=2 * clock_khz * 1e3 * bus_bits / 8 / 1e9,
                       peak_source=f"2 × {clock_khz / 1e3:.0f} MHz × {bus_bits} bit")
        else:
            for name, gb_s in _PEAK_GB_S.items():
                if name in dev.name:
                    out.update(peak_gb_s=gb_s, peak_source=f"data sheet ({name})")
                    break
    numel = (copy_mb or (256 if dev.cuda else 2)) * 2**20 // 4
    src = torch.ones(numel, device=dev.device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    dev.sync()
    times = []
    for _ in range(10):
        start, end = dev.marker(), dev.marker()
        start.record()
        dst.copy_(src)
        end.record()
        dev.sync()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    out["copy_mb"] = numel * 4 / 2**20
    out["copy_gb_s"] = 2 * numel * 4 / (ms * 1e-3) / 1e9 if ms > 0 else None
    del src, dst
    return out


def run_communicator(item: dict[str, Any], dev: Device, s: Any) -> list[dict[str, Any]]:
    """What one more communicator of the same ranks costs (issue 23: distnorm's
    collectives on a group of their own): ``new_group`` of every rank, its first
    collective (where NCCL builds the communicator unless it was built eagerly) and a
    second one; device memory from ``cudaMemGetInfo`` (NCCL's buffers are outside
    torch's allocator). On one GPU the group has one rank, so NCCL sets up no
    connection to peers: a lower bound of a multi-GPU job's cost."""
    import torch
    import torch.distributed as dist

    row = item_row(item, "extra group")
    world = dist.get_world_size()
    probe = torch.ones(1, device=dev.device)
    dist.all_reduce(probe, group=dev.group)  # the user's communicator exists already
    dev.sync()
    free_before = torch.cuda.mem_get_info(dev.device)[0] if dev.cuda else None
    start = time.perf_counter()
    try:
        group = dist.new_group(list(range(world)), use_local_synchronization=True)
    except TypeError:  # a torch without use_local_synchronization
        group = dist.new_group(list(range(world)))
    created = time.perf_counter()
    dist.all_reduce(probe, group=group)
    dev.sync()
    first = time.perf_counter()
    dist.all_reduce(probe, group=group)
    dev.sync()
    second = time.perf_counter()
    free_after = torch.cuda.mem_get_info(dev.device)[0] if dev.cuda else None
    row["communicator"] = {
        "backend": dev.backend, "ranks": world, "create_s": created - start,
        "first_collective_s": first - created, "second_collective_ms": (second - first) * 1e3,
        "device_memory_mb": None if free_before is None else (free_before - free_after) / 2**20}
    with contextlib.suppress(Exception):
        dist.destroy_process_group(group)
    return [row]
