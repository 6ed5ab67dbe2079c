r"""VSD loss of DMD2 (variational score distillation), with f-Distill's per-sample weight, fused.

Shapes: x_g, x0_teacher (T), x0_fake (Fk): (B, ...) of one shape and dtype, read as B samples of
D elements; weight h: (B,) or None (h = 1). Per sample b, with sums over its D elements::

    S1 = sum |x_g - T|            S2 = sum (Fk - T)^2             (one fused pass, fp32)
    w  = 1 / (S1 / D + eps)       c  = w * h                      (no gradient through w, h)
    grad = (Fk - T) * c           loss_b = 0.5 * mean_D(grad^2) = 0.5 * c^2 * S2 / D

This is METHODS.md's 0.5 * mean((x_g - sg(x_g - grad))^2) without the pseudo-target: its gradient
w.r.t. x_g, with upstream gradient g_b of loss_b, is (one elementwise pass)::

    dx_g = g_b * c * (Fk - T) / D          (batch mean: g_b = 1 / B, so grad / (B * D))

x0_teacher, x0_fake and weight are constants (stop-gradient): they never get a gradient.

Public API: :func:`vsd_loss` (also ``fastgen_kernels.losses.vsd_loss``), running the custom op
``fastgen::vsd_loss`` -> (loss_b, c) (backward: ``fastgen::vsd_loss_backward``) on the backend
chosen per call. Shared scheme: :mod:`fastgen_kernels.ops._sample_loss`; the backward kernel is the
scaled residual of :mod:`fastgen_kernels.ops.squared_residual`.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def finish(sums: Tensor, weight: Tensor | None, eps: float, D: int) -> tuple[Tensor, Tensor]:
    """(loss_b, c_b) from the per-sample sums (S1, S2): every backend's last step."""
    w = 1.0 / (sums[:, 0] / D + eps)
    c = w * sl.per_sample_factor(weight, w)
    return 0.5 * c.square() * sums[:, 1] / D, c


def reference_forward(x_g: Tensor, teacher: Tensor, fake: Tensor, weight: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor]:
    return finish(reference_sums(x_g, teacher, fake), weight, eps, sl.numel_per_sample(x_g))


def reference_backward(fake: Tensor, teacher: Tensor, factor: Tensor, grad: Tensor) -> Tensor:
    """dx_g = grad_b * c_b * (Fk - T) / D, in the inputs' dtype."""
    return _backward_impl("reference")(fake, teacher, factor, grad)


# --------------------------------------------------------------------------- backends


def _extension_sums(x_g, teacher, fake):
    return torch.ops.fastgen_C.vsd_loss_sums(x_g.contiguous(), teacher.contiguous(), fake.contiguous())


def _triton_sums(*args):
    from fastgen_kernels.triton_ops import vsd_loss

    return vsd_loss.sums(*args)


_SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
         "reference": reference_sums}


def _forward_impl(backend: str):
    def forward(x_g, teacher, fake, weight, eps):
        return finish(_SUMS[backend](x_g, teacher, fake), weight, eps, sl.numel_per_sample(x_g))
    return forward


def _backward_impl(backend: str):
    def backward(fake, teacher, factor, grad):
        s = sl.scale(grad, factor, 1.0 / sl.numel_per_sample(fake), factor.dtype)
        return SCALED_RESIDUAL[backend](fake, teacher, None, None, s, False)[0]
    return backward


forward_dispatcher = OpDispatcher(
    "fastgen.vsd_loss", {b: _forward_impl(b) for b in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.vsd_loss_backward", {b: _backward_impl(b) for b in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::vsd_loss", mutates_args=())
def vsd_loss_op(x_g: Tensor, x0_teacher: Tensor, x0_fake: Tensor, weight: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor]:
    """(loss_b, c_b), both (B,) in the statistics' dtype."""
    return forward_dispatcher(x_g, x0_teacher, x0_fake, weight, eps)


@torch.library.custom_op("fastgen::vsd_loss_backward", mutates_args=())
def vsd_loss_backward(x0_fake: Tensor, x0_teacher: Tensor, factor: Tensor, grad: Tensor) -> Tensor:
    """dx_g = grad_b * factor_b * (x0_fake - x0_teacher) / D."""
    return backward_dispatcher(x0_fake, x0_teacher, factor, grad)


vsd_loss_op.register_fake(reference_forward)
vsd_loss_backward.register_fake(reference_backward)
vsd_loss_backward_eager = EagerOp(torch.ops.fastgen.vsd_loss_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    _, teacher, fake, _, _ = inputs
    ctx.save_for_backward(teacher, fake, output[1])


def _backward(ctx, grad_loss, _grad_factor):
    teacher, fake, factor = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = vsd_loss_backward_eager(fake, teacher, factor, grad_loss)
    return dx, None, None, None, None


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
vsd_loss_op.register_autograd(_backward, setup_context=_setup_context)
vsd_loss_eager = EagerOp(torch.ops.fastgen.vsd_loss, forward_dispatcher, _setup_context, _backward)

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
                             None if weight is None else weight.detach(), eps)
    return sl.reduce(loss, reduction)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    return (x, torch.randn_like(x), torch.randn_like(x), None, 1e-6)


def example_backward_args(x_g, x0_teacher, x0_fake, weight, eps) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, factor = reference_forward(x_g, x0_teacher, x0_fake, weight, eps)
    return (x0_fake, x0_teacher, factor, torch.ones_like(factor))
