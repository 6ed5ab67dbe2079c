"""Triton kernels of the FP8 linear layer (math: fastgen_kernels/ops/fp8_linear.py).

- ``quantize_rows``: per-token (row) dynamic scaling of activations to e4m3: rows held in
  registers, several per program, between their absolute maximum and the scaled cast (one read of
  x); rows too long for registers take two passes (the second finds the row in L1/L2).
- ``linear``: out = epilogue(x @ w^T) in one kernel, in three variants:
  - tiled: a program per (BLOCK_M, BLOCK_N) output tile; tiles of x (BLOCK_M, BLOCK_K) and of
    w^T (BLOCK_K, BLOCK_N) are loaded through pointers (cp.async, pipelined over num_stages K
    slices) and go to ``tl.dot`` (wgmma on Hopper; e4m3 x e4m3 -> fp32 tensor-core FMA);
  - persistent_tma (Hopper): a program per SM walks the output tiles, and the TMA unit copies
    the x and w tiles into shared memory from host-built descriptors (no address arithmetic or
    masks in the loop; the tile and K loops are flattened so that the next tile's loads overlap
    this tile's epilogue);
  - persistent_tma_store (Hopper): the same main loop, and an epilogue in two (BLOCK_M,
    BLOCK_N / 2) halves whose residual the TMA unit reads and whose result it writes from shared
    memory (asynchronously: the store drains while the next tile's loads are issued), where the
    output's and the residual's rows are 16-byte aligned; some of its tiles run two programs an
    SM (one's epilogue overlapping the other's main loop).
  All scale, bias, activate, gate and add the residual to the (BLOCK_M, BLOCK_N) fp32
  accumulator and round once to the output dtype. Tiles are numbered in groups of GROUP_M row
  tiles so that the column tiles of w they share stay in L2. w is read K-major ((N, K)
  row-major, nn.Linear's layout), which is what FP8 wgmma requires of its B operand. Each variant
  is autotuned per (M, N, K) and epilogue (activation, gate, residual); "auto" then times those
  that can run, once per shape and epilogue, and keeps the fastest.
  The tiled kernel also multiplies bf16/fp16 operands (GPUs without FP8, in tiles of their own)
  and fp32 ones in IEEE precision (the interpreter's exact check of the indexing and epilogue).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from fastgen_kernels.backends import interpreting_triton
from fastgen_kernels.ops.fp8_linear import ACTIVATIONS, E4M3_MAX, MIN_AMAX

try:  # host-side TMA descriptors (newer Triton); without them only the tiled variant runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@triton.jit
def e4m3_scales(amax, E4M3: tl.constexpr, MIN_ABS: tl.constexpr):
    """(inverse, scale) of a row whose largest magnitude is amax (at least MIN_ABS): its codes are
    x * inverse, and x ~ codes * scale. Correctly rounded divisions, so that scales and codes equal
    the reference's bit for bit."""
    amax = tl.maximum(amax, MIN_ABS, propagate_nan=tl.PropagateNan.ALL)
    return tl.math.div_rn(E4M3, amax), tl.math.div_rn(amax, E4M3)


