"""Packaging: pyproject.toml holds the metadata. This file only adds the opt-in ahead-of-time
build of the compiled step (the CPU kernel, and the CUDA kernel when torch has CUDA and nvcc is
found; TORCH_CUDA_ARCH_LIST picks the architectures, as for any torch extension):

    SHARDGROK_BUILD_KERNELS=1 pip install --no-build-isolation .

(torch must already be installed: the extension is compiled against it). Without the variable
nothing is compiled at install time and the kernel is built just in time on first use
(shardgrok/kernels/build.py, which holds the sources and flags both builds use).
"""
import importlib.util
import os
import pathlib

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SHARDGROK_BUILD_KERNELS") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    here = pathlib.Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_sg_build", here / "shardgrok/kernels/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext_modules = [CppExtension(
        "shardgrok._C_cpu",
        sources=[f"csrc/{f}" for f in build.CPU_SOURCES],
        include_dirs=[str(here / "csrc")],
        extra_compile_args=[*build.CFLAGS, build.digest_flag(build.digest())],
        extra_link_args=list(build.LDFLAGS),
    )]
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(CUDAExtension(
            "shardgrok._C_cuda",
            sources=[f"csrc/{f}" for f in build.CUDA_SOURCES],
            include_dirs=[str(here / "csrc")],
            extra_compile_args={"cxx": ["-O3", build.digest_flag(build.cuda_digest())],
                                "nvcc": [*build.CUDA_FLAGS, build.digest_flag(build.cuda_digest())]},
        ))
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
