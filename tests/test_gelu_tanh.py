"""gelu_tanh: the cpu kernel (every instruction-set copy) and the reference against an fp64 oracle
written from the tanh formula, gradients, forward-mode AD, opcheck, the DiT's MLP, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import CPU_DTYPES, cpu_isas, extension_backends
from tolerances import assert_close

import fastgen_kernels as fk

gelu_module = fk.ops.OP_MODULES["gelu_tanh"]

SHAPES = [(3 * 37 * 37,), (1,), (2, 5, 72), (1, 9, 4608)]


def oracle(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in fp64."""
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def make_input(shape, dtype, generator, magnitude=3.0):
    return (magnitude * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def check_against_oracle(backend, x, dtype, generator):
    leaf = x.detach().requires_grad_()
    with fk.use_backend(backend):
        out = fk.gelu_tanh(leaf)
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
    wide = x.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(oracle(wide), wide, grad_out.double())
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, oracle(x), dtype, "out")
    assert_close(grad, grad64, dtype, "dx")


@pytest.mark.parametrize("backend", extension_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_oracle(backend, dtype, shape, generator):
    check_against_oracle(backend, make_input(shape, dtype, generator), dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_every_cpu_instruction_set_matches_oracle(dtype, cpu_isa, generator):
    # 1000 elements: a vector body and a scalar tail in every copy
    check_against_oracle("cpu", make_input((1000,), dtype, generator), dtype, generator)


@pytest.mark.parametrize("backend", extension_backends())
def test_tails_and_large_magnitudes(backend):
    """Far tails (where 1 + tanh(u) cancels: the sigmoid form keeps the relative accuracy that
    the fp32 tanh form loses), 1e4 (x^3 overflows fp16 but not the fp32 arithmetic), zeros."""
    x = torch.tensor([-1e4, -30.0, -9.0, -5.0, -1e-3, 0.0, 1e-30, 2.5, 9.0, 1e4])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with fk.use_backend(backend):
            out = fk.gelu_tanh(x.to(dtype))
        assert torch.isfinite(out).all()
        assert_close(out, oracle(x.to(dtype)), dtype, f"tails {dtype}")


@pytest.mark.parametrize("backend", extension_backends())
def test_non_contiguous_input(backend, generator):
    x = torch.randn(8, 2 * 72, generator=generator)[:, ::2].t()
    check_against_oracle(backend, x, torch.float32, generator)


@pytest.mark.parametrize("backend", extension_backends())
def test_fp64_gradcheck_and_jvp(backend, generator):
    x = make_input((3, 7), torch.float64, generator).requires_grad_()
    tx = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(fk.gelu_tanh, (x,))
        out, tangent = torch.func.jvp(fk.gelu_tanh, (x.detach(),), (tx,))
    _, expected = torch.func.jvp(oracle, (x.detach(),), (tx,))
    torch.testing.assert_close(out, oracle(x.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_a_wider_tangent_than_the_input(generator):
    """A bf16 dual input with an fp32 tangent: the cpu kernel (one dtype) raised 'grad_out must
    match x' where the reference promotes; such a call now goes to the reference."""
    x = make_input((4, 8), torch.bfloat16, generator)
    tx = torch.randn(4, 8, generator=generator)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(
            fk.gelu_tanh(torch.autograd.forward_ad.make_dual(x, tx))).tangent
    _, expected = torch.func.jvp(oracle, (x.double(),), (tx.double(),))
    assert tangent.dtype == torch.bfloat16
    torch.testing.assert_close(tangent.double(), expected, rtol=2e-2, atol=1e-2)


def test_cpu_kernel_equals_aten_within_rounding(generator):
    """What the fused DiT computes against what the eager DiT computes (nn.GELU(tanh)), in fp32."""
    x = make_input((4096,), torch.float32, generator)
    torch.testing.assert_close(fk.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("backend", extension_backends())
def test_opcheck(backend, generator):
    x = make_input((2, 5, 8), torch.float32, generator)
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.gelu_tanh, (x.requires_grad_(),))
        torch.library.opcheck(torch.ops.fastgen.gelu_tanh_backward, (torch.randn_like(x), x.detach()))


def test_gpu_tensors_take_the_reference_path():
    """No CUDA or Triton kernel by design: a CUDA tensor is the reference's, one ATen op each way
    in the network's dtypes (an fp32 formula there once cost the H200's sCM step about 100 ms)."""
    reason, by_design = gelu_module.forward_dispatcher.reason("cuda", (torch.zeros(1),), automatic=True)
    assert by_design and "no cuda implementation" in reason

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):  # the ops that make tensors (not promote_types)
                self.names.append(func.overloadpacket.__name__)
            return out

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, grad = torch.randn(4, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
        with Ops() as forward:
            gelu_module.reference_forward(x)
        with Ops() as backward:
            gelu_module.reference_backward(grad, x)
        assert forward.names == ["gelu"] and backward.names == ["gelu_backward"], (forward.names, backward.names)


def test_bad_input():
    with pytest.raises(TypeError, match="gelu_tanh: x must be float16, bfloat16, float32 or float64"):
        fk.gelu_tanh(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="gelu_tanh: x must be a torch.Tensor"):
        fk.gelu_tanh([1.0, 2.0])
