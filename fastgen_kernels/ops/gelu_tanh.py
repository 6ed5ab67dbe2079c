r"""GELU with the tanh approximation (the DiT MLP's activation), one elementwise pass.

With k = sqrt(2 / pi), c = 0.044715 and u = k (x + c x^3)::

    y = 0.5 x (1 + tanh u) = x * s,        s = sigmoid(2u)
    y' = s + x s (1 - s) 2k (1 + 3c x^2)

VJP (upstream g): dx = g * y'.  JVP (tangent tx): ty = tx * y', the same kernel.

The CPU kernel evaluates the sigmoid form, which needs one exp, in the vectorized instruction-set
copies of the CPU kernels (csrc/cpu/gelu_tanh.cpp): ATen's tanh costs more than the MLP's fc1
GEMM at a small DiT's sizes on the CPU. Any shape, float16/bfloat16/float32/float64, fp32
arithmetic (fp64 for fp64), output in x's dtype. Backends: cpu (extension) and reference
(PyTorch's ``gelu`` and ``gelu_backward`` kernels, one pass each), which is also the GPU path:
there PyTorch's kernels are bandwidth-bound already, and the fusion that pays is into the GEMM's
epilogue (``fp8_linear``). (The reference once upcast to fp32 around the forward and wrote the
derivative as a dozen PyTorch ops on fp32 copies: on the MLP's (8192, 4608) activations of DiT-XL
at batch 32, called by the JVP and the backward of each block, that formula accounts for about
500 of the 597 multiplications, 50 ms of kernels, of the H200 run's sCM step, besides its
additions, powers and casts.)

Public API: :func:`gelu_tanh`, running the custom op ``fastgen::gelu_tanh`` (backward:
``fastgen::gelu_tanh_backward``), and :func:`gelu_tanh_linear`, the activation followed by a
linear layer (a DiT MLP's fc2) that keeps the activation's input, not its output, for the
backward: the linear layer's weight gradient recomputes y = gelu_tanh(x), one elementwise pass,
instead of holding a second (..., hidden) activation per MLP from forward to backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen_kernels.backends import OpDispatcher, carry_forced_backend, record_forced_backend, under_forced_backend
from fastgen_kernels.ops import _checks, _eager_op
from fastgen_kernels.ops.linear import (composed_layer_gradients, input_tangent, input_tangents_only_outside_transforms,
                                        layer_weight, linear, recomputed_input_backward, saved_for_backward,
                                        tangent_rule)

# --------------------------------------------------------------------------- reference


def reference_forward(x: Tensor) -> Tensor:
    """PyTorch's kernel: one pass, in fp32 for float16 and bfloat16 inputs (rounded once)."""
    return F.gelu(x, approximate="tanh").contiguous()


def reference_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad_out * y'(x) (also the JVP, with the tangent as grad_out): PyTorch's gelu_backward, one
    pass in fp32 for float16 and bfloat16 (in the wider dtype of the two when they differ)."""
    dtype = torch.promote_types(grad_out.dtype, x.dtype)
    return torch.ops.aten.gelu_backward(grad_out.to(dtype), x.to(dtype), approximate="tanh").to(x.dtype).contiguous()


# --------------------------------------------------------------------------- backends


def _cpu_forward(x: Tensor) -> Tensor:
    return torch.ops.fastgen_C.gelu_tanh_forward(x.contiguous())


def _cpu_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    return torch.ops.fastgen_C.gelu_tanh_backward(grad_out.contiguous(), x.contiguous())


def _cpu_backward_support(grad_out: Tensor, x: Tensor) -> str | None:
    """The kernel reads grad_out in x's dtype; a tangent of another dtype (forward-mode AD through
    a dual tensor whose tangent is wider) goes to the reference, which promotes."""
    if grad_out.dtype != x.dtype:
        return f"grad_out {grad_out.dtype} beside x {x.dtype}"
    return _checks.nonempty(x)


forward_dispatcher = OpDispatcher("fastgen.gelu_tanh", {"cpu": _cpu_forward, "reference": reference_forward},
                                  {"cpu": _checks.nonempty})
backward_dispatcher = OpDispatcher("fastgen.gelu_tanh_backward",
                                   {"cpu": _cpu_backward, "reference": reference_backward},
                                   {"cpu": _cpu_backward_support}, device_of=lambda grad_out, x: x.device)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::gelu_tanh", mutates_args=())
def gelu_tanh_op(x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return forward_dispatcher(x)


@torch.library.custom_op("fastgen::gelu_tanh_backward", mutates_args=())
def gelu_tanh_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad_out * gelu_tanh'(x)."""
    return backward_dispatcher(grad_out, x)


gelu_tanh_op.register_fake(reference_forward)
gelu_tanh_backward.register_fake(reference_backward)


