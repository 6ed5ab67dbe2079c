r"""Linear layers under forward-mode AD when the parameters carry no tangents, and the contract of
that context for every fused op's forward-mode rule.

PyTorch's forward-mode rule for a linear layer, y = x W^T + b, is ty = tx W^T + x tW^T + tb,
and both torch.func.jvp and torch.autograd.forward_ad evaluate the middle GEMM even when W has
no tangent (its tangent is materialized as zeros): three GEMMs where the JVP needs two. The
distillation methods differentiate networks along their inputs only (sCM, MeanFlow: along
(x_t, t)), so inside :func:`parameters_without_tangents` the fused networks' linear layers
(:func:`linear`) take the rule ty = tx W^T, one GEMM on top of the forward's. Elsewhere, and
outside forward-mode AD, :func:`linear` is ``F.linear``.

Those methods also stop the tangent's gradient (it enters their losses as a constant). So inside
the context the fused ops' forward-mode rules (:func:`tangent_rule`) compute tangents with
backward-mode AD off: a pass with grad mode on gives the primal with its autograd history and the
tangent without any, holding no activations for a backward through the tangent. One pass then
serves both the JVP and the forward the loss differentiates (``distill.base.forward_and_jvp``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen_kernels.ops._eager_op import Function, composition_gradients, functorch_jvp_active

_PARAMETERS_WITHOUT_TANGENTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastgen_parameters_without_tangents", default=False)


@contextlib.contextmanager
def parameters_without_tangents() -> Iterator[None]:
    """Inside: forward-mode AD through :func:`linear` treats weights and biases as constants (their
    tangents are ignored, so they must be zero: differentiation along the inputs only), and the
    fused ops' tangents carry no backward history (see the module doc)."""
    token = _PARAMETERS_WITHOUT_TANGENTS.set(True)
    try:
        yield
    finally:
        _PARAMETERS_WITHOUT_TANGENTS.reset(token)


