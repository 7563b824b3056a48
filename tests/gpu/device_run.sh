#!/usr/bin/env bash
# The whole GPU check in one call on a machine with one CUDA GPU (H100/H200): the GPU
# tests, then the GPU benchmark, in at most 8 minutes. Everything it finds goes to
# $OUT (default /tmp/distnorm-gpu), written as it goes:
#
#   versions.txt                  python, torch, CUDA, NCCL, triton, GPU, commit
#   gpu_tests.log / .xml          pytest -m gpu (each test's line as it ends; JUnit at the end)
#   scenarios_<group>.jsonl/.log  one line per NCCL scenario as it ends (two processes)
#   gpu_bench.log, gpu_<device>.md/.json   the benchmark's table and results
#
#   OUT=/some/dir bash tests/gpu/device_run.sh        # from the repository root
#
# Time: versions ≤ 30 s, tests ≤ 235 s (the scenario processes ≤ 205 s, side by side
# with the gloo tests), benchmark ≤ 195 s (items not started after --budget 120 s
# are listed as skipped), each killed 5 s after its limit at worst: 470 s in all. It
# never stops at the first failure: a scarce GPU run should report everything, and
# each phase's exit status and time go to phases.txt.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/distnorm-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DISTNORM_GPU_OUT="$OUT" DISTNORM_GPU_SCENARIO_TIMEOUT="${DISTNORM_GPU_SCENARIO_TIMEOUT:-205}"
PY="${PYTHON:-python3}"
phase() {  # phase NAME SECONDS COMMAND...: run with a limit, log, record the exit status
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/phases.txt"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -80
  local status=${PIPESTATUS[0]}
  echo "== $name exit: $status after $((SECONDS - start)) s$([ "$status" = 124 ] && echo ' (timed out)')" \
    | tee -a "$OUT/phases.txt" "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  timeout 20 "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name())" 2>&1
  timeout 10 "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  git log -1 --format='commit %H %s' 2>/dev/null || true
} | tee "$OUT/versions.txt"

phase gpu_tests 235 "$PY" -m pytest -v -rA -m gpu tests/gpu -p no:cacheprovider \
  -o junit_logging=system-out --junitxml="$OUT/gpu_tests.xml"

# The copy on the GPU machine may have no .git: pass the commit in when it has not.
export DISTNORM_BENCH_COMMIT="${DISTNORM_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
phase gpu_bench 195 "$PY" benchmarks/gpu.py --out "$OUT" --budget 120
echo "phases:"; cat "$OUT/phases.txt"
