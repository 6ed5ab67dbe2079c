r"""Sums and products with constants under forward-mode AD, without PyTorch's zero tangents.

For y = x + c or y = x * c where c carries no tangent, PyTorch's forward-mode rule gives c a
zero tangent (an "efficient zero tensor") and evaluates ty = tx + 0 or tx * c + x * 0. The zero
tensor's kernels size their results by running the op again on meta tensors, and those meta
kernels are Python (torch._meta_registrations): 0.1-0.25 ms of host time per op on a CPU, on any
device, against a few microseconds for the op. A DiT's input path has several such ops (position
table, class embedding, time scaling, sinusoidal frequencies) in every exact JVP of the
distillation methods. Here the tangent is formed directly: ty = tx, or tx * c.

Outside forward-mode AD (and under functorch transforms, which do not use dual tensors, or
torch.compile) these are plain ``x + c`` and ``x * c``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def _dual_parts(x: Tensor, constant: Tensor | float) -> tuple[Tensor, Tensor] | None:
    """(primal, tangent) of x when x is a dual tensor of the open level and ``constant`` is not
    (then the helpers form the tangent themselves), else None."""
    if (forward_ad._current_level < 0 or torch._C._are_functorch_transforms_active()
            or torch.compiler.is_compiling()):
        return None
    primal, tangent = forward_ad.unpack_dual(x)
    if tangent is None or (isinstance(constant, Tensor) and forward_ad.unpack_dual(constant).tangent is not None):
        return None
    return primal, tangent


def add_constant(x: Tensor, constant: Tensor | float) -> Tensor:
    """x + constant (broadcast); the tangent is x's (broadcast to the sum's shape and dtype)."""
    parts = _dual_parts(x, constant)
    if parts is None:
        return x + constant
    primal, tangent = parts
    out = primal + constant
    return forward_ad.make_dual(out, tangent.to(out.dtype).expand(out.shape))


def mul_constant(x: Tensor, constant: Tensor | float) -> Tensor:
    """x * constant (broadcast); the tangent is x's tangent * constant."""
    parts = _dual_parts(x, constant)
    if parts is None:
        return x * constant
    primal, tangent = parts
    out = primal * constant
    return forward_ad.make_dual(out, (tangent * constant).to(out.dtype))
