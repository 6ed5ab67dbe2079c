"""SFT: denoising score matching, to train a teacher from data or fine-tune it.

t from the schedule's training distribution (edm: ln sigma ~ N(-1.2, 1.2^2); rf: logit-normal;
trig: sCM's), x_t = alpha(t) x0 + sigma(t) eps, loss = mean_b weight(t) ||net - target||^2 / D in
the model's prediction space (see :func:`~fastgen_kernels.distill.base.denoising_loss`). Labels
are dropped to the null class with probability ``cond_dropout`` so the model learns the
unconditional score that classifier-free guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastgen_kernels.distill.base import Batch, Method, denoising_loss, drop_labels, noised


@dataclass(frozen=True)
class SFTConfig:
    cond_dropout: float = 0.1   # probability of training a sample unconditionally


class SFT(Method):
    """Trains ``student`` (the model being fit; no teacher) by denoising score matching."""

    Config = SFTConfig

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        model = self.student
        cond = drop_labels(model, batch, self.config.cond_dropout)
        t, eps, x_t = noised(model, batch, batch.x0)
        loss = denoising_loss(model, batch.x0, eps, x_t, t, cond)
        return {"student": loss, "loss": loss.detach()}

    def graph_key(self, iteration: int) -> tuple:
        return ()  # every step alike
