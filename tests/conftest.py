"""Shared test setup.

Without a GPU, Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported). Every test runs with torch's deterministic mode, which fills uninitialized memory with
NaN: outputs a kernel fails to write cannot pass.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTGEN_BACKEND", None)  # tests choose backends explicitly

from fastgen_kernels import _extension, backends  # noqa: E402

CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bf16 dots are wrong in the interpreter, but these ops have no dots: bf16 runs there too.
TRITON_INTERPRETER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def count_fp8_quantizations(patch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts, from now on under ``patch``, the FP8 inputs written by the fused norm ("norm_fp8")
    and by fp8_linear's own quantizer ("quantize"): the live counts."""
    import fastgen_kernels as fk

    calls = {"norm_fp8": 0, "quantize": 0}
    targets = {"norm_fp8": (fk.ops.OP_MODULES["modulated_norm_fp8"], "_modulated_norm_fp8"),
               "quantize": (fk.ops.OP_MODULES["fp8_linear"], "_quantize_rows")}
    for name, (module, attribute) in targets.items():
        original = getattr(module, attribute)

        def counted(*args, name=name, original=original):
            calls[name] += 1
            return original(*args)
        patch.setattr(module, attribute, counted)
    return calls


def cpu_backends() -> list:
    """Backends that run CPU tensors here, as pytest params (unavailable ones skip with why)."""
    params = []
    for name in ("cpu", "triton", "reference"):
        why = None
        if name == "cpu" and not _extension.cpu_built():
            why = _extension.unavailable_reason()
        if name == "triton" and (HAS_CUDA or not backends.triton_installed()):
            why = "the Triton interpreter runs only on machines without a GPU, with triton installed"
        params.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


def extension_backends():
    """cpu and reference, the backends that run fp64 (cpu skips when the extension is missing)."""
    marks = [] if _extension.cpu_built() else [pytest.mark.skip(reason="extension not built")]
    return [pytest.param("cpu", marks=marks), "reference"]


ISAS = ["baseline", "avx2", "avx512"]


def cpu_isas():
    """The instruction sets of the CPU kernels this machine runs (csrc/cpu/isa.h)."""
    if not _extension.cpu_built():
        return [pytest.param("baseline", marks=pytest.mark.skip(reason="extension not built"))]
    widest = torch.ops.fastgen_C.cpu_isa()
    return ISAS[:ISAS.index(widest) + 1]


@pytest.fixture
def cpu_isa(request):
    """Runs the test with the CPU kernels of instruction set request.param, then restores."""
    previous = torch.ops.fastgen_C.cpu_isa()
    torch.ops.fastgen_C.cpu_isa(request.param)
    yield request.param
    torch.ops.fastgen_C.cpu_isa(previous)


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (and at::empty in the extension) returns NaN-filled memory in this mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seed per test, printed on failure by pytest through the fixture value."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def single_rank_process_group():
    """A one-process gloo group and its CPU mesh: DTensors and FSDP2 on the CPU."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
