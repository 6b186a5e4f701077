#!/usr/bin/env bash
# The GPU check of the CUDA kernel: one run of at most 5 minutes on a machine with one GPU,
# builds included, from the checkout (PYTHONPATH=., no install, no network), with the Python
# and torch the machine has. Four stages (the sanitizers in two runs), each under its own
# `timeout` and all under one deadline (GPU_CHECK_SECONDS, default 290 s):
#
#   1 status      nvidia-smi, versions, the CPU / CUDA / emulated builds in parallel, timed
#                 (TORCH_CUDA_ARCH_LIST = this GPU's arch only), python -m shardgrok.kernels  105 s
#   2 tests       tests/kernels/test_cuda.py, tests/distributed/test_cuda_ranks.py (their      70 s
#                 emulated variants deselected: CI runs those)
#   3 sanitizers  compute-sanitizer memcheck (every case of benchmarks/gpu_sanitize_cases.py,  35 s
#                 PyTorch's caching allocator off) and racecheck (three cases); "not run",    25 s
#                 saying so, where compute-sanitizer is neither on PATH nor in $CUDA_HOME/bin
#   4 benchmark   benchmarks/step_cuda.py at 100M/200, 5 steps x 3 repeats                     55 s
#
# The budgets add up to the deadline. A stage gets min(its budget, what is left of the
# deadline; `timeout --kill-after=5` ends it); one that finds under 5 s left is skipped,
# saying so. Every stage writes its file as it runs (Python unbuffered: a cut-off run leaves
# what it had), each starting with the provenance lines of benchmarks/step_common.py (command,
# commit, date, CPU, GPU); gpu_<gpu>_summary.txt gets one line per finished stage.
#
# Files, under $OUT (default benchmarks/results/), <gpu> the GPU's name in lower case:
#   gpu_<gpu>_status.txt  gpu_<gpu>_tests.txt  gpu_<gpu>_memcheck.txt  gpu_<gpu>_racecheck.txt
#   step_<gpu>_100m.txt  step_<gpu>_100m.json  gpu_<gpu>_summary.txt
#
# --dry-run (CI, no GPU): the same stages on the emulated CUDA target: the builds, the tests
# collected (not run), the sanitizer cases with backend="cuda-emulated" on CPU tensors (no
# compute-sanitizer), step_cuda.py --emulated at 20k/10 (AdamW fused, GrokAdamW, SuperGrok:
# step_emulated_20k.txt, .json); <gpu> is "emulated" and OUT defaults to a new temporary
# directory. tests/kernels/test_gpu_check.py runs it.
#
# Usage: [OUT=dir] [PY=python3] [GPU_CHECK_SECONDS=290] bash benchmarks/gpu_check.sh [--dry-run]
# Exit status: 0 when every stage passed or was "not run" (no compute-sanitizer; a stage
# function exits 99 for that), 1 otherwise, 2 when there is no GPU (and no --dry-run) or the
# arguments are wrong.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: [OUT=dir] [PY=python3] bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

if [[ -z "${PY:-}" ]]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
export PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
DEADLINE=${GPU_CHECK_SECONDS:-290}

if (( DRY )); then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
  gpu=emulated
  STEP="step_${gpu}_20k"
