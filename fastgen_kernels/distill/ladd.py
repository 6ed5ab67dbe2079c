"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024).

Pure adversarial distillation: the student's sample x_g is noised to a time t of the teacher's
training distribution and judged by a discriminator head on the frozen teacher's features (see
:mod:`~fastgen_kernels.distill.adversarial`), with R1 on the noised real data. Student and
discriminator alternate: the student steps on every ``student_every``-th iteration, the
discriminator on the others. No VSD term, no fake score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastgen_kernels import losses
from fastgen_kernels.distill.adversarial import Adversarial
from fastgen_kernels.distill.base import Batch, Method, generate, noised, student_times


@dataclass(frozen=True)
class LADDConfig:
    student_steps: int = 1
    student_times: tuple[float, ...] = ()
    student_every: int = 2
    gan_layers: tuple[str, ...] = ()
    discriminator_hidden: int = 256
    r1_weight: float = 1e-3
    r1_noise: float = 0.1


class LADD(Method, Adversarial):
    """Adversarial distillation of ``teacher`` into a 1- or few-step ``student``."""

    Config = LADDConfig
    needs_teacher = True
    optimizer_names = ("student", "discriminator")

    def __init__(self, student, teacher=None, config=None) -> None:
        super().__init__(student, teacher, config)
        if self.config.student_every < 2:
            raise ValueError(f"LADD: student_every must be >= 2 (the discriminator needs iterations), "
                             f"got {self.config.student_every}")
        self.times = student_times(student, self.config.student_steps, self.config.student_times)
        self.build_discriminator(self.config.gan_layers, self.config.discriminator_hidden)

    def optimizers_at(self, iteration: int) -> tuple[str, ...]:
        return ("student",) if iteration % self.config.student_every == 0 else ("discriminator",)

    def graph_key(self, iteration: int) -> tuple[str, ...]:
        return self.optimizers_at(iteration)  # whose turn it is

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        cond, schedule = batch.cond, self.teacher.schedule
        student_turn = "student" in self.optimizers_at(iteration)
        with torch.set_grad_enabled(student_turn):
            x_g = generate(self.student, batch, cond, self.times)
        t, _, x_t = noised(self.teacher, batch, x_g)
        if student_turn:
            loss = losses.gan_loss(self.logits(schedule, x_t, t, cond), mode="generator")
            return {"student": loss, "gan_generator": loss.detach()}
        loss, gan = self.discriminator_loss(batch, schedule, x_t, t, cond, self.config.r1_weight,
                                            self.config.r1_noise)
        return {"discriminator": loss, "gan_discriminator": gan}
