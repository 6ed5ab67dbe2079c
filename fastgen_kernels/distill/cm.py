"""Consistency models: consistency training (CT) and distillation (CD), with ECT's curriculum
(Song et al. 2023; Geng et al. 2024).

One shared eps per sample: y_t = alpha(t) x0 + sigma(t) eps and a smaller time r < t with
EDM noise level (sigma / alpha)

    sigma_r = sigma_t * (1 - max(q^-stage, min_gap) * n(sigma_t)),  n(s) = 1 + 8 sigmoid(-s),
    stage = iteration // stage_iterations

(clamped at 0, so training starts as plain denoising and r approaches t as stages advance, to
min_gap: without a floor r rounds to t in fp32 after about 25 halvings, and the loss is 0).
CT: y_r = alpha(r) x0 + sigma(r) eps. CD: y_r = y_t + (r - t) * u_T(y_t, t), one Euler step of the
teacher's (guided) probability-flow ODE. The loss is

    mean_b lambda_b d(D_theta(y_t, t), sg(D_theta(y_r, r))),   lambda = 1 / (sigma_t - sigma_r)

with sigma_r that of r as the network sees it (rounded to t's dtype), d pseudo-Huber
(c = 0.00054 sqrt(D)) or L2, and D at r = 0 the identity (D(y_0, 0) = y_0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fastgen_kernels import losses
from fastgen_kernels.distill.base import Batch, Method, drop_labels, noised, teacher_x0
from fastgen_kernels.schedules import per_sample, safe_denominator


@dataclass(frozen=True)
class CMConfig:
    mode: Literal["ct", "cd"] = "ct"
    metric: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = None       # default 0.00054 sqrt(D)
    stage_iterations: int = 1000       # iterations per curriculum stage (ECT's d)
    q: float = 2.0                     # the gap shrinks by q per stage
    min_gap: float = 2.0 ** -16        # ... down to this factor (ECT's q = 4 over 8 stages): a relative gap
                                       # far above fp32's rounding of r (2^-24)
    guidance_scale: float = 1.0        # CD: the teacher's classifier-free guidance
    cond_dropout: float = 0.1


class CM(Method):
    """Consistency training (``mode="ct"``, no teacher) or distillation (``"cd"``) of ``student``."""

    Config = CMConfig

    def __init__(self, student, teacher=None, config=None) -> None:
        super().__init__(student, teacher, config)
        if self.config.mode == "cd" and self.teacher is None:
            raise ValueError("CM: mode='cd' distills a teacher; pass teacher=")

    def r_of(self, t: Tensor, iteration: int) -> tuple[Tensor, Tensor, Tensor]:
        """(r, sigma_t, sigma_r): the curriculum's smaller time r(t) at this iteration and both
        EDM noise levels (fp64)."""
        schedule = self.student.schedule
        sigma_t = schedule.edm_sigma(t)
        sigma_r = (sigma_t * (1 - self.gap_factor(iteration) * (1 + 8 * torch.sigmoid(-sigma_t)))).clamp_min(0)
        r = schedule.t_from_edm_sigma(sigma_r).to(t.dtype)
        return r, sigma_t, schedule.edm_sigma(r.to(sigma_r.dtype))  # lambda from the r the network sees

    def gap_factor(self, iteration: int) -> float:
        """max(q^-stage, min_gap): the curriculum's gap at this iteration, relative to sigma_t n(sigma_t)."""
        cfg = self.config
        return max(cfg.q ** -(iteration // cfg.stage_iterations), cfg.min_gap)

    def graph_key(self, iteration: int) -> tuple:
        return (self.gap_factor(iteration),)  # the curriculum stage (the last ones share the floor)

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        model, cfg, x0 = self.student, self.config, batch.x0
        cond = drop_labels(model, batch, cfg.cond_dropout if cfg.mode == "ct" else 0.0)
        t, eps, y_t = noised(model, batch, x0)
        r, sigma_t, sigma_r = self.r_of(t, iteration)
        schedule = model.schedule
        with torch.no_grad():
            if cfg.mode == "ct":
                y_r = schedule.add_noise(x0, eps, r)
            else:
                x0_teacher = teacher_x0(self.teacher, schedule, y_t, t, cond, cfg.guidance_scale)
                y_r = (y_t + per_sample(r - t, y_t) * schedule.velocity(x0_teacher, y_t, t)).to(y_t.dtype)
            target = torch.where(per_sample(r, y_r) > 0, model.x0(y_r, r, cond), y_r)
        weight = 1.0 / safe_denominator(sigma_t - sigma_r)
        loss = losses.consistency_loss(model.x0(y_t, t, cond), target, weight.to(t.dtype), cfg.metric, cfg.huber_c)
        return {"student": loss, "loss": loss.detach(), "mean_gap": (sigma_t - sigma_r).mean().float().detach()}
