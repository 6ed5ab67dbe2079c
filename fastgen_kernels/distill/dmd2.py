"""DMD2 (Yin et al. 2024) and f-Distill (Xu et al. 2025): distribution matching distillation with
a fake score and an optional GAN branch, on two time scales.

Student iterations (every ``student_every``-th): x_g = G(z) (1 step; few-step students start from
data noised to a random time of their list), a critic time t, x_t = alpha x_g + sigma eps, and

    T = sg(teacher x0 at x_t, guided),  Fk = sg(fake score x0 at x_t)
    loss = vsd_loss(x_g, T, Fk, h) [+ gan_weight * mean softplus(-D(x_t))]

(:func:`fastgen_kernels.losses.vsd_loss` never builds the pseudo-target). The other iterations
train the fake score by denoising score matching on sg(x_g) in its own prediction space, and the
discriminator on fake vs noised real data. f-Distill weights each sample's VSD term by
h(r), r = exp(D(x_t)) clamped to [0.1, 20] (the discriminator's density-ratio estimate):
h = r (KL), 1 - 1 / (1 + r) (JS), 1 (reverse KL), divided by its batch mean (over all processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from fastgen_kernels import losses
from fastgen_kernels.distill.adversarial import Adversarial
from fastgen_kernels.distill.base import (Batch, Method, denoising_loss, generate, noised, student_times,
                                          trainable_copy)


@dataclass(frozen=True)
class DMD2Config:
    student_steps: int = 1
    student_times: tuple[float, ...] = ()     # default: the student's consistency times
    guidance_scale: float = 1.0               # the teacher's classifier-free guidance
    student_every: int = 5                    # the student steps once per this many iterations
    critic_time_range: tuple[float, float] | tuple[()] = ()  # fake score / VSD times: () the schedule's training
                                              # distribution; (lo, hi) uniform in [lo, hi] * t_max
    gan_weight: float = 0.0                   # > 0: the GAN branch on teacher features
    gan_layers: tuple[str, ...] = ()          # default: the middle and last of teacher.net.blocks
    discriminator_hidden: int = 256
    r1_weight: float = 0.0
    r1_noise: float = 0.1


class DMD2(Method, Adversarial):
    """Distribution matching distillation of ``teacher`` into a 1- or few-step ``student`` (which
    usually starts as a copy of the teacher); the fake score starts as a copy of the teacher."""

    Config = DMD2Config
    needs_teacher = True

    def __init__(self, student, teacher=None, config=None) -> None:
        super().__init__(student, teacher, config)
        cfg = self.config
        if cfg.student_every < 2 or cfg.student_steps < 1:  # (every iteration a student's: no critic step)
            raise ValueError(f"{type(self).__name__}: student_every must be >= 2 and student_steps >= 1, got "
                             f"{cfg.student_every} and {cfg.student_steps}")
        if cfg.critic_time_range and not 0 <= cfg.critic_time_range[0] < cfg.critic_time_range[1] <= 1:
            raise ValueError(f"{type(self).__name__}: critic_time_range must be (lo, hi) with 0 <= lo < hi <= 1, "
                             f"got {cfg.critic_time_range}")
        self.times = student_times(student, cfg.student_steps, cfg.student_times)
        self.fake_score = trainable_copy(self.teacher)
        self.optimizer_names = ("student", "fake_score")
        if self.adversarial:
            self.build_discriminator(cfg.gan_layers, cfg.discriminator_hidden)
            self.optimizer_names += ("discriminator",)

    @property
    def adversarial(self) -> bool:
        return self.config.gan_weight > 0

    def optimizers_at(self, iteration: int) -> tuple[str, ...]:
        if iteration % self.config.student_every == 0:
            return ("student",)
        return self.optimizer_names[1:]

    def graph_key(self, iteration: int) -> tuple[str, ...]:
        return self.optimizers_at(iteration)  # whose turn it is

    def sample_weight(self, logits: Tensor) -> Tensor | None:
        """f-Distill's h per sample (None: DMD2's uniform weight)."""
        return None

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        if "student" in self.optimizers_at(iteration):
            return self.student_step(batch)
        return self.critic_step(batch)

    def student_step(self, batch: Batch) -> dict[str, Tensor]:
        cfg, cond = self.config, batch.cond
        x_g = generate(self.student, batch, cond, self.times)
        t, _, x_t = noised(self.fake_score, batch, x_g, cfg.critic_time_range)
        schedule = self.fake_score.schedule
        with torch.no_grad():
            x0_teacher = self.teacher.guided_x0(x_t, t, cond, cfg.guidance_scale)
            x0_fake = self.fake_score.x0(x_t, t, cond)
        out = {}
        loss = 0.0
        if self.adversarial:
            logits = self.logits(schedule, x_t, t, cond)
            weight = self.sample_weight(logits.detach())
            gan = losses.gan_loss(logits, mode="generator")
            loss = cfg.gan_weight * gan
            out["gan_generator"] = gan.detach()
        else:
            weight = None
        vsd = losses.vsd_loss(x_g, x0_teacher, x0_fake, weight)
        out.update(student=vsd + loss, vsd=vsd.detach())
        return out

    def critic_step(self, batch: Batch) -> dict[str, Tensor]:
        cfg, cond = self.config, batch.cond
        with torch.no_grad():
            x_g = generate(self.student, batch, cond, self.times)
        t, eps, x_t = noised(self.fake_score, batch, x_g, cfg.critic_time_range)
        fake = denoising_loss(self.fake_score, x_g, eps, x_t, t, cond)
        out = {"fake_score": fake, "fake_score_loss": fake.detach()}
        if self.adversarial:
            loss, gan = self.discriminator_loss(batch, self.fake_score.schedule, x_t, t, cond,
                                                cfg.r1_weight, cfg.r1_noise)
            out.update(discriminator=loss, gan_discriminator=gan)
        return out


@dataclass(frozen=True)
class FDistillConfig(DMD2Config):
    divergence: Literal["kl", "js", "reverse_kl"] = "js"
    ratio_min: float = 0.1
    ratio_max: float = 20.0


class FDistill(DMD2):
    """f-Distill: DMD2 with the per-sample weight h(r) of an f-divergence; always trains the
    discriminator (its logits estimate the density ratio), whatever ``gan_weight``."""

    Config = FDistillConfig
    batch_statistics = True   # h is normalized by its mean over the micro-batch (all processes')

    @property
    def adversarial(self) -> bool:
        return True

    def sample_weight(self, logits: Tensor) -> Tensor:
        cfg = self.config
        r = logits.float().exp().clamp(cfg.ratio_min, cfg.ratio_max)
        h = {"kl": r, "js": 1 - 1 / (1 + r), "reverse_kl": torch.ones_like(r)}[cfg.divergence]
        total = torch.stack([h.sum(), h.new_full((), h.numel())])  # a fill, no host copy (CUDA graphs)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return h / (total[0] / total[1])
