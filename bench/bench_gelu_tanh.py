"""gelu_tanh at the MLP hidden sizes of DiT-XL/2 and of the CPU sampling benchmark's small DiT:
our CPU kernel vs eager ``F.gelu(approximate="tanh")`` and torch.compile of it.

Run: ``pytest bench/bench_gelu_tanh.py``. Bytes moved (analytic): forward reads x and writes y;
forward+backward also reads grad_out and x and writes dx. CPU only: on a GPU the op is ATen's own
one-pass kernel (the GELU worth fusing there goes into the GEMM epilogue, bench_fp8_linear.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pick_provider, rotating, run

import fastgen_kernels as fk

SHAPES = [(8, 64, 768), (8, 256, 4608)]  # the small DiT of bench_sampling.py; DiT-XL/2 at 256 px
DTYPES = [torch.float32, torch.bfloat16]


def eager(x):
    return F.gelu(x, approximate="tanh")


_compiled = torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("provider", ["eager", "compile", "cpu"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gelu_tanh(benchmark, device, shape, dtype, mode, provider):
    if device != "cpu":
        pytest.skip("gelu_tanh has no GPU kernel of its own: ATen's is its GPU path")
    fn, backend = pick_provider(provider, device, eager, _compiled, fk.gelu_tanh)
    n = shape[0] * shape[1] * shape[2]
    itemsize = torch.empty(0, dtype=dtype).element_size()

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "forward")
        return x, torch.randn(shape, device=device, dtype=dtype)

    next_inputs = rotating(make_inputs, device, 2 * n * itemsize)

    def step(fn, backend):
        x, grad = next_inputs()
        with fk.use_backend(backend):
            y = fn(x)
            if mode == "forward_backward":
                torch.autograd.grad(y, x, grad)

    benchmark.group = f"gelu_tanh {device} {dtype} {mode} {'x'.join(map(str, shape))}"
    run(benchmark, lambda: step(fn, backend), device, peer_key=(device, shape, dtype, mode),
        peer_fn=lambda: step(eager, None), bytes_moved=(2 if mode == "forward" else 5) * n * itemsize,
        op="gelu_tanh", provider=provider, dtype=str(dtype), mode=mode, shape=list(shape))
