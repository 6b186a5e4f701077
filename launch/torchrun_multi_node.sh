#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same MASTER_ADDR (node 0's address),
# MASTER_PORT and NNODES, and each node's own NODE_RANK (0 .. NNODES-1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun_multi_node.sh   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun_multi_node.sh   # node 1
# MAX_RESTARTS as in torchrun_single_node.sh (every node must be given the same value).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0 .. NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
exec "${TORCHRUN:-torchrun}" --max-restarts="${MAX_RESTARTS:-0}" --nnodes="$NNODES" --node-rank="$NODE_RANK" \
  --nproc-per-node="${NPROC:-1}" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
  "$here/train_sharded.py" "$@"
