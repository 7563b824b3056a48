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
from distnorm.integrations.detectron2 import DistnormNorm, norm


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
