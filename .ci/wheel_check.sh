#!/usr/bin/env bash
# What CI checks of the packaging, before the tests: the wheel built from the sdist, installed
# into a fresh virtual environment, must build the CPU kernel just in time from the sources it
# carries and step with it (python -m shardgrok.kernels and a GrokAdamW step with
# backend="kernel", both run from outside the checkout); the sdist installed over it must give
# the same sources. Most of the time is the one kernel build (about a minute on 2 idle cores).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

# The checkout's files (tracked, and new ones not ignored), so the build writes nothing into it.
mkdir "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -C "$work/src" -xf -

step "a fresh virtual environment, pinned torch"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# torch pinned and first: an unpinned torch requirement would pull the multi-GB CUDA build.
# --no-compile: byte-compiling torch's thousands of files is most of its install time.
"$py" -m pip install -q --no-compile -c "$root/constraints.txt" \
  "torch==$(sed -n 's/^torch==//p' "$root/constraints.txt")" build
step "the sdist, and the wheel from it"
"$py" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=("$work"/dist/shardgrok-*.tar.gz)
wheel=("$work"/dist/shardgrok-*.whl)

# Outside the checkout, with nothing of it on the path and a kernel cache of its own.
unset PYTHONPATH SHARDGROK_BACKEND SHARDGROK_CPU_ISA SHARDGROK_REQUIRE_KERNEL
export TORCH_EXTENSIONS_DIR="$work/torch_extensions"
export PYTHONWARNINGS="ignore:Failed to initialize NumPy"  # torch's, without numpy installed
check() {
  (cd "$work" && "$py" -m shardgrok.kernels) | tee "$work/report.txt"
  grep -q "^cpu kernel: available (just-in-time build" "$work/report.txt"
  (cd "$work" && "$py" - "$work/venv") <<'PY'
import pathlib, sys
import torch
import shardgrok
from shardgrok.kernels import header
package = pathlib.Path(shardgrok.__file__).resolve().parent
assert package.is_relative_to(pathlib.Path(sys.argv[1]).resolve()), f"imported {package}"
assert header.find_csrc() == package / "_csrc", header.find_csrc()
params = [torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
          for _ in range(2)]
opts = [shardgrok.GrokAdamW([p], lr=1e-2, backend=b) for p, b in zip(params, ("kernel", "reference"))]
for t in range(3):
    for p, o in zip(params, opts):
        p.grad = torch.sin(torch.arange(1000.0) + t)
        o.step()
assert opts[0].get_state_summary()["backend"] == "kernel"
diff = float((params[0] - params[1]).detach().abs().max())
assert diff < 1e-6, f"kernel and reference differ by {diff}"
print(f"GrokAdamW step: backend kernel, {diff:.1e} from the reference; package at {package}")
PY
}

step "install ${wheel[0]##*/} (built from the sdist)"
"$py" -m pip install -q -c "$root/constraints.txt" "${wheel[0]}"
step "check it: the kernel is built just in time"
check
# The wheel above was built from the sdist; installing the sdist itself must give the same
# package. Its kernel is not built again: the reinstalled sources are newer than the objects, so
# ninja would recompile everything; the same digest says it would compile the same extension.
step "install ${sdist[0]##*/}, compare"
digest() { (cd "$work" && "$py" -c "from shardgrok.kernels import build as b; print(b.CPU.digest(), b.CUDA.digest(), b.CSRC, b.CPU.missing() + b.CUDA.missing())"); }
from_wheel="$(digest)"
"$py" -m pip install -q --no-deps --force-reinstall "${sdist[0]}"
from_sdist="$(digest)"
[[ "$from_sdist" == "$from_wheel" ]] || { echo "the sdist install differs: $from_sdist, not $from_wheel" >&2; exit 1; }
echo "same sources as the wheel's (digests, location, nothing missing): $from_sdist"
echo "wheel check passed in $((SECONDS - start)) s"
