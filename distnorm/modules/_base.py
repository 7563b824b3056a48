"""What every batch-statistics layer of distnorm shares: torch's BatchNorm state,
input checks, the process group, and the conversion to and from ``nn.BatchNorm*d``.

Subclassing ``torch.nn.modules.batchnorm._BatchNorm`` keeps the state_dict keys,
their versioned loading (``num_batches_tracked``) and every ``isinstance(m,
_BatchNorm)`` check in users' code (weight-decay exclusion, freezing) working.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..cuda_ops import Running
from ..distributed import resolve_group
from ..distributed.collectives import NONFINITE_POLICIES, SyncContext
from ..errors import layer_name
from ..functional import batch_norm_with_moments, sync_batch_norm, update_running_stats
from ..stats import Moments, group_moments
from ._rank_state import RankStateMixin

__all__ = ["BatchNormBase", "check_dtype", "check_input", "layer_name", "rebuild_batch_norm",
           "share_state"]

_CREATED = itertools.count()


def check_input(layer: nn.Module, x: Tensor, num_features: int) -> None:
    """Raise a ``ValueError`` naming ``layer`` if ``x`` is not ``(N, num_features, *)``."""
    if x.dim() < 2:
        raise ValueError(f"{layer_name(layer)}: expected an (N, C, *) input of at least 2D "
                         f"(got {x.dim()}D input of shape {tuple(x.shape)})")
    if x.shape[1] != num_features:
        raise ValueError(f"{layer_name(layer)}: expected {num_features} channels in dim 1 "
                         f"(got input of shape {tuple(x.shape)})")


def check_dtype(layer: nn.Module, x: Tensor, param: Optional[Tensor]) -> None:
    """Raise a ``TypeError`` naming ``layer`` if ``x``'s dtype cannot meet its
    parameters' — before any collective, so that no peer uses a batch this rank
    then fails on. Accepted as ``nn.BatchNorm`` accepts them: the same dtype, or a
    float16/bfloat16 input with float32 parameters (autocast)."""
    if param is None or x.dtype == param.dtype:
        return
    if x.dtype in (torch.float16, torch.bfloat16) and param.dtype == torch.float32:
        return
    raise TypeError(f"{layer_name(layer)}: input of dtype {x.dtype} cannot be normalized with "
                    f"parameters of dtype {param.dtype}; cast the input (or the model, e.g. "
                    f"model.to({x.dtype})) so that they match, or use torch.autocast")


class BatchNormBase(RankStateMixin, _BatchNorm):
    """Base of the synced batch-statistics variants (not public).

    Holds the arguments of ``torch.nn.BatchNorm2d`` plus ``process_group``; the
    group is resolved in ``forward`` (see :func:`distnorm.distributed.resolve_group`).
    Subclasses implement :meth:`_train_forward` for the case where batch statistics
    are used in training; eval mode and ``track_running_stats=False`` in eval are
    handled here exactly as torch does.
    """

    # The class a converted layer came from; revert_model goes back to it.
    _distnorm_source: Optional[type] = None
    # Per-rank state (the cross-iteration history, CmBN's cycle sums, BRN's clip
    # counters) is declared by each variant with add_rank_state (see _rank_state.py):
    # not buffers, moved with the module in its own dtype, saved per rank.

    def __prepare_scriptable__(self) -> "BatchNormBase":
        # torch.jit.script calls this on every submodule before compiling anything:
        # refuse in words (the forward's collectives and checks are Python).
        raise RuntimeError(f"{layer_name(self)}: distnorm layers cannot be compiled by "
                           "torch.jit.script; call distnorm.revert_model(model) first (plain "
                           "nn.BatchNorm layers with the same weights and statistics), or use "
                           "torch.compile")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        # Creation order: tells unnamed layers apart in the cross-rank checks.
        self._distnorm_index = next(_CREATED)

    @property
    def nonfinite(self) -> str:
        """What a synced forward does when a rank's input holds NaN/Inf: ``"raise"``
        (default; a :class:`~distnorm.errors.NonFiniteError` on every rank, naming
        the layer and ranks) or ``"skip"`` (those ranks are left out of the group
        statistics; their own outputs stay non-finite)."""
        return self.__dict__.get("_nonfinite", "raise")

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        if value not in NONFINITE_POLICIES:
            raise ValueError(f"{layer_name(self)}: nonfinite must be one of "
                             f"{NONFINITE_POLICIES} (got {value!r})")
        self.__dict__["_nonfinite"] = value

    @property
    def timeout(self) -> Optional[float]:
        """How long, in seconds, a synced collective of this layer waits for every
        rank on CPU (gloo) before it raises :class:`~distnorm.errors.SyncError`:
        ``None`` (default) reads ``DISTNORM_TIMEOUT``, else 60 s; ``0`` waits as long
        as the process group's own timeout. On CUDA the process group's (NCCL's)
        timeout bounds the wait (a deadline there would block the host): 10 minutes
        by default, after which, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (torch's
        default), NCCL's watchdog tears the process down without a ``SyncError``."""
        return self.__dict__.get("_timeout")

    @timeout.setter
    def timeout(self, value: Optional[float]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0):
            raise ValueError(f"{layer_name(self)}: timeout must be None or a number of seconds "
                             f">= 0 (0: no deadline) (got {value!r})")
        self.__dict__["_timeout"] = None if value is None else float(value)

    # -- torch hooks ---------------------------------------------------------------
    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self.num_features)
        check_dtype(self, input, self.weight if self.weight is not None else self.running_mean)
        # Every forward starts here, outside the no_grad blocks of the statistics: the
        # grad mode of the caller, which the collectives' guard compares across ranks.
        self.__dict__["_distnorm_autograd"] = torch.is_grad_enabled()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training:
            return self._train_forward(input, resolve_group(self.process_group, self))
        if self.running_mean is not None:
            # Eval: running statistics, no collective call.
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        # Eval without running statistics: local batch statistics (as torch's
        # SyncBatchNorm, which only synchronizes in training mode).
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _train_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- shared pieces -------------------------------------------------------------
    def _tracks(self) -> bool:
        return self.training and self.track_running_stats and self.running_mean is not None

    def _batch_norm_forward(self, input: Tensor, group: Optional[Any]) -> Tensor:
        """Plain BatchNorm in training mode over ``group``: MegDet's cross-GPU BN, and
        exactly ``nn.BatchNorm`` (torch's own kernels) when ``group`` is None."""
        if group is None:
            return _BatchNorm.forward(self, input)
        context = self._sync_context()
        running = (Running(self.running_mean, self.running_var, self.num_batches_tracked,
                           self.momentum) if self._tracks() else None)
        return sync_batch_norm(input, self.weight, self.bias, running, self.eps, group,
                               context=context)

    def _sync_context(self) -> SyncContext:
        """This layer's :class:`~distnorm.distributed.collectives.SyncContext`, refreshed
        with its current name, policy and mode (kept out of the state_dict; it pickles
        without the checks in flight)."""
        context = self.__dict__.get("_sync")
        if context is None:
            context = self.__dict__["_sync"] = SyncContext()
        name = getattr(self, "_distnorm_name", None)
        # What tells layers apart across ranks: the qualified name convert_model
        # recorded, else the creation index (models are built the same way on every
        # rank, so the n-th layer built is the same layer everywhere).
        context.identity = f"{type(self).__name__} {name}" if name else f"#{self._distnorm_index}"
        context.name = layer_name(self)
        context.nonfinite = self.nonfinite
        context.training = self.training
        context.autograd = self.__dict__.get("_distnorm_autograd", True)
        context.timeout = self.timeout
        return context

    def _update_running_stats(self, moments: Moments) -> None:
        if self._tracks():
            update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked,
                                 moments, self.momentum)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.process_group is not None:
            text += ", process_group=<custom>"
        return text

    def __deepcopy__(self, memo: Dict[int, Any]) -> "BatchNormBase":
        # A ProcessGroup cannot be copied: copies (EMA models, DDP's replicas)
        # share the group, as they would share a communicator.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # -- conversion ----------------------------------------------------------------
    @classmethod
    def from_batch_norm(cls, bn: nn.Module, process_group: Optional[Any] = None,
                        **options: Any) -> "BatchNormBase":
        """A layer of this class sharing ``bn``'s parameters and buffers.

        The parameters and running-statistic buffers are the very same tensors
        (no copy), so an optimizer built before conversion keeps working.
        """
        if process_group is None:  # keep the group a converted nn.SyncBatchNorm had
            process_group = getattr(bn, "process_group", None)
        nonfinite = options.pop("nonfinite", getattr(bn, "nonfinite", "raise"))
        timeout = options.pop("timeout", getattr(bn, "timeout", None))
        ref = bn.weight if getattr(bn, "weight", None) is not None else bn.running_mean
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    process_group, **options,
                    device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
        share_state(bn, layer)
        layer.nonfinite = nonfinite
        layer.timeout = timeout
        layer._distnorm_source = getattr(bn, "_distnorm_source", None) or type(bn)
        return layer

    def to_batch_norm(self) -> nn.Module:
        """The plain ``torch.nn`` BatchNorm this layer goes back to (``revert_model``).

        See :func:`rebuild_batch_norm`. A subclass whose state has no BatchNorm
        equivalent overrides this and raises ``ValueError`` saying why.
        """
        return rebuild_batch_norm(self)


