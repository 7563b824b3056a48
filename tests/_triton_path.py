"""The CUDA code path on CPU, for tests: its branches alone (:func:`device_path`), or
with the Triton kernels run by Triton's interpreter (:func:`triton_path`;
``TRITON_INTERPRET=1`` is read when :mod:`distnorm.triton_kernels` is first imported
and at every :func:`distnorm.cuda_ops.applies`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from distnorm import kernels
from distnorm.distributed import collectives

# Whether this process runs Triton's interpreter (set before triton was imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def device_path() -> Iterator[None]:
    """Run the branches CUDA takes (device guard, fused glue) on CPU."""
    saved_on_host, saved_devices = collectives._on_host, set(kernels._FUSED_DEVICES)
    collectives._on_host = lambda tensor: False
    kernels._FUSED_DEVICES.add("cpu")
    try:
        yield
    finally:
        collectives._on_host = saved_on_host
        kernels._FUSED_DEVICES.clear()
        kernels._FUSED_DEVICES.update(saved_devices)


@contextmanager
def triton_path() -> Iterator[None]:
    """Run the CUDA code path — Triton kernels included — on CPU tensors."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with device_path():
            yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
