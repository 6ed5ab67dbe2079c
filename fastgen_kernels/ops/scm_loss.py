r"""sCM (continuous-time consistency, TrigFlow) loss, fused: tangent, tangent normalization,
residual and adaptive weighting (Lu & Song 2024).

Shapes: F (the student's output F_theta, with gradient), F_minus (F_theta-, no gradient), dxt_dt,
jvp (J, the JVP of F_theta- along (cos t sin t dx_t/dt, cos t sin t)), x_t: (B, ...) of one shape
and dtype, B samples of D elements; t, logvar (the learned log-variance head u(t)): (B,). Per
sample, with c_t = cos t, s_t = sin t, sigma_d = sigma_data and warm-up factor w::

    g = -c_t^2 (sigma_d F_minus - dx_t/dt) - w (c_t s_t x_t + sigma_d J)
      = p . (F_minus, dx_t/dt, J, x_t),  p = (-c_t^2 sigma_d, c_t^2, -w sigma_d, -w c_t s_t)
    n = ||g||_2 / sqrt(D) + c                          (tangent normalization, c = 0.1)
    S = sum_D (F - F_minus - g / n)^2                  (the residual of F - sg(F) - g)
    loss_b = S / (D sigma_edm e^u) + u,   sigma_edm = sigma_d tan t
    (sigma_edm clamped at 1e-6 below; at t = pi/2, in fp32 rounded past it, 1 / sigma_edm = 0)

One fused pass reads the five inputs once and sums g^2, d g and d^2 with d = F - F_minus, which give
n and S = sum d^2 - 2 sum d g / n + sum g^2 / n^2 (exact algebra; when F_minus is F's own value,
as in training, d = 0 and S = sum g^2 / n^2; where d is close to g / n the expansion cancels and S
loses digits, which only the loss's value and u's gradient see: dF is made from d and g directly);
the tail (csrc/sample_loss_tail.h) makes loss_b, the
batch mean and the backward's factors. The VJP, upstream gradient g of the result (red = 1 / B for
the mean), is one more pass for F and a (B,) product for u::

    dF = g * 2 red / (D sigma_edm e^u) * (d - q . (F_minus, dx_t/dt, J, x_t)),    q = p / n
    du = g * red * (1 - S / (D sigma_edm e^u))

F_minus, dxt_dt, jvp, x_t and t are constants.

Custom ops: ``fastgen::scm_loss`` -> (loss, saved), backward ``fastgen::scm_loss_backward``.
Public API: :func:`scm_loss` (also ``fastgen_kernels.losses.scm_loss``). Shared scheme:
:mod:`fastgen_kernels.ops._sample_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import BACKENDS, OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.ops._eager_op import EagerOp

# --------------------------------------------------------------------------- reference


def _tangent_and_difference(F, F_minus, dxt_dt, jvp, x_t, coef) -> tuple[Tensor, Tensor]:
    """(g = coef . (F_minus, dxt_dt, jvp, x_t), d = F - F_minus), both (B, D) in the statistics'
    dtype."""
    ct = sl.stat_dtype(F)
    fm = sl.flat(F_minus, ct)
    g = sum(coef[:, i:i + 1].to(ct) * sl.flat(x, ct) for i, x in enumerate((fm, dxt_dt, jvp, x_t)))
    return g, sl.flat(F, ct) - fm


def reference_sums(F, F_minus, dxt_dt, jvp, x_t, t, sigma_data, warmup) -> Tensor:
    """(B, 3): per sample (sum g^2, sum d g, sum d^2), in the statistics' dtype."""
    coef = sl.scm_coefficients(t.to(sl.stat_dtype(F)), sigma_data, warmup)
    g, d = _tangent_and_difference(F, F_minus, dxt_dt, jvp, x_t, coef)
    return torch.stack([(g * g).sum(1), (d * g).sum(1), (d * d).sum(1)], 1)


