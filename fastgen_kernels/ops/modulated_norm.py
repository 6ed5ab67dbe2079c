r"""Modulated LayerNorm / RMSNorm: the adaLN(-Zero) normalization of DiT blocks, fused.

Shapes: x ``(B, L, D)``; shift, scale ``(B, D)`` (broadcast over the L tokens) or ``(B, L, D)``;
weight, bias ``(D,)`` or None. Rows are the B*L token vectors; statistics are over D, in fp32
(fp64 for fp64 input).

Forward, per row (LayerNorm; RMSNorm drops the mean, mu = 0, and has no bias)::

    mu   = mean(x)                    rstd = 1 / sqrt(mean((x - mu)^2) + eps)
    xhat = (x - mu) * rstd            n    = xhat * w + b
    y    = n * (1 + scale) + shift

VJP with upstream gradient g (sums over rows for the (D,) parameters, over L for (B, D)
modulation)::

    dshift = g                        dscale = g * n
    gn     = g * (1 + scale)          dw = sum(gn * xhat),  db = sum(gn)
    gx     = gn * w
    dx     = rstd * (gx - mean(gx) - xhat * mean(gx * xhat))      (RMS: without mean(gx))

JVP with tangents (tx, tshift, tscale, tw, tb). The normalization's Jacobian
rstd * (I - 1/D - xhat xhat^T / D) is symmetric, so its JVP has the same form as its VJP::

    txhat = rstd * (tx - mean(tx) - xhat * mean(tx * xhat))        (RMS: without mean(tx))
    tn    = txhat * w + xhat * tw + tb
    ty    = tn * (1 + scale) + n * tscale + tshift

Public API: :func:`modulated_layer_norm`, :func:`modulated_rms_norm`. Both run the custom op
``fastgen::modulated_norm`` (backward: ``fastgen::modulated_norm_backward``), which picks a backend
(cuda, triton, cpu, reference) per call; see :mod:`fastgen_kernels.backends`. And
:func:`modulated_layer_norm_linear`, the norm followed by a linear layer (a DiT block's qkv or
fc1) that keeps x and the statistics for the backward, not also y: the linear layer's weight
gradient recomputes y (one pass over x) instead of holding a (B, L, D) activation per layer. In
plain eager mode on the cpu and cuda backends it records its autograd in C++
(``fastgen_C::modulated_norm_linear``, the same kernels without Python between them). A
create_graph=True backward through it differentiates again (autograd of the reference's ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import OpDispatcher, carry_forced_backend, record_forced_backend, under_forced_backend
from fastgen_kernels.ops import _checks, _eager_op
from fastgen_kernels.ops.linear import (autocast_dtype, composed_layer_gradients, input_tangent,
                                        input_tangents_only_outside_transforms, layer_weight, linear,
                                        recomputed_input_backward, saved_for_backward, tangent_rule)

# --------------------------------------------------------------------------- reference


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _per_row(mod: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, D) -> (B, 1, D) so it broadcasts over tokens; (B, L, D) stays."""
    mod = mod.to(dtype)
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


