"""Triton kernels of the modulated LayerNorm / RMSNorm (math: fastgen_kernels/ops/modulated_norm.py).

Forward: one program per row; the row (D <= 8192 elements, padded to a power of two) lives in
registers, so x is read once and the statistics are an exact two-pass mean and variance. For FP8
inference it can write y as e4m3 codes with a scale per row instead (the next linear layer's
per-token quantization, without writing y and reading it back).

JVP: one program per row, reading x and the tangents once: the tangent of y from the forward's
statistics (the exact formula of the reference, in fp32, rounded once).

Backward: one program per chunk of rows of one batch (see `row_chunks`). It writes dx for each row
and keeps the gradients that are sums over rows (weight, bias, and a per-batch shift or scale) as
fp32 register accumulators, stored once per chunk as partial sums that the launcher adds up:
deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.ops.fp8_linear import E4M3_MAX, MIN_AMAX
from fastgen_kernels.triton_ops.fp8_linear import e4m3_codes, e4m3_scales, max_abs

MAX_D = 8192
_E4M3 = tl.constexpr(E4M3_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)

# Partial-sum slots of the backward, as in csrc/row_chunks.h.
SLOT_WEIGHT, SLOT_BIAS, SLOT_SHIFT, SLOT_SCALE = range(4)


@triton.jit
def chunk_rows(chunk, tokens, rows_per_chunk, chunks_per_batch):
    """Rows [first, last) of backward chunk `chunk`: a run of rows within one batch."""
    batch = chunk // chunks_per_batch
    start = (chunk % chunks_per_batch) * rows_per_chunk
    return batch * tokens + start, batch * tokens + tl.minimum(start + rows_per_chunk, tokens)


@triton.jit
def normalized(x, row, MEAN, RSTD, mask, RMS: tl.constexpr):
    """(xhat, rstd) of a row from the forward's statistics: (x - mean) * rstd, zero in the padding
    (x * rstd for RMSNorm)."""
    rstd = tl.load(RSTD + row)
    if RMS:
        xhat = x * rstd
    else:
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
    return xhat, rstd


@triton.jit
def _forward_kernel(
    X,  # (rows, D) input
    SHIFT,  # (rows // shift_div, D)
    SCALE,  # (rows // scale_div, D)
    W,  # (D,) or unused
    B,  # (D,) or unused
    Y,  # (rows, D) output in its own dtype (x's, or the reading layer's), or e4m3 codes when QUANTIZE
    Y_SCALE,  # (rows,) fp32 output when QUANTIZE: y's dequantization scale per row; else unused
    MEAN,  # (rows,) fp32 output, unused when RMS
    RSTD,  # (rows,) fp32 output
    D,  # row length
    shift_div,  # rows sharing one shift row: L for a (B, D) shift, 1 for (B, L, D)
    scale_div,  # same for scale
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    QUANTIZE: tl.constexpr,  # y in e4m3 per row (FP8 inference's next linear layer reads it)
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        centered = x
    else:
        mean = tl.sum(x, axis=0) / D
        centered = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    n = centered * rstd
    if HAS_W:
        n = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        n = n + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + (row // shift_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + (row // scale_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = n * (1.0 + scale) + shift
    if QUANTIZE:  # from y in fp32: no rounding to x's dtype before the codes
        inverse, y_scale = e4m3_scales(max_abs(tl.where(mask, y, 0.0), 0), _E4M3, _MIN_AMAX)
        tl.store(Y_SCALE + row, y_scale)
        y = e4m3_codes(y, inverse, _E4M3)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _jvp_kernel(
    X,  # (rows, D) forward input
    SCALE,  # (rows // scale_div, D)
    W,  # (D,) or unused
    B,  # (D,) or unused
    MEAN,  # (rows,) fp32 from the forward, unused when RMS
    RSTD,  # (rows,) fp32 from the forward
    TX,  # (rows, D) tangent of x, or unused
    TSHIFT,  # (rows // tshift_div, D), or unused
    TSCALE,  # (rows // tscale_div, D), or unused
    TW,  # (D,) tangent of the weight, or unused
    TB,  # (D,) tangent of the bias, or unused
    TY,  # (rows, D) output
    D,
    scale_div,
    tshift_div,
    tscale_div,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_TSHIFT: tl.constexpr,
    HAS_TSCALE: tl.constexpr,
    HAS_TW: tl.constexpr,
    HAS_TB: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, rstd = normalized(x, row, MEAN, RSTD, mask, RMS)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    tn = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_TX:
        tx = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
        proj = tl.sum(tx * xhat, axis=0) / D
        if RMS:
            txhat = rstd * (tx - xhat * proj)
        else:
            txhat = rstd * (tx - tl.sum(tx, axis=0) / D - xhat * proj)
        tn += txhat * w
    if HAS_TW:
        tn += xhat * tl.load(TW + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TB:
        tn += tl.load(TB + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + (row // scale_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    ty = tn * (1.0 + scale)
    if HAS_TSCALE:
        n = xhat * w
        if HAS_B:
            n += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        ty += n * tl.load(TSCALE + (row // tscale_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TSHIFT:
        ty += tl.load(TSHIFT + (row // tshift_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(TY + offs, ty.to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    G,  # (rows, D) upstream gradient
    X,  # (rows, D) forward input
    SCALE,  # (rows // scale_div, D)
    W,  # (D,) or unused
    B,  # (D,) or unused
    MEAN,  # (rows,) fp32, unused when RMS
    RSTD,  # (rows,) fp32
    DX,  # (rows, D) output
    DSHIFT,  # (rows, D) output when SHIFT_PER_TOKEN, else unused
    DSCALE,  # (rows, D) output when SCALE_PER_TOKEN, else unused
    PARTIALS,  # (4, num_chunks, D) fp32 output: per-chunk sums, slots as SLOT_*
    tokens,  # L
    D,
    rows_per_chunk,
    chunks_per_batch,
    num_chunks,
    scale_div,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    SHIFT_PER_TOKEN: tl.constexpr,
    SCALE_PER_TOKEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    first, last = chunk_rows(chunk, tokens, rows_per_chunk, chunks_per_batch)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32) if HAS_B else 0.0
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(first, last):
        offs = row * D + cols
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + (row // scale_div) * D + cols, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = normalized(x, row, MEAN, RSTD, mask, RMS)
        gn = g * (1.0 + scale)
        gx = gn * w
        proj = tl.sum(gx * xhat, axis=0) / D
        if RMS:
            dx = rstd * (gx - xhat * proj)
        else:
            dx = rstd * (gx - tl.sum(gx, axis=0) / D - xhat * proj)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        n = xhat * w + b
        if SHIFT_PER_TOKEN:
            tl.store(DSHIFT + offs, g.to(DSHIFT.dtype.element_ty), mask=mask)
        else:
            acc_shift += g
        if SCALE_PER_TOKEN:
            tl.store(DSCALE + offs, (g * n).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            acc_scale += g * n
        acc_w += gn * xhat
        acc_b += gn
    slot = num_chunks * D
    out = PARTIALS + chunk * D + cols
    if HAS_W:
        tl.store(out + 0 * slot, acc_w, mask=mask)
    if HAS_B:
        tl.store(out + 1 * slot, acc_b, mask=mask)
    if not SHIFT_PER_TOKEN:
        tl.store(out + 2 * slot, acc_shift, mask=mask)
    if not SCALE_PER_TOKEN:
        tl.store(out + 3 * slot, acc_scale, mask=mask)


def launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of length D: about 8 to 16 elements per thread."""
    block = triton.next_power_of_2(D)
    return block, max(1, min(16, block // 512))


def row_chunks(batch: int, tokens: int, device: torch.device) -> tuple[int, int]:
    """(rows_per_chunk, chunks_per_batch): about four programs per SM on a GPU, so the
    per-chunk partial sums stay small next to the activations while the GPU is full."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: few chunks, but more than one per batch so the sums are tested
        target = 2 * batch
    per_batch = max(1, min(tokens, -(-target // batch)))
    rows_per_chunk = -(-tokens // per_batch)
    return rows_per_chunk, -(-tokens // rows_per_chunk)


def _div(mod: Tensor, tokens: int) -> int:
    return tokens if mod.dim() == 2 else 1


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _launch_forward(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                    eps: float, rms: bool, y: Tensor, y_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The forward kernel into y (and y_scale when quantizing); returns (mean, rstd)."""
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    batch, tokens, D = x.shape
    rstd = torch.empty(batch, tokens, device=x.device, dtype=torch.float32)
    mean = torch.empty(0 if rms else (batch, tokens), device=x.device, dtype=torch.float32)
    block, warps = launch_config(D)
    _forward_kernel[(batch * tokens,)](
        x, shift, scale, _contiguous(weight), _contiguous(bias), y, y_scale, mean, rstd, D, _div(shift, tokens),
        _div(scale, tokens), eps, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        QUANTIZE=y_scale is not None, BLOCK_D=block, num_warps=warps,
    )
    return mean, rstd


def forward(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, rms: bool, out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) as the reference: y (B, L, D) in out_dtype (x's by default), mean/rstd
    (B, L) fp32."""
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    return y, *_launch_forward(x, shift, scale, weight, bias, eps, rms, y, None)


def forward_fp8(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, rms: bool,
) -> tuple[Tensor, Tensor]:
    """(codes (B, L, D) float8_e4m3fn, scales (B * L,) fp32) of y per row, as the reference."""
    codes = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(x.shape[0] * x.shape[1], device=x.device, dtype=torch.float32)
    _launch_forward(x, shift, scale, weight, bias, eps, rms, codes, scales)
    return codes, scales


def jvp(
    x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    rms: bool, tx: Tensor | None, tshift: Tensor | None, tscale: Tensor | None, tweight: Tensor | None,
    tbias: Tensor | None, out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The tangent of y (B, L, D) in out_dtype (x's by default), as the reference's (None tangents
    are zero)."""
    x, scale = x.contiguous(), scale.contiguous()
    weight, bias, tx, tshift, tscale, tweight, tbias = map(_contiguous, (weight, bias, tx, tshift, tscale,
                                                                         tweight, tbias))
    batch, tokens, D = x.shape
    ty = torch.empty_like(x, dtype=out_dtype or x.dtype)
    block, warps = launch_config(D)
    _jvp_kernel[(batch * tokens,)](
        x, scale, weight, bias, mean, rstd, tx, tshift, tscale, tweight, tbias, ty, D,
        _div(scale, tokens), 1 if tshift is None else _div(tshift, tokens),
        1 if tscale is None else _div(tscale, tokens), HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_TX=tx is not None, HAS_TSHIFT=tshift is not None, HAS_TSCALE=tscale is not None,
        HAS_TW=tweight is not None, HAS_TB=tbias is not None, RMS=rms, BLOCK_D=block, num_warps=warps,
    )
    return ty


def backward(
    grad_out: Tensor, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
    bias: Tensor | None, mean: Tensor, rstd: Tensor, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale, dweight, dbias) as the reference."""
    grad_out, x, scale = grad_out.contiguous(), x.contiguous(), scale.contiguous()
    weight, bias = _contiguous(weight), _contiguous(bias)
    batch, tokens, D = x.shape
    rows_per_chunk, chunks_per_batch = row_chunks(batch, tokens, x.device)
    num_chunks = batch * chunks_per_batch
    shift_per_token, scale_per_token = shift.dim() == 3, scale.dim() == 3
    dx = torch.empty_like(x)
    dshift_full = torch.empty_like(x) if shift_per_token else None
    dscale_full = torch.empty_like(x) if scale_per_token else None
    partials = torch.empty(4, num_chunks, D, device=x.device, dtype=torch.float32)
    block, warps = launch_config(D)
    _backward_kernel[(num_chunks,)](
        grad_out, x, scale, weight, bias, mean, rstd, dx, dshift_full, dscale_full, partials,
        tokens, D, rows_per_chunk, chunks_per_batch, num_chunks, _div(scale, tokens),
        HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        SHIFT_PER_TOKEN=shift_per_token, SCALE_PER_TOKEN=scale_per_token, BLOCK_D=block,
        num_warps=warps,
    )

    def per_batch(slot: int, dtype: torch.dtype) -> Tensor:
        return partials[slot].view(batch, chunks_per_batch, D).sum(1).to(dtype)

    dshift = dshift_full if shift_per_token else per_batch(SLOT_SHIFT, shift.dtype)
    dscale = dscale_full if scale_per_token else per_batch(SLOT_SCALE, scale.dtype)
    # absent parameters get distinct empty tensors: op outputs may not alias each other
    dweight = x.new_empty(0) if weight is None else partials[SLOT_WEIGHT].sum(0).to(weight.dtype)
    dbias = x.new_empty(0) if bias is None else partials[SLOT_BIAS].sum(0).to(bias.dtype)
    return dx, dshift, dscale, dweight, dbias
