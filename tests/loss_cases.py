"""The fused losses as test cases: for each, an fp64 oracle written straight from the papers'
formulas (per-sample losses, the methods' own compositions with their stop-gradients), random
inputs, and which inputs are differentiable. Shared by test_losses.py and test_gpu.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastgen_kernels import losses

# (B, ...) shapes: odd D = 3*37*37, B = 1, rank 2 and rank 4
SHAPES = [(2, 3, 37, 37), (1, 5), (3, 4, 8, 8)]


def randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def uniform(batch, generator, low, high):
    """(B,) fp32 values in [low, high)."""
    return (torch.rand(batch, generator=generator, dtype=torch.float64) * (high - low) + low).float()


def _dims(x):
    return tuple(range(1, x.dim()))


def _view(v, x):
    """A (B,) per-sample value broadcast against x."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


# --------------------------------------------------------------------------- oracles (fp64)


def vsd_oracle(x_g, x0_teacher, x0_fake, weight=None, eps=1e-6):
    """DMD2: w = 1 / (mean_D |x_g - T| + eps), grad = (Fk - T) * w * h,
    loss = 0.5 * mean_D (x_g - sg(x_g - grad))^2."""
    w = 1 / ((x_g - x0_teacher).abs().mean(_dims(x_g), keepdim=True) + eps)
    h = 1 if weight is None else _view(weight, x_g)
    grad = (x0_fake - x0_teacher) * (w * h).detach()
    target = (x_g - grad).detach()
    return 0.5 * (x_g - target).square().mean(_dims(x_g))


def denoising_oracle(pred, target, weight=None):
    """SFT: weight(t) * ||pred - target||^2 / D."""
    per_sample = (pred - target).square().mean(_dims(pred))
    return per_sample if weight is None else weight * per_sample


def consistency_oracle(pred, target, weight=None, metric="pseudo_huber", c=None):
    """CM: lambda * d(pred, sg(target)), d = sqrt(||a - b||^2 + c^2) - c or ||a - b||^2."""
    sq = (pred - target.detach()).square().sum(_dims(pred))
    if metric == "pseudo_huber":
        c = 0.00054 * math.sqrt(pred[0].numel()) if c is None else c
        sq = torch.sqrt(sq + c * c) - c
    return sq if weight is None else weight * sq


def meanflow_oracle(u, v, jvp, t, r, p=1.0, c=1e-3):
    """MeanFlow: Delta = u - sg(v - (t - r) J), e = sum_D Delta^2, loss = sg(1 / (e + c)^p) * e."""
    target = (v - _view(t - r, u) * jvp).detach()
    e = (u - target).square().sum(_dims(u))
    return (1 / (e + c) ** p).detach() * e


def scm_oracle(F, F_minus, dxt_dt, jvp, x_t, t, logvar, sigma_data=0.5, warmup=1.0, c=0.1):
    """sCM: g = -cos^2 t (sigma_d F- - dx_t/dt) - w (cos t sin t x_t + sigma_d J), normalized per
    sample by ||g|| / sqrt(D) + c; loss = (1 / sigma_edm) mean_D (F - F- - g)^2 / e^u + u."""
    cos, sin = _view(torch.cos(t), F), _view(torch.sin(t), F)
    F_minus, dxt_dt, jvp, x_t = (x.detach() for x in (F_minus, dxt_dt, jvp, x_t))
    g = -cos**2 * (sigma_data * F_minus - dxt_dt) - warmup * (cos * sin * x_t + sigma_data * jvp)
    norm = g.flatten(1).norm(dim=1) / math.sqrt(F[0].numel())
    g = g / _view(norm + c, F)
    sigma_edm = sigma_data * torch.tan(t)
    return (F - F_minus - g).square().mean(_dims(F)) / sigma_edm / torch.exp(logvar) + logvar


