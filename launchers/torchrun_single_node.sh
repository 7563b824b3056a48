#!/usr/bin/env bash
# One machine, N ranks, with torchrun (the PyTorch launcher).
#
#   launchers/torchrun_single_node.sh [ARGS...]           # the detection job, ARGS go to it
#   NPROC=4 launchers/torchrun_single_node.sh --norm sync --steps 1000
#   SCRIPT=my_train.py launchers/torchrun_single_node.sh ...
#
# Variables: NPROC (ranks; default: the number of GPUs, else 2), SCRIPT (default
# examples/detection/train.py of this checkout). What it runs:
#
#   torchrun --standalone --nproc_per_node=$NPROC $SCRIPT ARGS...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="${SCRIPT:-$ROOT/examples/detection/train.py}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec torchrun --standalone --nproc_per_node="$NPROC" "$SCRIPT" "$@"
