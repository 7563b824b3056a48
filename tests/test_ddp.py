"""DistributedDataParallel training with ``distnorm.convert_model`` equals single-process
training of the same model with plain ``nn.BatchNorm2d`` on the concatenated batch.

Loss convention. The single-process reference minimises the mean over the global
batch of B samples, L = (1/B) Σ_{i ∈ global} ℓ_i. With W ranks:

* SyncBatchNorm's backward all-reduces Σg and Σg·x̂ over the ranks, so one
  ``backward`` on every rank computes, in a distributed way, the gradient of the *sum
  of the ranks' losses* Σ_r L_r: rank r's parameter gradient is the part of
  ∂(Σ_r L_r)/∂θ that flows through its own samples, and these parts add up over ranks.
* DDP then *averages* parameter gradients over the W ranks: it applies
  (1/W) · ∂(Σ_r L_r)/∂θ.

Taking L_r = (W/B) · Σ_{i ∈ rank r} ℓ_i gives Σ_r L_r = W · L, so DDP applies exactly
∂L/∂θ, for any split of the B samples (uneven and empty shards included). With equal
shards of B/W samples, L_r is just the local mean. Everything runs in float64, so
parameters and running statistics agree to ~1e-12 after the SGD steps.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnorm

STEPS = 4
LR = 0.1


def _make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()


def _make_data(sizes: Sequence[int], seed: int) -> List[Dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        xs = [torch.randn(n, 3, 6, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3
              for n in sizes]
        ys = [torch.randint(0, 3, (n,), generator=gen) for n in sizes]
        steps.append({"x": xs, "y": ys})
    return steps


def _ddp_train(rank: int, world: int, init_state: Dict[str, torch.Tensor],
               steps: List[Dict[str, Any]], global_batch: int) -> Dict[str, Any]:
    model = _make_model()
    model.load_state_dict(init_state)
    model = distnorm.convert_model(model)
    n_sync = sum(isinstance(m, distnorm.SyncBatchNorm) for m in model.modules())
    n_plain = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    losses = []
    for step in steps:
        opt.zero_grad()
        out = ddp(step["x"][rank])
        # L_r = (W / B) · Σ_local ℓ_i; see the module docstring.
        loss = F.cross_entropy(out, step["y"][rank], reduction="sum") * (world / global_batch)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "losses": losses, "n_sync": n_sync, "n_plain": n_plain}


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3), (0, 4)], ids=["2+2", "1+3", "0+4"])
def test_ddp_matches_single_process(sizes, world2):
    torch.manual_seed(0)
    reference = _make_model()
    init_state = {k: v.clone() for k, v in reference.state_dict().items()}
    steps = _make_data(sizes, seed=sum(sizes) * 10 + sizes[0])
    global_batch = sum(sizes)

    results = world2.run(_ddp_train, init_state, steps, global_batch)

    # Single process, plain nn.BatchNorm2d, the whole batch of B samples.
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    ref_losses = []
    for step in steps:
        opt.zero_grad()
        out = reference(torch.cat(step["x"]))
        loss = F.cross_entropy(out, torch.cat(step["y"]), reduction="mean")
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())

    ref_state = reference.state_dict()
    for rank, res in enumerate(results):
        assert res["n_sync"] == 2 and res["n_plain"] == 0
        assert set(res["state"]) == set(ref_state)
        for key, value in ref_state.items():
            if key.endswith("num_batches_tracked"):
                assert int(res["state"][key]) == int(value) == STEPS, key
            else:
                torch.testing.assert_close(res["state"][key], value, rtol=1e-9, atol=1e-11,
                                           msg=lambda m: f"{key}, rank {rank}: {m}")
        # Parameters moved: the comparison is not vacuous.
        assert any(not torch.equal(ref_state[k], init_state[k]) for k in ref_state
                   if k.endswith("weight"))
    # Σ_r L_r = W · L at every step (the losses are those before each update).
    for s in range(STEPS):
        total = sum(res["losses"][s] for res in results)
        torch.testing.assert_close(total, len(results) * ref_losses[s], rtol=1e-9, atol=1e-12)


# -- per-rank state stays out of DDP's buffer broadcast ---------------------------------

def _cbn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.BatchNorm2d(5),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 3)).double()


def _cbn_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64) * (1 + i),
             torch.randint(0, 3, (4,), generator=gen)) for i in range(5)]


def _cbn_train(model, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for x, y in _cbn_batches():
        if rank is not None:
            x, y = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _cbn_built_directly():
    """_cbn_net with CrossIterationBatchNorm layers built by hand (no convert_model)."""
    net = _cbn_net()
    for i in (1, 4):
        bn = net[i]
        cbn = distnorm.CrossIterationBatchNorm(bn.num_features, window=3, dtype=torch.float64)
        cbn.load_state_dict(bn.state_dict())
        net[i] = cbn
    return net


def _cbn_under_ddp(rank, world, built):
    if built == "convert_model":
        model = distnorm.convert_model(_cbn_net(), mode="cbn", window=3)
    else:
        model = _cbn_built_directly()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True
    losses = _cbn_train(ddp, rank) / world
    dist.all_reduce(losses)
    return losses


@pytest.mark.parametrize("built", ["convert_model", "directly"])
def test_cbn_history_survives_ddp_buffer_broadcast(built, world2):
    # CBN's history holds this rank's partial sums: DDP must not overwrite it with
    # rank 0's. It is rank state (tensor attributes, not buffers): DDP never sees it.
    expected = _cbn_train(distnorm.convert_model(_cbn_net(), mode="cbn", window=3))
    for losses in world2.run(_cbn_under_ddp, built):
        torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
