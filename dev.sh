#!/usr/bin/env bash
# Sets up a virtual environment (once) and runs one of: demo, test.
#   ./dev.sh demo [demo args]     train the grokking demo with AdamW, GrokAdamW and SuperGrok
#   ./dev.sh test [pytest args]   run the test suite (what CI runs)
# torch is pinned and installed first: an unpinned torch would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SHARDGROK_VENV:-.venv}"
PY="$VENV/bin/python"
stamp="$VENV/.shardgrok-installed"

if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || constraints.txt -nt "$stamp" ]]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -c constraints.txt "torch==$(sed -n 's/^torch==//p' constraints.txt)"
  "$PY" -m pip install -q -c constraints.txt -e ".[test,demo]"
  touch "$stamp"
fi

# DeepSpeed JIT-builds a communication op on its first start (about 30 s) and shardgrok its CPU
# kernel (about a minute on 2 cores); every later process reuses them from here.
case "$VENV" in /*) venv_dir="$VENV" ;; *) venv_dir="$PWD/$VENV" ;; esac
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv_dir/torch_extensions}"
# As if the environment were activated: every process, and every subprocess a test starts, then
# finds the same pinned ninja. A system ninja of another version keeps a log ninja of the pinned
# version reads as stale, and each switch between the two rebuilt the whole kernel (~40 s, a few
# times per suite run).
export PATH="$venv_dir/bin:$PATH"

cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec "$PY" -m shardgrok.demo "$@" ;;
  test)
    # Build the compiled step first (cached with the comm op above) and require it: every test
    # then runs on the kernel wherever it takes the tensors.
    "$PY" -m shardgrok.kernels
    export SHARDGROK_REQUIRE_KERNEL=1
    exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
