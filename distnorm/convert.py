"""``convert_model`` / ``revert_model``: rewrite the BatchNorm layers of any model.

A variant registered once with :func:`register_variant` is reachable as
``convert_model(net, mode=...)`` and gets the contract tests of the test suite.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules  # noqa: F401  (importing the layers registers the built-in variants)
from .check import forget_conversion, record_conversion
from .modules.cycle_batch_norm import LocalBatchNorm
from .registry import register_variant, resolve_mode, revertible_variants, variant, variants

__all__ = ["convert_model", "register_variant", "revert_model", "variants"]


def _source_types() -> Tuple[type, ...]:
    """The BatchNorm classes convert_model replaces."""
    types: list = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    try:  # apex is optional; importing it is the only way to know its class
        from apex.parallel import SyncBatchNorm as ApexSyncBatchNorm  # type: ignore

        types.append(ApexSyncBatchNorm)
    except Exception:
        pass
    types.extend(revertible_variants())
    # The unsynced statistics sets of a CycleBatchNorm (what revert_model leaves there).
    types.append(LocalBatchNorm)
    return tuple(types)


def _is_norm_act(module: nn.Module) -> bool:
    """A BatchNorm that applies parameter-free ``drop`` then ``act`` children to its
    output: timm's ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet and most
    recent timm families), or a distnorm layer converted from one."""
    batch_norm_like = isinstance(module, _BatchNorm) or hasattr(module, "_distnorm_source")
    return (batch_norm_like and isinstance(module._modules.get("act"), nn.Module)
            and isinstance(module._modules.get("drop"), nn.Module))


def _apply_drop_act(module: nn.Module, args: Any, output: Any) -> Any:
    return module.act(module.drop(output))


def _carry_norm_act(source: nn.Module, layer: nn.Module) -> None:
    """Keep a BatchNormAct's ``drop`` and ``act`` on the converted layer, applied after
    the normalization (same state_dict keys: they hold no parameters)."""
    layer.drop, layer.act = source.drop, source.act
    layer.register_forward_hook(_apply_drop_act)


def _replace(root: nn.Module, swap: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Apply ``swap(qualified_name, module)`` to every module; replace those it returns.

    A module reached twice (shared, or used twice in one parent) is swapped once
    and its replacement shared the same way.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"distnorm expects an nn.Module (got {type(root).__name__})")
    done: Dict[int, Optional[nn.Module]] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        key = id(module)
        if key not in done:
            done[key] = swap(name, module)
            if done[key] is None:
                # _modules, not named_children(): that one skips repeated children.
                for child_name, child in list(module._modules.items()):
                    if child is not None:
                        qualified = f"{name}.{child_name}" if name else child_name
                        module._modules[child_name] = visit(qualified, child)
        new = done[key]
        return module if new is None else new

    return visit("", root)


def _refuse_sharded(module: nn.Module, sources: Tuple[type, ...]) -> None:
    """Refuse a model FSDP already wraps: FSDP2 has sharded its parameters into DTensors
    and FSDP has flattened them, so a layer made from them would hold parameters FSDP
    no longer manages (and fail in its forward with an unrelated-looking error)."""
    if not isinstance(module, nn.Module):
        return  # _replace names what it got
    if not any(type(m) in sources or _is_norm_act(m) for m in module.modules()):
        return
    for name, sub in module.named_modules():
        # By class name: importing torch.distributed.fsdp to ask costs an import.
        if {"FSDPModule", "FullyShardedDataParallel"} & {c.__name__ for c in type(sub).__mro__}:
            raise ValueError(
                f"convert_model: {name or 'the model'!s} is already wrapped by FSDP "
                f"({type(sub).__name__}); call distnorm.convert_model before fully_shard / "
                "FullyShardedDataParallel, as before DistributedDataParallel")


def convert_model(module: nn.Module, mode: str = "sync", process_group: Optional[Any] = None,
                  **options: Any) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by the distnorm variant ``mode``.

    Converts ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` (and
    apex's ``SyncBatchNorm`` when apex is importable) anywhere in the tree — the
    root module itself included — as well as distnorm's own variants (to switch
    between them). Parameters and buffers are the same tensors afterwards (no
    copy), so weights, running statistics, ``requires_grad``, device and dtype are
    kept, as is each layer's train/eval flag. Call it before wrapping the model in
    ``DistributedDataParallel`` or ``deepspeed.initialize``.

    Args:
        module: the model, or a single BatchNorm layer.
        mode: one of :func:`variants` — ``"sync"``, ``"frozen"``, ``"gn"``, … —
            or an alias of one (``"cross_iteration"`` for ``"cbn"``).
        process_group: the group synced variants reduce over (``None``: world);
            see :func:`distnorm.distributed.group_by` for subgroups.
        **options: keyword options of the variant's constructor (e.g.
            ``num_groups=32`` for ``"gn"``).

    Returns:
        The converted module (a new object if ``module`` itself was a BatchNorm).

    Example::

        >>> model = distnorm.convert_model(torchvision.models.resnet50(), mode="sync")
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    canonical = resolve_mode(mode)
    target = variant(canonical)
    sources = _source_types()
    _refuse_sharded(module, sources)
    made: Dict[int, str] = {}  # id(new layer) -> mode, recorded for check_model

    def swap(name: str, child: nn.Module) -> Optional[nn.Module]:
        fused = _is_norm_act(child)
        if type(child) not in sources and not fused:
            if isinstance(child, _BatchNorm) and not isinstance(child, target):
                warnings.warn(f"convert_model: left {type(child).__name__} '{name}' unconverted: "
                              "it subclasses BatchNorm with a forward of its own")
            return None
        try:
            new = target.from_batch_norm(child, process_group=process_group, **options)
        except TypeError as error:
            raise TypeError(f"convert_model(mode={mode!r}): bad options {sorted(options)} "
                            f"for {target.__name__}: {error}") from error
        new._distnorm_name = name or type(child).__name__
        made[id(new)] = canonical
        if fused:
            _carry_norm_act(child, new)
        return new

    result = _replace(module, swap)
    record_conversion(result, made)  # so that check_model can name layers swapped away later
    return result


def revert_model(module: nn.Module) -> nn.Module:
    """Turn every distnorm BatchNorm variant back into plain ``torch.nn`` BatchNorm.

    Every module with a ``to_batch_norm()`` method (the BatchNorm variants, the
    frozen layer, and any registered variant that defines one) is replaced by what
    it returns; other modules are searched for such children. Each layer goes back to the class it was converted from (``nn.BatchNorm1d``,
    ``2d``, ``3d`` or ``nn.SyncBatchNorm``; ``nn.BatchNorm2d`` for layers built
    directly), sharing the same parameter and buffer tensors: bit-exact, ready for
    export. A frozen layer's γ and β become parameters again, with the
    ``requires_grad`` they had before freezing.

    Raises:
        ValueError: the model holds a GroupNorm made by ``convert_model(mode="gn")``:
            GroupNorm has no running statistics to give back.
    """
    def swap(name: str, child: nn.Module) -> Optional[nn.Module]:
        # Each distnorm layer knows the BatchNorm it goes back to; other modules have
        # no to_batch_norm and are visited for children.
        to_batch_norm = getattr(child, "to_batch_norm", None)
        if not callable(to_batch_norm):
            return None
        try:
            bn = to_batch_norm()
        except ValueError as error:
            raise ValueError(f"cannot revert {type(child).__name__} '{name or 'module'}' to "
                             f"BatchNorm: {error}") from error
        extras = [n for n, _ in child.named_parameters(recurse=False) if n not in ("weight", "bias")]
        if extras:
            warnings.warn(f"revert_model: {type(child).__name__} '{name}' drops its parameters "
                          f"{extras}; the BatchNorm computes the same only where they are at "
                          "their BatchNorm values")
        for extra in ("drop", "act"):  # a BatchNormAct's activation, kept as it was
            if extra in child._modules and extra in bn._modules:
                bn._modules[extra] = child._modules[extra]
        return bn

    result = _replace(module, swap)
    forget_conversion(result)
    return result
