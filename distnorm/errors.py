"""The errors distnorm raises when ranks cannot agree: never a hang, never garbage."""

from __future__ import annotations

from typing import Any

__all__ = ["NonFiniteError", "SyncError", "layer_name"]


def layer_name(layer: Any) -> str:
    """``"SyncBatchNorm 'layer1.0.bn1'"``: the class and, when ``convert_model``
    recorded it, the layer's qualified name in its model."""
    name = getattr(layer, "_distnorm_name", None)
    kind = type(layer).__name__
    return f"{kind} '{name}'" if name else kind


class SyncError(RuntimeError):
    """Ranks of a process group disagree about a synced layer's collective, or the
    collective itself failed (a peer died, timed out, or is elsewhere in the model).

    The message names the layer (its qualified name in the model when
    ``convert_model`` made it) and, where known, the ranks involved.
    """


class NonFiniteError(SyncError):
    """A rank's input to a synced layer holds NaN or Inf.

    Raised on every rank of the group (the statistics are shared, so every rank
    learns of it), naming the layer and the offending ranks. Set the layer's
    ``nonfinite="skip"`` to leave such ranks out of the group statistics instead.
    """
