"""CUDA and Triton kernels on a GPU against the fp64 oracle. Skipped without CUDA; run by
bench/gpu_check.sh whenever a GPU is lent."""

import pytest
import torch
import test_gated_residual as gr
import test_modulated_norm as mn
from conftest import HAS_CUDA
from tolerances import assert_close

import fastgen_kernels as fk
from fastgen_kernels import _extension

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# DiT-XL/2 at 256 px and 512 px, odd D (scalar path: 77 is no multiple of a 16-byte vector), wide D
GPU_SHAPES = [(8, 256, 1152), (2, 1024, 1152), (3, 17, 77), (1, 1, 1000), (2, 3, 8192)]


def gpu_backends():
    marks = [] if _extension.cuda_built() else [pytest.mark.skip(reason="extension built without CUDA")]
    return [pytest.param("cuda", marks=marks), "triton"]


def to_cuda(inputs):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(mn.VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_modulated_norm_on_gpu(backend, dtype, shape, variant, per_token, generator):
    inputs = to_cuda(mn.make_inputs(shape, dtype, variant, per_token, generator))
    mn.check_against_oracle(backend, inputs, dtype, generator)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_gated_residual_on_gpu(backend, dtype, shape, per_token, generator):
    inputs = to_cuda(gr.make_inputs(shape, dtype, per_token, generator))
    gr.check_against_oracle(backend, inputs, dtype, generator)


@pytest.mark.parametrize("backend", gpu_backends())
def test_misaligned_and_non_contiguous_inputs(backend, generator):
    """Tensors that start one element past a 16-byte boundary take the scalar path."""
    B, L, D = 2, 3, 1152
    flat = torch.randn(B * L * D + 1, generator=generator).cuda().bfloat16()
    x = flat[1:].view(B, L, D)
    shift = torch.randn(D, B, generator=generator).cuda().bfloat16().t()
    scale = torch.randn(B, D, generator=generator).cuda().bfloat16()
    mn.check_against_oracle(backend, (x, shift, scale, None, None, False), torch.bfloat16, generator)
    gr.check_against_oracle(backend, (x, x.clone(), shift), torch.bfloat16, generator)


@pytest.mark.parametrize("backend", gpu_backends())
def test_backward_is_deterministic(backend, generator):
    x, shift, scale, weight, bias, _ = to_cuda(mn.make_inputs((4, 300, 1152), torch.bfloat16, "layer_affine", False, generator))
    leaves = [t.requires_grad_() for t in (x, shift, scale, weight, bias)]
    g = torch.randn_like(x)
    with fk.use_backend(backend):
        first = torch.autograd.grad(fk.modulated_layer_norm(*leaves), leaves, g)
        second = torch.autograd.grad(fk.modulated_layer_norm(*leaves), leaves, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", gpu_backends())
def test_opcheck_on_gpu(backend, generator):
    x, shift, scale, weight, bias, rms = to_cuda(mn.make_inputs((2, 3, 64), torch.bfloat16, "layer_affine", False, generator))
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.modulated_norm.default, (x, shift, scale, weight, bias, 1e-6, rms))
        torch.library.opcheck(torch.ops.fastgen.gated_residual.default, (x, x.clone(), shift))


def test_automatic_choice_prefers_cuda_then_triton():
    x = torch.randn(2, 3, 64, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    expected = "cuda" if _extension.cuda_built() else "triton"
    assert fk.ops.OP_MODULES["modulated_norm"].forward_dispatcher.select(x, mod, mod, None, None, 1e-6, False) == expected
