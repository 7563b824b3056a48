"""Optional packages the benchmark tests look for, probed the way the scripts import them."""

import importlib
import warnings


def has_fairscale() -> bool:
    """Whether fairscale's SyncBatchNorm imports here (the benchmarks skip it otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importlib.import_module("fairscale.experimental.nn")
        except Exception:  # noqa: BLE001 - missing or broken: the column is skipped
            return False
    return True


def has_cxx_compiler() -> bool:
    """Whether TorchInductor can build distnorm's CPU kernels here (it needs a C++
    compiler; without one distnorm falls back to eager ops, with a warning)."""
    import shutil

    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))
