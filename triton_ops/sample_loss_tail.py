"""Triton side of the per-sample losses' tails (formulas: csrc/sample_loss_tail.h, kinds and
widths: fastgen_kernels/ops/_sample_loss.py): one program walks the batch a block of samples at a
time, first adding each sample's partial sums in chunk order (what the reductions leave,
triton_ops/sample_reduce.py); for "mean" each lane of the block sums its samples in order and one
tl.sum adds the lanes (deterministic)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.backends import interpreting_triton
from fastgen_kernels.ops import _sample_loss as sl


@triton.jit
def _tail_kernel(
    PARTIALS,  # (B, chunks, NSUMS) fp32 partial sums
    WEIGHT,  # (B,) fp32, read if HAS_WEIGHT
    T,  # (B,) fp32, read if KIND == SCM
    LOGVAR,  # (B,) fp32, read if KIND == SCM
    LOSS,  # () if MEAN else (B,) fp32 output
    SAVED,  # (B, NSAVED) fp32 output
    batch,
    chunks,  # partial sums per sample
    D,  # elements per sample, as a float
    red,  # 1 / B for "mean", 1 for "none"
    p0, p1, p2, p3,  # the tail's params
    KIND: tl.constexpr,
    NSUMS: tl.constexpr,
    NSAVED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], tl.float32)  # lane j: samples j, j + BLOCK, ... in order
    for first in range(0, batch, BLOCK):
        b = first + tl.arange(0, BLOCK)
        mask = b < batch
        # a sample's chunk sums (up to 256 of them, B = 1) added in fp64: fp32 drifted by their count
        s0 = tl.zeros([BLOCK], tl.float64)
        s1 = tl.zeros([BLOCK], tl.float64)
        s2 = tl.zeros([BLOCK], tl.float64)
        for k in range(0, chunks):
            row = PARTIALS + (b.to(tl.int64) * chunks + k) * NSUMS
            s0 += tl.load(row, mask=mask, other=0.0).to(tl.float64)
            if NSUMS > 1:
                s1 += tl.load(row + 1, mask=mask, other=0.0).to(tl.float64)
            if NSUMS > 2:
                s2 += tl.load(row + 2, mask=mask, other=0.0).to(tl.float64)
        s0, s1, s2 = s0.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32)
        w = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(WEIGHT + b, mask=mask, other=1.0)
        if KIND == 0:  # squared residual: (scale, huber, power, offset)
            m = s0
            dm = tl.full([BLOCK], 1.0, tl.float32)
            if p1 > 0:
                root = tl.sqrt(s0 + p1 * p1)
                m = s0 / (root + p1)
                dm = 1.0 / (2.0 * root)
            adaptive = tl.full([BLOCK], 1.0, tl.float32)
            if p2 != 0:
                adaptive = tl.exp(-p2 * tl.log(m + p3))
            loss = w * p0 * adaptive * m
            tl.store(SAVED + b * NSAVED, 2.0 * red * w * p0 * adaptive * dm, mask=mask)
            tl.store(SAVED + b * NSAVED + 1, red * p0 * adaptive * m, mask=mask)
        elif KIND == 1:  # VSD: (eps,)
            c = 1.0 / (s0 / D + p0) * w
            loss = 0.5 * c * c * s1 / D
            tl.store(SAVED + b * NSAVED, red * c / D, mask=mask)
        elif KIND == 2:  # softplus
            loss = s0 / D
            tl.store(SAVED + b * NSAVED, tl.full([BLOCK], 1.0, tl.float32) * (red / D), mask=mask)
        else:  # sCM: (sigma_data, warmup, c)
            t = tl.load(T + b, mask=mask, other=0.0)
            u = tl.load(LOGVAR + b, mask=mask, other=0.0)
            n = 1.0 / (tl.sqrt(s0 / D) + p2)
            S = s2 - 2.0 * s1 * n + s0 * n * n
            S = tl.where(S < 0.0, 0.0, S)  # keeps a NaN (a diverged sample) a NaN, as clamp_min does
            cos_t, sin_t = tl.cos(t), tl.sin(t)
            sigma = p0 * sin_t / cos_t
            sigma = tl.where(sigma < 1e-6, 1e-6, sigma)  # sCM's 1 / sigma: no zero denominators
            k = tl.where(cos_t <= 0.0, 0.0, tl.exp(-u) / (D * sigma))  # t at pi/2 (rounded past it): 1 / sigma -> 0
            loss = S * k + u
            tl.store(SAVED + b * NSAVED, 2.0 * red * k, mask=mask)
            tl.store(SAVED + b * NSAVED + 1, red * (1.0 - S * k), mask=mask)
            tl.store(SAVED + b * NSAVED + 2, n * (-cos_t * cos_t * p0), mask=mask)
            tl.store(SAVED + b * NSAVED + 3, n * (cos_t * cos_t), mask=mask)
            tl.store(SAVED + b * NSAVED + 4, n * (-p1 * p0), mask=mask)
            tl.store(SAVED + b * NSAVED + 5, n * (-p1 * cos_t * sin_t), mask=mask)
        if MEAN:
            total += tl.where(mask, loss, 0.0)
        else:
            tl.store(LOSS + b, loss, mask=mask)
    if MEAN:
        tl.store(LOSS, tl.sum(total, axis=0) * red)


# samples a step of the tail's walk: a block of any batch size would not compile (Triton's
# largest tensor is 2^20 elements) or would spill (the interpreter: 16, to walk at test sizes)
_BLOCK = 1024


def tail(partials: Tensor, weight: Tensor | None, t: Tensor | None, logvar: Tensor | None, kind: int,
         params: list[float], numel: int, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss () if mean else (B,), saved (B, k)) from the fp32 partial sums (B, chunks, n) of the
    reductions (sample_reduce.reduce); per-sample inputs fp32."""
    batch, chunks = partials.shape[:2]
    nsums, nsaved = sl.TAIL_WIDTHS[kind]
    p0, p1, p2, p3 = [float(v) for v in params] + [0.0] * (4 - len(params))
    loss = partials.new_empty(() if mean else (batch,))
    saved = partials.new_empty(batch, nsaved)
    _tail_kernel[(1,)](partials.contiguous(), weight, t, logvar, loss, saved, batch, chunks, float(numel),
                       1.0 / batch if mean else 1.0, p0, p1, p2, p3,
                       KIND=kind, NSUMS=nsums, NSAVED=nsaved, HAS_WEIGHT=weight is not None, MEAN=mean,
                       BLOCK=min(16 if interpreting_triton() else _BLOCK, max(16, triton.next_power_of_2(batch))),
                       num_warps=4)
    return loss, saved
