"""Triton side of the per-sample losses (scheme: fastgen_kernels/ops/_sample_loss.py).

Reductions: grid (B * chunks_per_sample,), one program per chunk of one sample (the chunking of
csrc/sample_chunks.h, mirrored by `sample_chunks`), each storing its fp32 partial sums to
partials (B, chunks_per_sample, NSTAT); `finish` adds them up per sample with a torch sum over
that tiny tensor (deterministic: a fixed reduction over a fixed shape, no atomics).

Backward: `scaled_difference`, the elementwise pass out = s_b * (a - b) (and -out) shared by every
loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK_ALIGN = 1024  # csrc/sample_chunks.h kSampleChunkAlign
TARGET_CHUNKS = 256
BLOCK = 1024  # elements per loop step of a reduction program; divides CHUNK_ALIGN
ELEMENTWISE_BLOCK = 1024


def sample_chunks(batch: int, numel: int) -> tuple[int, int]:
    """(chunk_size, chunks_per_sample) as csrc/sample_chunks.h."""
    per_sample = max(1, -(-TARGET_CHUNKS // max(batch, 1)))
    raw = -(-max(numel, 1) // per_sample)
    size = -(-raw // CHUNK_ALIGN) * CHUNK_ALIGN
    return size, -(-max(numel, 1) // size)


@triton.jit
def chunk_range(program, numel, chunk_size, chunks_per_sample):
    """Flat offsets [first, last) of the chunk of reduction program `program`."""
    sample = program // chunks_per_sample
    start = (program % chunks_per_sample) * chunk_size
    return sample * numel + start, sample * numel + tl.minimum(start + chunk_size, numel)


def reduce(kernel, inputs: list[Tensor], nstat: int) -> Tensor:
    """Runs reduction ``kernel(*inputs, PARTIALS, numel, chunk_size, chunks_per_sample,
    BLOCK=...)`` over (B, ...) inputs; returns the per-sample sums (B, nstat) in fp32."""
    inputs = [t.contiguous() for t in inputs]
    batch = inputs[0].shape[0]
    numel = inputs[0].numel() // batch
    chunk_size, chunks = sample_chunks(batch, numel)
    partials = torch.empty(batch, chunks, nstat, device=inputs[0].device, dtype=torch.float32)
    kernel[(batch * chunks,)](*inputs, partials, numel, chunk_size, chunks, BLOCK=BLOCK,
                              num_warps=4)
    return partials.sum(1)


@triton.jit
def _scaled_difference_kernel(
    A,  # (B * numel,)
    B,  # (B * numel,)
    S,  # (B,) fp32 per-sample scale
    OUT,  # (B * numel,) output: s_b * (a - b)
    NEG,  # (B * numel,) output: -OUT, unused unless NEGATED
    total,  # B * numel
    numel,  # elements per sample
    NEGATED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs // numel, mask=mask, other=0.0)
    out = s * (a - b)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    if NEGATED:
        tl.store(NEG + offs, (-out).to(NEG.dtype.element_ty), mask=mask)


def scaled_difference(a: Tensor, b: Tensor, s: Tensor, negated: bool) -> tuple[Tensor, Tensor]:
    """(s_b * (a - b), its negation or an empty tensor), as the reference."""
    a, b, s = a.contiguous(), b.contiguous(), s.to(torch.float32).contiguous()
    out = torch.empty_like(a)
    neg = torch.empty_like(a) if negated else a.new_empty(0)
    total = a.numel()
    _scaled_difference_kernel[(triton.cdiv(total, ELEMENTWISE_BLOCK),)](
        a, b, s, out, neg if negated else None, total, total // a.shape[0], NEGATED=negated,
        BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return out, neg
