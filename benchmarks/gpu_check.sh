#!/usr/bin/env bash
# The GPU checks of the CUDA kernel, in one short run for a machine with a GPU (CI has none):
# build report, the GPU tests, and the step benchmark, all output under $OUT (default
# benchmarks/results/). Usage: OUT=dir bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
if [[ -z "${PY:-}" ]]; then
  # some images have only python3
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
mkdir -p "$OUT"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
# the provenance lines the benchmark's own files carry, at the top of the other two
header=$("$PY" benchmarks/step_common.py bash benchmarks/gpu_check.sh "$@")
{
  echo "$header"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -m shardgrok.kernels
} 2>&1 | tee "$OUT/gpu_${gpu}_status.txt"
{
  echo "$header"
  "$PY" -m pytest -q tests/kernels/test_cuda.py tests/kernels/test_cuda_host.py
} 2>&1 | tee "$OUT/gpu_${gpu}_tests.txt"
if [[ "${1:-}" == "--quick" ]]; then
  "$PY" benchmarks/step_cuda.py --quick --json "$OUT/step_${gpu}_quick.json" 2>&1 | tee "$OUT/step_${gpu}_quick.txt"
else
  "$PY" benchmarks/step_cuda.py --json "$OUT/step_${gpu}.json" 2>&1 | tee "$OUT/step_${gpu}.txt"
fi
