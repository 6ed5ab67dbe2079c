r"""GAN losses on discriminator logits (DMD2's GAN branch, LADD), fused: softplus per sample.

Shapes: logits (B, ...) of any rank (a (B,) vector, (B, 1), or patch logits (B, h, w)), read as B
samples of D elements. With z = -x for the "negative" terms, per sample::

    S_b = sum_D softplus(z),   softplus(z) = max(z, 0) + log1p(e^-|z|)    (one pass, no overflow)
    generator:      loss_b = S_b(-fake) / D_fake                   (mean softplus(-D(fake)))
    discriminator:  loss_b = S_b(fake) / D_fake + S_b(-real) / D_real

One op per term: the sums, then the tail (csrc/sample_loss_tail.h) S_b / D and the batch mean.
VJP of a term with upstream gradient g (one elementwise pass; red = 1 / B for the mean)::

    dx = g * red / D * sign * sigmoid(z),   sign = -1 for a negative term, else 1

The approximate R1 penalty of DMD2 and LADD, mean (D(real_t) - D(real_t + 0.1 noise))^2, is
``denoising_loss(logits_real, logits_perturbed)``.

Custom ops: ``fastgen::softplus_loss`` -> (loss, saved), backward ``fastgen::softplus_loss_backward``.
Public API: :func:`gan_loss` (also ``fastgen_kernels.losses.gan_loss``). Shared scheme:
:mod:`fastgen_kernels.ops._sample_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen_kernels import _extension
from fastgen_kernels.backends import BACKENDS, OpDispatcher, carry_forced_backend
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.ops._eager_op import EagerOp

# --------------------------------------------------------------------------- reference


def _signed(x: Tensor, negative: bool) -> Tensor:
    """z = -x or x as (B, D) in the statistics' dtype."""
    z = sl.flat(x, sl.stat_dtype(x))
    return -z if negative else z


def reference_sums(x: Tensor, negative: bool) -> Tensor:
    """(B, 1): per sample S = sum softplus(z), in the statistics' dtype."""
    return F.softplus(_signed(x, negative)).sum(1, keepdim=True)


def reference_backward_kernel(x: Tensor, negative: bool, factor: Tensor, grad: Tensor) -> Tensor:
    """s_b * sign * sigmoid(z), s_b = grad * factor_b, in x's dtype."""
    sign = -1.0 if negative else 1.0
    return (sign * sl.scale(grad, factor)[:, None] * torch.sigmoid(_signed(x, negative))).view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------- backends


def _extension_sums(x, negative):
    return torch.ops.fastgen_C.softplus_sums(x.contiguous(), negative)


def _extension_backward(x, negative, factor, grad):
    return torch.ops.fastgen_C.softplus_backward(x.contiguous(), negative, sl.scale(grad, factor))


def _triton_sums(x, negative):
    from fastgen_kernels.triton_ops import gan_loss

    return gan_loss.sums(x, negative)


def _triton_backward(x, negative, factor, grad):
    from fastgen_kernels.triton_ops import gan_loss

    return gan_loss.backward(x, negative, factor, grad)


_SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
         "reference": reference_sums}
_BACKWARD = {"cuda": _extension_backward, "triton": _triton_backward, "cpu": _extension_backward,
             "reference": reference_backward_kernel}


def _forward_impl(backend: str):
    def forward(x, negative, mean):
        return sl.TAIL[backend](_SUMS[backend](x, negative), None, None, None, sl.SOFTPLUS, [],
                                sl.numel_per_sample(x), mean)
    return forward


def _backward_impl(backend: str):
    def backward(x, negative, factor, grad):
        return _BACKWARD[backend](x, negative, factor, grad)
    return backward


reference_forward = _forward_impl("reference")
reference_backward = _backward_impl("reference")

