"""Triton side of the per-sample losses (scheme: fastgen_kernels/ops/_sample_loss.py).

Reductions: grid (B * chunks_per_sample,), one program per chunk of one sample (the chunking of
csrc/sample_chunks.h, mirrored by `sample_chunks`), each storing its fp32 partial sums to
partials (B, chunks_per_sample, NSTAT), which the loss's tail adds up per sample in chunk order
(triton_ops/sample_loss_tail.py; deterministic, no atomics).

Backward passes: elementwise kernels of ELEMENTWISE_BLOCK elements per program over the flat
(B * numel,) tensors, launched by `elementwise`.
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


@triton.jit
def sample_scale(FACTOR, factor_stride, GRAD, grad_stride, sample, mask, HAS_GRAD: tl.constexpr):
    """A backward pass's per-sample scale s_b = factor[b] * grad[b] (csrc/cuda/launch.h
    SampleScale): a column of the loss tail's saved factors times the upstream gradient."""
    s = tl.load(FACTOR + sample * factor_stride, mask=mask, other=0.0)
    if HAS_GRAD:
        s = s * tl.load(GRAD + sample * grad_stride, mask=mask, other=0.0)
    return s


def scale_args(factor: Tensor, grad: Tensor | None) -> dict:
    """The keyword arguments of `sample_scale` for a (B,) fp32 factor at any stride and an
    upstream gradient () or (B,) (grad_stride 0 broadcasts a scalar), or None (s_b = factor[b])."""
    if grad is not None:
        grad = grad.to(torch.float32)
    return {"FACTOR": factor, "factor_stride": factor.stride(0), "GRAD": grad,
            "grad_stride": grad.stride(0) if grad is not None and grad.dim() == 1 else 0,
            "HAS_GRAD": grad is not None}


def contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def reduce(kernel, inputs: list[Tensor | None], nstat: int, **kwargs) -> Tensor:
    """Runs reduction ``kernel(*inputs, PARTIALS, numel, chunk_size, chunks_per_sample,
    BLOCK=..., **kwargs)`` (kwargs: scalars after chunks_per_sample, constexprs); inputs[0] is
    (B, ...) and fixes B and numel, the others are tensors of its shape, per-sample tensors or
    None. Returns the partial sums (B, chunks_per_sample, nstat) in fp32."""
    inputs = contiguous(*inputs)
    batch = inputs[0].shape[0]
    numel = inputs[0].numel() // batch
    chunk_size, chunks = sample_chunks(batch, numel)
    partials = torch.empty(batch, chunks, nstat, device=inputs[0].device, dtype=torch.float32)
    kernel[(batch * chunks,)](*inputs, partials, numel, chunk_size, chunks, BLOCK=BLOCK,
                              num_warps=4, **kwargs)
    return partials


def elementwise(kernel, inputs: list[Tensor | None], outputs: list[Tensor | None], **kwargs) -> None:
    """Runs ``kernel(*inputs, *outputs, total, numel, BLOCK=..., **kwargs)``, one program per
    ELEMENTWISE_BLOCK elements; inputs[0] is (B, ...) and fixes total = B * numel; inputs are made
    contiguous, kwargs (strided per-sample tensors with their strides, constexprs) pass as they are."""
    total = inputs[0].numel()
    kernel[(triton.cdiv(total, ELEMENTWISE_BLOCK),)](
        *contiguous(*inputs), *outputs, total, total // inputs[0].shape[0], BLOCK=ELEMENTWISE_BLOCK,
        num_warps=4, **kwargs)
