#!/usr/bin/env bash
# The whole GPU check in one call on a machine with one CUDA GPU: the GPU tests, then
# the GPU benchmark. Everything it finds goes to $OUT (default /tmp/distnorm-gpu):
# versions, the tests' log and JUnit report, the benchmark's table and results.
#
#   OUT=/some/dir bash tests/gpu/device_run.sh        # from the repository root
#
# Budget: tests ≤ 300 s, benchmark ≤ 240 s, so one 10-minute call holds both. It
# never stops at the first failure: a scarce GPU run should report everything.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/distnorm-gpu}"
mkdir -p "$OUT"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name())"
  python -c "import triton; print('triton', triton.__version__)" 2>&1
  git log -1 --format='commit %H %s' 2>/dev/null || true
} | tee "$OUT/versions.txt"

timeout 300 python -m pytest -q -rA -m gpu tests/gpu -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# The copy on the GPU machine may have no .git: pass the commit in when it has not.
export DISTNORM_BENCH_COMMIT="${DISTNORM_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
timeout 240 python benchmarks/gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -80
echo "gpu benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"
