r"""Scaled dot-product attention with an exact forward-mode JVP (flash attention, Triton).

Shapes (the flash-attn / diffusers layout): q ``(B, Lq, H, Dh)``, k and v ``(B, Lk, H, Dh)``,
output ``(B, Lq, H, Dh)``; Lq != Lk is cross-attention. Per batch and head, with scale
(default 1/sqrt(Dh))::

    S = q k^T * scale                 P = softmax(S) (over keys)        O = P v
    lse = log(sum_j exp(S_ij))        (saved for the backward, (B, H, Lq), fp32)

Masks: query i sits at position i + Lk - Lq (bottom-right alignment, as flash-attn: with a KV
cache the queries are the latest tokens). ``causal`` lets it see key j iff
j // chunk <= position // chunk: chunk = 1 is token-causal, chunk = c block-causal (a chunk of c
tokens sees itself and all earlier chunks: causal video). Masked scores are -inf; a query that
sees no key (Lq > Lk, causal) outputs 0 and has lse = -inf.

VJP with upstream gradient dO (FlashAttention-2)::

    dV = P^T dO        dP = dO V^T        delta = rowsum(dO * O) = rowsum(P * dP)
    dS = P * (dP - delta)                 dQ = dS K * scale        dK = dS^T Q * scale

JVP with tangents (tq, tk, tv) (S and P are perturbed through q and k)::

    dS = (tq k^T + q tk^T) * scale
    tP = P * (dS - rowsum(P * dS))        (the softmax Jacobian)
    tO = P tv + tP v = P tv + (P * dS) v - rowsum(P * dS) * O

The Triton kernel accumulates P tv + (P * dS) v and rowsum(P * dS) next to the forward's P v with
the same online-softmax rescaling, so the L x L matrices are never stored: memory is linear in L
and the cost is 12 Dh flops per (query, key) pair against the forward's 4.

Public API: :func:`attention` (differentiable in q, k, v, forward mode included) and
:func:`attention_jvp` ((O, tO) from one kernel). Custom ops: ``fastgen::attention`` -> (O, lse),
``fastgen::attention_backward``, ``fastgen::attention_jvp`` -> (O, tO) and
``fastgen::attention_tangent`` (tO given the forward's O and lse, the jvp rule of
``torch.func.jvp`` and forward-mode AD; or given O alone, SDPA's in the one-pass step).
Backends: triton (GPU; the interpreter in tests), cpu (PyTorch's fused CPU flash kernel for
forward and backward; the JVP formula above, in blocks of queries), reference (plain PyTorch in
fp32, materializing S). On CUDA tensors with no backend forced, :func:`attention` outside
forward-mode AD is PyTorch's SDPA where it has the mask (:func:`sdpa_runs_it`): faster than our
Triton forward and backward on Hopper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from fastgen_kernels.backends import OpDispatcher, carry_forced_backend, forced_backend
from fastgen_kernels.ops import _checks, _eager_op
from fastgen_kernels.ops.linear import input_tangents_only, saved_for_backward, tangent_rule

# Widest head the Triton kernels take: q, tq and two fp32 accumulators of that width per query
# row must fit in registers and shared memory (triton_ops/attention.py `blocks`).
MAX_TRITON_HEAD_DIM = 256

# Size of one (B, H, queries, Lk) score-sized temporary of the CPU JVP, which works through the
# queries in blocks: memory linear in L, and blocks that stay in cache (4 MB measured fastest
# on the development machine, 2.3x faster than 32 MB at L = 1024).
CPU_JVP_BLOCK_BYTES = 4 * 2**20

# fp32 tangents on a GPU: the Triton kernel's exact fp32 dots run as FMA loops, and the JVP's three
# of them measured 87 ms on an H200 at DiT-XL's 32x256x16x72 (its fp32 forward: 1.4 ms; the
# finite-difference JVP: 1.1 ms). There the tangent is the blocked formula on cuBLAS's fp32 GEMMs,
# with score-sized temporaries of this size (the interpreter still runs the kernel in tests).
GPU_FP32_JVP_BLOCK_BYTES = 64 * 2**20

# --------------------------------------------------------------------------- reference


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def allowed_pairs(Lq: int, Lk: int, causal_chunk: int, device: torch.device) -> Tensor | None:
    """(Lq, Lk) bool: which keys each query sees (None: all). causal_chunk 0 = no mask."""
    if causal_chunk == 0:
        return None
    position = torch.arange(Lq, device=device) + (Lk - Lq)
    key = torch.arange(Lk, device=device)
    # floor division: a negative position lands in a chunk before every key's
    return (key[None, :] // causal_chunk) <= (position[:, None] // causal_chunk)


def _heads_first(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L, H, Dh) -> (B, H, L, Dh) view in ``dtype``."""
    return None if t is None else t.to(dtype).transpose(1, 2)


