"""Cross-Iteration Batch Normalization, CBN (Yao et al., CVPR 2021).

BatchNorm with the statistics of the last k iterations, each compensated to the
current weights of the layer that produces the BN's input by a first-order Taylor
term (docs/algorithms.md §4).

How the producer is found. ``convert_model`` only sees the BatchNorm layers, and
``torch.fx`` cannot trace detection models, so the wiring is read from the autograd
graph of each training forward: the BN input's ``grad_fn`` is the node of the
convolution (``ConvolutionBackward0``) or linear layer (``AddmmBackward0`` /
``MmBackward0``) that made it. That node holds everything the derivatives need —
the producer's weight and bias (its ``AccumulateGrad`` leaves), the input autograd
saved for the weight gradient (no copy, no hook, no second forward pass), and the
stride, padding (after ``padding_mode``/``'same'`` handling), dilation and groups.
A BN fed straight by a conv or linear layer — torchvision ResNets, FPNs,
``Conv2dNormActivation`` in detection heads — is therefore found whatever the module
tree looks like; anything else between them (an addition, an activation, a
reshape) means "no producer".
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import register_variant
from ..functional import batch_norm_with_moments
from ..stats import Moments, group_sums, moments_from_sums, stats_dtype
from ._base import BatchNormBase, layer_name

__all__ = ["CrossIterationBatchNorm"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS_THROUGH = ("ToCopyBackward0", "TBackward0", "PermuteBackward0")


class _Link(NamedTuple):
    """What the autograd node that produced a BN input tells about its layer."""

    kind: str                      # "conv" or "linear"
    weight: Optional[Tensor]       # the producer's weight leaf (None if it needs no grad)
    bias: Optional[Tensor]
    saved_weight: Optional[Tensor]  # the weight as autograd saved it (identity check)
    input: Tensor                  # the producer's input (as the layer consumed it)
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int


class _Producer:
    """A plain (non-Module) holder, so the producer never enters the module tree or
    the state_dict. Either a module set by :meth:`CrossIterationBatchNorm.attach`, or
    the weight/bias leaves found in the autograd graph."""

    __slots__ = ("module", "weight_leaf", "bias_leaf")

    def __init__(self, module: Optional[nn.Module] = None, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None) -> None:
        self.module, self.weight_leaf, self.bias_leaf = module, weight, bias

    @property
    def weight(self) -> Tensor:
        return self.module.weight if self.module is not None else self.weight_leaf  # type: ignore[return-value]

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.module, "bias", None) if self.module is not None else self.bias_leaf


def _leaf(fn: Any) -> Optional[Tensor]:
    """The leaf tensor behind ``fn``, through casts and transposes (autocast, Linear)."""
    for _ in range(4):
        if fn is None:
            return None
        if hasattr(fn, "variable"):
            return fn.variable
        if type(fn).__name__ not in _PASS_THROUGH or len(fn.next_functions) != 1:
            return None
        fn = fn.next_functions[0][0]
    return None


def _saved(node: Any, name: str) -> Optional[Tensor]:
    try:
        return getattr(node, name)
    except (RuntimeError, AttributeError):  # not saved (e.g. it needs no gradient)
        return None


def _link_of(x: Tensor) -> Optional[_Link]:
    """The conv/linear layer whose output is ``x``, read from ``x.grad_fn``."""
    node = x.grad_fn
    if node is None:
        return None
    name = type(node).__name__
    nexts = node.next_functions
    if name == "ConvolutionBackward0":
        if node._saved_transposed or any(node._saved_output_padding):
            return None
        inp = _saved(node, "_saved_input")
        if inp is None:
            return None
        return _Link("conv", _leaf(nexts[1][0]), _leaf(nexts[2][0]) if len(nexts) > 2 else None,
                     _saved(node, "_saved_weight"), inp, tuple(node._saved_stride),
                     tuple(node._saved_padding), tuple(node._saved_dilation), int(node._saved_groups))
    if name in ("AddmmBackward0", "MmBackward0"):
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
            inp, bias, weight_fn = _saved(node, "_saved_mat1"), _leaf(nexts[0][0]), nexts[2][0]
        else:
            inp, bias, weight_fn = _saved(node, "_saved_self"), None, nexts[1][0]
        if inp is None or type(weight_fn).__name__ != "TBackward0" and weight_fn is not None:
            return None
        mat2 = _saved(node, "_saved_mat2")
        return _Link("linear", _leaf(weight_fn), bias, mat2.t() if mat2 is not None else None,
                     inp, (), (), (), 1)
    return None


def _same_tensor(a: Optional[Tensor], b: Tensor) -> bool:
    if a is None:
        return False
    if a is b:
        return True
    return (a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
            and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def _channel_derivatives(link: _Link, x: Tensor, weight_shape: torch.Size,
                         dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Local sums ``∂S/∂W`` (compact, ``(G, L)``) and ``∂Q/∂W`` (``(C, L)``).

    ``S_c = Σ x_c`` and ``Q_c = Σ x_c²`` over this rank's slice. For a convolution,
    ``∂S_c/∂W[c]`` is the sum of the input patches of channel c's group — the same
    for every output channel of a group, hence stored once per group, ``G`` rows —
    and ``∂Q_c/∂W[c] = Σ 2 x_c · patch``: two weight gradients of the convolution,
    with ``grad_output`` = ones (one channel per group) and = ``2x``.
    """
    channels = weight_shape[0]
    length = math.prod(weight_shape[1:])
    inp = link.input.detach().to(dtype)
    xs = x.detach().to(dtype)
    if inp.numel() == 0 or xs.numel() == 0:  # a shape fact: this rank's slice is empty
        groups = link.groups if link.kind == "conv" else 1
        return xs.new_zeros(groups, length), xs.new_zeros(channels, length)
    if link.kind == "linear":
        return inp.sum(0, keepdim=True), (2 * xs).t().mm(inp)
    groups = link.groups
    spatial = xs.shape[2:]

    def weight_grad(grad_out: Tensor, shape: Tuple[int, ...], g: int) -> Tensor:
        placeholder = grad_out.new_empty(1).expand(shape)
        return torch.ops.aten.convolution_backward(
            grad_out, inp, placeholder, None, list(link.stride), list(link.padding),
            list(link.dilation), False, [0] * len(spatial), g, (False, True, False))[1]

    ones = xs.new_ones((xs.shape[0], groups) + tuple(spatial))
    d_sum = weight_grad(ones, (groups,) + tuple(weight_shape[1:]), groups)
    d_sq = weight_grad(2 * xs, tuple(weight_shape), groups)
    return d_sum.reshape(groups, length), d_sq.reshape(channels, length)


