"""Uneven inputs: torch's ``Join`` for models with synced layers.

When ranks hold different numbers of batches (a sampler without padding, a loop
that skips a bad batch on one rank), the rank that runs out of data first stops
calling the synced layers and its peers wait for it in their next collective.
``torch.distributed.algorithms.Join`` lets such a rank *join*: while the others
still train, it shadows their collectives. For DDP's gradient buckets torch does
that; :func:`joinable` does it for the synced layers: the joined rank makes, once
per iteration of the others, the very guarded collectives one iteration of its own
made — every synced layer's forward all-reduce and backward all-reduce, in order —
with zero contributions (a count of 0). Since the statistics travel as
count-weighted sums, the others' statistics are exactly those of the data that
exists, as BatchNorm on the concatenation of the remaining ranks' batches.

Usage (the distnorm joinable goes *first*, before DDP)::

    model = DistributedDataParallel(distnorm.convert_model(net))
    with Join([distnorm.joinable(model), model]):
        for x, y in loader:              # ranks may have different numbers of batches
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

How it works:

* Each forward of ``model`` starts a new iteration: a forward pre-hook tells the
  ``Join`` context this rank has not joined (the all-reduce DDP makes when it comes
  first) and starts recording this rank's guarded collectives; the recording of
  the previous iteration becomes the one a joined rank replays.
* The synced layers reduce over a process group of their own (the same ranks;
  :mod:`distnorm.distributed.isolation`), also while a ``Join`` is active with
  ``DISTNORM_ISOLATE=0`` (made at the first ``Join`` then), so that a joined
  rank's shadows — issued without waiting, before DDP's — never interleave with
  DDP's collectives on the model's group. Guards (tags, call counters, sequence
  numbers, deadline) apply to the shadows as to any call: a joined rank whose
  recorded iteration does not match what the others do fails with ``SyncError``.
* When every rank has joined, the synced layers' running statistics are broadcast
  from a rank that joined last (DDP does the same for all buffers when its
  ``broadcast_buffers`` is on), so that every rank ends with the statistics of all
  the data.

Limits: a rank must run at least one iteration before it joins (it replays what it
recorded); every iteration must make the same synced calls (one forward and its
backward — gradient accumulation's several forwards per step are fine); per-rank
state of a variant (CmBN's partial cycle, CBN's window) is not shadowed and stays
as the joined rank left it; a model under ``torch.compile`` records nothing (its
collectives are traced into the graph), so a rank that joins fails with
``SyncError`` there.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook, _JoinConfig

from .distributed import resolve_group
from .distributed import collectives, ddp_join, isolation
from .distributed.collectives import Call, InFlight
from .errors import SyncError
from .modules._base import BatchNormBase

__all__ = ["SyncedLayersJoinable", "joinable"]


def joinable(model: nn.Module) -> "SyncedLayersJoinable":
    """A ``torch.distributed.algorithms.Joinable`` for ``model``'s synced layers.

    Pass it to ``Join`` *first*, before DDP (``Join([distnorm.joinable(ddp_model),
    ddp_model])``): then a rank that runs out of data shadows the synced layers'
    collectives with zero contributions and the other ranks train on, with the
    statistics of the data that exists. See :mod:`distnorm.join`.

    Args:
        model: the model whose forward is called in the loop — the DDP-wrapped one
            when there is one (its forward must start each iteration before DDP's).

    Raises:
        ValueError: ``model`` has no synced layer, or its synced layers reduce over
            different process groups.
    """
    return SyncedLayersJoinable(model)


class SyncedLayersJoinable(Joinable):
    """The synced layers of a model as a participant of ``torch``'s ``Join`` (see
    :func:`joinable`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, BatchNormBase)]
        if not self.layers:
            raise ValueError(f"distnorm.joinable: {type(model).__name__} has no synced layer "
                             "(convert it with distnorm.convert_model first)")
        groups = {id(g): g for g in (resolve_group(layer.process_group, layer)
                                     for layer in self.layers)}
        if len(groups) > 1:
            raise ValueError("distnorm.joinable: the model's synced layers reduce over different "
                             "process groups; Join works over one group")
        self.group: Optional[Any] = next(iter(groups.values()))
        self._template: Optional[List[Call]] = None
        self._trace: Optional[List[Call]] = None
        self._notify: Any = None
        self._handle = model.register_forward_pre_hook(self._before_forward)
        ddp_join.mark_joinable(model)

    # -- Joinable ----------------------------------------------------------------------
    def join_hook(self, **kwargs: Any) -> JoinHook:
        """Called by ``Join`` on every rank as it starts: from now on the synced layers
        reduce over a group of their own (see the module docstring)."""
        if self.group is not None:
            # distnorm's own group (made here if no synced call made it yet: every
            # rank builds its Join here), also with DISTNORM_ISOLATE=0.
            collectives.set_transport(self.group, isolation.own_group(self.group))
        return _SyncedLayersJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        for layer in self.layers:
            for tensor in (layer.running_mean, layer.weight):
                if tensor is not None:
                    return tensor.device
        return torch.device("cpu")

    @property
    def join_process_group(self) -> Any:
        return self.group if self.group is not None else dist.group.WORLD

    def remove(self) -> None:
        """Remove the forward pre-hook from the model."""
        self._handle.remove()

    # -- per iteration -------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        config = self._join_config
        if not config.enable or self.group is None:
            return
        if not config.is_first_joinable:
            raise ValueError("distnorm.joinable(model) must come first in Join([...]) — before "
                             "DistributedDataParallel — so that a joined rank shadows the synced "
                             "layers' collectives before DDP's")
        if self._notify is not None:
            self._notify.wait()
        # Tell the Join context this rank has not joined (as DDP does when it is first).
        self._notify = Join.notify_join_context(self)
        if self._trace:
            self._template = self._trace
        self._trace = collectives.start_recording(self.group)


