"""The GPU run's plumbing, checked on CPU (no GPU here): tests/gpu/device_run.sh fits
its 8 minutes and reports every phase even when one fails or hangs, and the scenario
runner of tests/gpu/_scenarios.py reports each scenario as it ends, failures too.

The device_run.sh run uses a stand-in interpreter (``PYTHON``) that records its
arguments, so the script's own logic runs: limits, logs, exit statuses.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.gpu import _scenarios

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "device_run.sh"
LIMIT_S = 8 * 60


def test_phase_limits_add_up_to_at_most_eight_minutes():
    text = SCRIPT.read_text()
    limits = [int(n) for n in re.findall(r"^phase \S+ (\d+) ", text, flags=re.M)]
    limits += [int(n) for n in re.findall(r"^\s*timeout (\d+) ", text, flags=re.M)]
    kill_after = 5 * len(re.findall(r"timeout --kill-after=5 ", text))
    assert len(limits) >= 4 and kill_after, limits
    assert sum(limits) + kill_after <= LIMIT_S - 10, limits  # 10 s: nvidia-smi, git
    assert "python3" in text and not re.search(r"(^|\s)python\s", text)
    budget = re.search(r"gpu\.py --out \"\$OUT\" --budget (\d+)", text)
    assert budget and int(budget.group(1)) < 200, "the benchmark's budget must leave it time"


def test_device_run_reports_every_phase_and_goes_on_after_a_failure(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python3"
    # The tests "fail" (exit 1), the benchmark "hangs" past a 1 s limit.
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$*" in
  *"-m pytest"*) echo "tests ran"; exit 1 ;;
  *benchmarks/gpu.py*) echo "bench started"; sleep 30 ;;
  *) echo "asked: $*" ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "device_run.sh"
    # The same script with the benchmark's limit cut to 1 s, run from the repository.
    script.write_text(SCRIPT.read_text().replace("phase gpu_bench 195", "phase gpu_bench 1")
                      .replace('cd "$(dirname "$0")/../.."', f'cd "{ROOT}"'))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script)], env={**os.environ, "OUT": str(out),
                                                      "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    phases = (out / "phases.txt").read_text()
    assert "== gpu_tests exit: 1" in phases, phases
    assert "== gpu_bench exit: 124" in phases and "(timed out)" in phases, phases
    assert "tests ran" in (out / "gpu_tests.log").read_text()
    assert "bench started" in (out / "gpu_bench.log").read_text()
    assert (out / "versions.txt").exists()
    lines = calls.read_text().splitlines()
    assert any("-m pytest" in line and "--junitxml" in line for line in lines), lines
    assert any(f"benchmarks/gpu.py --out {out}" in line for line in lines), lines


def test_scenario_runner_reports_each_scenario_as_it_ends(tmp_path, monkeypatch):
    def passes():
        return {"ok": True}

    def fails():
        raise AssertionError("the replay differs\nsecond line")

    monkeypatch.setitem(_scenarios.SCENARIOS, "passes", passes)
    monkeypatch.setitem(_scenarios.SCENARIOS, "fails", fails)
    jsonl = tmp_path / "s.jsonl"
    assert _scenarios.run(["fails", "passes"], str(jsonl)) == 1
    entries = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(e["name"], e["status"]) for e in entries] == [("fails", "failed"), ("passes", "passed")]
    assert entries[0]["error"] == "AssertionError: the replay differs"
    assert "Traceback" in entries[0]["traceback"] and entries[1]["result"] == {"ok": True}


def test_every_scenario_is_in_one_group_and_capture_errors_runs_last():
    names = [name for group in _scenarios.GROUPS.values() for name in group]
    assert sorted(names) == sorted(_scenarios.SCENARIOS), "each scenario runs exactly once"
    assert len(names) == len(set(names))
    assert _scenarios.GROUPS["capture"][-1] == "capture_errors"
    for name in ("graph_capture", "empty_batch_under_capture", "graph_nonfinite", "compiled"):
        assert name in _scenarios.GROUPS["capture"], name


def test_scenario_runner_rejects_unknown_names():
    with pytest.raises(SystemExit):
        _scenarios.main(["no_such_scenario"])
