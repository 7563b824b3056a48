"""Deprecated: the former home of distnorm's launching helpers, now in :mod:`distnorm.launch`.

Every name that was importable from here still is, with a ``FutureWarning`` on first
use that names its new home:

* :func:`~distnorm.launch.env.init_from_env`, :func:`~distnorm.launch.env.env_from`,
  :class:`~distnorm.launch.env.DistEnv`, :class:`~distnorm.launch.env.RendezvousError`,
  :func:`~distnorm.launch.env.default_backend`, ``REQUIRED`` — :mod:`distnorm.launch.env`;
* :func:`~distnorm.distributed.import_before_init` — :mod:`distnorm.distributed`;
* :func:`~distnorm.launch.local.run_local`, :func:`~distnorm.launch.local.free_port` —
  :mod:`distnorm.launch.local`.

The names are resolved on use (PEP 562), so this module imports nothing from the
launchers when it is loaded: :mod:`distnorm.launch` depends on
:mod:`distnorm.distributed`, never the reverse. It will be removed in a later release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Dict

# name -> the module that holds it now.
_MOVED: Dict[str, str] = {
    "DistEnv": "distnorm.launch.env",
    "REQUIRED": "distnorm.launch.env",
    "RendezvousError": "distnorm.launch.env",
    "default_backend": "distnorm.launch.env",
    "env_from": "distnorm.launch.env",
    "init_from_env": "distnorm.launch.env",
    "import_before_init": "distnorm.distributed",
    "free_port": "distnorm.launch.local",
    "run_local": "distnorm.launch.local",
}

__all__ = sorted(_MOVED)


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"distnorm.distributed.launch is deprecated and will be removed; import {name} "
                  f"from {home}", FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
