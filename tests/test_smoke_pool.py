import torch

import distnorm


def _sync_forward(rank, world, shards):
    bn = distnorm.SyncBatchNorm(shards[0].shape[1]).double()
    x = shards[rank].clone().requires_grad_()
    y = bn(x)
    y.backward(torch.ones_like(y) * (rank + 1))
    return {"y": y.detach(), "grad": x.grad, "mean": bn.running_mean.clone()}


def test_pool_runs_sync_forward(world2):
    torch.manual_seed(0)
    shards = [torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)]
    out = world2.run(_sync_forward, shards)
    ref = torch.nn.BatchNorm1d(4).double()
    y = ref(torch.cat(shards))
    torch.testing.assert_close(torch.cat([o["y"] for o in out]), y.detach())
    torch.testing.assert_close(out[0]["mean"], ref.running_mean)
