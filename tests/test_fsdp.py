"""distnorm layers under FSDP2 (``fully_shard``) and FSDP (``FullyShardedDataParallel``).

Real gloo ranks on CPU (the ``world2`` pool). A model is converted with
``distnorm.convert_model`` *before* it is sharded; the sharded training must equal one
process training the unconverted model (plain ``nn.BatchNorm2d``) on the
concatenated batch, as under DDP (tests/test_ddp.py has the loss convention: rank r
minimises ``(W/B) Σ_{i ∈ r} ℓ_i``, which FSDP's gradient averaging, like DDP's, turns
into the gradient of the global mean).

* float64, no mixed precision (FSDP2 per block + root; FSDP wrapping the whole
  model): parameters, losses and running statistics to ~1e-12.
* FSDP2 with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``: torch's own
  BatchNorm fails there (its float32 running statistics meet bfloat16 inputs);
  distnorm's layers keep float32 running statistics, equal on every rank, and the
  first layer's — which sees the bfloat16-cast input directly — equal BatchNorm's on
  the concatenated, bfloat16-rounded batch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm

pytest.importorskip("torch.distributed.fsdp")

STEPS = 3
LR = 0.1
SIZES = (3, 1)  # uneven shards: the statistics are count-weighted


def _make_model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3),  # first: it sees the (cast) input itself
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).to(dtype)


def _data(dtype: torch.dtype) -> List[Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    total = sum(SIZES)
    return [{"x": (torch.randn(total, 3, 6, 5, generator=gen) * 1.5 + 0.7).to(dtype),
             "y": torch.randint(0, 3, (total,), generator=gen)} for _ in range(STEPS)]


def _state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Full parameters and buffers by their plain names (FSDP wrappers' prefixes dropped)."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name.replace("_fsdp_wrapped_module.", "")] = full.detach().clone()
    return out


def _reference(dtype: torch.dtype, cast_input: bool) -> Dict[str, Any]:
    model = _make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in _data(dtype):
        x = step["x"].bfloat16().to(dtype) if cast_input else step["x"]
        loss = F.cross_entropy(model(x), step["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "state": _state(model)}


def _sharded_train(rank: int, world: int, wrapper: str, dtype: torch.dtype) -> Dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard

    model = distnorm.convert_model(_make_model(dtype), mode="sync")
    if wrapper == "fsdp":
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    else:
        mesh = init_device_mesh("cpu", (world,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16) if wrapper == "fully_shard_bf16"
                  else MixedPrecisionPolicy())
        # One unit per block, then the root. Under bfloat16 the first layer is also a
        # unit of its own (what torch advises for its own BatchNorm; harmless here).
        blocks = (model[0], model[1], model[2]) if wrapper == "fully_shard_bf16" else (model[1], model[2])
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    report = distnorm.check_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start, total = sum(SIZES[:rank]), sum(SIZES)
    losses = []
    for step in _data(dtype):
        x, y = step["x"][start:start + SIZES[rank]], step["y"][start:start + SIZES[rank]]
        out = model(x)
        loss = F.cross_entropy(out.to(dtype), y, reduction="sum") * (world / total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone() / world
        dist.all_reduce(global_loss)
        losses.append(global_loss.item())
    if wrapper == "fsdp":
        with FullyShardedDataParallel.summon_full_params(model):
            state = _state(model)
    else:
        state = _state(model)
    return {"losses": losses, "state": state, "report_ok": report.ok,
            "synced": [layer.kind for layer in report.synced], "report": str(report)}


def _assert_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], tol: float,
                  keys: Sequence[str]) -> None:
    for key in keys:
        assert torch.allclose(got[key].double(), want[key].double(), rtol=tol, atol=tol), (
            key, (got[key].double() - want[key].double()).abs().max().item())


@pytest.mark.parametrize("wrapper", ["fully_shard", "fsdp"])
def test_sharded_training_equals_batchnorm_on_the_concatenated_batch(world2, wrapper):
    results = world2.run(_sharded_train, wrapper, torch.float64)
    ref = _reference(torch.float64, cast_input=False)
    for rank, res in enumerate(results):
        assert res["report_ok"], res["report"]
        assert res["synced"] == ["SyncBatchNorm"] * 3, res["report"]
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-10, abs=1e-12)
        assert set(res["state"]) == set(ref["state"]), rank
        _assert_close(res["state"], ref["state"], 1e-10, list(ref["state"]))


def test_fully_shard_bfloat16_keeps_float32_running_statistics(world2):
    results = world2.run(_sharded_train, "fully_shard_bf16", torch.float32)
    ref = _reference(torch.float32, cast_input=True)
    stats = [k for k in ref["state"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 6
    for res in results:
        assert res["report_ok"], res["report"]
        assert res["synced"] == ["SyncBatchNorm"] * 3, res["report"]
        for key in stats:
            assert res["state"][key].dtype == torch.float32, key
            assert torch.isfinite(res["state"][key]).all(), key
            assert torch.equal(res["state"][key], results[0]["state"][key]), key
        # The first layer normalizes the bfloat16-cast input itself: its running
        # statistics are BatchNorm's on the concatenated batch, to float32 rounding.
        _assert_close(res["state"], ref["state"], 1e-5, ["0.running_mean", "0.running_var"])
        assert int(res["state"]["0.num_batches_tracked"]) == STEPS


def _convert_after_wrapping(rank: int, world: int) -> Dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    errors = {}
    for wrapper in ("fully_shard", "fsdp"):
        model = _make_model(torch.float32)
        if wrapper == "fsdp":
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
        else:
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        try:
            distnorm.convert_model(model)
        except ValueError as error:
            errors[wrapper] = str(error)
    return errors


def test_converting_after_fsdp_is_refused_with_the_fix(world2):
    for errors in world2.run(_convert_after_wrapping):
        assert set(errors) == {"fully_shard", "fsdp"}, errors
        for message in errors.values():
            assert "call distnorm.convert_model before fully_shard" in message, message
