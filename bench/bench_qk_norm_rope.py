"""qk_norm_rope at Flux and DiT-XL shapes: our backends vs the eager diffusers composition and
torch.compile of it.

Run: ``pytest bench/bench_qk_norm_rope.py`` (add ``--benchmark-json=out.json`` for the record).
q and k are sliced from a fused (B, L, 3, H, Dh) qkv projection, as in the models. Bytes moved
(analytic, the minimum any implementation must move), with n = B * L * H * Dh elements per
tensor: forward reads q, k and writes both outputs (4 n); forward+backward also reads the two
upstream gradients, q and k and writes dq and dk (6 n more); the JVP (forward-mode AD along q and
k, their tangents sliced from a fused qkv tangent, no grad) also reads the two tangents and writes
the outputs' (4 n more). The (L, Dh) tables are negligible. The JVP's peer is PyTorch's
forward-mode AD through the eager composition (torch.compile does not trace dual tensors: no
compile row).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import ALL_PROVIDERS, pick_provider, rotating, run

import fastgen_kernels as fk

# (B, L, H, Dh): Flux (24 heads of 128, 4096 tokens); DiT-XL/2 at 256 px (16 heads of 72)
SHAPES = [(1, 4096, 24, 128), (32, 256, 16, 72)]
DTYPES = [torch.float32, torch.bfloat16]


def rms_norm_eager(x, weight, eps=1e-6):
    """diffusers' RMSNorm: fp32 statistics, the product in the weight's dtype."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return x.to(weight.dtype) * weight


def rope_eager(x, cos, sin):
    """diffusers' apply_rotary_emb (use_real_unbind_dim=-1) for (B, L, H, Dh) heads."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), -1).flatten(3)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


def eager(q, k, q_weight, k_weight, cos, sin):
    return (rope_eager(rms_norm_eager(q, q_weight), cos, sin),
            rope_eager(rms_norm_eager(k, k_weight), cos, sin))


_compiled = torch.compile(eager, dynamic=False)


def fused(q, k, q_weight, k_weight, cos, sin):
    return fk.qk_norm_rope(q, k, q_weight, k_weight, cos, sin)


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward", "jvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qk_norm_rope(benchmark, device, shape, dtype, mode, provider):
    if mode == "jvp" and provider == "compile":
        pytest.skip("torch.compile does not trace forward-mode AD")
    B, L, H, Dh = shape
    fn, backend = pick_provider(provider, device, eager, _compiled, fused)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = B * L * H * Dh
    grad = mode == "forward_backward"

    def make_inputs():
        qkv = torch.randn(B, L, 3, H, Dh, device=device, dtype=dtype, requires_grad=grad)
        q, k, _ = qkv.unbind(2)
        weights = [torch.randn(Dh, device=device, dtype=dtype, requires_grad=grad) for _ in range(2)]
        angles = torch.rand(L, Dh, device=device) * 6.3
        if mode == "jvp":  # q's and k's tangents, sliced as they are
            grads = torch.randn(B, L, 3, H, Dh, device=device, dtype=dtype).unbind(2)[:2]
        else:
            grads = [torch.randn(B, L, H, Dh, device=device, dtype=dtype) for _ in range(2)]
        return (q, k, *weights, angles.cos(), angles.sin()), grads

    # a set's bytes that a call reads: q and k, and their upstream gradients or tangents
    next_inputs = rotating(make_inputs, device, (2 if mode == "forward" else 4) * n * itemsize)

    def step(fn, backend):
        inputs, grads = next_inputs()
        with fk.use_backend(backend):
            if mode == "jvp":  # grads are q's and k's tangents
                with torch.no_grad(), fwAD.dual_level():
                    duals = [fwAD.make_dual(x, t) for x, t in zip(inputs[:2], grads)]
                    [fwAD.unpack_dual(out).tangent for out in fn(*duals, *inputs[2:])]
                return
            outs = fn(*inputs)
            if mode == "forward_backward":
                torch.autograd.grad(outs, inputs[:4], grads)

    benchmark.group = f"qk_norm_rope {device} {dtype} {mode} {B}x{L}x{H}x{Dh}"
    run(benchmark, lambda: step(fn, backend), device,
        peer_key=(device, shape, dtype, mode), peer_fn=lambda: step(eager, None),
        bytes_moved={"forward": 4, "forward_backward": 10, "jvp": 8}[mode] * n * itemsize,
        op="qk_norm_rope", provider=provider, dtype=str(dtype), mode=mode, shape=list(shape))
