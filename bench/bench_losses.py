"""The fused losses (fastgen_kernels.losses), forward + backward, against the eager PyTorch
composition of METHODS.md and torch.compile of it.

Run: ``pytest bench/bench_losses.py`` (add ``--benchmark-json=out.json`` for the record).
Shapes: SD latents B=64 x 4x64x64 and Wan-style video latents B=8 x 16x60x104 (fp32 and bf16).
Bytes moved (analytic minimum): VSD reads x_g, T, Fk once forward, then T and Fk and writes dx;
denoising reads pred and target forward, again backward, and writes dpred.

Besides time, ``extra_info`` records ``peak_extra_bytes``: the most memory the step holds at once
beyond its inputs (so activations of the composition, pseudo-targets, gradients), and its ratio
to eager's. GPU: torch.cuda.max_memory_allocated above the memory allocated before the step.
CPU: the torch profiler with profile_memory=True, which records every CPU allocation and free of
torch's allocator with a timestamp (allocations attributed to the op making them as its
self_cpu_memory_usage, frees outside ops as [memory] events); the running sum in time order
peaks at the step's peak extra memory. Inductor's CPU buffers go through the same allocator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_PROVIDERS, pick_provider, rotating, run
from torch.profiler import ProfilerActivity, profile

import fastgen_kernels as fk

SHAPES = [(64, 4, 64, 64), (8, 16, 60, 104)]
DTYPES = [torch.float32, torch.bfloat16]
_peer_peak: dict = {}


def eager_vsd(x_g, teacher, fake):
    dims = tuple(range(1, x_g.dim()))
    w = 1 / ((x_g - teacher).abs().mean(dims, keepdim=True) + 1e-6)
    grad = (fake - teacher) * w
    target = (x_g - grad).detach()
    return 0.5 * F.mse_loss(x_g.float(), target.float())


def eager_denoising(pred, target):
    return F.mse_loss(pred.float(), target.float())


def fused_vsd(x_g, teacher, fake):
    return fk.losses.vsd_loss(x_g, teacher, fake)


def fused_denoising(pred, target):
    return fk.losses.denoising_loss(pred, target)


LOSSES = {
    # name: (eager, compiled, fused, inputs, reads + writes of whole tensors)
    "vsd": (eager_vsd, torch.compile(eager_vsd, dynamic=False), fused_vsd, 3, 6),
    "denoising": (eager_denoising, torch.compile(eager_denoising, dynamic=False), fused_denoising,
                  2, 5),
}


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory held during fn() beyond what was allocated before it (see the docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_forward_backward(benchmark, device, loss, shape, dtype, provider):
    eager, compiled, fused, num_inputs, passes = LOSSES[loss]
    fn, backend = pick_provider(provider, device, eager, compiled, fused)
    n = torch.Size(shape).numel()
    itemsize = torch.empty(0, dtype=dtype).element_size()

    def make_inputs():
        first = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        return (first, *(torch.randn(shape, device=device, dtype=dtype) for _ in range(num_inputs - 1)))

    next_inputs = rotating(make_inputs, device, num_inputs * n * itemsize)

    def step(fn, backend):
        inputs = next_inputs()
        with fk.use_backend(backend):
            torch.autograd.grad(fn(*inputs), inputs[0])

    benchmark.group = f"{loss}_loss {device} {dtype} forward_backward {'x'.join(map(str, shape))}"
    key = (loss, device, shape, dtype)
    step(fn, backend)  # compile / warm up before measuring memory
    peak = peak_extra_bytes(lambda: step(fn, backend), device)
    if key not in _peer_peak:
        step(eager, None)
        _peer_peak[key] = peak_extra_bytes(lambda: step(eager, None), device)
    run(benchmark, lambda: step(fn, backend), device, peer_key=key, peer_fn=lambda: step(eager, None),
        bytes_moved=passes * n * itemsize, op=f"{loss}_loss", provider=provider, dtype=str(dtype),
        mode="forward_backward", shape=list(shape), peak_extra_bytes=peak,
        peer_peak_extra_bytes=_peer_peak[key], memory_vs_peer=peak / max(_peer_peak[key], 1))
