"""modulated_layer_norm at DiT-XL shapes: our backends vs the eager composition and torch.compile.

Run: ``pytest bench/bench_modulated_norm.py`` (add ``--benchmark-json=out.json`` for the record).
Bytes moved (analytic, the minimum any implementation must move): forward reads x and writes y;
forward+backward also reads grad_out and x and writes dx; the JVP (forward-mode AD along x, shift
and scale, no grad) also reads tx and writes ty. The (B, D) modulation is negligible. The JVP's
peer is PyTorch's forward-mode AD through the eager composition; its tangent is our kernel on the
triton and cpu backends and the PyTorch formula on the others (torch.compile does not trace dual
tensors: no compile row). ``test_modulated_layer_norm_graphed`` (GPU) times the same calls as
CUDA-graph replays: the kernels' own time.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import ALL_PROVIDERS, Graphed, pick_provider, rotating, run

import fastgen_kernels as fk

SHAPES = [(8, 256, 1152), (8, 1024, 1152)]  # DiT-XL/2 at 256 px and 512 px
DTYPES = [torch.float32, torch.bfloat16]


def eager(x, shift, scale):
    D = x.shape[-1]
    return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


_compiled = torch.compile(eager, dynamic=False)


def fused(x, shift, scale):
    return fk.modulated_layer_norm(x, shift, scale)


BYTES_PER_ELEMENT = {"forward": 2, "forward_backward": 5, "jvp": 4}


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward", "jvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulated_layer_norm(benchmark, device, shape, dtype, mode, provider):
    if mode == "jvp" and provider == "compile":
        pytest.skip("torch.compile does not trace forward-mode AD")
    fn, backend = pick_provider(provider, device, eager, _compiled, fused)
    step, n, itemsize = stepper(device, shape, dtype, mode)
    B, L, D = shape
    benchmark.group = f"modulated_layer_norm {device} {dtype} {mode} {B}x{L}x{D}"
    run(benchmark, lambda: step(fn, backend), device,
        peer_key=(device, shape, dtype, mode), peer_fn=lambda: step(eager, None),
        bytes_moved=BYTES_PER_ELEMENT[mode] * n * itemsize,
        op="modulated_layer_norm", provider=provider, dtype=str(dtype), mode=mode, shape=list(shape))


@pytest.mark.parametrize("provider", ["eager", "compile", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward", "jvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulated_layer_norm_graphed(benchmark, device, shape, dtype, mode, provider):
    """The same calls replayed from a CUDA graph (``conftest.Graphed``, mode ``<mode>_graph``): the
    kernels' time, whose GB/s against the copy bandwidth says how far these row kernels are from
    the memory's rate (one call at a time these sizes are bound by the host)."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if mode == "jvp" and provider == "compile":
        pytest.skip("torch.compile does not trace forward-mode AD")
    fn, backend = pick_provider(provider, device, eager, _compiled, fused)
    step, n, itemsize = stepper(device, shape, dtype, mode)
    B, L, D = shape

    def graphed(fn, backend):
        step(fn, backend)  # compile before the capture
        return Graphed(lambda: step(fn, backend))

    benchmark.group = f"modulated_layer_norm {device} {dtype} {mode}_graph {B}x{L}x{D}"
    run(benchmark, graphed(fn, backend), device, peer_key=(device, shape, dtype, mode, "graphed"),
        peer_fn=graphed(eager, None), bytes_moved=BYTES_PER_ELEMENT[mode] * n * itemsize,
        op="modulated_layer_norm", provider=provider, dtype=str(dtype), mode=f"{mode}_graph", shape=list(shape))


def stepper(device: str, shape: tuple, dtype: torch.dtype, mode: str):
    """(step(fn, backend): one call of ``mode`` on the next of the rotating input sets, under
    ``backend``; the elements of x; their item size)."""
    B, L, D = shape
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = B * L * D

    def make_inputs():
        grad = mode == "forward_backward"
        x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=grad)
        shift, scale = (torch.randn(B, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
        return x, shift, scale, torch.randn(B, L, D, device=device, dtype=dtype)

    # a set's bytes that a call reads: x, and the upstream gradient or x's tangent
    next_inputs = rotating(make_inputs, device, (1 if mode == "forward" else 2) * n * itemsize)

    def step(fn, backend):
        x, shift, scale, grad = next_inputs()
        with fk.use_backend(backend):
            if mode == "jvp":  # grad (B, L, D) is x's tangent; shift's and scale's are their own values
                with torch.no_grad(), fwAD.dual_level():
                    fwAD.unpack_dual(fn(fwAD.make_dual(x, grad), fwAD.make_dual(shift, shift),
                                        fwAD.make_dual(scale, scale))).tangent
                return
            y = fn(x, shift, scale)
            if mode == "forward_backward":
                torch.autograd.grad(y, (x, shift, scale), grad)

    return step, n, itemsize


def unfused_fp8(x, shift, scale):
    """What FP8 inference did before the fused op: the norm in x's dtype, then per-token
    quantization (as fp8_linear calls it)."""
    y = fk.modulated_layer_norm(x, shift, scale)
    return fk.ops.OP_MODULES["fp8_linear"]._quantize_rows(y.reshape(-1, y.shape[-1]))


@pytest.mark.parametrize("shape", [(64, 256, 1152), (8, 1024, 1152)], ids=lambda s: "x".join(map(str, s)))
def test_modulated_layer_norm_fp8(benchmark, device, shape):
    """The norm written as e4m3 codes + scales (the next FP8 layer's input) against the norm and
    the quantizer as two kernels, bf16, inference (DiT-XL/2: batch 64 at 256 px, 8 at 512 px),
    both timed as CUDA-graph replays (kernel time, as the sampler runs them). Bytes moved: x
    read, codes written (the unfused path also writes y and reads it back)."""
    if device != "cuda" or not fk.ops.OP_MODULES["fp8_linear"].fp8_supported(torch.device(device)):
        pytest.skip("a GPU with e4m3 (sm_89+): on the CPU both paths are the reference")
    B, L, D = shape
    make_inputs = lambda: (torch.randn(B, L, D, device=device, dtype=torch.bfloat16),  # noqa: E731
                           *(torch.randn(B, D, device=device, dtype=torch.bfloat16) for _ in range(2)))
    next_inputs = rotating(make_inputs, device, 2 * B * L * D)

    def graphed(fn):
        def step():
            with torch.no_grad():
                fn(*next_inputs())
        step()  # compile before the capture
        return Graphed(step)

    benchmark.group = f"modulated_layer_norm_fp8 {device} {B}x{L}x{D}"
    run(benchmark, graphed(fk.modulated_layer_norm_fp8), device, peer_key=("fp8", device, shape),
        peer_fn=graphed(unfused_fp8), peer="norm + quantize_fp8_rows", bytes_moved=3 * B * L * D,
        op="modulated_layer_norm_fp8", provider="fused", dtype=str(torch.bfloat16), mode="cuda_graph",
        shape=list(shape))