def _probabilities(qf: Tensor, kf: Tensor, lse: Tensor, scale: float,
                   allowed: Tensor | None) -> Tensor:
    """P = exp(S - lse), (B, H, Lq, Lk); 0 where masked and on rows that see no key."""
    s = qf @ kf.transpose(-1, -2) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # rows that see no key have lse = -inf: subtract 0 there (their scores are all -inf)
    return torch.exp(s - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))


def _tokens_first(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, L, Dh) -> contiguous (B, L, H, Dh) in ``dtype``."""
    return t.transpose(1, 2).to(dtype).contiguous()


@_checks.without_autocast
def reference_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int
                      ) -> tuple[Tensor, Tensor]:
    """(O, lse): O (B, Lq, H, Dh) in q's dtype, lse (B, H, Lq) in fp32 (fp64 for fp64 input)."""
    ct = _compute_dtype(q)
    qf, kf, vf = (_heads_first(t, ct) for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) * scale
    allowed = allowed_pairs(q.shape[1], k.shape[1], causal_chunk, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
    return _tokens_first(p @ vf, q.dtype), lse


@_checks.without_autocast
def reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       scale: float, causal_chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (like its input) contiguous in its input's dtype."""
    ct = _compute_dtype(q)
    qf, kf, vf, of, gf = (_heads_first(t, ct) for t in (q, k, v, o, grad_out))
    p = _probabilities(qf, kf, lse, scale,
                       allowed_pairs(q.shape[1], k.shape[1], causal_chunk, q.device))
    delta = (gf * of).sum(-1, keepdim=True)
    ds = p * (gf @ vf.transpose(-1, -2) - delta)
    return (_tokens_first(ds @ kf * scale, q.dtype),
            _tokens_first(ds.transpose(-1, -2) @ qf * scale, k.dtype),
            _tokens_first(p.transpose(-1, -2) @ gf, v.dtype))


@_checks.without_autocast
def _tangent(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, tq: Tensor | None,
             tk: Tensor | None, tv: Tensor | None, scale: float, causal_chunk: int,
             query_block: int) -> Tensor:
    """tO = P tv + (P * dS) v - rowsum(P * dS) * O in the compute dtype, (B, H, Lq, Dh),
    ``query_block`` queries at a time (rows are independent once lse is known)."""
    ct = _compute_dtype(q)
    qf, kf, vf, of, tqf, tkf, tvf = (_heads_first(t, ct) for t in (q, k, v, o, tq, tk, tv))
    Lq, Lk = q.shape[1], k.shape[1]
    allowed = allowed_pairs(Lq, Lk, causal_chunk, q.device)
    blocks = []
    for start in range(0, Lq, query_block):
        rows = slice(start, start + query_block)
        p = _probabilities(qf[:, :, rows], kf, lse[:, :, rows], scale,
                           None if allowed is None else allowed[rows])
        to = torch.zeros_like(of[:, :, rows])
        if tqf is not None or tkf is not None:
            ds = torch.zeros_like(p)
            if tqf is not None:
                ds = ds + tqf[:, :, rows] @ kf.transpose(-1, -2)
            if tkf is not None:
                ds = ds + qf[:, :, rows] @ tkf.transpose(-1, -2)
            pds = p * ds * scale
            to = pds @ vf - pds.sum(-1, keepdim=True) * of[:, :, rows]
        if tvf is not None:
            to = to + p @ tvf
        blocks.append(to)
    return torch.cat(blocks, 2) if blocks else torch.zeros_like(of)  # Lq = 0: no blocks


def reference_tangent(q, k, v, o, lse, tq, tk, tv, scale: float, causal_chunk: int) -> Tensor:
    """tO (B, Lq, H, Dh) in q's dtype given the forward's O and lse (None: an O computed
    elsewhere, e.g. by SDPA, whose lse is recomputed); None tangents are zero."""
    if lse is None:
        ct = _compute_dtype(q)
        lse = reference_forward(q.to(ct), k.to(ct), v.to(ct), scale, causal_chunk)[1]
    to = _tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk, max(q.shape[1], 1))
    return _tokens_first(to, q.dtype)


