"""Spatially-Adaptive Denormalization (Park et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import layer_name
from ..modules._base import check_input
from ..modules.sync_batch_norm import SyncBatchNorm

__all__ = ["SPADE"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class SPADE(nn.Module):
    r"""Parameter-free synced BatchNorm, then γ and β that vary over space, predicted
    from a segmentation map.

    .. math::
        a = \mathrm{ReLU}(\mathrm{conv}(m)), \qquad
        y = \hat x_{BN} \cdot (1 + \mathrm{conv}_\gamma(a)) + \mathrm{conv}_\beta(a)

    (Park, Liu, Wang, Zhu, "Semantic Image Synthesis with Spatially-Adaptive
    Normalization", CVPR 2019). ``m`` is the segmentation map resized to ``x``'s
    spatial size (nearest neighbour). :math:`\hat x_{BN}` is ``param_free_norm``, a
    :class:`SyncBatchNorm` with ``affine=False``: statistics of the whole process
    group's batch (count-weighted, one all-reduce each way), running statistics for
    eval. The module and parameter names are those of the authors' code
    (``param_free_norm``, ``mlp_shared``, ``mlp_gamma``, ``mlp_beta``), so their
    checkpoints load.

    Semantics: the map only scales and shifts; it plays no part in the statistics.
    Eval mode uses the running statistics, no collective call. ``convert_model``
    and ``revert_model`` treat ``param_free_norm`` like any BatchNorm (e.g.
    ``mode="gn"`` gives the GroupNorm variant; revert gives the authors'
    ``nn.BatchNorm2d(affine=False)``).

    Args:
        num_features: C of the ``(N, C, *spatial)`` input.
        label_channels: channels of the segmentation map (e.g. one-hot classes).
        hidden: channels of the shared convolution. Default: 128.
        eps: added to the variance. Default: 1e-5.
        process_group: the group the statistics are synced over; ``None`` = the
            default (world) group, resolved at every forward.
        momentum: keyword-only; running-statistics factor. Default: 0.1.
        spatial_dims: keyword-only; 1, 2 or 3 (the convolutions' dimension).
            Default: 2.
        kernel_size: keyword-only; of the three convolutions (odd; "same" padding).
            Default: 3.

    Shape:
        - Input: ``x`` ``(N, C, *spatial)`` and ``segmap``
          ``(N, label_channels, *spatial')``, ``len(spatial) == len(spatial') ==
          spatial_dims``; any ``spatial'`` (resized).
        - Output: same shape as ``x``.

    Example::

        >>> spade = distnorm.SPADE(256, label_channels=35)
        >>> y = spade(torch.randn(2, 256, 32, 32), one_hot_labels_256x256)
    """

    def __init__(self, num_features: int, label_channels: int, hidden: int = 128,
                 eps: float = 1e-5, process_group: Optional[Any] = None, *,
                 momentum: Optional[float] = 0.1, spatial_dims: int = 2, kernel_size: int = 3,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"SPADE: spatial_dims must be 1, 2 or 3 (got {spatial_dims})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SPADE: kernel_size must be odd and positive (got {kernel_size})")
        kw = {"device": device, "dtype": dtype}
        conv = _CONV[spatial_dims]
        pad = kernel_size // 2
        self.num_features = num_features
        self.label_channels = label_channels
        self.spatial_dims = spatial_dims
        self.param_free_norm = SyncBatchNorm(num_features, eps, momentum, affine=False,
                                             process_group=process_group, **kw)
        self.mlp_shared = nn.Sequential(conv(label_channels, hidden, kernel_size, padding=pad, **kw),
                                        nn.ReLU())
        self.mlp_gamma = conv(hidden, num_features, kernel_size, padding=pad, **kw)
        self.mlp_beta = conv(hidden, num_features, kernel_size, padding=pad, **kw)

    @property
    def process_group(self) -> Optional[Any]:
        return self.param_free_norm.process_group

    @process_group.setter
    def process_group(self, group: Optional[Any]) -> None:
        self.param_free_norm.process_group = group

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:
        check_input(self, x, self.num_features)
        d = self.spatial_dims
        if x.dim() != d + 2:
            raise ValueError(f"{layer_name(self)}: expected an (N, C) + {d} spatial dims input "
                             f"(spatial_dims={d}) (got shape {tuple(x.shape)})")
        if segmap.dim() != d + 2 or segmap.shape[0] != x.shape[0] \
                or segmap.shape[1] != self.label_channels:
            raise ValueError(f"{layer_name(self)}: expected a segmentation map of shape "
                             f"(N={x.shape[0]}, label_channels={self.label_channels}) + {d} "
                             f"spatial dims (got {tuple(segmap.shape)})")
        normalized = self.param_free_norm(x)
        weight = self.mlp_gamma.weight
        segmap = F.interpolate(segmap.to(weight.dtype), size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        y = normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, label_channels={self.label_channels}, "
                f"spatial_dims={self.spatial_dims}")
