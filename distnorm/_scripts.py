"""Where the scripts shipped with distnorm live: the benchmarks and the detection job,
installed inside the package (``distnorm/_bench/``, ``distnorm/_detection/``) or in
the checkout the package was imported from (``benchmarks/``, ``examples/detection/``).

A floor below the command line and the launchers, which both look scripts up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["script_path"]

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
# kind -> (folder inside the installed package, folder in a checkout)
_FOLDERS = {"bench": ("_bench", "benchmarks"), "detection": ("_detection", "examples/detection")}


def script_path(kind: str, name: str) -> Optional[Path]:
    """The file of a shipped script, or ``None`` when this installation lacks it.

    Args:
        kind: ``"bench"`` (``benchmarks/``) or ``"detection"`` (``examples/detection/``).
        name: the file name, e.g. ``"layer.py"``.

    Looks inside the installed package first, then in the checkout.
    """
    installed, checkout = _FOLDERS[kind]
    for folder in (_PACKAGE / installed, _CHECKOUT / checkout):
        if (folder / name).is_file():
            return folder / name
    return None
