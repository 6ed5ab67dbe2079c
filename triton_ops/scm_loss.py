"""Triton kernels of the sCM loss (math: fastgen_kernels/ops/scm_loss.py). Inputs (F, F_minus,
dxt_dt, jvp, x_t); per sample the tangent g = p . (F_minus, dxt_dt, jvp, x_t) with
p = (-cos^2 t sigma_data, cos^2 t, -warmup sigma_data, -warmup cos t sin t) at t = T[b]
(csrc/sample_loss_tail.h scm_coefficients), and d = F - F_minus. Forward: per-(sample, chunk) partial sums of (g^2, d g, d^2) (scheme:
triton_ops/sample_reduce.py). Backward: out = s_b * (d - q . (F_minus, dxt_dt, jvp, x_t))."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops import sample_reduce
from fastgen_kernels.triton_ops.sample_reduce import chunk_range, sample_scale


@triton.jit
def _load_inputs(F, FM, DX, J, XT, offs, mask):
    """The five inputs at offs, in fp32."""
    return (tl.load(F + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(FM + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(DX + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(J + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(XT + offs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _sums_kernel(
    F, FM, DX, J, XT,  # (B * numel,) each: F, F_minus, dxt_dt, jvp, x_t
    T,  # (B,) fp32 TrigFlow times
    PARTIALS,  # (B * chunks_per_sample, 3) fp32 output: (sum g^2, sum d g, sum d^2)
    numel,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    chunks_per_sample,
    sigma_data,
    jvp_weight,  # the warm-up factor (Triton's launcher reserves the name warmup)
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    first, last = chunk_range(program, numel, chunk_size, chunks_per_sample)
    t = tl.load(T + program // chunks_per_sample)
    cos_t, sin_t = tl.cos(t), tl.sin(t)
    p0, p1 = -cos_t * cos_t * sigma_data, cos_t * cos_t
    p2, p3 = -jvp_weight * sigma_data, -jvp_weight * cos_t * sin_t
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    dg = tl.zeros([BLOCK], dtype=tl.float32)
    dd = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        f, fm, dx, j, xt = _load_inputs(F, FM, DX, J, XT, offs, offs < last)
        g = p0 * fm + p1 * dx + p2 * j + p3 * xt
        d = f - fm
        gg += g * g
        dg += d * g
        dd += d * d
    tl.store(PARTIALS + program * 3, tl.sum(gg, axis=0))
    tl.store(PARTIALS + program * 3 + 1, tl.sum(dg, axis=0))
    tl.store(PARTIALS + program * 3 + 2, tl.sum(dd, axis=0))


@triton.jit
def _backward_kernel(
    F, FM, DX, J, XT,  # (B * numel,) each: F, F_minus, dxt_dt, jvp, x_t
    OUT,  # (B * numel,) output: s_b * (d - q . inputs)
    total,  # B * numel
    numel,  # elements per sample
    Q,  # (B, 4) fp32 normalized tangent coefficients q, rows q_stride apart
    q_stride,
    FACTOR, factor_stride, GRAD, grad_stride,  # s_b (sample_reduce.sample_scale)
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    sample = offs // numel
    f, fm, dx, j, xt = _load_inputs(F, FM, DX, J, XT, offs, mask)
    q = Q + sample * q_stride
    g = (tl.load(q, mask=mask, other=0.0) * fm + tl.load(q + 1, mask=mask, other=0.0) * dx
         + tl.load(q + 2, mask=mask, other=0.0) * j + tl.load(q + 3, mask=mask, other=0.0) * xt)
    out = sample_scale(FACTOR, factor_stride, GRAD, grad_stride, sample, mask, HAS_GRAD) * (f - fm - g)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def sums(F: Tensor, F_minus: Tensor, dxt_dt: Tensor, jvp: Tensor, x_t: Tensor, t: Tensor,
         sigma_data: float, warmup: float) -> Tensor:
    """(B, chunks, 3) fp32 partial (sum g^2, sum d g, sum d^2) per sample; t (B,) fp32."""
    return sample_reduce.reduce(_sums_kernel, [F, F_minus, dxt_dt, jvp, x_t, t], 3,
                                sigma_data=float(sigma_data), jvp_weight=float(warmup))


def backward(F: Tensor, F_minus: Tensor, dxt_dt: Tensor, jvp: Tensor, x_t: Tensor, q: Tensor,
             factor: Tensor, grad: Tensor | None) -> Tensor:
    """s_b * (F - F_minus - q . (F_minus, dxt_dt, jvp, x_t)), s_b = factor[b] * grad
    (sample_reduce.scale_args); q (B, 4) fp32 with contiguous rows at any row stride."""
    out = torch.empty_like(F, memory_format=torch.contiguous_format)
    sample_reduce.elementwise(_backward_kernel, [F, F_minus, dxt_dt, jvp, x_t], [out], Q=q, q_stride=q.stride(0),
                              **sample_reduce.scale_args(factor, grad))
    return out
