#!/usr/bin/env bash
# One node, NPROC processes (default 2), with torchrun's standalone rendezvous:
#   NPROC=8 launch/torchrun_single_node.sh --optimizer supergrok --steps 100
# MAX_RESTARTS=3 restarts every process up to 3 times when one fails (torchrun --max-restarts);
# with --checkpoint ck.pt --checkpoint-every 10 each round resumes from the last checkpoint.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${TORCHRUN:-torchrun}" --max-restarts="${MAX_RESTARTS:-0}" --standalone --nproc-per-node="${NPROC:-2}" \
  "$here/train_sharded.py" "$@"
