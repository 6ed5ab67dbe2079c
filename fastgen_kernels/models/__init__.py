"""Networks: the reference DiT built on the fused ops, and adapters for diffusers models
(:mod:`fastgen_kernels.models.diffusers`, imported on use: diffusers is optional)."""

from fastgen_kernels.models.dit import PRESETS, DiT, DiTConfig

__all__ = ["PRESETS", "DiT", "DiTConfig"]
