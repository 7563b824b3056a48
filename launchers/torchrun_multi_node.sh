#!/usr/bin/env bash
# Several machines: run this once on EVERY node, with the same variables.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example:29500 RDZV_ID=job42 \
#       launchers/torchrun_multi_node.sh --norm sync --model fasterrcnn_mobilenet --steps 5000
#
# Variables (required): NNODES (how many nodes), RDZV_ENDPOINT (host:port of one of
# the nodes — usually the first — reachable from all of them; torchrun's c10d
# rendezvous listens there), RDZV_ID (any job id, the same on every node).
# Optional: NPROC_PER_NODE (default: the node's GPUs, else 2), JOIN_TIMEOUT (seconds
# to wait for every node to join, default 300: a node that never comes fails the
# job with a RendezvousTimeoutError instead of hanging), SCRIPT (default
# examples/detection/train.py), NODE_RANK (only to pin the order of the nodes).
# What it runs on each node:
#
#   torchrun --nnodes=$NNODES --nproc_per_node=$NPROC_PER_NODE \
#       --rdzv_backend=c10d --rdzv_endpoint=$RDZV_ENDPOINT --rdzv_id=$RDZV_ID \
#       --rdzv_conf=join_timeout=$JOIN_TIMEOUT $SCRIPT ARGS...
#
# The node that owns RDZV_ENDPOINT's address hosts the rendezvous; start it first
# or within JOIN_TIMEOUT of the others. Rank 0 writes results and checkpoints on its
# node; --resume needs the checkpoint on every node (a shared file system).
set -euo pipefail
missing=()
for var in NNODES RDZV_ENDPOINT RDZV_ID; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
done
if (( ${#missing[@]} )); then
    echo "torchrun_multi_node.sh: set ${missing[*]} (the same on every node), e.g." >&2
    echo "  NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=job1 $0 [ARGS...]" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="${SCRIPT:-$ROOT/examples/detection/train.py}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
extra=()
[[ -n "${NODE_RANK:-}" ]] && extra+=("--node_rank=$NODE_RANK")
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" "${extra[@]}" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" \
    --rdzv_conf=join_timeout="${JOIN_TIMEOUT:-300}" \
    "$SCRIPT" "$@"
