"""The memory ceiling: device-to-device copy bandwidth (bytes read + written), measured in the same
run as the kernels so their GB/s can be reported as a fraction of it."""

import torch
from conftest import rotating, run

N = 256 * 2**20 // 4  # 256 MiB of fp32 per copy


def test_copy_bandwidth(benchmark, device):
    def make():
        return torch.empty(N, device=device), torch.randn(N, device=device)

    next_pair = rotating(make, device, 2 * N * 4)

    def copy():
        dst, src = next_pair()
        dst.copy_(src)

    benchmark.group = f"copy {device}"
    run(benchmark, copy, device, peer_key=("copy", device), peer_fn=copy, bytes_moved=2 * N * 4,
        op="copy", provider="torch", dtype="torch.float32", mode="forward", shape=[N])
