r"""Modulated LayerNorm / RMSNorm quantized to e4m3 per token: in FP8 inference, the input of a
DiT block's qkv and fc1 layers (and of its final layer) in one pass over x.

Shapes and the norm as :mod:`fastgen_kernels.ops.modulated_norm`: x (B, L, D); shift, scale
(B, D) or (B, L, D); weight, bias (D,) or None. Per row, with y the modulated norm in fp32 (not
rounded to x's dtype first), and as ``quantize_fp8_rows`` quantizes::

    s = max(max_d |y_d|, 1e-12) / 448        codes = e4m3(clamp(y * (448 / max(...)), +-448))

Returns (codes (B, L, D) float8_e4m3fn, s (B * L,) fp32): the prequantized x and x_scale that
``fp8_linear`` takes. The unfused path (the norm in x's dtype, then quantize_fp8_rows) writes y
and reads it back, two more passes of x's size per layer. Inference only (no autograd).

Backends: ``triton`` on GPUs with e4m3 (sm_89+), ``reference`` everywhere (modulated_norm's
reference in fp32, then reference_quantize_rows). Custom op: ``fastgen::modulated_norm_fp8``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastgen_kernels.backends import OpDispatcher
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops._eager_op import EagerOp, check_inference_only
from fastgen_kernels.ops.fp8_linear import fp8_supported, reference_quantize_rows
from fastgen_kernels.ops.modulated_norm import _check, reference_forward


def reference_modulated_norm_fp8(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
                                 bias: Tensor | None, eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    """(codes (B, L, D), scales (B * L,)) of the fp32 (fp64 for fp64 x) modulated norm's rows."""
    y, _, _ = reference_forward(x.to(torch.promote_types(x.dtype, torch.float32)), shift, scale, weight, bias,
                                eps, rms)
    codes, scales = reference_quantize_rows(y.reshape(-1, x.shape[-1]))
    return codes.view(x.shape), scales


def _triton(*args):
    from fastgen_kernels.triton_ops import modulated_norm

    return modulated_norm.forward_fp8(*args)


def _triton_support(x: Tensor, *args: object) -> str | None:
    return _checks.gpu_kernel_support(x) or (None if fp8_supported(x.device) else "no e4m3 on this GPU (sm_89+)")


forward_dispatcher = OpDispatcher("fastgen.modulated_norm_fp8",
                                  {"triton": _triton, "reference": reference_modulated_norm_fp8},
                                  {"triton": _triton_support})


@torch.library.custom_op("fastgen::modulated_norm_fp8", mutates_args=())
def modulated_norm_fp8(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    """(codes, scales): the modulated LayerNorm (rms=False) or RMSNorm (rms=True) of x in e4m3 per row."""
    return forward_dispatcher(x, shift, scale, weight, bias, eps, rms)


@modulated_norm_fp8.register_fake
def _fake(x, shift, scale, weight, bias, eps, rms):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


_modulated_norm_fp8 = EagerOp(torch.ops.fastgen.modulated_norm_fp8, forward_dispatcher)


def modulated_layer_norm_fp8(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                             bias: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``quantize_fp8_rows(LayerNorm(x) * (1 + scale) + shift)`` in one pass over x, the norm in
    fp32: (codes (B, L, D) float8_e4m3fn, scales (B * L,) fp32), for ``fp8_linear(codes, ...,
    x_scale=scales)``. Arguments as :func:`modulated_layer_norm`. Inference only."""
    op = "modulated_layer_norm_fp8"
    eps = _check(op, x, shift, scale, weight, bias, eps)
    check_inference_only(op, (x, shift, scale, weight, bias))
    return _modulated_norm_fp8(x, shift, scale, weight, bias, eps, False)


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the op, for `fastgen-kernels info`."""
    x = torch.randn(2, 3, 64, device=device, dtype=dtype)
    mod = torch.randn(2, 64, device=device, dtype=dtype)
    return (x, mod, mod, None, None, 1e-6, False)
