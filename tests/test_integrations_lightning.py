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
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm
from tests._integration import LR, SHARDS, assert_states_match, batches
from tests._integration import net as make_net
from tests._integration import reference_state, shard, torchrun

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return batches(seed=1)


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
            self.net = make_net()

        def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            seen.setdefault("train", [type(m).__name__ for m in self.net
                                      if "Norm" in type(m).__name__])
            x, y = batch
            # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
            return F.cross_entropy(self.net(x), y, reduction="sum") * (world / sum(SHARDS))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Module()
    loader = DataLoader([shard(b, rank) for b in _batches()], batch_size=None)
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
    results = torchrun([__file__, "--out", str(tmp_path), "--mode", "sync"], tmp_path)

    def converted_then_reverted(result: Dict[str, Any]) -> None:
        assert result["train"] == ["SyncBatchNorm", "SyncBatchNorm"], result["train"]
        assert result["after"] == ["BatchNorm2d", "BatchNorm2d"], result["after"]

    assert_states_match(results, reference_state(make_net(), _batches()), converted_then_reverted)


# -- the plugin without processes ------------------------------------------------------

needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")


@needs_lightning
@pytest.mark.parametrize("mode", sorted(distnorm.variants()))
def test_apply_then_revert_round_trips(mode: str) -> None:
    from distnorm.integrations.lightning import DistnormSync

    net = make_net()
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

    net = DistnormSync(mode="cbn", window=7).apply(make_net())
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
        net = DistnormSync(mode="sync", group_size=group_size).apply(make_net())
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
