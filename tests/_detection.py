"""Helpers for the tests of the detection job (examples/detection/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "examples" / "detection"
TRAIN = DETECTION / "train.py"

# Small enough for a CI machine with 2 shared cores: 64-px canvases, a handful of images.
TINY = ["--image-size", "64", "--train-images", "16", "--max-objects", "2", "--no-progress",
        "--threads", "1"]


def load_train() -> ModuleType:
    """examples/detection/train.py as a module (it puts its own folder on sys.path)."""
    name = "distnorm_example_detection_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAIN)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
