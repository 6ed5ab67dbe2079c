r"""Denoising (score-matching) loss, fused: the teacher's SFT loss and DMD2's fake-score update.

Shapes: pred, target (B, ...) of one shape and dtype, read as B samples of D elements; weight
w: (B,) or None (w = 1), e.g. weight(t) of the noise level. Per sample b::

    S = sum_D (pred - target)^2        (one fused pass, fp32)
    loss_b = w_b * S / D

VJP with upstream gradient g_b of loss_b (one elementwise pass writing both)::

    dpred = g_b * w_b * 2 (pred - target) / D        dtarget = -dpred

target gets its gradient only when it requires one; weight is a constant (no gradient).

Public API: :func:`denoising_loss` (also ``fastgen_kernels.losses.denoising_loss``), running the
custom op ``fastgen::denoising_loss`` -> (loss_b, w_b) (backward:
``fastgen::denoising_loss_backward``). Shared scheme and backward kernel:
:mod:`fastgen_kernels.ops._sample_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels.backends import BACKENDS, OpDispatcher
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops import _sample_loss as sl

# --------------------------------------------------------------------------- reference


def reference_sums(pred: Tensor, target: Tensor) -> Tensor:
    """(B, 1): per sample S, in the statistics' dtype."""
    ct = sl.stat_dtype(pred)
    return (sl.flat(pred, ct) - sl.flat(target, ct)).square().sum(1, keepdim=True)


def finish(sums: Tensor, weight: Tensor | None, D: int) -> tuple[Tensor, Tensor]:
    """(loss_b, w_b) from the per-sample sums: every backend's last step."""
    w = sl.per_sample_factor(weight, sums[:, 0])
    return w * sums[:, 0] / D, w


def reference_forward(pred: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    return finish(reference_sums(pred, target), weight, sl.numel_per_sample(pred))


def reference_backward(pred: Tensor, target: Tensor, factor: Tensor, grad: Tensor,
                       target_grad: bool) -> tuple[Tensor, Tensor]:
    """(dpred, dtarget or an empty tensor when not target_grad), in the inputs' dtype."""
    return _backward_impl("reference")(pred, target, factor, grad, target_grad)


# --------------------------------------------------------------------------- backends


def _extension_sums(pred, target):
    return torch.ops.fastgen_C.denoising_loss_sums(pred.contiguous(), target.contiguous())


def _triton_sums(*args):
    from fastgen_kernels.triton_ops import denoising_loss

    return denoising_loss.sums(*args)


_SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
         "reference": reference_sums}


def _forward_impl(backend: str):
    def forward(pred, target, weight):
        return finish(_SUMS[backend](pred, target), weight, sl.numel_per_sample(pred))
    return forward


def _backward_impl(backend: str):
    def backward(pred, target, factor, grad, target_grad):
        s = sl.scale(grad, factor, 2.0 / sl.numel_per_sample(pred))
        return sl.SCALED_DIFFERENCE[backend](pred, target, s, target_grad)
    return backward


forward_dispatcher = OpDispatcher(
    "fastgen.denoising_loss", {b: _forward_impl(b) for b in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.denoising_loss_backward", {b: _backward_impl(b) for b in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::denoising_loss", mutates_args=())
def denoising_loss_op(pred: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(loss_b, w_b), both (B,) in the statistics' dtype."""
    return forward_dispatcher(pred, target, weight)


@torch.library.custom_op("fastgen::denoising_loss_backward", mutates_args=())
def denoising_loss_backward(pred: Tensor, target: Tensor, factor: Tensor, grad: Tensor,
                            target_grad: bool) -> tuple[Tensor, Tensor]:
    """(dpred, dtarget) = +-grad_b * factor_b * 2 (pred - target) / D; dtarget is empty unless
    target_grad."""
    return backward_dispatcher(pred, target, factor, grad, target_grad)


denoising_loss_op.register_fake(reference_forward)
denoising_loss_backward.register_fake(reference_backward)


def _setup_context(ctx, inputs, output) -> None:
    pred, target, _ = inputs
    ctx.save_for_backward(pred, target, output[1])


def _backward(ctx, grad_loss, _grad_factor):
    pred, target, factor = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1]):
        return None, None, None
    dpred, dtarget = torch.ops.fastgen.denoising_loss_backward(pred, target, factor, grad_loss,
                                                               needs[1])
    return dpred if needs[0] else None, dtarget if needs[1] else None, None


denoising_loss_op.register_autograd(_backward, setup_context=_setup_context)

# --------------------------------------------------------------------------- public API


def denoising_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                   reduction: str = "mean") -> Tensor:
    """Weighted per-sample mean squared error in one pass: loss_b = weight_b * mean_D (pred -
    target)^2.

    pred, target: (B, ...) of one shape, dtype and device; weight: optional (B,) per-sample weight,
    any float dtype, no gradient. Returns the batch mean (``reduction="mean"``) or the (B,) vector
    (``"none"``) in fp32 (fp64 for fp64 input); differentiable in pred and target.
    """
    op = "denoising_loss"
    pred = _checks.samples(op, pred=pred, target=target)
    _checks.per_sample(op, "weight", weight, "pred", pred)
    reduction = _checks.reduction(op, reduction)
    loss, _ = torch.ops.fastgen.denoising_loss(pred, target,
                                               None if weight is None else weight.detach())
    return sl.reduce(loss, reduction)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    return (x, torch.randn_like(x), torch.rand(2, device=device))


def example_backward_args(pred, target, weight) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    _, factor = reference_forward(pred, target, weight)
    return (pred, target, factor, torch.ones_like(factor), True)
