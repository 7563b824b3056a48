"""detectron2: a ``get_norm``-compatible norm for any distnorm mode.

detectron2's ``get_norm(norm, out_channels)`` accepts, besides its names ("BN",
"SyncBN", "FrozenBN", "GN", ...), a callable that takes the channel count and returns
the layer. :func:`norm` makes such a callable::

    from distnorm.integrations.detectron2 import norm

    # LazyConfig (Python configs): any value can be a callable.
    model.backbone.bottom_up.stem.norm = norm("sync")
    model.backbone.bottom_up.stages.norm = norm("sync")
    model.backbone.norm = norm("sync")
    # Heads may see an empty batch on some ranks: distnorm weights ranks by count
    # (what detectron2's NaiveSyncBatchNorm(stats_mode="N") is used for).
    model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = norm("sync")

yacs configs (``MODEL.RESNETS.NORM``) hold strings only; there, build with "BN" or
"SyncBN" and convert the built model before detectron2 wraps it in DDP::

    class Trainer(DefaultTrainer):
        @classmethod
        def build_model(cls, cfg):
            return distnorm.convert_model(super().build_model(cfg), mode="sync")

Shared heads (RetinaNet, FCOS) apply one conv + norm to every FPN level in turn;
:func:`cycle_norm` gives each level its own statistics under one affine
(:class:`distnorm.CycleBatchNorm`)::

    model.head.norm = cycle_norm(len(model.head_in_features), "sync")   # RetinaNetHead

With a yacs config, ``RetinaNetHead`` already builds detectron2's own
``CycleBatchNormList`` for ``NORM: "BN"``/``"SyncBN"``: its levels are BatchNorm
layers, so the convert-after-build recipe above syncs each level too.

Frozen stages (``FREEZE_AT``): detectron2 freezes a stage by turning its
``nn.BatchNorm2d``/``nn.SyncBatchNorm`` into its own ``FrozenBatchNorm2d``; it does not
recognize distnorm's layers, so with :func:`norm` those stages keep distnorm layers
whose γ and β are frozen but whose statistics still update in training. Convert them
with ``distnorm.convert_model(stage, mode="frozen")``, or use the convert-after-build
recipe above (the stages are frozen before conversion, and stay so).
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from ..convert import convert_model
from ..modules.cycle_batch_norm import CycleBatchNorm

__all__ = ["DistnormCycleNorm", "DistnormNorm", "cycle_norm", "norm"]

# Arguments of the BatchNorm a layer starts from; the rest go to the variant.
_BATCH_NORM_ARGS = ("eps", "momentum", "affine", "track_running_stats")


class DistnormNorm:
    """A callable ``(out_channels) -> layer`` for detectron2's ``get_norm``.

    Made by :func:`norm`; picklable, so configs holding it can be saved and sent to
    spawned workers.
    """

    def __init__(self, mode: str = "sync", **options: Any) -> None:
        self.mode = mode
        self.options = options
        self(1)  # a bad mode or option fails here, when the config is written

    def __call__(self, out_channels: int) -> nn.Module:
        """A ``mode`` layer for ``out_channels`` channels, as ``convert_model`` makes
        it from a fresh ``nn.BatchNorm2d``: same defaults, and ``revert_model`` gives
        ``nn.BatchNorm2d`` back (for export)."""
        bn_args: Dict[str, Any] = {k: v for k, v in self.options.items() if k in _BATCH_NORM_ARGS}
        variant = {k: v for k, v in self.options.items() if k not in _BATCH_NORM_ARGS}
        return convert_model(nn.BatchNorm2d(out_channels, **bn_args), mode=self.mode, **variant)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"distnorm.integrations.detectron2.norm({self.mode!r}{options})"


def norm(mode: str = "sync", **options: Any) -> DistnormNorm:
    """A ``get_norm``-compatible callable that builds distnorm's ``mode`` layer.

    Args:
        mode: one of :func:`distnorm.variants` (``"sync"``, ``"brn"``, ``"cbn"``,
            ``"cmbn"``, ``"gn"``, ``"frozen"``, ...).
        **options: BatchNorm's ``eps``, ``momentum``, ``affine``,
            ``track_running_stats``, and the variant's options (``window=4``,
            ``num_groups=32``, ``process_group=...``).

    Raises:
        ValueError: unknown ``mode``.
        TypeError: an option the mode's layer does not take.

    Example::

        >>> layer = norm("brn", r_max=2.0, momentum=0.01)(256)   # BatchRenorm(256, ...)
    """
    return DistnormNorm(mode, **options)


class DistnormCycleNorm:
    """A callable ``(out_channels) -> CycleBatchNorm`` for detectron2's ``get_norm``.

    Made by :func:`cycle_norm`; picklable, like :class:`DistnormNorm`.
    """

    def __init__(self, length: int, mode: str = "sync", **options: Any) -> None:
        self.length = length
        self.mode = mode
        self.options = options
        self(1)  # a bad length, mode or option fails here, when the config is written

    def __call__(self, out_channels: int) -> nn.Module:
        """A :class:`distnorm.CycleBatchNorm` of ``length`` levels for ``out_channels``."""
        return CycleBatchNorm(out_channels, self.length, mode=self.mode, **self.options)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"distnorm.integrations.detectron2.cycle_norm({self.length!r}, "
                f"{self.mode!r}{options})")


def cycle_norm(length: int, mode: str = "sync", **options: Any) -> DistnormCycleNorm:
    """A ``get_norm``-compatible callable that builds a :class:`distnorm.CycleBatchNorm`:
    per-level statistics for a head shared across ``length`` feature levels.

    Args:
        length: the number of feature levels the head is applied to in turn (5 for
            RetinaNet/FCOS on P3-P7: ``len(model.head_in_features)``).
        mode: the statistics sets' mode: ``"sync"``, ``"brn"``, ``"cbn"``,
            ``"cmbn"``, or ``"bn"`` (unsynced).
        **options: ``eps``, ``momentum``, ``affine``, ``process_group`` and the
            other options of :class:`distnorm.CycleBatchNorm`.

    Raises:
        ValueError: ``length`` is not an integer >= 1, or ``mode`` is not one of those.
        TypeError: an option the mode's layer does not take.

    Example::

        >>> model.head.norm = cycle_norm(5, "sync")   # LazyConfig of a RetinaNet
    """
    return DistnormCycleNorm(length, mode, **options)
