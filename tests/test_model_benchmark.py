"""The per-model benchmark (``benchmarks/model.py``) runs and reports every column.

``--quick`` (ResNet-50 at 32 px, W = 2, 2 reps) runs as a subprocess, as ``distnorm
bench model`` does; it spawns its own gloo ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._optional import has_fairscale

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow




def test_model_benchmark_quick_reports_every_column(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "distnorm.cli", "bench", "model", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "model_cpu.json").read_text())
    assert (tmp_path / "model_cpu.md").read_text().startswith("# Per-model benchmark")
    assert (tmp_path / "model_cpu.png").read_bytes()[:4] == b"\x89PNG"

    expected = ["local", "sync", "sync_eager", "cbn", "brn", "cmbn", "gn", "torch_algo"]
    if has_fairscale():
        expected.append("fairscale")
    assert set(payload["meta"]["methods"]) == set(expected)
    (row,) = payload["results"]
    assert row["world"] == 2
    for name in expected:
        m = row["methods"][name]
        assert 0 < m["fwd_ms"] <= m["fwd_bwd_ms"] <= m["step_ms"] * 1.5, (name, m)
        assert m["cpu_ms"] > 0 and m["norm_layers"] == 53  # every norm layer of ResNet-50
        assert all(math.isfinite(v) and abs(v) < 1e4 for v in m["final_loss"]), (name, m["final_loss"])
        synced = name not in ("local", "gn")
        assert (m["floor"] is not None) == synced, name
        n = m["collectives_per_step"]
        assert n["optimizer"] == 0
        if synced:
            # At least one collective per norm layer each way, and the floor replays them.
            assert n["forward"] >= 53 and n["backward"] >= 53, (name, n)
            assert m["floor"]["step_ms"] > 0 and m["overhead_over_floor"] is not None
        else:
            assert n == {"forward": 0, "backward": 0, "optimizer": 0}
    # distnorm sends O(C) per layer: 2C + 1 numbers forward, 2C backward, at least.
    import torch
    import torchvision

    bns = [m for m in torchvision.models.resnet50().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    channels = 2 * sum(m.num_features for m in bns)
    sync = row["methods"]["sync"]["bytes_per_step"]
    assert sync["backward"] >= channels * 4 and sync["forward"] >= (channels + 53) * 4
    keys = ["(sync-local)/floor", "(sync-local)/floor paired", "sync/local", "sync/torch_algo"]
    if has_fairscale():
        keys.append("sync/fairscale")
    for key in keys:
        assert isinstance(row["ratios"][key], float), key
    # The bound: local BN's step plus sync's floor.
    bound = row["methods"]["local"]["step_ms"] + row["methods"]["sync"]["floor"]["step_ms"]
    assert row["ratios"]["torch_algo/bound"] == pytest.approx(row["methods"]["torch_algo"]["step_ms"] / bound)
    assert row["ratios"]["sync/bound"] == pytest.approx(row["methods"]["sync"]["step_ms"] / bound)

    # --report rebuilds the table and plot from the saved results, without a run.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model.py"), "--report",
                           str(tmp_path / "model_cpu.json"), "--out", str(again)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (again / "model_cpu.md").read_text() == (tmp_path / "model_cpu.md").read_text()
    assert (again / "model_cpu.png").read_bytes()[:4] == b"\x89PNG"
