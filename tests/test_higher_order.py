"""Derivatives of derivatives through the activation ops: a create_graph=True backward (a gradient
penalty such as R1 through a DiT) and torch.func.grad (whose backward always records a graph)
differentiate again: the backward computes the reference's gradients by autograd there
(ops/_eager_op.composition_gradients), as the kernels' gradients would differentiate as constants.
gradgradcheck in fp64 on the cpu and reference backends, torch.func.grad against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F

import fastgen_kernels as fk


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _cases(generator):
    """name: (op, plain PyTorch of it, inputs)."""
    x = _randn(generator, 2, 3, 8)
    shift, scale = _randn(generator, 2, 8), _randn(generator, 2, 8)
    weight, bias = _randn(generator, 8), _randn(generator, 8)
    q, k, v = _randn(generator, 1, 4, 2, 6), _randn(generator, 1, 5, 2, 6), _randn(generator, 1, 5, 2, 6)

    def plain_norm(x, shift, scale, weight, bias):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def plain_attention(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def plain_qk_norm(q, k, q_weight, k_weight):
        return F.rms_norm(q, q.shape[-1:], q_weight, eps=1e-6), F.rms_norm(k, k.shape[-1:], k_weight, eps=1e-6)

    return {
        "gelu_tanh": (fk.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), (x,)),
        "modulated_layer_norm": (fk.modulated_layer_norm, plain_norm, (x, shift, scale, weight, bias)),
        "attention": (fk.attention, plain_attention, (q, k, v)),
        "qk_norm_rope": (fk.qk_norm_rope, plain_qk_norm, (q, q.flip(1), _randn(generator, 6), _randn(generator, 6))),
    }


def _square_sum(fn):
    def total(*args):
        out = fn(*args)
        return sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
    return total


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", ["gelu_tanh", "modulated_layer_norm", "attention", "qk_norm_rope"])
def test_second_derivatives(case, backend, generator):
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    op, plain, inputs = _cases(generator)[case]
    leaves = tuple(t.clone().requires_grad_() for t in inputs)
    with fk.use_backend(backend):
        assert torch.autograd.gradgradcheck(op, leaves)
        got = torch.func.grad(_square_sum(op), argnums=tuple(range(len(inputs))))(*inputs)
    want = torch.func.grad(_square_sum(plain), argnums=tuple(range(len(inputs))))(*inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
