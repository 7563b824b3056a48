"""Per-level statistics for a head shared across feature levels (CycleBatchNorm).

A RetinaNet/FCOS head applies the same conv + norm to every FPN level in turn. One
BatchNorm there mixes the statistics of levels whose activations differ in scale, so
its running statistics fit no level (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021, §5.2). :class:`CycleBatchNorm` keeps one shared affine and one statistics set
per level, used in turn by successive calls. Each set is an ordinary distnorm layer
(built with ``affine=False``), so syncing, ``convert_model``/``revert_model`` and
``precise_bn`` reach every level's statistics with no code of their own here.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import layer_name
from ..registry import resolve_mode, variant, variants
from ._base import BatchNormBase, check_dtype, check_input

__all__ = ["CycleBatchNorm", "LocalBatchNorm"]

# Modes whose layer keeps batch statistics under an affine CycleBatchNorm can share.
_SYNCED_MODES = ("sync", "brn", "cbn", "cmbn")
# Modes for statistics sets that make no collective call.
_LOCAL_MODES = ("bn", "local")
# Options the levels take as attributes after construction (BatchNormBase only).
_LEVEL_ATTRIBUTES = ("nonfinite", "timeout")


class LocalBatchNorm(_BatchNorm):
    """``torch.nn.BatchNorm`` for an ``(N, C, *)`` input of any dimension, unsynced.

    The statistics sets of ``CycleBatchNorm(mode="bn")``, and what ``revert_model``
    turns a CycleBatchNorm's synced sets into: torch's own BatchNorm computation
    (``nn.BatchNorm1d/2d/3d`` differ only in the input dimension they accept).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self.num_features)


def _level_class(mode: str) -> type:
    """The class of the statistics sets for ``mode``; a ``ValueError`` for other modes."""
    if mode in _LOCAL_MODES:
        return LocalBatchNorm
    accepted = ", ".join(repr(m) for m in (*_SYNCED_MODES, *_LOCAL_MODES))
    try:
        canonical = resolve_mode(mode)
    except ValueError:
        canonical = None
    if canonical not in _SYNCED_MODES:
        raise ValueError(f"CycleBatchNorm: mode must be one of {accepted} or an alias of one "
                         f"(got {mode!r}): each level keeps BatchNorm statistics under the shared "
                         "affine, which GroupNorm and FrozenBatchNorm have no use for and "
                         "BatchInstanceNorm and SwitchableNorm would extend with parameters "
                         "of their own")
    return variant(canonical)


def _check_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CycleBatchNorm: length must be an integer >= 1, the number of "
                         f"feature levels the layer is called on in turn (got {value!r})")
    return value


