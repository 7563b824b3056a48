"""Cross-GPU Batch Normalization (MegDet, Peng et al., CVPR 2018)."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..registry import register_variant
from ._base import BatchNormBase

__all__ = ["SyncBatchNorm"]


@register_variant("sync")
class SyncBatchNorm(BatchNormBase):
    r"""Batch Normalization over the whole batch of a process group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    where, in training, the mean and biased variance are those of the
    concatenation of every rank's input (Peng et al., "MegDet: A Large Mini-Batch
    Object Detector", CVPR 2018): W ranks of b samples normalize like one batch
    of W·b samples.

    Semantics: moments are count-weighted (a rank with 3 samples weighs 3 times a
    rank with 1; a rank with 0 samples is fine), never an average of per-rank
    means. Training output, input gradient, summed parameter gradients and
    running statistics equal those of ``torch.nn.BatchNorm*d`` on the
    concatenated batch. Communication per layer and iteration: one all-reduce of
    2C + 1 float64 numbers forward, one of 2C numbers backward — independent of
    the world size (torch's own class all-gathers (2C + 1)·W numbers and
    synchronizes with the host). Eval mode uses the running statistics with no
    collective call. Without an initialized process group, or with a group of one
    rank, the layer is exactly ``nn.BatchNorm``. An empty batch over the whole
    group gives an empty output, zero parameter gradients and untouched running
    statistics.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        process_group: the group to synchronize over; ``None`` = the default
            (world) group, resolved at every forward so that the layer can be built
            before ``init_process_group``.

    Shape:
        - Input: ``(N, C, *)`` — 1-D ``(N, C)`` / ``(N, C, L)``, 2-D ``(N, C, H, W)``
          (contiguous or channels_last), 3-D ``(N, C, D, H, W)``. ``N`` may differ
          across ranks and be 0.
        - Output: same shape, dtype and memory format as the input.

    Example::

        >>> bn = distnorm.SyncBatchNorm(64)
        >>> y = bn(torch.randn(2, 64, 32, 32))   # synced once torch.distributed is up
        >>> model = distnorm.convert_model(torchvision.models.resnet50())
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)

    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        return self._batch_norm_forward(input, group)
