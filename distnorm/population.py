"""Population statistics: PreciseBN and AdaBN, exact over a process group.

A BatchNorm layer trained with small batches keeps an exponential moving average
(EMA) of batch statistics; at test time it normalizes with that average. Wu &
Johnson ("Rethinking 'Batch' in BatchNorm", 2021) show the EMA lags behind the
weights and is noisy, and that recomputing the statistics of the final model on
10^3–10^4 training samples — *PreciseBN* — is better and stable. Li et al. (AdaBN,
2016) recompute them on unlabelled data of a new domain instead: the same
computation on other data.

:func:`precise_bn` does that over every rank of a process group. For each
BatchNorm-family layer it pools every element each rank fed the layer:

* ``running_mean`` = the mean and ``running_var`` = the unbiased variance
  (denominator M − 1) of that union — count-weighted, not an average of per-batch or
  per-rank statistics (fvcore's ``update_bn_stats`` and torch's
  ``swa_utils.update_bn`` average batch variances, which is not the population
  variance and is biased when batch sizes differ);
* each rank sums its inputs shifted by the mean of the first batch it saw (so the
  sums stay centred however far the mean is from zero) — each batch's sums in the
  input's precision (float32 at least), accumulated over batches in float64;
  the ranks combine them once, at the end, in one all-reduce of
  ``[m, m·μ, M2 + m·μ²]`` for every layer — the layout the synced layers use, whose
  float64 cancellation costs a relative ``(|μ|/σ)²·1e-16`` (1e-8 at |μ|/σ = 1e4,
  below a float32 buffer's resolution).

How the rounds go: in each round every rank takes its next batch, if it has one, and
one small all-reduce tells the group whether any rank still has data (and the shape
of a peer's input). A rank that has run out — or had no data at all — forwards an
*empty* batch (0 samples, shaped like its last batch or a peer's), so that the
synced layers' collectives still match and it contributes nothing: the synced
layers are count-weighted and accept empty slices.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sized
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._packing import pack_sums, packed_size, split_packed, unpack_sums
from .distributed import resolve_group
from .modules._rank_state import RankStateMixin

__all__ = ["precise_bn"]

# Dtypes an input may have, coded as small integers in the per-round all-reduce.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
           torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
# Dims of a peer's input a rank without data can copy (its own shape is unknown).
_MAX_DIMS = 8
# The per-round vector (reduced with MAX): some rank has data, some rank has none,
# some rank's input is not a tensor, dtype code, number of dims, the dims.
_HEADER = 5


def precise_bn(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None, *,
               process_group: Optional[Any] = None, progress: bool = False) -> int:
    r"""Recompute the running statistics of every BatchNorm layer of ``model`` from data.

    PreciseBN (Wu & Johnson, 2021) on training data, AdaBN (Li et al., 2016) on
    unlabelled data of a new domain. Every rank of ``process_group`` calls it with its
    own shard of the data. For every BatchNorm-family layer — distnorm's synced
    variants, ``torch.nn.BatchNorm{1,2,3}d``, ``torch.nn.SyncBatchNorm`` and
    subclasses such as timm's ``BatchNormAct2d`` — the statistics become those of the
    union :math:`U` of every element any rank fed the layer, over all the batches:

    .. math::
        \text{running\_mean} = \frac{1}{M} \sum_{x \in U} x, \qquad
        \text{running\_var} = \frac{1}{M - 1} \sum_{x \in U} (x - \text{running\_mean})^2

    per channel, with :math:`M = |U|`. The old statistics are replaced, not blended,
    and every rank ends with the same buffers.

    Semantics:
        - While the statistics are collected, every BatchNorm layer normalizes as in
          training (a synced layer with its group's batch statistics), so that later
          layers see the activations they see in training. Other modules keep their
          mode: call ``model.train()`` first if, say, dropout should be active.
        - Afterwards every module's ``training`` flag, the parameters,
          ``num_batches_tracked`` (it counts optimizer steps, which this is not) and
          per-rank state (CrossIterationBatchNorm's history, CrossMiniBatchNorm's
          cycle, BatchRenorm's counters) are as they were. No autograd graph is kept.
        - Ranks may hold different numbers of batches, of different sizes, or none:
          a rank that has run out forwards empty batches until every rank is done.
          With an input that is not a tensor, every rank must have data in every
          round (pass ``num_batches``).
        - Communication: one tiny all-reduce per round (does any rank still have
          data?) and one packed all-reduce of every layer's sums at the end. A layer
          is a *leaf*: a BatchNorm module containing others (e.g. a container of
          per-level statistics) is left to its children, each recomputed from the
          input it receives. A layer no rank reached keeps its statistics (with a
          warning).
        - The layers' synchronization groups must lie within ``process_group`` (the
          rounds are counted over it).

    Args:
        model: the model; a ``DistributedDataParallel`` wrapper or a
            ``torch.compile`` result is unwrapped (``.module``, ``._orig_mod``) and
            the eager module is run.
        batches: an iterable of model inputs; from a tuple or list item (e.g. a
            loader's ``(images, labels)``) the first element is given to the model.
        num_batches: use at most this many batches from this rank (``None``: all).
        process_group: the ranks that pool their data; ``None``: the default group,
            or this process alone when ``torch.distributed`` is not initialized.
        progress: show a tqdm progress bar on rank 0 (when tqdm is installed).

    Returns:
        The number of samples (the input's first dim) the group used.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: no rank had any data, a layer received a single value per
            channel, non-finite statistics, an input that is not a tensor while some
            rank has run out, or a compiled submodule (pass the uncompiled module);
            the statistics are then untouched.

    Example::

        >>> distnorm.precise_bn(model, train_loader, num_batches=200)   # before eval
        >>> distnorm.precise_bn(model, target_loader)                   # AdaBN
    """
    model = _unwrap(model)
    _check_arguments(batches, num_batches, process_group, progress)
    group = resolve_group(process_group, "distnorm.precise_bn")
    layers = _leaf_batch_norms(model)
    _check_layer_groups(layers, group, process_group)
    # Not inference_mode even if the caller is in it (a validation loop): the state
    # saved and put back must stay ordinary tensors, which training updates in place.
    with torch.inference_mode(False), torch.no_grad():
        saved = _SavedState(model, layers)
        collector = _Collector(layers)
        try:
            for layer in layers:
                layer.training = True
            samples = _run_rounds(model, batches, num_batches, group, progress, collector)
            collector.remove()
            saved.restore()
            return _write_statistics(layers, collector, samples, group)
        finally:
            collector.remove()
            saved.restore()


# -- arguments and the model's layers -------------------------------------------------
def _unwrap(model: Any) -> nn.Module:
    """The eager module behind DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise TypeError(f"distnorm.precise_bn: model must be a torch.nn.Module "
                        f"(got {type(model).__name__})")
    for name, module in model.named_modules():
        if _is_compiled(module) or getattr(module, "_compiled_call_impl", None) is not None:
            what = f"submodule {name!r}" if name else "the model (model.compile())"
            raise ValueError(
                f"distnorm.precise_bn: {what} is compiled with torch.compile; its "
                "BatchNorm inputs cannot be observed from compiled code. Pass the uncompiled "
                "module (the one given to torch.compile; a compiled result's ._orig_mod)")
    return model


def _is_compiled(module: Any) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _check_arguments(batches: Any, num_batches: Any, process_group: Any, progress: Any) -> None:
    if not isinstance(batches, Iterable) or isinstance(batches, (Tensor, str, bytes)):
        raise TypeError("distnorm.precise_bn: batches must be an iterable of model inputs "
                        f"(a DataLoader, a list of tensors; got {type(batches).__name__})")
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int)):
        raise TypeError("distnorm.precise_bn: num_batches must be an int or None "
                        f"(got {type(num_batches).__name__})")
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"distnorm.precise_bn: num_batches must be >= 0 (got {num_batches})")
    if process_group is not None and not (dist.is_available()
                                          and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError("distnorm.precise_bn: process_group must be a torch.distributed "
                        f"ProcessGroup or None (got {type(process_group).__name__})")
    if not isinstance(progress, bool):
        raise TypeError(f"distnorm.precise_bn: progress must be a bool (got {progress!r})")


def _leaf_batch_norms(model: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm layers with running statistics and no BatchNorm inside them
    (each is told its qualified name in ``model``, for messages)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or module.running_mean is None:
            continue
        inner = any(isinstance(m, _BatchNorm) for m in itertools.islice(module.modules(), 1, None))
        if not inner:
            module.__dict__["_precise_bn_name"] = name
            found.append(module)
    return found


def _qualified(layer: nn.Module) -> str:
    return layer.__dict__.get("_precise_bn_name") or getattr(layer, "_distnorm_name", "") or "?"



def _check_layer_groups(layers: List[_BatchNorm], group: Optional[Any], given: Any) -> None:
    """Each layer that synchronizes must do so within ``group``: the rounds are
    counted over it, so a rank outside it could stop while the layer waits for it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    ours = set(dist.get_process_group_ranks(group)) if group is not None else {dist.get_rank()}
    for layer in layers:
        if not isinstance(layer, nn.SyncBatchNorm) and not hasattr(layer, "_sync_context"):
            continue  # a local layer
        layer_group = resolve_group(getattr(layer, "process_group", None), layer)
        if layer_group is not None and not set(dist.get_process_group_ranks(layer_group)) <= ours:
            raise ValueError(
                f"distnorm.precise_bn: {type(layer).__name__} synchronizes over ranks "
                f"{sorted(dist.get_process_group_ranks(layer_group))}, beyond precise_bn's group "
                f"{sorted(ours)}; pass a process_group that contains it "
                f"(got {'the default group' if given is None else 'a subgroup'})")


class _SavedState:
    """What the collecting forwards may change and must be put back: training flags,
    running statistics and ``num_batches_tracked``, per-rank state."""

    def __init__(self, model: nn.Module, layers: List[_BatchNorm]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers = [(layer, {name: getattr(layer, name).clone()
                                 for name in ("running_mean", "running_var", "num_batches_tracked")
                                 if getattr(layer, name, None) is not None})
                        for layer in layers]
        self.rank_state = [(m, m.rank_state_dict()) for m in model.modules()
                           if isinstance(m, RankStateMixin) and m.rank_state_names()]
        self.done = False

    def restore(self) -> None:
        if self.done:
            return
        self.done = True
        with torch.no_grad():
            for layer, buffers in self.buffers:
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)
        for module, state in self.rank_state:
            module.load_rank_state_dict(state)
        for module, training in self.flags:
            module.training = training


# -- collecting ----------------------------------------------------------------------
class _Moments:
    """One layer's float64 sums on this rank, shifted by its first batch's mean."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: Optional[Tensor] = None  # (C,) float64: the subtracted value, exactly
        self.shift_work: Optional[Tensor] = None  # the same, in the input's dtype
        self.sum: Optional[Tensor] = None
        self.sum_sq: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        if count == 0:  # an empty batch contributes nothing (a shape fact)
            return
        dims = [d for d in range(x.dim()) if d != 1]
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        view = (1, channels) + (1,) * (x.dim() - 2)
        if self.shift is None:
            # The first batch's mean in the input's precision (a float64 upcast of the
            # whole batch would cost more than the sums): it only needs to be near the
            # mean, since the value subtracted is recorded exactly. x − shift is then
            # exact for elements near it (Sterbenz), whatever |μ|/σ is.
            shift = work.sum(dims).div_(count)
            self.shift, self.shift_work = shift.double(), shift
            self.sum = torch.zeros_like(self.shift)
            self.sum_sq = torch.zeros_like(self.shift)
        centred = work - self.shift_work.view(view)
        self.sum += centred.sum(dims).double()
        self.sum_sq += centred.square_().sum(dims).double()
        self.count += count

    def packed(self, channels: int, device: torch.device) -> Tensor:
        """``[m, m·μ, M2 + m·μ²]`` (float64) of everything this rank saw."""
        if self.shift is None:
            return torch.zeros(packed_size(channels), dtype=torch.float64, device=device)
        offset = self.sum / self.count
        mean = self.shift + offset
        m2 = (self.sum_sq - self.sum * offset).clamp_(min=0)
        count = torch.full((1,), float(self.count), dtype=torch.float64, device=mean.device)
        return pack_sums(count, mean * self.count, m2 + mean * mean * self.count)


class _Collector:
    """Forward pre-hooks that add each layer's input to its :class:`_Moments`."""

    def __init__(self, layers: List[_BatchNorm]) -> None:
        self.moments = {id(layer): _Moments() for layer in layers}
        self.handles = [layer.register_forward_pre_hook(self._hook) for layer in layers]

    def _hook(self, layer: nn.Module, args: Tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 2:
            self.moments[id(layer)].add(args[0].detach())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _model_input(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) and item else item


def _samples(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else 1
    return len(x) if isinstance(x, Sized) else 1


def _run_rounds(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int],
                group: Optional[Any], progress: bool, collector: _Collector) -> int:
    """Forward every rank's batches, in rounds, until no rank has any; returns this
    rank's number of samples."""
    source: Iterator[Any] = iter(batches)
    if num_batches is not None:
        source = itertools.islice(source, num_batches)
    device = _model_device(model)
    bar = _progress_bar(batches, num_batches, group, progress)
    empty: Optional[Tensor] = None  # this rank's own empty batch, once it has seen one
    samples = 0
    any_data = False
    try:
        while True:
            item = next(source, _DONE)
            x = _model_input(item) if item is not _DONE else None
            header = _exchange_header(x, group, device)
            if not header[0]:
                break
            any_data = True
            if x is None:  # run out (or never had any): keep the collectives matched
                if empty is None:
                    empty = _empty_like_peer(header, device)
                x = empty
            elif isinstance(x, Tensor):
                if empty is None or empty.shape[1:] != x.shape[1:]:
                    empty = x.new_empty((0, *x.shape[1:]))
                samples += _samples(x)
            else:
                samples += _samples(x)
            model(x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not any_data:
        raise ValueError("distnorm.precise_bn: no batches on any rank of the group; the "
                         "statistics are untouched")
    return samples


_DONE = object()


def _exchange_header(x: Any, group: Optional[Any], device: torch.device) -> List[int]:
    """This round's facts over the group (all-reduced with MAX): [some rank has data,
    some rank has none, some input is not a tensor, dtype code, dims, shape...]."""
    header = [0] * (_HEADER + _MAX_DIMS)
    header[0] = int(x is not None)
    header[1] = int(x is None)
    if x is not None:
        if isinstance(x, Tensor) and x.dim() <= _MAX_DIMS and x.dtype in _DTYPES:
            header[3] = _DTYPES.index(x.dtype)
            header[4] = x.dim()
            header[_HEADER:_HEADER + x.dim()] = list(x.shape)
        else:
            header[2] = 1
    if group is not None:
        # On the host where the backend carries CPU tensors (gloo): no device sync.
        backend = str(dist.get_backend(group))
        on = torch.device("cpu") if "gloo" in backend or "mpi" in backend else device
        reduced = torch.tensor(header, dtype=torch.int64, device=on)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        header = reduced.tolist()
    if header[0] and header[1] and header[2]:
        raise ValueError(
            "distnorm.precise_bn: a rank has run out of batches while another's input is not "
            "a tensor, so it cannot forward an empty batch to keep the synced layers' "
            "collectives matched; give every rank the same number of batches (num_batches)")
    return header


def _empty_like_peer(header: List[int], device: torch.device) -> Tensor:
    dims = header[4]
    shape = [0] + header[_HEADER + 1:_HEADER + dims]
    return torch.zeros(shape, dtype=_DTYPES[header[3]], device=device)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _progress_bar(batches: Any, num_batches: Optional[int], group: Optional[Any],
                  progress: bool) -> Any:
    if not progress or (group is not None and dist.get_rank(group) != 0):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("distnorm.precise_bn(progress=True) needs tqdm (pip install tqdm)",
                      stacklevel=3)
        return None
    total = len(batches) if isinstance(batches, Sized) else None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    return tqdm(total=total, desc="precise_bn", unit="batch")


# -- the reduction and the new statistics ----------------------------------------------
def _write_statistics(layers: List[_BatchNorm], collector: _Collector, samples: int,
                      group: Optional[Any]) -> int:
    """One all-reduce of every layer's sums and of the sample count; then the buffers."""
    device = layers[0].running_mean.device if layers else torch.device("cpu")
    parts = [collector.moments[id(layer)].packed(layer.num_features, device).to(device)
             for layer in layers]
    parts.append(torch.tensor([float(samples)], dtype=torch.float64, device=device))
    packed = torch.cat(parts)
    if group is not None:
        dist.all_reduce(packed, group=group)
    packed = packed.cpu()  # read once, at the end
    totals: List[Tuple[_BatchNorm, Tensor, Tensor]] = []
    unreached, single, nonfinite = [], [], []
    rest = packed
    for layer in layers:
        head, rest = split_packed(rest, layer.num_features)
        count, sum_x, sum_sq = unpack_sums(head, layer.num_features)
        count = float(count)  # host tensors: no device sync
        if count == 0:
            unreached.append(layer)
            continue
        if count < 2:
            single.append(layer)
            continue
        mean = sum_x / count
        var = (sum_sq / count - mean * mean).clamp_(min=0) * (count / (count - 1))
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            nonfinite.append(layer)
        totals.append((layer, mean, var))
    if single:
        raise ValueError(f"distnorm.precise_bn: {_names(single)} received a single value per "
                         "channel over the whole group (no variance); the statistics are "
                         "untouched — use more data")
    if nonfinite:
        raise ValueError(f"distnorm.precise_bn: the statistics of {_names(nonfinite)} are not "
                         "finite (NaN or Inf in their input); the statistics are untouched")
    if unreached:
        warnings.warn(f"distnorm.precise_bn: no rank's data reached {_names(unreached)}; "
                      "their statistics are unchanged", stacklevel=3)
    with torch.no_grad():
        for layer, mean, var in totals:
            layer.running_mean.copy_(mean.to(layer.running_mean.device))
            layer.running_var.copy_(var.to(layer.running_var.device))
    return int(round(float(packed[-1])))


def _names(layers: List[nn.Module]) -> str:
    names = [f"{type(layer).__name__} {_qualified(layer)!r}" for layer in layers]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
