"""ops.linear: inside parameters_without_tangents, a linear layer's forward-mode tangent is one GEMM
(tx W^T); elsewhere it is F.linear. Tangents, gradients, the GEMM count of a JVP through the
fused DiT, and the untouched paths (no flag, no forward mode, torch.compile)."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastgen_kernels.distill.base import jvp
from fastgen_kernels.models import DiT, DiTConfig
from fastgen_kernels.ops.linear import linear, parameters_without_tangents


def _layer(generator, dtype=torch.float64, B=3, L=5, K=12, N=7):
    x = torch.randn(B, L, K, generator=generator, dtype=dtype)
    weight = torch.randn(N, K, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, generator=generator, dtype=dtype, requires_grad=True)
    return x, weight, bias


def test_tangent_along_the_input_equals_pytorchs(generator):
    x, weight, bias = _layer(generator)
    tx = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    with torch.no_grad():
        expected = torch.func.jvp(lambda a: F.linear(a, weight, bias), (x,), (tx,))
        with parameters_without_tangents(), FlopCounterMode(display=False) as flops:
            got = torch.func.jvp(lambda a: linear(a, weight, bias), (x,), (tx,))
    assert flops.get_total_flops() == 2 * 2 * x.numel() * weight.shape[0]  # two GEMMs
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_with_grad_mode_on_it_is_f_linear(generator):
    """A backward may follow: the rule with every tangent, and F.linear's graph."""
    x, weight, bias = _layer(generator)
    tx = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    with parameters_without_tangents():
        out, tangent = torch.func.jvp(lambda a: linear(a, weight, bias), (x,), (tx,))
    assert "InputTangent" not in type(out.grad_fn).__name__
    torch.testing.assert_close(tangent, F.linear(tx, weight))


def test_outside_the_context_or_forward_mode_it_is_f_linear(generator):
    """Parameter tangents count where the caller did not say they are zero."""
    x, weight, bias = _layer(generator)
    tweight = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    _, tangent = torch.func.jvp(lambda w: linear(x, w, bias), (weight.detach(),), (tweight,))
    torch.testing.assert_close(tangent, F.linear(x, tweight))
    with parameters_without_tangents():
        out = linear(x, weight, bias)  # no dual level: plain F.linear, grad_fn included
    assert out.grad_fn is not None and "InputTangent" not in type(out.grad_fn).__name__
    compiled = torch.compile(lambda a: linear(a, weight, bias), fullgraph=True)
    with parameters_without_tangents(), torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, weight, bias))


def test_jvp_through_the_fused_dit_costs_two_forwards_of_gemms(generator):
    """The distillation methods' exact JVP (distill.base.jvp) through the fused DiT: the tangent
    of torch.func.jvp with PyTorch's own linear rule, for two forwards' matrix-multiply FLOPs
    (PyTorch's rule multiplies x by the weights' zero tangent too: three forwards' worth)."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        num_classes=10)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    t, labels = torch.rand(2, generator=generator, dtype=torch.float64), torch.tensor([1, 2])
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def fn(a, b):
        return net(a, b, labels)

    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            fn(x, t)
    with FlopCounterMode(display=False) as tangent:
        ours = jvp(fn, (x, t), (tx, tt))
    with torch.no_grad():  # the same network under PyTorch's rule for its linear layers
        _, expected = torch.func.jvp(fn, (x, t), (tx, tt))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    # 2.06 here (the small adaLN and embedding layers keep PyTorch's rule); 3.0 under PyTorch's
    assert tangent.get_total_flops() <= 2.1 * forward.get_total_flops()


def test_activation_linear_ops_under_torch_func_inside_the_context(generator):
    """gelu_tanh_linear and modulated_layer_norm_linear under torch.func.jvp and torch.func.grad
    inside parameters_without_tangents (their own Functions, written as forward(ctx, ...), are not
    for torch.func: there they run as the activation's Function and linear)."""
    import fastgen_kernels as fk

    x, weight, _ = _layer(generator)
    weight = weight.detach()
    tx = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    shift, scale = (torch.randn(x.shape[0], x.shape[-1], generator=generator, dtype=x.dtype) for _ in range(2))
    cases = [(lambda a: fk.gelu_tanh_linear(a, weight), lambda a: F.linear(F.gelu(a, approximate="tanh"), weight)),
             (lambda a: fk.modulated_layer_norm_linear(a, shift, scale, weight),
              lambda a: F.linear(F.layer_norm(a, a.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                                 weight))]
    for fused, plain in cases:
        with parameters_without_tangents():
            got = (*torch.func.jvp(fused, (x,), (tx,)), torch.func.grad(lambda a: fused(a).square().sum())(x))
        want = (*torch.func.jvp(plain, (x,), (tx,)), torch.func.grad(lambda a: plain(a).square().sum())(x))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
