r"""QK-norm + rotary embedding: per-head RMSNorm of q and k, then RoPE, fused (SD3, Flux, Wan).

Shapes: q ``(B, Lq, H, Dh)``, k ``(B, Lk, H, Dh)`` (the flash-attn / diffusers layout); weights
``(Dh,)`` or None; cos, sin ``(L, Dh)`` with L = Lq = Lk, broadcast over batch and heads, or both
None (norms only). Rows are the B*L*H head vectors; each of q and k is processed the same way with
its own weight. Statistics and arithmetic in fp32 (fp64 for fp64 input), cos/sin read as fp32.

The rotation ``rot`` pairs up the Dh entries and turns each pair (a, b) into (-b, a):

- interleaved (Flux, diffusers ``use_real_unbind_dim=-1``): pairs (2i, 2i+1),
  ``rot(v)[2i] = -v[2i+1]``, ``rot(v)[2i+1] = v[2i]``;
- not interleaved (GPT-NeoX ``rotate_half``): pairs (i, i + Dh/2),
  ``rot(v) = cat(-v[Dh/2:], v[:Dh/2])``.

Either way rot is a linear map with rot^T = -rot (antisymmetric) and rot(rot(v)) = -v.

Forward, per row x with weight w::

    rstd = 1 / sqrt(mean(x^2) + eps)      xhat = x * rstd      n = xhat * w
    y    = n * cos + rot(n) * sin                 (no rotary: y = n)

VJP with upstream gradient g (dw is a sum over all rows; cos, sin are constants)::

    dn = g * cos + rot^T(g * sin) = g * cos - rot(g * sin)
    dw = sum_rows(dn * xhat)
    dx = rstd * (dn * w - xhat * mean(dn * w * xhat))

JVP with tangents (tx, tw). The RMSNorm Jacobian rstd * (I - xhat xhat^T / Dh) is symmetric, so
its JVP has the form of its VJP::

    txhat = rstd * (tx - xhat * mean(tx * xhat))
    tn    = txhat * w + xhat * tw
    ty    = tn * cos + rot(tn) * sin

Public API: :func:`qk_norm_rope`, running the custom op ``fastgen::qk_norm_rope`` (outputs q_out,
k_out and the per-row rstd of each, saved for ``fastgen::qk_norm_rope_backward``) on the backend
chosen per call; see :mod:`fastgen_kernels.backends`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels.backends import OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _checks, _eager_op
from fastgen_kernels.ops.linear import saved_for_backward, tangent_rule

# Widest head the CUDA and Triton kernels take (a head vector lives in one warp's registers:
# at most 8 elements per lane; csrc/cuda/launch.h kMaxHeadDim).
MAX_KERNEL_HEAD_DIM = 256

# --------------------------------------------------------------------------- reference


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def rotate(v: Tensor, interleaved: bool) -> Tensor:
    """rot(v) over the last dim: each pair (a, b) -> (-b, a)."""
    if interleaved:
        a, b = v.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((-b, a), -1).flatten(-2)
    a, b = v.chunk(2, -1)
    return torch.cat((-b, a), -1)


def _rope_table(table: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, Dh) -> (L, 1, Dh): broadcasts over batch and heads of a (B, L, H, Dh) tensor."""
    return table.to(dtype).unsqueeze(1)


def _rope(n: Tensor, cos: Tensor | None, sin: Tensor | None, interleaved: bool) -> Tensor:
    if cos is None:
        return n
    return n * _rope_table(cos, n.dtype) + rotate(n, interleaved) * _rope_table(sin, n.dtype)


def _weighted(v: Tensor, weight: Tensor | None) -> Tensor:
    return v if weight is None else v * weight.to(v.dtype)


def _forward_one(x, weight, cos, sin, eps, interleaved) -> tuple[Tensor, Tensor]:
    xf = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    n = _weighted(xf * rstd.unsqueeze(-1), weight)
    return _rope(n, cos, sin, interleaved).to(x.dtype).contiguous(), rstd


def _backward_one(grad, x, weight, cos, sin, rstd, interleaved) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(x)
    g = grad.to(ct)
    xhat = x.to(ct) * rstd.unsqueeze(-1)
    dn = g
    if cos is not None:
        dn = g * _rope_table(cos, ct) - rotate(g * _rope_table(sin, ct), interleaved)
    gx = _weighted(dn, weight)
    dx = rstd.unsqueeze(-1) * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))
    # an absent weight gets a distinct empty tensor: op outputs may not alias each other
    dweight = x.new_empty(0) if weight is None else (dn * xhat).sum((0, 1, 2)).to(weight.dtype)
    return dx.to(x.dtype).contiguous(), dweight


