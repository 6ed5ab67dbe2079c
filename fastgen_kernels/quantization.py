"""FP8 inference for whole models: ``quantize_fp8(model)`` swaps ``nn.Linear`` layers for
:class:`Fp8Linear` (weight in float8_e4m3fn with fp32 scales, run by ``fastgen_kernels.ops.fp8_linear``).

Norms, embeddings and the adaLN modulation projections stay as they are by default: they are a
small share of the FLOPs and the most sensitive to quantization error (the modulation scales and
gates multiply every activation of a block). The swapped model's ``state_dict`` holds ``weight``
(e4m3), ``weight_scale`` and ``bias`` per layer and round-trips through safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastgen_kernels.ops.fp8_linear import ACTIVATIONS, fp8_linear, fp8_supported, quantize_weight

log = logging.getLogger(__name__)

# a Linear whose qualified name has a part containing one of these stays in high precision
SKIPPED_NAME_PARTS = ("embed", "norm", "adaln", "modulation")
# and so does one named this: diffusers DiT's final adaLN modulation, proj_out_1(SiLU(cond))
SKIPPED_NAMES = ("proj_out_1",)


class Fp8Linear(nn.Module):
    """``y = x @ W^T + b`` with W in float8_e4m3fn and per-output-channel (or per-tensor) fp32
    scales; x is quantized per token on the fly (or comes quantized). ``activation`` (None,
    "gelu_tanh", "gelu", "silu") is applied in the GEMM's epilogue; ``forward(x, gate=None,
    residual=None)`` also takes the adaLN-Zero gate and the residual into it. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = True,
                 activation: str | None = None, device: torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Fp8Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device,
                                                   dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True, activation: str | None = None) -> Fp8Linear:
        """The quantized copy of ``linear`` (its bias kept in its dtype)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel, activation,
                    weight.device, weight.dtype if linear.bias is None else linear.bias.dtype)
        layer.weight, layer.weight_scale = quantize_weight(weight, per_channel)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def _apply(self, fn, recurse=True):
        """Device moves and ``to_empty`` apply to every buffer; dtype casts (``model.bfloat16()``,
        ``.to(dtype)``) to the bias only: the weight stays e4m3 and its scales fp32."""
        codes, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != codes.dtype:  # a cast reached them: the values as they were, moved
            self.weight = codes.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: Tensor, gate: Tensor | None = None, residual: Tensor | None = None,
                x_scale: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
        """x (..., in_features), or its e4m3 codes with ``x_scale`` (e.g. from
        ``modulated_layer_norm_fp8``); the rest as :func:`~fastgen_kernels.ops.fp8_linear`. Under
        autocast the output is in autocast's dtype, as nn.Linear's (with a residual, the residual's:
        the residual stream keeps its precision)."""
        if out_dtype is None and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type) if residual is None else residual.dtype
        return fp8_linear(x, self.weight, self.weight_scale, bias=self.bias, activation=self.activation,
                          gate=gate, residual=residual, x_scale=x_scale, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_scale={tuple(self.weight_scale.shape)}, "
                f"activation={self.activation}")


def reads_e4m3(layers: tuple[nn.Module, ...], device: torch.device) -> bool:
    """Whether every one of ``layers`` is an :class:`Fp8Linear` that quantizes its input to e4m3 on
    ``device``: then the op before them may write that input itself (``modulated_layer_norm_fp8``)."""
    return all(isinstance(layer, Fp8Linear) for layer in layers) and fp8_supported(device)


def default_filter(module: nn.Module, name: str) -> bool:
    """Quantize every Linear but those of norms, embeddings and adaLN modulation (by name)."""
    parts = name.lower().split(".")
    return parts[-1] not in SKIPPED_NAMES and not any(skip in part for part in parts for skip in SKIPPED_NAME_PARTS)


def quantize_fp8(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
                 per_channel: bool = True) -> nn.Module:
    """Swaps, in place, each ``nn.Linear`` of ``model`` for which ``filter_fn(module, qualified_name)``
    is true (default: :func:`default_filter`) for its :class:`Fp8Linear`; returns ``model`` (a
    model that is itself an ``nn.Linear``: its Fp8Linear, or itself). A layer registered under
    several names stays one layer: every name gets the same Fp8Linear (the first name decides)."""
    filter_fn = filter_fn or default_filter
    if type(model) is nn.Linear:
        return Fp8Linear.from_linear(model, per_channel) if filter_fn(model, "") else model
    replacements: dict[int, nn.Module] = {}  # id(Linear) -> what every name of it gets
    swapped = []
    # every path: named_modules() and named_children() list a shared module under its first name only
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):
            if type(child) is not nn.Linear:
                continue
            qualified = f"{name}.{child_name}" if name else child_name
            if id(child) not in replacements:
                quantize = filter_fn(child, qualified)
                replacements[id(child)] = Fp8Linear.from_linear(child, per_channel) if quantize else child
            if replacements[id(child)] is not child:
                setattr(module, child_name, replacements[id(child)])
                swapped.append(qualified)
    log.info("quantize_fp8: %d Linear layers to FP8: %s", len(swapped), ", ".join(swapped))
    return model


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """Moves the memory-bound work after each FP8 linear layer of adaLN-Zero DiT blocks into the
    layer's epilogue: the MLP's fc1 applies GELU (tanh), the attention out-projection and fc2 apply
    the gate and the residual add. Works on the reference DiT's blocks whose three layers are
    :class:`Fp8Linear` (run :func:`quantize_fp8` first) and on diffusers blocks patched by
    :func:`fastgen_kernels.accelerate`; returns ``model``. Blocks that do not qualify are left alone."""
    fused = []
    for name, module in model.named_modules():
        fuse = getattr(module, "fuse_fp8_epilogues", None)
        if fuse is not None and fuse():
            fused.append(name)
    log.info("fuse_epilogues: %d blocks", len(fused))
    return model

