"""torch.compile(fullgraph=True) through the ops: a DiT adaLN-Zero block half, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

import fastgen_kernels as fk


def block(x, h, shift, scale, gate, weight):
    y = fk.modulated_layer_norm(x, shift, scale)
    y = fk.gelu_tanh(y @ weight)
    return fk.gated_residual(x, y, gate) + fk.modulated_rms_norm(h, shift, scale).sum()


def eager_block(x, h, shift, scale, gate, weight):
    D = x.shape[-1]
    y = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    y = F.gelu(y @ weight, approximate="tanh")
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


def attention_prologue(qkv, q_weight, k_weight, cos, sin):
    """QK-norm + rotary on q and k sliced from a fused qkv projection (strided heads)."""
    q, k, v = qkv.unbind(2)
    q, k = fk.qk_norm_rope(q, k, q_weight, k_weight, cos, sin)
    return (q * k).sum(-1, keepdim=True) * v


def eager_attention_prologue(qkv, q_weight, k_weight, cos, sin):
    q, k, v = qkv.unbind(2)

    def norm_rope(x, w):
        n = F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)
        a, b = n.unflatten(-1, (-1, 2)).unbind(-1)
        return n * cos[:, None] + torch.stack((-b, a), -1).flatten(-2) * sin[:, None]

    return (norm_rope(q, q_weight) * norm_rope(k, k_weight)).sum(-1, keepdim=True) * v


@pytest.mark.slow
def test_compile_fullgraph_qk_norm_rope():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    B, L, H, Dh = 2, 5, 2, 8
    inputs = [torch.randn(*s, generator=g) for s in [(B, L, 3, H, Dh), (Dh,), (Dh,)]]
    angles = torch.rand(L, Dh, generator=g) * 6.3
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = torch.compile(attention_prologue, fullgraph=True)(*leaves, angles.cos(), angles.sin())
    out.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref = eager_attention_prologue(*ref_leaves, angles.cos(), angles.sin())
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)
