r"""FP8 linear layer with a fused epilogue: the linear layers of a DiT block in one kernel each.

Shapes: x (..., K) -> out (..., N), M = x.numel() / K tokens; weight (N, K) in float8_e4m3fn
with weight_scale (N,) per output channel or a single per-tensor value (fp32)::

    x_q, s_x = quantize(x)                    per token: s_x[m] = max_k |x[m, k]| / 448,
                                              x_q = e4m3(x / s_x), round to nearest even
    acc[m, n] = sum_k x_q[m, k] w[n, k]        e4m3 products, fp32 accumulation
    y = act(acc * s_x[m] * s_w[n] + bias[n])  act: None, gelu_tanh, gelu (erf), silu
    out = residual + gate * y                 gate (B, N) over the L tokens of x (B, L, K), or
                                              per token like out; all optional

The epilogue is fp32 on the accumulator and rounds once to out_dtype (x's dtype by default).
x may come already quantized (float8_e4m3fn with its scale, (M,) or one value). Inference only:
there is no backward.

Backends: ``triton`` on GPUs (tensor-core FP8 from sm_89 on, Hopper's wgmma; before sm_89 the
same kernel and epilogue with x in bf16/fp16 and the weight widened to it, exact for e4m3
values), and ``reference`` everywhere: quantize, the fp32 matmul of the codes, the epilogue, so
that a quantized model runs on a CPU with the GPU's numerics up to the order of the sum.

Custom ops: ``fastgen::quantize_fp8_rows`` (x (M, K) -> codes, scales) and ``fastgen::fp8_linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen_kernels.backends import OpDispatcher
from fastgen_kernels.ops import _checks
from fastgen_kernels.ops._eager_op import EagerOp, check_inference_only

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_AMAX = 1e-12  # an all-zero row gets this absolute maximum: finite scales, zero codes
ACTIVATIONS = (None, "gelu_tanh", "gelu", "silu")
ACTIVATION_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------- reference


def reference_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (M, K) float8_e4m3fn, scale (M,) fp32): x ~ codes * scale[:, None]."""
    amax = x.abs().amax(-1).float().clamp_min(MIN_AMAX)
    # correctly rounded divisions, as the kernels' (a Python-number operand would not be: CUDA
    # multiplies by its reciprocal, and 448 / tensor is tensor.reciprocal() * 448)
    e4m3 = torch.full_like(amax, E4M3_MAX)
    codes = (x.float() * (e4m3 / amax)[:, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return codes.to(torch.float8_e4m3fn), amax / e4m3


def epilogue(acc: Tensor, x_scale: Tensor | None, weight_scale: Tensor, bias: Tensor | None,
             activation: str | None, gate: Tensor | None, gate_rows: int, residual: Tensor | None,
             out_dtype: torch.dtype) -> Tensor:
    """residual + gate * act(acc * s_x * s_w + bias) in fp32 from the (M, N) fp32 accumulator."""
    y = acc if x_scale is None else acc * x_scale[:, None]
    y = y * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "gelu":
        y = F.gelu(y)
    elif activation == "silu":
        y = F.silu(y)
    if gate is not None:
        y = y * gate.float().repeat_interleave(gate_rows, 0)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


@_checks.without_autocast
def reference_linear(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor,
                     bias: Tensor | None, activation: str | None, gate: Tensor | None, gate_rows: int,
                     residual: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """(M, N): the epilogue of the fp32 matmul of x (M, K) and weight (N, K) as stored."""
    acc = x.float() @ weight.float().T
    return epilogue(acc, x_scale, weight_scale, bias, activation, gate, gate_rows, residual, out_dtype)


# --------------------------------------------------------------------------- backends


def _triton_quantize_rows(x):
    from fastgen_kernels.triton_ops import fp8_linear

    return fp8_linear.quantize_rows(x)


def _triton_linear(*args):
    from fastgen_kernels.triton_ops import fp8_linear

    return fp8_linear.linear(*args)


def _triton_support(x: Tensor, *args: object) -> str | None:
    return "empty input" if x.numel() == 0 else None


quantize_dispatcher = OpDispatcher(
    "fastgen.quantize_fp8_rows", {"triton": _triton_quantize_rows, "reference": reference_quantize_rows},
    {"triton": _triton_support})
forward_dispatcher = OpDispatcher(
    "fastgen.fp8_linear", {"triton": _triton_linear, "reference": reference_linear},
    {"triton": _triton_support})

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgen::quantize_fp8_rows", mutates_args=())
def quantize_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 codes (M, K) and fp32 dequantization scales (M,) of x (M, K)."""
    return quantize_dispatcher(x)


@torch.library.custom_op("fastgen::fp8_linear", mutates_args=())
def fp8_linear_op(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor,
                  bias: Tensor | None, activation: str | None, gate: Tensor | None, gate_rows: int,
                  residual: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """(M, N): residual + gate * act((x @ weight^T) * x_scale * weight_scale + bias)."""
    return forward_dispatcher(x, x_scale, weight, weight_scale, bias, activation, gate, gate_rows,
                             residual, out_dtype)


quantize_fp8_rows.register_fake(reference_quantize_rows)


@fp8_linear_op.register_fake
def _fake_linear(x, x_scale, weight, weight_scale, bias, activation, gate, gate_rows, residual, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


# In plain eager mode the public function calls the dispatchers themselves: the custom ops' wrappers
# cost 50-150 us of host time per call, as long as the GEMM at DiT sizes (the op has no autograd).
_quantize_rows = EagerOp(torch.ops.fastgen.quantize_fp8_rows, quantize_dispatcher)
_linear = EagerOp(torch.ops.fastgen.fp8_linear, forward_dispatcher)

# --------------------------------------------------------------------------- public API


@functools.cache
def _device_has_fp8(device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the reference and the interpreter compute e4m3 in software
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_supported(device: torch.device) -> bool:
    """Whether activations are quantized to e4m3 on ``device`` (sm_89+ GPUs, CPU); elsewhere the
    kernel multiplies x in its own dtype with the weight widened to it."""
    return _device_has_fp8(torch.device(device))


def _check_scale(op: str, name: str, scale: object, size: int, what: str) -> Tensor:
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be a float32 tensor, got "
                        f"{scale.dtype if isinstance(scale, Tensor) else type(scale).__name__}")
    if scale.numel() not in (1, size) or scale.dim() > 1:
        raise ValueError(f"{op}: {name} must hold one value or ({size},) {what}, got {tuple(scale.shape)}")
    return scale.reshape(-1)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, *, bias: Tensor | None = None,
               activation: str | None = None, gate: Tensor | None = None, residual: Tensor | None = None,
               out_dtype: torch.dtype | None = None, x_scale: Tensor | None = None) -> Tensor:
    """``residual + gate * act(x @ weight.T * scales + bias)`` in one kernel (see the module doc).

    x: (..., K) float16/bfloat16/float32, quantized per token on the fly; or float8_e4m3fn with
    ``x_scale`` (one value or one per token). weight: (N, K) float8_e4m3fn; weight_scale: float32,
    one value or (N,). bias: (N,); activation: None, "gelu_tanh", "gelu" or "silu"; gate: (B, N)
    for x (B, L, K), or the output's shape; residual: the output's shape (..., N). out_dtype:
    x's dtype by default (bfloat16 for fp8 x). Inference only (no gradient).
    """
    op = "fp8_linear"
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    quantized = x.dtype == torch.float8_e4m3fn
    if not quantized and x.dtype not in ACTIVATION_INPUT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float8_e4m3fn, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be a (..., K) tensor with K >= 1, got {tuple(x.shape)}")
    if not isinstance(weight, Tensor) or weight.dtype != torch.float8_e4m3fn:
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{op}: weight must be a torch.float8_e4m3fn tensor (quantize_fp8 makes one), got {got}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (N, K) with K = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    N, K = weight.shape
    M = x.numel() // K
    out_shape = (*x.shape[:-1], N)
    for name, value in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias), ("gate", gate),
                        ("residual", residual), ("x_scale", x_scale)):
        if isinstance(value, Tensor) and value.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {value.device}")
    weight_scale = _check_scale(op, "weight_scale", weight_scale, N, "per output channel")
    if quantized:
        if x_scale is None:
            raise ValueError(f"{op}: x is float8_e4m3fn, so x_scale (its dequantization scale) is required")
        x_scale = _check_scale(op, "x_scale", x_scale, M, "per token").expand(M).contiguous()
    elif x_scale is not None:
        raise ValueError(f"{op}: x_scale goes with a float8_e4m3fn x; x is {x.dtype} and is quantized here")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if quantized else x.dtype
    if out_dtype not in ACTIVATION_INPUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None:
        _checks.tensor(op, "bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    gate_rows = 1
    if gate is not None:
        _checks.tensor(op, "gate", gate)
        per_batch = x.dim() == 3 and tuple(gate.shape) == (x.shape[0], N)
        if not per_batch and tuple(gate.shape) != out_shape:
            expected = f"({x.shape[0]}, {N}) or {out_shape}" if x.dim() == 3 else str(out_shape)
            raise ValueError(f"{op}: gate must have shape {expected}, got {tuple(gate.shape)}")
        gate_rows = x.shape[1] if per_batch else 1
        gate = gate.reshape(-1, N)
    if residual is not None:
        _checks.tensor(op, "residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
        residual = residual.reshape(M, N)
    check_inference_only(op, (x, bias, gate, residual))
    if M == 0 or N == 0:  # no tokens or no output features: as nn.Linear, an empty output
        return torch.empty(out_shape, device=x.device, dtype=out_dtype)

    x2d = x.reshape(M, K)
    if not quantized and fp8_supported(x.device):
        x2d, x_scale = _quantize_rows(x2d)
    elif not quantized:
        weight = weight.to(x.dtype)  # no FP8 tensor cores: e4m3 values are exact in bf16/fp16/fp32
    out = _linear(x2d, x_scale, weight, weight_scale, bias, activation, gate, gate_rows, residual, out_dtype)
    return out.view(out_shape)


def quantize_weight(weight: Tensor, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """(codes (N, K) float8_e4m3fn, scale fp32 (N,) or one value) of a (N, K) weight, scaled so that
    each row's (or the tensor's) largest magnitude maps to 448."""
    _checks.tensor("quantize_weight", "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must have shape (N, K), got {tuple(weight.shape)}")
    if per_channel:
        return reference_quantize_rows(weight.detach())
    codes, scale = reference_quantize_rows(weight.detach().reshape(1, -1))
    return codes.view(weight.shape), scale


def example_args(device: torch.device, dtype: torch.dtype) -> tuple:
    """Small arguments of the linear op, for `fastgen-kernels info`."""
    x, x_scale = reference_quantize_rows(torch.randn(64, 96, device=device, dtype=dtype))
    weight, weight_scale = quantize_weight(torch.randn(80, 96, device=device))
    return (x, x_scale, weight, weight_scale, None, "gelu_tanh", None, 1, None, dtype)
