"""Host cost (Python, dispatch, autograd) of the fused paths where tensors are so small that the
kernels take no time, against the eager composition: what bounds them on a GPU when the host is
the slower side. One thread, best of several rounds.

    python bench/host_cost.py [cpu|cuda]

- ``gated_residual``, ``modulated_layer_norm_linear``: forward + backward at (2, 4, 32), ours
  (C++ autograd on the cpu/cuda backends) against x + gate * y and F.linear(modulated LN).
- ``scm_step``: bench_distill's sCM step (ours: fused DiT, exact JVP; peer: eager + SDPA +
  finite-difference JVP) with a DiT of depth 28 (DiT-XL's) but hidden 32, batch 2.
- ``sample``: ``fk.sample`` of a 1-step student whose network is the identity (the call's own
  work), and the CUDA-graph key of DiT-XL/2 (built on the meta device), which a CUDA call adds.
(The losses' fixed cost: bench/loss_host_cost.py.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # bench_distill and its conftest

import fastgen_kernels as fk  # noqa: E402
from fastgen_kernels import sampling  # noqa: E402
from fastgen_kernels.models import DiT, DiTConfig  # noqa: E402


def best_us(fn, device: str, calls: int, rounds: int = 30) -> float:
    """The best over ``rounds`` of the mean time of ``calls`` calls: many short rounds, since a
    shared machine's stalls last longer than one."""
    for _ in range(max(3, calls)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def report(name: str, ours: float, peer: float, peer_name: str) -> None:
    unit, scale = ("ms", 1e-3) if ours > 5000 else ("us", 1.0)
    print(f"{name:28s} ours {ours * scale:8.1f} {unit}   {peer_name} {peer * scale:8.1f} {unit}   {peer / ours:.2f}x")


def fused_ops(device: str) -> None:
    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    x, y, gate = leaf(2, 4, 32), leaf(2, 4, 32), leaf(2, 32)
    shift, scale, weight, bias = leaf(2, 32), leaf(2, 32), leaf(96, 32), leaf(96)

    def step(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
        return run

    report("gated_residual", best_us(step(lambda: fk.gated_residual(x, y, gate)), device, 200),
           best_us(step(lambda: x + gate[:, None] * y), device, 200), "eager")
    eager = step(lambda: F.linear(F.layer_norm(x, (32,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                                  weight, bias))
    report("modulated_layer_norm_linear",
           best_us(step(lambda: fk.modulated_layer_norm_linear(x, shift, scale, weight, bias)), device, 200),
           best_us(eager, device, 200), "eager")


def scm_step(device: str) -> None:
    import bench_distill

    bench_distill.CONFIGS[device] = (DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=28,
                                               num_heads=2, num_classes=10), 2)
    ours = bench_distill.step_fn(device, "fused_exact_jvp")
    peer = bench_distill.step_fn(device, "eager_finite_difference")
    report("scm_step (depth 28)", best_us(ours, device, 2, rounds=15), best_us(peer, device, 2, rounds=15),
           "eager+FD")


class Identity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, cond=None):
        return x


def sample(device: str) -> None:
    student = fk.Denoiser(Identity().to(device), "rf", "flow", distilled=True, shape=(4, 4, 4))
    call = best_us(lambda: fk.sample(student, 1, batch_size=2, seed=0, progress=False, cuda_graph=False), device, 100)
    with torch.device("meta"):
        dit_xl = fk.Denoiser(DiT(DiTConfig.preset("XL/2")), "rf", "flow")
    key = best_us(lambda: sampling.graph_state(dit_xl), "cpu", 50)
    print(f"{'sample, 1 step':28s} the call {call:8.1f} us   DiT-XL's CUDA-graph key {key:8.1f} us")


def main(device: str) -> None:
    torch.set_num_threads(1)
    fused_ops(device)
    scm_step(device)
    sample(device)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
