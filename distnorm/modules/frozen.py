"""BatchNorm with fixed statistics and affine parameters (detectron2's FrozenBatchNorm2d)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_variant
from ._base import check_input, rebuild_batch_norm

__all__ = ["FrozenBatchNorm"]


@register_variant("frozen")
class FrozenBatchNorm(nn.Module):
    r"""An affine map per channel, taken from a trained BatchNorm and kept fixed.

    .. math::
        y = x \cdot s + b, \quad s = \frac{\gamma}{\sqrt{\mathrm{running\_var} + \epsilon}},
        \quad b = \beta - \mathrm{running\_mean} \cdot s

    γ, β, running_mean and running_var are buffers: they get no gradient and no
    update, in training and eval alike, so the layer does not depend on the batch
    at all — the usual choice for a pretrained backbone fine-tuned at 1–2 images
    per GPU (detectron2, torchvision's detection models).

    The state_dict has the keys of ``nn.BatchNorm*d`` (``num_batches_tracked``
    included and ignored), so checkpoints move both ways.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the running variance. Default: 1e-5.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape.
    """

    _distnorm_source = None

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        # BatchNorm's hyper-parameters, kept so the layer converts and reverts to
        # the BatchNorm it came from; they play no part in the frozen map.
        self.momentum: Optional[float] = 0.1
        self.affine = True
        self.track_running_stats = True
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # the message names the layer (not scriptable)
            check_input(self, input, self.num_features)
        # The eval-mode native kernel is exactly x·s + b, fused, for any layout.
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore[override]
                              missing_keys, unexpected_keys, error_msgs):
        # Checkpoints of detectron2/torchvision FrozenBatchNorm2d lack the counter.
        state_dict.setdefault(prefix + "num_batches_tracked",
                              torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, process_group: Any = None,
                        **options: Any) -> "FrozenBatchNorm":
        """Freeze ``bn`` (a BatchNorm with running statistics); ``process_group`` is unused."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"cannot freeze {type(bn).__name__}: it has no running statistics "
                             "(track_running_stats=False)")
        ref = bn.running_mean
        layer = cls(bn.num_features, bn.eps, **options, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = getattr(bn, name, None)
                if value is not None:
                    layer._buffers[name] = value.detach()
            layer._buffers["running_mean"] = bn.running_mean
            layer._buffers["running_var"] = bn.running_var
            if getattr(bn, "num_batches_tracked", None) is not None:
                layer._buffers["num_batches_tracked"] = bn.num_batches_tracked
        layer._distnorm_requires_grad = {
            name: getattr(bn, name).requires_grad
            for name in ("weight", "bias") if isinstance(getattr(bn, name, None), nn.Parameter)}
        layer.affine = bool(getattr(bn, "affine", True))
        layer.momentum = getattr(bn, "momentum", 0.1)
        layer._distnorm_source = getattr(bn, "_distnorm_source", None) or type(bn)
        layer.train(bn.training)
        return layer

    def to_batch_norm(self) -> nn.Module:
        """The BatchNorm this layer was frozen from, sharing its tensors (``revert_model``):
        γ and β become parameters again, with the ``requires_grad`` they had before
        freezing (see :func:`~distnorm.modules._base.rebuild_batch_norm`)."""
        return rebuild_batch_norm(self)