forward_dispatcher = OpDispatcher(
    "fastgen.softplus_loss", {name: _forward_impl(name) for name in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.softplus_loss_backward", {name: _backward_impl(name) for name in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::softplus_loss", mutates_args=())
def softplus_loss(x: Tensor, negative: bool, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss, saved): the batch mean (mean) or the (B,) values of the per-sample mean of
    softplus(-x if negative else x), and saved (B, 1) = red / D, in the statistics' dtype."""
    return forward_dispatcher(x, negative, mean)


@torch.library.custom_op("fastgen::softplus_loss_backward", mutates_args=())
def softplus_loss_backward(x: Tensor, negative: bool, factor: Tensor, grad: Tensor) -> Tensor:
    """dx = grad * factor_b * sign * sigmoid(sign * x), sign = -1 if negative else 1."""
    return backward_dispatcher(x, negative, factor, grad)


softplus_loss.register_fake(reference_forward)
softplus_loss_backward.register_fake(reference_backward)
softplus_loss_backward_eager = EagerOp(torch.ops.fastgen.softplus_loss_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])
    ctx.negative = inputs[1]
    sl.setup_loss_context(ctx, output[1])


def _backward(ctx, grad, _grad_saved):
    x, saved = ctx.saved_tensors
    sl.check_first_order("gan_loss")
    dx = None
    if ctx.needs_input_grad[0]:
        dx = softplus_loss_backward_eager(x, ctx.negative, saved[:, 0], grad)
    return dx, None, None


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
softplus_loss.register_autograd(_backward, setup_context=_setup_context)
# native: the same kernels with the autograd above written in C++ (csrc/torch_bindings.cpp)
softplus_loss_eager = EagerOp(torch.ops.fastgen.softplus_loss, forward_dispatcher, _setup_context, _backward,
                              native=_extension.native_op("softplus_loss"))

# --------------------------------------------------------------------------- public API

MODES = ("generator", "discriminator")


def _mean_softplus(x: Tensor, negative: bool, reduction: str) -> Tensor:
    """The batch mean or the (B,) per-sample means of softplus(-x if negative else x)."""
    return softplus_loss_eager(x, negative, reduction == "mean")[0]


def gan_loss(logits_fake: Tensor, logits_real: Tensor | None = None, mode: str = "generator",
             reduction: str = "mean") -> Tensor:
    """Non-saturating GAN loss on discriminator logits, one pass per logits tensor.

    generator: mean softplus(-logits_fake) (logits_real must be None); discriminator:
    mean softplus(logits_fake) + mean softplus(-logits_real). logits: (B, ...) floating tensors on
    one device (fake and real may differ in shape and dtype; "none" needs one B). Returns the batch
    mean (``reduction="mean"``: each term is the mean over its own elements) or the (B,) vector of
    per-sample means (``"none"``), in fp32 (fp64 where either logits tensor is fp64);
    differentiable in both logits.
    """
    op = "gan_loss"
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    logits_fake = _checks.samples(op, logits_fake=logits_fake)
    reduction = _checks.reduction(op, reduction)
    if mode == "generator":
        if logits_real is not None:
            raise ValueError(f"{op}: logits_real is for mode='discriminator'; the generator loss "
                             "reads logits_fake only")
        return _mean_softplus(logits_fake, True, reduction)
    if logits_real is None:
        raise ValueError(f"{op}: mode='discriminator' needs logits_real")
    logits_real = _checks.samples(op, logits_real=logits_real)
    if logits_real.device != logits_fake.device:
        raise ValueError(f"{op}: logits_real must be on logits_fake's device {logits_fake.device}, "
                         f"got {logits_real.device}")
    if reduction == "none" and logits_real.shape[0] != logits_fake.shape[0]:
        raise ValueError(f"{op}: reduction='none' needs one batch size, got logits_fake with "
                         f"B = {logits_fake.shape[0]} and logits_real with B = {logits_real.shape[0]}")
    # the terms' statistics dtypes promote: fp64 when either logits tensor is fp64
    return _mean_softplus(logits_fake, False, reduction) + _mean_softplus(logits_real, True, reduction)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    return (torch.randn(4, 1, 8, 8, device=device, dtype=dtype) * 3, True, True)


def example_backward_args(x, negative, mean) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, saved = reference_forward(x, negative, mean)
    return (x, negative, saved[:, 0], torch.ones((), device=x.device))
