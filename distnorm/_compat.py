"""The private torch APIs distnorm reads, in one place.

torch does not promise these across releases; each is read here and nowhere else,
so that a release that renames one breaks one function (and its test in
tests/test_compat.py) rather than a layer. This module imports nothing of distnorm.

* autograd nodes' saved arguments (``node._saved_<name>``), from which the
  cross-iteration layer reads the convolution or linear layer that produced its
  input (see :mod:`distnorm.modules._producer`);
* ``torch._dynamo.config.disable``, which the compiled kernels respect;
* ``torch.distributed._functional_collectives``, the collectives torch.compile traces;
* ``torch.distributed.distributed_c10d._world.group_count``, the counter torch names
  new process groups by (:func:`group_names_from`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Optional

from torch import Tensor

__all__ = ["accumulated_leaf", "dynamo_disabled", "functional_collectives", "group_names_from",
           "node_name", "saved_argument"]


def saved_argument(node: Any, name: str) -> Any:
    """What the autograd ``node`` saved as its argument ``name`` (``node._saved_<name>``:
    a tensor, a number or a tuple of ints), or ``None`` when it saved none (an input
    that needs no gradient, a freed graph, another torch version's layout)."""
    try:
        return getattr(node, "_saved_" + name)
    except (RuntimeError, AttributeError):
        return None


def node_name(node: Any) -> str:
    """The kind of an autograd node: ``"ConvolutionBackward0"``, ``"AddmmBackward0"``, ..."""
    return type(node).__name__


def accumulated_leaf(node: Any) -> Optional[Tensor]:
    """The leaf tensor an ``AccumulateGrad`` node writes the gradient of, else ``None``."""
    return getattr(node, "variable", None)


def dynamo_disabled() -> bool:
    """Whether torch.compile is switched off — ``TORCH_COMPILE_DISABLE=1`` (read into
    ``torch._dynamo.config.disable``) or ``TORCHDYNAMO_DISABLE=1`` (read by
    ``torch.compile`` itself at each call) — so that a compiled function would run as
    its plain Python."""
    # Read without importing torch._dynamo (seconds, and imported after
    # init_process_group it used to pin the default group): until it is imported,
    # its config is still what the environment says.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        disabled = bool(dynamo.config.disable)
    else:
        disabled = os.environ.get("TORCH_COMPILE_DISABLE", "0") == "1"  # as its config reads it
    return disabled or os.environ.get("TORCHDYNAMO_DISABLE", "") == "1"


def functional_collectives() -> ModuleType:
    """``torch.distributed._functional_collectives``, imported on first use."""
    import torch.distributed._functional_collectives as funcol

    return funcol


@contextmanager
def group_names_from(start: int) -> Iterator[None]:
    """Groups made inside take torch's automatic names from ``start`` on; the counter
    is restored afterwards. A group made by some ranks only
    (``use_local_synchronization``) would otherwise advance the counter on those ranks
    alone, and every later group would be named differently across ranks."""
    import torch.distributed.distributed_c10d as c10d

    world = c10d._world
    saved = world.group_count
    world.group_count = start
    try:
        yield
    finally:
        world.group_count = saved
