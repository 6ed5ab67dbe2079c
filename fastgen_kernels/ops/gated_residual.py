r"""Gated residual: the adaLN-Zero ``x + gate * y`` of DiT blocks, fused.

Shapes: x, y ``(B, L, D)``; gate ``(B, D)`` (broadcast over the L tokens) or ``(B, L, D)``.
Computed in fp32, rounded once to x's dtype.

Forward::   out = x + gate * y
VJP (upstream g; the gate's gradient is summed over L for a (B, D) gate)::

    dx = g        dy = g * gate        dgate = g * y

JVP with tangents (tx, ty, tgate)::   tout = tx + gate * ty + tgate * y
which is one more call of the op with its optional second term: op(tx, ty, gate, y, tgate).

Public API: :func:`gated_residual`, running the custom op ``fastgen::gated_residual`` (backward:
``fastgen::gated_residual_backward``) on the backend chosen per call. y and gate may come in a
narrower dtype than x (autocast's bf16 outputs on an fp32 residual stream): the kernels read them
as they are (no widened copies), the backward keeps y as given and writes dy and dgate in their
inputs' dtypes (other mixes of dtypes are computed in fp32 from each input as given). In plain
eager mode, where a backward will follow and the cpu or cuda backend runs, the op records its
autograd in C++ (``fastgen_C::gated_residual``, the same kernels: no Python between them). A
create_graph=True backward differentiates again (the reference's ops instead of the kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _checks, _eager_op
from fastgen_kernels.ops.linear import saved_for_backward, tangent_rule

# --------------------------------------------------------------------------- reference


def _per_row(gate: Tensor, dtype: torch.dtype) -> Tensor:
    gate = gate.to(dtype)
    return gate.unsqueeze(1) if gate.dim() == 2 else gate


def reference_forward(x: Tensor, y: Tensor, gate: Tensor, y2: Tensor | None = None,
                      gate2: Tensor | None = None) -> Tensor:
    """x + gate * y (+ gate2 * y2) in fp32 (fp64 for fp64 input), in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    out = x.to(ct) + _per_row(gate, ct) * y.to(ct)
    if y2 is not None:
        out = out + _per_row(gate2, ct) * y2.to(ct)
    return out.to(x.dtype).contiguous()


def reference_backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dgate) in y's and gate's dtypes."""
    ct = torch.promote_types(torch.promote_types(grad_out.dtype, y.dtype), torch.float32)
    g = grad_out.to(ct)
    dy = g * _per_row(gate, ct)
    dgate = g * y.to(ct)
    if gate.dim() == 2:
        dgate = dgate.sum(1)
    return dy.to(y.dtype).contiguous(), dgate.to(gate.dtype).contiguous()


# --------------------------------------------------------------------------- backends


def _extension_forward(x, y, gate, y2=None, gate2=None):
    return torch.ops.fastgen_C.gated_residual_forward(x.contiguous(), y, gate, y2, gate2)


def _extension_backward(grad_out, y, gate):
    return tuple(torch.ops.fastgen_C.gated_residual_backward(grad_out.contiguous(), y, gate))


def _triton_forward(*args):
    from fastgen_kernels.triton_ops import gated_residual

    return gated_residual.forward(*args)


def _triton_backward(*args):
    from fastgen_kernels.triton_ops import gated_residual

    return gated_residual.backward(*args)


_SUPPORTS = {
    "cuda": _checks.gpu_kernel_operands_support,
    "triton": _checks.gpu_kernel_operands_support,
    "cpu": _checks.nonempty,
}

forward_dispatcher = OpDispatcher(
    "fastgen.gated_residual",
    {"cuda": _extension_forward, "triton": _triton_forward, "cpu": _extension_forward,
     "reference": reference_forward},
    _SUPPORTS,
)
backward_dispatcher = OpDispatcher(
    "fastgen.gated_residual_backward",
    {"cuda": _extension_backward, "triton": _triton_backward, "cpu": _extension_backward,
     "reference": reference_backward},
    _SUPPORTS,
)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::gated_residual", mutates_args=())
def gated_residual_op(x: Tensor, y: Tensor, gate: Tensor, y2: Tensor | None = None,
                      gate2: Tensor | None = None) -> Tensor:
    """x + gate * y (+ gate2 * y2), in x's dtype."""
    _check_second_term(x, y2, gate2)
    return forward_dispatcher(x, y, gate, y2, gate2)


def _check_second_term(x: Tensor, y2: Tensor | None, gate2: Tensor | None) -> None:
    """The op's optional second term (the tangent rule's): both or neither, shaped as y and gate."""
    op = "gated_residual"
    if (y2 is None) != (gate2 is None):
        raise ValueError(f"{op}: y2 and gate2 come together, got only {'y2' if gate2 is None else 'gate2'}")
    if y2 is not None:
        _checks.like_x(op, "y2", y2, x, [tuple(x.shape)], any_float=True)
        _checks.modulation(op, "gate2", gate2, x, any_float=True)


