"""The Triton device path on CPU, for tests: Triton's interpreter
(``TRITON_INTERPRET=1``, read when :mod:`distnorm.triton_kernels` is first imported
and at every :func:`distnorm.cuda_ops.applies`) plus the CUDA branches of the core
(tests/test_device_path.py's ``device_path``)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from distnorm import kernels
from distnorm.distributed import collectives

# Whether this process runs Triton's interpreter (set before triton was imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def triton_path() -> Iterator[None]:
    """Run the CUDA code path — Triton kernels included — on CPU tensors."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_on_host, saved_devices = collectives._on_host, set(kernels._FUSED_DEVICES)
    os.environ["TRITON_INTERPRET"] = "1"
    collectives._on_host = lambda tensor: False
    kernels._FUSED_DEVICES.add("cpu")
    try:
        yield
    finally:
        collectives._on_host = saved_on_host
        kernels._FUSED_DEVICES.clear()
        kernels._FUSED_DEVICES.update(saved_devices)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
