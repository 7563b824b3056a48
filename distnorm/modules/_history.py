"""The window of past iterations of the cross-iteration BatchNorm (not public).

A ring of k − 1 slots, one per past iteration: its group moments (float64), the
derivatives of this rank's sums with respect to the producer's weight, and this
rank's compensation ⟨∂S/∂W, W_t − W_τ⟩, ⟨∂Q/∂W, W_t − W_τ⟩ up to the current weight,
accumulated (telescoped) one weight step per iteration in float64. All of it is
per-rank state (see :mod:`distnorm.modules._rank_state`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..errors import layer_name
from ..stats import Moments
from ._rank_state import RankStateMixin

__all__ = ["IterationHistory"]


class IterationHistory(RankStateMixin):
    """The ring of past iterations, mixed into
    :class:`~distnorm.modules.cross_iteration.CrossIterationBatchNorm` (which holds
    ``window``). Slots are filled oldest-first; a slot whose whole group batch was
    empty has count 0 and is left out of the window."""

    window: int

    def _init_history(self, window: int, num_features: int, device: Any) -> None:
        """Declare the ring's per-rank state: ``window − 1`` slots of ``num_features``."""
        self._recorded: int
        self.add_rank_state("_recorded", 0)           # iterations recorded (ring position)
        slots = window - 1
        f64 = dict(dtype=torch.float64, device=device)
        # Group values (count, mean, E[x²]) and each slot's local compensation up to
        # the last forward, float64; whether the slot has derivatives.
        self._hist_count: Tensor
        self._hist_has_d: Tensor
        self._hist_mean: Tensor
        self._hist_sq: Tensor
        self._hist_comp_sum: Tensor
        self._hist_comp_sq: Tensor
        for key, shape in (("_hist_count", (slots,)), ("_hist_has_d", (slots,)),
                           ("_hist_mean", (slots, num_features)),
                           ("_hist_sq", (slots, num_features)),
                           ("_hist_comp_sum", (slots, num_features)),
                           ("_hist_comp_sq", (slots, num_features))):
            self.add_rank_state(key, torch.zeros(shape, **f64))
        # Allocated at the first compensated iteration (their shapes are the producer's).
        self._hist_bias: Optional[Tensor]
        self._hist_dsum: Optional[Tensor]
        self._hist_dsq: Optional[Tensor]
        self._prev_weight: Optional[Tensor]
        self.add_rank_state("_hist_bias", None)    # (k−1, C) float64
        self.add_rank_state("_hist_dsum", None)    # (k−1, G, L), history_dtype
        self.add_rank_state("_hist_dsq", None)     # (k−1, C, L), history_dtype
        self.add_rank_state("_prev_weight", None)  # W at the last forward

    # -- public ------------------------------------------------------------------------
    def reset_history(self) -> None:
        """Forget the past iterations (the burn-in count is kept)."""
        self.reset_rank_state()

    def history_bytes(self) -> int:
        """Bytes held by the history of past iterations (derivatives and statistics)."""
        return sum(t.numel() * t.element_size() for t in
                   (getattr(self, name) for name in self.rank_state_names())
                   if isinstance(t, Tensor))

    def history_state(self) -> Dict[str, Any]:
        """The window's history and counters, to save next to a checkpoint:
        :meth:`rank_state_dict` and the ``window`` it was recorded with
        (:func:`distnorm.rank_state_dict` saves every layer's at once).

        Example::

            >>> extra = {n: m.history_state() for n, m in model.named_modules()
            ...          if isinstance(m, distnorm.CrossIterationBatchNorm)}
        """
        state = self.rank_state_dict()
        state["window"] = self.window
        return state

    def load_history_state(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`history_state` (same ``window``; the producer is found
        again at the next training forward, or keep the one attached)."""
        if state.get("window") != self.window:
            raise ValueError(f"{layer_name(self)}: history of window {state.get('window')} "
                             f"cannot load into window {self.window}")
        state = dict(state)
        for old, new in (("step", "_step"), ("recorded", "_recorded")):  # the earlier keys
            if old in state:
                state.setdefault(new, state.pop(old))
        self.load_rank_state_dict(state)

    # -- the forward's steps -------------------------------------------------------------
    def _compensations(self, weight: Optional[Tensor], compensate: bool,
                       device: torch.device) -> Tensor:
        """``(2, slots, C)`` float64: this rank's ⟨∂S/∂W, W_t − W_τ⟩ and
        ⟨∂Q/∂W, W_t − W_τ⟩ for every slot, brought up to the current weight ``W_t``
        (zeros without compensation), to be summed over the group."""
        if compensate and self._hist_dsq is not None and self._prev_weight is not None:
            # ⟨∂_τ, W_t − W_τ⟩ telescoped: the last value plus ⟨∂_τ, W_t − W_{t−1}⟩. The
            # step is small, so the product is accurate in float32; sums in float64.
            step = self._inner_products(weight - self._prev_weight, self._hist_dsum,
                                        self._hist_dsq)
            self._hist_comp_sum.add_(step[0])
            self._hist_comp_sq.add_(step[1])
            return torch.stack([self._hist_comp_sum, self._hist_comp_sq])
        slots, channels = self._hist_mean.shape
        return torch.zeros(2, slots, channels, dtype=torch.float64, device=device)

    def _window_moments(self, current: Moments, reduced: Tensor, bias: Optional[Tensor],
                        rho: float, compensate: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The window's moments: ``(k', mean, var, E[x²] of the current iteration)``,
        float64, per channel, with ``k'`` the iterations in the window.

        Args:
            current: this iteration's group moments (float64).
            reduced: the group sums of :meth:`_compensations`, ``(2, slots, C)``.
            bias: the producer's current bias (compensated with ∂μ/∂b = 1,
                ∂ν/∂b = 2μ), or ``None``.
            rho: the weight of the compensation.
            compensate: whether to compensate the past moments at all.
        """
        mean_t = current.mean
        sq_t = current.var + mean_t * mean_t
        # Past iterations compensated to the current weights (float64, group values).
        count = self._hist_count.unsqueeze(1)
        valid = (count > 0).to(torch.float64)
        mean_p, sq_p = self._hist_mean, self._hist_sq
        if compensate:
            delta_mean = reduced[0] / count.clamp(min=1)
            delta_sq = reduced[1] / count.clamp(min=1)
            if bias is not None and self._hist_bias is not None:
                has_d = self._hist_has_d.unsqueeze(1)
                delta_b = has_d * (bias.detach().to(torch.float64).unsqueeze(0) - self._hist_bias)
                delta_mean = delta_mean + delta_b
                delta_sq = delta_sq + 2 * mean_p * delta_b
            mean_p = mean_p + rho * delta_mean
            sq_p = sq_p + rho * delta_sq
        sq_p = torch.maximum(sq_p, mean_p * mean_p)
        k_eff = 1 + valid.sum(0)
        mean_w = (mean_t + (valid * mean_p).sum(0)) / k_eff
        sq_w = (sq_t + (valid * sq_p).sum(0)) / k_eff
        var_w = (sq_w - mean_w * mean_w).clamp_(min=0)
        return k_eff, mean_w, var_w, sq_t

    @staticmethod
    def _inner_products(delta: Tensor, d_sum: Tensor, d_sq: Tensor) -> Tensor:
        """Per channel ⟨∂S/∂W[c], ΔW[c]⟩ and ⟨∂Q/∂W[c], ΔW[c]⟩ for every history slot:
        ``(2, slots, C)`` float64 (computed in float32 at least)."""
        slots, groups, length = d_sum.shape
        channels = d_sq.shape[1]
        dtype = torch.promote_types(delta.dtype, torch.float32)
        w = delta.to(dtype).reshape(groups, channels // groups, length)
        by_sum = torch.einsum("gcl,sgl->sgc", w, d_sum.to(dtype)).reshape(slots, channels)
        by_sq = (d_sq.to(dtype) * w.reshape(1, channels, length)).sum(-1)
        return torch.stack([by_sum, by_sq]).to(torch.float64)

    @torch.no_grad()
    def _record(self, current: Moments, sq_t: Tensor,
                derivatives: Optional[Tuple[Tensor, Tensor]], bias: Optional[Tensor],
                store: torch.dtype) -> None:
        """Store this iteration in the ring slot of the oldest one.

        Args:
            current: this iteration's group moments (float64); ``sq_t`` its E[x²].
            derivatives: this rank's ``(∂S/∂W, ∂Q/∂W)``, or ``None`` for an
                iteration recorded without compensation.
            bias: the producer's bias at this iteration, or ``None``.
            store: the dtype the derivatives are kept in.
        """
        slot = self._recorded % (self.window - 1)
        self._recorded += 1
        self._hist_count[slot] = current.count
        self._hist_mean[slot] = current.mean
        self._hist_sq[slot] = sq_t
        self._hist_has_d[slot] = float(derivatives is not None)
        if derivatives is None:  # uncompensated: zero derivatives
            self._hist_comp_sum[slot] = 0
            self._hist_comp_sq[slot] = 0
            if self._hist_dsum is not None:
                self._hist_dsum[slot] = 0
                self._hist_dsq[slot] = 0
            return
        d_sum, d_sq = derivatives
        if self._hist_dsq is None:
            slots = self.window - 1
            self._hist_dsum = d_sum.new_zeros((slots,) + tuple(d_sum.shape), dtype=store)
            self._hist_dsq = d_sq.new_zeros((slots,) + tuple(d_sq.shape), dtype=store)
        self._hist_dsum[slot] = d_sum
        self._hist_dsq[slot] = d_sq
        self._hist_comp_sum[slot] = 0
        self._hist_comp_sq[slot] = 0
        if bias is not None:
            if self._hist_bias is None:
                self._hist_bias = torch.zeros_like(self._hist_mean)
            self._hist_bias[slot] = bias.detach().to(torch.float64)
