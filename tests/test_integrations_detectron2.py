"""detectron2: ``distnorm.integrations.detectron2.norm(mode, **options)``.

detectron2 is not on PyPI (it is built from its repository against the local torch),
so it is not installed here and these tests do not import it. They test the contract
its ``get_norm(norm, out_channels)`` relies on — a callable ``norm`` is called as
``norm(out_channels)`` and must return an ``nn.Module`` for ``(N, C, H, W)`` inputs —
through :func:`_get_norm`, a restatement of that contract, plus what a LazyConfig
needs of a value (pickling, deep copies, a readable repr). The 2-rank test builds a
detectron2-style head (conv → norm → ReLU, the norm made by ``get_norm``) and checks,
with one rank's batch empty as ROI heads can have, that training matches
``nn.BatchNorm2d`` on the concatenated batch.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable, Dict, List, Optional, Union

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm.integrations.detectron2 import DistnormCycleNorm, DistnormNorm, cycle_norm, norm


def _get_norm(spec: Union[str, Callable[[int], nn.Module], None], out_channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm`` contract for callables (its names are not needed here)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        return {"BN": nn.BatchNorm2d}[spec](out_channels)
    return spec(out_channels)


@pytest.mark.filterwarnings("ignore:.*does not come straight from:UserWarning")  # cbn, alone
@pytest.mark.parametrize("mode", sorted(distnorm.variants()))
def test_every_mode_builds_through_get_norm(mode: str) -> None:
    layer = _get_norm(norm(mode), 48)
    assert isinstance(layer, distnorm.variants()[mode])
    x = torch.randn(2, 48, 5, 5)
    assert layer(x).shape == x.shape
    if mode == "gn":   # largest divisor of 48 not above 32
        assert layer.num_groups == 24


def test_options_split_between_batch_norm_and_variant() -> None:
    layer = norm("brn", eps=1e-3, momentum=0.01, r_max=2.0)(16)
    assert isinstance(layer, distnorm.BatchRenorm)
    assert (layer.eps, layer.momentum) == (1e-3, 0.01) and "r_max=2.0" in repr(layer)
    layer = norm("sync", affine=False)(8)
    assert layer.weight is None
    assert norm("cbn", window=2)(8).window == 2
    with pytest.raises(ValueError, match="unknown mode"):
        norm("SyncBN")
    with pytest.raises(TypeError, match="window"):
        norm("sync", window=2)


def test_config_value_pickles_copies_and_reads() -> None:
    spec = norm("cmbn", accumulation_steps=2)
    for clone in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert isinstance(clone, DistnormNorm)
        assert clone(4).accumulation_steps == 2
    assert repr(spec) == "distnorm.integrations.detectron2.norm('cmbn', accumulation_steps=2)"


def test_revert_gives_batch_norm_2d_for_export() -> None:
    head = nn.Sequential(nn.Conv2d(3, 8, 3), _get_norm(norm("sync"), 8), nn.ReLU())
    assert type(distnorm.revert_model(head)[1]) is nn.BatchNorm2d


# -- 2 ranks, one of them with an empty batch ------------------------------------------

SHARDS = (0, 5)
STEPS = 2
LR = 0.1


def _head(spec: Union[str, Callable[[int], nn.Module]]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _get_norm(spec, 6), nn.ReLU(),
                         nn.Conv2d(6, 4, 1), _get_norm(spec, 4)).double()


def _batches() -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(sum(SHARDS), 3, 4, 4, generator=gen, dtype=torch.float64) + 0.5
            for _ in range(STEPS)]


def _train_rank(rank: int, world: int) -> Dict[str, Any]:
    head = nn.parallel.DistributedDataParallel(_head(norm("sync")))
    opt = torch.optim.SGD(head.parameters(), lr=LR)
    start = sum(SHARDS[:rank])
    for x in _batches():
        opt.zero_grad()
        # Σ over the local samples · W / B: DDP's average gives the global mean's gradient.
        loss = head(x[start:start + SHARDS[rank]]).pow(2).sum() * (world / (sum(SHARDS) * 4 * 4 * 4))
        loss.backward()
        opt.step()
    return {"state": head.module.state_dict(),
            "types": [type(m).__name__ for m in head.module if "Norm" in type(m).__name__]}


def test_synced_head_with_an_empty_rank_matches_batch_norm(world2) -> None:
    results = world2.run(_train_rank)
    reference = _head("BN")
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for x in _batches():
        opt.zero_grad()
        F.mse_loss(reference(x), torch.zeros(()).double().expand(x.shape[0], 4, 4, 4)).backward()
        opt.step()
    expected = reference.state_dict()
    for rank, result in enumerate(results):
        assert result["types"] == ["SyncBatchNorm", "SyncBatchNorm"]
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {name} differs from the reference")


# -- shared heads: cycle_norm -----------------------------------------------------------

LEVELS = 3
# Per level, per rank: rank 0 holds no image at level 1 (the shards of a level differ
# as a dataloader's last batch can).
LEVEL_SHARDS = ((2, 3), (0, 4), (3, 1))


class _CycleBatchNormList(nn.ModuleList):
    """detectron2's CycleBatchNormList restated: ``length`` BatchNorm layers with
    affine=False, used in turn, and one affine (its state_dict layout)."""

    def __init__(self, length: int, bn_class: type = nn.BatchNorm2d, **kwargs: Any) -> None:
        super().__init__([bn_class(**kwargs, affine=False) for _ in range(length)])
        channels = self[0].num_features
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._pos = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[self._pos](x)
        self._pos = (self._pos + 1) % len(self)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _shared_head(spec: Callable[[int], nn.Module]) -> nn.Module:
    """A RetinaNet-style subnet (conv → norm → ReLU, twice), built with ``spec``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _get_norm(spec, 6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), _get_norm(spec, 4)).double()


