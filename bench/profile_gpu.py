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
For the sCM step (``DETAILED``) also the ops by input shapes and dtypes and by the line of this
project that issued them (the innermost frame under fastgen_kernels/ or bench/), costliest
first: where its kernel time goes.
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
DETAILED = {"scm_step"}  # workloads whose ops are also listed by shapes and by source line


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


def report(name: str, fn, device: str, detailed: bool = False) -> None:
    for _ in range(WARMUP):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(PROFILED):
        fn()
    sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / PROFILED
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # verbose: Python frames recorded on every op, for the by-source table
    config = torch._C._profiler._ExperimentalConfig(verbose=True) if detailed else None
    with profile(activities=activities, record_shapes=detailed, with_stack=detailed,
                 experimental_config=config) as prof:
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
    if detailed:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=30, max_name_column_width=40, max_shapes_column_width=90))
        by_source(prof, device)


def by_source(prof, device: str, rows: int = 30) -> None:
    """The ops' own time (their kernels' on a GPU) summed by op and by the innermost line of this
    project that issued them, costliest first, per call of the workload."""
    totals: dict[tuple[str, str], list[float]] = {}
    for event in prof.events():
        if not event.name.startswith(("aten::", "fastgen")):
            continue
        spent = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if spent <= 0:
            continue
        # (a dispatcher's range, fastgen.<op>, is issued from backends.py: the line that called it)
        ours = [frame for frame in event.stack if ("fastgen_kernels/" in frame or "/bench/" in frame)
                and "fastgen_kernels/backends.py" not in frame]
        source = ours[0].split("fastgen_kernels/")[-1] if ours else "(no Python frame: autograd's backward)"
        entry = totals.setdefault((event.name, source), [0.0, 0])
        entry[0] += spent
        entry[1] += 1
    print(f"{'ms per call':>12} {'ops':>6}  op  <-  source")
    for (name, source), (spent, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{spent / 1e3 / PROFILED:12.2f} {count / PROFILED:6.0f}  {name}  <-  {source}")


def main(device: str, names: list[str]) -> None:
    for name in names or list(WORKLOADS):
        ours, peer = WORKLOADS[name](device)
        report(f"{name} ours", ours, device, name in DETAILED)
        report(f"{name} peer", peer, device, name in DETAILED)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"), sys.argv[2:])