def _normalize(xf: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(xhat, mean, rstd) in xf's dtype; mean is empty for RMSNorm."""
    if rms:
        mean = xf.new_empty((0,))
        rstd = torch.rsqrt(xf.square().mean(-1) + eps)
        return xf * rstd.unsqueeze(-1), mean, rstd
    mean = xf.mean(-1)
    centered = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    return centered * rstd.unsqueeze(-1), mean, rstd


def _xhat(xf: Tensor, mean: Tensor, rstd: Tensor, rms: bool) -> Tensor:
    centered = xf if rms else xf - mean.unsqueeze(-1)
    return centered * rstd.unsqueeze(-1)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    n = xhat if weight is None else xhat * weight.to(xhat.dtype)
    return n if bias is None else n + bias.to(xhat.dtype)


def _reduce_like(full: Tensor, like: Tensor) -> Tensor:
    """Sum a (B, L, D) gradient over L when the input it belongs to was (B, D)."""
    return full.sum(1) if like.dim() == 2 else full


def reference_forward(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, rms: bool, out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch in fp32 (fp64 for fp64 input). Returns (y, mean, rstd): y in out_dtype (x's
    by default); mean and rstd (B, L) in the compute dtype, mean empty for RMSNorm."""
    ct = _compute_dtype(x)
    xhat, mean, rstd = _normalize(x.to(ct), eps, rms)
    y = _affine(xhat, weight, bias) * (1 + _per_row(scale, ct)) + _per_row(shift, ct)
    return y.to(out_dtype or x.dtype).contiguous(), mean, rstd


def reference_backward(
    grad_out: Tensor, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
    bias: Tensor | None, mean: Tensor, rstd: Tensor, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale, dweight, dbias); dweight/dbias are empty when weight/bias are None."""
    ct = _compute_dtype(x)
    g = grad_out.to(ct)
    xhat = _xhat(x.to(ct), mean, rstd, rms)
    gn = g * (1 + _per_row(scale, ct))
    gx = gn if weight is None else gn * weight.to(ct)
    proj = (gx * xhat).mean(-1, keepdim=True)
    centered_gx = gx if rms else gx - gx.mean(-1, keepdim=True)
    dx = rstd.unsqueeze(-1) * (centered_gx - xhat * proj)
    dshift = _reduce_like(g, shift)
    dscale = _reduce_like(g * _affine(xhat, weight, bias), scale)
    # absent parameters get distinct empty tensors: op outputs may not alias each other
    dweight = x.new_empty(0) if weight is None else (gn * xhat).sum((0, 1)).to(weight.dtype)
    dbias = x.new_empty(0) if bias is None else gn.sum((0, 1)).to(bias.dtype)
    contiguous = torch.contiguous_format
    return (dx.to(x.dtype).contiguous(),
            # a per-token dshift is grad_out itself: copy, outputs may not alias inputs
            dshift.to(shift.dtype, memory_format=contiguous, copy=True),
            dscale.to(scale.dtype).contiguous(), dweight, dbias)


def reference_jvp(
    x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    rstd: Tensor, rms: bool, tx: Tensor | None, tshift: Tensor | None, tscale: Tensor | None,
    tweight: Tensor | None, tbias: Tensor | None,
) -> Tensor:
    """Tangent of y given tangents of the inputs (None = zero), in the compute dtype."""
    ct = _compute_dtype(x)
    xhat = _xhat(x.to(ct), mean, rstd, rms)
    tn = torch.zeros_like(xhat)
    if tx is not None:
        txf = tx.to(ct)
        proj = (txf * xhat).mean(-1, keepdim=True)
        centered = txf if rms else txf - txf.mean(-1, keepdim=True)
        txhat = rstd.unsqueeze(-1) * (centered - xhat * proj)
        tn = tn + (txhat if weight is None else txhat * weight.to(ct))
    if tweight is not None:
        tn = tn + xhat * tweight.to(ct)
    if tbias is not None:
        tn = tn + tbias.to(ct)
    ty = tn * (1 + _per_row(scale, ct))
    if tscale is not None:
        ty = ty + _affine(xhat, weight, bias) * _per_row(tscale, ct)
    if tshift is not None:
        ty = ty + _per_row(tshift, ct)
    return ty


# --------------------------------------------------------------------------- backends


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _extension_forward(x, shift, scale, weight, bias, eps, rms, out_dtype=None):
    return tuple(torch.ops.fastgen_C.modulated_norm_forward(
        *_contiguous(x, shift, scale, weight, bias), eps, rms, out_dtype))


def _extension_backward(grad_out, x, shift, scale, weight, bias, mean, rstd, rms):
    return tuple(torch.ops.fastgen_C.modulated_norm_backward(
        *_contiguous(grad_out, x, shift, scale, weight, bias), mean, rstd, rms))


def _extension_jvp(x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, tweight, tbias, out_dtype=None):
    # tangents take their primal's dtype (forward-mode AD gives them that; a direct call may not)
    tangents = [None if t is None else t.to(x.dtype) for t in (tx, tshift, tscale, tweight, tbias)]
    x, scale, weight, bias, *tangents = _contiguous(x, scale, weight, bias, *tangents)
    return torch.ops.fastgen_C.modulated_norm_jvp(x, scale, weight, bias, mean, rstd, rms, *tangents, out_dtype)


def _triton_forward(*args):
    from fastgen_kernels.triton_ops import modulated_norm

    return modulated_norm.forward(*args)


def _triton_backward(*args):
    from fastgen_kernels.triton_ops import modulated_norm

    return modulated_norm.backward(*args)


def _triton_jvp(*args):
    from fastgen_kernels.triton_ops import modulated_norm

    return modulated_norm.jvp(*args)


def _reference_jvp(x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, tweight, tbias,
                   out_dtype=None) -> Tensor:
    return reference_jvp(x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, tweight,
                         tbias).to(out_dtype or x.dtype)


_SUPPORTS = {
    "cuda": _checks.gpu_kernel_support,
    "triton": _checks.gpu_kernel_support,
    "cpu": _checks.nonempty,
}

forward_dispatcher = OpDispatcher(
    "fastgen.modulated_norm",
    {"cuda": _extension_forward, "triton": _triton_forward, "cpu": _extension_forward,
     "reference": reference_forward},
    _SUPPORTS,
)
backward_dispatcher = OpDispatcher(
    "fastgen.modulated_norm_backward",
    {"cuda": _extension_backward, "triton": _triton_backward, "cpu": _extension_backward,
     "reference": reference_backward},
    _SUPPORTS,
    device_of=lambda grad_out, *args: grad_out.device,
)
# The forward-mode rule's tangent (x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale,
# tweight, tbias[, out_dtype]) -> ty in out_dtype (x's by default): one pass over each row (CUDA or
# Triton on a GPU, C++ on the CPU) instead of the formula's dozen PyTorch ops.
jvp_dispatcher = OpDispatcher(
    "fastgen.modulated_norm_jvp",
    {"cuda": _extension_jvp, "triton": _triton_jvp, "cpu": _extension_jvp, "reference": _reference_jvp}, _SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::modulated_norm", mutates_args=())
def modulated_norm(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) = modulated LayerNorm (rms=False) or RMSNorm (rms=True) of x."""
    return forward_dispatcher(x, shift, scale, weight, bias, eps, rms)


@torch.library.custom_op("fastgen::modulated_norm_backward", mutates_args=())
def modulated_norm_backward(
    grad_out: Tensor, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
    bias: Tensor | None, mean: Tensor, rstd: Tensor, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale, dweight, dbias); dweight/dbias empty when weight/bias are None."""
    return backward_dispatcher(grad_out, x, shift, scale, weight, bias, mean, rstd, rms)


# The reference computes with ops that FakeTensor understands, so it is also the fake kernel:
# outputs have exactly the metadata every backend produces.
modulated_norm.register_fake(reference_forward)
modulated_norm_backward.register_fake(reference_backward)


# What the autograd.Functions and backward below call: the dispatchers in plain eager mode, the
# custom ops elsewhere (see _eager_op.EagerOp).
_modulated_norm = _eager_op.EagerOp(torch.ops.fastgen.modulated_norm, forward_dispatcher)
_modulated_norm_backward = _eager_op.EagerOp(torch.ops.fastgen.modulated_norm_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    x, shift, scale, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(*saved_for_backward(x, shift, scale, weight, bias, mean, rstd))
    ctx.eps, ctx.rms = eps, rms


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True or torch.func.grad: gradients that differentiate again
        inputs = (x, shift, scale, weight, bias, ctx.eps, ctx.rms)
        return (*_eager_op.composition_gradients(reference_forward, inputs, needs[:5], (grad_out,))[:5], None, None)
    dx, dshift, dscale, dweight, dbias = _modulated_norm_backward(
        grad_out, x, shift, scale, weight, bias, mean, rstd, ctx.rms)
    return (dx if needs[0] else None, dshift if needs[1] else None, dscale if needs[2] else None,
            dweight if weight is not None and needs[3] else None,
            dbias if bias is not None and needs[4] else None, None, None)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
modulated_norm.register_autograd(_backward, setup_context=_setup_context)


class _ModulatedNormFunction(_eager_op.Function):
    """The custom op plus a forward-mode rule, so torch.func.jvp works (custom ops have no jvp).
    Its backward is the op's own registered backward."""

    @staticmethod
    def forward(x, shift, scale, weight, bias, eps, rms):
        return _modulated_norm(x, shift, scale, weight, bias, eps, rms)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        x, shift, scale, weight, bias, _, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_forward(x, scale, weight, bias, mean, rstd)

    backward = staticmethod(_backward)

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx, tshift, tscale, tweight, tbias, _teps, _trms):
        x, scale, weight, bias, mean, rstd = ctx.saved_tensors
        return _tangent(x, scale, weight, bias, mean, rstd, ctx.rms, tx, tshift, tscale, tweight, tbias), None, None


def _tangent(*args) -> Tensor:
    """The norm's tangent (jvp_dispatcher's arguments): the kernels take plain tensors that
    backward-mode autograd does not record (they have no derivative); under functorch transforms,
    or where a backward may go through the tangent, the formula runs."""
    kernel = _eager_op.plain_eager(args) and not _eager_op.records_grad(args)
    return jvp_dispatcher(*args) if kernel else _reference_jvp(*args)


# --------------------------------------------------------------------------- public API


def _check(op: str, x, shift, scale, weight, bias, eps) -> float:
    """Checks the arguments; returns eps as a Python float."""
    x = _checks.activation(op, x)
    _checks.modulation(op, "shift", shift, x)
    _checks.modulation(op, "scale", scale, x)
    _checks.per_channel(op, "weight", weight, x)
    _checks.per_channel(op, "bias", bias, x)
    return _checks.positive(op, "eps", eps)


def _apply(x, shift, scale, weight, bias, eps, rms) -> Tensor:
    if _eager_op.runs_as_composition():
        return reference_forward(x, shift, scale, weight, bias, eps, rms)[0]
    if torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a jvp
        return torch.ops.fastgen.modulated_norm(x, shift, scale, weight, bias, eps, rms)[0]
    if _eager_op.no_autograd((x, shift, scale, weight, bias)):
        return forward_dispatcher(x, shift, scale, weight, bias, eps, rms)[0]
    return _ModulatedNormFunction.apply(x, shift, scale, weight, bias, eps, rms)[0]


def modulated_layer_norm(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-6,
) -> Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` over the last dim, in one pass over x.

    x: (B, L, D); shift, scale: (B, D) broadcast over L, or (B, L, D); weight, bias: (D,) or None
    (LayerNorm's affine, applied before the modulation). float16/bfloat16/float32 (float64 on the
    cpu and reference backends), fp32 statistics, output in x's dtype. Differentiable in every
    tensor argument, forward mode (torch.func.jvp) included.
    """
    eps = _check("modulated_layer_norm", x, shift, scale, weight, bias, eps)
    return _apply(x, shift, scale, weight, bias, eps, False)


def modulated_rms_norm(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None, eps: float = 1e-6,
) -> Tensor:
    """``RMSNorm(x) * (1 + scale) + shift`` over the last dim; as :func:`modulated_layer_norm`
    with RMSNorm (x / sqrt(mean(x^2) + eps), times weight) in place of LayerNorm."""
    eps = _check("modulated_rms_norm", x, shift, scale, weight, None, eps)
    return _apply(x, shift, scale, weight, None, eps, True)


def norm_output_dtype(x: Tensor) -> torch.dtype:
    """The dtype in which a norm of x writes its output for a linear layer: the one the layer
    computes in (autocast's for x's device where it is on) when the kernels can write it (x's
    dtype, or float16/bfloat16 for float32 x), so that no cast follows; else x's (the layer casts)."""
    dtype = autocast_dtype(x.device)
    if dtype is not None and _checks.kernel_dtype_pair(x.dtype, dtype):
        return dtype
    return x.dtype


class _ModulatedNormLinearFunction(torch.autograd.Function):
    """F.linear(modulated_norm(x, ...), weight, bias), saving x, the modulation, the statistics and
    the weight. The norm writes its output, and its tangent, in the dtype the linear layer runs in
    (autocast's: :func:`norm_output_dtype`; grad_out's in the backward); in the one pass the caller
    passes the layer's weight cast to it (``ops.linear.layer_weight``), for the backward too. Its
    forward-mode rule,
    where the parameters carry no tangents (fastgen_kernels.ops.linear): F.linear(the norm's
    tangent, weight), one GEMM."""

    @staticmethod
    def forward(ctx, x, shift, scale, norm_weight, norm_bias, eps, rms, weight, bias):
        ctx.y_dtype = norm_output_dtype(x)
        y, mean, rstd = forward_dispatcher(x, shift, scale, norm_weight, norm_bias, eps, rms, ctx.y_dtype)
        ctx.set_materialize_grads(False)  # no zero tangents of the parameters
        ctx.save_for_backward(*saved_for_backward(x, shift, scale, norm_weight, norm_bias, mean, rstd, weight))
        ctx.save_for_forward(x, scale, norm_weight, norm_bias, mean, rstd, weight)
        ctx.eps, ctx.rms, ctx.bias_dtype = eps, rms, None if bias is None else bias.dtype
        record_forced_backend(ctx)
        out = F.linear(y, weight, bias)
        ctx.output_like = (out.shape, out.dtype, out.device)
        return out

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx, tshift, tscale, tnorm_weight, tnorm_bias, _teps, _trms, _tweight, _tbias):
        x, scale, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        if tx is None and tshift is None and tscale is None and tnorm_weight is None and tnorm_bias is None:
            return input_tangent(None, weight, ctx.output_like)
        ty = _tangent(x, scale, norm_weight, norm_bias, mean, rstd, ctx.rms, tx, tshift, tscale, tnorm_weight,
                      tnorm_bias, ctx.y_dtype)
        return input_tangent(ty, weight, ctx.output_like)

    @staticmethod
    @under_forced_backend
    def backward(ctx, grad_out):
        if grad_out is None:  # no gradient reached the output (gradients are not materialized)
            return (None,) * 9
        x, shift, scale, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        norm_inputs = (x, shift, scale, norm_weight, norm_bias)
        if torch.is_grad_enabled():  # create_graph=True: gradients that differentiate again
            grads = composed_layer_gradients(grad_out, lambda *t: reference_forward(*t, ctx.eps, ctx.rms)[0],
                                             norm_inputs, weight, ctx.bias_dtype, (*needs[:5], *needs[7:9]))
            return (*grads[:5], None, None, *grads[5:])
        dy, dweight, dbias = recomputed_input_backward(
            grad_out, weight, ctx.bias_dtype, (any(needs[:5]), needs[7], needs[8]),
            lambda: forward_dispatcher(*norm_inputs, ctx.eps, ctx.rms, ctx.y_dtype)[0])
        norm_grads = (None,) * 5
        if dy is not None:  # read as it comes (autocast's bf16) where the kernels can
            dy = dy if _checks.kernel_dtype_pair(x.dtype, dy.dtype) else dy.to(x.dtype)
            grads = _modulated_norm_backward(dy, *norm_inputs, mean, rstd, ctx.rms)
            norm_grads = tuple(g if need and t is not None else None for g, need, t in zip(grads, needs, norm_inputs))
        return (*norm_grads, None, None, dweight, dbias)


# The extension's fastgen_C::modulated_norm_linear: the Function above in C++, without Python
# between the forward's kernels and the backward's (csrc/torch_bindings.cpp).
_native_norm_linear = _extension.native_op("modulated_norm_linear")


def modulated_layer_norm_linear(
    x: Tensor, shift: Tensor, scale: Tensor, linear_weight: Tensor, linear_bias: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6,
) -> Tensor:
    """``F.linear(modulated_layer_norm(x, shift, scale, weight, bias, eps), linear_weight,
    linear_bias)``, holding x (and the statistics) but not the norm's output for the backward
    (see the module doc).

    Arguments as :func:`modulated_layer_norm`, plus the linear layer's (N, D) weight and (N,)
    bias; autocast applies to the linear layer as usual. Differentiable in every tensor. Under
    forward-mode AD inside ``ops.linear.parameters_without_tangents`` its tangent is the norm's
    through the layer's weight (one GEMM); under other forward-mode AD, torch.compile or other
    transforms it is the plain composition.
    """
    op = "modulated_layer_norm_linear"
    eps = _check(op, x, shift, scale, weight, bias, eps)
    _checks.linear_layer(op, ("linear_weight", "linear_bias"), linear_weight, linear_bias, x)
    norm_args = (x, shift, scale, weight, bias, eps, False)
    if input_tangents_only_outside_transforms():  # forward-mode AD along the inputs: the one-GEMM rule
        return _ModulatedNormLinearFunction.apply(*norm_args, layer_weight(linear_weight), linear_bias)
    tensors = (x, shift, scale, weight, bias, linear_weight, linear_bias)
    if _eager_op.backward_will_follow(tensors):
        layer = (linear_weight, linear_bias)
        if _native_norm_linear is not None and forward_dispatcher.select(*norm_args) in ("cpu", "cuda"):
            return _native_norm_linear(*norm_args, *layer, norm_output_dtype(x))  # the same kernels, autograd in C++
        return _ModulatedNormLinearFunction.apply(*norm_args, *layer)
    if _eager_op.no_autograd(tensors):  # inference: the norm writes the layer's dtype
        return F.linear(forward_dispatcher(*norm_args, norm_output_dtype(x))[0], linear_weight, linear_bias)
    return linear(_apply(x, shift, scale, weight, bias, eps, False), linear_weight, linear_bias)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 64, device=device, dtype=dtype)
    mod = torch.randn(2, 64, device=device, dtype=dtype)
    return (x, mod, mod, None, None, 1e-6, False)


def example_backward_args(x, shift, scale, weight, bias, eps, rms) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, mean, rstd = reference_forward(x, shift, scale, weight, bias, eps, rms)
    return (x, x, shift, scale, weight, bias, mean, rstd, rms)


def example_jvp_args(x, shift, scale, weight, bias, eps, rms) -> tuple:
    """Arguments of the forward-mode rule's tangent (jvp_dispatcher) matching ``example_args``:
    the tangents of x, shift and scale."""
    _, mean, rstd = reference_forward(x, shift, scale, weight, bias, eps, rms)
    return (x, scale, weight, bias, mean, rstd, rms, x, shift, scale, None, None)