def reference_backward_kernel(F, F_minus, dxt_dt, jvp, x_t, q, factor, grad) -> Tensor:
    """s_b * (d - q . (F_minus, dxt_dt, jvp, x_t)), s_b = grad * factor_b, in F's dtype."""
    g, d = _tangent_and_difference(F, F_minus, dxt_dt, jvp, x_t, q)
    return (sl.scale(grad, factor).to(g.dtype)[:, None] * (d - g)).view(F.shape).to(F.dtype)


# --------------------------------------------------------------------------- backends


def _extension_sums(F, F_minus, dxt_dt, jvp, x_t, t, sigma_data, warmup):
    return torch.ops.fastgen_C.scm_loss_sums(*(x.contiguous() for x in (F, F_minus, dxt_dt, jvp, x_t)), t,
                                             sigma_data, warmup)


def _extension_backward(F, F_minus, dxt_dt, jvp, x_t, q, factor, grad):
    return torch.ops.fastgen_C.scm_loss_backward(*(x.contiguous() for x in (F, F_minus, dxt_dt, jvp, x_t)), q,
                                                 sl.scale(grad, factor))


def _triton_sums(*args):
    from fastgen_kernels.triton_ops import scm_loss

    return scm_loss.sums(*args)


def _triton_backward(*args):
    from fastgen_kernels.triton_ops import scm_loss

    return scm_loss.backward(*args)


_SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
         "reference": reference_sums}
_BACKWARD = {"cuda": _extension_backward, "triton": _triton_backward, "cpu": _extension_backward,
             "reference": reference_backward_kernel}


def _forward_impl(backend: str):
    def forward(F, F_minus, dxt_dt, jvp, x_t, t, logvar, sigma_data, warmup, c, mean):
        t = sl.per_sample_stat(t, F)
        sums = _SUMS[backend](F, F_minus, dxt_dt, jvp, x_t, t, sigma_data, warmup)
        return sl.TAIL[backend](sums, None, t, logvar, sl.SCM, [sigma_data, warmup, c],
                                sl.numel_per_sample(F), mean)
    return forward


def _backward_impl(backend: str):
    def backward(F, F_minus, dxt_dt, jvp, x_t, q, factor, grad):
        return _BACKWARD[backend](F, F_minus, dxt_dt, jvp, x_t, q, factor, grad)
    return backward


reference_forward = _forward_impl("reference")
reference_backward = _backward_impl("reference")

forward_dispatcher = OpDispatcher(
    "fastgen.scm_loss", {name: _forward_impl(name) for name in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.scm_loss_backward", {name: _backward_impl(name) for name in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::scm_loss", mutates_args=())
def scm_loss_op(F: Tensor, F_minus: Tensor, dxt_dt: Tensor, jvp: Tensor, x_t: Tensor, t: Tensor,
                logvar: Tensor, sigma_data: float, warmup: float, c: float,
                mean: bool) -> tuple[Tensor, Tensor]:
    """(loss: the batch mean (mean) or the (B,) values of loss_b, saved (B, 6): the scale of dF,
    d loss / d u and q = p / n), in the statistics' dtype."""
    return forward_dispatcher(F, F_minus, dxt_dt, jvp, x_t, t, logvar, sigma_data, warmup, c, mean)


@torch.library.custom_op("fastgen::scm_loss_backward", mutates_args=())
def scm_loss_backward(F: Tensor, F_minus: Tensor, dxt_dt: Tensor, jvp: Tensor, x_t: Tensor,
                      q: Tensor, factor: Tensor, grad: Tensor) -> Tensor:
    """dF = grad * factor_b * (F - F_minus - q . (F_minus, dxt_dt, jvp, x_t))."""
    return backward_dispatcher(F, F_minus, dxt_dt, jvp, x_t, q, factor, grad)


scm_loss_op.register_fake(reference_forward)
scm_loss_backward.register_fake(reference_backward)
scm_loss_backward_eager = EagerOp(torch.ops.fastgen.scm_loss_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:5], output[1])
    sl.setup_loss_context(ctx, output[1])


