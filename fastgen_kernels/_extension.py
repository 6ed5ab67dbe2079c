"""Loads the compiled extension ``fastgen_kernels._C`` if it was built.

The extension registers the C++ kernels as ops in the namespace ``fastgen_C`` (CPU kernels always,
CUDA kernels when the build found CUDA). The package works without it: the dispatcher then falls
back to Triton or the PyTorch reference and says so once.
"""

from __future__ import annotations

import importlib

try:
    # Importing it registers the fastgen_C ops with the dispatcher.
    _C = importlib.import_module("fastgen_kernels._C")
    IMPORT_ERROR = ""
except ModuleNotFoundError:
    _C = None
    IMPORT_ERROR = "not built"
except ImportError as error:  # built, but against another torch or toolchain
    _C = None
    IMPORT_ERROR = f"failed to load: {error}"


def cpu_built() -> bool:
    """True when the extension's C++ CPU kernels are loaded."""
    return _C is not None


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built)


def unavailable_reason() -> str:
    """Why the extension is not loaded (for logs and `fastgen-kernels info`)."""
    if _C is not None:
        return ""
    return f"extension fastgen_kernels._C {IMPORT_ERROR} (pip install --no-build-isolation -e .)"


def native_op(name: str):
    """The extension's op ``fastgen_C::name`` (one with its autograd in C++), or None without the
    extension."""
    import torch

    return None if _C is None else getattr(torch.ops.fastgen_C, name).default
