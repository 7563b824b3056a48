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


def test_scenario_processes_are_read_as_they_write_and_bounded(tmp_path, monkeypatch):
    """tests/gpu/test_gpu.py's ScenarioRuns: results read as each line lands, a
    scenario its process never reached reported as such (exit status and log), and a
    process past the time limit killed. A stand-in writes the lines."""
    import subprocess as real_subprocess
    import sys

    from tests.gpu import test_gpu

    script = tmp_path / "stand_in.py"
    script.write_text("""import json, sys, time
args = sys.argv[1:]
jsonl = args[args.index("--jsonl") + 1]
names = args[args.index("--jsonl") + 2:]
for name in names:
    if name.startswith("hang"):
        time.sleep(60)
    if name.startswith("die"):
        print("dying"); sys.exit(3)
    with open(jsonl, "a") as f:
        f.write(json.dumps({"name": name, "status": "passed" if name.startswith("ok") else "failed",
                            "error": "AssertionError: no"}) + "\\n")
""")
    started = []

    class Popen(real_subprocess.Popen):
        def __init__(self, args, **kwargs):
            started.append(args)
            super().__init__([sys.executable, str(script)] + args[3:], **kwargs)

    monkeypatch.setattr(test_gpu, "GROUPS", {"plain": ["ok_a", "bad_b", "die_c", "ok_d"],
                                             "capture": ["ok_e", "hang_f"]})
    monkeypatch.setattr(test_gpu.subprocess, "Popen", Popen)
    monkeypatch.setattr(test_gpu, "SCENARIO_TIMEOUT_S", 8.0)
    runs = test_gpu.ScenarioRuns(str(tmp_path))
    try:
        assert len(started) == 2 and all("--jsonl" in args for args in started)
        assert runs.result("ok_a")["status"] == "passed"
        assert runs.result("bad_b")["status"] == "failed"
        lost = runs.result("ok_d")
        assert lost["status"] == "not reached" and "exited with 3" in lost["error"], lost
        assert "dying" in lost["log"]
        assert runs.result("ok_e")["status"] == "passed"
        hung = runs.result("hang_f")
        assert hung["status"] == "not reached" and "killed after 8 s" in hung["error"], hung
    finally:
        runs.close()
    assert (tmp_path / "scenarios_plain.jsonl").exists()