def rebuild_batch_norm(layer: nn.Module) -> nn.Module:
    """The ``torch.nn`` BatchNorm ``layer`` was converted from, sharing its tensors.

    The class is the one recorded at conversion (``nn.BatchNorm1d``, ``2d``, ``3d``
    or ``nn.SyncBatchNorm``, which keeps the layer's process group), else
    ``nn.BatchNorm2d``; ``layer``'s hyper-parameters, parameters and buffers are
    carried over as the very same tensors (bit-exact). What BatchNorm has no place
    for — a variant's own parameters, per-rank state — stays behind.
    """
    source: Type[nn.Module] = getattr(layer, "_distnorm_source", None) or nn.BatchNorm2d
    kwargs: Dict[str, Any] = {}
    if issubclass(source, nn.SyncBatchNorm):
        kwargs["process_group"] = getattr(layer, "process_group", None)
    ref = layer.running_mean if layer.running_mean is not None else layer.weight
    bn = source(layer.num_features, layer.eps, layer.momentum, layer.affine,
                layer.track_running_stats, **kwargs,
                device=ref.device if ref is not None else None,
                dtype=ref.dtype if ref is not None else None)
    share_state(layer, bn)
    return bn


def share_state(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` use ``src``'s BatchNorm parameters and buffers (same tensors)."""
    for name in ("weight", "bias"):
        value = getattr(src, name, None)
        if getattr(dst, name, None) is None:  # affine=False on the receiving side
            continue
        if isinstance(value, nn.Parameter):
            setattr(dst, name, value)
        elif value is not None:  # a frozen layer's buffer becomes a parameter again
            trainable = getattr(src, "_distnorm_requires_grad", {}).get(name, True)
            setattr(dst, name, nn.Parameter(value, requires_grad=trainable))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(src, name, None)
        if value is not None and name in dst._buffers:
            dst._buffers[name] = value
    dst.train(src.training)

