r"""Shared machinery of the fused per-sample losses (``fastgen_kernels.losses``).

Every loss reads (B, ...) tensors as B samples of D = numel / B elements, is ONE custom op from its
inputs to its result (the batch mean, or the (B,) vector for ``reduction="none"``) and follows one
scheme, so a forward + backward costs a handful of kernel launches whatever its formula:

- forward: a fused pass reduces each sample to a few sums (e.g. sum |x - T|, sum (F - T)^2), as
  deterministic partial sums per (sample, chunk) added in chunk order (csrc/sample_chunks.h); then
  the loss's *tail* (:func:`tail`, csrc/sample_loss_tail.h), one launch over the batch, turns the
  sums and the per-sample inputs (weights, times, log-variance) into each sample's loss, the batch
  mean, and the per-sample factors the backward needs (``saved``, (B, k)), which already contain
  the reduction's 1 / B;
- backward: one elementwise pass, e.g. ``out = s_b * (a - b)``, with s_b = g * saved_b for the
  upstream gradient g (a scalar, or (B,) for "none"); gradients of (B,) inputs (a weight, sCM's
  log-variance) are g * saved_b as well.

Statistics and per-sample values are fp32 (fp64 for fp64 input, what gradcheck uses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels.ops import _checks


def stat_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def flat(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(B, ...) -> (B, D), in ``dtype`` when given."""
    x = x.reshape(x.shape[0], -1)
    return x if dtype is None else x.to(dtype)


def numel_per_sample(x: Tensor) -> int:
    return x.numel() // x.shape[0]


def scale(grad: Tensor, factor: Tensor) -> Tensor:
    """s_b = g * factor_b for the upstream gradient g, () or (B,): (B,) contiguous, in the
    factor's dtype (the statistics')."""
    return (factor * grad.to(factor.dtype)).contiguous()


def setup_loss_context(ctx, saved: Tensor) -> None:
    """For a loss op's setup_context: its saved factors (the op's second output) are constants."""
    ctx.mark_non_differentiable(saved)


def check_first_order(op: str) -> None:
    """In a loss op's backward: the gradients are grad * saved factor * (inputs), and the factors
    come from the kernels without a derivative of their own, so a create_graph=True backward raises
    instead of returning gradients that would differentiate as if the factors were constants (as
    the native C++ autograd does, ``loss_gradient_flows``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the fused loss has no second derivative (create_graph=True)")


def per_sample_stat(value: Tensor, like: Tensor) -> Tensor:
    """A (B,) or (B, k) per-sample tensor as the kernels read it: contiguous, in the statistics'
    dtype of ``like``."""
    return value.to(stat_dtype(like)).contiguous()


# --------------------------------------------------------------------------- tails

# The tails of csrc/sample_loss_tail.h: kind -> (name, sums read per sample, values saved per sample)
SQUARED, VSD, SOFTPLUS, SCM = 0, 1, 2, 3
TAIL_WIDTHS = {SQUARED: (1, 2), VSD: (2, 1), SOFTPLUS: (1, 1), SCM: (3, 6)}


def scm_coefficients(t: Tensor, sigma_data: float, warmup: float) -> Tensor:
    """p (B, 4) with sCM's tangent g = p . (F_minus, dxt_dt, jvp, x_t), in t's dtype."""
    cos, sin = torch.cos(t), torch.sin(t)
    return torch.stack([-cos * cos * sigma_data, cos * cos, torch.full_like(t, -warmup * sigma_data),
                        -warmup * cos * sin], 1)


def reference_tail(sums: Tensor, weight: Tensor | None, t: Tensor | None, logvar: Tensor | None,
                   kind: int, params: list[float], numel: int, mean: bool) -> tuple[Tensor, Tensor]:
    """(loss: () if mean else (B,), saved (B, k)) from the sums (B, n): csrc/sample_loss_tail.h in
    torch, in the sums' dtype."""
    params = list(params) + [0.0] * (4 - len(params))
    D, red = float(numel), 1.0 / sums.shape[0] if mean else 1.0
    per_sample = [None if v is None else v.to(sums.dtype) for v in (weight, t, logvar)]
    w = torch.ones_like(sums[:, 0]) if per_sample[0] is None else per_sample[0]
    if kind == SQUARED:
        scale, huber, power, offset = params
        S = sums[:, 0]
        m, dm = S, torch.ones_like(S)
        if huber > 0:
            root = torch.sqrt(S + huber * huber)
            m, dm = S / (root + huber), 1 / (2 * root)
        adaptive = (m + offset).pow(-power) if power != 0 else torch.ones_like(S)
        loss = w * scale * adaptive * m
        saved = [2 * red * w * scale * adaptive * dm, red * scale * adaptive * m]
    elif kind == VSD:
        c = 1 / (sums[:, 0] / D + params[0]) * w
        loss = 0.5 * c * c * sums[:, 1] / D
        saved = [red * c / D]
    elif kind == SOFTPLUS:
        loss = sums[:, 0] / D
        saved = [torch.full_like(loss, red / D)]
    else:  # SCM
        sigma_data, warmup, c = params[:3]
        t, u = per_sample[1], per_sample[2]
        n = 1 / (torch.sqrt(sums[:, 0] / D) + c)
        S = (sums[:, 2] - 2 * sums[:, 1] * n + sums[:, 0] * n * n).clamp_min(0)
        k = torch.exp(-u) / (D * (sigma_data * torch.tan(t)).clamp_min(1e-6))  # no zero denominators
        k = torch.where(torch.cos(t) <= 0, 0.0, k)  # t at pi/2 (or past it, rounded): 1 / sigma -> 0
        loss = S * k + u
        saved = [2 * red * k, red * (1 - S * k), *(n[:, None] * scm_coefficients(t, sigma_data, warmup)).unbind(1)]
    return (loss.sum() / sums.shape[0] if mean else loss), torch.stack(saved, 1)


def _kernel_inputs(sums: Tensor, *per_sample: Tensor | None) -> list[Tensor | None]:
    """The per-sample inputs of a tail kernel, as the kernels read them (per_sample_stat)."""
    return [None if v is None else per_sample_stat(v, sums) for v in per_sample]


def _extension_tail(sums, weight, t, logvar, kind, params, numel, mean):
    return torch.ops.fastgen_C.sample_loss_tail(sums, *_kernel_inputs(sums, weight, t, logvar), kind, params,
                                                numel, mean)


def _triton_tail(partials, weight, t, logvar, kind, params, numel, mean):
    from fastgen_kernels.triton_ops import sample_loss_tail

    return sample_loss_tail.tail(partials, *_kernel_inputs(partials, weight, t, logvar), kind, params, numel, mean)


TAIL = {"cuda": _extension_tail, "triton": _triton_tail, "cpu": _extension_tail, "reference": reference_tail}


SUPPORTS = {
    "cuda": _checks.loss_kernel_support,
    "triton": _checks.loss_kernel_support,
    "cpu": _checks.nonempty,
}
