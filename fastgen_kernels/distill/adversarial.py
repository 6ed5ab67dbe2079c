"""The adversarial branch of DMD2, f-Distill and LADD: a small discriminator head on the frozen
teacher's intermediate features.

The teacher is run at the noised sample (x_t, t) and forward hooks collect the outputs of some of
its blocks (by default the middle and the last of ``net.blocks``). Each feature map, as tokens
(B, L, C) (vectors: L = 1), goes through LayerNorm -> Linear(C, hidden) -> SiLU -> Linear(hidden, 1), averaged over
tokens; the logit is the sum over the tapped layers, (B,). Losses (softplus, fused):

    generator      mean softplus(-D(fake))
    discriminator  mean softplus(D(fake)) + mean softplus(-D(real)),  real = data noised at its own t
    R1 (approx.)   r1_weight * mean_b (D(real_t) - D(real_t + r1_noise * n))^2

The teacher's parameters never change; in the generator loss the gradient flows through its
activations into the student's sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastgen_kernels import losses
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.distill.base import Batch, at_teacher_point
from fastgen_kernels.schedules import Schedule


def default_layers(net: nn.Module) -> tuple[str, ...]:
    """The middle and the last of ``net.blocks`` (DiT-style networks)."""
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"discriminator: {type(net).__name__} has no `blocks` list; name the feature layers "
                         "(gan_layers=...)")
    return tuple(sorted({f"blocks.{len(blocks) // 2}", f"blocks.{len(blocks) - 1}"}))


def _tokens(feature: Tensor) -> Tensor:
    """(B, L, C) tokens from (B, C) vectors, (B, L, C) tokens or (B, C, *spatial) maps."""
    if isinstance(feature, (tuple, list)):
        feature = feature[0]
    if feature.dim() == 2:
        return feature[:, None]
    return feature if feature.dim() == 3 else feature.flatten(2).transpose(1, 2)


class FeatureTap:
    """``tap(fn, *args)`` runs fn and returns the outputs of the named submodules of ``net``, as
    (B, L, C) tokens, in the order of ``names``."""

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.modules = []
        for name in self.names:
            try:
                self.modules.append(net.get_submodule(name))
            except AttributeError as error:
                raise ValueError(f"discriminator: {type(net).__name__} has no submodule {name!r}") from error

    def __call__(self, fn, *args) -> list[Tensor]:
        features: dict[int, Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, _in, out, i=i: features.__setitem__(i, _tokens(out)))
                   for i, module in enumerate(self.modules)]
        try:
            fn(*args)
        finally:
            for handle in handles:
                handle.remove()
        return [features[i] for i in range(len(self.modules))]


class DiscriminatorHead(nn.Module):
    """Per tapped layer: LayerNorm -> Linear -> SiLU -> Linear(1), mean over tokens; summed: (B,)."""

    def __init__(self, channels: Sequence[int], hidden: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c), nn.Linear(c, hidden), nn.SiLU(), nn.Linear(hidden, 1)) for c in channels)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return sum(head(f.to(head[1].weight.dtype)).mean(dim=(1, 2)) for head, f in zip(self.heads, features))


class Adversarial:
    """The discriminator of a method: ``self.teacher`` supplies the features, ``self.discriminator``
    (a :class:`DiscriminatorHead`) is trained by the method's "discriminator" optimizer."""

    teacher: Denoiser
    discriminator: nn.Module

    def build_discriminator(self, layers: Sequence[str], hidden: int) -> None:
        teacher = self.teacher
        if teacher.shape is None:
            raise ValueError(f"{type(self).__name__}: the teacher Denoiser needs shape= (to size the discriminator)")
        self.tap = FeatureTap(teacher.net, layers or default_layers(teacher.net))
        param = next(teacher.net.parameters())
        probe = torch.zeros(1, *teacher.shape, device=param.device, dtype=param.dtype)
        cond = None if teacher.null_cond is None else torch.full((1,), teacher.null_cond, device=param.device)
        with torch.no_grad():
            features = self.tap(teacher.raw, probe, teacher.schedule.t_max / 2, cond)
        self.discriminator = DiscriminatorHead([f.shape[-1] for f in features], hidden).to(param.device)

    def logits(self, schedule: Schedule, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """D at a point (x_t, t) of ``schedule``: (B,) logits."""
        x, tt = at_teacher_point(self.teacher, schedule, x_t, t)
        return self.discriminator(self.tap(self.teacher.raw, x, tt, cond))

    def discriminator_loss(self, batch: Batch, schedule: Schedule, fake_t: Tensor, t: Tensor,
                           cond: Tensor | None, r1_weight: float, r1_noise: float) -> tuple[Tensor, Tensor]:
        """(the discriminator's loss (+ R1), its softplus part) on a fake point (x_t, t) of
        ``schedule`` and the batch's data noised at the same times: drawn apart (from the
        teacher's training distribution while DMD2's critic_time_range drew the fakes'), the two
        noise levels alone told real from fake."""
        real_t = schedule.add_noise(batch.x0, batch.randn_like(batch.x0), t)
        logits_fake = self.logits(schedule, fake_t.detach(), t, cond)
        logits_real = self.logits(schedule, real_t, t, batch.cond)
        loss = losses.gan_loss(logits_fake, logits_real, mode="discriminator")
        perturbed = real_t + r1_noise * batch.randn_like(real_t)
        if r1_weight <= 0:
            return loss, loss.detach()
        logits_perturbed = self.logits(schedule, perturbed, t, batch.cond)
        r1 = (logits_real - logits_perturbed).square().mean()
        return loss + r1_weight * r1, loss.detach()
