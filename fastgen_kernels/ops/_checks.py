"""Argument checks shared by the ops (clear errors that name the argument, before any launch) and
their dtype rules."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from fastgen_kernels.ops._eager_op import has_own_tangent, runs_as_composition

T = TypeVar("T")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what GPU kernels read
# The CUDA and Triton row kernels keep a row in registers (csrc/cuda/launch.h kMaxDim).
MAX_KERNEL_D = 8192


def kernel_dtype_pair(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether kernels over ``wide`` tensors also read or write a ``narrow`` one beside them (the
    mixed-dtype pairs, as csrc/torch_bindings.cpp's kernel_dtype_pair): the same dtype, or
    float16/bfloat16 beside float32 (autocast's activations beside an fp32 residual stream)."""
    return narrow == wide or (wide == torch.float32 and narrow in (torch.float16, torch.bfloat16))


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {value.dtype}"
        )
    return value


def activation(op: str, x: object) -> torch.Tensor:
    """x: a (B, L, D) floating tensor."""
    x = tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape (B, L, D), got {tuple(x.shape)}")
    return x


def like_x(op: str, name: str, value: object, x: torch.Tensor, shapes: list[tuple[int, ...]],
           any_float: bool = False) -> None:
    """``value`` must be a tensor with x's dtype (any floating dtype with ``any_float``) and
    device and one of ``shapes``."""
    value = tensor(op, name, value)
    if value.dtype != x.dtype and not any_float:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {value.device}")
    if tuple(value.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(value.shape)}")


def modulation(op: str, name: str, value: object, x: torch.Tensor, any_float: bool = False) -> None:
    """A modulation tensor: (B, D) broadcast over tokens, or (B, L, D) per token."""
    B, L, D = x.shape
    like_x(op, name, value, x, [(B, D), (B, L, D)], any_float)


def per_channel(op: str, name: str, value: object, x: torch.Tensor) -> None:
    """An optional affine parameter of shape (D,)."""
    if value is not None:
        like_x(op, name, value, x, [(x.shape[-1],)])


