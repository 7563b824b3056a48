"""Conditional Batch Normalization (de Vries et al., NeurIPS 2017)."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..errors import layer_name
from ..modules._base import check_input
from ..modules.sync_batch_norm import SyncBatchNorm

__all__ = ["ConditionalBatchNorm"]


class ConditionalBatchNorm(nn.Module):
    r"""BatchNorm whose γ and β are predicted per sample from a condition vector.

    .. math::
        (\Delta\gamma, \beta) = \mathrm{MLP}(c), \qquad
        y = \hat x_{BN} \cdot (1 + \Delta\gamma) + \beta

    (de Vries, Strub, Mary, Larochelle, Pietquin, Courville, "Modulating early
    visual processing by language", NeurIPS 2017; the ``1 +`` form is BigGAN's).
    :math:`\hat x_{BN}` is parameter-free BatchNorm, ``self.norm``: a
    :class:`SyncBatchNorm` with ``affine=False``, so its statistics are those of the
    whole process group's batch (count-weighted, one all-reduce each way), with
    running statistics for eval. The MLP is ``Linear(cond_features, hidden) → ReLU
    → Linear(hidden, 2C)``; its last layer starts at zero, so a fresh layer is plain
    BatchNorm (γ = 1, β = 0) whatever the condition.

    Semantics: the condition only scales and shifts, per sample and channel; it
    plays no part in the statistics. Eval mode uses the running statistics and
    makes no collective call. ``convert_model`` and ``revert_model`` see
    ``self.norm`` like any BatchNorm (e.g. ``mode="brn"`` swaps it; revert gives an
    ``nn.BatchNorm2d(affine=False)``).

    Args:
        num_features: C of an ``(N, C, *)`` input.
        cond_features: size of the condition vector.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor (``None``: cumulative average).
            Default: 0.1.
        process_group: the group the statistics are synced over; ``None`` = the
            default (world) group, resolved at every forward.
        hidden: keyword-only; width of the MLP's hidden layer. Default: 128.

    Shape:
        - Input: ``x`` ``(N, C, *)`` and ``cond`` ``(N, cond_features)``.
        - Output: same shape and dtype as ``x``.

    Example::

        >>> cbn = distnorm.ConditionalBatchNorm(64, cond_features=10)
        >>> y = cbn(torch.randn(8, 64, 16, 16), torch.randn(8, 10))
    """

    def __init__(self, num_features: int, cond_features: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, process_group: Optional[Any] = None, *,
                 hidden: int = 128, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.cond_features = cond_features
        self.norm = SyncBatchNorm(num_features, eps, momentum, affine=False,
                                  process_group=process_group, **kw)
        self.mlp = nn.Sequential(nn.Linear(cond_features, hidden, **kw), nn.ReLU(),
                                 nn.Linear(hidden, 2 * num_features, **kw))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    @property
    def process_group(self) -> Optional[Any]:
        return self.norm.process_group

    @process_group.setter
    def process_group(self, group: Optional[Any]) -> None:
        self.norm.process_group = group

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        check_input(self, x, self.num_features)
        if cond.dim() != 2 or cond.shape[0] != x.shape[0] or cond.shape[1] != self.cond_features:
            raise ValueError(f"{layer_name(self)}: expected a condition of shape "
                             f"(N={x.shape[0]}, cond_features={self.cond_features}) for an input "
                             f"of shape {tuple(x.shape)} (got {tuple(cond.shape)})")
        normalized = self.norm(x)
        params = self.mlp(cond.to(self.mlp[0].weight.dtype))
        shape = (x.shape[0], self.num_features) + (1,) * (x.dim() - 2)
        gamma, beta = params.view(x.shape[0], 2, self.num_features).unbind(1)
        y = normalized * (1 + gamma.reshape(shape)) + beta.reshape(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, cond_features={self.cond_features}"
