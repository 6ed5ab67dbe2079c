"""ops.constant_operands: x + c and x * c under forward-mode AD with the tangent formed directly
(tx, tx * c) instead of through PyTorch's zero tangent for c. Values, tangents and gradients
against PyTorch's own rule; the plain paths (no dual level, a constant with a tangent, functorch);
and the fused DiT's exact JVP free of the zero tangents' Python meta kernels."""

import sys

import pytest
import torch
from torch.autograd import forward_ad

from fastgen_kernels import Denoiser
from fastgen_kernels.distill.base import jvp
from fastgen_kernels.models import DiT, DiTConfig
from fastgen_kernels.ops.constant_operands import add_constant, mul_constant

HELPERS = {"add": (add_constant, torch.add), "mul": (mul_constant, torch.mul)}
CONSTANTS = {  # x is (3, 1, 5) float32; constant: what broadcasts against it, promotions included
    "same_shape": lambda g: torch.randn(3, 1, 5, generator=g),
    "broadcast_up": lambda g: torch.randn(4, 5, generator=g),  # the result is (3, 4, 5)
    "fp64": lambda g: torch.randn(5, generator=g, dtype=torch.float64),  # the result is fp64
    "python_number": lambda g: 2.5,
}


@pytest.mark.parametrize("constant", CONSTANTS)
@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("grad_mode", [False, True])
def test_value_tangent_and_gradient_equal_pytorchs(generator, helper, constant, grad_mode):
    ours, theirs = HELPERS[helper]
    x = torch.randn(3, 1, 5, generator=generator, requires_grad=grad_mode)
    tx = torch.randn(3, 1, 5, generator=generator)
    c = CONSTANTS[constant](generator)
    with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
        got = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tx), c))
        expected = forward_ad.unpack_dual(theirs(forward_ad.make_dual(x, tx), c))
        assert got.primal.dtype == expected.primal.dtype and got.tangent.dtype == expected.tangent.dtype
        torch.testing.assert_close(got.primal, expected.primal, rtol=0, atol=0)
        torch.testing.assert_close(got.tangent, expected.tangent, rtol=0, atol=0)
        if grad_mode:  # the primal keeps its autograd graph
            (dx,) = torch.autograd.grad(got.primal.sum(), x)
            (expected_dx,) = torch.autograd.grad(theirs(x, c).sum(), x)
            torch.testing.assert_close(dx, expected_dx, rtol=0, atol=0)


@pytest.mark.parametrize("helper", HELPERS)
def test_plain_paths(generator, helper):
    """No dual level: the plain op; a constant that carries a tangent, or a functorch transform:
    PyTorch's rule."""
    ours, theirs = HELPERS[helper]
    x, c = torch.randn(4, 6, generator=generator), torch.randn(6, generator=generator)
    tx, tc = torch.randn(4, 6, generator=generator), torch.randn(6, generator=generator)
    torch.testing.assert_close(ours(x, c), theirs(x, c), rtol=0, atol=0)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tx), forward_ad.make_dual(c, tc))).tangent
        expected = forward_ad.unpack_dual(theirs(forward_ad.make_dual(x, tx), forward_ad.make_dual(c, tc))).tangent
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = torch.func.jvp(lambda a: ours(a, c), (x,), (tx,))
    expected = torch.func.jvp(lambda a: theirs(a, c), (x,), (tx,))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_dit_jvp_runs_no_python_meta_kernel(generator):
    """The exact JVP through the fused DiT (class labels, position table, time scaling and
    embedding, adaLN modulation) never takes PyTorch's zero-tangent path, whose sign is a call of
    a Python meta kernel (torch._meta_registrations, via torch._refs); the tangent still equals
    torch.func.jvp's (functorch: the helpers leave the constants to PyTorch's rules)."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=2, num_heads=2,
                        num_classes=3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    model = Denoiser(net.double(), "rf", "flow", time_scale=1000.0, time_shift=-1.0)
    x = torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(2, generator=generator, dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    cond = torch.tensor([0, 2])
    meta_calls = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(("_meta_registrations.py", "fake_impl.py")):
            meta_calls.append(frame.f_code.co_name)

    sys.setprofile(watch)
    try:
        exact = jvp(lambda a, s: model.raw(a, s, cond), (x, t), (tx, tt))
    finally:
        sys.setprofile(None)
    assert meta_calls == []
    _, expected = torch.func.jvp(lambda a, s: model.raw(a, s, cond), (x, t), (tx, tt))  # PyTorch's rules
    torch.testing.assert_close(exact, expected, rtol=1e-9, atol=1e-9)