def linear_layer(op: str, names: tuple[str, str], weight: object, bias: object, x: torch.Tensor) -> None:
    """A linear layer after an activation of x, its arguments called ``names``: weight (N, D) with
    D = x.shape[-1], bias None or (N,), floating, on x's device (any floating dtype: autocast's or
    F.linear's rules apply)."""
    weight = tensor(op, names[0], weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: {names[0]} must have shape (N, {x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: {names[0]} must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        like_x(op, names[1], bias, x, [(weight.shape[0],)], any_float=True)


def gpu_kernel_support(x: torch.Tensor, *args: object) -> str | None:
    """Why the CUDA / Triton row kernels cannot take x (dtype, size), or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"{x.dtype} input (kernels read float16, bfloat16 and float32)"
    if x.shape[-1] > MAX_KERNEL_D:
        return f"D = {x.shape[-1]} exceeds the kernels' limit of {MAX_KERNEL_D}"
    return nonempty(x)


def gpu_kernel_operands_support(x: torch.Tensor, *args: object) -> str | None:
    """:func:`gpu_kernel_support`, and every tensor operand in a dtype the kernels read (an fp64
    operand beside fp32 x would be computed in fp64, which they do not)."""
    wide = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype not in KERNEL_DTYPES), None)
    if wide is not None:
        return f"a {wide} operand (kernels read float16, bfloat16 and float32)"
    return gpu_kernel_support(x)


def nonempty(x: torch.Tensor, *args: object) -> str | None:
    return "empty input" if x.numel() == 0 else None


def heads(op: str, name: str, value: object) -> torch.Tensor:
    """A (B, L, H, Dh) floating tensor of attention heads."""
    value = tensor(op, name, value)
    if value.dim() != 4:
        raise ValueError(f"{op}: {name} must have shape (B, L, H, Dh), got {tuple(value.shape)}")
    return value


def like(op: str, name: str, value: object, ref_name: str, ref: torch.Tensor,
         shapes: list[tuple[int, ...]], optional: bool = False) -> None:
    """``value`` must be a tensor with the dtype and device of ``ref`` (called ``ref_name``) and
    one of ``shapes``; None passes when ``optional``."""
    if value is None and optional:
        return
    value = tensor(op, name, value)
    for prop, error in (("dtype", TypeError), ("device", ValueError)):
        want, got = getattr(ref, prop), getattr(value, prop)
        if got != want:
            raise error(f"{op}: {name} must have {ref_name}'s {prop} {want}, got {got}")
    if tuple(value.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(value.shape)}")


def rotary_tables(op: str, cos: object, sin: object, q: torch.Tensor, k: torch.Tensor) -> None:
    """cos, sin: both None, or constant (L, Dh) float tables (any float dtype) on q's device for
    q (B, L, H, Dh) and k (B, L, H, Dh) of one length L and an even head dim Dh."""
    if cos is None and sin is None:
        return
    for name, value, other in (("cos", cos, "sin"), ("sin", sin, "cos")):
        if value is None:
            raise ValueError(f"{op}: {name} is None but {other} is given; pass both or neither")
        value = tensor(op, name, value)
        if value.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {value.device}")
        if value.requires_grad:
            raise ValueError(f"{op}: {name} must not require grad (rotary tables are constants)")
        if not runs_as_composition() and has_own_tangent(value):  # (the composition takes it)
            raise ValueError(f"{op}: {name} must not carry a forward-mode tangent (rotary tables are constants)")
    L, Dh = q.shape[1], q.shape[-1]
    if k.shape[1] != L:
        raise ValueError(f"{op}: cos and sin need q and k of one length (one table for both), "
                         f"got Lq = {L} and Lk = {k.shape[1]}")
    if Dh % 2:
        raise ValueError(f"{op}: rotary embedding needs an even head dim, q has Dh = {Dh}")
    for name, value in (("cos", cos), ("sin", sin)):
        if tuple(value.shape) != (L, Dh):
            raise ValueError(f"{op}: {name} must have shape (L, Dh) = {(L, Dh)}, "
                             f"got {tuple(value.shape)}")


# --------------------------------------------------------------------------- per-sample losses


def samples(op: str, **tensors: object) -> torch.Tensor:
    """Loss inputs: non-empty (B, ...) floating tensors of one shape, dtype and device, given as
    name=value in order; the first is the reference the others are checked against. Returns it."""
    (first_name, first), *others = tensors.items()
    first = tensor(op, first_name, first)
    if first.dim() == 0 or first.numel() == 0:
        raise ValueError(f"{op}: {first_name} must be a non-empty (B, ...) tensor, "
                         f"got shape {tuple(first.shape)}")
    for name, value in others:
        like(op, name, value, first_name, first, [tuple(first.shape)])
    return first


def per_sample(op: str, name: str, value: object, ref_name: str, ref: torch.Tensor,
               required: bool = False) -> None:
    """A per-sample scalar: a (B,) floating tensor (any float dtype) on the device of ``ref``
    (called ``ref_name``), B = ref.shape[0]; or None unless ``required``."""
    if value is None:
        if required:
            raise ValueError(f"{op}: {name} is required: a (B,) tensor, one value per sample of {ref_name}")
        return
    value = tensor(op, name, value)
    if value.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {value.device}")
    if tuple(value.shape) != (ref.shape[0],):
        raise ValueError(f"{op}: {name} must have shape (B,) = ({ref.shape[0]},), one value per "
                         f"sample of {ref_name}, got {tuple(value.shape)}")


REDUCTIONS = ("mean", "none")


def reduction(op: str, value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


# fp32's smallest normal number: the kernels compute in fp32, where a smaller constant is 0 or
# loses its digits (an eps that vanishes divides by zero; a vanishing pseudo-Huber c turned it into
# the squared L2 on one backend and not on another)
FP32_TINY = torch.finfo(torch.float32).tiny


def real_number(value: object) -> bool:
    """A real number: int, float or a NumPy scalar (numbers.Real), not a bool (nor a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(op: str, name: str, value: object, smallest: float = FP32_TINY) -> float:
    """A finite number >= ``smallest`` (default: fp32's smallest normal, 1.2e-38), > 0; an
    infinite eps or constant would make the op's result 0 or NaN."""
    if not real_number(value) or not 0 < value < float("inf") or value < smallest:
        raise ValueError(f"{op}: {name} must be a positive number of at least {smallest:.3g} (the kernels "
                         f"compute in fp32), got {value!r}")
    return float(value)


def non_negative(op: str, name: str, value: object) -> float:
    """A finite number >= 0."""
    if not real_number(value) or not 0 <= value < float("inf"):
        raise ValueError(f"{op}: {name} must be a finite non-negative number, got {value!r}")
    return float(value)


def in_range(op: str, name: str, value: object, low: float, high: float) -> float:
    if not real_number(value) or not low <= value <= high:
        raise ValueError(f"{op}: {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def loss_kernel_support(x: torch.Tensor, *args: object) -> str | None:
    """Why the CUDA / Triton loss kernels cannot take x (dtype), or None. Loss kernels stream
    over samples of any size: no limit on D."""
    if x.dtype not in KERNEL_DTYPES:
        return f"{x.dtype} input (kernels read float16, bfloat16 and float32)"
    return nonempty(x)


def without_autocast(reference: Callable[..., T]) -> Callable[..., T]:
    """A reference computation (its own compute dtype, the first argument's device) with autocast
    off for that device: autocast would run its matmuls in bf16 and differ from the kernels."""
    @functools.wraps(reference)
    def run(first: Tensor, *args: Any, **kwargs: Any) -> T:
        if not torch.amp.is_autocast_available(first.device.type):
            return reference(first, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return reference(first, *args, **kwargs)
    return run
