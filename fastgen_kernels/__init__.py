"""fastgen_kernels: fused Triton / CUDA / C++ kernels for fast diffusion distillation and sampling."""

from fastgen_kernels import losses, ops, schedules
from fastgen_kernels.backends import BACKENDS, use_backend
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.ops import (
    attention,
    attention_jvp,
    fp8_linear,
    gated_residual,
    gelu_tanh,
    gelu_tanh_linear,
    modulated_layer_norm,
    modulated_layer_norm_fp8,
    modulated_layer_norm_linear,
    modulated_rms_norm,
    qk_norm_rope,
)
from fastgen_kernels.quantization import Fp8Linear, fuse_epilogues, quantize_fp8
from fastgen_kernels.sampling import sample

# last: the models use the ops and the Denoiser above (diffusers itself is imported on use)
from fastgen_kernels import models  # noqa: E402
from fastgen_kernels.models.diffusers import accelerate, from_diffusers  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Denoiser",
    "accelerate",
    "Fp8Linear",
    "attention",
    "attention_jvp",
    "fp8_linear",
    "from_diffusers",
    "fuse_epilogues",
    "gated_residual",
    "gelu_tanh",
    "gelu_tanh_linear",
    "losses",
    "models",
    "modulated_layer_norm",
    "modulated_layer_norm_fp8",
    "modulated_layer_norm_linear",
    "modulated_rms_norm",
    "ops",
    "qk_norm_rope",
    "quantize_fp8",
    "sample",
    "schedules",
    "use_backend",
]
