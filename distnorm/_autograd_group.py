"""What the synced layers' autograd Functions keep of their process group and
policy between forward and backward: shared by :mod:`distnorm.functional` and the
CUDA path without Triton (:mod:`distnorm._native_cuda`)."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

from .distributed.collectives import SyncContext
from .errors import SyncError


def _weak(group: Optional[Any]) -> Optional[Callable[[], Any]]:
    """What a Function's ctx keeps of its group: a weak reference, so that an output
    kept alive (a script's last loss) does not keep a destroyed process group — and
    its gloo threads — alive into interpreter shutdown."""
    return None if group is None else weakref.ref(group)


def _strong(ref: Optional[Callable[[], Any]]) -> Optional[Any]:
    if ref is None:
        return None
    group = ref()
    if group is None:
        raise SyncError("a synced layer's backward ran after its process group was "
                        "destroyed: call backward before destroy_process_group")
    return group


def _backward_policy(context: Optional[SyncContext]) -> Optional[str]:
    """A rank left out of the forward statistics (``nonfinite="skip"``) stays out of
    their gradient; non-finite gradients never raise (AMP's loss scaler expects them
    and skips the step)."""
    return "skip" if context is not None and context.nonfinite == "skip" else None
