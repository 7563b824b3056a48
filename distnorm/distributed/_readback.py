"""Small device tensors read back on the host without waiting, and the rank bit
fields they carry: shared by the guard (:mod:`.collectives`) and the non-finite
records of compiled steps (:mod:`.nonfinite`)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["TOP_BIT", "DeferredCheck", "ranks_in"]

# Rank r sets bit 2^min(r, 52) of a bit field: exact (and named) up to 53 ranks.
TOP_BIT = 52


def ranks_in(bits: float, ranks: List[int]) -> List[int]:
    """The ranks (of ``ranks``, by position) whose bit is set in ``bits``."""
    value = int(bits)
    return [ranks[i] for i in range(min(len(ranks), TOP_BIT + 1)) if value >> i & 1]


class DeferredCheck:
    """A guard's tail copied back to the host without waiting, and the check to run
    on it once the copy has landed (a pinned buffer and an event on CUDA)."""

    def __init__(self, tail: Tensor, check: Callable[[List[float]], None]) -> None:
        self.check = check
        self.event: Optional[Any] = None
        if tail.is_cuda:
            # The copy runs on the current stream of the tensor's device, which need
            # not be the current device: the event must be recorded on that stream.
            with torch.cuda.device(tail.device):
                self.host = torch.empty(tail.shape, dtype=tail.dtype, pin_memory=True)
                self.host.copy_(tail, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(tail.device))
        else:  # a device read synchronously (tests run CUDA's branch on CPU this way)
            self.host = tail.clone()

    def landed(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        """Block until the copy has landed (at once if it has)."""
        # A query first: no synchronising call at all when the copy has landed.
        if self.event is not None and not self.event.query():
            self.event.synchronize()

    def run(self) -> None:
        self.check(self.host.tolist())
