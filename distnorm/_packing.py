"""The layout of the moment sums ranks all-reduce, defined once.

A float64 vector ``[m, Σx (C), Σx² (C)]``: the elements per channel, then the
per-channel sums of x and of x² — 2C + 1 numbers. Such buffers add: the sum of
several ranks' (or micro-batches') buffers is the buffer of their concatenated
batch. A payload reduced in the same all-reduce (the cross-iteration layer's
compensations) follows the 2C + 1 numbers.

This module sits below :mod:`distnorm.kernels` (which writes the buffer in one
compiled pass) and :mod:`distnorm.stats` (which reads it), and imports nothing of
distnorm.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["pack_sums", "packed_size", "split_packed", "unpack_sums"]


def packed_size(channels: int) -> int:
    """Numbers in the packed sums of ``channels`` channels: 2C + 1."""
    return 2 * channels + 1


def pack_sums(count: Tensor, sum_x: Tensor, sum_sq: Tensor) -> Tensor:
    """``[m, Σx, Σx²]`` from a ``(1,)`` count and two ``(C,)`` sums (a fresh tensor)."""
    return torch.cat([count, sum_x, sum_sq])


def unpack_sums(sums: Tensor, channels: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Views ``(m, Σx, Σx²)`` of packed sums: a 0-dim count and two ``(C,)`` vectors.

    Args:
        sums: a buffer of :func:`pack_sums`.
        channels: C; ``None`` reads it from the buffer's length (no payload after it).
    """
    if channels is None:
        channels = (sums.numel() - 1) // 2
    return sums[0], sums[1:1 + channels], sums[1 + channels:1 + 2 * channels]


def split_packed(buffer: Tensor, channels: int) -> Tuple[Tensor, Tensor]:
    """The packed sums of ``channels`` channels at the head of ``buffer``, and the
    payload reduced after them."""
    size = packed_size(channels)
    return buffer[:size], buffer[size:]
