"""`python -m fastgen_kernels info` and the `fastgen-kernels` entry point."""

import shutil
import subprocess
import sys

import pytest

from fastgen_kernels import cli


def test_info_reports_versions_build_and_backends():
    report = cli.info()
    for needle in ("torch", "triton", "extension CPU", "extension CUDA", "GPU",
                   "fastgen.modulated_norm", "fastgen.gated_residual_backward"):
        assert needle in report


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastgen_kernels", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "fastgen.modulated_norm" in out


@pytest.mark.skipif(shutil.which("fastgen-kernels") is None, reason="package not installed")
def test_console_script_runs():
    out = subprocess.run(["fastgen-kernels", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend" in out