def _levels(step: int) -> List[torch.Tensor]:
    """The whole group's features of each level (FPN-like: shrinking, shifted)."""
    gen = torch.Generator().manual_seed(10 + step)
    return [torch.randn(sum(shards), 3, 8 >> level, 8 >> level, generator=gen,
                        dtype=torch.float64) * (level + 1) + level
            for level, shards in enumerate(LEVEL_SHARDS)]


def _level_loss(outputs: List[torch.Tensor]) -> torch.Tensor:
    return sum(y.pow(2).sum() for y in outputs) / 100.0


def _train_shared_head(rank: int, world: int) -> Dict[str, Any]:
    head = nn.parallel.DistributedDataParallel(_shared_head(cycle_norm(LEVELS, "sync")))
    opt = torch.optim.SGD(head.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        local = [x[sum(s[:rank]):sum(s[:rank + 1])] for x, s in zip(_levels(step), LEVEL_SHARDS)]
        # DDP averages over the ranks: × world gives the gradient of the global sum.
        (_level_loss([head(x) for x in local]) * world).backward()
        opt.step()
    return {"state": head.module.state_dict(), "types": [type(m).__name__ for m in head.module]}


def test_cycle_norm_builds_pickles_and_reads() -> None:
    spec = cycle_norm(5, "brn", r_max=2.0, momentum=0.01)
    layer = _get_norm(spec, 8)
    assert isinstance(layer, distnorm.CycleBatchNorm) and layer.length == 5
    assert (layer.mode, layer.momentum, layer.levels[4].r_max) == ("brn", 0.01, 2.0)
    for clone in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert isinstance(clone, DistnormCycleNorm) and clone(4).length == 5
    assert repr(spec) == ("distnorm.integrations.detectron2.cycle_norm(5, 'brn', r_max=2.0, "
                          "momentum=0.01)")
    with pytest.raises(ValueError, match="length must be"):
        cycle_norm(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        cycle_norm(5, "gn")
    with pytest.raises(TypeError, match="window"):
        cycle_norm(5, "sync", window=2)


def test_detectron2_cycle_list_checkpoint_loads_and_its_levels_convert() -> None:
    """A checkpoint of detectron2's own CycleBatchNormList loads into cycle_norm's head,
    and convert_model syncs the levels of a head built with detectron2's class (yacs)."""
    theirs = _shared_head(lambda c: _CycleBatchNormList(LEVELS, num_features=c))
    for x in _levels(0):
        theirs(x)
    ours = _shared_head(cycle_norm(LEVELS))
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    for x in _levels(1):
        torch.testing.assert_close(ours(x), theirs(x))
    converted = distnorm.convert_model(theirs, mode="sync")
    assert [type(level) for level in converted[1]] == [distnorm.SyncBatchNorm] * LEVELS


def test_shared_head_under_ddp_matches_batch_norm_per_level(world2) -> None:
    results = world2.run(_train_shared_head)
    reference = _shared_head(lambda c: _CycleBatchNormList(LEVELS, num_features=c))
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        _level_loss([reference(x) for x in _levels(step)]).backward()
        opt.step()
    expected = reference.state_dict()
    for rank, result in enumerate(results):
        assert result["types"][1] == "CycleBatchNorm"
        assert set(result["state"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11,
                                       msg=f"rank {rank}: {name} differs from the reference")
