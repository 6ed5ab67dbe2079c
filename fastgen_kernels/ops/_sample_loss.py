r"""Shared machinery of the fused per-sample losses (``fastgen_kernels.losses``).

Every loss reads (B, ...) tensors as B samples of D = numel / B elements and follows one scheme:

- forward: ONE fused pass reduces each sample to a few sums (e.g. sum |x - T|, sum (F - T)^2), as
  deterministic partial sums per (sample, chunk) added in chunk order (csrc/sample_chunks.h); the
  per-sample loss and the per-sample factor the backward needs come from those (B, k) sums in a
  few tiny torch ops (``finish`` of each op, shared by every backend and the fake kernel);
- backward: ONE elementwise pass, e.g. ``out = s_b * (a - b)``, with a per-sample scale s_b
  built from the upstream gradient g_b of the op's per-sample output;
- what follows the sums and is only (B,)-sized (weights, the pseudo-Huber metric, MeanFlow's
  adaptive weight, sCM's log-variance weighting) and the batch reduction ("mean" or "none") is
  plain torch on (B,) vectors, so autograd composes it with the op.

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


def scale(grad: Tensor, factor: Tensor | None, constant: float, dtype: torch.dtype) -> Tensor:
    """s_b = g_b * c_b * constant (c_b = 1 when factor is None), contiguous, in ``dtype`` (the
    statistics' dtype)."""
    s = grad.to(dtype) * constant
    return (s if factor is None else s * factor).contiguous()


def per_sample_stat(value: Tensor, like: Tensor) -> Tensor:
    """A (B,) or (B, k) per-sample tensor as the kernels read it: contiguous, in the statistics'
    dtype of ``like``."""
    return value.to(stat_dtype(like)).contiguous()


def reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss


SUPPORTS = {
    "cuda": _checks.loss_kernel_support,
    "triton": _checks.loss_kernel_support,
    "cpu": _checks.nonempty,
}
