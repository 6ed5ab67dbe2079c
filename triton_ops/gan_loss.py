"""Triton kernels of the GAN logit losses (math: fastgen_kernels/ops/gan_loss.py), z = sign * x with
sign = -1 if NEGATIVE else 1: per-(sample, chunk) partial sums of softplus(z) (scheme:
triton_ops/sample_reduce.py) and the elementwise backward out = s_b * sign * sigmoid(z)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops import sample_reduce
from fastgen_kernels.triton_ops.sample_reduce import chunk_range, sample_scale


@triton.jit
def _sums_kernel(
    X,  # (B * numel,) logits
    PARTIALS,  # (B * chunks_per_sample,) fp32 output: sum softplus(z) over the chunk
    numel,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    chunks_per_sample,
    NEGATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    first, last = chunk_range(program, numel, chunk_size, chunks_per_sample)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if NEGATIVE:
            z = -z
        # softplus(z) = max(z, 0) + log1p(e^-|z|): no overflow. log1p(u) as log(w) u / (w - 1) with
        # w = 1 + u (Goldberg's): log(1 + u) alone loses u's digits below fp32's epsilon (0 for u < 6e-8)
        u = tl.exp(-tl.abs(z))
        w = 1.0 + u
        softplus = tl.maximum(z, 0.0) + tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
        acc += tl.where(mask, softplus, 0.0)
    tl.store(PARTIALS + program, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(
    X,  # (B * numel,) logits
    OUT,  # (B * numel,) output: s_b * sign * sigmoid(z)
    total,  # B * numel
    numel,  # elements per sample
    FACTOR, factor_stride, GRAD, grad_stride,  # s_b (sample_reduce.sample_scale)
    NEGATIVE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = sample_scale(FACTOR, factor_stride, GRAD, grad_stride, offs // numel, mask, HAS_GRAD)
    if NEGATIVE:
        z = -z
        s = -s
    out = s / (1.0 + tl.exp(-z))
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def sums(x: Tensor, negative: bool) -> Tensor:
    """(B, chunks, 1) fp32 partial sums of softplus(z) per sample."""
    return sample_reduce.reduce(_sums_kernel, [x], 1, NEGATIVE=negative)


def backward(x: Tensor, negative: bool, factor: Tensor, grad: Tensor | None) -> Tensor:
    """s_b * sign * sigmoid(z), s_b = factor[b] * grad (sample_reduce.scale_args)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    sample_reduce.elementwise(_backward_kernel, [x], [out], **sample_reduce.scale_args(factor, grad),
                              NEGATIVE=negative)
    return out
