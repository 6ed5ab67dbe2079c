"""torch.compile(fullgraph=True) through the ops: a DiT adaLN-Zero block half, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

import fastgen_kernels as fk


def block(x, h, shift, scale, gate, weight):
    y = fk.modulated_layer_norm(x, shift, scale)
    y = F.gelu(y @ weight)
    return fk.gated_residual(x, y, gate) + fk.modulated_rms_norm(h, shift, scale).sum()


def eager_block(x, h, shift, scale, gate, weight):
    D = x.shape[-1]
    y = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    y = F.gelu(y @ weight)
    rms = F.rms_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return x + gate[:, None] * y + rms.sum()


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    B, L, D = 2, 5, 16
    inputs = [torch.randn(*s, generator=g) for s in [(B, L, D), (B, L, D), (B, D), (B, D), (B, D), (D, D)]]
    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(*leaves)
    out.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref = eager_block(*ref_leaves)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)