@triton.jit
def e4m3_codes(x, inverse, E4M3: tl.constexpr):
    """x * inverse within [-448, 448] (its rounding may pass 448 by an ulp), for the cast to e4m3;
    NaN stays NaN (e4m3fn has one)."""
    return tl.minimum(tl.maximum(x * inverse, -E4M3, propagate_nan=tl.PropagateNan.ALL), E4M3,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_abs(x, axis: tl.constexpr):
    """The largest |x| along axis, NaN where that slice holds a NaN (tl.max drops NaN, as the GPU's
    fmax does; the reference's amax keeps it, and a NaN activation then gives NaN outputs, not
    finite ones)."""
    a = tl.abs(x)
    has_nan = tl.max((a != a).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(a, axis))


@triton.jit
def _quantize_rows_kernel(
    X,  # (M, K) bf16/fp16/fp32, rows stride_x apart
    XQ,  # (M, K) float8_e4m3fn output, contiguous
    SCALE,  # (M,) fp32 output: the dequantization scale amax / 448 of each row
    M,
    K,
    stride_x,
    E4M3: tl.constexpr,  # 448.0
    MIN_ABS: tl.constexpr,  # MIN_AMAX
    ROWS: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # K's next power of two when ONE_PASS, else a chunk of a row
    ONE_PASS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:  # the rows stay in registers between their maximum and their cast
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        inverse, scale = e4m3_scales(max_abs(x, 1), E4M3, MIN_ABS)
        tl.store(SCALE + rows, scale, mask=row_ok)
        codes = e4m3_codes(x, inverse[:, None], E4M3)
        tl.store(XQ + rows[:, None] * K + cols[None, :], codes.to(XQ.dtype.element_ty), mask=mask)
    else:  # rows too long for registers (ROWS = 1): a second pass finds the row in L1/L2
        amax = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (start + cols[None, :] < K)
            x = tl.load(X + rows[:, None] * stride_x + start + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
        inverse, scale = e4m3_scales(max_abs(amax, 1), E4M3, MIN_ABS)
        tl.store(SCALE + rows, scale, mask=row_ok)
        for start in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (start + cols[None, :] < K)
            x = tl.load(X + rows[:, None] * stride_x + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            codes = e4m3_codes(x, inverse[:, None], E4M3)
            tl.store(XQ + rows[:, None] * K + start + cols[None, :], codes.to(XQ.dtype.element_ty), mask=mask)


@triton.jit
def _tile_position(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number ``tile``: tiles are numbered in groups of
    GROUP_M row tiles, column by column within a group, so that consecutive tiles share the
    column tiles of w while they are in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _accumulate_pointers(X, W, rows, cols, M, N, K, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows] @ w[cols]^T in fp32, masked loads of (BLOCK_M, BLOCK_K) and (BLOCK_K, BLOCK_N) tiles."""
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
        acc = _dot(a, b, acc, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _accumulate_tma(X_DESC, W_DESC, first_row, first_col, K, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same product from tiles the TMA unit copies to shared memory; it fills the parts of a
    tile outside x or w with zeros, so there are no masks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        a = X_DESC.load([first_row, start])
        b = W_DESC.load([first_col, start])  # (BLOCK_N, BLOCK_K): w is K-major, as wgmma's B wants
        acc = _dot(a, b.T, acc, IEEE)
    return acc


@triton.jit
def _epilogue_values(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                     HAS_X_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr):
    """gate * act(acc * s_x * s_w + bias) of the output's [rows, cols] in fp32 (the residual is
    added by the store)."""
    row_ok = rows < M
    col_ok = cols < N
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
    if HAS_GATE:
        gate_offsets = (rows // gate_rows).to(tl.int64)[:, None] * N + cols[None, :]
        y = y * tl.load(GATE + gate_offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return y


@triton.jit
def _store_epilogue(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, RESIDUAL, OUT, gate_rows,
                    HAS_X_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """OUT[rows, cols] = residual + gate * act(acc * s_x * s_w + bias), fp32 until the one rounding."""
    y = _epilogue_values(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                         HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_RESIDUAL:
        y += tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _store_half_tma(acc, first_row, first_col, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                    RESIDUAL_DESC, OUT_DESC, HAS_X_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, HALF_N: tl.constexpr):
    """The epilogue of the (BLOCK_M, HALF_N) block at (first_row, first_col), its residual read and
    its result written by the TMA unit (which zero-fills and clips past the output's edges)."""
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = first_col + tl.arange(0, HALF_N)
    y = _epilogue_values(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                         HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE)
    if HAS_RESIDUAL:
        y += RESIDUAL_DESC.load([first_row, first_col]).to(tl.float32)
    OUT_DESC.store([first_row, first_col], y.to(OUT_DESC.dtype))


@triton.jit
def _store_epilogue_tma(acc, first_row, first_col, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                        RESIDUAL_DESC, OUT_DESC, HAS_X_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's epilogue in two (BLOCK_M, BLOCK_N / 2) halves through shared memory and TMA: half
    the registers and staging memory of the whole tile at a time (an fp32 residual tile beside the
    accumulator would spill), and the TMA store drains while the next tile's loads are issued."""
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    _store_half_tma(left, first_row, first_col, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows, RESIDUAL_DESC,
                    OUT_DESC, HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL,
                    BLOCK_M, BLOCK_N // 2)
    _store_half_tma(right, first_row, first_col + BLOCK_N // 2, M, N, X_SCALE, W_SCALE, BIAS, GATE, gate_rows,
                    RESIDUAL_DESC, OUT_DESC, HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE,
                    HAS_RESIDUAL, BLOCK_M, BLOCK_N // 2)


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
    X_DESC,  # when TMA: TMA descriptors of x's (BLOCK_M, BLOCK_K) tiles
    W_DESC,  #           and of w's (BLOCK_N, BLOCK_K) tiles; None otherwise
    RESIDUAL_DESC,  # when TMA_STORE: TMA descriptors of the residual's (when HAS_RESIDUAL)
    OUT_DESC,  #                    and the output's (BLOCK_M, BLOCK_N / 2) blocks; None otherwise
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
    TMA: tl.constexpr,  # the persistent TMA variant (else the tiled one)
    TMA_STORE: tl.constexpr,  # TMA too: the epilogue reads the residual and writes in half tiles by TMA
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 1,  # TMA: programs launched per SM (the launcher's grid reads it)
):
    if TMA:
        # persistent: a program per SM walks the tiles; flattening the tile and K loops into one
        # lets the software pipeline load the next tile's first slices during this one's epilogue
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _accumulate_tma(X_DESC, W_DESC, pid_m * BLOCK_M, pid_n * BLOCK_N, K, IEEE,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
            if TMA_STORE:
                _store_epilogue_tma(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, X_SCALE, W_SCALE, BIAS, GATE,
                                    gate_rows, RESIDUAL_DESC, OUT_DESC, HAS_X_SCALE, PER_CHANNEL, HAS_BIAS,
                                    ACTIVATION, HAS_GATE, HAS_RESIDUAL, BLOCK_M, BLOCK_N)
            else:
                rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                _store_epilogue(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, RESIDUAL, OUT, gate_rows,
                                HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL)
    else:
        pid_m, pid_n = _tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_pointers(X, W, rows, cols, M, N, K, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_epilogue(acc, rows, cols, M, N, X_SCALE, W_SCALE, BIAS, GATE, RESIDUAL, OUT, gate_rows,
                        HAS_X_SCALE, PER_CHANNEL, HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL)


VARIANTS = ("tiled", "persistent_tma", "persistent_tma_store")


def _set_descriptor_blocks(nargs: dict) -> None:
    """Config pre-hook of the TMA variants: their descriptors copy blocks of the config's shape."""
    nargs["X_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["W_DESC"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    for name in ("RESIDUAL_DESC", "OUT_DESC"):
        if nargs[name] is not None:
            nargs[name].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"] // 2]


def _configs(tiles: list[tuple[int, ...]], tma: bool, tma_store: bool = False) -> list[triton.Config]:
    """Configs of (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps[, programs per SM]) tiles."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "TMA": tma,
                           "TMA_STORE": tma_store, "PROGRAMS_PER_SM": per_sm},
                          num_stages=stages, num_warps=warps, pre_hook=_set_descriptor_blocks if tma else None)
            for bm, bn, bk, stages, warps, per_sm in (tile + (1,) * (6 - len(tile)) for tile in tiles)]


# Hopper (H100/H200) FP8 tiles: 128-wide wgmma, 3-4 stages of 128-deep K slices fit in 228 KB of
# shared memory. Tuned per shape (_TUNING_KEY); the DiT and Flux shapes are multiples of 128. The persistent
# TMA variants get the large tiles only: they pay off where the tiled kernel is bound by issuing
# loads, not by the number of tiles. GPUs without FP8 multiply 2-byte operands: the same tiles
# with K slices half as deep, the same bytes per stage (A100: 164 KB of shared memory).
_FP8_TILES = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
              (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]
_TILED_CONFIGS = _configs(_FP8_TILES, tma=False)
_TMA_CONFIGS = _configs(_FP8_TILES[:3], tma=True)
# With the TMA epilogue, also one warpgroup's tiles small enough in shared memory (82-98 KB) and
# registers (at most 238 a thread, no spill) for two programs to share an SM: while one runs its
# epilogue the other's wgmma keep the tensor cores busy, the overlap a K of 1152 (9 K slices a
# tile) leaves the single program without.
_TMA_STORE_CONFIGS = _configs(_FP8_TILES[:3] + [(128, 128, 128, 2, 4, 2), (128, 64, 128, 3, 4, 2)], tma=True,
                              tma_store=True)
# Per TMA variant, its smallest tile's e4m3 main-loop stages, (BLOCK_M + BLOCK_N) * BLOCK_K bytes
# each: a GPU whose blocks get less shared memory can run none of its tiles (the autotuner would
# find every one out of resources and launch one anyway). 131 KB and 64 KB: sm_120's 99 KB GPUs
# (also >= sm_90) run the store variant's small tiles at most.
_TMA_MIN_SHARED_MEMORY = {
    variant: min(c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] for c in configs)
    for variant, configs in (("persistent_tma", _TMA_CONFIGS), ("persistent_tma_store", _TMA_STORE_CONFIGS))}
_WIDE_OPERAND_CONFIGS = _configs([(bm, bn, bk // 2, stages, warps) for bm, bn, bk, stages, warps in _FP8_TILES],
                                 tma=False)
# Tuned per shape and per epilogue: an activation, a gate or a residual changes the epilogue's
# registers and bytes, and so the best tile
_TUNING_KEY = ["M", "N", "K", "ACTIVATION", "HAS_GATE", "HAS_RESIDUAL"]
_TUNED_KERNELS = {name: triton.autotune(configs, key=_TUNING_KEY)(_linear_kernel) for name, configs in
                  [("tiled", _TILED_CONFIGS), ("persistent_tma", _TMA_CONFIGS),
                   ("persistent_tma_store", _TMA_STORE_CONFIGS), ("wide", _WIDE_OPERAND_CONFIGS)]}
# Small tiles under the interpreter: several tiles in each direction and ragged edges at test sizes,
# and fewer persistent programs than tiles, so that each walks several.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
_INTERPRETER_PROGRAMS = 3
# The variant "auto" measured fastest, per (device, M, N, K, operand dtype, output dtype, epilogue,
# whether the TMA store can write this output) (:func:`variant_key`).
VARIANT_CHOICES: dict[tuple, str] = {}


# Rows up to this many elements are held in registers (a program's tile: 8 warps, 32 fp32 each a
# thread); the tile of shorter rows is filled with several of them.
_QUANTIZE_TILE = 8192


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (codes (M, K) float8_e4m3fn, scale (M,) fp32) with x ~ codes * scale[:, None].
    One read of x where a row fits a program's registers (K <= 8192: DiT's 1152 and 4608, Flux's
    3072), several rows a program, so that each moves a few KB at once."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    codes = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    tile = 64 if interpreting_triton() else _QUANTIZE_TILE
    one_pass = triton.next_power_of_2(K) <= tile
    block = triton.next_power_of_2(K) if one_pass else tile
    rows = max(1, min(tile // block, triton.next_power_of_2(M)))
    _quantize_rows_kernel[(triton.cdiv(M, rows),)](
        x, codes, scale, M, K, x.stride(0), E4M3=E4M3_MAX, MIN_ABS=MIN_AMAX, ROWS=rows, BLOCK_K=block,
        ONE_PASS=one_pass, num_warps=4 if rows * block <= 2048 else 8)
    return codes, scale


def _tma_unsupported(variant: str, x: Tensor, weight: Tensor) -> str | None:
    """Why TMA variant ``variant`` cannot run on these operands (None when it can)."""
    if TensorDescriptor is None:
        return "this Triton has no host-side tensor descriptors (triton.tools.tensor_descriptor)"
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0):
        return "TMA needs a Hopper or newer GPU (sm_90+)"
    if x.device.type != "cuda" and not interpreting_triton():
        return "TMA needs a CUDA device"
    if x.is_cuda and x.element_size() != 1:
        return "the TMA variant's tiles are sized for e4m3 operands"
    if x.is_cuda and _max_shared_memory(x.device) < _TMA_MIN_SHARED_MEMORY[variant]:
        return (f"its tiles need {_TMA_MIN_SHARED_MEMORY[variant] // 1024} KB of shared memory a block or "
                f"more, this GPU has {_max_shared_memory(x.device) // 1024} KB")
    if not all(_tma_aligned(t) for t in (x, weight)):
        return "TMA needs 16-byte aligned rows (K * itemsize a multiple of 16) and 16-byte aligned data"
    return None


def _tma_aligned(t: Tensor) -> bool:
    """Whether the TMA unit can copy blocks of this matrix: unit column stride, 16-byte aligned
    data and row stride (torch calls a one-row view of a wider matrix contiguous: its row stride
    is what the descriptor gets)."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _tma_store_unsupported(N: int, out_dtype: torch.dtype, residual: Tensor | None) -> str | None:
    """Why the TMA store cannot write an (M, N) output of out_dtype (allocated here, so aligned) or
    read this residual (None when it can)."""
    if (N * out_dtype.itemsize) % 16 or (residual is not None and not _tma_aligned(residual)):
        return ("the TMA store needs 16-byte aligned output and residual rows (N * itemsize a multiple of "
                "16) and data")
    return None


def variant_key(x: Tensor, N: int, out_dtype: torch.dtype, activation: str | None, has_gate: bool,
                residual: Tensor | None) -> tuple:
    """The key of :data:`VARIANT_CHOICES` for x (M, K) times an (N, K) weight with this epilogue:
    per epilogue, as the tiles are tuned (an activation, a gate or a residual changes the best)."""
    return (x.device, *x.shape, N, x.dtype, out_dtype, activation, has_gate, residual is not None,
            _tma_store_unsupported(N, out_dtype, residual) is None)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block may have on this GPU (opted in): what Triton checks a
    compiled kernel against (227 KB on Hopper, 99 KB on sm_120 GPUs, which are also >= sm_90)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _launch(variant: str, args: tuple, flags: dict, M: int, N: int) -> None:
    x, w, residual, out = args[0], args[2], args[6], args[7]
    tma, tma_store = variant != "tiled", variant == "persistent_tma_store"
    # block shapes are the config's (its pre-hook sets them); these stand in until then
    blocks = _INTERPRETER_BLOCKS if interpreting_triton() else _TMA_CONFIGS[0].kwargs
    descriptors = [None] * 4
    if tma:
        descriptors[:2] = (TensorDescriptor.from_tensor(x, [blocks["BLOCK_M"], blocks["BLOCK_K"]]),
                           TensorDescriptor.from_tensor(w, [blocks["BLOCK_N"], blocks["BLOCK_K"]]))
    if tma_store:
        descriptors[2:] = (None if residual is None else
                           TensorDescriptor.from_tensor(residual, [blocks["BLOCK_M"], blocks["BLOCK_N"] // 2]),
                           TensorDescriptor.from_tensor(out, [blocks["BLOCK_M"], blocks["BLOCK_N"] // 2]))
    programs = None
    if tma:
        programs = _INTERPRETER_PROGRAMS if interpreting_triton() else _multiprocessors(x.device)
    args = args[:8] + tuple(descriptors) + args[8:]

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles if programs is None else min(tiles, programs * meta.get("PROGRAMS_PER_SM", 1)),)

    if interpreting_triton():
        _linear_kernel[grid(_INTERPRETER_BLOCKS)](*args, **flags, **_INTERPRETER_BLOCKS, TMA=tma, TMA_STORE=tma_store)
    else:
        wide = variant == "tiled" and x.element_size() > 1
        _TUNED_KERNELS["wide" if wide else variant][grid](*args, **flags)


def _fastest_variant(variants: tuple[str, ...], args: tuple, flags: dict, M: int, N: int) -> str:
    """Each variant autotuned, then timed once more against the others: the fastest wins. A
    variant none of whose tiles fit this GPU (the autotuner launches one anyway) drops out."""
    times = {}
    for variant in variants:
        try:
            _launch(variant, args, flags, M, N)  # autotunes
        except triton.runtime.errors.OutOfResources:
            continue
        times[variant] = triton.testing.do_bench(lambda: _launch(variant, args, flags, M, N))
    return min(times, key=times.get)


def linear(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
           activation: str | None, gate: Tensor | None, gate_rows: int, residual: Tensor | None,
           out_dtype: torch.dtype, variant: str = "auto") -> Tensor:
    """epilogue(x @ weight^T) as (M, N) in out_dtype; x (M, K) and weight (N, K) of one dtype.

    variant: "tiled", "persistent_tma" (TMA loads x and w), "persistent_tma_store" (TMA also
    reads the residual and writes the output, in half tiles) or "auto": of those the GPU and the
    operands allow, the one that measured fastest for this shape and epilogue (once each); the tiled one
    off a GPU.
    """
    if variant not in (*VARIANTS, "auto"):
        raise ValueError(f"fp8_linear: variant must be one of {VARIANTS} or 'auto', got {variant!r}")
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    flags = dict(HAS_X_SCALE=x_scale is not None, PER_CHANNEL=weight_scale.numel() > 1,
                 HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
                 HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
                 IEEE=x.dtype == torch.float32)
    args = (x, *(None if t is None else t.contiguous() for t in (x_scale, weight, weight_scale, bias, gate, residual)),
            out, M, N, K, gate_rows)
    problems = {"tiled": None, "persistent_tma": _tma_unsupported("persistent_tma", x, args[2]),
                "persistent_tma_store": (_tma_unsupported("persistent_tma_store", x, args[2])
                                         or _tma_store_unsupported(N, out_dtype, args[6]))}
    if variant != "auto" and problems[variant]:
        raise ValueError(f"fp8_linear: variant {variant!r} cannot run here: {problems[variant]}")
    if variant == "auto":
        runnable = tuple(v for v in VARIANTS if not problems[v]) if x.device.type == "cuda" else ("tiled",)
        if len(runnable) == 1:
            variant = runnable[0]
        else:
            key = variant_key(x, N, out_dtype, activation, gate is not None, args[6])
            if key not in VARIANT_CHOICES and not torch.cuda.is_current_stream_capturing():
                VARIANT_CHOICES[key] = _fastest_variant(runnable, args, flags, M, N)
            variant = VARIANT_CHOICES.get(key, "tiled")
    _launch(variant, args, flags, M, N)
    return out
