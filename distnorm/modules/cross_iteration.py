"""Cross-Iteration Batch Normalization, CIBN (Yao et al., CVPR 2021; ``mode="cbn"``).

BatchNorm with the statistics of the last k iterations, each compensated to the
current weights of the layer that produces the BN's input by a first-order Taylor
term (docs/algorithms.md §4). The layer lives here; the producer is read from the
autograd graph by :mod:`distnorm.modules._producer`, and the window of past
iterations is kept by :mod:`distnorm.modules._history`.

Names: the paper calls it CBN, as does ``convert_model(mode="cbn")`` (also reachable
as ``mode="cross_iteration"``); this project writes CIBN in prose, so that it is not
read as Conditional Batch Normalization (:class:`distnorm.ConditionalBatchNorm`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from .._packing import split_packed
from ..functional import batch_norm_with_moments
from ..registry import register_variant
from ..stats import Moments, group_sums, moments_from_sums, stats_dtype
from ._base import BatchNormBase, layer_name
from ._history import IterationHistory
from ._producer import CONV_TYPES, Link, Producer, channel_derivatives, link_of, same_tensor

__all__ = ["CrossIterationBatchNorm"]


@register_variant("cbn", aliases=("cross_iteration",))
class CrossIterationBatchNorm(IterationHistory, BatchNormBase):
    r"""BatchNorm over the last k iterations, compensated to the current weights (CIBN).

    With θ_t the weight (and bias) of the layer producing this BN's input at
    iteration t, the statistics of an earlier iteration t − τ are carried to θ_t by a
    first-order Taylor term and averaged over the window (Yao et al., "Cross-Iteration
    Batch Normalization", CVPR 2021):

    .. math::
        \mu_{t-\tau}(\theta_t) &= \mu_{t-\tau} + \rho\,\Big\langle
            \frac{\partial\mu_{t-\tau}}{\partial\theta_{t-\tau}},
            \theta_t - \theta_{t-\tau}\Big\rangle \quad(\text{same for } \nu = \mathrm{E}[x^2]) \\
        \bar\mu &= \frac{1}{k'}\sum_{\tau=0}^{k'-1} \mu_{t-\tau}(\theta_t), \quad
        \bar\nu = \frac{1}{k'}\sum_{\tau=0}^{k'-1}
            \max\big(\nu_{t-\tau}(\theta_t), \mu_{t-\tau}(\theta_t)^2\big), \quad
        \bar\sigma^2 = \bar\nu - \bar\mu^2 \\
        y &= \frac{x - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}}\,\gamma + \beta

    Semantics:
        - Gradients flow through the current iteration's μ_t, ν_t only (past
          statistics, their derivatives and weights are constants). This makes the
          input gradient the BatchNorm formula with the window's moments and a count
          of k'·M: ∂L/∂x = γ/σ̂ · (g − A/(k'M) − x̂·B/(k'M)).
        - Every training forward is one iteration (also a micro-batch of gradient
          accumulation). The first ``burn_in`` of them are plain BatchNorm and record
          nothing; then the window fills, k' = 1, 2, …, ``window``. Running statistics
          always update with the current iteration's own moments (unbiased variance).
          ``window=1`` is exactly BatchNorm (synced: :class:`~distnorm.SyncBatchNorm`).
        - The producer is found in the autograd graph at each training forward (see
          the module docstring), or set with :meth:`attach`. With none (the input
          does not come straight from an ``nn.Conv1d/2d/3d`` or ``nn.Linear``, or the
          producer's weight needs no gradient), ρ = 0 — the naive window average —
          with one warning naming the layer. An input that comes from a different
          producer than the history's raises ``RuntimeError`` rather than pairing
          statistics of different layers.
        - Derivatives cost no second forward pass: ∂S_c/∂W[c] (sum of input patches,
          one per group) and ∂Q_c/∂W[c] = Σ 2x_c·patch (one convolution
          weight-gradient) from the input autograd saved anyway; grouped, depthwise,
          strided, dilated and padded convolutions and linear layers alike. Bias:
          ∂μ_c/∂b_c = 1, ∂ν_c/∂b_c = 2μ_c.
        - Synced over ``process_group``: each rank keeps its partial *sums*
          ∂S/∂W, ∂Q/∂W; the current moments and all k − 1 compensations travel in
          **one** all-reduce of 2C + 1 + 2(k − 1)C float64 numbers forward (and the
          BatchNorm all-reduce of 2C numbers backward). Uneven and empty shards are
          count-weighted; an iteration whose whole group batch was empty is left out
          of the window (decided on the device).
        - Memory: k − 1 copies of each producer's weight (∂Q/∂W) plus small
          per-group and per-channel vectors, and one copy of the weight at the last
          forward; :meth:`history_bytes` reports it and ``history_dtype=torch.bfloat16``
          (or float16) halves the derivatives. ⟨∂_τ, W_t − W_τ⟩ is accumulated
          (telescoped) in float64 from one weight step per iteration, so no
          cancellation of large inner products and no copy of past weights.
        - The history is per-rank state, not in the state_dict (checkpoints stay
          ``nn.BatchNorm`` compatible). :meth:`history_state` /
          :meth:`load_history_state` (or :func:`distnorm.rank_state_dict` /
          :func:`distnorm.load_rank_state_dict` for a whole model) save and resume
          it mid-training; without them a resumed run refills the window.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable γ and β. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        process_group: the group to synchronize over; ``None`` = the default (world)
            group, resolved at every forward. Without an initialized process group,
            or with a group of one rank, the layer is local.
        window: k, iterations in the window, the current one included (an integer
            ≥ 1; the official code's ``buffer_num`` is k − 1). Default: 4.
        burn_in: training iterations of plain BatchNorm before the history starts.
            Default: 0.
        rho: weight of the Taylor compensation; 0 gives the naive window average.
            Default: 1.0.
        history_dtype: storage dtype of the past derivatives (``None``: float32,
            float64 for float64 inputs); ``torch.float16``/``torch.bfloat16`` halve it.

    Shape:
        - Input: ``(N, C, *)``; ``N`` may differ across ranks and be 0.
        - Output: same shape, dtype and memory format as the input.

    Example::

        >>> model = distnorm.convert_model(torchvision.models.resnet18(), mode="cbn",
        ...                                window=4, burn_in=1000)
        >>> bn = distnorm.CrossIterationBatchNorm(64, window=4)
        >>> conv = torch.nn.Conv2d(3, 64, 3)
        >>> bn.attach(conv)            # optional: found from the graph otherwise
        >>> y = bn(conv(torch.randn(2, 3, 32, 32)))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, *, window: int = 4, burn_in: int = 0,
                 rho: float = 1.0, history_dtype: Optional[torch.dtype] = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype)
        name = layer_name(self)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name}: window must be an integer >= 1 (got {window!r})")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"{name}: burn_in must be an integer >= 0 (got {burn_in!r})")
        if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho):
            raise ValueError(f"{name}: rho must be a finite number (got {rho!r})")
        if history_dtype is not None and not (isinstance(history_dtype, torch.dtype)
                                              and history_dtype.is_floating_point):
            raise ValueError(f"{name}: history_dtype must be a floating dtype or None "
                             f"(got {history_dtype!r})")
        self.window = window
        self.burn_in = burn_in
        self.rho = float(rho)
        self.history_dtype = history_dtype
        self._producer: Optional[Producer] = None   # set by attach() or the graph
        self._no_producer = False                    # decided: the input has none
        self._warned: set = set()
        # Per-rank state (see modules/_rank_state.py): the count of forwards, which
        # the burn-in reads and reset_history keeps, and the window's ring.
        self._step: int
        self.add_rank_state("_step", 0, reset=False)  # training forwards so far
        self._init_history(window, num_features, device)

    # -- producer --------------------------------------------------------------------
    def attach(self, producer: nn.Module) -> "CrossIterationBatchNorm":
        """Set the ``nn.Conv1d/2d/3d`` or ``nn.Linear`` whose output is this layer's input.

        The producer is held without being registered as a submodule (it stays out
        of the module tree and the state_dict). Attaching a different producer
        clears the history. Returns ``self``.

        Raises:
            TypeError: ``producer`` is not a convolution or linear layer.
            ValueError: its number of output channels is not ``num_features``.
        """
        if isinstance(producer, CONV_TYPES):
            channels = producer.out_channels
        elif isinstance(producer, nn.Linear):
            channels = producer.out_features
        else:
            raise TypeError(f"{layer_name(self)}.attach: expected an nn.Conv1d/2d/3d or nn.Linear "
                            f"(got {type(producer).__name__})")
        if channels != self.num_features:
            raise ValueError(f"{layer_name(self)}.attach: the producer {type(producer).__name__} "
                             f"has {channels} output channels, this layer normalizes "
                             f"{self.num_features}")
        if self._producer is None or self._producer.module is not producer:
            self.reset_history()
        self._producer = Producer(module=producer)
        self._no_producer = False
        return self

    @property
    def producer(self) -> Optional[nn.Module]:
        """The attached producer module (``None`` when unset or found from the graph)."""
        return self._producer.module if self._producer is not None else None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{layer_name(self)}: {message}", stacklevel=4)

    def _resolve_link(self, input: Tensor) -> Optional[Link]:
        """This forward's link to the producer, checked against the history's producer."""
        link = link_of(input)
        if self._no_producer:
            return None
        if self._producer is None:  # first decision from the graph
            if link is None or link.weight is None:
                self._no_producer = True
                self._warn_once("none", "the input does not come straight from an nn.Conv*d or "
                                "nn.Linear with a trainable weight: using rho = 0 (the "
                                "uncompensated window average); call .attach(producer) to set one")
                return None
            self._producer = Producer(weight=link.weight, bias=link.bias)
            return link
        weight = self._producer.weight
        if link is None and input.grad_fn is not None:
            raise RuntimeError(
                f"{layer_name(self)}: the input is not the output of the producer of the "
                f"statistics history (it comes from {type(input.grad_fn).__name__}); the model's "
                "call order differs between iterations? Use .attach() on the right layer or "
                ".reset_history()")
        if link is None:
            self._warn_once("unread", "the producer's input cannot be read from the autograd "
                            "graph (gradients disabled?): this iteration is recorded without "
                            "compensation")
            return None
        if not (link.weight is weight or same_tensor(link.saved_weight, weight)):
            raise RuntimeError(
                f"{layer_name(self)}: the input comes from a different layer than the producer "
                f"of the statistics history (weight of shape {tuple(weight.shape)}, this input's "
                f"layer has {None if link.saved_weight is None else tuple(link.saved_weight.shape)})"
                "; the model's call order differs between iterations? Use .attach() on the right "
                "layer or .reset_history()")
        if link.kind == "linear" and input.dim() != 2:
            return None
        return link

    # -- forward ---------------------------------------------------------------------
    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        link = self._resolve_link(input)
        in_burn_in = self._step < self.burn_in
        self._step += 1
        if self.window == 1 or in_burn_in:
            return self._batch_norm_forward(input, group)

        producer = None if self._no_producer else self._producer
        weight = producer.weight.detach() if producer is not None else None
        compensate = weight is not None and self.rho != 0.0
        if compensate and self._hist_dsq is not None and self._hist_dsq.shape[1:] != (
                weight.shape[0], math.prod(weight.shape[1:])):
            raise ValueError(f"{layer_name(self)}: the producer's weight changed shape to "
                             f"{tuple(weight.shape)} since the statistics history was recorded; "
                             "call .reset_history() after changing the layer")
        with torch.no_grad():  # statistics carry no graph: the Function writes out the gradient
            output, current, sq_t = self._window_forward(input, group, weight, producer, compensate)
            derivatives = None
            if compensate and link is not None:
                derivatives = channel_derivatives(link, input, weight.shape, stats_dtype(input))
        bias = producer.bias if compensate else None
        self._record(current, sq_t, derivatives, bias, self.history_dtype or stats_dtype(input))
        if compensate:
            self._prev_weight = weight.clone()
        dtype = stats_dtype(input)
        self._update_running_stats(Moments(current.count, current.mean.to(dtype),
                                           current.var.to(dtype)))
        return output

    def _window_forward(self, input: Tensor, group: Optional[Any], weight: Optional[Tensor],
                        producer: Optional[Producer], compensate: bool
                        ) -> Tuple[Tensor, Moments, Tensor]:
        """One all-reduce, the compensated window moments, and the normalized output."""
        channels, slots = self.num_features, self.window - 1
        local = self._compensations(weight, compensate, input.device)
        # The current moments and every past compensation: one all-reduce.
        buffer = group_sums(input, group, context=self._sync_context(), extra=local)
        sums, extra = split_packed(buffer, channels)
        reduced = extra.view(2, slots, channels)
        current = moments_from_sums(sums, torch.float64)
        bias = producer.bias if producer is not None else None
        k_eff, mean_w, var_w, sq_t = self._window_moments(current, reduced, bias, self.rho,
                                                          compensate)
        dtype = stats_dtype(input)
        window_moments = Moments(current.count * k_eff, mean_w.to(dtype), var_w.to(dtype))
        with torch.enable_grad():  # batch_norm_with_moments (k'·M as the count)
            output = batch_norm_with_moments(input, window_moments, self.weight, self.bias,
                                             self.eps, group, context=self._sync_context())
        return output, current, sq_t

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", window={self.window}, burn_in={self.burn_in}, rho={self.rho}"
        if self.history_dtype is not None:
            text += f", history_dtype={self.history_dtype}"
        return text
