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
