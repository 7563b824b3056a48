"""The fault matrix's scaffolding lives beside its benchmark (``benchmarks/fault_worlds.py``,
``benchmarks/fault_scenarios.py``), outside the product package; importing this puts
that folder on ``sys.path`` so the tests import the very modules the benchmark runs,
under the same top-level names (their workers are pickled by reference, and the
fault worlds' forkserver and the pools' spawned ranks inherit ``sys.path``)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
