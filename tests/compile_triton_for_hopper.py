"""Compiles every Triton kernel of the project for sm_90 (Hopper) on a machine without a GPU.

The interpreter runs the kernels' logic on the CPU but not the GPU compiler: it accepts code the
compiler rejects (a non-constexpr global, an unsupported layout) and says nothing about shared
memory. This script records the launches the op launchers make on small CPU tensors (the launch
itself is replaced by the recording), turns each into a signature, compiles it with Triton's
compiler and ptxas for sm_90, and fails when a kernel does not compile or needs more shared
memory than a Hopper block gets. Each kernel's line also gives its registers a thread and its
stack (registers spilled to local memory). Run without TRITON_INTERPRET (tests/test_build.py does):

    python tests/compile_triton_for_hopper.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

import fastgen_kernels as fk
from fastgen_kernels.ops import _sample_loss as sl
from fastgen_kernels.triton_ops import attention as triton_attention
from fastgen_kernels.triton_ops import fp8_linear as triton_fp8_linear
from fastgen_kernels.triton_ops import gan_loss as triton_gan_loss
from fastgen_kernels.triton_ops import modulated_norm as triton_modulated_norm
from fastgen_kernels.triton_ops import qk_norm_rope as triton_qk_norm_rope
from fastgen_kernels.triton_ops import sample_loss_tail as triton_sample_loss_tail
from fastgen_kernels.triton_ops import squared_residual as triton_squared_residual

HOPPER = GPUTarget("cuda", 90, 32)
# an H100/H200 SM: 228 KB of shared memory (at most 227 KB a block, 1 KB reserved a block), 64K
# 32-bit registers
HOPPER_SM_SHARED_BYTES, HOPPER_RESERVED_SHARED_BYTES, HOPPER_SM_REGISTERS = 228 * 1024, 1024, 65536
launches: list[tuple[JITFunction, dict, dict]] = []


def record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: remembers the kernel and its arguments, launches nothing."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(self.arg_names, args)) | kwargs
    launches.append((self, bound, options))


def specialization(kernel: JITFunction, bound: dict) -> tuple[dict, dict, dict]:
    """The signature, constants and attributes Triton's JIT compiles these arguments with: the
    same specialization (integers equal to 1 become constants; pointers to 16-byte aligned data
    and integers that are multiples of 16 get the divisibility hint that lets loads be
    vectorized and pipelined through cp.async), so that the shared memory checked is the GPU's."""
    sig, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            sig[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        sig[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif isinstance(attr, str):
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return sig, constexprs, attrs


def record_all_launches() -> None:
    """Calls every Triton launcher: each op's forward and backward on its example arguments in
    fp32 and bf16, the modulated norm's and QK-norm's JVPs, and attention at split head dims
    (72 = 64 + 16, 96 = 64 + 32, in bf16 and fp32) and the widest one, causal or not, JVP included (all three modes: O computed, O and lse given,
    O given)."""
    for name, module in fk.ops.OP_MODULES.items():
        if name == "fp8_linear":  # autotuned: every configuration, below
            continue
        if "triton" not in module.forward_dispatcher.impls:  # no Triton kernel (gelu_tanh)
            continue
        for dtype in (torch.float32, torch.bfloat16):
            args = module.example_args(torch.device("cpu"), dtype)
            module.forward_dispatcher.impls["triton"](*args)
            if hasattr(module, "backward_dispatcher"):  # inference-only ops have none
                module.backward_dispatcher.impls["triton"](*module.example_backward_args(*args))
    record_fp8_linear_launches()
    # the constexpr variants the example arguments leave out
    x, s = torch.randn(2, 3, 16), torch.rand(2)
    triton_squared_residual.sums(x, x, None, None)
    triton_squared_residual.scaled_residual(x, x, None, None, s, None, True)
    triton_gan_loss.sums(x, False)
    triton_gan_loss.backward(x, False, s, s)
    for kind, (nsums, _) in sl.TAIL_WIDTHS.items():  # every tail, mean or not, weighted or not
        for mean in (True, False):
            triton_sample_loss_tail.tail(torch.rand(2, 3, nsums), s, s, s, kind, [1.0, 0.1, 1.0, 0.1], 48, mean)
            triton_sample_loss_tail.tail(torch.rand(2, 1, nsums), None, s, s, kind, [1.0, 0.0, 0.0, 0.1], 48, mean)
    for dtype in (torch.float32, torch.bfloat16):  # the norm's JVP: every tangent, and the DiT's
        xd, mod, w = x.to(dtype), torch.randn(2, 16, dtype=dtype), torch.randn(16, dtype=dtype)
        stats = torch.randn(2, 3), torch.rand(2, 3)
        for rms in (False, True):
            triton_modulated_norm.jvp(xd, mod, w, w, *stats, rms, xd, mod, mod, w, w)
            triton_modulated_norm.jvp(xd, mod, None, None, *stats, rms, xd, mod, mod, None, None)
        # QK-norm + RoPE's JVP: rotary or not, with weights and their tangents, and the DiT's (x's alone)
        heads, angles, dh_w = torch.randn(1, 3, 2, 64, dtype=dtype), torch.randn(3, 64), torch.randn(64, dtype=dtype)
        for tables in ((angles.cos(), angles.sin()), (None, None)):
            triton_qk_norm_rope.jvp_one(heads, dh_w, *tables, torch.rand(1, 3, 2), True, heads, dh_w)
            triton_qk_norm_rope.jvp_one(heads, None, *tables, torch.rand(1, 3, 2), False, heads, None)
            triton_qk_norm_rope.jvp_one(heads, dh_w, *tables, torch.rand(1, 3, 2), True, None, dh_w)
    for head_dim, dtype in [(72, torch.bfloat16), (96, torch.bfloat16), (256, torch.bfloat16),
                            (72, torch.float32), (96, torch.float32)]:
        q = torch.randn(1, 16, 2, head_dim, dtype=dtype)
        o, lse = torch.empty_like(q), torch.empty(1, 2, 16)
        for chunk in (0, 1):
            triton_attention.forward(q, q, q, 0.1, chunk)
            triton_attention.backward(q, q, q, q, o, lse, 0.1, chunk)
            triton_attention.jvp(q, q, q, q, q, q, 0.1, chunk)
            triton_attention.jvp(q, q, q, q, None, q, 0.1, chunk, saved=(o, lse))
            # SDPA's output in its heads-first memory, without its log-sum-exp (the one-pass step)
            heads_first_o = o.transpose(1, 2).contiguous().transpose(1, 2)
            triton_attention.jvp(q, q, q, q, q, q, 0.1, chunk, saved=(heads_first_o, None))


def record_fp8_linear_launches() -> None:
    """The quantizer, and the FP8 GEMM in each autotuning configuration of its variants (tiled,
    persistent TMA, persistent TMA with the TMA store) with the two DiT epilogues (fc1: bias +
    GELU; out-projection / fc2: bias, per-batch gate, residual), plus the bf16 operands of GPUs
    without FP8 in their own tiles (tiled only: TMA needs Hopper, which has FP8)."""
    x = torch.randn(256, 1152, dtype=torch.bfloat16)
    for K in (1152, 4608, 12288):  # several rows a program; one; two passes
        triton_fp8_linear.quantize_rows(torch.randn(64, K, dtype=torch.bfloat16))
    codes = torch.empty(256, 1152, dtype=torch.float8_e4m3fn)
    scale, bias, gate = torch.ones(256), torch.ones(1152), torch.ones(2, 1152, dtype=torch.bfloat16)
    out = torch.empty(256, 1152, dtype=torch.bfloat16)
    epilogues = [dict(HAS_BIAS=True, ACTIVATION=1, HAS_GATE=False, HAS_RESIDUAL=False),
                 dict(HAS_BIAS=True, ACTIVATION=0, HAS_GATE=True, HAS_RESIDUAL=True)]
    cases = [(config, operands, x_scale, epilogue)
             for config in (triton_fp8_linear._TILED_CONFIGS + triton_fp8_linear._TMA_CONFIGS
                            + triton_fp8_linear._TMA_STORE_CONFIGS)
             for operands, x_scale, epilogue in [(codes, scale, epilogues[0]), (codes, scale, epilogues[1])]]
    cases += [(config, x, None, epilogues[1]) for config in triton_fp8_linear._WIDE_OPERAND_CONFIGS]
    for config, operands, x_scale, epilogue in cases:
        descriptors = [None] * 4
        if config.kwargs["TMA"]:
            descriptors[:2] = (TensorDescriptor.from_tensor(operands, [1, 1]) for _ in range(2))
        if config.kwargs["TMA_STORE"]:
            residual = TensorDescriptor.from_tensor(out, [1, 1]) if epilogue["HAS_RESIDUAL"] else None
            descriptors[2:] = (residual, TensorDescriptor.from_tensor(out, [1, 1]))
        if config.kwargs["TMA"]:
            config.pre_hook(dict(zip(("X_DESC", "W_DESC", "RESIDUAL_DESC", "OUT_DESC"), descriptors),
                                 **config.kwargs))
        triton_fp8_linear._linear_kernel[(1,)](
            operands, x_scale, operands, scale[:1152], bias, gate, out, out, *descriptors,
            256, 1152, 1152, 128, HAS_X_SCALE=x_scale is not None, PER_CHANNEL=True, IEEE=False,
            **epilogue, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def resource_usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers a thread, stack bytes a thread) of the kernel in a cubin, by the cuobjdump Triton
    ships (None without it): a stack above zero is registers spilled to local memory, which costs
    a memory round trip per use."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([str(tool), "-res-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return (int(found[1]), int(found[2])) if found else None


def fit_problem(shared: int, usage: tuple[int, int] | None, warps: int, per_sm: int) -> str | None:
    """Why ``per_sm`` programs of a kernel cannot share a Hopper SM (None when they can): each
    needs its shared memory plus the 1 KB the driver reserves a block, and its registers."""
    limit = (triton_attention.SHARED_MEMORY_BYTES if per_sm == 1
             else HOPPER_SM_SHARED_BYTES // per_sm - HOPPER_RESERVED_SHARED_BYTES)
    if shared > limit:
        return f"too much shared memory: {shared} bytes, {limit} for {per_sm} program(s) an SM"
    # registers are allocated a warp at a time, in multiples of 8 a thread
    if usage is not None and per_sm * -(-usage[0] // 8) * 8 * warps * 32 > HOPPER_SM_REGISTERS:
        return f"too many registers: {usage[0]} a thread for {per_sm} programs of {warps} warps an SM"
    return None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")
    JITFunction.run = record
    record_all_launches()
    failures, seen = [], set()
    for kernel, bound, options in launches:
        sig, constexprs, attrs = specialization(kernel, bound)
        key = (kernel.__name__, kernel.fn.__module__, tuple(sig.items()),
               tuple(sorted(map(str, constexprs.items()))), str(attrs), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        operand = next(t for t in sig.values() if t.startswith("*"))[1:]
        name = f"{kernel.fn.__module__.split('.')[-1]}.{kernel.__name__} {operand} {constexprs}"
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=HOPPER,
                                      options=options)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures.append(f"{name}: {str(error).splitlines()[-1] if str(error) else error!r}")
            continue
        shared = compiled.metadata.shared
        usage = resource_usage(compiled.asm["cubin"])
        problem = fit_problem(shared, usage, options.get("num_warps", 4), constexprs.get("PROGRAMS_PER_SM", 1))
        usage_text = "" if usage is None else f" registers={usage[0]} stack={usage[1]}"
        print(f"{'ok' if problem is None else problem.upper()}: {name} shared={shared}{usage_text}")
        if problem is not None:
            failures.append(f"{name}: {problem}")
    print(f"{len(seen)} kernel variants compiled for sm_90, {len(failures)} failed")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
