"""The table of variants ``convert_model`` can build, keyed by mode name.

This module is the bottom floor of the package: it imports nothing of distnorm,
so every layer module can register itself here while ``convert.py`` (the
top-level API) imports the layers and reads the table, without an import circle.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, TypeVar

__all__ = ["register_variant", "revertible_variants", "variant", "variants"]

#: mode -> (layer class, whether convert_model may take it as a source and
#: revert_model may turn it back into BatchNorm).
_VARIANTS: Dict[str, Tuple[type, bool]] = {}
T = TypeVar("T", bound=type)


def register_variant(mode: str, *, revertible: bool = True) -> Callable[[T], T]:
    """Class decorator: make a layer class the target of ``convert_model(mode=mode)``.

    The class provides ``from_batch_norm(bn, process_group=None, **options)``,
    returning a layer that shares ``bn``'s parameters and buffers, and — when
    ``revertible`` — ``to_batch_norm()``, the plain BatchNorm it goes back to.

    Raises:
        ValueError: ``mode`` is already registered to another class.
    """
    def decorate(cls: T) -> T:
        if mode in _VARIANTS and _VARIANTS[mode][0] is not cls:
            raise ValueError(f"mode {mode!r} is already registered to {_VARIANTS[mode][0].__name__}")
        _VARIANTS[mode] = (cls, revertible)
        return cls
    return decorate


def variants() -> Dict[str, type]:
    """The registered modes and their layer classes.

    ``import distnorm`` registers the built-in ones (``"sync"``, ``"cbn"``, ...).
    """
    return {mode: cls for mode, (cls, _) in _VARIANTS.items()}


def variant(mode: str) -> type:
    """The layer class registered for ``mode``.

    Raises:
        ValueError: ``mode`` is not registered; the message lists the valid modes.
    """
    if mode not in _VARIANTS:
        raise ValueError(f"unknown mode {mode!r}; valid modes are: "
                         + ", ".join(repr(m) for m in sorted(_VARIANTS)))
    return _VARIANTS[mode][0]


def revertible_variants() -> Tuple[type, ...]:
    """The registered classes that convert back to BatchNorm (``revertible=True``)."""
    return tuple(cls for cls, revertible in _VARIANTS.values() if revertible)
