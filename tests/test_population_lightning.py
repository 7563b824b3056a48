"""Lightning: ``Trainer(callbacks=[PreciseBN(num_batches=N)])`` on 2 ddp ranks.

As in tests/test_integrations_lightning.py, this file doubles as the training script,
started under ``python -m torch.distributed.run --nproc_per_node=2`` (Lightning's ddp
strategy would otherwise re-run pytest). Each rank trains a float64 net converted by
``DistnormSync`` for 3 steps on uneven shards; before the validation at the end of the
epoch the callback recomputes the statistics on the first 2 training batches of each
rank. The LightningModule's own ``on_validation_start`` (called after the callbacks')
records the weights and buffers; the test recomputes, in one process, the union of
every BatchNorm input of those 2 rounds (each round: the concatenation of the ranks'
shards through the plain net in training mode) and compares.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._integration import SHARDS, batches, shard, torchrun
from tests._integration import net as make_net

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
STEPS, PRECISE_BATCHES = 3, 2


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return batches(seed=5, steps=STEPS)


def _fit(out: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from distnorm.integrations.lightning import DistnormSync, PreciseBN

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    recorded: Dict[str, Any] = {}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y, reduction="sum") * (world / sum(SHARDS))

        def on_validation_start(self) -> None:
            recorded["state"] = {k: v.clone() for k, v in self.net.state_dict().items()}
            recorded["training"] = [m.training for m in self.net.modules()]

        def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], index: int) -> None:
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]), sync_dist=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train = DataLoader([shard(b, rank) for b in _batches()], batch_size=None)
    val = DataLoader([shard(b, rank) for b in batches(seed=9, steps=1)], batch_size=None)
    callback = PreciseBN(num_batches=PRECISE_BATCHES)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=world, precision="64-true",
                        plugins=[DistnormSync(mode="sync")], callbacks=[callback], max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=1)
    trainer.fit(Module(), train, val)
    torch.save({"state": recorded["state"], "training": recorded["training"],
                "samples": callback.samples}, out / f"rank{rank}.pt")


def _union_oracle(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    net = make_net()
    net.load_state_dict(state)
    net.train()
    inputs: Dict[str, List[torch.Tensor]] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(
                name, []).append(args[0].transpose(0, 1).reshape(args[0].shape[1], -1)))
    with torch.no_grad():
        for x, _ in _batches()[:PRECISE_BATCHES]:  # the ranks' shards, concatenated
            net(x)
    out = {}
    for name, parts in inputs.items():
        union = torch.cat(parts, 1)
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = union.mean(1), union.var(1)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed (pip install -e '.[dev]')")
def test_precise_bn_callback_before_validation(tmp_path: Path) -> None:
    results = torchrun([__file__, "--out", str(tmp_path)], tmp_path)
    expected = _union_oracle(results[0]["state"])
    for rank, result in enumerate(results):
        assert result["samples"] == PRECISE_BATCHES * sum(SHARDS)
        assert not any(result["training"]), "validation runs in eval mode"
        for key, value in expected.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {key}")
        # num_batches_tracked counts the training steps only.
        assert int(result["state"]["1.num_batches_tracked"]) == STEPS
        for key, value in results[0]["state"].items():
            assert torch.equal(result["state"][key], value), (rank, key)


@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")
def test_precise_bn_callback_checks_num_batches() -> None:
    from distnorm.integrations.lightning import PreciseBN

    with pytest.raises(ValueError, match="num_batches"):
        PreciseBN(num_batches=0)
    assert repr(PreciseBN(num_batches=3)) == "PreciseBN(num_batches=3)"


if __name__ == "__main__":  # one rank of the torchrun job started by the test above
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _fit(args.out)
