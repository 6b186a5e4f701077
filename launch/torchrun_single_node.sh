#!/usr/bin/env bash
# One node, NPROC processes (default 2), with torchrun's standalone rendezvous:
#   NPROC=8 launch/torchrun_single_node.sh --optimizer supergrok --steps 100
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${TORCHRUN:-torchrun}" --standalone --nproc-per-node="${NPROC:-2}" \
  "$here/train_sharded.py" "$@"
