"""Triton flash attention: forward, backward and the exact forward-mode JVP
(math: fastgen_kernels/ops/attention.py).

One program owns a block of BLOCK_M queries of one (batch, head) and walks the keys in blocks of
BLOCK_N (the backward's dk/dv program owns a block of keys and walks the queries). Scores live in
registers only: nothing of size Lq x Lk is ever written. Scores are kept in base 2
(s2 = q.k * scale * log2(e)) so the exponentials are exp2; the log-sum-exp stored for the
backward is in natural units, as flash-attn's ``softmax_lse``.

Masks. Query i sits at position i + Lk - Lq (bottom-right alignment: with a KV cache the queries
are the last tokens) and, when causal, sees key j iff j // chunk <= position // chunk (chunk = 1:
token-causal; chunk = c: block-causal, a chunk of c tokens sees itself and every earlier chunk).
Key blocks that every query of the program may see run without any mask; only the blocks on the
diagonal and the last, partial block pay for one (`_allowed`). Queries whose position is negative
see no key: their output and tangent are 0 and their log-sum-exp is -inf.

Tensors are (B, L, H, Dh) with any strides but a unit last one; outputs are contiguous. Head dims
that are not powers of two are covered by power-of-two column parts with masked loads: padded to
the next power of two, or split into a main part and a narrow tail (`head_dim_split`: DiT's 72 is
64 + 16, not 128), each head-dim tile then held as two (`_load_pair`, `_dot_over_d`, ...).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgen_kernels.backends import interpreting_triton

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _key_end(position, Lk, chunk, CAUSAL: tl.constexpr):
    """Exclusive end of the keys a query at `position` sees (scalar)."""
    if CAUSAL:
        seen = tl.where(position >= 0, (tl.maximum(position, 0) // chunk + 1) * chunk, 0)
        return tl.minimum(seen, Lk)
    return Lk


@triton.jit
def _first_query(key, offset, chunk, CAUSAL: tl.constexpr):
    """Index of the first query that sees `key` (scalar; may be past the last query)."""
    if CAUSAL:
        return tl.maximum((key // chunk) * chunk - offset, 0)
    return 0


@triton.jit
def _allowed(positions, keys, Lk, chunk, CAUSAL: tl.constexpr):
    """(len(positions), len(keys)) mask of the pairs that attend: key in range and, when causal,
    not in a later chunk than the query."""
    ok = keys[None, :] < Lk
    if CAUSAL:
        ok = ok & (positions[:, None] >= 0)
        ok = ok & (keys[None, :] // chunk <= tl.maximum(positions, 0)[:, None] // chunk)
    return ok


@triton.jit
def _query_block(Lq, Lk, chunk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """This program's (batch * head, query rows, their positions, full_end, end): keys
    [0, full_end) are seen by every row of the block, [full_end, end) need the mask."""
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offset = Lk - Lq
    end = _key_end(start_m + BLOCK_M - 1 + offset, Lk, chunk, CAUSAL)
    full_end = (_key_end(start_m + offset, Lk, chunk, CAUSAL) // BLOCK_N) * BLOCK_N
    return tl.program_id(1), rows, rows + offset, full_end, end


@triton.jit
def _head_offset(bh, H, stride_b, stride_h):
    """Offset of head bh % H of batch bh // H, in int64 (a whole tensor may exceed 2^31)."""
    bh = bh.to(tl.int64)
    return (bh // H) * stride_b + (bh % H) * stride_h


@triton.jit
def _load_rows(base, rows, n_rows, stride_l, cols, head_dim):
    """(len(rows), BLOCK_D) tile of rows; rows past n_rows and padded columns read 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    return tl.load(base + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows_t(base, rows, n_rows, stride_l, cols, head_dim):
    """The same tile transposed: (BLOCK_D, len(rows))."""
    mask = (rows[None, :] < n_rows) & (cols[:, None] < head_dim)
    return tl.load(base + rows[None, :] * stride_l + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, n_rows, stride_l, cols, head_dim, value):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < head_dim)
    tl.store(base + rows[:, None] * stride_l + cols[None, :], value.to(base.dtype.element_ty),
             mask=mask)


@triton.jit
def _load_pair(base, rows, n_rows, stride_l, cols, cols_hi, head_dim, SPLIT: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """A head-dim tile of rows as its (main, tail) column parts (see `head_dim_split`); without
    SPLIT the tail is the main part again, never read."""
    if TRANSPOSED:
        main = _load_rows_t(base, rows, n_rows, stride_l, cols, head_dim)
        tail = main
        if SPLIT:
            tail = _load_rows_t(base, rows, n_rows, stride_l, cols_hi, head_dim)
    else:
        main = _load_rows(base, rows, n_rows, stride_l, cols, head_dim)
        tail = main
        if SPLIT:
            tail = _load_rows(base, rows, n_rows, stride_l, cols_hi, head_dim)
    return main, tail


@triton.jit
def _store_pair(base, rows, n_rows, stride_l, cols, cols_hi, head_dim, main, tail,
                SPLIT: tl.constexpr):
    _store_rows(base, rows, n_rows, stride_l, cols, head_dim, main)
    if SPLIT:
        _store_rows(base, rows, n_rows, stride_l, cols_hi, head_dim, tail)


@triton.jit
def _dot_over_d(a, a_hi, b, b_hi, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b contracted over the head dim, part by part: (R, Dh) x (Dh, C) -> (R, C) fp32."""
    out = tl.dot(a, b, input_precision=PRECISION)
    if SPLIT:
        out = tl.dot(a_hi, b_hi, out, input_precision=PRECISION)
    return out


@triton.jit
def _dot_into_d(p, b, b_hi, acc, acc_hi, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """(acc, acc_hi) += p @ (b, b_hi): a product whose output runs over the head dim."""
    acc = tl.dot(p.to(b.dtype), b, acc, input_precision=PRECISION)
    if SPLIT:
        acc_hi = tl.dot(p.to(b_hi.dtype), b_hi, acc_hi, input_precision=PRECISION)
    return acc, acc_hi


@triton.jit
def _rescale(acc, acc_hi, alpha, SPLIT: tl.constexpr):
    """Both parts of a (rows, head dim) accumulator times a per-row factor."""
    acc = acc * alpha[:, None]
    if SPLIT:
        acc_hi = acc_hi * alpha[:, None]
    return acc, acc_hi


@triton.jit
def _head_columns(BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr):
    """Column indices of the main part and of the tail part of the head dim."""
    return tl.arange(0, BLOCK_D), BLOCK_D + tl.arange(0, BLOCK_HI)


# --------------------------------------------------------------------------- forward


@triton.jit
def _forward_block(
    acc, acc_hi, l_i, m_i, q, q_hi, k_base, v_base, start_n, positions, Lk, stride_kl, stride_vl,
    cols, cols_hi, head_dim, qk_scale, chunk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax: rescale the running sums to the new row maximum and
    add this block's exp2(s2 - max) and exp2(s2 - max) @ v."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k_t, k_t_hi = _load_pair(k_base, keys, Lk, stride_kl, cols, cols_hi, head_dim, SPLIT, True)
    s = _dot_over_d(q, q_hi, k_t, k_t_hi, SPLIT, PRECISION) * qk_scale
    if MASKED:
        s = tl.where(_allowed(positions, keys, Lk, chunk, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row may have seen no key yet: subtract 0 rather than -inf (no NaN)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v, v_hi = _load_pair(v_base, keys, Lk, stride_vl, cols, cols_hi, head_dim, SPLIT, False)
    acc, acc_hi = _rescale(acc, acc_hi, alpha, SPLIT)
    acc, acc_hi = _dot_into_d(p, v, v_hi, acc, acc_hi, SPLIT, PRECISION)
    return acc, acc_hi, l_i, m_new


@triton.jit
def _forward_kernel(
    Q, K, V,  # (B, Lq, H, Dh), (B, Lk, H, Dh), (B, Lk, H, Dh); unit last stride
    O,  # (B, Lq, H, Dh) output, contiguous
    LSE,  # (B, H, Lq) fp32 output: natural log-sum-exp of the scaled scores
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    H, Lq, Lk, head_dim,
    qk_scale,  # scale * log2(e)
    chunk,  # causal chunk size (1: token-causal); unused when not CAUSAL
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, rows, positions, full_end, end = _query_block(Lq, Lk, chunk, CAUSAL, BLOCK_M, BLOCK_N)
    cols, cols_hi = _head_columns(BLOCK_D, BLOCK_HI)
    q, q_hi = _load_pair(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, Lq, stride_ql, cols,
                         cols_hi, head_dim, SPLIT, False)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, acc_hi, l_i, m_i = _forward_block(
            acc, acc_hi, l_i, m_i, q, q_hi, k_base, v_base, start_n, positions, Lk, stride_kl,
            stride_vl, cols, cols_hi, head_dim, qk_scale, chunk, False, CAUSAL, SPLIT, BLOCK_N,
            PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc, acc_hi, l_i, m_i = _forward_block(
            acc, acc_hi, l_i, m_i, q, q_hi, k_base, v_base, start_n, positions, Lk, stride_kl,
            stride_vl, cols, cols_hi, head_dim, qk_scale, chunk, True, CAUSAL, SPLIT, BLOCK_N,
            PRECISION)
    seen = l_i > 0  # False only for queries that see no key
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    _store_pair(O + _head_offset(bh, H, stride_ob, stride_oh), rows, Lq, stride_ol, cols, cols_hi,
                head_dim, acc * inv_l[:, None], acc_hi * inv_l[:, None], SPLIT)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / LOG2E, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, lse, mask=rows < Lq)


# --------------------------------------------------------------------------- JVP


@triton.jit
def _jvp_block(
    acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i, q, q_hi, tq, tq_hi, k_base, v_base, tk_base,
    tv_base, start_n, positions, lse2, Lk, stride_kl, stride_vl, stride_tkl, stride_tvl, cols,
    cols_hi, head_dim, qk_scale, scale, chunk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SAVED: tl.constexpr, GIVEN_O: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block of the JVP. With p the (unnormalized) probabilities and
    dS = (tq k^T + q tk^T) * scale, adds p @ tv + (p * dS) @ v to acc_t, rowsum(p * dS) to r_i and,
    unless O is given (SAVED, GIVEN_O), p @ v to acc_o, all rescaled online as in the forward.
    SAVED: the forward's log-sum-exp is known, p is already normalized and nothing needs
    rescaling."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k_t, k_t_hi = _load_pair(k_base, keys, Lk, stride_kl, cols, cols_hi, head_dim, SPLIT, True)
    v, v_hi = _load_pair(v_base, keys, Lk, stride_vl, cols, cols_hi, head_dim, SPLIT, False)
    s = _dot_over_d(q, q_hi, k_t, k_t_hi, SPLIT, PRECISION) * qk_scale
    if SAVED:
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:  # after the exp: a row that sees no key has lse = -inf and p = inf here
            p = tl.where(_allowed(positions, keys, Lk, chunk, CAUSAL), p, 0.0)
    else:
        if MASKED:
            s = tl.where(_allowed(positions, keys, Lk, chunk, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if not GIVEN_O:
            acc_o, acc_o_hi = _rescale(acc_o, acc_o_hi, alpha, SPLIT)
            acc_o, acc_o_hi = _dot_into_d(p, v, v_hi, acc_o, acc_o_hi, SPLIT, PRECISION)
        acc_t, acc_t_hi = _rescale(acc_t, acc_t_hi, alpha, SPLIT)
        r_i = r_i * alpha
    if HAS_TQ or HAS_TK:
        ds = tl.zeros_like(s)
        if HAS_TQ:
            ds += _dot_over_d(tq, tq_hi, k_t, k_t_hi, SPLIT, PRECISION)
        if HAS_TK:
            tk_t, tk_t_hi = _load_pair(tk_base, keys, Lk, stride_tkl, cols, cols_hi, head_dim,
                                       SPLIT, True)
            ds += _dot_over_d(q, q_hi, tk_t, tk_t_hi, SPLIT, PRECISION)
        pds = p * (ds * scale)
        r_i += tl.sum(pds, 1)
        acc_t, acc_t_hi = _dot_into_d(pds, v, v_hi, acc_t, acc_t_hi, SPLIT, PRECISION)
    if HAS_TV:
        tv, tv_hi = _load_pair(tv_base, keys, Lk, stride_tvl, cols, cols_hi, head_dim, SPLIT,
                               False)
        acc_t, acc_t_hi = _dot_into_d(p, tv, tv_hi, acc_t, acc_t_hi, SPLIT, PRECISION)
    return acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i


@triton.jit
def _jvp_kernel(
    Q, K, V,  # (B, Lq, H, Dh), (B, Lk, H, Dh), (B, Lk, H, Dh); unit last stride
    TQ, TK, TV,  # tangents, shaped as their primals (unused when the HAS_ flag is off)
    O,  # (B, Lq, H, Dh): output, or the forward's output when SAVED or GIVEN_O; unit last stride
    LSE,  # (B, H, Lq) fp32: the forward's log-sum-exp when SAVED, else unused
    TO,  # (B, Lq, H, Dh) output: the tangent of O; unit last stride
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_tqb, stride_tql, stride_tqh,
    stride_tkb, stride_tkl, stride_tkh, stride_tvb, stride_tvl, stride_tvh,
    stride_ob, stride_ol, stride_oh, stride_tob, stride_tol, stride_toh,
    H, Lq, Lk, head_dim,
    qk_scale,  # scale * log2(e)
    scale,
    chunk,
    CAUSAL: tl.constexpr, SAVED: tl.constexpr, GIVEN_O: tl.constexpr, HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, rows, positions, full_end, end = _query_block(Lq, Lk, chunk, CAUSAL, BLOCK_M, BLOCK_N)
    cols, cols_hi = _head_columns(BLOCK_D, BLOCK_HI)
    q, q_hi = _load_pair(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, Lq, stride_ql, cols,
                         cols_hi, head_dim, SPLIT, False)
    tq, tq_hi = q, q_hi  # placeholders of the right type when HAS_TQ is off; never read then
    if HAS_TQ:
        tq, tq_hi = _load_pair(TQ + _head_offset(bh, H, stride_tqb, stride_tqh), rows, Lq,
                               stride_tql, cols, cols_hi, head_dim, SPLIT, False)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    tk_base = TK + _head_offset(bh, H, stride_tkb, stride_tkh)
    tv_base = TV + _head_offset(bh, H, stride_tvb, stride_tvh)
    lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SAVED:
        lse2 = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=rows < Lq, other=0.0) * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_o_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    acc_t_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i = _jvp_block(
            acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i, q, q_hi, tq, tq_hi, k_base, v_base,
            tk_base, tv_base, start_n, positions, lse2, Lk, stride_kl, stride_vl, stride_tkl,
            stride_tvl, cols, cols_hi, head_dim, qk_scale, scale, chunk, False, CAUSAL, SAVED,
            GIVEN_O, HAS_TQ, HAS_TK, HAS_TV, SPLIT, BLOCK_N, PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i = _jvp_block(
            acc_o, acc_o_hi, acc_t, acc_t_hi, r_i, l_i, m_i, q, q_hi, tq, tq_hi, k_base, v_base,
            tk_base, tv_base, start_n, positions, lse2, Lk, stride_kl, stride_vl, stride_tkl,
            stride_tvl, cols, cols_hi, head_dim, qk_scale, scale, chunk, True, CAUSAL, SAVED,
            GIVEN_O, HAS_TQ, HAS_TK, HAS_TV, SPLIT, BLOCK_N, PRECISION)
    o_base = O + _head_offset(bh, H, stride_ob, stride_oh)
    to_base = TO + _head_offset(bh, H, stride_tob, stride_toh)
    if SAVED or GIVEN_O:  # tO = (acc_t - r * O) / l, with l = 1 for SAVED (p was normalized)
        o, o_hi = _load_pair(o_base, rows, Lq, stride_ol, cols, cols_hi, head_dim, SPLIT, False)
        inv_l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if GIVEN_O:  # rows that see no key: l = 0 and tO = 0
            inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        to = (acc_t - r_i[:, None] * o.to(tl.float32)) * inv_l[:, None]
        to_hi = acc_t_hi
        if SPLIT:
            to_hi = (acc_t_hi - r_i[:, None] * o_hi.to(tl.float32)) * inv_l[:, None]
    else:  # normalize by l (rows that see no key: l = 0, o = tO = 0)
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o, o_hi = acc_o * inv_l[:, None], acc_o_hi * inv_l[:, None]
        to = (acc_t - r_i[:, None] * o) * inv_l[:, None]
        to_hi = (acc_t_hi - r_i[:, None] * o_hi) * inv_l[:, None]
        _store_pair(o_base, rows, Lq, stride_ol, cols, cols_hi, head_dim, o, o_hi, SPLIT)
    _store_pair(to_base, rows, Lq, stride_tol, cols, cols_hi, head_dim, to, to_hi, SPLIT)


# --------------------------------------------------------------------------- backward


@triton.jit
def _dq_block(
    dq, dq_hi, q, q_hi, do, do_hi, lse2, delta, k_base, v_base, start_n, positions, Lk,
    stride_kl, stride_vl, cols, cols_hi, head_dim, qk_scale, chunk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq += dS @ k for one key block, dS = P * (dO v^T - delta), P from the saved lse."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k_t, k_t_hi = _load_pair(k_base, keys, Lk, stride_kl, cols, cols_hi, head_dim, SPLIT, True)
    v_t, v_t_hi = _load_pair(v_base, keys, Lk, stride_vl, cols, cols_hi, head_dim, SPLIT, True)
    p = tl.math.exp2(_dot_over_d(q, q_hi, k_t, k_t_hi, SPLIT, PRECISION) * qk_scale
                     - lse2[:, None])
    if MASKED:
        p = tl.where(_allowed(positions, keys, Lk, chunk, CAUSAL), p, 0.0)
    ds = p * (_dot_over_d(do, do_hi, v_t, v_t_hi, SPLIT, PRECISION) - delta[:, None])
    return _dot_into_d(ds, tl.trans(k_t), tl.trans(k_t_hi), dq, dq_hi, SPLIT, PRECISION)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, O, DO,  # (B, L, H, Dh): q, k, v with unit last strides; O, DO contiguous
    LSE,  # (B, H, Lq) fp32 from the forward
    DELTA,  # (B, H, Lq) fp32 output: rowsum(dO * O), read by the dk/dv kernel
    DQ,  # (B, Lq, H, Dh) contiguous output
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,  # of O, DO and DQ
    stride_dkb, stride_dkl, stride_dkh,  # of DK and DV (unused here)
    H, Lq, Lk, head_dim, qk_scale, scale, chunk,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, rows, positions, full_end, end = _query_block(Lq, Lk, chunk, CAUSAL, BLOCK_M, BLOCK_N)
    cols, cols_hi = _head_columns(BLOCK_D, BLOCK_HI)
    out_offset = _head_offset(bh, H, stride_ob, stride_oh)
    q, q_hi = _load_pair(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, Lq, stride_ql, cols,
                         cols_hi, head_dim, SPLIT, False)
    do, do_hi = _load_pair(DO + out_offset, rows, Lq, stride_ol, cols, cols_hi, head_dim, SPLIT,
                           False)
    o, o_hi = _load_pair(O + out_offset, rows, Lq, stride_ol, cols, cols_hi, head_dim, SPLIT,
                         False)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if SPLIT:
        delta += tl.sum(do_hi.to(tl.float32) * o_hi.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + rows, delta, mask=rows < Lq)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=rows < Lq, other=0.0) * LOG2E
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq, dq_hi = _dq_block(dq, dq_hi, q, q_hi, do, do_hi, lse2, delta, k_base, v_base, start_n,
                              positions, Lk, stride_kl, stride_vl, cols, cols_hi, head_dim,
                              qk_scale, chunk, False, CAUSAL, SPLIT, BLOCK_N, PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq, dq_hi = _dq_block(dq, dq_hi, q, q_hi, do, do_hi, lse2, delta, k_base, v_base, start_n,
                              positions, Lk, stride_kl, stride_vl, cols, cols_hi, head_dim,
                              qk_scale, chunk, True, CAUSAL, SPLIT, BLOCK_N, PRECISION)
    _store_pair(DQ + out_offset, rows, Lq, stride_ol, cols, cols_hi, head_dim, dq * scale,
                dq_hi * scale, SPLIT)


@triton.jit
def _dkdv_block(
    dk, dk_hi, dv, dv_hi, k, k_hi, v, v_hi, q_base, do_base, lse_base, delta_base, start_m, keys,
    offset, Lq, Lk, stride_ql, stride_dol, cols, cols_hi, head_dim, qk_scale, chunk,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dv += P^T dO and dk += dS^T q for one query block, computed transposed ((keys, queries)
    tiles). Queries past Lq read q = dO = 0 and add nothing."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q_t, q_t_hi = _load_pair(q_base, rows, Lq, stride_ql, cols, cols_hi, head_dim, SPLIT, True)
    do, do_hi = _load_pair(do_base, rows, Lq, stride_dol, cols, cols_hi, head_dim, SPLIT, False)
    lse2 = tl.load(lse_base + rows, mask=rows < Lq, other=0.0) * LOG2E
    delta = tl.load(delta_base + rows, mask=rows < Lq, other=0.0)
    p_t = tl.math.exp2(_dot_over_d(k, k_hi, q_t, q_t_hi, SPLIT, PRECISION) * qk_scale
                       - lse2[None, :])
    if MASKED:
        p_t = tl.where(tl.trans(_allowed(rows + offset, keys, Lk, chunk, CAUSAL)), p_t, 0.0)
    dv, dv_hi = _dot_into_d(p_t, do, do_hi, dv, dv_hi, SPLIT, PRECISION)
    dp_t = _dot_over_d(v, v_hi, tl.trans(do), tl.trans(do_hi), SPLIT, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk, dk_hi = _dot_into_d(ds_t, tl.trans(q_t), tl.trans(q_t_hi), dk, dk_hi, SPLIT, PRECISION)
    return dk, dk_hi, dv, dv_hi


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DO,  # q, k, v: (B, L, H, Dh) with unit last strides; DO contiguous
    LSE, DELTA,  # (B, H, Lq) fp32
    DK, DV,  # (B, Lk, H, Dh) contiguous outputs
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,  # of DO
    stride_dkb, stride_dkl, stride_dkh,  # of DK and DV
    H, Lq, Lk, head_dim, qk_scale, scale, chunk,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    keys = start_n + tl.arange(0, BLOCK_N)
    cols, cols_hi = _head_columns(BLOCK_D, BLOCK_HI)
    offset = Lk - Lq
    k, k_hi = _load_pair(K + _head_offset(bh, H, stride_kb, stride_kh), keys, Lk, stride_kl, cols,
                         cols_hi, head_dim, SPLIT, False)
    v, v_hi = _load_pair(V + _head_offset(bh, H, stride_vb, stride_vh), keys, Lk, stride_vl, cols,
                         cols_hi, head_dim, SPLIT, False)
    q_base = Q + _head_offset(bh, H, stride_qb, stride_qh)
    do_base = DO + _head_offset(bh, H, stride_ob, stride_oh)
    lse_base = LSE + bh.to(tl.int64) * Lq
    delta_base = DELTA + bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
    dv_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
    # queries before `first` see none of these keys; from `full_start` on they see all of them
    first = (_first_query(start_n, offset, chunk, CAUSAL) // BLOCK_M) * BLOCK_M
    full_start = tl.cdiv(_first_query(start_n + BLOCK_N - 1, offset, chunk, CAUSAL), BLOCK_M)
    full_start = tl.minimum(full_start * BLOCK_M, tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
    for start_m in range(first, full_start, BLOCK_M):
        dk, dk_hi, dv, dv_hi = _dkdv_block(
            dk, dk_hi, dv, dv_hi, k, k_hi, v, v_hi, q_base, do_base, lse_base, delta_base,
            start_m, keys, offset, Lq, Lk, stride_ql, stride_ol, cols, cols_hi, head_dim,
            qk_scale, chunk, True, CAUSAL, SPLIT, BLOCK_M, PRECISION)
    for start_m in range(full_start, Lq, BLOCK_M):
        dk, dk_hi, dv, dv_hi = _dkdv_block(
            dk, dk_hi, dv, dv_hi, k, k_hi, v, v_hi, q_base, do_base, lse_base, delta_base,
            start_m, keys, offset, Lq, Lk, stride_ql, stride_ol, cols, cols_hi, head_dim,
            qk_scale, chunk, False, CAUSAL, SPLIT, BLOCK_M, PRECISION)
    out_offset = _head_offset(bh, H, stride_dkb, stride_dkh)
    _store_pair(DK + out_offset, keys, Lk, stride_dkl, cols, cols_hi, head_dim, dk * scale,
                dk_hi * scale, SPLIT)
    _store_pair(DV + out_offset, keys, Lk, stride_dkl, cols, cols_hi, head_dim, dv, dv_hi, SPLIT)


# --------------------------------------------------------------------------- launchers


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, L, H, Dh) tensor with a unit last stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul precision setting: exact ("highest", the default) or TF32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# Hopper gives a block at most 227 KB of shared memory; SHARED_MEMORY_BYTES is what the tiles
# below may use (tests/test_build.py compiles every kernel for sm_90 and checks it).
SHARED_MEMORY_BYTES = 227 * 1024


def head_dim_split(head_dim: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_HI, SPLIT): power-of-two column parts covering the head dim. tl.dot wants
    power-of-two tiles of at least 16, so a head dim is padded; where a main part plus a narrow
    tail pads less than the next power of two, the kernels carry two parts (DiT's 72 = 64 + 16,
    8 of them padding, instead of 128; 96 = 64 + 32 exactly). Without SPLIT, BLOCK_HI is unused."""
    padded = max(16, triton.next_power_of_2(head_dim))
    main = padded // 2
    tail = max(16, triton.next_power_of_2(head_dim - main)) if head_dim > main else 0
    if head_dim <= 16 or main + tail >= padded:
        return padded, 16, False
    return main, tail, True


@functools.cache
def blocks(width: int, itemsize: int, interpreting: bool, kernel: str
           ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("forward", "jvp" or "backward")
    for ``itemsize``-byte operands and head-dim tiles ``width`` columns wide in all.

    Chosen without a GPU from what the sm_90 compiler reports (cuobjdump --dump-resource-usage
    of the kernels as tests/compile_triton_for_hopper.py builds them): the largest tiles that
    compile without register spills, within shared memory. bf16/fp16 at widths <= 128: the
    forward takes FlashAttention-2's 128 x 64 (128 x 32 at widths <= 64); the backward 64 x 32
    (64 x 64 for split heads); the JVP, which holds q, tq and one or two (BLOCK_M, Dh) fp32
    accumulators, 128 x 32 (spill-free at DiT's 72 = 64 + 16 when O is given, with its
    log-sum-exp or without: 243-245 registers; computing O too it spills 48-320 bytes a thread).
    fp32 operands and widths over 128 take smaller tiles. To be tuned on hardware. The interpreter
    gets 16 x 16 tiles: it costs per tile element and small tiles still cross every boundary case."""
    if interpreting:
        return 16, 16, 1, 1
    warps = 4 if width <= 64 else 8
    if itemsize > 2:
        if kernel == "backward":
            return 32, 32, 4, 2
        # four fp32 (32, 256) operand tiles per key block leave no room to pipeline the JVP
        return 64, 32, warps, 1 if kernel == "jvp" and width > 128 else 2
    if width > 128:
        return {"forward": (64, 32, 8, 2), "jvp": (64, 16, 8, 2), "backward": (32, 32, 4, 2)}[kernel]
    # a split head (64 + 16 or 64 + 32 columns) takes 64 x 64 in the backward without spilling
    backward_n = 64 if 64 < width < 128 else 32
    return {"forward": (128, 64 if width > 64 else 32, warps, 3), "jvp": (128, 32, 8, 2),
            "backward": (64, backward_n, warps, 2)}[kernel]


def _config(q: Tensor, kernel: str) -> dict:
    main, tail, split = head_dim_split(q.shape[-1])
    if split and kernel == "jvp" and q.element_size() > 2:
        # Triton 3.9's LLVM aborts the process (an SLP vectorizer assertion) compiling the fp32
        # JVP on split heads (72, 96); one padded tile compiles everywhere
        main, tail, split = 2 * main, 16, False
    block_m, block_n, warps, stages = blocks(main + tail if split else main, q.element_size(),
                                             interpreting_triton(), kernel)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=main, BLOCK_HI=tail, SPLIT=split,
                PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)


def _sizes(q: Tensor, k: Tensor, scale: float) -> tuple:
    """(H, Lq, Lk, head_dim, qk_scale): the size arguments every kernel takes."""
    B, Lq, H, Dh = q.shape
    return H, Lq, k.shape[1], Dh, scale * LOG2E.value


def _mask(causal_chunk: int) -> dict:
    return dict(CAUSAL=causal_chunk > 0)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int
            ) -> tuple[Tensor, Tensor]:
    """(o, lse) as the reference: o (B, Lq, H, Dh) in q's dtype, lse (B, H, Lq) fp32."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    B, Lq, H, Dh = q.shape
    o = torch.empty(B, Lq, H, Dh, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    config = _config(q, "forward")
    _forward_kernel[(triton.cdiv(Lq, config["BLOCK_M"]), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        *_sizes(q, k, scale), max(causal_chunk, 1), **_mask(causal_chunk), **config)
    return o, lse


def jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
        tv: Tensor | None, scale: float, causal_chunk: int,
        saved: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """(o, to) in one pass over the keys; tangents that are None are zero. With
    ``saved = (o, lse)`` from the forward, o is not recomputed (the o returned is that one) and
    the probabilities need no online rescaling; with ``saved = (o, None)`` (an output computed
    elsewhere, e.g. by SDPA) o is not recomputed either, and the softmax's normalizer is, online."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    # an absent tangent is never read: its primal stands in for the pointer and strides
    tangents = [like if t is None else _unit_last_stride(t) for t, like in zip((tq, tk, tv), (q, k, v))]
    B, Lq, H, Dh = q.shape
    o, lse = (torch.empty(B, Lq, H, Dh, device=q.device, dtype=q.dtype), None) if saved is None else saved
    o = _unit_last_stride(o)
    to = torch.empty(B, Lq, H, Dh, device=q.device, dtype=q.dtype)
    config = _config(q, "jvp")
    _jvp_kernel[(triton.cdiv(Lq, config["BLOCK_M"]), B * H)](
        q, k, v, *tangents, o, lse, to, *_strides(q), *_strides(k), *_strides(v),
        *(s for t in tangents for s in _strides(t)), *_strides(o), *_strides(to), *_sizes(q, k, scale), scale,
        max(causal_chunk, 1), SAVED=lse is not None, GIVEN_O=saved is not None and lse is None,
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, **_mask(causal_chunk), **config)
    return o, to


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
             scale: float, causal_chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) as the reference, each contiguous in its input's dtype. Two kernels, no
    atomics: dq per query block (which also writes delta = rowsum(dO * O)), then dk and dv per
    key block."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    grad_out, o = grad_out.contiguous(), o.contiguous()
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    dq = torch.empty(B, Lq, H, Dh, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Lk, H, Dh, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Lk, H, Dh, device=q.device, dtype=v.dtype)
    delta = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(dq), *_strides(dk),
            *_sizes(q, k, scale), scale, max(causal_chunk, 1))
    config = _config(q, "backward")
    _backward_dq_kernel[(triton.cdiv(Lq, config["BLOCK_M"]), B * H)](
        q, k, v, o, grad_out, lse, delta, dq, *args, **_mask(causal_chunk), **config)
    _backward_dkdv_kernel[(triton.cdiv(Lk, config["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, *args, **_mask(causal_chunk), **config)
    return dq, dk, dv
