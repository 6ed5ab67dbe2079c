r"""Per-sample squared residual, fused: the kernel behind the denoising, consistency and MeanFlow
losses (``fastgen_kernels.losses``), and its scaled-residual backward, also the VSD backward.

Shapes: a, b (B, ...) of one shape and dtype, read as B samples of D elements; optional c of the
same shape with a per-sample k (B,) (c and k come together). Per sample b::

    r = a - b + k_b * c                 (c absent: r = a - b)
    S_b = sum_D r^2                     (one fused pass, fp32 accumulation)
    out_b = S_b, or with huber = h > 0 the pseudo-Huber metric
    out_b = sqrt(S_b + h^2) - h = S_b / (sqrt(S_b + h^2) + h)   (no cancellation near S_b = 0)

VJP with upstream gradient g_b of out_b (one elementwise pass writing both), where
dout/dS = 1, or 1 / (2 sqrt(S + h^2)) = 1 / (2 (out + h)) with the metric::

    da = 2 g_b dout/dS r        db = -da

c and k are constants of the op (MeanFlow's JVP and t - r are stop-gradients): they get no
gradient. The scaled residual ``out = s_b * r`` (and ``-out``) is the one backward kernel of the
squared residual and of the VSD loss.

The metric lives in the op, not in torch after it, because each (B,)-sized autograd node costs
about as much host time as the kernels at training sizes on a CPU.

Custom ops: ``fastgen::squared_residual`` -> out (B,), backward ``fastgen::squared_residual_backward``.
Shared scheme: :mod:`fastgen_kernels.ops._sample_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    """(B,): per sample S = sum r^2, in the statistics' dtype."""
    return _residual(a, b, c, k).square().sum(1)


def reference_scaled_residual(a, b, c, k, s, negated: bool) -> tuple[Tensor, Tensor]:
    """(s_b * r, its negation or an empty tensor), in a's dtype and shape."""
    out = (sl.per_sample_stat(s, a).view(-1, 1) * _residual(a, b, c, k)).view(a.shape)
    neg = (-out).to(a.dtype) if negated else a.new_empty(0)
    return out.to(a.dtype), neg


# --------------------------------------------------------------------------- backends


def _per_sample_k(a: Tensor, k: Tensor | None) -> Tensor | None:
    return None if k is None else sl.per_sample_stat(k, a)


def _contiguous(c: Tensor | None) -> Tensor | None:
    return None if c is None else c.contiguous()


def _extension_sums(a, b, c, k):
    return torch.ops.fastgen_C.squared_residual_sums(a.contiguous(), b.contiguous(), _contiguous(c),
                                                     _per_sample_k(a, k))[:, 0]


def _extension_scaled_residual(a, b, c, k, s, negated):
    return tuple(torch.ops.fastgen_C.scaled_residual(
        a.contiguous(), b.contiguous(), _contiguous(c), _per_sample_k(a, k), sl.per_sample_stat(s, a),
        negated))


def _triton_sums(a, b, c, k):
    from fastgen_kernels.triton_ops import squared_residual

    return squared_residual.sums(a, b, c, _per_sample_k(a, k))


def _triton_scaled_residual(a, b, c, k, s, negated):
    from fastgen_kernels.triton_ops import squared_residual

    return squared_residual.scaled_residual(a, b, c, _per_sample_k(a, k), sl.per_sample_stat(s, a),
                                            negated)


SUMS = {"cuda": _extension_sums, "triton": _triton_sums, "cpu": _extension_sums,
        "reference": reference_sums}


def pseudo_huber(S: Tensor, huber: float) -> Tensor:
    """out_b from S_b (the identity for huber = 0): every backend's last step."""
    return S / (torch.sqrt(S + huber * huber) + huber) if huber > 0 else S


def _forward_impl(backend: str):
    def forward(a, b, c, k, huber):
        return pseudo_huber(SUMS[backend](a, b, c, k), huber)
    return forward


def reference_forward(a, b, c, k, huber: float) -> Tensor:
    return _forward_impl("reference")(a, b, c, k, huber)

# out = s_b * r (and -out): the backward kernel of this op and of the VSD loss, per backend
SCALED_RESIDUAL = {"cuda": _extension_scaled_residual, "triton": _triton_scaled_residual,
                   "cpu": _extension_scaled_residual, "reference": reference_scaled_residual}


def _backward_impl(backend: str):
    def backward(a, b, c, k, grad, b_grad):
        s = sl.scale(grad, None, 2.0, sl.stat_dtype(a))
        return SCALED_RESIDUAL[backend](a, b, c, k, s, b_grad)
    return backward


def reference_backward(a, b, c, k, grad, b_grad: bool) -> tuple[Tensor, Tensor]:
    """(da, db or an empty tensor unless b_grad), in the inputs' dtype."""
    return _backward_impl("reference")(a, b, c, k, grad, b_grad)


forward_dispatcher = OpDispatcher(
    "fastgen.squared_residual", {name: _forward_impl(name) for name in BACKENDS}, sl.SUPPORTS)
backward_dispatcher = OpDispatcher(
    "fastgen.squared_residual_backward", {name: _backward_impl(name) for name in BACKENDS}, sl.SUPPORTS)

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::squared_residual", mutates_args=())
def squared_residual(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None, huber: float) -> Tensor:
    """S_b = sum over sample b of (a - b + k_b c)^2, or its pseudo-Huber metric when huber > 0;
    (B,) in the statistics' dtype."""
    return forward_dispatcher(a, b, c, k, huber)


@torch.library.custom_op("fastgen::squared_residual_backward", mutates_args=())
def squared_residual_backward(a: Tensor, b: Tensor, c: Tensor | None, k: Tensor | None, grad: Tensor,
                              b_grad: bool) -> tuple[Tensor, Tensor]:
    """(da, db) = (2 g_b r, -2 g_b r); db is empty unless b_grad."""
    return backward_dispatcher(a, b, c, k, grad, b_grad)


squared_residual.register_fake(reference_forward)
squared_residual_backward.register_fake(reference_backward)
squared_residual_backward_eager = EagerOp(torch.ops.fastgen.squared_residual_backward, backward_dispatcher)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.huber = inputs
    ctx.save_for_backward(*tensors, output)


def _backward(ctx, grad):
    a, b, c, k, out = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1]):
        return None, None, None, None, None
    if ctx.huber > 0:
        grad = grad / (2 * (out + ctx.huber))
    da, db = squared_residual_backward_eager(a, b, c, k, grad, needs[1])
    return da if needs[0] else None, db if needs[1] else None, None, None, None


_setup_context, _backward = carry_forced_backend(_setup_context, _backward)
squared_residual.register_autograd(_backward, setup_context=_setup_context)
squared_residual_eager = EagerOp(torch.ops.fastgen.squared_residual, forward_dispatcher, _setup_context,
                                 _backward)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the forward op, for `fastgen-kernels info`."""
    a = torch.randn(2, 3, 16, 16, device=device, dtype=dtype)
    return (a, torch.randn_like(a), torch.randn_like(a), torch.rand(2, device=device), 0.0)


def example_backward_args(a, b, c, k, huber) -> tuple:
    """Arguments of the backward op matching ``example_args``."""
    return (a, b, c, k, torch.ones(a.shape[0], device=a.device), True)
