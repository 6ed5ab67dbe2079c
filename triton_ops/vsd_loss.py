"""Triton kernel of the VSD loss (math: fastgen_kernels/ops/vsd_loss.py): one pass over x_g,
x0_teacher, x0_fake per (sample, chunk) storing the partial sums of |x_g - T| and (Fk - T)^2
(scheme: triton_ops/sample_reduce.py). The backward is triton_ops/squared_residual.scaled_residual."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops import sample_reduce
from fastgen_kernels.triton_ops.sample_reduce import chunk_range


@triton.jit
def _sums_kernel(
    X,  # (B * numel,) generator output x_g
    T,  # (B * numel,) teacher x0
    F,  # (B * numel,) fake-score x0
    PARTIALS,  # (B * chunks_per_sample, 2) fp32 output: (sum |x - T|, sum (F - T)^2)
    numel,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    chunks_per_sample,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    first, last = chunk_range(program, numel, chunk_size, chunks_per_sample)
    abs_acc = tl.zeros([BLOCK], dtype=tl.float32)
    sq_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + offs, mask=mask, other=0.0).to(tl.float32)
        abs_acc += tl.abs(x - t)
        sq_acc += (f - t) * (f - t)
    tl.store(PARTIALS + program * 2, tl.sum(abs_acc, axis=0))
    tl.store(PARTIALS + program * 2 + 1, tl.sum(sq_acc, axis=0))


def sums(x_g: Tensor, x0_teacher: Tensor, x0_fake: Tensor) -> Tensor:
    """(B, chunks, 2) fp32 partial (S1, S2) per sample; the tail adds them up."""
    return sample_reduce.reduce(_sums_kernel, [x_g, x0_teacher, x0_fake], 2)
