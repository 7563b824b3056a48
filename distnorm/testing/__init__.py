"""Multi-rank test harness and oracles for your own models.

"Does my converted model train like BatchNorm on the big batch?" —
:func:`assert_matches_big_batch` answers it for any model, on real gloo ranks on this
machine (CPU, no GPU needed)::

    import functools, torch
    from distnorm.testing import assert_matches_big_batch, split_batches

    def make_model():                      # module-level: every rank calls it
        torch.manual_seed(0)
        return MyNet()                     # with plain torch.nn.BatchNorm*d layers

    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    report = assert_matches_big_batch(make_model, split_batches(batches, [3, 5]))
    print(report)                          # max differences per category, all ~1e-15

What is here:

* :func:`spawn_ranks` — run ``fn(rank, world, *args)`` on ``world`` fresh gloo
  processes and get each rank's return value; every rank's exit code is checked
  (an abort at interpreter exit fails it, as torchrun would);
* :class:`RankPool` — the same ranks kept alive across many jobs (a test session's);
* :func:`compare_to_big_batch` / :func:`assert_matches_big_batch` — the big-batch
  oracle: a converted copy trained on W ranks with uneven shards against the plain
  copy on the concatenated batch, both float64; a :class:`BigBatchReport` of the
  largest differences of outputs, input and parameter gradients, parameters, running
  statistics and eval outputs;
* :func:`split_batch` / :func:`split_batches` — cut batches into per-rank shards.

distnorm's own test suite uses these; nothing else in distnorm imports them.
"""

from ..launch.local import SpawnError
from ..launch.local import spawn as spawn_ranks
from .big_batch import (CATEGORIES, BigBatchReport, assert_matches_big_batch, compare_to_big_batch,
                        default_loss, split_batch, split_batches)
from .pool import RankPool, WorkerError, WorkerExitError

__all__ = ["CATEGORIES", "BigBatchReport", "RankPool", "SpawnError", "WorkerError", "WorkerExitError",
           "assert_matches_big_batch", "compare_to_big_batch", "default_loss", "spawn_ranks",
           "split_batch", "split_batches"]
