"""Cross mini-Batch Normalization, CmBN (YOLOv4, Bochkovskiy et al., 2020).

BatchNorm across the micro-batches of gradient accumulation: within a cycle of
``accumulation_steps`` micro-batches, micro-batch j is normalized with the moments
of micro-batches 1..j together, so the last one of a cycle sees the statistics of
the whole accumulated batch (docs/algorithms.md §3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..registry import register_variant
from ..functional import batch_norm_with_moments
from .._packing import packed_size
from ..stats import group_sums, moments_from_sums, stats_dtype
from ._base import BatchNormBase, layer_name
from .cycle_batch_norm import CycleBatchNorm

__all__ = ["CrossMiniBatchNorm", "accumulation_steps_from", "reset_accumulation"]


def _check_steps(owner: str, value: Any) -> int:
    """``value`` if it is an integer ≥ 1, else a ``ValueError`` naming ``owner``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: accumulation_steps must be an integer >= 1 "
                         f"(got {value!r})")
    return value


@register_variant("cmbn")
class CrossMiniBatchNorm(BatchNormBase):
    r"""BatchNorm over the micro-batches of a gradient-accumulation cycle (CmBN).

    A training step accumulates gradients over A micro-batches (``accumulation_steps``).
    At micro-batch j of a cycle (j = 1..A), the layer normalizes with the moments of
    micro-batches 1..j together:

    .. math::
        M = \sum_{i \le j} M_i, \quad
        \mu = \frac{1}{M} \sum_{i \le j} \sum x_i, \quad
        \sigma^2 = \frac{1}{M} \sum_{i \le j} \sum x_i^2 - \mu^2, \quad
        y_j = \frac{x_j - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    (Bochkovskiy et al., "YOLOv4: Optimal Speed and Accuracy of Object Detection",
    2020, Cross mini-Batch Normalization.) The moments of earlier micro-batches are
    constants: the gradient flows through the current micro-batch's own terms only,
    :math:`\partial L/\partial x_j = \gamma/\hat\sigma \, (g - A_j/M - \hat x \, B_j/M)`
    with :math:`A_j = \sum g`, :math:`B_j = \sum g \hat x` over micro-batch j.

    Semantics:
        - The last micro-batch of a cycle is normalized exactly like one BatchNorm
          over all A micro-batches; with A = 1 the layer is BatchNorm (synced:
          ``SyncBatchNorm``).
        - Synced over ``process_group`` (like :class:`~distnorm.SyncBatchNorm`),
          each micro-batch's moments are those of every rank's slice, count-weighted
          (a rank may hold 0 samples of a micro-batch): one all-reduce of 2C + 1
          float64 numbers forward and one of 2C numbers backward per micro-batch.
          Micro-batches are accumulated as float64 sums, so the cycle's moments are
          as accurate as BatchNorm on the concatenated batch.
        - Running statistics are updated **once per cycle**, after micro-batch A, with
          the cycle's moments (unbiased variance of all its elements);
          ``num_batches_tracked`` counts cycles, so ``momentum=None`` averages
          cycles. Then the cycle restarts.
        - The position in the cycle is counted by the layer's training-mode forward
          calls (an empty micro-batch counts too); eval-mode forwards use the running
          statistics and neither count nor disturb the cycle.
          :func:`reset_accumulation` restarts the cycle, discarding a partial one
          without a running update (start of an epoch, a skipped step). Keep the
          data loader's cycles aligned with the optimizer's: call
          ``optimizer.step()`` after every A-th micro-batch.
        - Differs from darknet's ``batch_normalize=2``: micro-batches are weighted by
          count (not averaged with equal weights) and the running statistics are
          updated once per cycle (not every micro-batch).
        - The sums of the partial cycle are a float64 tensor attribute that follows
          the module's device (``.to()``, ``.cuda()``) and keeps its dtype through
          ``.half()``, but is not a buffer: the
          state_dict is ``nn.BatchNorm``'s (checkpoints move both ways), and
          ``DistributedDataParallel`` does not broadcast it — with
          ``broadcast_buffers=True`` DDP overwrites every buffer with rank 0's, which
          would hand rank 0's partial cycle to the ranks of other groups when
          ``process_group`` is smaller than DDP's (e.g. a local CmBN per GPU).
        - Under ``DistributedDataParallel`` nothing special is needed: run the first
          A − 1 micro-batches under ``no_sync()`` (or not) and the last one with
          gradient synchronization; the optimizer steps every A micro-batches.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor per cycle, or ``None`` for a cumulative
            average over cycles. Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        process_group: the group to synchronize over; ``None`` = the default
            (world) group, resolved at every forward. Without an initialized process
            group, or with a group of one rank, the layer is local.
        accumulation_steps: A, micro-batches per optimizer step (keyword-only);
            an integer ≥ 1. Under DeepSpeed, read it with
            :func:`accumulation_steps_from`. Default: 4.

    Shape:
        - Input: ``(N, C, *)``; ``N`` may differ across micro-batches and ranks, and be 0.
        - Output: same shape, dtype and memory format as the input.

    Example::

        >>> model = distnorm.convert_model(model, mode="cmbn", accumulation_steps=4)
        >>> for i, (x, target) in enumerate(loader):
        ...     loss = criterion(model(x), target) / 4
        ...     loss.backward()
        ...     if (i + 1) % 4 == 0:
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        >>> distnorm.reset_accumulation(model)   # e.g. at the start of each epoch
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, *, accumulation_steps: int = 4,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)
        self.accumulation_steps = accumulation_steps
        # Per-rank state (see modules/_rank_state.py), restarted together by
        # reset_accumulation. [M, ΣS, ΣQ] of the micro-batches seen so far in this
        # cycle (float64, laid out by distnorm._packing), meaningful only while
        # _position > 0; and the micro-batches already seen in this cycle, a Python
        # int counted by forward calls, never read from the data (no host sync).
        self._cycle_sums: Tensor
        self._position: int
        self.add_rank_state("_cycle_sums", torch.zeros(packed_size(num_features),
                                                       dtype=torch.float64, device=device))
        self.add_rank_state("_position", 0)

    @property
    def accumulation_steps(self) -> int:
        """A, the number of micro-batches in a cycle (an integer ≥ 1)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self._accumulation_steps = _check_steps(layer_name(self), value)

    @property
    def position(self) -> int:
        """Micro-batches already accumulated in the current cycle (0 at its start)."""
        return self._position

    def reset_accumulation(self) -> None:
        """Restart the cycle, discarding a partial one without a running update."""
        self.reset_rank_state()

    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        sums = group_sums(input, group, context=self._sync_context())  # fresh float64 buffer, one all-reduce
        if self._position > 0:
            sums.add_(self._cycle_sums)
        moments = moments_from_sums(sums, stats_dtype(input))
        output = batch_norm_with_moments(input, moments, self.weight, self.bias, self.eps, group,
                                         context=self._sync_context())
        self._position += 1
        if self._position >= self.accumulation_steps:
            self._update_running_stats(moments)
            self.reset_accumulation()
        else:
            self._cycle_sums.copy_(sums)
        return output

    def extra_repr(self) -> str:
        return super().extra_repr() + f", accumulation_steps={self.accumulation_steps}"