def tangent_rule(jvp: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates an autograd.Function's ``jvp``: inside :func:`parameters_without_tangents` it
    runs with grad mode off (PyTorch calls it with grad mode as the forward had it, so the
    tangents of a pass with gradients would record a backward graph and hold its activations)."""
    @functools.wraps(jvp)
    def rule(ctx, *tangents):
        if _PARAMETERS_WITHOUT_TANGENTS.get():
            with torch.no_grad():
                return jvp(ctx, *tangents)
        return jvp(ctx, *tangents)

    return rule


def saved_for_backward(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """What a Function saves for its backward: under forward-mode AD inside
    :func:`parameters_without_tangents` (a pass that also differentiates the primal) the tensors
    detached, as a saved dual tensor, or a view of one, keeps its tangent alive until the dual
    level closes: the pass's peak would hold every saved activation's tangent too. Elsewhere as
    given (a create_graph=True backward differentiates through them; none runs in that pass)."""
    if not input_tangents_only():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


def _rows(t: Tensor) -> Tensor:
    """(..., F) -> (rows, F), zero-sized dimensions included (reshape(-1, 0) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on ``device``'s type; None where autocast is off or the type
    has none (meta tensors: shape propagation)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # no autocast for this device type
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def layer_weight(weight: Tensor) -> Tensor:
    """The weight a layer Function below takes in the one pass (forward-mode AD with a backward to
    follow): cast to autocast's dtype (as F.linear would compute with it) where autocast is on for
    its device with its cache and the weight is a trainable floating one (not float64, which
    autocast leaves); else the weight itself. The Functions keep what they are given for the
    tangent's and the backward's GEMMs and cast what is not in autocast's dtype there again;
    given the cast, by a differentiable cast before them, the weight's gradient goes back
    through it as eager autocast's does. Kept cast, a weight is held in bf16 from the forward to
    its backward, where autocast's cache held that copy through the forward anyway: the one pass's
    peak is within 1% (measured: XL widths, depth 4, batch 2 and 8), and its backward casts no
    weight again (a weight's bytes read twice more and written once; 4 GB in a DiT-XL/2 sCM step
    at batch 32). Without the cache (CUDA-graphed steps) or for frozen weights, which autocast
    does not cache, the copy would be memory held until the backward (1.35 GB for DiT-XL/2); and
    a plain forward + backward peaked 10% higher with it (its peak is in the backward), so
    there the layers get the parameter."""
    dtype = autocast_dtype(weight.device)
    if (dtype is not None and weight.requires_grad and torch.is_autocast_cache_enabled()
            and weight.is_floating_point() and weight.dtype != torch.float64):
        return weight.to(dtype)
    return weight


def recomputed_input_backward(grad_out: Tensor, weight: Tensor, bias_dtype: torch.dtype | None,
                              needs: tuple[bool, bool, bool], recompute_input: Callable[[], Tensor]
                              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dy, dweight, dbias) of F.linear(y, weight, bias) whose input y was not kept: y =
    recompute_input() only when the weight gradient is needed. The layer ran in grad_out's dtype
    (autocast's, or its inputs'); dy is in it, dweight and dbias in their parameters' dtypes.
    ``needs``: whether y, weight and bias need gradients (bias_dtype None: no bias)."""
    rows = _rows(grad_out)
    dy = grad_out @ weight.to(grad_out.dtype) if needs[0] else None
    dweight = None
    if needs[1]:
        dweight = (rows.T @ _rows(recompute_input()).to(rows.dtype)).to(weight.dtype)
    dbias = rows.sum(0).to(bias_dtype) if bias_dtype is not None and needs[2] else None
    return dy, dweight, dbias


def composed_layer_gradients(grad_out: Tensor, reference: Callable[..., Tensor], inputs: tuple, weight: Tensor,
                             bias_dtype: torch.dtype | None, needs: tuple[bool, ...]) -> tuple:
    """For a backward that records a graph (create_graph=True, a gradient penalty through a DiT):
    the gradients of F.linear(reference(*inputs), weight, bias) by autograd of plain PyTorch ops
    (the kernels' would differentiate as constants), the layer in grad_out's dtype as in the
    first-order backward: one per input, then the weight's and the bias's. ``needs``: one per
    input, the weight and the bias (bias_dtype None: no bias)."""
    def composition(*args):
        return F.linear(reference(*args[:-1]).to(grad_out.dtype), args[-1].to(grad_out.dtype))

    grads = composition_gradients(composition, (*inputs, weight), needs[:-1], (grad_out,))
    rows = _rows(grad_out)
    return (*grads, rows.sum(0).to(bias_dtype) if bias_dtype is not None and needs[-1] else None)


class _InputTangentLinear(Function):
    """F.linear whose forward-mode rule is tx W^T alone (:func:`tangent_rule`); its backward is
    the layer's, for a pass that also differentiates the primal (x and the weight are kept only
    then)."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)  # no zero tangents of the weight and bias (their size, twice)
        ctx.save_for_forward(weight)
        ctx.output_like = (output.shape, output.dtype, output.device)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(*saved_for_backward(x, weight))
            ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:  # no gradient reached the output (gradients are not materialized)
            return None, None, None
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = recomputed_input_backward(grad_out, weight, ctx.bias_dtype, ctx.needs_input_grad,
                                                       lambda: x)
        return None if dx is None else dx.to(ctx.x_dtype), dweight, dbias

    @staticmethod
    @tangent_rule
    def jvp(ctx, tx, _tweight, _tbias):
        (weight,) = ctx.saved_tensors
        return input_tangent(tx, weight, ctx.output_like)


def input_tangent(tx: Tensor | None, weight: Tensor, output_like: tuple) -> Tensor:
    """tx W^T, a linear layer's tangent along its input; zeros shaped as the output, given as
    ``output_like`` = (shape, dtype, device), for an input without a tangent (a Function whose
    ``set_materialize_grads(False)`` spares the zero tangents of the weight gets None there)."""
    if tx is None:
        shape, dtype, device = output_like
        return torch.zeros(shape, dtype=dtype, device=device)
    return F.linear(tx, weight)


def input_tangents_only() -> bool:
    """Whether a forward-mode rule may ignore parameter tangents here: inside
    :func:`parameters_without_tangents`, forward-mode AD active, not compiling."""
    if torch.compiler.is_compiling():  # Dynamo traces no ContextVar; compiled code has its own rules
        return False
    forward_mode = torch.autograd.forward_ad._current_level >= 0 or functorch_jvp_active()
    return _PARAMETERS_WITHOUT_TANGENTS.get() and forward_mode


def input_tangents_only_outside_transforms() -> bool:
    """:func:`input_tangents_only` for the Functions written as ``forward(ctx, ...)``, which the
    torch.func transforms do not take (they need a separate ``setup_context``): the activation +
    linear ops. Under torch.func they run as the activation's Function and :func:`linear`, whose
    tangent is the same one GEMM."""
    return input_tangents_only() and not torch._C._are_functorch_transforms_active()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; where :func:`input_tangents_only`, its tangent is computed
    from x's alone (one GEMM)."""
    if input_tangents_only():
        return _InputTangentLinear.apply(x, layer_weight(weight), bias)
    return F.linear(x, weight, bias)
