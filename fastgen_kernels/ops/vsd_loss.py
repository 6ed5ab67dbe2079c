r"""VSD loss of DMD2 (variational score distillation), with f-Distill's per-sample weight, fused.

Shapes: x_g, x0_teacher (T), x0_fake (Fk): (B, ...) of one shape and dtype, read as B samples of
D elements; weight h: (B,) or None (h = 1). Per sample b, with sums over its D elements::

    S1 = sum |x_g - T|            S2 = sum (Fk - T)^2             (one fused pass, fp32)
    w  = 1 / (S1 / D + eps)       c  = w * h                      (no gradient through w, h)
    grad = (Fk - T) * c           loss_b = 0.5 * mean_D(grad^2) = 0.5 * c^2 * S2 / D

(the tail: csrc/sample_loss_tail.h). This is DMD2's 0.5 * mean((x_g - sg(x_g - grad))^2)
without the pseudo-target: its gradient w.r.t. x_g, with upstream gradient g of the result, is
(one elementwise pass)::

    dx_g = g * red * c * (Fk - T) / D      (red = 1 / B for the batch mean: grad / (B * D))

x0_teacher, x0_fake and weight are constants (stop-gradient): they never get a gradient.

Public API: :func:`vsd_loss` (also ``fastgen_kernels.losses.vsd_loss``), running the custom op
``fastgen::vsd_loss`` -> (loss, saved) (backward: ``fastgen::vsd_loss_backward``) on the backend
chosen per call. Shared scheme: :mod:`fastgen_kernels.ops._sample_loss`; the backward kernel is the
scaled residual of :mod:`fastgen_kernels.ops.squared_residual`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import BACKENDS, OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.ops._eager_op import EagerOp
from fastgen_kernels.ops.squared_residual import SCALED_RESIDUAL

# --------------------------------------------------------------------------- reference


def reference_sums(x_g: Tensor, teacher: Tensor, fake: Tensor) -> Tensor:
    """(B, 2): per sample (S1, S2), in the statistics' dtype."""
    ct = sl.stat_dtype(x_g)
    t = sl.flat(teacher, ct)
    return torch.stack([(sl.flat(x_g, ct) - t).abs().sum(1), (sl.flat(fake, ct) - t).square().sum(1)], 1)


# --------------------------------------------------------------------------- backends


def _extension_sums(x_g, teacher, fake):
    return torch.ops.fastgen_C.vsd_loss_sums(x_g.contiguous(), teacher.contiguous(), fake.contiguous())


def _triton_sums(*args):
    from fastgen_kernels.triton_ops import vsd_loss

    return vsd_loss.sums(*args)


_SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
         "reference": reference_sums}


def _forward_impl(backend: str):
    def forward(x_g, teacher, fake, weight, eps, mean):
        return sl.TAIL[backend](_SUMS[backend](x_g, teacher, fake), weight, None, None, sl.VSD, [eps],
                                sl.numel_per_sample(x_g), mean)
    return forward


def _backward_impl(backend: str):
    def backward(fake, teacher, factor, grad):
        return SCALED_RESIDUAL[backend](fake, teacher, None, None, factor, grad, False)[0]
    return backward


reference_forward = _forward_impl("reference")
reference_backward = _backward_impl("reference")

forward_dispatcher = OpDispatcher(
    "fastgen.vsd_loss", {b: _forward_impl(b) for b in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.vsd_loss_backward", {b: _backward_impl(b) for b in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::vsd_loss", mutates_args=())
def vsd_loss_op(x_g: Tensor, x0_teacher: Tensor, x0_fake: Tensor, weight: Tensor | None,
                eps: float, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss: the batch mean (mean) or the (B,) values of loss_b, saved (B, 1): red c_b / D), in the
    statistics' dtype."""
    return forward_dispatcher(x_g, x0_teacher, x0_fake, weight, eps, mean)


@torch.library.custom_op("fastgen::vsd_loss_backward", mutates_args=())
def vsd_loss_backward(x0_fake: Tensor, x0_teacher: Tensor, factor: Tensor, grad: Tensor) -> Tensor:
    """dx_g = grad * factor_b * (x0_fake - x0_teacher)."""
    return backward_dispatcher(x0_fake, x0_teacher, factor, grad)


vsd_loss_op.register_fake(reference_forward)
vsd_loss_backward.register_fake(reference_backward)
vsd_loss_backward_eager = EagerOp(torch.ops.fastgen.vsd_loss_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    _, teacher, fake, *_ = inputs
    ctx.save_for_backward(teacher, fake, output[1])
    sl.setup_loss_context(ctx, output[1])


def _backward(ctx, grad, _grad_saved):
    teacher, fake, saved = ctx.saved_tensors
    sl.check_first_order("vsd_loss")
    dx = None
    if ctx.needs_input_grad[0]:
        dx = vsd_loss_backward_eager(fake, teacher, saved[:, 0], grad)
    return dx, None, None, None, None, None


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
vsd_loss_op.register_autograd(_backward, setup_context=_setup_context)
# native: the same kernels with the autograd above written in C++ (csrc/torch_bindings.cpp)
vsd_loss_eager = EagerOp(torch.ops.fastgen.vsd_loss, forward_dispatcher, _setup_context, _backward,
                         native=_extension.native_op("vsd_loss"))

# --------------------------------------------------------------------------- public API


def vsd_loss(x_g: Tensor, x0_teacher: Tensor, x0_fake: Tensor, weight: Tensor | None = None,
             eps: float = 1e-6, reduction: str = "mean") -> Tensor:
    """DMD2's distribution-matching (VSD) loss in one pass over the inputs, no pseudo-target.

    x_g: (B, ...) generator output; x0_teacher, x0_fake: the teacher's and the fake score's x0
    predictions, same shape, dtype and device (constants: never differentiated). weight: optional
    (B,) per-sample weight h (f-Distill), any float dtype, no gradient. Returns the batch mean of
    loss_b = 0.5 * mean_D(((Fk - T) * h / (mean_D |x_g - T| + eps))^2) (``reduction="mean"``)
    or the (B,) vector (``"none"``), in fp32 (fp64 for fp64 input); differentiable in x_g.
    """
    op = "vsd_loss"
    x_g = _checks.samples(op, x_g=x_g, x0_teacher=x0_teacher, x0_fake=x0_fake)
    _checks.per_sample(op, "weight", weight, "x_g", x_g)
    eps = _checks.positive(op, "eps", eps)
    reduction = _checks.reduction(op, reduction)
    loss, _ = vsd_loss_eager(x_g, x0_teacher.detach(), x0_fake.detach(),
                             None if weight is None else weight.detach(), eps, reduction == "mean")
    return loss


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    return (x, torch.randn_like(x), torch.randn_like(x), None, 1e-6, True)


def example_backward_args(x_g, x0_teacher, x0_fake, weight, eps, mean) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, saved = reference_forward(x_g, x0_teacher, x0_fake, weight, eps, mean)
    return (x0_fake, x0_teacher, saved[:, 0], torch.ones((), device=x_g.device))
