"""The compute ceiling: a square matmul's rate (TFLOP/s, 2 n^3 flops) in each dtype the attention
kernels run, measured in the same run so their TFLOP/s can be reported as a fraction of it."""

import pytest
import torch
from conftest import run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_rate(benchmark, device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 matmul on this CPU is emulated: not a ceiling")
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def matmul():
        torch.mm(a, b)

    benchmark.group = f"matmul {device} {dtype}"
    run(benchmark, matmul, device, peer_key=("matmul", device, dtype), peer_fn=matmul,
        flops=2 * n**3, peer="itself", op="matmul", provider="torch", dtype=str(dtype),
        mode="forward", shape=[n, n, n])