def reset_accumulation(module: nn.Module) -> None:
    """Restart the cycle of every :class:`CrossMiniBatchNorm` and
    :class:`~distnorm.CycleBatchNorm` in ``module``.

    A partial cycle is discarded without a running-statistics update; a
    CycleBatchNorm's next call uses its statistics set 0 again. Call it where
    the data stops lining up with the optimizer's steps: at the start of an epoch
    whose length is not a multiple of ``accumulation_steps``, after a skipped step
    (e.g. a non-finite loss), or before resuming training from a checkpoint.
    ``module`` may be a whole model (also wrapped in DDP) or a single layer.

    Example::

        >>> for epoch in range(epochs):
        ...     distnorm.reset_accumulation(model)
        ...     train_one_epoch(model, loader, optimizer)
    """
    for layer in module.modules():
        if isinstance(layer, CrossMiniBatchNorm):
            layer.reset_accumulation()
        elif isinstance(layer, CycleBatchNorm):
            layer.reset_cycle()


def accumulation_steps_from(engine_or_config: Any) -> int:
    """``gradient_accumulation_steps`` of a DeepSpeed engine or configuration.

    Accepts a DeepSpeed engine (``engine.gradient_accumulation_steps()``), a
    ``DeepSpeedConfig``-like object with a ``gradient_accumulation_steps``
    attribute, a DeepSpeed config dict, or the path of a JSON config file. A config
    without ``gradient_accumulation_steps`` gets DeepSpeed's rule:
    ``train_batch_size / (train_micro_batch_size_per_gpu · world size)`` when both
    are given, else 1. DeepSpeed itself is not imported.

    Convert before ``deepspeed.initialize``, so that the engine wraps the converted
    model; the engine then calls ``backward`` on every micro-batch and steps every
    ``gradient_accumulation_steps``, exactly the cycle CmBN counts::

        >>> ds_config = "ds_config.json"   # or the dict passed to deepspeed.initialize
        >>> model = distnorm.convert_model(
        ...     model, mode="cmbn", accumulation_steps=accumulation_steps_from(ds_config))
        >>> engine, optimizer, _, _ = deepspeed.initialize(
        ...     model=model, model_parameters=model.parameters(), config=ds_config)
        >>> for x, target in loader:
        ...     engine.backward(criterion(engine(x), target))
        ...     engine.step()

    Raises:
        ValueError: the value is ``"auto"`` (resolved by the Hugging Face Trainer:
            pass the engine instead), not an integer ≥ 1, or not derivable
            (``train_batch_size`` not divisible by micro-batch size × world size).
        TypeError: ``engine_or_config`` is none of the above.
    """
    owner = "accumulation_steps_from"
    if isinstance(engine_or_config, (str, os.PathLike)):
        with open(engine_or_config, encoding="utf-8") as handle:
            engine_or_config = json.load(handle)
    if isinstance(engine_or_config, Mapping):
        return _steps_from_config(engine_or_config)
    value = getattr(engine_or_config, "gradient_accumulation_steps", None)
    if value is None:
        raise TypeError(f"{owner}: expected a DeepSpeed engine, a config dict or a JSON path "
                        f"(got {type(engine_or_config).__name__})")
    if callable(value):  # DeepSpeedEngine.gradient_accumulation_steps()
        value = value()
    return _check_steps(owner, value)


def _steps_from_config(config: Mapping[str, Any]) -> int:
    owner = "accumulation_steps_from"
    value = config.get("gradient_accumulation_steps")
    if value is None:
        total = config.get("train_batch_size")
        micro = config.get("train_micro_batch_size_per_gpu")
        if total is None or micro is None:
            return 1  # DeepSpeed's default when it is not given nor derivable
        if "auto" in (total, micro):
            value = "auto"
        else:
            world = (dist.get_world_size() if dist.is_available() and dist.is_initialized()
                     else int(os.environ.get("WORLD_SIZE", "1")))
            if total % (micro * world):
                raise ValueError(f"{owner}: train_batch_size={total} is not divisible by "
                                 f"train_micro_batch_size_per_gpu={micro} x world size {world}")
            value = total // (micro * world)
    if value == "auto":
        raise ValueError(f"{owner}: gradient_accumulation_steps is 'auto' (filled in by the "
                         "Hugging Face Trainer): pass the DeepSpeed engine, or a number")
    return _check_steps(owner, value)
