"""What the mixtures (Batch-Instance Norm, Switchable Norm) share: a BatchNorm part
whose statistics are synced like :class:`~distnorm.SyncBatchNorm`, per-sample
statistics, and loading of plain BatchNorm checkpoints (not public).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..distributed import resolve_group
from ..stats import stats_dtype
from ._base import BatchNormBase

__all__ = ["MixtureBase", "channel_view", "instance_moments", "moments_over"]


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` → ``(1, C, 1, …)`` broadcastable against ``x``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def instance_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of each sample and channel over the spatial dims.

    Computed in :func:`~distnorm.stats.stats_dtype` of ``x`` (float32 for half
    inputs), differentiable, shapes ``(N, C, 1, …)``. An ``(N, C)`` input has one
    element per sample and channel: its mean is the element and its variance 0.
    """
    xs = x.to(stats_dtype(x))
    if x.dim() == 2:  # torch.var_mean(dim=()) would reduce over every dim
        return xs, torch.zeros_like(xs)
    return moments_over(xs, tuple(range(2, x.dim())))


def moments_over(x: Tensor, dims: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``dims`` (kept), differentiable. An
    empty batch gives empty results (without var_mean's warning)."""
    if x.shape[0] == 0:  # a shape fact
        empty = x.sum(dim=dims, keepdim=True)
        return empty, empty.clone()
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return mean, var


class MixtureBase(BatchNormBase):
    """A BatchNorm-state layer whose output mixes BN with per-sample normalizations.

    Subclasses implement :meth:`_mix`. ``forward`` resolves the process group in
    training (the BatchNorm part is synced) and uses the running statistics in
    eval; :meth:`_before_forward` runs first on every call.

    A plain BatchNorm checkpoint (it has this layer's ``weight`` or
    ``running_mean`` but none of :attr:`_extra_parameters`) loads, strictly: the
    extra parameters keep their current values.
    """

    #: Learned parameters a plain BatchNorm checkpoint does not have.
    _extra_parameters: Tuple[str, ...] = ()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._before_forward()
        if self.training:
            return self._train_forward(input, resolve_group(self.process_group, self))
        # Eval: running statistics, no collective; without them, the local batch's
        # (as nn.BatchNorm and torch's SyncBatchNorm do).
        return self._mix(input, None, batch_stats=self.running_mean is None)

    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        return self._mix(input, group, batch_stats=True)

    def _before_forward(self) -> None:
        """Hook run at the start of every forward (BIN clips ρ here)."""

    def _mix(self, input: Tensor, group: Optional[Any], batch_stats: bool) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- checkpoints and conversion -------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore[override]
                              missing_keys, unexpected_keys, error_msgs):
        if prefix + "weight" in state_dict or prefix + "running_mean" in state_dict:
            for name in self._extra_parameters:
                # A BatchNorm checkpoint: the mixture's own parameters stay as they are.
                state_dict.setdefault(prefix + name, getattr(self, name).detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.Module, process_group: Optional[Any] = None,
                        **options: Any) -> "BatchNormBase":
        """A layer sharing ``bn``'s parameters and buffers (see
        :meth:`BatchNormBase.from_batch_norm`). Converting a layer of this very class
        also shares its mixture parameters, so a converted model converts again
        (e.g. to change the process group) without losing what it learned."""
        layer = super().from_batch_norm(bn, process_group, **options)
        if isinstance(bn, cls):
            for name in cls._extra_parameters:
                setattr(layer, name, getattr(bn, name))
        return layer
