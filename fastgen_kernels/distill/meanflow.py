"""MeanFlow: one-step flow maps from data or by distillation (Geng et al. 2025).

The student is an ``rf`` / ``mean_flow`` Denoiser: u_theta(x_t, r, t) is the average velocity over
[r, t], x_r = x_t - (t - r) u. Per sample: t and r logit-normal, sorted (t >= r), and r = t for a
fraction of the batch (plain flow matching); x_t = (1 - t) x0 + t eps;

    v = eps - x0                                       (from data)
      = the teacher's guided velocity at (x_t, t)      (distillation)
    u_minus, J = u_theta-(x_t, r, t), JVP of u_theta- along (dx, dr, dt) = (v, 0, 1)

and :func:`fastgen_kernels.losses.meanflow_loss` takes u - sg(v - (t - r) J) with the adaptive
weight sg(1 / (e + c)^p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fastgen_kernels import losses
from fastgen_kernels.distill.base import Batch, Method, drop_labels, output_and_jvp, teacher_x0


@dataclass(frozen=True)
class MeanFlowConfig:
    mode: Literal["data", "distill"] = "data"
    flow_matching_fraction: float = 0.75     # share of samples with r = t
    time_mean: float = -0.4                  # t, r = sigmoid(N(time_mean, time_std^2))
    time_std: float = 1.0
    p: float = 1.0                           # adaptive weight power (0.75 on small data)
    c: float = 1e-3
    guidance_scale: float = 1.0              # distillation: the teacher's guidance
    jvp: Literal["exact", "finite_difference", "finite_difference_autocast"] = "exact"  # distill.base.jvp
    fd_step: float | None = None                         # finite differences: step relative to the point
                                                         # (None: by the dtype, distill.base.jvp)
    cond_dropout: float = 0.1                # from data only


class MeanFlow(Method):
    """MeanFlow from data (``mode="data"``) or from a teacher (``"distill"``)."""

    Config = MeanFlowConfig

    def __init__(self, student, teacher=None, config=None) -> None:
        super().__init__(student, teacher, config)
        if student.schedule.name != "rf" or student.prediction != "mean_flow":
            raise ValueError("MeanFlow: the student must be a Denoiser with schedule='rf' and "
                             f"prediction='mean_flow', got {student.schedule.name!r} / {student.prediction!r}")
        if self.config.mode == "distill" and self.teacher is None:
            raise ValueError("MeanFlow: mode='distill' needs teacher=")

    def times(self, batch: Batch) -> tuple[Tensor, Tensor]:
        cfg, schedule = self.config, self.student.schedule
        a, b = (torch.sigmoid(batch.randn() * cfg.time_std + cfg.time_mean) for _ in range(2))
        t = torch.maximum(a, b).clamp(max=schedule.t_max)
        r = torch.minimum(torch.minimum(a, b), t)  # r <= t, t clamped included
        r = torch.where(batch.rand() < cfg.flow_matching_fraction, t, r)
        return t, r

    def graph_key(self, iteration: int) -> tuple:
        return ()  # every step alike

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        model, cfg, x0 = self.student, self.config, batch.x0
        cond = drop_labels(model, batch, cfg.cond_dropout if cfg.mode == "data" else 0.0)
        t, r = self.times(batch)
        eps = batch.randn_like(x0)
        x_t = model.schedule.add_noise(x0, eps, t)
        if cfg.mode == "data":
            v = eps - x0
        else:
            with torch.no_grad():
                v = model.schedule.velocity(teacher_x0(self.teacher, model.schedule, x_t, t, cond,
                                                       cfg.guidance_scale), x_t, t)
        u, J = output_and_jvp(model, lambda m, x, s: m.raw(x, s, cond, r), (x_t, t), (v, torch.ones_like(t)),
                              cfg.jvp, cfg.fd_step)
        loss = losses.meanflow_loss(u, v, J, t, r, cfg.p, cfg.c)
        return {"student": loss, "loss": loss.detach()}
