"""OpenMMLab: distnorm's layers as ``norm_cfg`` types, and a converting model wrapper.

::

    from distnorm.integrations import openmmlab
    openmmlab.register()          # once, before the model is built; in a config instead:
    # custom_imports = dict(imports=["distnorm.integrations.openmmlab_register"])

    norm_cfg = dict(type="DistSyncBN", requires_grad=True)      # instead of type="SyncBN"
    norm_cfg = dict(type="DistCBN", window=4, burn_in=1000)     # options go to the layer

:func:`register` puts every distnorm mode into mmengine's ``MODELS`` registry, the
one mmcv's ``build_norm_layer`` (and so ``ConvModule``, and the backbones of
mmdet/mmseg/mmpretrain) reads norm layers from; child registries (``mmdet``'s,
``mmseg``'s, ...) fall back to it, so the names resolve under any scope.

============================  =========================================  ======
``norm_cfg`` type             layer                                      abbr
============================  =========================================  ======
``DistSyncBN``                :class:`distnorm.SyncBatchNorm`            bn
``DistBRN``                   :class:`distnorm.BatchRenorm`              bn
``DistCmBN``                  :class:`distnorm.CrossMiniBatchNorm`       bn
``DistCBN``                   :class:`distnorm.CrossIterationBatchNorm`  bn
``DistBIN``                   :class:`distnorm.BatchInstanceNorm`        bn
``DistSwitchableNorm``        :class:`distnorm.SwitchableNorm`           bn
``DistFrozenBN``              :class:`distnorm.FrozenBatchNorm`          bn
``DistGN``                    :class:`distnorm.GroupNorm` (see below)    gn
============================  =========================================  ======

:func:`register` also adds ``DistCycleBN`` (:class:`distnorm.CycleBatchNorm`, abbr
``bn``; not in :data:`NORM_TYPES`, as it needs ``length``): per-level statistics
for a head shared across feature levels, e.g. mmdet's ``RetinaHead``, which runs its
``ConvModule`` stack on each FPN level in turn::

    norm_cfg = dict(type="DistCycleBN", length=5, requires_grad=True)   # P3-P7

``build_norm_layer`` calls ``cls(num_features, **cfg)`` and names the layer after the
class's ``_abbr_`` (``bn1``, ``gn``, ...), so a checkpoint of the same model with
``SyncBN``/``BN`` loads unchanged. ``DistGN`` takes ``(num_features, num_groups=32)``
and uses the largest divisor of ``num_features`` not above ``num_groups``, as
``convert_model(mode="gn")`` does (mmcv's own ``GN`` requires an exact
``num_groups``).

For a model whose norm layers are not configurable, :func:`register` also adds the
model wrapper ``DistnormDistributedDataParallel`` to ``MODEL_WRAPPERS``: mmengine's
``MMDistributedDataParallel`` that first runs :func:`distnorm.convert_model` on the
model. It takes the place of ``cfg.sync_bn`` (which accepts only ``"torch"`` and
``"mmcv"``)::

    model_wrapper_cfg = dict(type="DistnormDistributedDataParallel", norm_mode="sync")
    # on CPU (gloo) add device_ids=None: the Runner passes [LOCAL_RANK] otherwise

Do not also set ``cfg.sync_bn``: mmengine's ``convert_sync_batchnorm`` replaces every
``_BatchNorm`` subclass, distnorm's layers included, by ``torch.nn.SyncBatchNorm``.
:func:`distnorm.check_model` reports such replaced layers: :func:`register` has
every distnorm layer record itself in its parent module when it is placed there.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Dict, Optional

from torch import nn

from ..check import record_placements
from ..convert import convert_model
from ..modules import (
    BatchInstanceNorm,
    BatchRenorm,
    CrossIterationBatchNorm,
    CrossMiniBatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    SwitchableNorm,
    SyncBatchNorm,
)
from ..modules.cycle_batch_norm import CycleBatchNorm
from ..modules.group_norm import largest_divisor

__all__ = ["CYCLE_NORM_TYPE", "GroupNormFromFeatures", "NORM_TYPES", "WRAPPER_NAME", "register"]

WRAPPER_NAME = "DistnormDistributedDataParallel"


class GroupNormFromFeatures(GroupNorm):
    """:class:`distnorm.GroupNorm` built as ``build_norm_layer`` builds norms,
    ``(num_features, **cfg)``: G is the largest divisor of ``num_features`` not above
    ``num_groups`` (``DistGN``)."""

    _abbr_ = "gn"

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(largest_divisor(num_features, num_groups), num_features, eps, affine,
                         device=device, dtype=dtype)


#: The ``norm_cfg`` type names :func:`register` adds, and their layer classes.
NORM_TYPES: Dict[str, type] = {
    "DistSyncBN": SyncBatchNorm,
    "DistBRN": BatchRenorm,
    "DistCmBN": CrossMiniBatchNorm,
    "DistCBN": CrossIterationBatchNorm,
    "DistBIN": BatchInstanceNorm,
    "DistSwitchableNorm": SwitchableNorm,
    "DistFrozenBN": FrozenBatchNorm,
    "DistGN": GroupNormFromFeatures,
}

#: The ``norm_cfg`` type of :class:`distnorm.CycleBatchNorm`, registered by
#: :func:`register` too; kept out of :data:`NORM_TYPES`, whose types build from
#: ``(num_features)`` alone, since it needs ``length``.
CYCLE_NORM_TYPE = "DistCycleBN"


def _registries() -> Any:
    try:
        return importlib.import_module("mmengine.registry")
    except ImportError as error:
        raise ImportError("distnorm.integrations.openmmlab needs mmengine: "
                          "pip install 'distnorm[openmmlab]' (or mmengine)") from error


@functools.lru_cache(maxsize=None)
def _wrapper_class() -> type:
    """``MMDistributedDataParallel`` that converts the model first (built on first use,
    so that importing this module does not import mmengine)."""
    from mmengine.model import MMDistributedDataParallel

    class DistnormDistributedDataParallel(MMDistributedDataParallel):  # type: ignore[misc, valid-type]
        """mmengine's DDP wrapper around ``distnorm.convert_model(module, norm_mode, ...)``.

        Args:
            module: the model the Runner built.
            norm_mode: the ``convert_model`` mode. Default: ``"sync"``.
            norm_options: keyword options of that mode's layer.
            **kwargs: ``MMDistributedDataParallel``'s (and so DDP's) arguments.
        """

        def __init__(self, module: nn.Module, *, norm_mode: str = "sync",
                     norm_options: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
            module = convert_model(module, mode=norm_mode, **(norm_options or {}))
            super().__init__(module=module, **kwargs)

    DistnormDistributedDataParallel.__module__ = __name__
    DistnormDistributedDataParallel.__qualname__ = WRAPPER_NAME
    return DistnormDistributedDataParallel


def _add(registry: Any, name: str, cls: type) -> None:
    """Register ``cls`` as ``name`` unless it already is; refuse to replace another."""
    existing = registry.module_dict.get(name)
    if existing is cls:
        return
    if existing is not None:
        raise KeyError(f"register(): {name!r} is already registered in the {registry.name!r} "
                       f"registry to {existing.__module__}.{existing.__qualname__}, not distnorm's "
                       f"{cls.__qualname__}")
    registry.register_module(name=name, module=cls)


def register() -> Dict[str, type]:
    """Register distnorm's layers (:data:`NORM_TYPES` and ``DistCycleBN``) in
    mmengine's ``MODELS`` and its DDP wrapper in ``MODEL_WRAPPERS``. Calling it
    again is a no-op.

    mmcv 2.x reads norm layers from this same ``MODELS`` registry; OpenMMLab
    projects' child registries fall back to it.

    Returns:
        The ``norm_cfg`` type names and their classes (:data:`NORM_TYPES`).

    Raises:
        ImportError: mmengine is not installed.
        KeyError: one of the names is already taken by another class.
    """
    registries = _registries()
    # Layers built from norm_cfg are recorded in their parents, so that check_model
    # reports them when mmengine's sync_bn (convert_sync_batchnorm) replaces them.
    record_placements()
    for name, cls in NORM_TYPES.items():
        _add(registries.MODELS, name, cls)
    _add(registries.MODELS, CYCLE_NORM_TYPE, CycleBatchNorm)
    _add(registries.MODEL_WRAPPERS, WRAPPER_NAME, _wrapper_class())
    return dict(NORM_TYPES)
