"""Batch Renormalization (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..registry import register_variant
from ..functional import batch_norm_with_moments
from ..schedules import Schedule
from ..stats import Moments, group_moments
from ._base import BatchNormBase, layer_name

__all__ = ["BatchRenorm"]

#: ``r_max`` / ``d_max``: a number, a :class:`distnorm.schedules.Schedule`, or any
#: callable ``step -> number``.
Bound = Union[float, Schedule, Callable[[int], float]]

_LOWEST = {"r_max": 1.0, "d_max": 0.0}


@register_variant("brn")
class BatchRenorm(BatchNormBase):
    r"""Batch Renormalization: BatchNorm corrected towards the moving statistics.

    .. math::
        r = \mathrm{sg}\!\left(\mathrm{clip}_{[1/r_{max},\, r_{max}]}
            \frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{sg}\!\left(\mathrm{clip}_{[-d_{max},\, d_{max}]}
            \frac{\mu_B - \mu}{\sigma}\right), \quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017). ``μ_B`` and ``σ_B = sqrt(σ²_B + eps)``
    are the batch moments — of the whole process group's batch, count-weighted,
    as in :class:`SyncBatchNorm` — and ``μ = running_mean``,
    ``σ = sqrt(running_var + eps)`` the moving statistics *before* this step's
    update. ``sg`` stops the gradient: it flows through ``μ_B`` and ``σ_B`` only,
    ``∂L/∂x = γr/σ_B · (g − mean(g) − x̂_B · mean(g·x̂_B))``.

    Semantics:

    * Training normalizes with the batch moments, like BatchNorm, and then pulls
      the result towards what the moving statistics would give, within the clips:
      the output the network learns to use is the one it gets in eval mode.
    * ``r_max = 1, d_max = 0`` is exactly BatchNorm (the paper's warm-up); for steps
      below ``warmup_steps`` the layer is plain BatchNorm as well (``r = 1, d = 0``)
      and the running statistics are still updated. The step is the layer's count
      of training batches before this one (``num_batches_tracked`` before its
      increment: 0 on the first), so it follows checkpoints.
    * ``r_max`` and ``d_max`` are numbers or schedules of the step (see
      :mod:`distnorm.schedules`; ``**distnorm.schedules.paper_schedule()`` gives the
      paper's 1 → 3 and 0 → 5 ramps). The schedules of :mod:`distnorm.schedules`
      are evaluated on the device: the training forward makes no host
      synchronisation. Any other callable is called with the step as a Python
      ``int``, which costs one host read per training forward.
    * Without moving statistics (``track_running_stats=False``) there is nothing
      to renormalize towards: the layer is plain (synced) BatchNorm, ``r = 1,
      d = 0``.
    * Eval mode is plain BatchNorm with the running statistics, no collective call.
      The running statistics follow torch's convention (momentum, unbiased
      variance of the group's batch), and the state_dict is that of
      ``nn.BatchNorm*d``: checkpoints move both ways.
    * Synced: one all-reduce of 2C + 1 numbers forward and one of 2C backward, as
      :class:`SyncBatchNorm`; ranks may hold different numbers of samples, or none.
      An empty batch over the whole group leaves everything untouched.
    * Monitoring: the layer counts, on the device, how often ``r`` and ``d`` hit
      their clips (per channel, over the steps where renormalization is active);
      read them with :meth:`clip_fractions`, restart with :meth:`reset_clip_stats`.
      The counters are per-rank tensor attributes that move with the layer (not
      buffers: not in the state_dict, never broadcast by DDP).

    Differences from tf-keras' ``renorm=True``: there, separate moving averages of
    the batch mean and std (``renorm_momentum``) serve for ``r`` and ``d``; here the
    running statistics do, so that checkpoints stay BatchNorm's.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the variances. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics (without them the layer is
            BatchNorm). Default: ``True``.
        process_group: the group to synchronize over; ``None`` = the default (world)
            group, resolved at every forward.
        r_max: clip of ``r`` to ``[1/r_max, r_max]``; a number ``≥ 1`` or a schedule
            ``step -> number ≥ 1``. Default: 3.0.
        d_max: clip of ``d`` to ``[-d_max, d_max]``; a number ``≥ 0`` or a schedule
            ``step -> number ≥ 0``. Default: 5.0.
        warmup_steps: steps of plain BatchNorm (``r = 1, d = 0``) before
            ``r_max``/``d_max`` apply. Default: 0.

    Raises:
        ValueError: ``r_max < 1``, ``d_max < 0``, NaN, a schedule whose values fall
            below those limits (at construction when the schedule declares its
            bounds, else at the forward that produces the value), or
            ``warmup_steps < 0``; the message names the layer.

    Shape:
        - Input: ``(N, C, *)``; ``N`` may differ across ranks and be 0.
        - Output: same shape, dtype and memory format as the input.

    Example::

        >>> bn = distnorm.BatchRenorm(64, r_max=3.0, d_max=5.0, warmup_steps=5_000)
        >>> y = bn(torch.randn(2, 64, 32, 32))
        >>> model = distnorm.convert_model(model, mode="brn",
        ...                                **distnorm.schedules.paper_schedule(0.1))
        >>> bn.clip_fractions()   # (share of channel-steps with r clipped, same for d)
        (0.0, 0.0)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, *, r_max: Bound = 3.0,
                 d_max: Bound = 5.0, warmup_steps: int = 0, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        # Clip monitoring, kept on the device (no host read on the training path);
        # per-rank state (see modules/_rank_state.py), not in the state_dict.
        self.r_clip_count: Tensor
        self.d_clip_count: Tensor
        self.clip_steps: Tensor
        self.add_rank_state("r_clip_count", torch.zeros(num_features, dtype=torch.long, device=device))
        self.add_rank_state("d_clip_count", torch.zeros(num_features, dtype=torch.long, device=device))
        self.add_rank_state("clip_steps", torch.zeros((), dtype=torch.long, device=device))

    # -- options -------------------------------------------------------------------
    # Design: the step is num_batches_tracked itself, a device tensor, rather than a
    # Python-int mirror of it. A mirror would drift whenever the buffer changes
    # behind the layer's back (an empty batch over the group leaves it unchanged on
    # the device, convert_model shares the tensor with a trained BatchNorm, users
    # edit it in place), while the tensor is always right. Numbers cost nothing;
    # distnorm.schedules' classes take the tensor and compute with torch ops on the
    # device, and are validated once through their declared bounds. Only a foreign
    # callable needs the step on the host (int(...), one read per forward).
    @property
    def r_max(self) -> Bound:
        return self._r_max

    @r_max.setter
    def r_max(self, value: Bound) -> None:
        self._r_max = self._check_bound("r_max", value)

    @property
    def d_max(self) -> Bound:
        return self._d_max

    @d_max.setter
    def d_max(self, value: Bound) -> None:
        self._d_max = self._check_bound("d_max", value)

    @property
    def warmup_steps(self) -> int:
        return self._warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{layer_name(self)}: warmup_steps must be an int >= 0 "
                             f"(got {value!r})")
        self._warmup_steps = value

    def _check_bound(self, name: str, value: Bound) -> Bound:
        """A number becomes a float; a schedule with known bounds is checked now."""
        if isinstance(value, Schedule):
            bounds = value.bounds()
            if bounds is not None:
                low, high = bounds
                if not (low >= _LOWEST[name]) or math.isnan(high):
                    raise ValueError(f"{layer_name(self)}: {name} schedule {value!r} takes values "
                                     f"in [{low}, {high}]; {name} must be >= {_LOWEST[name]:g}")
            return value
        if callable(value):
            return value
        return self._check_value(name, value, None)

    def _check_value(self, name: str, value: Any, step: Optional[int]) -> float:
        where = "" if step is None else f" (schedule value at step {step})"
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{layer_name(self)}: {name} must be a number or a schedule "
                            f"step -> number (got {type(value).__name__}{where})")
        if not (value >= _LOWEST[name]):  # catches NaN too
            raise ValueError(f"{layer_name(self)}: {name} must be >= {_LOWEST[name]:g} "
                             f"(got {value}{where})")
        return float(value)

    def _bound(self, name: str, value: Bound, step: Tensor, dtype: torch.dtype) -> Union[float, Tensor]:
        """This step's ``r_max`` / ``d_max``: a float, or a 0-dim tensor on the device."""
        if isinstance(value, float):
            return value
        if isinstance(value, Schedule) and value.bounds() is not None:
            return value(step).to(dtype)  # torch ops on the device, no host read
        host_step = int(step)  # a foreign callable: one host read
        return self._check_value(name, value(host_step), host_step)

    # -- training ------------------------------------------------------------------
    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        moments = group_moments(input, group, context=self._sync_context())
        if not self._tracks():
            # No moving statistics to renormalize towards: r = 1, d = 0 (BatchNorm).
            return batch_norm_with_moments(input, moments, self.weight, self.bias, self.eps,
                                           group, context=self._sync_context())
        r, d = self._renorm_factors(moments)  # from the running stats before the update
        self._update_running_stats(moments)
        if self.weight is not None:
            # γ·(x̂·r + d) + β = x̂·(γr) + (γd + β): r and d are constants, so autograd
            # gives ∂L/∂γ = Σg·(x̂r + d), ∂L/∂β = Σg, and the core's backward gives
            # ∂L/∂x = γr/σ_B·(g − mean g − x̂·mean(g·x̂)) with one all-reduce.
            weight = self.weight * r.to(self.weight.dtype)
            bias = torch.addcmul(self.bias, self.weight, d.to(self.weight.dtype))
        else:
            weight, bias = r, d
        return batch_norm_with_moments(input, moments, weight, bias, self.eps, group, context=self._sync_context())

    def _renorm_factors(self, moments: Moments) -> Tuple[Tensor, Tensor]:
        """``(r, d)`` for this step, detached, on the device; updates the clip counters."""
        with torch.no_grad():
            dtype = moments.mean.dtype
            step = self.num_batches_tracked  # before this step's increment
            sigma = torch.sqrt(self.running_var.to(dtype) + self.eps)
            r_raw = torch.sqrt(moments.var + self.eps) / sigma
            d_raw = (moments.mean - self.running_mean.to(dtype)) / sigma
            r_max = self._bound("r_max", self._r_max, step, dtype)
            d_max = self._bound("d_max", self._d_max, step, dtype)
            r = torch.clamp(r_raw, min=1.0 / r_max, max=r_max)
            d = torch.clamp(d_raw, min=-d_max, max=d_max)
            counted = moments.count > 0
            if self._warmup_steps > 0:
                active = step >= self._warmup_steps
                r = torch.where(active, r, torch.ones_like(r))
                d = torch.where(active, d, torch.zeros_like(d))
                counted = counted & active
            self.r_clip_count.add_((r_raw != r) & counted)
            self.d_clip_count.add_((d_raw != d) & counted)
            self.clip_steps.add_(counted)
            # torch.compile (torch 2.14) may recompute r and d in the backward from the
            # running-stat buffers, i.e. after update_running_stats has changed them,
            # and silently give γ a wrong gradient (pytorch/pytorch PR #197039, open).
            # torch.cat is not recomputed by the partitioner: packing r and d makes it
            # save them. Eagerly it costs one 2C-sized copy.
            packed = torch.cat([r, d])
        return packed[:self.num_features], packed[self.num_features:]

    # -- monitoring ----------------------------------------------------------------
    def clip_fractions(self, per_channel: bool = False) -> Union[Tuple[float, float],
                                                                 Tuple[Tensor, Tensor]]:
        """How often ``r`` and ``d`` hit their clips since the last reset.

        Counted over the training steps where renormalization is active (after
        ``warmup_steps``, with running statistics, a non-empty group batch). A value
        near 1 means the clip binds nearly always (raise ``r_max``/``d_max`` or
        lengthen the schedule), near 0 that it rarely matters.

        Args:
            per_channel: return two ``(C,)`` tensors instead of two floats.

        Returns:
            ``(r_fraction, d_fraction)``: clipped channel-steps over channel-steps
            (0.0 before any counted step). The float form reads the device
            counters once.
        """
        steps = self.clip_steps.to(torch.float64).clamp(min=1)
        if per_channel:
            return self.r_clip_count / steps, self.d_clip_count / steps
        total = steps * self.num_features
        return (float(self.r_clip_count.sum() / total), float(self.d_clip_count.sum() / total))

    def reset_clip_stats(self) -> None:
        """Zero the clip counters of :meth:`clip_fractions`."""
        self.reset_rank_state()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        text += f", r_max={self._r_max!r}, d_max={self._d_max!r}"
        if self._warmup_steps:
            text += f", warmup_steps={self._warmup_steps}"
        return text