def reference_jvp(q, k, v, tq, tk, tv, scale: float, causal_chunk: int) -> tuple[Tensor, Tensor]:
    """(O, tO), both (B, Lq, H, Dh) in q's dtype. O enters tO unrounded (in the compute dtype)."""
    ct = _compute_dtype(q)
    o, lse = reference_forward(q.to(ct), k.to(ct), v.to(ct), scale, causal_chunk)
    return o.to(q.dtype), reference_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk)


# --------------------------------------------------------------------------- CPU backend


def _cpu_mask(q: Tensor, k: Tensor, causal_chunk: int) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for the aten CPU flash kernel, whose is_causal is token-causal with
    top-left alignment: the same as ours only for chunk 1 and Lq == Lk; else an additive mask."""
    Lq, Lk = q.shape[1], k.shape[1]
    if causal_chunk == 0 or (causal_chunk == 1 and Lq == Lk):
        return None, causal_chunk == 1
    allowed = allowed_pairs(Lq, Lk, causal_chunk, q.device)
    return torch.zeros(Lq, Lk, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf")), False


def _heads_first_unit_stride(*tensors: Tensor) -> list[Tensor]:
    """(B, L, H, Dh) -> (B, H, L, Dh) views; the aten CPU kernels assume a unit last stride."""
    return [(t if t.stride(-1) == 1 else t.contiguous()).transpose(1, 2) for t in tensors]


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int
                 ) -> tuple[Tensor, Tensor]:
    mask, is_causal = _cpu_mask(q, k, causal_chunk)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_heads_first_unit_stride(q, k, v), 0.0, is_causal, attn_mask=mask, scale=scale)
    if mask is not None:  # the kernel reports lse = 0 for a query that sees no key
        lse = lse.masked_fill(~mask.isfinite().any(-1), float("-inf"))
    return o.transpose(1, 2).contiguous(), lse.contiguous()


def _cpu_backward(grad_out, q, k, v, o, lse, scale: float, causal_chunk: int):
    mask, is_causal = _cpu_mask(q, k, causal_chunk)
    # undo the forward's -inf for queries that see no key: the kernel computes exp(S - lse)
    lse = lse.masked_fill(lse == float("-inf"), 0)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_heads_first_unit_stride(grad_out, q, k, v, o), lse, 0.0, is_causal, attn_mask=mask,
        scale=scale)
    return tuple(g.transpose(1, 2).contiguous() for g in grads)


def _blocked_tangent(q, k, v, o, lse, tq, tk, tv, scale: float, causal_chunk: int,
                     block_bytes: int) -> Tensor:
    """tO (B, Lq, H, Dh) in q's dtype by the formula, in query blocks whose (B, H, block, Lk)
    score temporaries take about ``block_bytes``."""
    B, _, H, _ = q.shape
    row_bytes = B * H * k.shape[1] * torch.promote_types(q.dtype, torch.float32).itemsize
    query_block = max(1, block_bytes // max(1, row_bytes))
    to = _tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk, query_block)
    return _tokens_first(to, q.dtype)


def _cpu_tangent(q, k, v, o, lse, tq, tk, tv, scale: float, causal_chunk: int) -> Tensor:
    if lse is None:  # an O computed elsewhere
        lse = _cpu_forward(q, k, v, scale, causal_chunk)[1]
    return _blocked_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk, CPU_JVP_BLOCK_BYTES)


def _cpu_jvp(q, k, v, tq, tk, tv, scale: float, causal_chunk: int) -> tuple[Tensor, Tensor]:
    o, lse = _cpu_forward(q, k, v, scale, causal_chunk)
    return o, _cpu_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk)


# --------------------------------------------------------------------------- Triton backend


def _triton():
    from fastgen_kernels.triton_ops import attention

    return attention


def _triton_forward(q, k, v, scale, causal_chunk):
    return _triton().forward(q, k, v, scale, causal_chunk)


def _triton_backward(grad_out, q, k, v, o, lse, scale, causal_chunk):
    return _triton().backward(grad_out, q, k, v, o, lse, scale, causal_chunk)


def _fp32_on_gpu(q: Tensor) -> bool:
    return q.dtype == torch.float32 and q.device.type == "cuda"


def _triton_jvp(q, k, v, tq, tk, tv, scale, causal_chunk):
    if _fp32_on_gpu(q):  # see GPU_FP32_JVP_BLOCK_BYTES
        o, lse = _triton_forward(q, k, v, scale, causal_chunk)
        return o, _blocked_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk, GPU_FP32_JVP_BLOCK_BYTES)
    return _triton().jvp(q, k, v, tq, tk, tv, scale, causal_chunk)


def _triton_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk):
    if _fp32_on_gpu(q):  # see GPU_FP32_JVP_BLOCK_BYTES
        if lse is None:
            lse = _triton_forward(q, k, v, scale, causal_chunk)[1]
        return _blocked_tangent(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk, GPU_FP32_JVP_BLOCK_BYTES)
    # lse None: the kernel recomputes the softmax's normalizer online, not O
    return _triton().jvp(q, k, v, tq, tk, tv, scale, causal_chunk, saved=(o, lse))[1]


def _triton_support(q: Tensor, *args: object) -> str | None:
    """Why the Triton kernels cannot take these arguments, or None."""
    if q.dtype not in _checks.KERNEL_DTYPES:
        return f"{q.dtype} input (kernels read float16, bfloat16 and float32)"
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds the kernels' limit of {MAX_TRITON_HEAD_DIM}"
    # offsets within one batch entry are 32-bit in the kernels (64-bit ones cost registers), in
    # the (B, L, H, Dh) operands as strided (k, v, a given O, the tangents: a view of a packed qkv
    # tangent has rows wider than q's) and in the outputs (O, dq, ...), which are contiguous
    operands = [t for t in (q, *args) if isinstance(t, Tensor) and t.dim() == 4]
    if any(max(t.shape[1] * t.stride(1), t[0].numel()) >= 2**31 for t in operands):
        return "a batch entry of more than 2^31 elements (the kernels' offsets are 32-bit)"
    if q.shape[0] * q.shape[2] > 65535:  # the launch grid's second axis, CUDA's limit
        return f"batch x heads = {q.shape[0] * q.shape[2]} exceeds the kernels' grid limit of 65535"
    return _cpu_support(q, *args)


def _cpu_support(q: Tensor, *args: object) -> str | None:
    """Empty queries or keys go to the reference (the kernels, PyTorch's CPU flash kernel among
    them, assume some: with no keys it divides by zero)."""
    if any(isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] == 0 for t in args[:2]):
        return "no keys (Lk = 0)"
    return _checks.nonempty(q)


def _of_grad(grad_out, *args):
    return grad_out.device


_SUPPORTS = {"triton": _triton_support, "cpu": _cpu_support}

forward_dispatcher = OpDispatcher(
    "fastgen.attention",
    {"triton": _triton_forward, "cpu": _cpu_forward, "reference": reference_forward}, _SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.attention_backward",
    {"triton": _triton_backward, "cpu": _cpu_backward, "reference": reference_backward},
    {name: (lambda grad_out, q, *rest, check=check: check(q, *rest))
     for name, check in _SUPPORTS.items()},
    device_of=_of_grad)
jvp_dispatcher = OpDispatcher(
    "fastgen.attention_jvp",
    {"triton": _triton_jvp, "cpu": _cpu_jvp, "reference": reference_jvp}, _SUPPORTS)
tangent_dispatcher = OpDispatcher(
    "fastgen.attention_tangent",
    {"triton": _triton_tangent, "cpu": _cpu_tangent, "reference": reference_tangent}, _SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int
                 ) -> tuple[Tensor, Tensor]:
    """(O, lse); causal_chunk 0: no mask, c >= 1: block-causal with chunks of c tokens."""
    return forward_dispatcher(q, k, v, scale, causal_chunk)


@torch.library.custom_op("fastgen::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                          lse: Tensor, scale: float, causal_chunk: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) given the forward's O and lse."""
    return backward_dispatcher(grad_out, q, k, v, o, lse, scale, causal_chunk)


