"""Triton kernels of the squared residual, r = a - b + k_b * c per element of sample b (math:
fastgen_kernels/ops/squared_residual.py): the per-(sample, chunk) partial sums of r^2 (scheme:
triton_ops/sample_reduce.py) and the elementwise out = s_b * r (and -out), also the VSD backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops import sample_reduce
from fastgen_kernels.triton_ops.sample_reduce import chunk_range, sample_scale


@triton.jit
def _sums_kernel(
    A,  # (B * numel,)
    Bt,  # (B * numel,)
    C,  # (B * numel,), read if HAS_C
    K,  # (B,) fp32, read if HAS_C
    PARTIALS,  # (B * chunks_per_sample,) fp32 output: sum r^2 over the chunk
    numel,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    chunks_per_sample,
    HAS_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    first, last = chunk_range(program, numel, chunk_size, chunks_per_sample)
    if HAS_C:
        k = tl.load(K + program // chunks_per_sample)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        r = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
            Bt + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_C:
            r += k * tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
        acc += r * r
    tl.store(PARTIALS + program, tl.sum(acc, axis=0))


@triton.jit
def _scaled_residual_kernel(
    A,  # (B * numel,)
    Bt,  # (B * numel,)
    C,  # (B * numel,), read if HAS_C
    K,  # (B,) fp32, read if HAS_C
    OUT,  # (B * numel,) output: s_b * r
    NEG,  # (B * numel,) output: -OUT, written if NEGATED
    total,  # B * numel
    numel,  # elements per sample
    FACTOR, factor_stride, GRAD, grad_stride,  # s_b (sample_reduce.sample_scale)
    HAS_C: tl.constexpr,
    NEGATED: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    sample = offs // numel
    r = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
        Bt + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        k = tl.load(K + sample, mask=mask, other=0.0)
        r += k * tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    out = sample_scale(FACTOR, factor_stride, GRAD, grad_stride, sample, mask, HAS_GRAD) * r
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    if NEGATED:
        tl.store(NEG + offs, (-out).to(NEG.dtype.element_ty), mask=mask)


def sums(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None) -> Tensor:
    """(B, chunks, 1) fp32 partial sums of r^2 per sample; k (B,) fp32 with c."""
    return sample_reduce.reduce(_sums_kernel, [a, b, c, k], 1, HAS_C=c is not None)


def scaled_residual(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None, factor: Tensor,
                    grad: Tensor | None, negated: bool) -> tuple[Tensor, Tensor]:
    """(s_b * r, its negation or an empty tensor), s_b = factor[b] * grad (sample_reduce.scale_args);
    k (B,) fp32."""
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    neg = torch.empty_like(out) if negated else a.new_empty(0)
    sample_reduce.elementwise(_scaled_residual_kernel, [a, b, c, k], [out, neg if negated else None],
                              **sample_reduce.scale_args(factor, grad), HAS_C=c is not None, NEGATED=negated)
    return out, neg
