"""Where the time of the open GPU goals' workloads goes: host (Python, dispatch, launches) or
device kernels, ours against the peer, with the torch profiler.

    python bench/profile_gpu.py [cuda|cpu] [workload ...]    (bench/gpu_check.sh runs it on a GPU)

Workloads: ``scm_step`` (bench_distill: the fused exact-JVP sCM step against eager + SDPA + finite
differences), ``dit_eval`` (bench_sampling: one fused network evaluation, FP8 on sm_89+, op by op,
against the eager one), ``sample_1_step`` (bench_sampling: a whole 1-step ``fk.sample`` call, the
CUDA graph's replay included, against a 2-step one: twice the first less the second is the
call's fixed cost) and ``vsd_loss`` (bench_losses:
fused against eager, fp32, 64x4x64x64).
For each side: the wall time of one call after warm-up, the summed time of the device's kernels
(on the CPU, of the ops' own CPU time), the number of kernels launched (ops run, on the CPU), and
the costliest kernels. A wall time well above the kernel time means the host bounds the call.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastgen_kernels as fk

sys.path.insert(0, str(Path(__file__).parent))  # the bench modules and their conftest

WARMUP, PROFILED = 3, 3


def scm_step(device: str):
    import bench_distill

    return (bench_distill.step_fn(device, "fused_exact_jvp"),
            bench_distill.step_fn(device, "eager_finite_difference"))


def dit_eval(device: str):
    import bench_sampling

    teacher, student = bench_sampling.models(device)
    config, batch = bench_sampling.CONFIGS[device]
    x = torch.randn(batch, 4, config.input_size, config.input_size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    labels = torch.arange(batch, device=device) % teacher.null_cond

    def evaluate(model):
        def call():
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                model.x0(x, t, labels)
        return call

    return evaluate(student), evaluate(teacher)


def sample_1_step(device: str):
    import bench_sampling

    _, student = bench_sampling.models(device)
    batch = bench_sampling.CONFIGS[device][1]
    labels = torch.arange(batch, device=device) % student.null_cond

    def steps(n):
        return lambda: fk.sample(student, n, batch_size=batch, cond=labels, seed=0, progress=False)

    return steps(1), steps(2)


def vsd_loss(device: str):
    import bench_losses

    eager, fused, *_ = bench_losses.LOSSES["vsd"]
    x_g = torch.randn(64, 4, 64, 64, device=device, requires_grad=True)
    teacher, fake = torch.randn_like(x_g).detach(), torch.randn_like(x_g).detach()
    weight = torch.rand(64, device=device) + 0.5

    def step(loss):
        return lambda: torch.autograd.grad(loss(x_g, teacher, fake, weight), x_g)

    return step(fused), step(eager)


WORKLOADS = {"scm_step": scm_step, "dit_eval": dit_eval, "sample_1_step": sample_1_step, "vsd_loss": vsd_loss}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def report(name: str, fn, device: str) -> None:
    for _ in range(WARMUP):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(PROFILED):
        fn()
    sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / PROFILED
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED):
            fn()
        sync(device)
    averages = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / PROFILED
        sort_by = "self_device_time_total"
    else:
        kernels = [e for e in averages if e.key.startswith(("aten::", "fastgen"))]
        kernel_ms = sum(e.self_cpu_time_total for e in kernels) / 1e3 / PROFILED
        sort_by = "self_cpu_time_total"
    launches = sum(e.count for e in kernels) / PROFILED
    print(f"{name}: wall {wall_ms:.2f} ms, kernels {kernel_ms:.2f} ms ({kernel_ms / wall_ms:.0%} of the wall "
          f"time), {launches:.0f} launches per call")
    print(averages.table(sort_by=sort_by, row_limit=6, max_name_column_width=60))


def main(device: str, names: list[str]) -> None:
    for name in names or list(WORKLOADS):
        ours, peer = WORKLOADS[name](device)
        report(f"{name} ours", ours, device)
        report(f"{name} peer", peer, device)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"), sys.argv[2:])
