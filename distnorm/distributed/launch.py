"""Former home of distnorm's launching helpers; they now live in :mod:`distnorm.launch`.

Every name that was importable from here still is:

* :func:`init_from_env`, :func:`env_from`, :class:`DistEnv`, :class:`RendezvousError`,
  :func:`default_backend`, :func:`import_before_init` — :mod:`distnorm.launch.env`;
* :func:`run_local`, :func:`free_port` — :mod:`distnorm.launch.local`.

Importing this module (``import distnorm`` does) imports :mod:`distnorm.launch.env`,
which runs :func:`import_before_init` (a clean exit after ``destroy_process_group``).
"""

from __future__ import annotations

from ..launch.env import (REQUIRED, DistEnv, RendezvousError, default_backend, env_from, import_before_init,
                          init_from_env)
from ..launch.local import free_port, run_local

__all__ = ["DistEnv", "RendezvousError", "default_backend", "env_from", "free_port", "import_before_init",
           "init_from_env", "run_local"]

_REEXPORTED = (REQUIRED,)
