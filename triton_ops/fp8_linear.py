"""Triton kernels of the FP8 linear layer (math: fastgen_kernels/ops/fp8_linear.py).

- ``quantize_rows``: per-token (row) dynamic scaling of activations to e4m3, one program per row,
  two passes over the row (its absolute maximum, then the scaled cast; the second pass finds the
  row in L1/L2).
- ``linear``: out = epilogue(x @ w^T) in one kernel. Tiles of x (BLOCK_M, BLOCK_K) and of w^T
  (BLOCK_K, BLOCK_N) go to ``tl.dot`` (wgmma on Hopper; e4m3 x e4m3 -> fp32 tensor-core FMA);
  the program's (BLOCK_M, BLOCK_N) fp32 accumulator is scaled, biased, activated, gated, added
  to the residual and rounded once to the output dtype before it is stored. Programs walk the
  output tiles in groups of GROUP_M row tiles so that the column tiles of w they share stay in L2.
  w is read K-major ((N, K) row-major, nn.Linear's layout), which is what FP8 wgmma requires of
  its B operand. The same kernel multiplies bf16/fp16 operands (the path of GPUs without FP8) and
  fp32 ones in IEEE precision (the interpreter's exact check of the indexing and the epilogue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.backends import interpreting_triton
from fastgen_kernels.ops.fp8_linear import ACTIVATIONS, E4M3_MAX, MIN_AMAX


@triton.jit
def _quantize_rows_kernel(
    X,  # (M, K) bf16/fp16/fp32, rows stride_x apart
    XQ,  # (M, K) float8_e4m3fn output, contiguous
    SCALE,  # (M,) fp32 output: the dequantization scale amax / 448 of each row
    K,
    stride_x,
    E4M3: tl.constexpr,  # 448.0
    MIN_ABS: tl.constexpr,  # MIN_AMAX
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_x + start + cols, mask=start + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    amax_row = tl.maximum(tl.max(amax, 0), MIN_ABS)
    # correctly rounded divisions, so that scales and codes equal the reference's bit for bit
    inverse = tl.math.div_rn(E4M3, amax_row)
    tl.store(SCALE + row, tl.math.div_rn(amax_row, E4M3))
    for start in range(0, K, BLOCK_K):
        mask = start + cols < K
        x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inverse, -E4M3), E4M3)  # rounding may pass 448 by an ulp
        tl.store(XQ + row * K + start + cols, q.to(XQ.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    X,  # (M, K) e4m3 (or bf16/fp16/fp32 operands), contiguous
    X_SCALE,  # (M,) fp32 per-token scale of x, when HAS_X_SCALE
    W,  # (N, K) same dtype as X, contiguous: nn.Linear's weight
    W_SCALE,  # (N,) fp32 per output channel when PER_CHANNEL, else (1,) per tensor
    BIAS,  # (N,) when HAS_BIAS
    GATE,  # (M // gate_rows, N) when HAS_GATE: a row per batch (gate_rows = L) or per token (1)
    RESIDUAL,  # (M, N) when HAS_RESIDUAL, contiguous
    OUT,  # (M, N) output, contiguous
    M,
    N,
    K,
    gate_rows,
    HAS_X_SCALE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # index in ACTIVATIONS: 0 none, 1 gelu_tanh, 2 gelu (erf), 3 silu
    HAS_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 operands: multiply in IEEE fp32, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = X + rows.to(tl.int64)[:, None] * K + ks[None, :]
    w_ptrs = W + cols.to(tl.int64)[None, :] * K + ks[:, None]  # the (BLOCK_K, BLOCK_N) tile of w^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_ok = start + ks < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # epilogue, in fp32 on the accumulator
    y = acc
    if HAS_X_SCALE:
        y = y * tl.load(X_SCALE + rows, mask=row_ok, other=0.0)[:, None]
    if PER_CHANNEL:
        y = y * tl.load(W_SCALE + cols, mask=col_ok, other=0.0)[None, :]
    else:
        y = y * tl.load(W_SCALE)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        # 0.5 (1 + tanh(u)) = sigmoid(2 u), u = sqrt(2 / pi) (y + 0.044715 y^3); 2 sqrt(2 / pi) below
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACTIVATION == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = y * tl.sigmoid(y)
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_GATE:
        gate_offsets = (rows // gate_rows).to(tl.int64)[:, None] * N + cols[None, :]
        y = y * tl.load(GATE + gate_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y += tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


# Hopper (H100/H200) FP8 tiles: 128-wide wgmma, 3-4 stages of 128-deep K slices fit in 228 KB of
# shared memory. Tuned per (M, N, K); the DiT and Flux shapes are multiples of 128.
_HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
        (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
    ]
]
_tuned_linear_kernel = triton.autotune(_HOPPER_CONFIGS, key=["M", "N", "K"])(_linear_kernel)
# Small tiles under the interpreter: several tiles in each direction and ragged edges at test sizes.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (codes (M, K) float8_e4m3fn, scale (M,) fp32) with x ~ codes * scale[:, None]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    codes = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(K), 32 if interpreting_triton() else 2048)
    _quantize_rows_kernel[(M,)](x, codes, scale, K, x.stride(0), E4M3=E4M3_MAX, MIN_ABS=MIN_AMAX,
                                BLOCK_K=block, num_warps=4 if block <= 1024 else 8)
    return codes, scale


def linear(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
           activation: str | None, gate: Tensor | None, gate_rows: int, residual: Tensor | None,
           out_dtype: torch.dtype) -> Tensor:
    """epilogue(x @ weight^T) as (M, N) in out_dtype; x (M, K) and weight (N, K) of one dtype."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    flags = dict(HAS_X_SCALE=x_scale is not None, PER_CHANNEL=weight_scale.numel() > 1,
                 HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
                 HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
                 IEEE=x.dtype == torch.float32)
    args = (x.contiguous(), x_scale, weight.contiguous(), weight_scale, bias,
            None if gate is None else gate.contiguous(), None if residual is None else residual.contiguous(),
            out, M, N, K, gate_rows)
    if interpreting_triton():
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"]),)
        _linear_kernel[grid](*args, **flags, **blocks)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _tuned_linear_kernel[grid](*args, **flags)
    return out
