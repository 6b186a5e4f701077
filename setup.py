"""Packaging: pyproject.toml holds the metadata. This file adds two steps.

- build_py copies the C++ and CUDA sources (csrc/) into the package as ``shardgrok/_csrc/``, so
  every wheel and every install from a wheel or an sdist (MANIFEST.in puts csrc/ in it) can
  build the kernels just in time, as a source checkout does. An editable install reads csrc/
  itself.
- The opt-in ahead-of-time build of the compiled step (the CPU kernel, and the CUDA kernel when
  torch has CUDA and nvcc is found; TORCH_CUDA_ARCH_LIST picks the architectures, as for any
  torch extension)::

      SHARDGROK_BUILD_KERNELS=1 pip install --no-build-isolation .

  (torch must already be installed: the extension is compiled against it). Without the variable
  nothing is compiled at install time and the kernel is built just in time on first use
  (shardgrok/kernels/build.py, which holds the sources and flags both builds use).
"""
import importlib
import os
import pathlib
import sys
import types

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
CSRC = "csrc"
#: what build_py ships of csrc/: sources and their notes, never a stray build output
SHIPPED = {".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu", ".md"}


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = HERE / CSRC
        files = sorted(f for f in src.rglob("*") if f.is_file() and f.suffix in SHIPPED)
        if not files:
            raise FileNotFoundError(f"no C++ sources in {src}: an install of shardgrok without "
                                    "them could not build its kernels")
        dst = pathlib.Path(self.build_lib) / "shardgrok" / "_csrc"
        for f in files:
            out = dst / f.relative_to(src)
            self.mkpath(str(out.parent))
            self.copy_file(str(f), str(out))


def _kernels_build():
    """shardgrok/kernels/build.py, imported without shardgrok/__init__.py (which needs more
    than torch): its directory as a package of its own, so its relative import works."""
    pkg = types.ModuleType("_sg_kernels")
    pkg.__path__ = [str(HERE / "shardgrok" / "kernels")]
    sys.modules["_sg_kernels"] = pkg
    return importlib.import_module("_sg_kernels.build")


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("SHARDGROK_BUILD_KERNELS") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension

    build = _kernels_build()
    ext_modules = [build.CPU.setup_extension(CSRC)]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(build.CUDA.setup_extension(CSRC))
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
