r"""Per-sample squared-residual losses, fused: the op behind the denoising, consistency and
MeanFlow losses (``fastgen_kernels.losses``), and its scaled-residual backward, also the VSD
backward.

Shapes: a, b (B, ...) of one shape and dtype, read as B samples of D elements; optional c of the
same shape with a per-sample k (B,) (c and k come together); optional weight w (B,). Per sample b::

    r = a - b + k_b * c                 (c absent: r = a - b)
    S = sum_D r^2                       (one fused pass, fp32 accumulation)
    m = S, or with huber = h > 0 the pseudo-Huber metric
    m = sqrt(S + h^2) - h = S / (sqrt(S + h^2) + h)     (no cancellation near S = 0)
    A = sg((m + offset)^-power)         (MeanFlow's adaptive weight; A = 1 for power = 0)
    loss_b = w_b * scale * A * m        -> the batch mean, or the (B,) vector

(the tail: csrc/sample_loss_tail.h). VJP with upstream gradient g, one elementwise pass writing
both, where saved_b = 2 red w_b scale A dm/dS (red = 1 / B for the mean) comes from the forward::

    da = g saved_b r        db = -da        dw_b = g red scale A m

c, k and the adaptive weight are constants (MeanFlow's JVP, t - r and its stop-gradient weight):
they get no gradient. The scaled residual ``out = s_b * r`` (and ``-out``) is the one backward
kernel of this op and of the VSD loss.

Custom ops: ``fastgen::squared_residual_loss`` -> (loss, saved), backward
``fastgen::squared_residual_backward``. Shared scheme: :mod:`fastgen_kernels.ops._sample_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import BACKENDS, OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.ops._eager_op import EagerOp

# --------------------------------------------------------------------------- reference


def _residual(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None) -> Tensor:
    """r as (B, D) in the statistics' dtype."""
    ct = sl.stat_dtype(a)
    r = sl.flat(a, ct) - sl.flat(b, ct)
    return r if c is None else r + k.to(ct).view(-1, 1) * sl.flat(c, ct)


def reference_sums(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None) -> Tensor:
    """(B, 1): per sample S = sum r^2, in the statistics' dtype."""
    return _residual(a, b, c, k).square().sum(1, keepdim=True)


def reference_scaled_residual(a, b, c, k, factor, grad, negated: bool) -> tuple[Tensor, Tensor]:
    """(s_b * r, its negation or an empty tensor), s_b = grad * factor_b, in a's dtype and shape."""
    out = (sl.scale(grad, factor).view(-1, 1) * _residual(a, b, c, k)).view(a.shape)
    neg = (-out).to(a.dtype) if negated else a.new_empty(0)
    return out.to(a.dtype), neg


# --------------------------------------------------------------------------- backends


def _per_sample_k(a: Tensor, k: Tensor | None) -> Tensor | None:
    return None if k is None else sl.per_sample_stat(k, a)


def _contiguous(c: Tensor | None) -> Tensor | None:
    return None if c is None else c.contiguous()


def _extension_sums(a, b, c, k):
    return torch.ops.fastgen_C.squared_residual_sums(a.contiguous(), b.contiguous(), _contiguous(c),
                                                     _per_sample_k(a, k))


def _extension_scaled_residual(a, b, c, k, factor, grad, negated):
    return tuple(torch.ops.fastgen_C.scaled_residual(
        a.contiguous(), b.contiguous(), _contiguous(c), _per_sample_k(a, k), sl.scale(grad, factor), negated))


def _triton_sums(a, b, c, k):
    from fastgen_kernels.triton_ops import squared_residual

    return squared_residual.sums(a, b, c, _per_sample_k(a, k))


def _triton_scaled_residual(a, b, c, k, factor, grad, negated):
    from fastgen_kernels.triton_ops import squared_residual

    return squared_residual.scaled_residual(a, b, c, _per_sample_k(a, k), factor, grad, negated)


SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
        "reference": reference_sums}

# out = s_b * r (and -out), s_b = grad * factor_b: the backward kernel of this op and of the VSD
# loss, per backend
SCALED_RESIDUAL = {"cuda": _extension_scaled_residual, "triton": _triton_scaled_residual,
                   "cpu": _extension_scaled_residual, "reference": reference_scaled_residual}


def _forward_impl(backend: str):
    def forward(a, b, c, k, weight, scale, huber, power, offset, mean):
        return sl.TAIL[backend](SUMS[backend](a, b, c, k), weight, None, None, sl.SQUARED,
                                [scale, huber, power, offset], sl.numel_per_sample(a), mean)
    return forward


def _backward_impl(backend: str):
    def backward(a, b, c, k, factor, grad, b_grad):
        return SCALED_RESIDUAL[backend](a, b, c, k, factor, grad, b_grad)
    return backward


reference_forward = _forward_impl("reference")
reference_backward = _backward_impl("reference")

forward_dispatcher = OpDispatcher(
    "fastgen.squared_residual_loss", {name: _forward_impl(name) for name in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.squared_residual_backward", {name: _backward_impl(name) for name in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::squared_residual_loss", mutates_args=())
def squared_residual_loss(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None,
                          weight: Tensor | None, scale: float, huber: float, power: float,
                          offset: float, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss, saved): the batch mean (mean) or the (B,) values of w_b scale A m(S_b), and the
    per-sample backward factors (B, 2), in the statistics' dtype."""
    return forward_dispatcher(a, b, c, k, weight, scale, huber, power, offset, mean)


@torch.library.custom_op("fastgen::squared_residual_backward", mutates_args=())
def squared_residual_backward(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None,
                              factor: Tensor, grad: Tensor, b_grad: bool) -> tuple[Tensor, Tensor]:
    """(da, db) = (s_b r, -s_b r) with s_b = grad * factor_b; db is empty unless b_grad."""
    return backward_dispatcher(a, b, c, k, factor, grad, b_grad)


squared_residual_loss.register_fake(reference_forward)
squared_residual_backward.register_fake(reference_backward)
squared_residual_backward_eager = EagerOp(torch.ops.fastgen.squared_residual_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    a, b, c, k = inputs[:4]
    ctx.save_for_backward(a, b, c, k, output[1])
    sl.setup_loss_context(ctx, output[1])


def _backward(ctx, grad, _grad_saved):
    a, b, c, k, saved = ctx.saved_tensors
    needs_a, needs_b, _, _, needs_weight = ctx.needs_input_grad[:5]
    sl.check_first_order("squared_residual_loss")
    da = db = dweight = None
    if needs_a or needs_b:
        da, db = squared_residual_backward_eager(a, b, c, k, saved[:, 0], grad, needs_b)
    if needs_weight:
        dweight = sl.scale(grad, saved[:, 1])
    return (da if needs_a else None, db if needs_b else None, None, None, dweight,
            None, None, None, None, None)


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
squared_residual_loss.register_autograd(_backward, setup_context=_setup_context)
# native: the same kernels with the autograd above written in C++ (csrc/torch_bindings.cpp)
squared_residual_loss_eager = EagerOp(torch.ops.fastgen.squared_residual_loss, forward_dispatcher,
                                      _setup_context, _backward, native=_extension.native_op("squared_residual_loss"))


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    a = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    return (a, torch.randn_like(a), torch.randn_like(a), torch.rand(2, device=device), None,
            1.0, 0.0, 1.0, 1e-3, True)


def example_backward_args(a, b, c, k, weight, scale, huber, power, offset, mean) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, saved = reference_forward(a, b, c, k, weight, scale, huber, power, offset, mean)
    return (a, b, c, k, saved[:, 0], torch.ones((), device=a.device), True)
