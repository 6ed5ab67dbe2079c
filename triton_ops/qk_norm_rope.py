"""Triton kernels of QK-norm + rotary embedding (math: fastgen_kernels/ops/qk_norm_rope.py).

A head vector of Dh <= 256 elements is held as a (Dh/2, 2) tile of its rotary pairs (a, b):
(2i, 2i+1) when interleaved, (i, i + Dh/2) otherwise. Then rot(v) is one `tl.split` and one
`tl.join`, and the pairs of an interleaved head are contiguous in memory. Without rotary the
interleaved tiling is used whatever Dh (odd Dh: the last pair's second entry is masked).

Forward (and the forward-mode tangent, alike): one program per block of BLOCK_R rows (head
vectors), each in registers: x (and its tangent) read once, y written once. Backward: one program
per chunk of rows (`row_chunks` of triton_ops.modulated_norm with a single batch), walking its rows
in blocks of BLOCK_R; it writes dx and keeps the weight's gradient as an fp32 register accumulator,
stored once per chunk as a partial sum that the launcher adds up: deterministic, no atomics.

The input x, and its tangent, may be strided over (B, L, H) (e.g. q = qkv[:, :, 0] of a fused
projection); their head vectors must be contiguous. Every other tensor is contiguous; cos and sin
are read as fp32.
The launchers handle one of q, k; the op (fastgen_kernels/ops/qk_norm_rope.py) runs them on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.triton_ops.modulated_norm import row_chunks


@triton.jit
def _pair_tile(Dh, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """(offsets, mask), both (BLOCK_P, 2): the columns of the head's rotary pairs (a, b)."""
    pair = tl.arange(0, BLOCK_P)[:, None]
    second = tl.arange(0, 2)[None, :]
    if INTERLEAVED:
        cols = pair * 2 + second
    else:
        cols = pair + second * (Dh // 2)
    return cols, (pair < (Dh + 1) // 2) & (cols < Dh)


@triton.jit
def _rotate(v):
    """rot(v) of a (..., 2) tile of pairs: (a, b) -> (-b, a)."""
    a, b = tl.split(v)
    return tl.join(-b, a)


@triton.jit
def _rope_tables(COS, SIN, token, cols, mask, Dh):
    """cos and sin of each row's token at each column of the (BLOCK_R, BLOCK_P, 2) tile."""
    table = token[:, None, None] * Dh + cols[None, :, :]
    return tl.load(COS + table, mask=mask, other=0.0), tl.load(SIN + table, mask=mask, other=0.0)


@triton.jit
def _apply_rope(v, COS, SIN, token, cols, mask, Dh):
    """v * cos + rot(v) * sin of a tile of head vectors."""
    cos, sin = _rope_tables(COS, SIN, token, cols, mask, Dh)
    return v * cos + _rotate(v) * sin


@triton.jit
def _row_offsets(rows, L, H, stride_b, stride_l, stride_h):
    """(element offset of each row's head vector in x, its token l) for rows = (b * L + l) * H + h."""
    h = rows % H
    bl = rows // H
    token = bl % L
    return (bl // L) * stride_b + token * stride_l + h * stride_h, token


@triton.jit
def _load_heads(X, rows, L, H, Dh, stride_b, stride_l, stride_h, INTERLEAVED: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's block of BLOCK_R rows of x, as fp32 (BLOCK_R, BLOCK_P, 2) tiles of pairs:
    (x, row, row_mask, token, cols, col_mask, mask)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = row < rows
    x_offs, token = _row_offsets(row, L, H, stride_b, stride_l, stride_h)
    cols, col_mask = _pair_tile(Dh, INTERLEAVED, BLOCK_P)
    mask = row_mask[:, None, None] & col_mask[None, :, :]
    x = tl.load(X + x_offs[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
    return x, row, row_mask, token, cols, col_mask, mask


@triton.jit
def _forward_kernel(
    X,  # (B, L, H, Dh) input, strides (stride_b, stride_l, stride_h, 1)
    W,  # (Dh,) or unused
    COS,  # (L, Dh) fp32, or unused
    SIN,  # (L, Dh) fp32, or unused
    Y,  # (rows, Dh) output
    RSTD,  # (rows,) fp32 output
    rows,  # B * L * H
    L,
    H,
    Dh,
    stride_b,
    stride_l,
    stride_h,
    eps,
    HAS_W: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    x, row, row_mask, token, cols, col_mask, mask = _load_heads(
        X, rows, L, H, Dh, stride_b, stride_l, stride_h, INTERLEAVED, BLOCK_R, BLOCK_P)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / Dh + eps)
    tl.store(RSTD + row, rstd, mask=row_mask)
    n = x * rstd[:, None, None]
    if HAS_W:
        n = n * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :]
    if HAS_ROPE:
        n = _apply_rope(n, COS, SIN, token, cols, mask, Dh)
    out = Y + row[:, None, None] * Dh + cols[None, :, :]
    tl.store(out, n.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    G,  # (rows, Dh) upstream gradient
    X,  # (B, L, H, Dh) forward input, strides (stride_b, stride_l, stride_h, 1)
    W,  # (Dh,) or unused
    COS,  # (L, Dh) fp32, or unused
    SIN,  # (L, Dh) fp32, or unused
    RSTD,  # (rows,) fp32
    DX,  # (rows, Dh) output
    PARTIALS,  # (num_chunks, Dh) fp32 output when HAS_W: per-chunk sums of dn * xhat
    rows,
    L,
    H,
    Dh,
    stride_b,
    stride_l,
    stride_h,
    rows_per_chunk,
    HAS_W: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    first = chunk * rows_per_chunk
    last = tl.minimum(first + rows_per_chunk, rows)
    cols, col_mask = _pair_tile(Dh, INTERLEAVED, BLOCK_P)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :] if HAS_W else 1.0
    acc_w = tl.zeros([BLOCK_R, BLOCK_P, 2], dtype=tl.float32)
    for start in range(first, last, BLOCK_R):
        row = start + tl.arange(0, BLOCK_R)
        row_mask = row < last
        x_offs, token = _row_offsets(row, L, H, stride_b, stride_l, stride_h)
        mask = row_mask[:, None, None] & col_mask[None, :, :]
        offs = row[:, None, None] * Dh + cols[None, :, :]
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + x_offs[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)[:, None, None]
        xhat = x * rstd
        if HAS_ROPE:
            cos, sin = _rope_tables(COS, SIN, token, cols, mask, Dh)
            dn = g * cos - _rotate(g * sin)
        else:
            dn = g
        gx = dn * w
        proj = tl.sum(tl.sum(gx * xhat, axis=2), axis=1)[:, None, None] / Dh
        tl.store(DX + offs, (rstd * (gx - xhat * proj)).to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            acc_w += dn * xhat
    if HAS_W:
        tl.store(PARTIALS + chunk * Dh + cols, tl.sum(acc_w, axis=0), mask=col_mask)


@triton.jit
def _jvp_kernel(
    X,  # (B, L, H, Dh) forward input, strides (stride_b, stride_l, stride_h, 1)
    W,  # (Dh,) or unused
    COS,  # (L, Dh) fp32, or unused
    SIN,  # (L, Dh) fp32, or unused
    RSTD,  # (rows,) fp32 from the forward
    TX,  # (B, L, H, Dh) tangent of x, strides (t_stride_b, t_stride_l, t_stride_h, 1), or unused
    TW,  # (Dh,) tangent of the weight, or unused
    TY,  # (rows, Dh) output
    rows,
    L,
    H,
    Dh,
    stride_b,
    stride_l,
    stride_h,
    t_stride_b,
    t_stride_l,
    t_stride_h,
    HAS_W: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_TW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    x, row, row_mask, token, cols, col_mask, mask = _load_heads(
        X, rows, L, H, Dh, stride_b, stride_l, stride_h, INTERLEAVED, BLOCK_R, BLOCK_P)
    rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)[:, None, None]
    xhat = x * rstd
    tn = tl.zeros([BLOCK_R, BLOCK_P, 2], dtype=tl.float32)
    if HAS_TX:
        t_offs, _ = _row_offsets(row, L, H, t_stride_b, t_stride_l, t_stride_h)
        tx = tl.load(TX + t_offs[:, None, None] + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        proj = tl.sum(tl.sum(tx * xhat, axis=2), axis=1)[:, None, None] / Dh
        tn = rstd * (tx - xhat * proj)
        if HAS_W:
            tn = tn * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :]
    if HAS_TW:
        tn += xhat * tl.load(TW + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :]
    if HAS_ROPE:
        tn = _apply_rope(tn, COS, SIN, token, cols, mask, Dh)
    tl.store(TY + row[:, None, None] * Dh + cols[None, :, :], tn.to(TY.dtype.element_ty), mask=mask)


def launch_config(Dh: int, weight: Tensor | None, cos: Tensor | None, interleaved: bool) -> dict:
    """The kernels' compile-time flags and tiles: BLOCK_R rows of BLOCK_P pairs, about 2048
    elements (16 per thread at 4 warps)."""
    block_p = triton.next_power_of_2(max(1, (Dh + 1) // 2))
    return dict(HAS_W=weight is not None, HAS_ROPE=cos is not None,
                INTERLEAVED=interleaved or cos is None, BLOCK_R=max(1, 1024 // block_p),
                BLOCK_P=block_p, num_warps=4)


def _table(table: Tensor | None) -> Tensor | None:
    return None if table is None else table.to(torch.float32).contiguous()


def _param(weight: Tensor | None) -> Tensor | None:
    return None if weight is None else weight.contiguous()


def _head_rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(x, its B, L, H strides), x copied to contiguous unless its head vectors already are."""
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(2))


def forward_one(
    x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, eps: float,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    """(out, rstd) for one of q, k as the reference: out (B, L, H, Dh) in x's dtype, rstd
    (B, L, H) fp32."""
    weight, cos, sin = _param(weight), _table(cos), _table(sin)
    B, L, H, Dh = x.shape
    rows = B * L * H
    y = torch.empty(B, L, H, Dh, device=x.device, dtype=x.dtype)
    rstd = torch.empty(B, L, H, device=x.device, dtype=torch.float32)
    x, strides = _head_rows(x)
    config = launch_config(Dh, weight, cos, interleaved)
    _forward_kernel[(triton.cdiv(rows, config["BLOCK_R"]),)](
        x, weight, cos, sin, y, rstd, rows, L, H, Dh, *strides, eps, **config)
    return y, rstd


def backward_one(
    grad: Tensor, x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None,
    rstd: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dweight) for one of q, k as the reference; dweight is empty without a weight."""
    weight, cos, sin = _param(weight), _table(cos), _table(sin)
    B, L, H, Dh = x.shape
    rows = B * L * H
    rows_per_chunk, num_chunks = row_chunks(1, rows, x.device)
    dx = torch.empty(B, L, H, Dh, device=x.device, dtype=x.dtype)
    partials = torch.empty(num_chunks if weight is not None else 0, Dh, device=x.device,
                           dtype=torch.float32)
    x, strides = _head_rows(x)
    _backward_kernel[(num_chunks,)](
        grad.contiguous(), x, weight, cos, sin, rstd.contiguous(), dx, partials, rows, L, H, Dh,
        *strides, rows_per_chunk, **launch_config(Dh, weight, cos, interleaved))
    # an absent weight gets a distinct empty tensor: op outputs may not alias each other
    dweight = x.new_empty(0) if weight is None else partials.sum(0).to(weight.dtype)
    return dx, dweight


def jvp_one(
    x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, rstd: Tensor,
    interleaved: bool, tx: Tensor | None, tweight: Tensor | None,
) -> Tensor:
    """The tangent of one of q_out, k_out as the reference, in x's dtype, given the tangents of x
    (strided over B, L, H like x) and of the weight (None: zero)."""
    if tx is None and tweight is None:
        return torch.zeros(x.shape, device=x.device, dtype=x.dtype)
    weight, cos, sin, tweight = _param(weight), _table(cos), _table(sin), _param(tweight)
    B, L, H, Dh = x.shape
    rows = B * L * H
    ty = torch.empty(B, L, H, Dh, device=x.device, dtype=x.dtype)
    x, strides = _head_rows(x)
    tx, tx_strides = _head_rows(tx) if tx is not None else (None, (0, 0, 0))
    config = launch_config(Dh, weight, cos, interleaved)
    _jvp_kernel[(triton.cdiv(rows, config["BLOCK_R"]),)](
        x, weight, cos, sin, rstd.contiguous(), tx, tweight, ty, rows, L, H, Dh, *strides, *tx_strides,
        HAS_TX=tx is not None, HAS_TW=tweight is not None, **config)
    return ty
