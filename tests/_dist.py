"""The tests' pool of real gloo ranks: :class:`distnorm.testing.RankPool` (one copy,
public, so that users can run the same harness on their own models).

tests/conftest.py starts one pool per world size for the session (``world2``,
``world3``); every rank's exit code is checked at teardown.
"""

from __future__ import annotations

from distnorm.testing.pool import (EXIT_TIMEOUT_S, TIMEOUT_S, RankPool, WorkerError, WorkerExitError,
                                   describe_exit)

# The name the tests have always used.
Pool = RankPool

__all__ = ["EXIT_TIMEOUT_S", "Pool", "TIMEOUT_S", "WorkerError", "WorkerExitError", "describe_exit"]
