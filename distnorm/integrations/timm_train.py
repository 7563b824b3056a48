"""Run timm's ``train.py`` (or any script) with distnorm in place of ``--sync-bn``'s layers.

timm's ``train.py`` converts the model with ``timm.layers.convert_sync_batchnorm``
when given ``--sync-bn`` in a distributed run. This wrapper makes that function (and
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which older scripts call) run
:func:`distnorm.convert_model` instead, then runs the script unchanged::

    torchrun --nproc_per_node=8 -m distnorm.integrations.timm_train \\
        [--mode sync] [--option KEY=VALUE ...] \\
        path/to/pytorch-image-models/train.py /data/imagenet --model resnet50 --sync-bn ...

Everything after the script path is the script's own command line; ``--option``
values are Python literals (``window=8``, ``r_max=2.0``) or else strings. The same
swap is available in your own code as the context manager :func:`use_distnorm`, and
:func:`converter` gives the replacement function itself.

timm's ``train.py`` turns off ``--dist-bn`` (its end-of-epoch averaging of running
statistics) under ``--sync-bn``; distnorm's synced layers keep identical running
statistics on every rank, so nothing is lost. With apex AMP (``--amp-impl apex``)
``train.py`` calls apex's converter instead, which this wrapper does not replace.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import runpy
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from ..convert import convert_model

__all__ = ["converter", "main", "use_distnorm"]

# Modules that hold timm's convert_sync_batchnorm as an attribute (the first defines it).
_TIMM_MODULES = ("timm.layers.norm_act", "timm.layers", "timm.models.layers")


def converter(mode: str = "sync", **options: Any) -> Callable[..., nn.Module]:
    """A drop-in for ``timm.layers.convert_sync_batchnorm(module, process_group=None)``
    that runs ``distnorm.convert_model(module, mode, process_group, **options)``.

    The mode and options are checked now, on a throwaway layer.
    """
    convert_model(nn.BatchNorm2d(2), mode=mode, **options)

    def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
        return convert_model(module, mode=mode, process_group=process_group, **options)

    convert_sync_batchnorm.__doc__ = f"distnorm.convert_model(module, mode={mode!r}, ...)"
    return convert_sync_batchnorm


@contextlib.contextmanager
def use_distnorm(mode: str = "sync", **options: Any) -> Iterator[Callable[..., nn.Module]]:
    """Within the block, timm's and torch's SyncBatchNorm converters run
    :func:`distnorm.convert_model` instead; both are restored on exit.

    Replaced: ``convert_sync_batchnorm`` of ``timm.layers`` and
    ``timm.layers.norm_act`` (and of ``timm.models.layers`` if already imported), so
    that a script doing ``from timm.layers import convert_sync_batchnorm`` inside the
    block gets distnorm's; and ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Yields:
        The replacement converter (see :func:`converter`).
    """
    import importlib

    convert = converter(mode, **options)
    saved: List[Tuple[Any, str, Any]] = []
    try:
        for name in _TIMM_MODULES:
            if name == "timm.models.layers" and name not in sys.modules:
                continue  # deprecated alias, warns on import; patched through norm_act
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "convert_sync_batchnorm"):
                saved.append((module, "convert_sync_batchnorm", module.convert_sync_batchnorm))
                module.convert_sync_batchnorm = convert
        saved.append((nn.SyncBatchNorm, "convert_sync_batchnorm",
                      nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]))
        nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(  # type: ignore[assignment]
            lambda cls, module, process_group=None: convert(module, process_group))
        yield convert
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse(argv: Sequence[str]) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m distnorm.integrations.timm_train",
        description="Run a training script (timm's train.py) with distnorm's layers wherever "
                    "it converts the model to SyncBatchNorm (train.py: --sync-bn).")
    parser.add_argument("--mode", default="sync",
                        help="distnorm mode for convert_model (default: sync)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the mode's layer, e.g. window=8; repeatable")
    parser.add_argument("script", help="the training script, e.g. timm's train.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="the script's own arguments")
    args = parser.parse_args(argv)
    options: Dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--option expects KEY=VALUE (got {item!r})")
        options[key] = _literal(value)
    return args, options


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``script`` as ``__main__`` with its arguments, inside :func:`use_distnorm`."""
    args, options = _parse(sys.argv[1:] if argv is None else argv)
    if "--sync-bn" not in args.script_args:
        warnings.warn("timm_train: no --sync-bn among the script's arguments; timm's train.py "
                      "converts BatchNorm (to distnorm's layers, here) only with --sync-bn",
                      stacklevel=2)
    sys.argv = [args.script, *args.script_args]
    # As `python script.py` does: the script's folder first on the import path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    with use_distnorm(args.mode, **options):
        runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
