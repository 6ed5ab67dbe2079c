"""The build: the extension is loaded, and every CUDA source compiles with nvcc for sm_90a (compile
only) whenever nvcc is on PATH, so CUDA code that does not compile fails CI without a GPU."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fastgen_kernels import _extension

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
