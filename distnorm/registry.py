"""The table of variants ``convert_model`` can build, keyed by mode name.

This module is the bottom floor of the package: it imports nothing of distnorm,
so every layer module can register itself here while ``convert.py`` (the
top-level API) imports the layers and reads the table, without an import circle.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple, TypeVar

__all__ = ["register_variant", "resolve_mode", "revertible_variants", "variant", "variants"]

#: mode -> (layer class, whether convert_model may take it as a source and
#: revert_model may turn it back into BatchNorm).
_VARIANTS: Dict[str, Tuple[type, bool]] = {}
#: other name -> mode: names convert_model also accepts (not listed by variants()).
_ALIASES: Dict[str, str] = {}
T = TypeVar("T", bound=type)


def register_variant(mode: str, *, revertible: bool = True,
                     aliases: Sequence[str] = ()) -> Callable[[T], T]:
    """Class decorator: make a layer class the target of ``convert_model(mode=mode)``.

    The class provides ``from_batch_norm(bn, process_group=None, **options)``,
    returning a layer that shares ``bn``'s parameters and buffers, and — when
    ``revertible`` — ``to_batch_norm()``, the plain BatchNorm it goes back to.
    ``aliases`` are further names ``convert_model`` accepts for the same mode
    (``"cross_iteration"`` for ``"cbn"``); :func:`variants` lists ``mode`` only.

    Raises:
        ValueError: ``mode`` or an alias is already registered to another class.
    """
    def decorate(cls: T) -> T:
        for name in (mode, *aliases):
            owner = _VARIANTS.get(_ALIASES.get(name, name), (None,))[0]
            if owner is not None and owner is not cls:
                raise ValueError(f"mode {name!r} is already registered to {owner.__name__}")
        _VARIANTS[mode] = (cls, revertible)
        _ALIASES.update((alias, mode) for alias in aliases)
        return cls
    return decorate


def variants() -> Dict[str, type]:
    """The registered modes and their layer classes.

    ``import distnorm`` registers the built-in ones (``"sync"``, ``"cbn"``, ...).
    """
    return {mode: cls for mode, (cls, _) in _VARIANTS.items()}


def resolve_mode(mode: str) -> str:
    """``mode`` itself, or the mode it is an alias of.

    Raises:
        ValueError: ``mode`` is not registered; the message lists the valid modes.
    """
    name = _ALIASES.get(mode, mode)
    if name not in _VARIANTS:
        aliases = "".join(f", {a!r} for {m!r}" for a, m in sorted(_ALIASES.items()))
        raise ValueError(f"unknown mode {mode!r}; valid modes are: "
                         + ", ".join(repr(m) for m in sorted(_VARIANTS))
                         + (f" (also{aliases[1:]})" if aliases else ""))
    return name


def variant(mode: str) -> type:
    """The layer class registered for ``mode`` (or an alias of it).

    Raises:
        ValueError: ``mode`` is not registered; the message lists the valid modes.
    """
    return _VARIANTS[resolve_mode(mode)][0]


def revertible_variants() -> Tuple[type, ...]:
    """The registered classes that convert back to BatchNorm (``revertible=True``)."""
    return tuple(cls for cls, revertible in _VARIANTS.values() if revertible)
