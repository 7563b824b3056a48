"""Lightning: ``Trainer(strategy="ddp", plugins=[DistnormSync(...)])``.

The multi-rank test runs Lightning's own ``Trainer.fit`` with ``strategy="ddp"`` on 2
CPU processes. Lightning's ddp strategy launches its processes by re-running the
script, which inside pytest would re-run pytest; so this file doubles as the training
script and is started under ``python -m torch.distributed.run --nproc_per_node=2``,
where Lightning sees torchrun's variables and starts nothing itself. Every rank writes
its result file; the test checks torchrun's exit status (non-zero if any rank failed)
and that both files exist.

Loss convention (see tests/test_ddp.py): rank r minimises (W/B)·Σ_{i∈r} ℓ_i, B the
global batch, so DDP's gradient average applies the gradient of the mean over the
concatenated batch. Everything runs in float64 (``precision="64-true"``), and the
weights and running statistics after ``fit`` equal those of the unconverted model
trained on the concatenated batch to ~1e-12.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
ROOT = Path(__file__).resolve().parents[1]
SHARDS = (3, 5)     # uneven on purpose: statistics must be count-weighted
STEPS = 2
LR = 0.1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    total = sum(SHARDS)
    return [(torch.randn(total, 3, 6, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3,
             torch.randint(0, 3, (total,), generator=gen)) for _ in range(STEPS)]


def _shard(batch: Tuple[torch.Tensor, torch.Tensor], rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    start = sum(SHARDS[:rank])
    return batch[0][start:start + SHARDS[rank]], batch[1][start:start + SHARDS[rank]]


def _reference() -> Dict[str, torch.Tensor]:
    """The unconverted net, one process, the concatenated batch, mean loss."""
    net = _net().train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for x, y in _batches():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.state_dict()


def _fit(out: Path, mode: str) -> None:
    """One rank of the torchrun job: Lightning's Trainer.fit with DistnormSync."""
    import lightning as L
    from torch.utils.data import DataLoader

    from distnorm.integrations.lightning import DistnormSync

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seen: Dict[str, List[str]] = {}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            seen.setdefault("train", [type(m).__name__ for m in self.net
                                      if "Norm" in type(m).__name__])
            x, y = batch
            # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
            return F.cross_entropy(self.net(x), y, reduction="sum") * (world / sum(SHARDS))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Module()
    loader = DataLoader([_shard(b, rank) for b in _batches()], batch_size=None)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=world, precision="64-true",
                        plugins=[DistnormSync(mode=mode)], max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, loader)
    after = [type(m).__name__ for m in module.net if "Norm" in type(m).__name__]
    torch.save({"train": seen["train"], "after": after, "state": module.net.state_dict()},
               out / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed (pip install -e '.[dev]')")
def test_trainer_fit_ddp_matches_batch_norm_on_concatenated_batch(tmp_path: Path) -> None:
    world = len(SHARDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, "--out", str(tmp_path), "--mode", "sync"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result:\n{proc.stderr[-4000:]}"
        results.append(torch.load(path))

    expected = _reference()
    for rank, result in enumerate(results):
        # Converted while fitting, reverted to plain BatchNorm afterwards.
        assert result["train"] == ["SyncBatchNorm", "SyncBatchNorm"], result["train"]
        assert result["after"] == ["BatchNorm2d", "BatchNorm2d"], result["after"]
        assert result["state"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {name} differs from the reference")


# -- the plugin without processes ------------------------------------------------------

needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")


@needs_lightning
@pytest.mark.parametrize("mode", sorted(distnorm.variants()))
def test_apply_then_revert_round_trips(mode: str) -> None:
    from distnorm.integrations.lightning import DistnormSync

    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plugin = DistnormSync(mode=mode)
    net = plugin.apply(net)
    assert isinstance(net[1], distnorm.variants()[mode]) and isinstance(net[4], distnorm.variants()[mode])
    net = plugin.revert(net)
    if mode in ("gn", "bin", "switchable"):
        # BatchNorm cannot hold GroupNorm's function or a mixture's learned parameters:
        # the plugin keeps these layers instead of failing or losing them at fit's end.
        assert isinstance(net[1], distnorm.variants()[mode])
        return
    assert type(net[1]) is nn.BatchNorm2d and type(net[4]) is nn.BatchNorm2d
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


@needs_lightning
def test_options_reach_the_layers_and_are_checked_early() -> None:
    from distnorm.integrations.lightning import DistnormSync

    net = DistnormSync(mode="cbn", window=7).apply(_net())
    assert net[1].window == 7
    with pytest.raises(TypeError, match="window"):
        DistnormSync(mode="sync", window=7)
    with pytest.raises(ValueError, match="unknown mode"):
        DistnormSync(mode="syncbn")
    assert repr(DistnormSync("brn", r_max=2.0)) == "DistnormSync(mode='brn', r_max=2.0)"


@needs_lightning
@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_both_trainers_take_the_plugin_and_reject_sync_batchnorm(package: str) -> None:
    if importlib.util.find_spec(package.split(".")[0]) is None:
        pytest.skip(f"{package} is not installed")
    from distnorm.integrations.lightning import CONFLICT_MESSAGE, DistnormSync

    pl = importlib.import_module(package)
    kwargs = dict(strategy="ddp", accelerator="cpu", devices=2, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False)
    plugin = DistnormSync(mode="sync")
    trainer = pl.Trainer(plugins=[plugin], **kwargs)
    assert trainer.strategy._layer_sync is plugin
    with pytest.raises(Exception, match="Drop sync_batchnorm=True") as info:
        pl.Trainer(plugins=[plugin], sync_batchnorm=True, **kwargs)
    assert type(info.value).__name__ == "MisconfigurationException"
    assert str(info.value) == CONFLICT_MESSAGE
    # Lightning's own sync_batchnorm=True alone is untouched.
    trainer = pl.Trainer(sync_batchnorm=True, **kwargs)
    assert type(trainer.strategy._layer_sync).__name__ == "TorchSyncBatchNorm"


def _group_size_job(rank: int, world: int) -> List[int]:
    import torch.distributed as dist

    from distnorm.integrations.lightning import DistnormSync

    sizes = []
    for group_size in (1, world):   # apply() creates the groups collectively, on every rank
        net = DistnormSync(mode="sync", group_size=group_size).apply(_net())
        sizes.append(dist.get_world_size(net[1].process_group))
        assert net[4].process_group is net[1].process_group
    return sizes


@needs_lightning
def test_group_size_makes_the_groups_when_fit_starts(world2) -> None:
    assert world2.run(_group_size_job) == [[1, 2], [1, 2]]
    with pytest.raises(ValueError, match="group_size or process_group"):
        from distnorm.integrations.lightning import DistnormSync

        DistnormSync(group_size=2, process_group=None)


if __name__ == "__main__":  # one rank of the torchrun job started by the test above
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="sync")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _fit(args.out, args.mode)
