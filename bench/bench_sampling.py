"""End-to-end sampling: the reference DiT as a 50-step Euler teacher in eager PyTorch (plain ops,
SDPA, no CUDA graph) against the same network sampled in 1, 2 and 4 steps on our fast path
(fused ops; on a GPU also the CUDA graph, bf16 autocast and, on sm_89+, FP8 with fused epilogues).

Run: ``pytest bench/bench_sampling.py``. GPU: DiT-XL/2 at 256px (32x32x4 latents), batch 64. CPU: a
small DiT (16x16x4 latents, hidden 192, depth 4), batch 8. ``speedup_vs_peer`` of ``student_N`` is
the teacher's wall time over the student's for the same batch (the issue's 100x / 25x / 40x goals),
``ms_per_image`` the wall time per image; ``eval_fast`` is the time of one network evaluation on
the fast path as ``sample`` runs it (on a GPU replayed from a CUDA graph), against the eager
network evaluation (goal: 1.5x on GPU, no slower on CPU); ``eval_fused`` is the same evaluation
launched op by op (no CUDA graph; on the CPU the two are one).
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run

import fastgen_kernels as fk
from fastgen_kernels.models import DiT, DiTConfig
from fastgen_kernels.sampling import capture_cuda_graph

TEACHER_STEPS = 50
CONFIGS = {  # device: (DiT config, batch)
    "cuda": (DiTConfig.preset("XL/2", input_size=32, num_classes=1000), 64),
    "cpu": (DiTConfig(input_size=16, patch_size=2, in_channels=4, hidden_size=192, depth=4, num_heads=3,
                      num_classes=10), 8),
}
_models: dict = {}


def models(device: str):
    """(eager teacher, fast student) Denoisers over one randomly initialized DiT, built once."""
    if device not in _models:
        config, _ = CONFIGS[device]
        torch.manual_seed(0)
        net = DiT(config).to(device).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02)
        teacher = fk.Denoiser(copy.deepcopy(net).set_fused(False), "rf", "flow", time_scale=1000.0,
                              null_cond=config.num_classes, shape=(4, config.input_size, config.input_size))
        fast = net.set_fused(True)
        if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
            fk.fuse_epilogues(fk.quantize_fp8(fast.bfloat16()))
        student = fk.Denoiser(fast, "rf", "flow", time_scale=1000.0, distilled=True,
                              null_cond=config.num_classes, shape=teacher.shape)
        _models[device] = teacher, student
    return _models[device]


def _row(device: str, provider: str) -> dict:
    """The columns bench/summarize.py prints: op, provider, dtype, mode, shape (B, C, H, W)."""
    config, batch = CONFIGS[device]
    return dict(op="sampling", provider=provider, dtype=str(torch.bfloat16 if device == "cuda" else torch.float32),
                mode="inference", shape=[batch, 4, config.input_size, config.input_size])


def teacher_fn(device: str):
    teacher, _ = models(device)
    batch = CONFIGS[device][1]
    labels = torch.arange(batch, device=device) % teacher.null_cond
    return lambda: fk.sample(teacher, TEACHER_STEPS, batch_size=batch, cond=labels, solver="euler", seed=0,
                             cuda_graph=False, progress=False)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_vs_50_step_teacher(benchmark, device, steps):
    _, student = models(device)
    batch = CONFIGS[device][1]
    labels = torch.arange(batch, device=device) % student.null_cond
    benchmark.group = f"sampling {device}"
    benchmark.name = f"student_{steps}"

    def fast():
        return fk.sample(student, steps, batch_size=batch, cond=labels, seed=0, progress=False)

    run(benchmark, fast, device, peer_key=("teacher", device), peer_fn=teacher_fn(device),
        peer=f"eager teacher, {TEACHER_STEPS} Euler steps", batch=batch, steps=steps,
        ms_per_image=None, **_row(device, f"student_{steps}"))
    if benchmark.disabled:  # one call, nothing timed (--benchmark-disable)
        return
    info = benchmark.extra_info
    info.update(ms_per_image=info["median_ms"] / batch, teacher_ms_per_image=info["peer_ms"] / batch,
                fp8=isinstance(student.net.blocks[0].mlp.fc1, fk.Fp8Linear))


@pytest.mark.parametrize("launch", ["fast", "fused"])
def test_per_evaluation(benchmark, device, launch):
    """One network evaluation of the batch: fused (and FP8 on sm_89+), autocast on GPU, from a
    CUDA graph ("fast") or op by op ("fused"), vs eager."""
    if device == "cpu" and launch == "fused":
        pytest.skip("on the CPU the fast path is the fused one (eval_fast)")
    teacher, student = models(device)
    config, batch = CONFIGS[device]
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 4, config.input_size, config.input_size, device=device, generator=gen)
    t = torch.full((batch,), 0.5, device=device)
    labels = torch.arange(batch, device=device) % teacher.null_cond
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def evaluate(model):
        with torch.no_grad(), autocast:
            return model.x0(x, t, labels)

    fast = lambda: evaluate(student)  # noqa: E731
    if device == "cuda" and launch == "fast":
        fast = capture_cuda_graph(fast)[0].replay  # as sample() captures its loop
    benchmark.group = f"sampling {device}"
    benchmark.name = f"eval_{launch}"
    run(benchmark, fast, device, peer_key=("eval", device), peer_fn=lambda: evaluate(teacher),
        peer="eager network evaluation (SDPA)", batch=batch, **_row(device, f"eval_{launch}"))