# What the autograd.Functions and backward below call: the dispatchers in plain eager mode, the
# custom ops elsewhere (see _eager_op.EagerOp).
_gelu_tanh = _eager_op.EagerOp(torch.ops.fastgen.gelu_tanh, forward_dispatcher)
_gelu_tanh_backward = _eager_op.EagerOp(torch.ops.fastgen.gelu_tanh_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*saved_for_backward(inputs[0]))


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True or torch.func.grad: gradients that differentiate again
        return _eager_op.composition_gradients(reference_forward, (x,), (True,), (grad_out,))[0]
    return _gelu_tanh_backward(grad_out, x)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
gelu_tanh_op.register_autograd(_backward, setup_context=_setup_context)


class _GeluTanhFunction(_eager_op.Function):
    """The custom op plus a forward-mode rule (custom ops have none)."""

    @staticmethod
    def forward(x):
        return _gelu_tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    backward = staticmethod(_backward)

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx):
        (x,) = ctx.saved_tensors
        return _gelu_tanh_backward(tx, x)


# --------------------------------------------------------------------------- public API


def gelu_tanh(x: Tensor) -> Tensor:
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, as ``F.gelu(x, approximate="tanh")``.

    x: any shape, float16/bfloat16/float32/float64; fp32 arithmetic (fp64 for fp64), output in x's
    dtype. Differentiable, forward mode (torch.func.jvp) included.
    """
    x = _checks.tensor("gelu_tanh", "x", x)
    if _eager_op.runs_as_composition():
        return reference_forward(x)
    if torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a jvp
        return torch.ops.fastgen.gelu_tanh(x)
    if _eager_op.no_autograd((x,)):
        return forward_dispatcher(x)
    return _GeluTanhFunction.apply(x)


class _GeluTanhLinearFunction(torch.autograd.Function):
    """F.linear(gelu_tanh(x), weight, bias), saving x and weight. The linear layer runs in the
    dtype autocast gives it (grad_out's dtype in the backward), as F.linear alone would; in the one
    pass the caller passes the weight cast to it (``ops.linear.layer_weight``), for the backward
    too. Its
    forward-mode rule is along x alone (see fastgen_kernels.ops.linear): F.linear(tx *
    gelu_tanh'(x), weight), one GEMM; one Function for both, as the GELU's Function followed by
    ops.linear's kept every layer's activations alive through a torch.func.jvp pass (twice the
    memory, measured)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.set_materialize_grads(False)  # no zero tangents of the weight and bias (their size, twice)
        ctx.save_for_backward(*saved_for_backward(x, weight))
        ctx.save_for_forward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        record_forced_backend(ctx)
        out = F.linear(forward_dispatcher(x), weight, bias)
        ctx.output_like = (out.shape, out.dtype, out.device)
        return out

    @staticmethod
    @under_forced_backend
    def backward(ctx, grad_out):
        if grad_out is None:  # no gradient reached the output (gradients are not materialized)
            return None, None, None
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True or torch.func.grad: gradients that differentiate again
            return composed_layer_gradients(grad_out, reference_forward, (x,), weight, ctx.bias_dtype, needs)
        dy, dweight, dbias = recomputed_input_backward(grad_out, weight, ctx.bias_dtype, needs,
                                                       lambda: forward_dispatcher(x))
        dx = _gelu_tanh_backward(dy.to(x.dtype), x) if needs[0] else None
        return dx, dweight, dbias

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx, _tweight, _tbias):
        x, weight = ctx.saved_tensors
        return input_tangent(None if tx is None else backward_dispatcher(tx, x), weight, ctx.output_like)


def gelu_tanh_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(gelu_tanh(x), weight, bias)``, holding only x for the backward (see the module doc).

    x: (..., K) float16/bfloat16/float32/float64; weight (N, K), bias (N,) as for ``F.linear``;
    autocast applies to the linear layer as usual. Differentiable in x, weight and bias. Under
    forward-mode AD inside ``ops.linear.parameters_without_tangents`` its tangent is along x alone
    (one GEMM); under other forward-mode AD, torch.compile or other transforms it is the plain
    composition.
    """
    x = _checks.tensor("gelu_tanh_linear", "x", x)
    _checks.linear_layer("gelu_tanh_linear", ("weight", "bias"), weight, bias, x)
    if input_tangents_only_outside_transforms():  # the one pass: the weight cast once for all three GEMMs
        return _GeluTanhLinearFunction.apply(x, layer_weight(weight), bias)
    if _eager_op.backward_will_follow((x, weight, bias)):
        return _GeluTanhLinearFunction.apply(x, weight, bias)
    return linear(gelu_tanh(x), weight, bias)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    return (torch.randn(2, 3, 64, device=device, dtype=dtype),)


def example_backward_args(x) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    return (x, x)