class _SyncedLayersJoinHook(JoinHook):
    """Shadows the synced layers' collectives on a rank that has joined."""

    def __init__(self, owner: SyncedLayersJoinable) -> None:
        self.owner = owner
        self.inflight: List[InFlight] = []

    def _settle(self) -> None:
        inflight, self.inflight = self.inflight, []
        for item in inflight:
            item.settle(self.owner.group, collectives.resolve_timeout(item.context.timeout))

    def main_hook(self) -> None:
        owner = self.owner
        if owner.group is None:
            return
        self._settle()  # the previous iteration's shadows have been met by now
        if owner._trace:  # this rank's last iteration: what the others do now
            owner._template = owner._trace
        owner._trace = None
        collectives.stop_recording(owner.group)
        if not owner._template:
            raise SyncError(
                f"distnorm.joinable: rank {dist.get_rank()} joined before it ran one training "
                "iteration, so it does not know which synced collectives to shadow; give every "
                "rank at least one batch")
        for call in owner._template:
            self.inflight.extend(collectives.shadow(call, owner.group))

    def post_hook(self, is_last_joiner: bool) -> None:
        owner = self.owner
        owner._join_config = _JoinConfig.construct_disabled_join_config()
        if owner.group is None:
            return
        self._settle()
        owner._trace = None
        collectives.stop_recording(owner.group)
        collectives.set_transport(owner.group, None)
        _broadcast_running_stats(owner, is_last_joiner)


def _broadcast_running_stats(owner: SyncedLayersJoinable, is_last_joiner: bool) -> None:
    """Every rank takes the running statistics of the highest rank that joined last:
    it saw every iteration."""
    group = owner.group
    candidate = torch.tensor([dist.get_rank() if is_last_joiner else -1],
                             device=owner.join_device)
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=group)
    source = int(candidate.item())
    with torch.no_grad():
        for layer in owner.layers:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    dist.broadcast(tensor, src=source, group=group)
