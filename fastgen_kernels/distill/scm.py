"""sCM: continuous-time consistency models on TrigFlow (Lu & Song 2024).

The student is a ``trig`` / ``trig_F`` Denoiser whose network also returns a log-variance u(t)
(``net(..., return_logvar=True)``, as the reference DiT with ``logvar_head=True``). Per sample:
t = atan(sigma / sigma_data), ln sigma ~ N(-1.0, 1.4^2); x_t = cos t x0 + sin t z, z = sigma_data eps;

    dx_t/dt = cos t z - sin t x0                  (sCT)
            = sigma_data F_T(x_t, t)              (sCD: the teacher's guided velocity)
    F_minus = sg(F_theta(x_t, t)), J = JVP of F_theta- along (cos t sin t dx_t/dt, cos t sin t)

and :func:`fastgen_kernels.losses.scm_loss` builds the tangent g (warm-up factor w on the JVP
terms), normalizes it and applies the adaptive weighting. The JVP is exact (forward-mode AD through
the network and the fused attention; with the forward the loss differentiates in the same pass,
``distill.base.output_and_jvp``) or, as the baseline, a central finite difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fastgen_kernels import losses
from fastgen_kernels.distill.base import Batch, Method, drop_labels, noised, output_and_jvp, ramp, teacher_x0
from fastgen_kernels.schedules import per_sample


@dataclass(frozen=True)
class SCMConfig:
    mode: Literal["ct", "cd"] = "cd"
    guidance_scale: float = 1.0                          # sCD: the teacher's guidance
    warmup_iterations: int = 10000                       # w rises from 0 to 1 over these
    tangent_c: float = 0.1                               # g / (||g|| / sqrt(D) + c)
    jvp: Literal["exact", "finite_difference", "finite_difference_autocast"] = "exact"  # distill.base.jvp
    fd_step: float | None = None                         # finite differences: step relative to the point
                                                         # (None: by the dtype, distill.base.jvp)
    cond_dropout: float = 0.1                            # sCT only


class SCM(Method):
    """sCT (``mode="ct"``) or sCD (``"cd"``, with a teacher) of a TrigFlow ``student``."""

    Config = SCMConfig

    def __init__(self, student, teacher=None, config=None) -> None:
        super().__init__(student, teacher, config)
        if student.schedule.name != "trig" or student.prediction != "trig_F":
            raise ValueError("SCM: the student must be a Denoiser with schedule='trig' and prediction='trig_F', "
                             f"got {student.schedule.name!r} / {student.prediction!r}")
        if self.config.mode == "cd" and self.teacher is None:
            raise ValueError("SCM: mode='cd' distills a teacher; pass teacher=")
        if getattr(getattr(student.net, "config", None), "logvar_head", True) is False:
            raise ValueError("SCM: the student's network needs a log-variance head for the adaptive weighting "
                             "(DiT: logvar_head=True; command line: student.net_overrides.logvar_head=true)")

    def graph_key(self, iteration: int) -> tuple:
        return (ramp(iteration, self.config.warmup_iterations),)  # the tangent's warm-up factor

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        model, cfg, x0 = self.student, self.config, batch.x0
        schedule, sd = model.schedule, model.sigma_data
        cond = drop_labels(model, batch, cfg.cond_dropout if cfg.mode == "ct" else 0.0)
        t, eps, x_t = noised(model, batch, x0)
        tb = per_sample(t, x0)
        cos, sin = torch.cos(tb), torch.sin(tb)
        with torch.no_grad():
            if cfg.mode == "ct":
                dxt_dt = (cos * sd * eps - sin * x0).to(x0.dtype)
            else:
                x0_teacher = teacher_x0(self.teacher, schedule, x_t, t, cond, cfg.guidance_scale)
                dxt_dt = schedule.velocity(x0_teacher, x_t, t)
        (F, logvar), J = output_and_jvp(model, lambda m, x, s: m.raw(x, s, cond, return_logvar=True), (x_t, t),
                                        ((cos * sin * dxt_dt).to(x_t.dtype), torch.cos(t) * torch.sin(t)),
                                        cfg.jvp, cfg.fd_step)
        # theta- = sg(theta): F_minus is this forward's output, detached
        loss = losses.scm_loss(F, F.detach(), dxt_dt, J, x_t, t, logvar, sd, ramp(iteration, cfg.warmup_iterations),
                               cfg.tangent_c)
        return {"student": loss, "loss": loss.detach(), "logvar": logvar.mean().float().detach()}
