"""``check_model``: what a model's normalization layers will synchronize over, and
which distnorm layers another converter replaced.

Frameworks run their own BatchNorm converters: Lightning's ``sync_batchnorm=True``,
timm's ``--sync-bn`` and mmengine's ``sync_bn`` all call
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (or a copy of it), which replaces
every ``_BatchNorm`` subclass — distnorm's layers included — by a new
``torch.nn.SyncBatchNorm``. Nothing fails on a GPU: the job quietly runs torch's
layer instead of the one asked for. So :func:`~distnorm.convert_model` records, on
each parent module, which of its children it made and in which mode, and
:func:`check_model` reports every such child that is no longer a distnorm layer.
Layers built by a framework's registry (``norm_cfg=dict(type="DistSyncBN")`` after
``distnorm.integrations.openmmlab.register()``) are recorded the same way when they
are placed in their parent (:func:`record_placements`).

The record is a plain attribute of the parent module (``_distnorm_children``,
child name → mode), not a mark on the layer or its tensors, because the parent is
what every converter keeps: it survives ``.to()``/``.cuda()`` (which replace buffer
tensors), ``copy.deepcopy`` (which drops attributes of Parameters),
``load_state_dict``, pickling and wrapping in DDP. It is not in the state_dict.
:func:`~distnorm.revert_model` forgets it for the layers it reverts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from .distributed import launcher_world_size
from .registry import variants

__all__ = ["LayerReport", "ModelReport", "SwappedLayer", "check_model"]

# Attribute of a parent module: {child name: distnorm mode} for the children
# convert_model made.
RECORD = "_distnorm_children"


@dataclass(frozen=True)
class LayerReport:
    """One distnorm layer of a model.

    Attributes:
        name: qualified name in the model (``""`` for the model itself).
        kind: the layer's class name.
        mode: its ``convert_model`` mode (``"sync"``, ``"brn"``, ...), ``None`` for a
            class no mode makes.
        synced: whether it reduces batch statistics over a process group in training
            (``False`` for layers with no batch statistics, such as ``"frozen"`` and
            ``"gn"``, and for synced layers that will run locally).
        group: the group in words: ``"world"``, ``"ranks [0, 1]"``,
            ``"local (no process group)"``, ``"local (group of 1 rank)"``,
            ``"not a member"`` or ``"-"`` (the layer never synchronizes).
        ranks: the group's global ranks when known, else ``None``.
        nonfinite: the layer's policy for NaN/Inf inputs (``"raise"``/``"skip"``),
            ``None`` for layers without one.
    """

    name: str
    kind: str
    mode: Optional[str]
    synced: bool
    group: str
    ranks: Optional[Tuple[int, ...]]
    nonfinite: Optional[str]


@dataclass(frozen=True)
class SwappedLayer:
    """A layer ``convert_model`` made that another converter replaced.

    Attributes:
        name: qualified name in the model.
        kind: the class now in its place (e.g. ``"SyncBatchNorm"`` from
            ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
        module: that class's module (``"torch.nn.modules.batchnorm"``).
        mode: the distnorm mode the layer had.
    """

    name: str
    kind: str
    module: str
    mode: str


@dataclass(frozen=True)
class ModelReport:
    """What :func:`check_model` found. ``str(report)`` is a table.

    Attributes:
        layers: every distnorm layer, in module order.
        swapped: layers ``convert_model`` made (or a framework registry built, see
            :func:`record_placements`) that are no longer distnorm's.
        world_size: ranks in the default process group, ``None`` when
            torch.distributed is not initialized.
        launcher: ``(variable, size)`` when a launcher's variables say the job runs
            several processes (``("WORLD_SIZE", 4)``), else ``None``.
        notes: problems in words (swapped layers, a missing process group).
    """

    layers: Tuple[LayerReport, ...]
    swapped: Tuple[SwappedLayer, ...]
    world_size: Optional[int]
    launcher: Optional[Tuple[str, int]]
    notes: Tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No layer was swapped away and no synced layer will silently run locally."""
        return not self.notes

    @property
    def synced(self) -> Tuple[LayerReport, ...]:
        """The layers that reduce over a group of more than one rank."""
        return tuple(layer for layer in self.layers if layer.synced)

    def __str__(self) -> str:
        head = (f"distnorm.check_model: {len(self.layers)} distnorm layer(s), "
                f"{len(self.synced)} synced, {len(self.swapped)} swapped away; "
                + ("torch.distributed not initialized" if self.world_size is None
                   else f"world of {self.world_size} rank(s)"))
        lines = [head]
        if self.layers:
            rows = [(layer.name or "(model)", layer.kind, layer.mode or "-", layer.group,
                     layer.nonfinite or "-") for layer in self.layers]
            lines += _table(("layer", "class", "mode", "synced over", "nonfinite"), rows)
        if self.swapped:
            lines.append("swapped away from distnorm by another converter:")
            rows = [(s.name or "(model)", f"{s.module}.{s.kind}", s.mode) for s in self.swapped]
            lines += _table(("layer", "now", "was mode"), rows)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def is_distnorm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is (or subclasses) one of distnorm's layer classes."""
    return any(cls.__module__.startswith(("distnorm.modules", "distnorm.catalogue"))
               for cls in type(module).__mro__)


def _is_norm(module: nn.Module) -> bool:
    # What a BatchNorm converter puts in a layer's place: torch's, apex's, timm's,
    # mmcv's and detectron2's classes all subclass _NormBase or say "Norm".
    return isinstance(module, nn.modules.batchnorm._NormBase) or "norm" in type(module).__name__.lower()


def record_conversion(root: nn.Module, made: Dict[int, str]) -> None:
    """Record on each parent in ``root`` which children ``convert_model`` just made.

    Args:
        root: the converted model.
        made: ``id(layer) -> mode`` for the layers this conversion created.
    """
    for parent in root.modules():
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in made:
                parent.__dict__.setdefault(RECORD, {})[child_name] = made[id(child)]


# The handle of the global hook installed by record_placements() (None: not installed).
_PLACEMENT_HOOK: Optional[Any] = None


def _record_placement(parent: nn.Module, name: str, child: Optional[nn.Module]) -> None:
    """A module registration hook: a distnorm layer placed in ``parent`` is recorded
    there as ``convert_model``'s layers are (a later replacement keeps the record)."""
    if child is None or not is_distnorm_layer(child):
        return
    mode = next((mode for cls in type(child).__mro__
                 for mode, variant in variants().items() if variant is cls), None)
    if mode is not None:
        parent.__dict__.setdefault(RECORD, {}).setdefault(name, mode)


def record_placements() -> None:
    """From now on, record every distnorm layer placed in a parent module, whoever built
    it (a framework's registry: mmcv's ``build_norm_layer`` for ``norm_cfg=dict(type=
    "DistSyncBN")``), so that :func:`check_model` reports it when another converter
    replaces it. Installs one global ``nn.Module`` registration hook (run when a
    submodule is assigned, never in ``forward``); calling it again is a no-op."""
    global _PLACEMENT_HOOK
    if _PLACEMENT_HOOK is None:
        _PLACEMENT_HOOK = nn.modules.module.register_module_module_registration_hook(
            _record_placement)


def forget_conversion(root: nn.Module) -> None:
    """Drop every record in ``root`` (``revert_model``: the model leaves distnorm)."""
    for module in root.modules():
        module.__dict__.pop(RECORD, None)


def _group_of(layer: nn.Module) -> Tuple[bool, str, Optional[Tuple[int, ...]]]:
    """(synced, group in words, ranks) for a layer with a ``process_group``."""
    if not (dist.is_available() and dist.is_initialized()):
        return False, "local (no process group)", None
    group = getattr(layer, "process_group", None)
    size = dist.get_world_size(group if group is not None else dist.group.WORLD)
    if size < 0:
        return False, "not a member", None
    if group is None:
        ranks: Tuple[int, ...] = tuple(range(size))
        words = f"world ({size} ranks)" if size > 1 else "local (world of 1 rank)"
    else:
        ranks = tuple(dist.get_process_group_ranks(group))
        words = f"ranks {list(ranks)}" if size > 1 else f"local (group of 1 rank: {ranks[0]})"
    return size > 1, words, ranks


def check_model(model: nn.Module) -> ModelReport:
    """Report how ``model``'s distnorm layers will synchronize, and swapped layers.

    Lists each distnorm layer with its mode, the process group it reduces over in
    training (resolved now, as the layer will in its forward) and its non-finite
    policy, and each layer :func:`~distnorm.convert_model` made that another
    converter has since replaced (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
    run by Lightning's ``sync_batchnorm=True``, timm's ``--sync-bn`` and mmengine's
    ``sync_bn``). Call it after every framework has set the model up — where the
    process group exists, e.g. at the start of training.

    Args:
        model: the model, possibly wrapped (DDP, FSDP2's ``fully_shard`` or FSDP,
            ``torch.compile``, Lightning).

    Returns:
        A :class:`ModelReport`; ``print`` it for a table, or read ``report.ok``,
        ``report.swapped`` and ``report.layers``.

    Example::

        >>> model = distnorm.convert_model(model)
        >>> report = distnorm.check_model(model)
        >>> assert report.ok, report
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_model expects an nn.Module (got {type(model).__name__})")
    modes = {cls: mode for mode, cls in variants().items()}
    layers: List[LayerReport] = []
    swapped: List[SwappedLayer] = []
    for name, module in model.named_modules():
        record = module.__dict__.get(RECORD, {})
        for child_name, mode in record.items():
            child = module._modules.get(child_name)
            if child is not None and not is_distnorm_layer(child) and _is_norm(child):
                qualified = f"{name}.{child_name}" if name else child_name
                swapped.append(SwappedLayer(qualified, type(child).__name__,
                                            type(child).__module__, mode))
        if not is_distnorm_layer(module):
            continue
        mode = next((modes[cls] for cls in type(module).__mro__ if cls in modes), None)
        if not hasattr(module, "process_group") and mode is None:
            continue  # a catalogue layer without batch statistics (AdaIN, CosineNorm, ...)
        if hasattr(module, "process_group"):
            synced, group, ranks = _group_of(module)
        else:
            synced, group, ranks = False, "-", None
        nonfinite = getattr(module, "nonfinite", None)
        # distnorm's class, also when a wrapper subclassed it (FSDP2's fully_shard on the
        # layer itself makes an "FSDPSyncBatchNorm").
        kind = next(cls.__name__ for cls in type(module).__mro__
                    if cls.__module__.startswith(("distnorm.modules", "distnorm.catalogue")))
        layers.append(LayerReport(name, kind, mode, synced, group, ranks,
                                  nonfinite if isinstance(nonfinite, str) else None))

    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else None
    launcher = launcher_world_size()
    notes: List[str] = []
    if swapped:
        notes.append(f"{len(swapped)} layer(s) made by distnorm.convert_model (or built as distnorm "
                     "layers through a framework registry) were replaced by another converter "
                     "(e.g. torch.nn.SyncBatchNorm.convert_sync_batchnorm, run by Lightning's "
                     "sync_batchnorm=True, timm's --sync-bn or mmengine's sync_bn): turn that "
                     "option off, or call distnorm.convert_model after it")
    if not initialized and launcher is not None and any(hasattr(m, "process_group") for m in
                                                       model.modules() if is_distnorm_layer(m)):
        variable, size = launcher
        notes.append(f"{variable}={size} says this job runs {size} processes, but no process group "
                     "is initialized: synced layers would run as local BatchNorm. Call "
                     "torch.distributed.init_process_group() or "
                     "distnorm.launch.env.init_from_env() before the first forward")
    if any(layer.group == "not a member" for layer in layers):
        notes.append("some layers' process_group does not contain this rank: their forward "
                     "raises on this rank")
    return ModelReport(tuple(layers), tuple(swapped), world, launcher, tuple(notes))