def _backward(ctx, grad, _grad_saved):
    *inputs, saved = ctx.saved_tensors
    sl.check_first_order("scm_loss")
    dF = dlogvar = None
    if ctx.needs_input_grad[0]:
        dF = scm_loss_backward_eager(*inputs, saved[:, 2:], saved[:, 0], grad)
    if ctx.needs_input_grad[6]:
        dlogvar = sl.scale(grad, saved[:, 1])
    return dF, None, None, None, None, None, dlogvar, None, None, None, None


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
scm_loss_op.register_autograd(_backward, setup_context=_setup_context)
# native: the same kernels with the autograd above written in C++ (csrc/torch_bindings.cpp)
scm_loss_eager = EagerOp(torch.ops.fastgen.scm_loss, forward_dispatcher, _setup_context, _backward,
                         native=_extension.native_op("scm_loss"))

# --------------------------------------------------------------------------- public API


def scm_loss(F: Tensor, F_minus: Tensor, dxt_dt: Tensor, jvp: Tensor, x_t: Tensor, t: Tensor,
             logvar: Tensor, sigma_data: float = 0.5, warmup: float = 1.0, c: float = 0.1,
             reduction: str = "mean") -> Tensor:
    """sCM's loss with tangent normalization and adaptive log-variance weighting: one fused pass
    forward, one backward (the scheme and the gradients: the module doc, ``fastgen_kernels.ops.scm_loss``).

    F: (B, ...) the student's output (differentiable); F_minus, dxt_dt, jvp, x_t: same shape, dtype
    and device, constants; t: (B,) TrigFlow times in (0, pi/2); logvar: (B,) the log-variance head
    u(t) (differentiable). warmup: the factor w in [0, 1] on the JVP terms; c: the normalizer's
    offset. Per sample, over its D elements, with sigma_d = sigma_data:

        g = -cos^2 t (sigma_d F_minus - dxt_dt) - w (cos t sin t x_t + sigma_d jvp)   (the tangent)
        n = ||g||_2 / sqrt(D) + c                                     (its normalization)
        loss_b = mean_D((F - F_minus - g / n)^2) / (sigma_edm e^u) + u,  sigma_edm = sigma_d tan t

    Returns the batch mean of loss_b (``reduction="mean"``) or the (B,) vector (``"none"``), in
    fp32 (fp64 for fp64 input).
    """
    op = "scm_loss"
    F = _checks.samples(op, F=F, F_minus=F_minus, dxt_dt=dxt_dt, jvp=jvp, x_t=x_t)
    _checks.per_sample(op, "t", t, "F", F, required=True)
    _checks.per_sample(op, "logvar", logvar, "F", F, required=True)
    sigma_data = _checks.positive(op, "sigma_data", sigma_data)
    warmup = _checks.in_range(op, "warmup", warmup, 0.0, 1.0)
    c = _checks.positive(op, "c", c)
    reduction = _checks.reduction(op, reduction)
    loss, _ = scm_loss_eager(F, F_minus.detach(), dxt_dt.detach(), jvp.detach(), x_t.detach(), t.detach(),
                             logvar, sigma_data, warmup, c, reduction == "mean")
    return loss


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    F = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    t = torch.rand(2, device=device) * (math.pi / 2 - 0.1) + 0.05
    return (F, torch.randn_like(F), torch.randn_like(F), torch.randn_like(F), torch.randn_like(F), t,
            torch.randn(2, device=device), 0.5, 1.0, 0.1, True)


def example_backward_args(F, F_minus, dxt_dt, jvp, x_t, t, logvar, sigma_data, warmup, c, mean) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, saved = reference_forward(F, F_minus, dxt_dt, jvp, x_t, t, logvar, sigma_data, warmup, c, mean)
    return (F, F_minus, dxt_dt, jvp, x_t, saved[:, 2:], saved[:, 0], torch.ones((), device=F.device))
