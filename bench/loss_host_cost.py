"""The fixed cost of one loss call: forward + backward of each fused loss against its eager
composition (bench_losses.LOSSES) on tensors so small (64 x 64) that the kernels take no time, so
what is left is the host's work (Python, dispatch, autograd, launches): what bounds the losses at
training sizes on a GPU.

    python bench/loss_host_cost.py [cpu|cuda]

Prints the best of many short rounds per call (host_cost.best_us), ours against eager, and the ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench_losses and its conftest

import bench_losses  # noqa: E402
from host_cost import best_us  # noqa: E402

SHAPE, CALLS = (64, 64), 200


def main(device: str) -> None:
    for name, (eager, fused, num_inputs, per_sample, _) in bench_losses.LOSSES.items():
        first = torch.randn(SHAPE, device=device, requires_grad=True)
        inputs = (first, *(torch.randn(SHAPE, device=device) for _ in range(num_inputs - 1)),
                  *per_sample(SHAPE[0], device))
        ours, peer = (best_us(lambda fn=fn: torch.autograd.grad(fn(*inputs), first), device, CALLS)
                      for fn in (fused, eager))
        print(f"{name:12s} fused {ours:7.1f} us   eager {peer:7.1f} us   {peer / ours:.2f}x eager")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
