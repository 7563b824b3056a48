"""What the GPU benchmark (``gpu.py``) measures and how often: shapes, dtypes,
candidates, the issue's targets, repetitions. No torch import at module level."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# In the current directory: never the checkout's committed results (refreshed only with
# --out benchmarks/results).
DEFAULT_OUT = "distnorm-bench-results"

# (C, H, W) of a layer's input: ResNet-50's stages at 224 px and an FPN level of a
# detector at 800×1216 px; in the order they run (a run out of time skips the last).
LAYER_SHAPES: list[tuple[int, int, int]] = [(256, 56, 56), (256, 100, 152), (2048, 7, 7),
                                            (64, 56, 56), (1024, 14, 14), (512, 28, 28)]
QUICK_LAYER_SHAPES = LAYER_SHAPES[:3]
SMOKE_LAYER_SHAPES = [(8, 6, 6), (16, 3, 3)]
BATCHES = (2, 32)
SMOKE_BATCHES = (2, 4)
# dtype key -> (torch dtype name, memory format name, label)
DTYPES = {"fp32": ("float32", "contiguous_format", "float32 NCHW"),
          "bf16_cl": ("bfloat16", "channels_last", "bf16 channels_last")}
# ResNet-50 steps: batch 2 and 32, float32 and bf16 channels_last; the last one is
# the first skipped when time runs out.
MODEL_CONFIGS: list[tuple[int, str]] = [(2, "fp32"), (2, "bf16_cl"), (32, "bf16_cl"), (32, "fp32")]
# bf16 autocast runs every line float32 does, and a smoke run must stay short.
SMOKE_MODEL_CONFIGS: list[tuple[int, str]] = [(2, "bf16_cl")]

BN_CANDIDATES = ("local", "torch", "distnorm")
LAYER_CANDIDATES = BN_CANDIDATES + ("floor",)
MODEL_CANDIDATES = BN_CANDIDATES
LABELS = {"local": "local BN", "torch": "torch SyncBN", "distnorm": "distnorm", "floor": "floor"}

# The synced variants whose kernels and host syncs are counted per layer (one shape
# per dtype): convert_model mode -> label. "cbn" runs without a producer (ρ = 0, the
# window average); "bin" and "switchable" are the mixtures, whose BN part is synced.
VARIANTS = {"sync": "SyncBatchNorm", "brn": "BatchRenorm", "cmbn": "CrossMiniBatchNorm",
            "cbn": "CrossIterationBatchNorm", "bin": "BatchInstanceNorm (BN part synced)",
            "switchable": "SwitchableNorm (BN part synced)"}
VARIANT_SHAPE = (256, 56, 56)
SMOKE_VARIANT_SHAPE = (8, 6, 6)
VARIANT_BATCH = 2
# CrossMiniBatchNorm's cycle: counts are averaged over whole cycles.
VARIANT_STEPS = 4

# The compulsory traffic of a BatchNorm forward + backward, in passes over the
# activation (its dtype): read x, write y; read dy and x, write dx. The "achieved
# bandwidth" is that many bytes over the step's time (an effective bandwidth). An
# implementation whose every direction reads its input once for the sums and again
# for the elementwise pass moves 8 passes, so it tops out at 5/8 of the memory's peak.
IDEAL_PASSES = 5

# The targets (ResNet-50 step, one-rank NCCL group, synchronisation forced).
TARGET_EAGER = 0.5     # (distnorm − local) ≤ 0.5 × (torch − local), eager
TARGET_GRAPHED = 1.0   # (distnorm − local) ≤ 1.0 × (torch − local), graphed
TARGET_KERNELS = 10    # GPU kernels per layer forward + backward
TARGET_SYNCS = 0       # host synchronizations per layer forward + backward
TARGET_OWN_KERNELS = 6     # issue 22: SyncBatchNorm's own kernels per forward + backward ...
TARGET_COLLECTIVES = 2     # ... plus its two collectives
TARGET_MEMORY = 1.02   # a step's peak memory (above what it starts with) ≤ 1.02 × local BN's

# Issue 25: distnorm.precise_bn over B batches of a synced ResNet-50 at 2 images per
# rank costs at most this many times B plain training-mode forwards under no_grad.
TARGET_PRECISE_BN = 1.2
PRECISE_BN_BATCH = 2
PRECISE_BN_CANDIDATES = ("forward", "precise_bn")
# Seconds kept at the end of a full (quick) run's budget for the precise_bn item, last
# in the plan: at ~10 ms a forward, 2 × (1 + reps) passes of 200 (20) batches.
PRECISE_BN_RESERVE_S = 20.0
QUICK_PRECISE_BN_RESERVE_S = 8.0

# Graphed vs eager step from the same state: the largest relative differences still
# called equal (loss; parameter update; running statistics), per dtype. cuDNN's
# backward kernels are not bitwise deterministic, so local BN's own graphed-vs-eager
# difference is shown beside distnorm's as the noise floor.
EQUAL_TOL = {"fp32": 1e-4, "bf16_cl": 2e-2}

MAX_RESTARTS = 4
# Seconds an item may run before its worker dumps every thread's stack and exits (a
# hang, e.g. in a collective); the first ResNet-50 item also compiles distnorm's kernels.
ITEM_TIMEOUT = {"model": 180.0, "model_counts": 120.0, "layer": 60.0, "layer_counts": 60.0,
                "variant_counts": 90.0, "communicator": 60.0, "precise_bn": 150.0}


@dataclass


class Settings:
    """Repetitions and sizes of one run (see :func:`settings_for`)."""

    layer_warmup: int
    layer_reps: int
    replay_warmup: int
    replay_reps: int
    capture_warmup: int
    model_warmup: int
    model_reps: int
    model_replay_reps: int
    layer_profile_steps: int
    model_profile_steps: int
    image_size: int
    # SGD's learning rate: small, so that some fifty steps on one fixed batch neither
    # diverge nor memorize it (the graph check then compares real gradients). At the
    # smoke run's 32 px, ResNet-50's last stage normalizes 2 values per channel, whose
    # gradients explode at any larger rate.
    lr: float
    # The precise_bn item: B batches per pass, timed passes of each case.
    precise_bn_batches: int = 200
    precise_bn_reps: int = 3


def settings_for(smoke: bool, quick: bool, reps: int | None) -> Settings:
    """The repetitions of a ``--smoke``, ``--quick`` or full run (``reps`` overrides the
    timed eager repetitions; replays are twice as many)."""
    if smoke:
        s = Settings(1, 2, 0, 2, 1, 0, 1, 1, 1, 1, 32, 1e-5, 2, 1)
    elif quick:
        s = Settings(3, 10, 3, 20, 3, 2, 8, 10, 2, 1, 224, 1e-4, 20, 2)
    else:
        s = Settings(5, 25, 5, 50, 3, 3, 15, 25, 3, 1, 224, 1e-4, 200, 3)
    if reps:
        s.layer_reps = s.model_reps = reps
        s.replay_reps = s.model_replay_reps = 2 * reps
    return s


def dtype_of(key: str) -> tuple[Any, Any]:
    """``(torch dtype, memory format)`` of a :data:`DTYPES` key."""
    import torch

    dtype, fmt, _ = DTYPES[key]
    return getattr(torch, dtype), getattr(torch, fmt)


def item_row(item: dict[str, Any], candidate: str) -> dict[str, Any]:
    """The row of one candidate in one item (its results are added to it)."""
    row = {"kind": item["kind"].replace("_counts", ""), "candidate": candidate,
           "batch": item["batch"], "dtype": item["dtype"], "errors": {}}
    if "shape" in item:
        row["shape"] = [item["batch"], *item["shape"]]
    return row
