"""The AdaBN recipe of docs/population.md, end to end on a toy task.

A classifier is trained on one synthetic domain; the target domain rescales and
shifts every input feature (a "contrast and brightness" change). Recomputing the
BatchNorm statistics on unlabelled target inputs with ``distnorm.precise_bn`` must
(1) give the first layer exactly the target inputs' population statistics, (2) bring
the accuracy back, and (3) leave the weights alone, so that the saved source
statistics restore the source behaviour.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import distnorm

_FEATURES = 8


def _domain(n: int, seed: int, scale: torch.Tensor = None, shift: torch.Tensor = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    direction = torch.linspace(-1.0, 1.0, _FEATURES)
    x = torch.randn(n, _FEATURES, generator=g) + 1.5 * direction * (2 * labels[:, None] - 1)
    if scale is not None:
        x = x * scale + shift
    return x, labels


def _bn_statistics(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The recipe's per-domain state: every BatchNorm layer's two buffers."""
    return {f"{name}.{key}": getattr(module, key).clone()
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.running_mean is not None
            for key in ("running_mean", "running_var")}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_adabn_recipe_end_to_end() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(_FEATURES), nn.Linear(_FEATURES, 32), nn.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 2))
    x_src, y_src = _domain(4096, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(150):
        idx = torch.randint(0, len(x_src), (64,), generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(model(x_src[idx]), y_src[idx]).backward()
        opt.step()
        opt.zero_grad()

    g = torch.Generator().manual_seed(7)
    scale = torch.rand(_FEATURES, generator=g) * 2.5 + 0.4
    shift = torch.randn(_FEATURES, generator=g) * 4.0
    x_test, y_test = _domain(2048, seed=2)
    x_tgt_test, y_tgt_test = _domain(2048, seed=2, scale=scale, shift=shift)
    x_tgt_unlabelled, _ = _domain(4096, seed=3, scale=scale, shift=shift)

    source_acc = _accuracy(model, x_test, y_test)
    shifted_acc = _accuracy(model, x_tgt_test, y_tgt_test)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    source_stats = _bn_statistics(model)

    # AdaBN: the same call as PreciseBN, on unlabelled target inputs.
    used = distnorm.precise_bn(model, x_tgt_unlabelled.split(256))
    assert used == len(x_tgt_unlabelled)
    adapted_acc = _accuracy(model, x_tgt_test, y_tgt_test)

    # (1) the first layer's statistics are the target inputs' population statistics.
    target64 = x_tgt_unlabelled.double()
    torch.testing.assert_close(model[0].running_mean.double(), target64.mean(0),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), target64.var(0),
                               rtol=1e-5, atol=1e-6)
    # (2) the accuracy comes back: the shift hurt, adapting recovers most of it.
    assert source_acc > 0.9, source_acc
    assert shifted_acc < source_acc - 0.1, (source_acc, shifted_acc)
    assert adapted_acc > source_acc - 0.03, (source_acc, shifted_acc, adapted_acc)
    # ... and the loss falls as well.
    with torch.no_grad():
        adapted_loss = nn.functional.cross_entropy(model(x_tgt_test), y_tgt_test)
        model.load_state_dict(source_stats, strict=False)
        shifted_loss = nn.functional.cross_entropy(model(x_tgt_test), y_tgt_test)
    assert adapted_loss < shifted_loss
    # (3) weights untouched; the source statistics restore the source behaviour.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert _accuracy(model, x_test, y_test) == source_acc


def test_plain_pytorch_example_runs_precise_bn_before_each_evaluation(tmp_path) -> None:
    """examples/precise_bn.py, small, on 2 torchrun ranks (DDP, gloo)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "history.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "examples" / "precise_bn.py"), "--epochs", "2", "--train-size", "48",
           "--val-size", "32", "--precise-batches", "5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads(out.read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    for row in history:
        assert row["precise_bn_samples"] == 2 * 5 * 2  # ranks × batches × images
        assert row["statistics_agree"]
        assert 0.0 <= row["precise"]["accuracy"] <= 1.0 and row["precise"]["loss"] > 0
    assert "precise_bn on 20 images" in proc.stdout
