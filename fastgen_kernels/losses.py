r"""Fused distillation losses (DMD2, consistency models, sCM, MeanFlow, GANs): one fused reduction
pass forward and one elementwise pass backward each, on the cuda, triton, cpu or reference
backend chosen per call.

Inputs are (B, ...) tensors of any rank, float16/bfloat16/float32 (float64 on cpu and reference),
accumulated in fp32; per-sample scalars are (B,) tensors. Each loss returns the batch mean
(``reduction="mean"``) or the per-sample (B,) vector (``reduction="none"``), in fp32 (fp64 for
fp64 input). Stop-gradients of the methods are built in: teacher outputs, consistency and
MeanFlow targets and JVPs never get a gradient (the denoising loss's target does, where it
requires one).

- :func:`vsd_loss`: DMD2's distribution matching (VSD), with f-Distill's per-sample weight;
- :func:`consistency_loss`: consistency models (CT/CD, ECT), pseudo-Huber or L2;
- :func:`scm_loss`: sCM, tangent normalization and adaptive log-variance weighting;
- :func:`meanflow_loss`: MeanFlow's adaptive loss on u - sg(v - (t - r) J);
- :func:`denoising_loss`: weighted per-sample MSE (teacher SFT, DMD2's fake-score update, R1);
- :func:`gan_loss`: softplus generator / discriminator terms on logits.

Each loss is one custom op from its inputs to its result, with the (B,)-sized arithmetic after the
per-sample sums (weights, metrics, adaptive weighting, the batch mean) in one launch of its own
(ops/_sample_loss.py). The denoising, consistency and MeanFlow losses are one op,
``fastgen::squared_residual_loss``, over the per-sample squared residual
S_b = sum_D (a - b + k_b c)^2.
"""

from __future__ import annotations

import math

from torch import Tensor

from fastgen_kernels.ops import _checks
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.ops.gan_loss import gan_loss
from fastgen_kernels.ops.scm_loss import scm_loss
from fastgen_kernels.ops.squared_residual import squared_residual_loss_eager
from fastgen_kernels.ops.vsd_loss import vsd_loss

__all__ = ["consistency_loss", "denoising_loss", "gan_loss", "meanflow_loss", "scm_loss", "vsd_loss"]

METRICS = ("pseudo_huber", "l2")


def _squared_residual_loss(a: Tensor, b: Tensor, c: Tensor | None = None, k: Tensor | None = None,
                           weight: Tensor | None = None, scale: float = 1.0, huber: float = 0.0,
                           power: float = 0.0, offset: float = 0.0, reduction: str = "mean") -> Tensor:
    return squared_residual_loss_eager(a, b, c, k, weight, scale, huber, power, offset, reduction == "mean")[0]


def denoising_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                   reduction: str = "mean") -> Tensor:
    """Weighted per-sample mean squared error: loss_b = weight_b * mean_D (pred - target)^2.

    pred, target: (B, ...) of one shape, dtype and device, both differentiable (a target that
    requires grad gets one, from the same backward pass); weight: optional (B,) per-sample weight,
    e.g. weight(t) of the noise level, any float dtype.
    """
    op = "denoising_loss"
    pred = _checks.samples(op, pred=pred, target=target)
    _checks.per_sample(op, "weight", weight, "pred", pred)
    reduction = _checks.reduction(op, reduction)
    return _squared_residual_loss(pred, target, weight=weight, scale=1.0 / sl.numel_per_sample(pred),
                                  reduction=reduction)


def consistency_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                     metric: str = "pseudo_huber", c: float | None = None,
                     reduction: str = "mean") -> Tensor:
    """Consistency-model loss: loss_b = weight_b * d(pred_b, sg(target_b)).

    d is the pseudo-Huber metric sqrt(||pred - target||^2 + c^2) - c (default c = 0.00054 sqrt(D),
    iCT's choice; computed as S / (sqrt(S + c^2) + c), without the cancellation near S = 0) or the
    squared Euclidean distance ||pred - target||^2 (``metric="l2"``, Song 2023's L2), summed over
    the sample's D elements. pred: (B, ...) D_theta(y_t, t), differentiable; target: same shape,
    D_theta-(y_r, r), a stop-gradient; weight: optional (B,) lambda(t, r), e.g. 1 / (t - r).
    """
    op = "consistency_loss"
    pred = _checks.samples(op, pred=pred, target=target)
    _checks.per_sample(op, "weight", weight, "pred", pred)
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if metric == "l2" and c is not None:
        raise ValueError(f"{op}: c is the pseudo-Huber constant; metric='l2' takes none")
    D = sl.numel_per_sample(pred)
    # c^2 is formed in fp32: c at least the square root of its smallest normal
    c = 0.00054 * math.sqrt(D) if c is None else _checks.positive(op, "c", c, math.sqrt(_checks.FP32_TINY))
    reduction = _checks.reduction(op, reduction)
    return _squared_residual_loss(pred, target.detach(), weight=weight, huber=0.0 if metric == "l2" else c,
                                  reduction=reduction)


def meanflow_loss(u: Tensor, v: Tensor, jvp: Tensor, t: Tensor, r: Tensor, p: float = 1.0,
                  c: float = 1e-3, reduction: str = "mean") -> Tensor:
    """MeanFlow's adaptive loss: with Delta = u - sg(v - (t - r) J) and e = sum_D Delta^2,
    loss_b = sg(1 / (e + c)^p) * e.

    u: (B, ...) the network's average velocity u_theta(x_t, r, t), differentiable; v (the
    instantaneous velocity, eps - x0 or the teacher's), jvp (J, the JVP of u_theta- along
    (v, 0, 1)): same shape, dtype and device, constants; t, r: (B,) times. p >= 0 (1, or 0.75 on
    small data), c > 0.
    """
    op = "meanflow_loss"
    u = _checks.samples(op, u=u, v=v, jvp=jvp)
    _checks.per_sample(op, "t", t, "u", u, required=True)
    _checks.per_sample(op, "r", r, "u", u, required=True)
    p = _checks.non_negative(op, "p", p)
    c = _checks.positive(op, "c", c)
    reduction = _checks.reduction(op, reduction)
    k = t.detach().to(sl.stat_dtype(u)) - r.detach().to(sl.stat_dtype(u))
    return _squared_residual_loss(u, v.detach(), jvp.detach(), k, power=p, offset=c, reduction=reduction)
