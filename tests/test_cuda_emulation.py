"""The CUDA kernels run on the CPU: csrc/cuda's modulated norm, gated residual, QK-norm + rotary
and loss tail, compiled as host C++ with their launches rewritten to tests/cuda_emulation/emu.h's
emulation of the thread blocks (an OS thread per CUDA thread, real barriers and warp shuffles),
against fp64 references (tests/cuda_emulation/kernels_test.cpp). Without a GPU this is where their indexing,
coverage, barriers and reductions run at all; nvcc's compile check (test_build.py) says nothing of
those. Needs the CUDA headers (nvcc's installation) and a C++20 compiler.

    FASTGEN_CUDA_EMULATION=full python -m pytest tests/test_cuda_emulation.py   # + wider rows (minutes)
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent / "cuda_emulation"
KERNELS = ["modulated_norm.cu", "gated_residual.cu", "qk_norm_rope.cu", "sample_loss_tail.cu"]
# name<...><<<grid, block, shared, stream>>>(  ->  emu::launch(grid, block, shared, stream, name<...>,
LAUNCH = re.compile(r"(\w+_kernel(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\(", re.S)


def _cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parents[1]))
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_fp16.h").exists()), None)


def test_launch_rewrite_covers_every_launch():
    """Each kernel file's launches all become emu::launch calls (a missed one would not compile)."""
    for name in KERNELS:
        source = (ROOT / "csrc" / "cuda" / name).read_text()
        rewritten, count = LAUNCH.subn("", source)
        assert count > 0 and "<<<" not in rewritten, name


@pytest.mark.slow
@pytest.mark.skipif(_cuda_include() is None or shutil.which("c++") is None,
                    reason="CUDA headers (nvcc's installation) or c++ not found")
def test_cuda_kernels_under_emulation(tmp_path):
    sources = []
    for name in KERNELS:
        source = (ROOT / "csrc" / "cuda" / name).read_text()
        rewritten = LAUNCH.sub(lambda m: f"emu::launch({m.group(2)}, {m.group(1)}, ", source)
        target = tmp_path / f"{name}.cpp"
        target.write_text('#include "emu.h"\n' + rewritten)
        sources.append(target)
    binary = tmp_path / "kernels_test"
    command = ["c++", "-std=c++20", "-O1", "-pthread", "-w", f"-I{HERE}", f"-I{ROOT / 'csrc'}",
               f"-I{_cuda_include()}", *map(str, sources), str(HERE / "runtime_stubs.cpp"),
               str(HERE / "kernels_test.cpp"), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(command)}\n{build.stderr[-4000:]}"
    mode = ["full"] if os.environ.get("FASTGEN_CUDA_EMULATION") == "full" else []
    result = subprocess.run([str(binary), *mode], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 failures" in result.stdout
