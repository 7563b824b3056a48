"""Per-rank state: what a layer keeps for this rank alone, declared once per attribute.

Some variants carry state between forwards that is neither a parameter nor part of
BatchNorm's checkpoint: BatchRenorm's clip counters, CrossMiniBatchNorm's partial
cycle, CrossIterationBatchNorm's window history. Each rank holds its own copy (the
ranks of a group see different micro-batches and their own producer inputs), so
this state

* is not a buffer: ``DistributedDataParallel(broadcast_buffers=True)`` overwrites
  every buffer with rank 0's, which would hand rank 0's partial sums to the other
  ranks, and the state_dict stays ``nn.BatchNorm``'s (checkpoints move both ways);
* follows the module's device (``.to()``, ``.cuda()``) but keeps its own dtype, so
  float64 sums survive ``model.half()``;
* pickles and deep-copies with the module (plain attributes);
* is saved and restored per rank with :meth:`RankStateMixin.rank_state_dict` /
  :meth:`RankStateMixin.load_rank_state_dict` (one layer) or
  :func:`rank_state_dict` / :func:`load_rank_state_dict` (a whole model), next to
  the ordinary checkpoint.

A layer declares each piece once with :meth:`RankStateMixin.add_rank_state`, which
says what it starts as and what a reset restores.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import layer_name

__all__ = ["RankStateMixin", "load_rank_state_dict", "rank_state_dict"]

#: What a piece of per-rank state starts as: a tensor of zeros, a Python number,
#: or None (a tensor the layer allocates when it first needs one).
Default = Union[Tensor, int, float, None]


class _Declared(NamedTuple):
    """How one attribute of per-rank state starts and resets (not public)."""

    kind: str     # "zeros" (a tensor zeroed in place), "number" or "lazy" (None)
    value: Any    # the number a "number" resets to
    reset: bool   # reset by reset_rank_state() without names


def _declare(default: Default, reset: bool) -> _Declared:
    if isinstance(default, Tensor):
        return _Declared("zeros", None, reset)
    if default is None:
        return _Declared("lazy", None, reset)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return _Declared("number", default, reset)
    raise TypeError("per-rank state starts as a tensor of zeros, a number or None "
                    f"(got {type(default).__name__})")


class RankStateMixin(nn.Module):
    """Declares, moves, resets, saves and loads a layer's per-rank state (see the
    module docstring). Mixed into :class:`~distnorm.modules._base.BatchNormBase`."""

    #: attribute -> how it starts and resets; filled per layer by add_rank_state.
    _rank_states: Dict[str, _Declared] = {}

    def add_rank_state(self, name: str, default: Default, *, reset: bool = True) -> None:
        """Declare the attribute ``name`` as per-rank state and set it to ``default``.

        Args:
            name: the attribute; the layer reads and writes it as usual afterwards.
            default: what it starts as — a tensor of zeros (the layer's device and the
                state's dtype: :meth:`reset_rank_state` zeroes it in place, with no
                allocation, so a reset inside a captured CUDA graph is replayed), a
                Python number (a host counter; reset sets it back), or ``None`` (a
                tensor the layer allocates when it first needs one; reset drops it).
            reset: whether :meth:`reset_rank_state` without names resets it; ``False``
                for a counter that outlives resets (CrossIterationBatchNorm's count of
                forwards, which the burn-in reads).
        """
        if "_rank_states" not in self.__dict__:  # the class's empty table is shared
            self._rank_states = {}
        self._rank_states[name] = _declare(default, reset)
        setattr(self, name, default)

    def rank_state_names(self) -> Tuple[str, ...]:
        """The attributes declared with :meth:`add_rank_state`, in declaration order."""
        return tuple(self._rank_states)

    def reset_rank_state(self, names: Optional[Iterable[str]] = None) -> None:
        """Put per-rank state back to its declared start.

        Args:
            names: the attributes to reset; ``None``: all declared with ``reset=True``.
        """
        declared = self._rank_states
        chosen = [n for n, d in declared.items() if d.reset] if names is None else names
        for name in chosen:
            kind = declared[name].kind
            if kind == "zeros":
                getattr(self, name).zero_()
            elif kind == "number":
                setattr(self, name, declared[name].value)
            else:
                setattr(self, name, None)

    def rank_state_dict(self) -> Dict[str, Any]:
        """This rank's state, to save next to a checkpoint: ``{attribute: value}``,
        tensors detached and cloned (on their device), numbers as they are, ``None``
        for a tensor not allocated yet."""
        state: Dict[str, Any] = {}
        for name in self.rank_state_names():
            value = getattr(self, name)
            state[name] = value.detach().clone() if isinstance(value, Tensor) else value
        return state

    def load_rank_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rank_state_dict` saved (on this rank).

        Tensors move to the device of the layer's own state and keep the dtype they
        were saved with; a tensor missing from ``state`` is left unallocated when it
        is allocated on demand (``None`` default).

        Raises:
            KeyError: ``state`` lacks a tensor or number this layer always holds.
            ValueError: a tensor's shape differs from this layer's (another
                configuration, e.g. a different ``num_features``).
        """
        declared = self._rank_states
        device = self._rank_state_device()
        for name, how in declared.items():
            if name not in state and how.kind != "lazy":
                raise KeyError(f"{layer_name(self)}: the saved per-rank state has no {name!r} "
                               f"(it holds {sorted(state)})")
        for name, how in declared.items():
            value = state.get(name)
            current = getattr(self, name)
            if how.kind == "zeros" and tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"{layer_name(self)}: saved per-rank state {name!r} has shape "
                                 f"{tuple(value.shape)}, this layer's has {tuple(current.shape)}")
        for name, how in declared.items():
            value = state.get(name)
            if isinstance(value, Tensor):
                value = value.detach().clone().to(device)
            elif how.kind == "number":
                value = type(how.value)(value)
            setattr(self, name, value)

    def _rank_state_device(self) -> Optional[torch.device]:
        """Where the layer's state lives: its first allocated per-rank tensor, else its
        first parameter or buffer (None when it has neither)."""
        for name in self.rank_state_names():
            value = getattr(self, name)
            if isinstance(value, Tensor):
                return value.device
        for tensor in self.parameters(recurse=False):
            return tensor.device
        for tensor in self.buffers(recurse=False):
            return tensor.device
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "RankStateMixin":
        result = super()._apply(fn, recurse)
        for name in self.rank_state_names():
            value = self.__dict__.get(name)
            if isinstance(value, Tensor):
                # Follow the device fn moves to, keep our dtype (model.half() must
                # not round float64 sums); a meta tensor (to_empty) is replaced.
                moved = fn(value)
                self.__dict__[name] = (moved if value.is_meta else value).to(
                    device=moved.device, dtype=value.dtype)
        return result


def rank_state_dict(module: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Every layer's per-rank state in ``module``: ``{qualified name: state}`` for the
    layers that declare some. Each rank saves its own, next to the checkpoint.

    Example::

        >>> torch.save(distnorm.rank_state_dict(model), f"rank_state.{rank}.pt")
        >>> distnorm.load_rank_state_dict(model, torch.load(f"rank_state.{rank}.pt"))
    """
    return {name: layer.rank_state_dict() for name, layer in module.named_modules()
            if isinstance(layer, RankStateMixin) and layer.rank_state_names()}


def load_rank_state_dict(module: nn.Module, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore what :func:`rank_state_dict` saved into the same model.

    Raises:
        KeyError: ``state`` names a layer ``module`` does not have, or misses one
            that declares per-rank state.
    """
    layers = {name: layer for name, layer in module.named_modules()
              if isinstance(layer, RankStateMixin) and layer.rank_state_names()}
    unknown = sorted(set(state) - set(layers))
    missing = sorted(set(layers) - set(state))
    if unknown or missing:
        raise KeyError(f"load_rank_state_dict: saved layers {unknown} are not in the model, "
                       f"its layers {missing} are not in the saved state")
    for name, layer in layers.items():
        layer.load_rank_state_dict(state[name])
