"""A tiny network and data set for the training-method tests: 2-D mixture of Gaussians, and an
MLP denoiser with the reference DiT's calling convention (time, label, r, log-variance head)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MODES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
MODE_STD = 0.05


def mixture(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n points of the 4-mode mixture and their mode index (the class label)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(MODES), (n,), generator=g)
    return MODES[labels] + MODE_STD * torch.randn(n, 2, generator=g), labels


def near_modes(x: Tensor, radius: float = 0.25) -> float:
    """The fraction of points within ``radius`` of a mode."""
    return (torch.cdist(x.float(), MODES).min(dim=1).values < radius).float().mean().item()


def _features(t: Tensor, dim: int = 32) -> Tensor:
    freqs = torch.exp(torch.linspace(math.log(0.5), math.log(60.0), dim // 2, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return h + self.mlp(self.norm(h) + c)


class ToyNet(nn.Module):
    """net(x (B, 2), t (B,), cond (B,) labels or None, r (B,) or None, return_logvar=False)."""

    def __init__(self, hidden: int = 96, classes: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.inp = nn.Linear(2, hidden)
        self.time = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.r_time = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(classes + 1, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, 2)
        self.logvar = nn.Linear(32, 1)

    def forward(self, x, t, cond=None, r=None, return_logvar=False):
        t = t.reshape(-1).expand(x.shape[0])
        dtype = self.inp.weight.dtype
        c = self.time(_features(t).to(dtype))
        if cond is None:
            cond = torch.full((x.shape[0],), self.classes, device=x.device, dtype=torch.long)
        c = c + self.label(cond)
        if r is not None:
            c = c + self.r_time(_features(t - r.reshape(-1).expand(x.shape[0])).to(dtype))
        h = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, c)
        out = self.out(h).to(x.dtype)
        if return_logvar:
            return out, self.logvar(_features(t).to(dtype)).reshape(-1)
        return out
