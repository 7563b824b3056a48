"""The per-layer benchmark runs, reports every column, and its baseline is honest.

Both tests start ``benchmarks/layer.py`` as a subprocess (it spawns its own gloo ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._optional import has_fairscale

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "layer.py"

pytestmark = pytest.mark.slow




def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def committed_results() -> dict:
    """Every file of the checkout's benchmarks/results with its bytes, and git's view of them."""
    folder = ROOT / "benchmarks" / "results"
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    git = subprocess.run(["git", "status", "--porcelain", "--", str(folder)], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    return {"files": files, "git": git.stdout if git.returncode == 0 else None}


def test_layer_benchmark_quick_reports_every_column(tmp_path):
    # Run as a user would from a folder of their own, without --out: the results land
    # there, and the checkout's committed results stay as they were.
    before = committed_results()
    proc = _run("--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert committed_results() == before, "the benchmark wrote into the checkout's benchmarks/results"
    tmp_path = tmp_path / "distnorm-bench-results"
    payload = json.loads((tmp_path / "layer_cpu.json").read_text())
    assert (tmp_path / "layer_cpu.md").read_text().startswith("# Per-layer benchmark")

    expected = ["local", "distnorm", "distnorm_eager", "distnorm_bare", "distnorm_local", "brn",
                "cmbn", "torch_algo", "torch_algo_var_mean"]
    if has_fairscale():
        expected.append("fairscale")
    rows = payload["results"]
    assert rows and {r["world"] for r in rows} == {2}
    for row in rows:
        channels = row["shape"][1]
        for name in expected:
            impl = row["impls"][name]
            assert impl["fwd_bwd_ms"] > 0 and 0 < impl["fwd_ms"] <= impl["fwd_bwd_ms"] * 1.5
            # Bytes counted from the collectives actually issued match each one's formula
            # (distnorm's: payload plus the guard's five float64 numbers).
            assert impl["bytes"] == impl["bytes_expected"], (name, impl["bytes"], impl["bytes_expected"])
        assert row["impls"]["local"]["bytes"] == {"forward": 0, "backward": 0}
        # The breakdown's modes did what they say: no collective at all, or the bare payloads.
        assert row["impls"]["distnorm_local"]["collectives"] == []
        assert [op["numel"] for op in row["impls"]["distnorm_bare"]["collectives"]] == [
            2 * channels + 1, 2 * channels]
        assert row["impls"]["torch_algo"]["bytes"] == {"forward": (2 * channels + 1) * 2 * 4,
                                                       "backward": 2 * channels * 4}
        dn = row["impls"]["distnorm"]["bytes"]
        assert dn["forward"] >= (2 * channels + 1) * 4 and dn["backward"] >= 2 * channels * 4
        for name in expected[1:]:
            if name != "distnorm_local":  # the one synced path with nothing to replay
                assert row["floors"][name]["fwd_bwd_ms"] > 0
        ratios = ["distnorm/local", "distnorm/distnorm_eager", "distnorm/torch_algo",
                  "(distnorm-local)/floor"]
        if has_fairscale():
            ratios.append("distnorm/fairscale")
        for key in ratios:
            assert key in row["ratios"]
        bound = row["impls"]["local"]["fwd_bwd_ms"] + row["floors"]["distnorm"]["fwd_bwd_ms"]
        assert row["bound_ms"] == pytest.approx(bound)
        assert row["ratios"]["torch_algo/bound"] == pytest.approx(
            row["impls"]["torch_algo"]["fwd_bwd_ms"] / bound)
        assert "distnorm_local" not in row["floors"]
    md = (tmp_path / "layer_cpu.md").read_text()
    assert "where distnorm's time goes" in md and "torch-algo / bound" in md
    # The quick run checks its baselines in its own ranks too, and distnorm's bare
    # all-reduce mode still computes BatchNorm of the concatenated batch.
    assert payload["check_passed"] is True
    for per_impl in payload["check"].values():
        assert max(per_impl["distnorm_bare"].values()) < 1e-9, per_impl["distnorm_bare"]


def test_torch_algorithm_matches_batchnorm_on_concatenated_batch():
    """torch_sync_bn (both local-stats kernels) equals nn.BatchNorm2d on the whole batch.

    W = 2 in the benchmark's own spawned ranks, float64, uneven shards and an empty
    rank, three steps: output, input gradient, summed weight/bias gradients, running
    statistics.
    """
    proc = _run("--check")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("CHECK_JSON "))
    check = json.loads(line[len("CHECK_JSON "):])
    assert set(check) == {"uneven", "empty_rank"}
    for case, per_impl in check.items():
        for name in ("torch_algo", "torch_algo_var_mean"):
            errors = per_impl[name]
            assert "error" not in errors, (case, name, errors)
            assert set(errors) == {"output", "grad_input", "grad_weight_bias", "running_mean", "running_var"}
            assert max(errors.values()) < 1e-9, (case, name, errors)


def test_precise_bn_benchmark_quick_writes_to_the_current_directory(tmp_path):
    """benchmarks/precise_bn.py --quick runs, reports the ratio, and by default writes
    under the current directory (never into the repository's results)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precise_bn.py"), "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "distnorm-bench-results" / "precise_bn_cpu.json").read_text())
    results = saved["results"]
    assert results["samples_used"] == 2 * 2 * 2  # 2 ranks × 2 batches × 2 images
    assert results["ratio_wall"] > 0 and results["ratio_cpu"] > 0
    assert "precise_bn / forward" in (tmp_path / "distnorm-bench-results" / "precise_bn_cpu.md").read_text()
