"""torch.compile(fullgraph=True) of synced layers over real gloo ranks equals eager.

torch's own SyncBatchNorm graph-breaks on its host synchronisation; distnorm's
collectives are functional collectives under compile, so the whole step traces.
Two synced layers in a row guard against the per-layer count being shared across
layers by the compiler (seen with inductor on CPU, torch 2.14).
"""

import pytest
import torch

import distnorm


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), distnorm.SyncBatchNorm(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), distnorm.SyncBatchNorm(8, momentum=None),
        torch.nn.ReLU())


def _compiled_vs_eager(rank, world, shards, steps):
    torch._dynamo.reset()
    eager, compiled = _net(0), _net(0)
    step = torch.compile(compiled, fullgraph=True)
    out = []
    for _ in range(steps):
        for model, fn in ((eager, eager), (compiled, step)):
            model.zero_grad()
            y = fn(shards[rank])
            (y.square() * torch.arange(y.numel()).view_as(y)).sum().backward()
        out.append({
            "y": (eager(shards[rank]) - step(shards[rank])).abs().max().item(),
            "grads": max((p.grad - q.grad).abs().max().item() / (p.grad.abs().max().item() + 1e-12)
                         for p, q in zip(eager.parameters(), compiled.parameters())),
            "stats": max((a - b).abs().max().item() for a, b in zip(eager.buffers(), compiled.buffers())),
        })
    return out


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(world2):
    torch.manual_seed(1)
    shards = [torch.randn(3, 3, 6, 6) * 3 + 2, torch.randn(1, 3, 6, 6)]
    results = world2.run(_compiled_vs_eager, shards, 2, timeout=600)
    for per_rank in results:
        for step in per_rank:
            assert step["y"] < 1e-5
            assert step["grads"] < 1e-4
            assert step["stats"] < 1e-5
