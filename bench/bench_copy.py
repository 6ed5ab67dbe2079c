"""The memory ceiling: device-to-device copy bandwidth (bytes read + written), measured in the same
run as the kernels so their GB/s can be reported as a fraction of it. On a GPU the copies are
replayed from a CUDA graph (``conftest.Graphed``): the ceiling is the copy kernel's own rate, not
lowered by a launch and a synchronization per copy (timed so, the H200 read 3745 GB/s, about 15%
below the 4.3 TB/s known for it)."""

import torch
from conftest import Graphed, rotating, run

N = 256 * 2**20 // 4  # 256 MiB of fp32 per copy


def test_copy_bandwidth(benchmark, device):
    def make():
        return torch.empty(N, device=device), torch.randn(N, device=device)

    next_pair = rotating(make, device, 2 * N * 4)

    def copy():
        dst, src = next_pair()
        dst.copy_(src)

    benchmark.group = f"copy {device}"
    timed = Graphed(copy) if device == "cuda" and not benchmark.disabled else copy
    run(benchmark, timed, device, peer_key=("copy", device), peer_fn=timed, bytes_moved=2 * N * 4,
        op="copy", provider="torch", dtype="torch.float32",
        mode="cuda_graph" if timed is not copy else "forward", shape=[N])
