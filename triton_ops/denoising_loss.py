"""Triton kernel of the denoising loss (math: fastgen_kernels/ops/denoising_loss.py): one pass over
pred and target per (sample, chunk) storing the partial sums of (pred - target)^2 (scheme:
triton_ops/sample_reduce.py). The backward is sample_reduce.scaled_difference."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops import sample_reduce
from fastgen_kernels.triton_ops.sample_reduce import chunk_range


@triton.jit
def _sums_kernel(
    P,  # (B * numel,) prediction
    T,  # (B * numel,) target
    PARTIALS,  # (B * chunks_per_sample, 1) fp32 output: sum (P - T)^2
    numel,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    chunks_per_sample,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    first, last = chunk_range(program, numel, chunk_size, chunks_per_sample)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        d = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
            T + offs, mask=mask, other=0.0).to(tl.float32)
        acc += d * d
    tl.store(PARTIALS + program, tl.sum(acc, axis=0))


def sums(pred: Tensor, target: Tensor) -> Tensor:
    """(B, 1) fp32 per-sample S, as the reference's sums."""
    return sample_reduce.reduce(_sums_kernel, [pred, target], 1)