@torch.library.custom_op("fastgen::gated_residual_backward", mutates_args=())
def gated_residual_backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dgate) of x + gate * y in y's and gate's dtypes; dx is grad_out itself."""
    return backward_dispatcher(grad_out, y, gate)


gated_residual_op.register_fake(reference_forward)
gated_residual_backward.register_fake(reference_backward)


# What the autograd.Functions and backward below call: the dispatchers in plain eager mode, the
# custom ops elsewhere (see _eager_op.EagerOp).
_gated_residual = _eager_op.EagerOp(torch.ops.fastgen.gated_residual, forward_dispatcher)
_gated_residual_backward = _eager_op.EagerOp(torch.ops.fastgen.gated_residual_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    _, *operands = inputs
    ctx.save_for_backward(*saved_for_backward(*operands))


def _backward(ctx, grad_out):
    y, gate, y2, gate2 = ctx.saved_tensors
    # a create_graph=True backward takes the reference's differentiable ops (second derivatives,
    # e.g. a gradient penalty through a DiT); the kernels' outputs would differentiate as constants
    backward = reference_backward if torch.is_grad_enabled() else _gated_residual_backward
    needs = ctx.needs_input_grad
    grads = [grad_out if needs[0] else None, None, None, None, None]
    for term, (operand, operand_gate) in enumerate(((y, gate), (y2, gate2))):
        if operand is not None and (needs[1 + 2 * term] or needs[2 + 2 * term]):
            dy, dgate = backward(grad_out, operand, operand_gate)
            grads[1 + 2 * term] = dy if needs[1 + 2 * term] else None
            grads[2 + 2 * term] = dgate if needs[2 + 2 * term] else None
    return tuple(grads)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
gated_residual_op.register_autograd(_backward, setup_context=_setup_context)


class _GatedResidualFunction(_eager_op.Function):
    """The custom op plus a forward-mode rule (custom ops have none): the tangent
    tx + gate * ty + tgate * y in one call of the op."""

    @staticmethod
    def forward(x, y, gate):
        return _gated_residual(x, y, gate, None, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, (*inputs, None, None), output)
        _, y, gate = inputs
        ctx.save_for_forward(y, gate)
        ctx.out_like = (output.shape, output.dtype, output.device)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)[:3]

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx, ty, tgate):
        y, gate = ctx.saved_tensors
        shape, dtype, device = ctx.out_like
        tx = torch.zeros(shape, dtype=dtype, device=device) if tx is None else tx.to(dtype)
        terms = [(t, g) for t, g in ((ty, gate), (y, tgate)) if g is not None and t is not None]
        if not terms:
            return tx
        (first, first_gate), *second = terms
        return _gated_residual(tx, first, first_gate, *(second[0] if second else (None, None)))


# The extension's fastgen_C::gated_residual: the autograd.Function above (backward only) in C++,
# without Python between the forward's kernel and the backward's (csrc/torch_bindings.cpp).
_native = _extension.native_op("gated_residual")

# --------------------------------------------------------------------------- public API


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + gate * y`` in one pass: the adaLN-Zero residual of a DiT block.

    x, y: (B, L, D); gate: (B, D) broadcast over L, or (B, L, D); on one device. y and gate may
    have another floating dtype than x (e.g. bf16 autocast outputs on an fp32 residual stream):
    they are read as they are, and the backward keeps y as given. Output in x's dtype (fp32
    arithmetic); gradients in each input's dtype. Differentiable in x, y and gate, forward mode
    included.
    """
    op = "gated_residual"
    x = _checks.activation(op, x)
    _checks.like_x(op, "y", y, x, [tuple(x.shape)], any_float=True)
    _checks.modulation(op, "gate", gate, x, any_float=True)
    if _eager_op.runs_as_composition():
        return reference_forward(x, y, gate)
    if torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a jvp
        return torch.ops.fastgen.gated_residual(x, y, gate)
    if _eager_op.no_autograd((x, y, gate)):
        return forward_dispatcher(x, y, gate, None, None)
    if (_native is not None and _eager_op.backward_will_follow((x, y, gate))
            and forward_dispatcher.select(x, y, gate) in ("cpu", "cuda")):
        return _native(x, y, gate)  # the same kernels, autograd in C++ (no forward-mode rule needed)
    return _GatedResidualFunction.apply(x, y, gate)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 64, device=device, dtype=dtype)
    return (x, x, torch.randn(2, 64, device=device, dtype=dtype))


def example_backward_args(x, y, gate) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    return (x, y, gate)
