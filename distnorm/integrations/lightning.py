"""Lightning plugin: train with distnorm's layers under ``Trainer(strategy="ddp")``.

::

    import lightning as L
    from distnorm.integrations.lightning import DistnormSync

    trainer = L.Trainer(strategy="ddp", devices=8, plugins=[DistnormSync(mode="sync")])
    trainer.fit(model)

:class:`DistnormSync` is a Lightning ``LayerSync`` plugin, the same kind of plugin as
``Trainer(sync_batchnorm=True)`` (which installs Lightning's ``TorchSyncBatchNorm``):
the parallel strategies (``ddp``, ``ddp_spawn``, ``fsdp``) call its ``apply`` on the
LightningModule when ``fit`` starts, before wrapping it, and its ``revert`` when
``fit`` ends, so the module you get back holds plain ``torch.nn.BatchNorm*d`` again.
Single-device strategies ignore LayerSync plugins, as they do torch's.

:class:`PreciseBN` is a callback that recomputes the BatchNorm statistics
(:func:`distnorm.precise_bn`) on the training data before every validation::

    trainer = L.Trainer(strategy="ddp", plugins=[DistnormSync()],
                        callbacks=[PreciseBN(num_batches=200)])

The plugin works with both package names, ``lightning`` (``lightning.pytorch``) and
``pytorch_lightning``: the class subclasses the ``LayerSync`` of the first one found
and is registered as a virtual subclass of the other's, so either ``Trainer``
accepts it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, List, Optional

from torch import nn

from ..convert import convert_model, revert_model
from ..modules._base import BatchNormBase
from ..modules.group_norm import GroupNorm

__all__ = ["DistnormSync", "CONFLICT_MESSAGE", "PreciseBN"]

# Lightning packages, preferred first. Each has its own copy of the plugin classes.
_PACKAGES = ("lightning.pytorch", "pytorch_lightning")

CONFLICT_MESSAGE = (
    "Trainer(sync_batchnorm=True) and the DistnormSync plugin both convert BatchNorm "
    "layers, to torch.nn.SyncBatchNorm and to distnorm's layers respectively. Drop "
    "sync_batchnorm=True: DistnormSync already synchronizes BatchNorm across processes "
    "(or drop DistnormSync from plugins to use torch's SyncBatchNorm)."
)


def _import_optional(name: str) -> Optional[Any]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _lightning_packages() -> List[str]:
    """The Lightning packages importable here, preferred first."""
    found = [name for name in _PACKAGES if _import_optional(f"{name}.plugins") is not None]
    if not found:
        raise ImportError("distnorm.integrations.lightning needs Lightning: "
                          "pip install 'distnorm[lightning]' (or lightning / pytorch-lightning)")
    return found


_FOUND = _lightning_packages()
_LayerSync: type = importlib.import_module(f"{_FOUND[0]}.plugins").LayerSync
_Callback: type = importlib.import_module(_FOUND[0]).Callback


class DistnormSync(_LayerSync):  # type: ignore[misc, valid-type]
    """A Lightning ``LayerSync`` plugin that converts BatchNorm with distnorm.

    ``apply`` runs :func:`distnorm.convert_model` on the LightningModule when
    ``Trainer.fit`` sets up a parallel strategy; ``revert`` runs
    :func:`distnorm.revert_model` when ``fit`` ends (layers of ``"gn"``, ``"bin"``
    and ``"switchable"`` are kept: BatchNorm cannot hold GroupNorm's function nor
    the mixtures' learned parameters). Any mode and option of ``convert_model`` is
    accepted; they are checked when the plugin is created, so a typo fails at
    ``Trainer(...)``, not after the processes have started.

    Do not combine it with ``Trainer(sync_batchnorm=True)``: that is a second,
    conflicting BatchNorm conversion, and ``Trainer`` raises
    ``MisconfigurationException`` saying to drop ``sync_batchnorm=True``.

    Args:
        mode: one of :func:`distnorm.variants` (``"sync"``, ``"brn"``, ``"cbn"``,
            ``"cmbn"``, ...).
        group_size: normalize over groups of this many consecutive ranks
            (:func:`distnorm.distributed.group_by`, created when ``fit`` starts,
            after Lightning has initialized the process group); ``None``: all ranks.
        **options: keyword options of the variant (e.g. ``window=8`` for ``"cbn"``,
            ``accumulation_steps=4`` for ``"cmbn"``).

    Example::

        >>> trainer = lightning.Trainer(strategy="ddp", devices=4,
        ...                             plugins=[DistnormSync(mode="brn", r_max=2.0)])
    """

    def __init__(self, mode: str = "sync", *, group_size: Optional[int] = None,
                 **options: Any) -> None:
        super().__init__()
        if group_size is not None and "process_group" in options:
            raise ValueError("DistnormSync: give group_size or process_group, not both "
                             f"(got group_size={group_size!r})")
        # Fail at Trainer(...) on a bad mode or option: convert a throwaway layer.
        convert_model(nn.BatchNorm2d(2), mode=mode, **options)
        self.mode = mode
        self.group_size = group_size
        self.options = options

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every BatchNorm layer of ``model`` to the plugin's mode."""
        options = dict(self.options)
        if self.group_size is not None:
            from ..distributed import group_by

            options["process_group"] = group_by(self.group_size)
        return convert_model(model, mode=self.mode, **options)

    def revert(self, model: nn.Module) -> nn.Module:
        """Give ``model`` its plain ``torch.nn`` BatchNorm layers back.

        Layers that BatchNorm cannot represent are kept, and then the whole model is
        left as it is: GroupNorm (``mode="gn"``, no running statistics) and the
        mixtures (``"bin"``, ``"switchable"``), whose learned mixing parameters a
        BatchNorm would drop.
        """
        if any(_one_way(m) for m in model.modules()):
            return model
        return revert_model(model)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"{type(self).__name__}(mode={self.mode!r}{group}{options})"


class PreciseBN(_Callback):  # type: ignore[misc, valid-type]
    """A Lightning callback: :func:`distnorm.precise_bn` on the training data before
    every validation (PreciseBN, Wu & Johnson 2021).

    Before each validation run of ``fit`` (not the sanity check), every rank feeds
    its first ``num_batches`` training batches through the LightningModule's
    ``forward`` and the BatchNorm statistics become the exact population statistics
    of what all ranks fed (see :func:`distnorm.precise_bn`); validation then uses
    them. The recomputed statistics stay in the model (training goes on from them
    and checkpoints hold them).

    Args:
        num_batches: training batches per rank to use (``None``: the whole
            dataloader; Wu & Johnson found 10^3–10^4 samples in all enough).
        input_fn: turns a training batch (already on the module's device) into the
            ``forward`` input; default: the first element of a tuple/list batch, else
            the batch itself.
        progress: a progress bar on rank 0.

    Example::

        >>> trainer = lightning.Trainer(callbacks=[PreciseBN(num_batches=200)])
    """

    def __init__(self, num_batches: Optional[int] = 200, *,
                 input_fn: Optional[Callable[[Any], Any]] = None, progress: bool = False) -> None:
        super().__init__()
        if num_batches is not None and (isinstance(num_batches, bool)
                                        or not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"PreciseBN: num_batches must be an int >= 1 or None "
                             f"(got {num_batches!r})")
        self.num_batches = num_batches
        self.input_fn = input_fn
        self.progress = progress
        self.samples: Optional[int] = None  # what the last recomputation used (group)

    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.sanity_checking or trainer.train_dataloader is None:
            return
        from ..population import precise_bn

        to_device = trainer.strategy.batch_to_device
        select = self.input_fn

        def inputs() -> Any:
            for batch in trainer.train_dataloader:
                batch = to_device(batch)
                yield select(batch) if select is not None else batch

        # Validation runs under inference_mode; precise_bn leaves it for its own work.
        self.samples = precise_bn(pl_module, inputs(), self.num_batches, progress=self.progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_batches={self.num_batches!r})"


def _one_way(module: nn.Module) -> bool:
    """A distnorm layer that reverting to BatchNorm would lose information from."""
    if isinstance(module, GroupNorm):
        return True
    return isinstance(module, BatchNormBase) and any(
        name not in ("weight", "bias") for name, _ in module.named_parameters(recurse=False))


def _guard_sync_batchnorm(package: str) -> None:
    """Make ``Trainer(sync_batchnorm=True, plugins=[DistnormSync(...)])`` fail with a
    message that says which flag to drop.

    Lightning rejects any LayerSync plugin given together with
    ``sync_batchnorm=True`` ("... Choose one or the other"), in its private
    ``_AcceleratorConnector._check_config_and_set_final_flags``. This wraps that
    method to raise the same exception type, first, with :data:`CONFLICT_MESSAGE`
    when the plugin is a DistnormSync; every other call goes through unchanged. If a
    Lightning release renames the method, nothing is wrapped and Lightning's own
    message (which names DistnormSync) is what the user sees.
    """
    module = _import_optional(f"{package}.trainer.connectors.accelerator_connector")
    exceptions = _import_optional(
        "lightning.fabric.utilities.exceptions" if package.startswith("lightning")
        else "lightning_fabric.utilities.exceptions")
    connector = getattr(module, "_AcceleratorConnector", None)
    original: Optional[Callable[..., Any]] = getattr(connector, "_check_config_and_set_final_flags", None)
    error = getattr(exceptions, "MisconfigurationException", None)
    if original is None or error is None or getattr(original, "_distnorm_guard", False):
        return
    signature = inspect.signature(original)
    if not {"plugins", "sync_batchnorm"} <= set(signature.parameters):
        return

    @functools.wraps(original)
    def check(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        plugins = arguments.get("plugins")
        if plugins is not None and not isinstance(plugins, (list, tuple)):
            plugins = [plugins]
        if arguments.get("sync_batchnorm") and any(isinstance(p, DistnormSync)
                                                   for p in plugins or ()):
            raise error(CONFLICT_MESSAGE)
        return original(self, *args, **kwargs)

    check._distnorm_guard = True  # type: ignore[attr-defined]
    connector._check_config_and_set_final_flags = check  # type: ignore[union-attr]


for _package in _FOUND:
    if _package != _FOUND[0]:
        # The other package's Trainer checks isinstance against its own LayerSync.
        importlib.import_module(f"{_package}.plugins").LayerSync.register(DistnormSync)
        other_callback = importlib.import_module(_package).Callback
        if hasattr(other_callback, "register"):  # an ABC in some releases
            other_callback.register(PreciseBN)
    _guard_sync_batchnorm(_package)