@register_variant("cbn")
class CrossIterationBatchNorm(BatchNormBase):
    r"""BatchNorm over the last k iterations, compensated to the current weights (CBN).

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
        self._producer: Optional[_Producer] = None   # set by attach() or the graph
        self._no_producer = False                    # decided: the input has none
        self._warned: set = set()
        # Per-rank state (see modules/_rank_state.py); reset_history resets all of it
        # but the count of forwards, which the burn-in reads.
        self._step: int
        self._recorded: int
        self.add_rank_state("_step", 0, reset=False)  # training forwards so far
        self.add_rank_state("_recorded", 0)           # iterations recorded (ring position)
        slots = window - 1
        f64 = dict(dtype=torch.float64, device=device)
        # The window's past iterations, a ring of k − 1 slots (float64 group values
        # and each slot's local compensation ⟨∂S/∂W, W − W_τ⟩, ⟨∂Q/∂W, W − W_τ⟩ up to
        # the last forward, accumulated in float64; derivatives in history_dtype).
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
        self.add_rank_state("_hist_dsum", None)    # (k−1, G, L)
        self.add_rank_state("_hist_dsq", None)     # (k−1, C, L)
        self.add_rank_state("_prev_weight", None)  # W at the last forward

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
        if isinstance(producer, _CONV_TYPES):
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
        self._producer = _Producer(module=producer)
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

    def _resolve_link(self, input: Tensor) -> Optional[_Link]:
        """This forward's link to the producer, checked against the history's producer."""
        link = _link_of(input)
        if self._no_producer:
            return None
        if self._producer is None:  # first decision from the graph
            if link is None or link.weight is None:
                self._no_producer = True
                self._warn_once("none", "the input does not come straight from an nn.Conv*d or "
                                "nn.Linear with a trainable weight: using rho = 0 (the "
                                "uncompensated window average); call .attach(producer) to set one")
                return None
            self._producer = _Producer(weight=link.weight, bias=link.bias)
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
        if not (link.weight is weight or _same_tensor(link.saved_weight, weight)):
            raise RuntimeError(
                f"{layer_name(self)}: the input comes from a different layer than the producer "
                f"of the statistics history (weight of shape {tuple(weight.shape)}, this input's "
                f"layer has {None if link.saved_weight is None else tuple(link.saved_weight.shape)})"
                "; the model's call order differs between iterations? Use .attach() on the right "
                "layer or .reset_history()")
        if link.kind == "linear" and input.dim() != 2:
            return None
        return link

    # -- history ---------------------------------------------------------------------
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
        self._record(input, link if compensate else None, weight, producer, current, sq_t)
        if compensate:
            self._prev_weight = weight.clone()
        dtype = stats_dtype(input)
        self._update_running_stats(Moments(current.count, current.mean.to(dtype),
                                           current.var.to(dtype)))
        return output

    def _window_forward(self, input: Tensor, group: Optional[Any], weight: Optional[Tensor],
                        producer: Optional[_Producer], compensate: bool
                        ) -> Tuple[Tensor, Moments, Tensor]:
        """One all-reduce, the compensated window moments, and the normalized output."""
        channels, slots = self.num_features, self.window - 1
        if compensate and self._hist_dsq is not None and self._prev_weight is not None:
            # ⟨∂_τ, W_t − W_τ⟩ telescoped: the last value plus ⟨∂_τ, W_t − W_{t−1}⟩. The
            # step is small, so the product is accurate in float32; sums in float64.
            step = self._inner_products(weight - self._prev_weight, self._hist_dsum,
                                        self._hist_dsq)
            self._hist_comp_sum.add_(step[0])
            self._hist_comp_sq.add_(step[1])
            local = torch.stack([self._hist_comp_sum, self._hist_comp_sq])
        else:
            local = torch.zeros(2, slots, channels, dtype=torch.float64, device=input.device)
        # The current moments and every past compensation: one all-reduce.
        buffer = group_sums(input, group, context=self._sync_context(), extra=local)
        sums, reduced = buffer[:2 * channels + 1], buffer[2 * channels + 1:].view(2, slots, channels)

        current = moments_from_sums(sums, torch.float64)
        mean_t = current.mean
        sq_t = current.var + mean_t * mean_t
        # Past iterations compensated to the current weights (float64, group values).
        count = self._hist_count.unsqueeze(1)
        valid = (count > 0).to(torch.float64)
        mean_p, sq_p = self._hist_mean, self._hist_sq
        if compensate:
            delta_mean = reduced[0] / count.clamp(min=1)
            delta_sq = reduced[1] / count.clamp(min=1)
            bias = producer.bias if producer is not None else None
            if bias is not None and self._hist_bias is not None:
                has_d = self._hist_has_d.unsqueeze(1)
                delta_b = has_d * (bias.detach().to(torch.float64).unsqueeze(0) - self._hist_bias)
                delta_mean = delta_mean + delta_b
                delta_sq = delta_sq + 2 * mean_p * delta_b
            mean_p = mean_p + self.rho * delta_mean
            sq_p = sq_p + self.rho * delta_sq
        sq_p = torch.maximum(sq_p, mean_p * mean_p)
        k_eff = 1 + valid.sum(0)
        mean_w = (mean_t + (valid * mean_p).sum(0)) / k_eff
        sq_w = (sq_t + (valid * sq_p).sum(0)) / k_eff
        var_w = (sq_w - mean_w * mean_w).clamp_(min=0)

        dtype = stats_dtype(input)
        window_moments = Moments(current.count * k_eff, mean_w.to(dtype), var_w.to(dtype))
        with torch.enable_grad():  # batch_norm_with_moments (k'·M as the count)
            output = batch_norm_with_moments(input, window_moments, self.weight, self.bias,
                                             self.eps, group, context=self._sync_context())
        return output, current, sq_t

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
    def _record(self, input: Tensor, link: Optional[_Link], weight: Optional[Tensor],
                producer: Optional[_Producer], current: Moments, sq_t: Tensor) -> None:
        """Store this iteration in the ring slot of the oldest one."""
        slot = self._recorded % (self.window - 1)
        self._recorded += 1
        self._hist_count[slot] = current.count
        self._hist_mean[slot] = current.mean
        self._hist_sq[slot] = sq_t
        self._hist_has_d[slot] = float(weight is not None and link is not None)
        if weight is None or link is None:  # uncompensated: zero derivatives
            self._hist_comp_sum[slot] = 0
            self._hist_comp_sq[slot] = 0
            if self._hist_dsum is not None:
                self._hist_dsum[slot] = 0
                self._hist_dsq[slot] = 0
            return
        store = self.history_dtype or stats_dtype(input)
        d_sum, d_sq = _channel_derivatives(link, input, weight.shape, stats_dtype(input))
        if self._hist_dsq is None:
            slots = self.window - 1
            self._hist_dsum = d_sum.new_zeros((slots,) + tuple(d_sum.shape), dtype=store)
            self._hist_dsq = d_sq.new_zeros((slots,) + tuple(d_sq.shape), dtype=store)
        self._hist_dsum[slot] = d_sum
        self._hist_dsq[slot] = d_sq
        self._hist_comp_sum[slot] = 0
        self._hist_comp_sq[slot] = 0
        bias = producer.bias if producer is not None else None
        if bias is not None:
            if self._hist_bias is None:
                self._hist_bias = torch.zeros_like(self._hist_mean)
            self._hist_bias[slot] = bias.detach().to(torch.float64)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", window={self.window}, burn_in={self.burn_in}, rho={self.rho}"
        if self.history_dtype is not None:
            text += f", history_dtype={self.history_dtype}"
        return text
