"""Triton kernels of the gated residual x + gate * y (math: fastgen_kernels/ops/gated_residual.py).

Forward: one program per row, elementwise in fp32, with an optional second term gate2 * y2 (the
JVP's). Every input is read in its own dtype (autocast's bf16 operands on an fp32 stream as they
are); gradients are written in their inputs' dtypes. Backward: one program per chunk of rows of one
batch (the chunking of triton_ops.modulated_norm), writing dy and the gate's gradient per row, or,
for a per-batch gate, its per-chunk sums that the launcher adds up (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops.modulated_norm import chunk_rows, launch_config, row_chunks


@triton.jit
def _forward_kernel(
    X,  # (rows, D)
    Y,  # (rows, D)
    GATE,  # (rows // gate_div, D)
    Y2,  # (rows, D) when SECOND
    GATE2,  # (rows // gate2_div, D) when SECOND
    OUT,  # (rows, D) output
    D,
    gate_div,  # rows sharing one gate row: L for a (B, D) gate, 1 for (B, L, D)
    gate2_div,
    SECOND: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    out = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + (row // gate_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    out += gate * y
    if SECOND:
        y2 = tl.load(Y2 + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        gate2 = tl.load(GATE2 + (row // gate2_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
        out += gate2 * y2
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    G,  # (rows, D) upstream gradient
    Y,  # (rows, D)
    GATE,  # (rows // gate_div, D)
    DY,  # (rows, D) output
    DGATE,  # (rows, D) output when GATE_PER_TOKEN, else unused
    PARTIALS,  # (num_chunks, D) fp32 output when not GATE_PER_TOKEN
    tokens,
    D,
    rows_per_chunk,
    chunks_per_batch,
    gate_div,
    GATE_PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    first, last = chunk_rows(chunk, tokens, rows_per_chunk, chunks_per_batch)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(first, last):
        offs = row * D + cols
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + (row // gate_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + offs, (g * gate).to(DY.dtype.element_ty), mask=mask)
        if GATE_PER_TOKEN:
            tl.store(DGATE + offs, (g * y).to(DGATE.dtype.element_ty), mask=mask)
        else:
            acc += g * y
    if not GATE_PER_TOKEN:
        tl.store(PARTIALS + chunk * D + cols, acc, mask=mask)


def _gate_div(gate: Tensor, tokens: int) -> int:
    return tokens if gate.dim() == 2 else 1


def forward(x: Tensor, y: Tensor, gate: Tensor, y2: Tensor | None = None, gate2: Tensor | None = None) -> Tensor:
    """x + gate * y (+ gate2 * y2) in x's dtype, each input read in its own dtype."""
    x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
    second = y2 is not None
    y2, gate2 = (y2.contiguous(), gate2.contiguous()) if second else (y, gate)
    batch, tokens, D = x.shape
    out = torch.empty_like(x)
    block, warps = launch_config(D)
    _forward_kernel[(batch * tokens,)](
        x, y, gate, y2, gate2, out, D, _gate_div(gate, tokens), _gate_div(gate2, tokens), SECOND=second,
        BLOCK_D=block, num_warps=warps)
    return out


def backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dgate) as the reference, in y's and gate's dtypes."""
    grad_out, y, gate = grad_out.contiguous(), y.contiguous(), gate.contiguous()
    batch, tokens, D = y.shape
    rows_per_chunk, chunks_per_batch = row_chunks(batch, tokens, y.device)
    per_token = gate.dim() == 3
    dy = torch.empty_like(y)
    dgate = torch.empty_like(gate) if per_token else None
    partials = None if per_token else torch.empty(
        batch * chunks_per_batch, D, device=y.device, dtype=torch.float32)
    block, warps = launch_config(D)
    _backward_kernel[(batch * chunks_per_batch,)](
        grad_out, y, gate, dy, dgate, partials, tokens, D, rows_per_chunk, chunks_per_batch,
        _gate_div(gate, tokens), GATE_PER_TOKEN=per_token, BLOCK_D=block, num_warps=warps)
    if not per_token:
        dgate = partials.view(batch, chunks_per_batch, D).sum(1).to(gate.dtype)
    return dy, dgate