class CycleBatchNorm(nn.Module):
    r"""One affine and ``length`` statistics sets, used in turn by successive calls.

    For a head shared across ``length`` feature levels (RetinaNet, FCOS): call k —
    counted from construction or the last :meth:`reset_cycle` — normalizes with
    statistics set ``k mod length``, in training and in eval, then applies the one
    shared affine:

    .. math::
        y = \frac{x - \mathrm{E}_\ell[x]}{\sqrt{\mathrm{Var}_\ell[x] + \epsilon}}
            \gamma + \beta, \qquad \ell = k \bmod \mathrm{length}

    Semantics:
        - Statistics set ℓ is a ``mode`` layer built with ``affine=False``
          (``sync`` → :class:`~distnorm.SyncBatchNorm`, ``brn``, ``cbn``, ``cmbn``;
          ``bn``/``local`` → :class:`LocalBatchNorm`, no collective): in training it
          normalizes with that mode's batch statistics over ``process_group`` —
          count-weighted over the ranks, a rank may hold 0 samples — and updates only
          its own running statistics; in eval it uses them. The sets are separate
          layers, each with its own collectives (and their cross-rank checks).
        - With ``mode="sync"`` (or ``"bn"`` in one process), training output, input
          gradient and each level's running statistics equal those of ``length``
          separate ``nn.BatchNorm`` layers sharing one weight and bias, level ℓ
          applied to the concatenated batch of level ℓ; the other modes equal
          ``length`` separate layers of that mode. The weight and bias gradients are
          summed over the levels (and, under DDP, the ranks).
        - **Alignment.** The layer counts its calls; nothing in the data says which
          level an input belongs to. Every forward pass of the model must call it a
          multiple of ``length`` times, levels in the same order. Where a
          misalignment shows, it raises ``RuntimeError`` naming the call index:
          switching ``train()``/``eval()`` or saving a ``state_dict`` while a cycle
          is incomplete (:attr:`position` ≠ 0). After a forward that raised midway,
          restart with :meth:`reset_cycle` or ``distnorm.reset_accumulation(model)``.
        - state_dict: ``weight``, ``bias`` and, per level, ``0.running_mean``,
          ``0.running_var``, ``0.num_batches_tracked``, ``1.running_mean``, … —
          the keys of ``length`` ``nn.BatchNorm(affine=False)`` layers plus a shared
          affine (detectron2's ``CycleBatchNormList``), so such checkpoints load.
        - ``distnorm.precise_bn`` recomputes every level's statistics (each set is a
          BatchNorm layer fed its level's inputs). ``revert_model`` keeps the layer
          and turns its sets into :class:`LocalBatchNorm` (torch's BatchNorm, no
          collective, the same tensors); ``convert_model(model, mode)`` turns them
          into ``mode``'s layers. :attr:`mode` reads the sets' current kind.

    Args:
        num_features: C of an ``(N, C, *)`` input.
        length: the number of levels, an integer ≥ 1.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor, or ``None`` for a cumulative average.
            Default: 0.1.
        mode: the statistics sets' layer: ``"sync"`` (default), ``"brn"``,
            ``"cbn"``, ``"cmbn"``, or ``"bn"``/``"local"`` (unsynced).
        process_group: the group the sets synchronize over (``None``: the world,
            resolved at every forward); not for ``"bn"``.
        **options: ``affine`` (learnable shared γ, β; default ``True``),
            ``track_running_stats``, ``device``, ``dtype``, the mode's own options
            (``r_max=``, ``window=``, ``accumulation_steps=``, ...) and ``nonfinite``
            / ``timeout`` of the synced modes, applied to every set.

    Shape:
        - Input: ``(N, C, *)``; ``N`` may differ across calls and ranks, and be 0.
        - Output: same shape and dtype as the input.

    Example::

        >>> norm = distnorm.CycleBatchNorm(256, length=5)      # P3-P7
        >>> head = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), norm, nn.ReLU())
        >>> outputs = [head(feature) for feature in fpn_features]   # 5 calls: one cycle
    """

    _abbr_ = "bn"  # mmcv's build_norm_layer names it as the BN it stands for (bn1, ...)

    weight: Optional[Tensor]
    bias: Optional[Tensor]

    def __init__(self, num_features: int, length: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, *, mode: str = "sync",
                 process_group: Optional[Any] = None, **options: Any) -> None:
        super().__init__()
        self.length = _check_length(length)
        self.num_features = num_features
        self._position = 0  # the set the next call uses
        cls = _level_class(mode)
        affine = options.pop("affine", True)
        attributes = {k: options.pop(k) for k in _LEVEL_ATTRIBUTES if k in options}
        level_args: Dict[str, Any] = dict(options)
        if issubclass(cls, BatchNormBase):
            level_args["process_group"] = process_group
        elif process_group is not None or attributes:
            given = sorted([*attributes, *(["process_group"] if process_group is not None else [])])
            raise TypeError(f"CycleBatchNorm(mode={mode!r}): the statistics sets are unsynced; "
                            f"{given} apply to the synced modes only")
        for index in range(self.length):
            try:
                level = cls(num_features, eps=eps, momentum=momentum, affine=False, **level_args)
            except TypeError as error:
                raise TypeError(f"CycleBatchNorm(mode={mode!r}): bad options {sorted(options)} "
                                f"for {cls.__name__}: {error}") from error
            for name, value in attributes.items():
                setattr(level, name, value)
            # revert_model goes back to torch's BatchNorm for any input dimension.
            level._distnorm_source = LocalBatchNorm
            self.add_module(str(index), level)
        if affine:
            factory = {"device": options.get("device"), "dtype": options.get("dtype")}
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_batch_norm(cls, bn: nn.Module, length: int, *, mode: str = "sync",
                        process_group: Optional[Any] = None, **options: Any) -> "CycleBatchNorm":
        """A CycleBatchNorm in place of one BatchNorm shared by ``length`` levels.

        The affine is ``bn``'s very weight and bias (the same Parameters, so an
        optimizer built before keeps working; a frozen layer's buffers become
        trainable Parameters on the same storage); every level starts from a copy of
        ``bn``'s running statistics — run ``distnorm.precise_bn`` to give each level
        its own. ``bn`` is any BatchNorm layer (torch's, distnorm's); a synced
        ``mode`` keeps its ``process_group`` unless another is given.
        """
        if process_group is None and mode not in _LOCAL_MODES:
            process_group = getattr(bn, "process_group", None)
        ref = bn.weight if getattr(bn, "weight", None) is not None else bn.running_mean
        options.setdefault("affine", bn.affine)
        options.setdefault("track_running_stats", bn.track_running_stats)
        if ref is not None:
            options.setdefault("device", ref.device)
            options.setdefault("dtype", ref.dtype)
        layer = cls(bn.num_features, length, bn.eps, bn.momentum, mode=mode,
                    process_group=process_group, **options)
        if layer.weight is not None:
            for name in ("weight", "bias"):
                value = getattr(bn, name)
                setattr(layer, name, value if isinstance(value, nn.Parameter)
                        else nn.Parameter(value.detach()))
        if bn.running_mean is not None:
            for level in layer.levels:
                if level.running_mean is not None:
                    level.running_mean.copy_(bn.running_mean)
                    level.running_var.copy_(bn.running_var)
                    level.num_batches_tracked.copy_(bn.num_batches_tracked)
        layer.train(bn.training)
        return layer

    def __prepare_scriptable__(self) -> "CycleBatchNorm":
        # torch.jit.script calls this first: refuse in words (the cycle is Python state).
        raise RuntimeError(f"{layer_name(self)}: torch.jit.script cannot compile the level "
                           "cycle; use torch.jit.trace or torch.onnx.export on the model in eval "
                           "mode (each call is recorded with its level's statistics), or "
                           "torch.compile")

    # -- the cycle -----------------------------------------------------------------
    @property
    def position(self) -> int:
        """The statistics set the next call uses: calls since the last completed cycle."""
        return self._position

    def reset_cycle(self) -> None:
        """Restart the cycle: the next call uses statistics set 0."""
        self._position = 0

    def _check_aligned(self, event: str) -> None:
        if self._position:
            raise RuntimeError(
                f"{layer_name(self)}: {event} in the middle of a cycle: {self._position} "
                f"call(s) since the last completed cycle of length={self.length}, so the "
                f"next call (index {self._position}) would use statistics set "
                f"{self._position} instead of 0. Every forward pass must call this layer a "
                f"multiple of {self.length} times, once per feature level in order. If a "
                "forward raised midway, call layer.reset_cycle() or "
                "distnorm.reset_accumulation(model) to restart at level 0.")

    def train(self, mode: bool = True) -> "CycleBatchNorm":
        self._check_aligned(f"switching to {'training' if mode else 'eval'} mode")
        return super().train(mode)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._check_aligned("saving a state_dict")
        return super().state_dict(*args, **kwargs)

    # -- BatchNorm's interface -----------------------------------------------------
    @property
    def levels(self) -> Tuple[nn.Module, ...]:
        """The statistics sets, level 0 first."""
        return tuple(self._modules[str(index)] for index in range(self.length))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> nn.Module:
        """Statistics set ``index`` (``layer[0]``, as in detectron2's ModuleList)."""
        return self.levels[index]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.levels)

    @property
    def mode(self) -> str:
        """The statistics sets' kind: a mode of :func:`distnorm.variants`, or ``"bn"``."""
        level = self._modules["0"]
        if type(level) is LocalBatchNorm:
            return "bn"
        return next((name for name, cls in variants().items() if type(level) is cls),
                    type(level).__name__)

    @property
    def eps(self) -> float:
        return self._modules["0"].eps

    @property
    def momentum(self) -> Optional[float]:
        return self._modules["0"].momentum

    @property
    def affine(self) -> bool:
        return self.weight is not None

    def reset_running_stats(self) -> None:
        """Reset every level's running statistics."""
        for level in self.levels:
            level.reset_running_stats()

    def reset_parameters(self) -> None:
        """Reset every level's running statistics, and γ to 1, β to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        check_input(self, input, self.num_features)
        check_dtype(self, input, self.weight)
        level = self._position
        normalized = self._modules[str(level)](input)
        self._position = (level + 1) % self.length
        if self.weight is None:
            return normalized
        # The affine shared by every level, after the level's normalization; in the
        # output's dtype, as BatchNorm returns a float16 input's dtype under autocast.
        shape = (1, -1) + (1,) * (input.dim() - 2)
        return torch.addcmul(self.bias.to(normalized.dtype).view(shape), normalized,
                             self.weight.to(normalized.dtype).view(shape))

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, length={self.length}, mode={self.mode!r}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}")
        if getattr(self._modules["0"], "process_group", None) is not None:
            text += ", process_group=<custom>"
        return text
