"""The compute ceiling: a square matmul's rate (TFLOP/s, 2 n^3 flops) in each dtype the attention
kernels run, and FP8's (torch._scaled_mm of e4m3 operands, sm_89+ GPUs) for fp8_linear, measured
in the same run so their TFLOP/s can be reported as a fraction of it."""

import pytest
import torch
from conftest import run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_matmul_rate(benchmark, device, dtype):
    if device == "cpu" and dtype != torch.float32:
        pytest.skip(f"{dtype} matmul on this CPU is emulated: not a ceiling")
    if dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores before sm_89")
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    one = torch.ones((), device=device)

    def matmul():
        if dtype == torch.float8_e4m3fn:  # b given column-major, as _scaled_mm requires
            torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        else:
            torch.mm(a, b)

    benchmark.group = f"matmul {device} {dtype}"
    run(benchmark, matmul, device, peer_key=("matmul", device, dtype), peer_fn=matmul,
        flops=2 * n**3, peer="itself", op="matmul", provider="torch", dtype=str(dtype),
        mode="forward", shape=[n, n, n])
