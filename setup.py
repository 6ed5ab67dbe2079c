"""Builds the torch extension fastgen_kernels._C; sources and flags come from csrc/build.json.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already
installed (build isolation would download another one). The C++ CPU kernels always build; the CUDA
kernels build when torch has CUDA and nvcc is found, unless FASTGEN_SKIP_CUDA_BUILD=1.
"""

import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_config() -> dict:
    with open(os.path.join(ROOT, "csrc", "build.json")) as f:
        return json.load(f)


def sources(patterns: list[str]) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths.
    return [path for pattern in patterns for path in sorted(glob.glob(pattern, root_dir=ROOT))]


def cuda_skip_reason(torch) -> str | None:
    if os.environ.get("FASTGEN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "FASTGEN_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def extension_modules() -> tuple[list, dict]:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    config = build_config()
    kwargs = dict(
        name="fastgen_kernels._C",
        sources=sources(config["cpp_sources"]),
        include_dirs=[os.path.join(ROOT, d) for d in config["include_dirs"]],
        extra_compile_args={"cxx": list(config["cxx_flags"])},
        extra_link_args=list(config["link_flags"]),
    )
    skip = cuda_skip_reason(torch)
    if skip is None:
        kwargs["sources"] += sources(config["cuda_sources"])
        kwargs["extra_compile_args"]["cxx"].append("-DFASTGEN_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = config["nvcc_flags"] + config["gencode"]
        extension = CUDAExtension(**kwargs)
    else:
        print(f"fastgen_kernels: building the C++ CPU kernels only; CUDA kernels skipped: {skip}")
        extension = CppExtension(**kwargs)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
