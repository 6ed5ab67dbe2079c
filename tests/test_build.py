"""The build: the extension is loaded, every CUDA source compiles with nvcc for sm_90a (compile
only) whenever nvcc is on PATH, and every Triton kernel compiles for sm_90 within Hopper's shared
memory, so GPU code that does not compile fails CI without a GPU."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fastgen_kernels import _extension, backends

ROOT = Path(__file__).resolve().parents[1]
CONFIG = json.loads((ROOT / "csrc" / "build.json").read_text())
CUDA_SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))


def test_extension_cpu_kernels_are_built():
    assert _extension.cpu_built(), _extension.unavailable_reason()


def test_build_config_lists_every_source():
    listed = {p for pattern in CONFIG["cpp_sources"] + CONFIG["cuda_sources"] for p in ROOT.glob(pattern)}
    on_disk = set(ROOT.glob("csrc/**/*.cpp")) | set(CUDA_SOURCES)
    assert on_disk == listed, f"sources missing from csrc/build.json: {sorted(on_disk - listed)}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90a(source, tmp_path):
    command = ["nvcc", "-c", str(source), "-o", str(tmp_path / "out.o"), "-Xcompiler", "-Wall",
               "-Werror", "all-warnings",
               *CONFIG["nvcc_flags"], *CONFIG["hopper_gencode"],
               *[f"-I{ROOT / d}" for d in CONFIG["include_dirs"]]]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None,
                    reason="nvcc or c++ not on PATH")
def test_cuda_glue_in_bindings_compiles(tmp_path):
    """torch_bindings.cpp with FASTGEN_WITH_CUDA (the Tensor-to-launch glue), syntax-checked even
    where torch is a CPU build. A CPU wheel lacks one generated c10/cuda header; a one-line
    stand-in supplies it."""
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    includes = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not includes:
        pytest.skip("CUDA headers not found (set CUDA_HOME)")
    cuda_include = includes[0]
    python_include = sysconfig.get_paths()["include"]
    command = ["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-Wno-c++20-extensions",
               "-DFASTGEN_WITH_CUDA", *[f"-I{p}" for p in include_paths()], f"-I{tmp_path}",
               f"-I{cuda_include}", f"-I{python_include}",
               *[f"-I{ROOT / d}" for d in CONFIG["include_dirs"]], str(ROOT / "csrc" / "torch_bindings.cpp")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
def test_triton_kernels_compile_for_hopper():
    """tests/compile_triton_for_hopper.py in a process of its own: the interpreter (which this
    test session uses) does not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_triton_for_hopper.py")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


ISA_COPIES = sorted(ROOT.glob("csrc/cpu/*_kernels.cpp"))


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64"
                    or shutil.which("c++") is None or shutil.which("objdump") is None,
                    reason="x86-64 Linux with c++ and objdump")
@pytest.mark.parametrize("source", ISA_COPIES, ids=lambda p: p.name)
def test_instruction_set_copy_keeps_wide_code_in_its_namespace(source, tmp_path):
    """An AVX2 / AVX-512 copy of the CPU kernels (csrc/cpu/isa.h) may emit vector-extension
    code only in its own namespace: a library inline function compiled there for AVX (a header
    included after the `#pragma GCC target`) could be the copy the linker keeps for everyone,
    and crash a CPU without it. Compiles the copy as the build does and reads its machine code."""
    from torch.utils.cpp_extension import include_paths

    isa = source.name.split("_")[0]
    obj = tmp_path / "copy.o"
    command = ["c++", "-std=c++17", "-fPIC", "-c", *CONFIG["cxx_flags"],
               *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
               *[f"-I{ROOT / d}" for d in CONFIG["include_dirs"]], str(source), "-o", str(obj)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)],
                             capture_output=True, text=True, check=True).stdout
    function, wide, outside = None, 0, set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
        elif function and any(op in line for op in ("%ymm", "%zmm", "%xmm")) and "\tv" in line:
            wide += 1  # a VEX/EVEX-encoded (v...) instruction
            if f"fastgen::cpu::{isa}::" not in function:
                outside.add(function)
    assert wide > 0, f"{source.name} compiled to no {isa} code"
    assert not outside, f"{isa} code outside fastgen::cpu::{isa}: {sorted(outside)[:5]}"