else
  # the GPU's name for the file names, and its architecture: nvcc builds that one only
  if ! info=$("$PY" -c "import torch
assert torch.cuda.is_available()
import re
name = re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_')
print(name, '%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null); then
    echo "gpu_check.sh: $PY's torch sees no CUDA device; on a machine without a GPU run" \
         "bash benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
  fi
  gpu=${info% *}
  STEP="step_${gpu}_100m"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${info#* }}"
fi
mkdir -p "$OUT"
export OUT gpu DRY STEP
SUMMARY="$OUT/gpu_${gpu}_summary.txt"

# the provenance lines the benchmark's own files carry, at the top of every file
header=$("$PY" benchmarks/step_common.py bash benchmarks/gpu_check.sh "$@")
export header
printf '%s\n  out:      %s\n' "$header" "$OUT" > "$SUMMARY"
echo "gpu_check.sh: writing to $OUT"

failed=0
rc=0
# run_stage NAME BUDGET_S FILE FUNCTION: FUNCTION under `timeout`, its output into FILE after
# the provenance lines (written straight to the file: a process left behind cannot hold up a
# pipe), then the file to the terminal and one line into the summary
run_stage() {
  local name=$1 budget=$2 file=$3 fn=$4
  local left=$(( DEADLINE - (SECONDS - START) ))
  local limit=$(( budget < left ? budget : left ))
  if (( limit < 5 )); then
    printf '%s\n# stage %s skipped: %d s left of the %d s deadline\n' "$header" "$name" "$left" \
      "$DEADLINE" > "$file"
    printf '%-10s skipped (out of time: %d s left)\n' "$name" "$left" | tee -a "$SUMMARY"
    failed=1
    rc=-1  # nothing ran
    return
  fi
  local t0=$SECONDS
  echo "== stage $name (limit ${limit} s) -> $file"
  {
    echo "$header"
    echo "# stage $name, limit ${limit} s (budget ${budget} s, deadline ${DEADLINE} s)"
  } > "$file"
  timeout --kill-after=5 "$limit" bash -c "$fn" >> "$file" 2>&1 < /dev/null
  rc=$?
  [[ -n "$(tail -c 1 "$file")" ]] && echo >> "$file"  # output without a final newline
  echo "# exit status $rc" >> "$file"
  cat "$file"
  local how="ok"
  if (( rc == 99 )); then how="not run (the file says why)"
  elif (( rc == 124 || rc == 137 )); then how="TIMED OUT after ${limit} s"; failed=1
  elif (( rc != 0 )); then how="FAILED (exit status $rc)"; failed=1; fi
  printf '%-10s %-28s %4d s  %s\n' "$name" "$how" "$(( SECONDS - t0 ))" "$(basename "$file")" \
    | tee -a "$SUMMARY"
}

# ---------------------------------------------------------------- 1: status and builds
stage_status() {
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 \
      || nvidia-smi -L
  else
    echo "nvidia-smi: not on PATH"
  fi
  echo "## versions"
  local tmp
  tmp=$(mktemp -d)
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torch CUDA', torch.version.cuda, '| devices', torch.cuda.device_count())" > "$tmp/versions" 2>&1 &
  echo "nvcc: $(command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 1 || echo 'not on PATH')"
  echo "ninja: $(command -v ninja >/dev/null 2>&1 && ninja --version || echo 'not on PATH')"
  echo "compute-sanitizer: ${SANITIZER:-not found} $([[ -n "$SANITIZER" ]] && "$SANITIZER" --version | tail -n 1)"
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-}"
  for op in CPU CUDA CUDA_EMULATED; do
    "$PY" -c "import sys, time
from shardgrok.kernels import build
t = time.perf_counter()
loaded = build.load(getattr(build, sys.argv[1]))
what = 'available, ' + str(loaded.origin) if loaded.ext is not None else 'unavailable: ' + str(loaded.reason)
print(f'{sys.argv[1].lower():<14} {time.perf_counter() - t:6.1f} s  {what}')" "$op" > "$tmp/$op" 2>&1 &
  done
  wait
  cat "$tmp/versions"
  echo "## builds (just in time, in parallel; a cached build loads in a second or two)"
  cat "$tmp/CPU" "$tmp/CUDA" "$tmp/CUDA_EMULATED"
  rm -rf "$tmp"
  echo "## python -m shardgrok.kernels"
  "$PY" -m shardgrok.kernels
}

# ---------------------------------------------------------------- 2: the GPU tests
stage_tests() {
  local files=(tests/kernels/test_cuda.py tests/distributed/test_cuda_ranks.py)
  if (( DRY )); then
    echo "# dry run: the GPU tests collected, not run"
    "$PY" -m pytest -q -p no:cacheprovider --collect-only "${files[@]}"
  else
    # one line per test as it ends (a cut-off run keeps them); skip reasons at the end
    "$PY" -m pytest -v --tb=short -p no:cacheprovider -rs -k "not emulated" "${files[@]}"
  fi
}

# ---------------------------------------------------------------- 3: compute-sanitizer
CASES="benchmarks/gpu_sanitize_cases.py"
SANITIZER=$(command -v compute-sanitizer 2>/dev/null \
  || { cs="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; [[ -x "$cs" ]] && echo "$cs"; } \
  || true)
stage_memcheck() {
  if (( DRY )); then
    echo "# dry run: the cases on the emulated target, with the reference comparison; no compute-sanitizer"
    "$PY" "$CASES" --emulated --tiny --steps 2
  elif [[ -z "$SANITIZER" ]]; then
    echo "# compute-sanitizer is neither on PATH nor in \${CUDA_HOME:-/usr/local/cuda}/bin: memcheck not run"
    exit 99
  else
    # each tensor its own cudaMalloc: an access past a tensor's end is then outside any allocation
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
      "$PY" "$CASES" --no-compare --steps 2
  fi
}
stage_racecheck() {
  if (( DRY )); then
    echo "# dry run: no compute-sanitizer; the cases ran in the memcheck stage's file"
    exit 99
  elif [[ -z "$SANITIZER" ]]; then
    echo "# compute-sanitizer is neither on PATH nor in \${CUDA_HOME:-/usr/local/cuda}/bin: racecheck not run"
    exit 99
  else
    "$SANITIZER" --tool racecheck --error-exitcode 1 \
      "$PY" "$CASES" --no-compare --steps 1 --cases grok,super-shared,super-global
  fi
}

# ---------------------------------------------------------------- 4: the step benchmark
stage_benchmark() {
  if (( DRY )); then
    "$PY" benchmarks/step_cuda.py --emulated --sizes 20k/10 --only grok,super --steps 1 \
      --repeats 1 --warmup 1 --max-seconds 5 --json "$OUT/$STEP.json"
  else
    "$PY" benchmarks/step_cuda.py --sizes 100M/200 --steps 5 --repeats 3 --warmup 2 \
      --copy-mib 256 --max-seconds 8 --json "$OUT/$STEP.json"
  fi
}

export -f stage_status stage_tests stage_memcheck stage_racecheck stage_benchmark
export CASES SANITIZER

run_stage status 105 "$OUT/gpu_${gpu}_status.txt" stage_status
if (( rc == 124 || rc == 137 )); then
  # A build cut off leaves torch.utils.cpp_extension's lock file in its build directory, and
  # every later load would wait on it: remove shardgrok's (no build of ours is running now),
  # so a later stage finishes the build where ninja left it.
  find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -maxdepth 3 -path '*/shardgrok_*/lock' \
    -print -delete 2>/dev/null | sed 's/^/removed a stale build lock: /' | tee -a "$SUMMARY"
fi
run_stage tests 70 "$OUT/gpu_${gpu}_tests.txt" stage_tests
run_stage memcheck 35 "$OUT/gpu_${gpu}_memcheck.txt" stage_memcheck
run_stage racecheck 25 "$OUT/gpu_${gpu}_racecheck.txt" stage_racecheck
run_stage benchmark 55 "$OUT/$STEP.txt" stage_benchmark

echo "total $(( SECONDS - START )) s of the ${DEADLINE} s deadline; $( ((failed)) && echo 'some stage failed' || echo 'every stage passed')" \
  | tee -a "$SUMMARY"
exit $failed