def _jvp_one(x, weight, cos, sin, rstd, interleaved, tx, tweight) -> Tensor:
    """Tangent of one output given the tangents of x and weight (None = zero), in x's dtype."""
    ct = _compute_dtype(x)
    xhat = x.to(ct) * rstd.unsqueeze(-1)
    tn = torch.zeros_like(xhat)
    if tx is not None:
        txf = tx.to(ct)
        txhat = rstd.unsqueeze(-1) * (txf - xhat * (txf * xhat).mean(-1, keepdim=True))
        tn = tn + _weighted(txhat, weight)
    if tweight is not None:
        tn = tn + xhat * tweight.to(ct)
    return _rope(tn, cos, sin, interleaved).to(x.dtype)


def _forward_pair(forward_one, q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    """The forward op from an implementation for one of q, k: (out, rstd) of each."""
    q_out, q_rstd = forward_one(q, q_weight, cos, sin, eps, interleaved)
    k_out, k_rstd = forward_one(k, k_weight, cos, sin, eps, interleaved)
    return q_out, k_out, q_rstd, k_rstd


def _backward_pair(backward_one, grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd,
                   k_rstd, interleaved):
    """The backward op from an implementation for one of q, k: (dx, dweight) of each."""
    dq, dq_weight = backward_one(grad_q, q, q_weight, cos, sin, q_rstd, interleaved)
    dk, dk_weight = backward_one(grad_k, k, k_weight, cos, sin, k_rstd, interleaved)
    return dq, dk, dq_weight, dk_weight


def reference_forward(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor | None,
    sin: Tensor | None, eps: float, interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain PyTorch in fp32 (fp64 for fp64 input). Returns (q_out, k_out, q_rstd, k_rstd);
    the rstds are (B, L, H) in the compute dtype."""
    return _forward_pair(_forward_one, q, k, q_weight, k_weight, cos, sin, eps, interleaved)


def reference_backward(
    grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None,
    k_weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, q_rstd: Tensor,
    k_rstd: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dq_weight, dk_weight); a weight's gradient is empty when the weight is None."""
    return _backward_pair(_backward_one, grad_q, grad_k, q, k, q_weight, k_weight, cos, sin,
                          q_rstd, k_rstd, interleaved)


# --------------------------------------------------------------------------- backends


def _rows(x: Tensor) -> Tensor:
    """x itself when its head vectors are contiguous (e.g. q sliced from a fused (B, L, 3, H, Dh)
    qkv tensor: the kernels take the B, L, H strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _extension_forward(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    return tuple(torch.ops.fastgen_C.qk_norm_rope_forward(
        _rows(q), _rows(k), *_contiguous(q_weight, k_weight), cos, sin, eps, interleaved))


def _extension_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd,
                        interleaved):
    return tuple(torch.ops.fastgen_C.qk_norm_rope_backward(
        *_contiguous(grad_q, grad_k), _rows(q), _rows(k), *_contiguous(q_weight, k_weight), cos,
        sin, *_contiguous(q_rstd, k_rstd), interleaved))


def _triton_forward(*args):
    from fastgen_kernels.triton_ops import qk_norm_rope

    return _forward_pair(qk_norm_rope.forward_one, *args)


def _triton_backward(*args):
    from fastgen_kernels.triton_ops import qk_norm_rope

    return _backward_pair(qk_norm_rope.backward_one, *args)


def _jvp_pair(jvp_one, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved, tq, tk, tq_weight,
              tk_weight) -> tuple[Tensor, Tensor]:
    """The forward-mode rule's tangents (tq_out, tk_out) from an implementation for one of q, k."""
    return (jvp_one(q, q_weight, cos, sin, q_rstd, interleaved, tq, tq_weight),
            jvp_one(k, k_weight, cos, sin, k_rstd, interleaved, tk, tk_weight))


def reference_jvp(*args) -> tuple[Tensor, Tensor]:
    """(tq_out, tk_out) given (q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved, tq,
    tk, tq_weight, tk_weight), tangents None for zero; in q's dtype."""
    return _jvp_pair(_jvp_one, *args)


def _extension_jvp(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved, tq, tk, tq_weight,
                   tk_weight):
    # tangents take their primal's dtype (forward-mode AD gives them that; a direct call may not)
    tq, tk, tq_weight, tk_weight = (None if t is None else t.to(q.dtype) for t in (tq, tk, tq_weight, tk_weight))
    return tuple(torch.ops.fastgen_C.qk_norm_rope_jvp(
        _rows(q), _rows(k), *_contiguous(q_weight, k_weight), cos, sin, *_contiguous(q_rstd, k_rstd), interleaved,
        None if tq is None else _rows(tq), None if tk is None else _rows(tk), *_contiguous(tq_weight, tk_weight)))


def _triton_jvp(*args):
    from fastgen_kernels.triton_ops import qk_norm_rope

    return _jvp_pair(qk_norm_rope.jvp_one, *args)


def _nonempty(q: Tensor, k: Tensor, *args: object) -> str | None:
    return _checks.nonempty(q) or _checks.nonempty(k)


def _gpu_support(q: Tensor, k: Tensor, *args: object) -> str | None:
    """Why the CUDA / Triton kernels cannot take q and k, or None."""
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        return (f"head dim Dh = {q.shape[-1]} exceeds the GPU kernels' limit of "
                f"{MAX_KERNEL_HEAD_DIM}")
    return _checks.gpu_kernel_support(q) or _nonempty(q, k)


def _skip_grads(fn):
    """A support check of the backward: the same as the forward's, on (q, k) after the grads."""
    return lambda grad_q, grad_k, *args: fn(*args)


forward_dispatcher = OpDispatcher(
    "fastgen.qk_norm_rope",
    {"cuda": _extension_forward, "triton": _triton_forward, "cpu": _extension_forward,
     "reference": reference_forward},
    {"cuda": _gpu_support, "triton": _gpu_support, "cpu": _nonempty},
)
backward_dispatcher = OpDispatcher(
    "fastgen.qk_norm_rope_backward",
    {"cuda": _extension_backward, "triton": _triton_backward, "cpu": _extension_backward,
     "reference": reference_backward},
    {"cuda": _skip_grads(_gpu_support), "triton": _skip_grads(_gpu_support),
     "cpu": _skip_grads(_nonempty)},
    device_of=lambda grad_q, *args: grad_q.device,
)

# The forward-mode rule's tangents: one pass over each head vector (CUDA or Triton on a GPU, C++ on
# the CPU) instead of the formula's dozen PyTorch ops.
jvp_dispatcher = OpDispatcher(
    "fastgen.qk_norm_rope_jvp",
    {"cuda": _extension_jvp, "triton": _triton_jvp, "cpu": _extension_jvp, "reference": reference_jvp},
    {"cuda": _gpu_support, "triton": _gpu_support, "cpu": _nonempty},
)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos: Tensor | None,
    sin: Tensor | None, eps: float, interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_out, k_out, q_rstd, k_rstd): RMSNorm of each head of q and k, then rotary."""
    return forward_dispatcher(q, k, q_weight, k_weight, cos, sin, eps, interleaved)


@torch.library.custom_op("fastgen::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(
    grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None,
    k_weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, q_rstd: Tensor,
    k_rstd: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dq_weight, dk_weight); a weight's gradient is empty when the weight is None."""
    return backward_dispatcher(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd,
                               k_rstd, interleaved)


# The reference computes with ops that FakeTensor understands, so it is also the fake kernel.
qk_norm_rope_op.register_fake(reference_forward)
qk_norm_rope_backward.register_fake(reference_backward)


# What the autograd.Functions and backward below call: the dispatchers in plain eager mode, the
# custom ops elsewhere (see _eager_op.EagerOp).
_qk_norm_rope = _eager_op.EagerOp(torch.ops.fastgen.qk_norm_rope, forward_dispatcher)
_qk_norm_rope_backward = _eager_op.EagerOp(torch.ops.fastgen.qk_norm_rope_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, eps, interleaved = inputs
    _, _, q_rstd, k_rstd = output
    ctx.save_for_backward(*saved_for_backward(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd))
    ctx.eps, ctx.interleaved = eps, interleaved


def _backward(ctx, grad_q, grad_k, _grad_q_rstd, _grad_k_rstd):
    q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True or torch.func.grad: gradients that differentiate again
        inputs = (q, k, q_weight, k_weight, cos, sin, ctx.eps, ctx.interleaved)
        return (*_eager_op.composition_gradients(reference_forward, inputs, needs[:4], (grad_q, grad_k))[:4],
                None, None, None, None)
    dq, dk, dq_weight, dk_weight = _qk_norm_rope_backward(
        grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, ctx.interleaved)
    return (dq if needs[0] else None, dk if needs[1] else None,
            dq_weight if q_weight is not None and needs[2] else None,
            dk_weight if k_weight is not None and needs[3] else None, None, None, None, None)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


class _QkNormRopeFunction(_eager_op.Function):
    """The custom op plus a forward-mode rule, so torch.func.jvp works (custom ops have no jvp).
    Its backward is the op's own registered backward."""

    @staticmethod
    def forward(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
        return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        q, k, q_weight, k_weight, cos, sin, _, _ = inputs
        _, _, q_rstd, k_rstd = output
        ctx.mark_non_differentiable(q_rstd, k_rstd)
        ctx.save_for_forward(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd)

    backward = staticmethod(_backward)

    @staticmethod
    @tangent_rule
    def jvp(ctx, tq, tk, tq_weight, tk_weight, _tcos, _tsin, _teps, _tinterleaved):
        # cos and sin are constants (torch.func.jvp hands them zero tangents)
        q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd = ctx.saved_tensors
        args = (q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, ctx.interleaved, tq, tk, tq_weight, tk_weight)
        # the kernels take plain tensors that backward-mode autograd does not record (they have no
        # derivative); under functorch transforms, or where a backward may go through the
        # tangents, the formula runs
        kernel = _eager_op.plain_eager(args) and not _eager_op.records_grad(args)
        tq_out, tk_out = jvp_dispatcher(*args) if kernel else reference_jvp(*args)
        return tq_out, tk_out, None, None


# --------------------------------------------------------------------------- public API

_OP = "qk_norm_rope"


def _check(q, k, q_weight, k_weight, cos, sin, eps, interleaved) -> float:
    """Checks the arguments; returns eps as a Python float."""
    q = _checks.heads(_OP, "q", q)
    k = _checks.heads(_OP, "k", k)
    B, Lq, H, Dh = q.shape
    _checks.like(_OP, "k", k, "q", q, [(B, k.shape[1], H, Dh)])
    _checks.like(_OP, "q_weight", q_weight, "q", q, [(Dh,)], optional=True)
    _checks.like(_OP, "k_weight", k_weight, "q", q, [(Dh,)], optional=True)
    _checks.rotary_tables(_OP, cos, sin, q, k)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{_OP}: interleaved must be a bool, got {type(interleaved).__name__}")
    return _checks.positive(_OP, "eps", eps)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
    cos: Tensor | None = None, sin: Tensor | None = None, eps: float = 1e-6, *,
    interleaved: bool = True,
) -> tuple[Tensor, Tensor]:
    """RMSNorm of every head vector of q and of k, then rotary position embedding, in one pass.

    q: (B, Lq, H, Dh), k: (B, Lk, H, Dh), one dtype and device (float16/bfloat16/float32, float64
    on the cpu and reference backends); the head vectors may be strided, e.g. q = qkv[:, :, 0] of
    a fused (B, L, 3, H, Dh) projection. q_weight, k_weight: (Dh,) RMSNorm weights or None.
    cos, sin: (L, Dh) tables with L = Lq = Lk, broadcast over batch and heads (any float dtype,
    read as fp32; constants, never differentiated), or both None for the norms alone.
    ``interleaved`` picks the rotary pairs: (2i, 2i+1) as in Flux (True) or (i, i + Dh/2) as
    GPT-NeoX's rotate_half (False). Returns (q_out, k_out) in q's dtype, contiguous.
    Differentiable in q, k and the weights, forward mode (torch.func.jvp) included.
    """
    eps = _check(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    if _eager_op.runs_as_composition():  # the rotary tables stay constants there too
        out = reference_forward(q, k, q_weight, k_weight, *(None if t is None else t.detach() for t in (cos, sin)),
                                eps, interleaved)
    elif torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a jvp
        out = torch.ops.fastgen.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    elif _eager_op.no_autograd((q, k, q_weight, k_weight)):
        out = forward_dispatcher(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    else:
        out = _QkNormRopeFunction.apply(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    return out[0], out[1]


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    q = torch.randn(2, 3, 2, 64, device=device, dtype=dtype)
    angles = torch.randn(3, 64, device=device)
    return (q, q, None, None, angles.cos(), angles.sin(), 1e-6, True)


def example_backward_args(q, k, q_weight, k_weight, cos, sin, eps, interleaved) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, _, q_rstd, k_rstd = reference_forward(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    return (q, k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved)


def example_jvp_args(q, k, q_weight, k_weight, cos, sin, eps, interleaved) -> tuple:
    """Arguments of the forward-mode rule's tangents (jvp_dispatcher) matching ``example_args``:
    the tangents of q and k."""
    _, _, q_rstd, k_rstd = reference_forward(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    return (q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved, q, k, None, None)