@torch.library.custom_op("fastgen::attention_jvp", mutates_args=())
def attention_jvp_op(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                     tv: Tensor | None, scale: float, causal_chunk: int
                     ) -> tuple[Tensor, Tensor]:
    """(O, tO) in one pass; a None tangent is zero."""
    return jvp_dispatcher(q, k, v, tq, tk, tv, scale, causal_chunk)


@torch.library.custom_op("fastgen::attention_tangent", mutates_args=())
def attention_tangent_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor | None,
                         tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, scale: float,
                         causal_chunk: int) -> Tensor:
    """tO given the forward's O and lse (None: O alone, computed elsewhere); a None tangent is
    zero."""
    return tangent_dispatcher(q, k, v, o, lse, tq, tk, tv, scale, causal_chunk)


# The references compute with ops FakeTensor understands: they are also the fake kernels.
attention_op.register_fake(reference_forward)
attention_backward_op.register_fake(reference_backward)
attention_jvp_op.register_fake(reference_jvp)
attention_tangent_op.register_fake(reference_tangent)


# What the autograd.Functions and backward below call: the dispatchers in plain eager mode, the
# custom ops elsewhere (see _eager_op.EagerOp).
_attention = _eager_op.EagerOp(torch.ops.fastgen.attention, forward_dispatcher)
_attention_backward = _eager_op.EagerOp(torch.ops.fastgen.attention_backward, backward_dispatcher)
_attention_tangent = _eager_op.EagerOp(torch.ops.fastgen.attention_tangent, tangent_dispatcher)
_attention_jvp = _eager_op.EagerOp(torch.ops.fastgen.attention_jvp, jvp_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, causal_chunk = inputs
    o, lse = output
    ctx.save_for_backward(*saved_for_backward(q, k, v, o, lse))
    ctx.scale, ctx.causal_chunk = scale, causal_chunk


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True or torch.func.grad: gradients that differentiate again
        inputs = (q, k, v, ctx.scale, ctx.causal_chunk)
        return (*_eager_op.composition_gradients(reference_forward, inputs, needs[:3], (grad_out,))[:3], None, None)
    dq, dk, dv = _attention_backward(grad_out, q, k, v, o, lse, ctx.scale, ctx.causal_chunk)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
attention_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionFunction(_eager_op.Function):
    """The custom op plus its forward-mode rule (custom ops have none), so torch.func.jvp and
    forward-mode AD run the fused tangent kernel. The backward is the op's registered one."""

    @staticmethod
    def forward(q, k, v, scale, causal_chunk):
        return _attention(q, k, v, scale, causal_chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        q, k, v, _, _ = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_forward(q, k, v, o, lse)

    backward = staticmethod(_backward)

    @staticmethod
    @tangent_rule
    def jvp(ctx, tq, tk, tv, _tscale, _tchunk):
        q, k, v, o, lse = ctx.saved_tensors
        to = _attention_tangent(q, k, v, o, lse, tq, tk, tv, ctx.scale, ctx.causal_chunk)
        return to, None


# --------------------------------------------------------------------------- public API


def _check_qkv(op: str, q: object, k: object, v: object) -> None:
    q, k, v = (_checks.tensor(op, name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape (B, Lq, H, Dh), got {tuple(q.shape)}")
    B, _, H, Dh = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (B, H, Dh):
            raise ValueError(f"{op}: {name} must have shape (B, Lk, H, Dh) = ({B}, Lk, {H}, {Dh}) "
                             f"like q, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{op}: v must have k's length Lk = {k.shape[1]}, got {tuple(v.shape)}")


def _check_tangent(op: str, name: str, tangent: object, primal_name: str, primal: Tensor) -> None:
    """A tangent is None (zero) or has its primal's shape, dtype and device."""
    if tangent is None:
        return
    tangent = _checks.tensor(op, name, tangent)
    for what, got, expected in (("shape", tuple(tangent.shape), tuple(primal.shape)),
                                ("dtype", tangent.dtype, primal.dtype),
                                ("device", tangent.device, primal.device)):
        if got != expected:
            raise (TypeError if what == "dtype" else ValueError)(
                f"{op}: {name} must have {primal_name}'s {what} {expected}, got {got}")


def _options(op: str, q: Tensor, scale: object, causal: object, chunk_size: object
             ) -> tuple[float, int]:
    """(scale, causal_chunk) from the public keyword arguments."""
    if scale is None:  # 1 / sqrt(Dh), not checked (a symbolic float while torch.compile traces); Dh = 0: no scores
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif not _checks.real_number(scale) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
    if chunk_size is not None:
        if not causal:
            raise ValueError(f"{op}: chunk_size={chunk_size!r} needs causal=True")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return float(scale), (chunk_size or 1) if causal else 0


def sdpa_runs_it(q: Tensor, k: Tensor, causal_chunk: int) -> bool:
    """Whether :func:`attention` hands this call to PyTorch's SDPA: where SDPA can take it
    (:func:`sdpa_takes`) outside forward-mode AD (SDPA's GPU kernels have no forward-mode rule;
    ours has). There its flash and cuDNN kernels measured 2.7-2.9x faster than our Triton forward
    and 2.7-3.2x faster in the backward at DiT-XL shapes (B = 32, L = 256 and 1024, 16 heads of
    72) on an H200 (bench/results/2026-11-27_NVIDIA_H200_table.txt); the JVP and block-causal
    masks stay ours."""
    return sdpa_takes(q, k, causal_chunk) and torch.autograd.forward_ad._current_level < 0


def sdpa_takes(q: Tensor, k: Tensor, causal_chunk: int) -> bool:
    """Whether SDPA can run this call as the op: CUDA tensors, not compiling (the custom op, as
    before), no functorch transform, the backend chosen automatically, some keys (with none the
    op's output is 0, which the reference gives), and a mask SDPA has (none, or token-causal with
    Lq = Lk: its causal mask is top-left aligned)."""
    return (q.device.type == "cuda" and not torch.compiler.is_compiling() and causal_chunk in (0, 1)
            and k.shape[1] > 0
            and (causal_chunk == 0 or q.shape[1] == k.shape[1])
            and not torch._C._are_functorch_transforms_active()
            and forced_backend()[0] is None)


def _sdpa_with_tangent(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int) -> Tensor:
    """Dual q, k, v (forward-mode AD inside ops.linear.parameters_without_tangents, a backward to
    follow): SDPA's output, differentiated by SDPA's backward, carrying our kernel's tangent of
    that output (no backward history): tO = (P (dS v + tv) - rowsum(P dS) O), with SDPA's O and
    the softmax's normalizer recomputed online (SDPA does not return its log-sum-exp), not O
    itself: one GEMM of the six fewer, and an accumulator fewer (at DiT's head dim 72 the kernel
    that also computes O spills registers on sm_90; this one does not). The pass that gives sCM
    and MeanFlow their JVP and their loss's forward at once pays SDPA's forward and backward plus
    this tangent kernel, not our slower forward and backward kernels."""
    (qp, tq), (kp, tk), (vp, tv) = (forward_ad.unpack_dual(t) for t in (q, k, v))
    out = _SdpaOnDetached.apply(qp, kp, vp, scale, causal_chunk)
    if tq is None and tk is None and tv is None:
        return out
    with torch.no_grad():
        tangent = tangent_dispatcher(qp, kp, vp, out, None, tq, tk, tv, scale, causal_chunk)
    return forward_ad.make_dual(out, tangent)


class _SdpaOnDetached(torch.autograd.Function):
    """:func:`sdpa` differentiated by SDPA's backward through a graph built on detached q, k and
    v: SDPA saving the primal views themselves would keep their dual bases, and so the qkv
    projection's tangent, alive until the dual level closes (ops.linear.saved_for_backward)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal_chunk):
        ctx.leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
        with torch.enable_grad():
            ctx.out = sdpa(*ctx.leaves, scale, causal_chunk)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        wanted = [leaf for leaf in ctx.leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(ctx.out, wanted, grad_out))
        return (*(next(grads) if leaf.requires_grad else None for leaf in ctx.leaves), None, None)


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_chunk: int) -> Tensor:
    """``F.scaled_dot_product_attention`` in this module's (B, L, H, Dh) layout (causal_chunk 0 or
    1, with Lq = Lk when 1); differentiable by PyTorch's own backward. In q's dtype, as the op:
    autocast, which would run SDPA in bf16, is off for it."""
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal_chunk == 1, scale=scale)
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              causal: bool = False, chunk_size: int | None = None) -> Tensor:
    """softmax(q k^T * scale) v per batch and head, without storing the L x L scores.

    q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); returns (B, Lq, H, Dh) in q's dtype. scale defaults
    to 1 / sqrt(Dh). causal=True masks later keys (bottom-right aligned when Lq != Lk, as
    flash-attn); with chunk_size=c it is block-causal: each chunk of c tokens sees itself and
    every earlier chunk. float16/bfloat16/float32 (float64 on the cpu and reference backends).
    Differentiable in q, k and v; torch.func.jvp / forward-mode AD run the fused tangent kernel.
    On CUDA, outside forward-mode AD, it is SDPA where SDPA has the mask (:func:`sdpa_runs_it`).
    """
    _check_qkv("attention", q, k, v)
    scale, causal_chunk = _options("attention", q, scale, causal, chunk_size)
    if sdpa_runs_it(q, k, causal_chunk):
        return sdpa(q, k, v, scale, causal_chunk)
    if (input_tangents_only() and sdpa_takes(q, k, causal_chunk) and _eager_op.records_grad((q, k, v))
            and _eager_op.plain_eager((q, k, v))):
        return _sdpa_with_tangent(q, k, v, scale, causal_chunk)
    if _eager_op.runs_as_composition():
        return reference_forward(q, k, v, scale, causal_chunk)[0]
    if torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a jvp
        return torch.ops.fastgen.attention(q, k, v, scale, causal_chunk)[0]
    if _eager_op.no_autograd((q, k, v)):
        return forward_dispatcher(q, k, v, scale, causal_chunk)[0]
    return _AttentionFunction.apply(q, k, v, scale, causal_chunk)[0]


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                  tv: Tensor | None, *, scale: float | None = None, causal: bool = False,
                  chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(O, tO): :func:`attention` and its directional derivative along the tangents
    (tq, tk, tv) (each shaped like its primal, or None for zero), from one kernel. This is what
    torch.func.jvp computes through :func:`attention`, without running the forward separately.
    The result is not differentiable by backward (sCM and MeanFlow stop its gradient)."""
    _check_qkv("attention_jvp", q, k, v)
    for name, tangent, primal_name, primal in (("tq", tq, "q", q), ("tk", tk, "k", k),
                                               ("tv", tv, "v", v)):
        _check_tangent("attention_jvp", name, tangent, primal_name, primal)
    scale, causal_chunk = _options("attention_jvp", q, scale, causal, chunk_size)
    return torch.ops.fastgen.attention_jvp(q, k, v, tq, tk, tv, scale, causal_chunk)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    q = torch.randn(1, 16, 2, 64, device=device, dtype=dtype)
    return (q, q, q, 0.125, 0)


def example_backward_args(q, k, v, scale, causal_chunk) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    o, lse = reference_forward(q, k, v, scale, causal_chunk)
    return (o, q, k, v, o, lse, scale, causal_chunk)


def example_jvp_args(q, k, v, scale, causal_chunk) -> tuple:
    """Arguments of the exact JVP (jvp_dispatcher) matching ``example_args``: tangents of q, k, v."""
    return (q, k, v, q, k, v, scale, causal_chunk)
