"""Every Triton kernel compiles for a real GPU, with the very arguments and flags
distnorm.cuda_ops passes — checked here without one: the launches of a range of
calls are recorded (not run) and each distinct (kernel, signature, flags) is
compiled by Triton's CUDA backend to PTX/cubin for an H100 (sm_90). The
interpreter (tests/test_triton_kernels.py) checks the results; this checks that
the same source is valid compiled Triton (types, scalar/vector mixes, loops)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import pytest
import torch

from tests._triton_path import INTERPRETED

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(INTERPRETED, reason="compiles real kernels: not under "
                                "TRITON_INTERPRET")

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
          torch.float64: "*fp64", torch.int64: "*i64"}


def _signature(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return "fp32"


def _recorded_launches() -> List[Tuple[Any, Dict[str, str], Dict[str, Any], int]]:
    from distnorm import cuda_ops
    from distnorm.cuda_ops import Running, Stats
    from distnorm.distributed import collectives

    launches: Dict[Any, Tuple[Any, Dict[str, str], Dict[str, Any], int]] = {}

    def record(kernel: Any, grid: Any, *args: Any, **meta: Any) -> None:
        warps = meta.pop("num_warps", 4)
        names = kernel.arg_names
        constexprs = {p.name for p in kernel.params if p.is_constexpr}
        bound = dict(zip(names, args), **meta)
        signature = {name: ("constexpr" if name in constexprs else _signature(bound[name]))
                     for name in names}
        flags = {name: bound[name] for name in names if name in constexprs}
        key = (kernel.__name__, tuple(signature.items()), tuple(map(str, flags.items())), warps)
        launches.setdefault(key, (kernel, signature, flags, warps))

    saved = cuda_ops._launch
    cuda_ops._launch = record
    try:
        # Every flag combination in float32 and bfloat16 (the 16-bit loads and stores);
        # float16 and float64 differ from them in pointer types only.
        for dtype in (torch.float32, torch.bfloat16):
            for shape, channels_last in (((2, 3, 4, 4), False), ((2, 3, 4, 4), True)):
                x = torch.zeros(shape, dtype=dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                guard = torch.zeros(4, dtype=torch.float64)
                seq = torch.zeros(2, dtype=torch.float64)
                for check in (False, True):
                    spec = collectives.DevicePacket(64, guard, seq, 1.0, check, 0.0, 0.0, 65536)
                    cuda_ops.moment_packet(x, spec, extra=torch.zeros(3, dtype=torch.float64))
                    cuda_ops.pack(torch.zeros(7, dtype=torch.float64), spec)
                sums = cuda_ops.moment_packet(x, None)
                weight = torch.ones(3, dtype=dtype if dtype != torch.bfloat16 else torch.float32)
                moments = Stats(torch.zeros((), dtype=torch.float64), None,
                                torch.zeros(3, dtype=stats_dtype), torch.ones(3, dtype=stats_dtype))
                for stats in ((Stats.of_sums(sums), moments) if dtype == torch.float32
                              else (Stats.of_sums(sums),)):
                    for momentum in ((0.1, None) if stats.sums is not None else (0.1,)):
                        running = Running(torch.zeros(3, dtype=weight.dtype),
                                          torch.ones(3, dtype=weight.dtype),
                                          torch.zeros((), dtype=torch.int64), momentum)
                        cuda_ops.normalize(x, stats, weight, weight, 1e-5, running)
                        cuda_ops.running_update(stats, running)
                    cuda_ops.normalize(x, stats, None, None, 1e-5, None)
                    grads = torch.empty(3, dtype=weight.dtype)
                    cuda_ops.grad_packet(x, x, stats, 1e-5, spec, grads, grads)
                    cuda_ops.grad_packet(x, x, stats, 1e-5, None, None, None)
                    cuda_ops.input_grad(x, x, stats, sums, weight, 1e-5)
                    cuda_ops.input_grad(x, x, stats, sums, None, 1e-5)
                cuda_ops.unpack(sums, 3, stats_dtype)
    finally:
        cuda_ops._launch = saved
    return list(launches.values())


def test_every_kernel_compiles_for_an_h100():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _recorded_launches()
    names = {kernel.__name__ for kernel, *_ in launches}
    assert names == {"channel_partials_kernel", "finish_moments_kernel", "finish_grads_kernel",
                     "pack_kernel", "normalize_kernel", "running_update_kernel",
                     "unpack_kernel", "input_grad_kernel"}
    target = GPUTarget("cuda", 90, 32)
    failures = []
    for kernel, signature, flags, warps in launches:
        source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
        try:
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
            assert compiled.asm["ptx"]
        except Exception as error:  # noqa: BLE001 - collect every failure
            failures.append(f"{kernel.__name__} {flags}: {type(error).__name__}: "
                            f"{str(error)[:500]}")
    print(f"{len(launches)} kernel variants compiled")
    assert not failures, "\n".join(failures)
