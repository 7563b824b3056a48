"""Schedules of a value over training steps, for ``BatchRenorm``'s ``r_max`` / ``d_max``.

A schedule maps the layer's step (its ``num_batches_tracked`` before the current
training forward, docs/algorithms.md §2) to a value. The classes here accept the step
as a Python number *or* as a 0-dim tensor: given the layer's step tensor they
compute with torch ops on its device, so a training forward needs no host
synchronisation (and compiles without a graph break). They also declare the range
of values they can take (:meth:`Schedule.bounds`), which lets the layer validate
them once, at construction, instead of reading every value back to the host.

Any other callable ``step -> float`` works too; ``BatchRenorm`` then calls it with
the step as a Python ``int`` (one host read per training forward) and checks each
value it returns.

Example::

    >>> bn = distnorm.BatchRenorm(64, **distnorm.schedules.paper_schedule(steps_scale=0.1))
    >>> distnorm.schedules.paper_r_max()(10_000)
    1.2857142857142856
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["LinearRamp", "Schedule", "paper_d_max", "paper_r_max", "paper_schedule"]

Step = Union[int, float, Tensor]

# The schedule of Ioffe (NeurIPS 2017, §4, ImageNet): r_max = 1 and d_max = 0 for the
# first 5k steps, then linear ramps to r_max = 3 at 40k steps and d_max = 5 at 25k.
_PAPER_RELAX_FROM = 5_000
_PAPER_R_MAX_AT = 40_000
_PAPER_D_MAX_AT = 25_000


class Schedule:
    """Base class of device-friendly schedules.

    Subclasses implement :meth:`__call__` for a Python number (returning a
    ``float``) and for a 0-dim tensor (returning a 0-dim floating tensor on the
    same device, computed with torch ops only), and :meth:`bounds`.
    """

    def __call__(self, step: Step) -> Union[float, Tensor]:
        raise NotImplementedError

    def bounds(self) -> Optional[Tuple[float, float]]:
        """``(lowest, highest)`` value over all steps ≥ 0, or ``None`` if unknown.

        A layer validates a schedule with known bounds once; one with unknown bounds
        is called with a Python ``int`` step and each value is checked.
        """
        return None


class LinearRamp(Schedule):
    r"""``start_value`` up to ``start_step``, linear to ``end_value`` at ``end_step``, then flat.

    .. math::
        v(s) = v_0 + (v_1 - v_0)\,\mathrm{clip}\!\left(\frac{s - s_0}{s_1 - s_0}, 0, 1\right)

    With ``start_step == end_step`` the value jumps from ``start_value`` to
    ``end_value`` at that step.

    Args:
        start_value: ``v_0``, the value for steps ``≤ start_step``.
        end_value: ``v_1``, the value for steps ``≥ end_step``.
        start_step: ``s_0 ≥ 0``.
        end_step: ``s_1 ≥ s_0``.

    Example::

        >>> ramp = LinearRamp(1.0, 3.0, start_step=500, end_step=4_000)
        >>> ramp(0), ramp(2_250), ramp(10_000)
        (1.0, 2.0, 3.0)
    """

    def __init__(self, start_value: float, end_value: float, start_step: float,
                 end_step: float) -> None:
        for name, value in (("start_value", start_value), ("end_value", end_value),
                            ("start_step", start_step), ("end_step", end_step)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"LinearRamp: {name} must be a finite number (got {value!r})")
        if start_step < 0 or end_step < start_step:
            raise ValueError(f"LinearRamp: expected 0 <= start_step <= end_step "
                             f"(got start_step={start_step}, end_step={end_step})")
        self.start_value = float(start_value)
        self.end_value = float(end_value)
        self.start_step = float(start_step)
        self.end_step = float(end_step)

    def __call__(self, step: Step) -> Union[float, Tensor]:
        span = self.end_step - self.start_step
        delta = self.end_value - self.start_value
        if isinstance(step, Tensor):
            # float64 keeps the value exact enough to compare with a host computation;
            # MPS has no float64.
            dtype = torch.float32 if step.device.type == "mps" else torch.float64
            s = step.to(dtype)
            if span == 0:
                frac = (s >= self.end_step).to(dtype)
            else:
                frac = ((s - self.start_step) / span).clamp(0.0, 1.0)
            return frac * delta + self.start_value
        if span == 0:
            frac = 1.0 if step >= self.end_step else 0.0
        else:
            frac = min(max((step - self.start_step) / span, 0.0), 1.0)
        return self.start_value + delta * frac

    def bounds(self) -> Tuple[float, float]:
        return (min(self.start_value, self.end_value), max(self.start_value, self.end_value))

    def __repr__(self) -> str:
        return (f"LinearRamp({self.start_value:g}, {self.end_value:g}, "
                f"start_step={self.start_step:g}, end_step={self.end_step:g})")


def _check_scale(steps_scale: float) -> float:
    if isinstance(steps_scale, bool) or not isinstance(steps_scale, (int, float)) \
            or not math.isfinite(steps_scale) or steps_scale <= 0:
        raise ValueError(f"steps_scale must be a positive finite number (got {steps_scale!r})")
    return float(steps_scale)


def paper_r_max(steps_scale: float = 1.0) -> LinearRamp:
    """The paper's ``r_max``: 1 for 5k steps, then linear to 3 at 40k steps.

    Args:
        steps_scale: multiplies the paper's step counts, to express them in your own
            training length (e.g. ``your_total_steps / paper_total_steps``; 0.1 gives
            1 until step 500, 3 from step 4000). For other shapes build a
            :class:`LinearRamp` directly.
    """
    scale = _check_scale(steps_scale)
    return LinearRamp(1.0, 3.0, _PAPER_RELAX_FROM * scale, _PAPER_R_MAX_AT * scale)


def paper_d_max(steps_scale: float = 1.0) -> LinearRamp:
    """The paper's ``d_max``: 0 for 5k steps, then linear to 5 at 25k steps.

    Args:
        steps_scale: multiplies the paper's step counts (see :func:`paper_r_max`).
    """
    scale = _check_scale(steps_scale)
    return LinearRamp(0.0, 5.0, _PAPER_RELAX_FROM * scale, _PAPER_D_MAX_AT * scale)


def paper_schedule(steps_scale: float = 1.0) -> Dict[str, LinearRamp]:
    """``{"r_max": paper_r_max(s), "d_max": paper_d_max(s)}``, ready for ``**`` into
    ``BatchRenorm`` or ``convert_model(mode="brn", ...)``."""
    return {"r_max": paper_r_max(steps_scale), "d_max": paper_d_max(steps_scale)}
