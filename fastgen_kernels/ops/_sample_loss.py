r"""Shared machinery of the fused per-sample losses (``fastgen_kernels.losses``).

Every loss reads (B, ...) tensors as B samples of D = numel / B elements and follows one scheme:

- forward: ONE fused pass reduces each sample to a few sums (e.g. sum |x - T|, sum (F - T)^2), as
  deterministic partial sums per (sample, chunk) added in chunk order (csrc/sample_chunks.h); the
  per-sample loss and the per-sample factor the backward needs come from those (B, k) sums in a
  few tiny torch ops (``finish`` of each op, shared by every backend and the fake kernel);
- backward: ONE elementwise pass ``out = s_b * (a - b)`` (and optionally ``-out``) with a
  per-sample scale s_b = g_b * c_b * k / D built from the upstream gradient g_b of loss_b: the
  kernel ``sample_scaled_difference`` shared by all losses;
- the batch reduction ("mean" or "none") is plain torch on the (B,) vector, so autograd composes.

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


def per_sample_factor(weight: Tensor | None, like: Tensor) -> Tensor:
    """weight (B,) in ``like``'s dtype (a copy: op outputs may not alias inputs), or ones."""
    if weight is None:
        return torch.ones_like(like)
    return weight.to(like.dtype, memory_format=torch.contiguous_format, copy=True)


def scale(grad: Tensor, factor: Tensor, constant: float) -> Tensor:
    """s_b = g_b * c_b * constant, contiguous in the statistics' dtype."""
    return (grad.to(factor.dtype) * factor * constant).contiguous()


def reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss


# --------------------------------------------------------------------------- shared backward


def reference_scaled_difference(a: Tensor, b: Tensor, s: Tensor, negated: bool) -> tuple[Tensor, Tensor]:
    """(s_b * (a - b), its negation or an empty tensor), in a's dtype."""
    ct = stat_dtype(a)
    s = s.to(ct).reshape((-1,) + (1,) * (a.dim() - 1))
    out = s * (a.to(ct) - b.to(ct))
    neg = (-out).to(a.dtype).contiguous() if negated else a.new_empty(0)
    return out.to(a.dtype).contiguous(), neg


def extension_scaled_difference(a: Tensor, b: Tensor, s: Tensor, negated: bool) -> tuple[Tensor, Tensor]:
    return tuple(torch.ops.fastgen_C.sample_scaled_difference(
        a.contiguous(), b.contiguous(), s.contiguous(), negated))


def triton_scaled_difference(a: Tensor, b: Tensor, s: Tensor, negated: bool) -> tuple[Tensor, Tensor]:
    from fastgen_kernels.triton_ops import sample_reduce

    return sample_reduce.scaled_difference(a, b, s, negated)


SCALED_DIFFERENCE = {
    "cuda": extension_scaled_difference, "triton": triton_scaled_difference,
    "cpu": extension_scaled_difference, "reference": reference_scaled_difference,
}

SUPPORTS = {
    "cuda": _checks.loss_kernel_support,
    "triton": _checks.loss_kernel_support,
    "cpu": _checks.nonempty,
}