def gan_oracle(logits_fake, logits_real=None, mode="generator"):
    """Generator: mean softplus(-D(fake)); discriminator: mean softplus(D(fake)) +
    mean softplus(-D(real)), per sample."""
    if mode == "generator":
        return F.softplus(-logits_fake).mean(_dims(logits_fake))
    return F.softplus(logits_fake).mean(_dims(logits_fake)) + F.softplus(-logits_real).mean(_dims(logits_real))


# --------------------------------------------------------------------------- cases


@dataclass
class LossCase:
    fn: Callable
    oracle: Callable
    tensors: list[str]  # (B, ...) inputs, all of one shape
    differentiable: list[str]
    per_sample: Callable[[int, torch.Generator], dict] = lambda batch, generator: {}
    kwargs: dict = field(default_factory=dict)
    # the gradient is the true derivative of the value (no stop-gradient inside): gradcheck applies
    exact_gradient: bool = True
    # how F_minus relates to F (sCM): None, or a scale of the offset added to F
    offset: dict = field(default_factory=dict)

    def make_inputs(self, shape, dtype, generator, scale=1.0) -> dict:
        inputs = {name: randn(shape, dtype, generator, scale) for name in self.tensors}
        for name, (source, size) in self.offset.items():  # e.g. F_minus = F + noise
            inputs[name] = (inputs[source].double() + size * randn(shape, torch.float64, generator, scale)).to(dtype)
        return inputs | self.per_sample(shape[0], generator)


def _weight(batch, generator):
    return {"weight": uniform(batch, generator, 0.5, 1.5)}


def _times(batch, generator):
    t = uniform(batch, generator, 0.05, 1.0)
    return {"t": t, "r": t * uniform(batch, generator, 0.0, 1.0)}


def _trigflow(batch, generator):
    return {"t": uniform(batch, generator, 0.05, 1.5), "logvar": uniform(batch, generator, -1.0, 1.0)}


SCM_TENSORS = ["F", "F_minus", "dxt_dt", "jvp", "x_t"]

CASES = {
    "vsd": LossCase(losses.vsd_loss, vsd_oracle, ["x_g", "x0_teacher", "x0_fake"], ["x_g"], _weight,
                    exact_gradient=False),
    "vsd_h1": LossCase(losses.vsd_loss, vsd_oracle, ["x_g", "x0_teacher", "x0_fake"], ["x_g"],
                       exact_gradient=False),
    "denoising": LossCase(losses.denoising_loss, denoising_oracle, ["pred", "target"],
                          ["pred", "target", "weight"], _weight),
    "consistency": LossCase(losses.consistency_loss, consistency_oracle, ["pred", "target"],
                            ["pred", "weight"], _weight),
    "consistency_l2": LossCase(losses.consistency_loss, consistency_oracle, ["pred", "target"], ["pred"],
                               kwargs={"metric": "l2"}),
    "meanflow": LossCase(losses.meanflow_loss, meanflow_oracle, ["u", "v", "jvp"], ["u"], _times,
                         exact_gradient=False),
    "meanflow_p075": LossCase(losses.meanflow_loss, meanflow_oracle, ["u", "v", "jvp"], ["u"], _times,
                              kwargs={"p": 0.75, "c": 0.01}, exact_gradient=False),
    # training: F_minus is F's value (d = 0); and F_minus from another evaluation (d != 0)
    "scm": LossCase(losses.scm_loss, scm_oracle, ["F", "dxt_dt", "jvp", "x_t"], ["F", "logvar"], _trigflow,
                    offset={"F_minus": ("F", 0.0)}),
    "scm_offset": LossCase(losses.scm_loss, scm_oracle, ["F", "dxt_dt", "jvp", "x_t"], ["F", "logvar"],
                           _trigflow, kwargs={"warmup": 0.3, "sigma_data": 1.0, "c": 0.05},
                           offset={"F_minus": ("F", 0.3)}),
    "gan_generator": LossCase(losses.gan_loss, gan_oracle, ["logits_fake"], ["logits_fake"]),
    "gan_discriminator": LossCase(losses.gan_loss, gan_oracle, ["logits_fake", "logits_real"],
                                  ["logits_fake", "logits_real"], kwargs={"mode": "discriminator"}),
}
