"""timm: ``python -m distnorm.integrations.timm_train train.py ... --sync-bn``.

timm's ``train.py`` is not part of the timm wheel, so the end-to-end test runs this
file as the training script in its place. It follows train.py where it matters:
``from timm.layers import convert_sync_batchnorm`` at import time, timm's own
``timm.utils.init_distributed_device`` to join the torchrun job, and
``model = convert_sync_batchnorm(model)`` only with ``--sync-bn`` in a distributed run.
The test starts it under ``python -m torch.distributed.run --nproc_per_node=2 -m
distnorm.integrations.timm_train``, checks torchrun's exit status (non-zero if any
rank failed) and each rank's result file, and compares the weights and running
statistics after two SGD steps (float64, uneven shards 3 + 5; loss convention of
tests/test_ddp.py) with the unconverted timm model trained on the concatenated
batch. The model, ``mobilenetv3_small_050``, uses timm's ``BatchNormAct2d``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm

if importlib.util.find_spec("timm") is None:
    if os.environ.get("CI"):
        raise ImportError("timm is part of the dev extra: pip install -e '.[dev]'")
    pytest.skip("timm is not installed (pip install -e '.[dev]')", allow_module_level=True)

# Bound at import, as train.py binds it: under timm_train this is distnorm's converter.
from timm.layers import convert_sync_batchnorm  # noqa: E402

from distnorm.integrations import timm_train  # noqa: E402
from tests._integration import SHARDS, assert_states_match, batches  # noqa: E402
from tests._integration import reference_state, torchrun  # noqa: E402

MODEL = "mobilenetv3_small_050"
LR = 0.05
CLASSES = 5


def _create() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, num_classes=CLASSES).double()


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return batches(seed=2, size=(3, 32, 32), classes=CLASSES, scale=1.0, offset=0.0)


def _norm_types(model: nn.Module) -> List[str]:
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)})


def _train(args: argparse.Namespace) -> None:
    """The stand-in for timm's train.py, one rank of the torchrun job."""
    import torch.distributed as dist
    from timm import utils

    utils.init_distributed_device(args)   # train.py's call: torchrun's variables, gloo on CPU
    rank, world = args.rank, args.world_size
    model = _create()
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)   # what train.py does under --sync-bn
    types = _norm_types(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    start = sum(SHARDS[:rank])
    for x, y in _batches():
        opt.zero_grad()
        out_ = ddp(x[start:start + SHARDS[rank]])
        # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
        F.cross_entropy(out_, y[start:start + SHARDS[rank]], reduction="sum").mul(
            world / sum(SHARDS)).backward()
        opt.step()
    torch.save({"types": types, "state": model.state_dict()}, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_timm_train_wrapper_matches_batch_norm_on_concatenated_batch(tmp_path: Path) -> None:
    results = torchrun(["-m", "distnorm.integrations.timm_train", "--mode", "sync", __file__,
                        "--sync-bn", "--out", str(tmp_path)], tmp_path)
    reference = _create()
    assert _norm_types(reference) == ["BatchNormAct2d"]   # every norm: timm's BN + activation

    def converted(result: Dict[str, Any]) -> None:
        assert result["types"] == ["SyncBatchNorm"], result["types"]

    assert_states_match(results, reference_state(reference, _batches(), lr=LR), converted)


def test_use_distnorm_swaps_and_restores_both_converters() -> None:
    import timm.layers
    import timm.layers.norm_act

    originals = (timm.layers.convert_sync_batchnorm, timm.layers.norm_act.convert_sync_batchnorm,
                 nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"])
    with timm_train.use_distnorm("brn", r_max=2.0) as convert:
        from timm.layers import convert_sync_batchnorm as imported

        assert imported is convert is timm.layers.norm_act.convert_sync_batchnorm
        model = imported(_create())
        assert _norm_types(model) == ["BatchRenorm"]
        # BatchNormAct2d's activation is kept, applied after the normalization.
        assert any(isinstance(m, distnorm.BatchRenorm) and hasattr(m, "act") for m in model.modules())
        torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
        assert type(torch_converted[0]) is distnorm.BatchRenorm
    assert (timm.layers.convert_sync_batchnorm, timm.layers.norm_act.convert_sync_batchnorm,
            nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]) == originals
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))) is nn.SyncBatchNorm


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "from timm.layers import convert_sync_batchnorm\n"
        "from helper import RESULT\n"       # the script's folder is on the import path
        "RESULT['argv'] = sys.argv[1:]\n"
        "RESULT['layer'] = convert_sync_batchnorm(torch.nn.BatchNorm2d(4))\n")
    (tmp_path / "helper.py").write_text("RESULT = {}\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.warns(UserWarning, match="no --sync-bn"):
        timm_train.main(["--mode", "cbn", "--option", "window=3", "--option", "rho=0.5",
                         str(script), "/data", "--lr", "0.1"])
    import helper  # type: ignore[import-not-found]

    assert helper.RESULT["argv"] == ["/data", "--lr", "0.1"]
    layer = helper.RESULT["layer"]
    assert isinstance(layer, distnorm.CrossIterationBatchNorm)
    assert (layer.window, layer.rho) == (3, 0.5)
    sys.modules.pop("helper", None)
    with pytest.raises(SystemExit):
        timm_train.main(["--option", "window", str(script)])


if __name__ == "__main__":  # one rank, started by timm_train under torchrun
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--device", default="cpu")
    torch.set_num_threads(1)
    _train(parser.parse_args())
