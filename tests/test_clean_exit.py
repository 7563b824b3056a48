"""A finished multi-rank job exits 0: no process group outlives ``destroy_process_group``.

The failure these tests guard against (issue 17, item 7): a gloo group that is still
referenced after ``destroy_process_group`` keeps its worker threads running into
interpreter shutdown. A worker that then releases the last reference to a finished
collective's tensors must take the GIL, and a finalizing interpreter ends such a
thread inside a C++ destructor: ``terminate called without an active exception``,
SIGABRT, and torchrun reports a job that succeeded as FAILED. Two things pinned the
group: torch modules imported after ``init_process_group`` that evaluate
``group.WORLD`` in function defaults (``torch.distributed.nn.functional``, which
torch._dynamo imports), and state kept per process group. The race itself is rare
per run (``benchmarks/clean_exit.py`` counts it over many runs); what is tested here
is deterministic: the group is freed, and the test pool fails on any bad exit.
"""

from __future__ import annotations

import atexit
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.distributed as dist

import distnorm
from tests._dist import Pool, WorkerExitError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the test pool sees every bad exit --------------------------------------------------
def _exit_now(rank: int, world: int, code: int) -> None:
    os._exit(code)


def _abort_at_exit(rank: int, world: int) -> str:
    atexit.register(os.abort)  # as a C++ std::terminate at interpreter shutdown would
    return "ok"


def test_pool_fails_on_a_rank_that_dies_or_aborts_at_exit():
    pool = Pool(1)
    try:
        with pytest.raises(WorkerExitError, match="exit code 3"):
            pool.run(_exit_now, 3, timeout=60)
        # The pool restarted; this job succeeds, then the rank aborts at exit.
        assert pool.run(_abort_at_exit, timeout=60) == ["ok"]
    except BaseException:
        pool.close(graceful=False)
        raise
    with pytest.raises(WorkerExitError, match="SIGABRT"):
        pool.close()


# -- nothing keeps a destroyed group alive ----------------------------------------------
_SCRIPT = textwrap.dedent("""
    import gc, os, sys, weakref
    import torch
    import distnorm  # first, as a script does: before init_process_group
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    t = torch.ones(3)
    dist.all_reduce(t)
    # What torch._dynamo imports (DDP and torch.compile import dynamo on first use):
    # imported now, it would capture the group in its functions' defaults.
    import torch.distributed.nn.functional  # noqa: F401
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    print("freed" if group() is None else "alive")
""")


def test_importing_distnorm_first_keeps_destroy_process_group_effective(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "init")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "freed", (
        "the default process group is still referenced after destroy_process_group: "
        "its gloo threads would run into interpreter shutdown\n" + proc.stderr[-3000:])


@pytest.mark.parametrize("initialized", [False, True])
def test_import_before_init_imports_only_while_there_is_no_group(monkeypatch, initialized):
    # Importing once a group exists would capture it: the helper must not.
    imported = []
    monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    monkeypatch.delitem(sys.modules, "torch.distributed.nn.functional", raising=False)
    distnorm.distributed.import_before_init()
    assert imported == ([] if initialized else ["torch.distributed.nn.functional"])


def _train_then_destroy_group(rank: int, world: int) -> bool:
    group = dist.new_group(list(range(world)))
    layer = distnorm.SyncBatchNorm(3, process_group=group).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    layer(x).square().sum().backward()
    with torch.no_grad():
        layer(x)
    ref = weakref.ref(group)
    dist.destroy_process_group(group)
    del layer, x, group
    gc.collect()
    return ref() is None


def test_synced_layers_keep_no_reference_to_a_destroyed_group(world2):
    assert world2.run(_train_then_destroy_group) == [True, True], (
        "a process group is still referenced after the model was dropped and the group "
        "destroyed: distnorm keeps it (e.g. module-level state keyed by the group)")


def _keep_loss_then_destroy_group(rank: int, world: int) -> bool:
    group = dist.new_group(list(range(world)))
    layer = distnorm.SyncBatchNorm(3, process_group=group).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    loss = layer(x).square().sum()  # a script's last loss stays referenced to its end
    loss.backward()
    ref = weakref.ref(group)
    layer.process_group = None  # the layer's own reference is the user's to drop
    dist.destroy_process_group(group)
    del group
    gc.collect()
    freed = ref() is None
    del loss
    return freed


def test_a_kept_output_keeps_no_destroyed_group_alive(world2):
    assert world2.run(_keep_loss_then_destroy_group) == [True, True]

