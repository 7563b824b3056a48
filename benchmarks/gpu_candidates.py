"""The synced candidates of the GPU benchmark on one GPU: distnorm's layers and torch's
SyncBatchNorm, each made to synchronize over a one-rank group (both would otherwise
run as local BatchNorm at W = 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


def force_distnorm_sync() -> Callable[[], None]:
    """Make distnorm's layers synchronize over a group of one rank; returns the undo.

    distnorm runs a layer whose group has a single rank as local BatchNorm, with no
    collective at all — right for users, but on one GPU the only NCCL group has one
    rank (one GPU cannot hold two NCCL ranks), so the synced path would never run.
    The layers look their group up through the name ``resolve_group`` imported into
    ``distnorm.modules._base`` (and ``_mixture``; ``distnorm.population`` for
    ``precise_bn``); this replaces that name with a version that returns the group
    at W = 1 too.
    """
    import importlib

    import torch.distributed as dist

    from distnorm import distributed

    original = distributed.resolve_group

    def resolve_even_alone(process_group: Any = None, owner: Any = None) -> Any:
        group = original(process_group, owner)
        if group is None and dist.is_available() and dist.is_initialized():
            group = process_group if process_group is not None else dist.group.WORLD
        return group

    modules = []
    # precise_bn (distnorm.population) counts its rounds over the group too: forced,
    # it pays the per-batch exchange a multi-GPU job pays.
    for name in ("modules._base", "modules._mixture", "population"):
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"distnorm.{name}"))
    saved = {m: m.resolve_group for m in modules if getattr(m, "resolve_group", None) is original}
    if not saved:
        raise RuntimeError("distnorm.modules._base no longer imports resolve_group: "
                           "force_distnorm_sync() must follow how its layers find their group")
    for module in saved:
        module.resolve_group = resolve_even_alone  # type: ignore[attr-defined]

    def undo() -> None:
        for module, fn in saved.items():
            module.resolve_group = fn  # type: ignore[attr-defined]
    return undo

_TORCH_FORCED: dict[bool, type] = {}


def torch_sync_function(cuda: bool) -> Callable[..., Any]:
    """``apply`` of torch's SyncBatchNorm autograd Function; on CPU (smoke runs, where
    its kernels do not exist) the same algorithm from ``torch_sync_bn.py``."""
    if cuda:
        from torch.nn.modules._functions import SyncBatchNorm as Function
        return Function.apply
    from torch_sync_bn import _TorchSyncBatchNormFunction

    def apply(*args: Any) -> Any:
        return _TorchSyncBatchNormFunction.apply(*args, "native")
    return apply


def torch_forced_class(cuda: bool) -> type:
    """``nn.SyncBatchNorm`` whose training forward always goes through torch's
    Function over its group: the module itself falls back to ``F.batch_norm`` at W = 1.
    The bookkeeping is the module's own (``num_batches_tracked``, momentum)."""
    if cuda in _TORCH_FORCED:
        return _TORCH_FORCED[cuda]
    import torch
    import torch.distributed as dist

    apply = torch_sync_function(cuda)

    class TorchSyncBatchNormForced(torch.nn.SyncBatchNorm):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(input)
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            factor = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats:
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / self.num_batches_tracked.item()
            group = self.process_group or dist.group.WORLD
            running_mean = self.running_mean if self.track_running_stats else None
            running_var = self.running_var if self.track_running_stats else None
            return apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                         factor, group, dist.get_world_size(group))

    _TORCH_FORCED[cuda] = TorchSyncBatchNormForced
    return TorchSyncBatchNormForced


def to_torch_sync(model: Any, cuda: bool) -> Any:
    """``convert_sync_batchnorm``, then every converted layer through torch's Function."""
    import torch

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    forced = torch_forced_class(cuda)
    for module in model.modules():
        if type(module) is torch.nn.SyncBatchNorm:
            module.__class__ = forced
    return model
