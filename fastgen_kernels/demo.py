"""``fastgen-kernels demo``: the embedded default. Distill the shipped digits teacher into 1- and
2-step students and compare them with the teacher's 50 steps.

- data: scikit-learn's 1,797 8x8 handwritten digits (``pip install -e ".[demo]"``), in [-1, 1];
- teacher: a class-conditional TrigFlow DiT (1.3M parameters) the project trained on them
  (``fastgen_kernels/assets/digits_teacher``, made by ``fastgen-kernels train --config
  fastgen_kernels/configs/digits_teacher.yaml``), sampled with 50 Euler steps and guidance;
- students, both starting from the teacher's weights: DMD2 (1 step) and sCD (sCM distillation
  with the exact JVP through the fused attention; 1 and 2 steps);
- evaluation (:func:`fastgen_kernels.digits.evaluate`): the Frechet distance to the real digits
  in the feature space of the shipped digit classifier, and that classifier's accuracy on the
  class-conditional samples; wall time per image and the speedup over the teacher;
- output folder: ``results.md`` / ``results.json`` (the table), ``grid.png`` (one row per model,
  digits 0-9), ``samples_<model>.npz`` (samples and labels) and each student's training run.

``--quick`` runs a few iterations on few samples (a smoke test of the whole path, for CI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.distill import DMD2, SCM, DMD2Config, SCMConfig
from fastgen_kernels.distill.run import StudentConfig, build_student
from fastgen_kernels.distill.trainer import OptimizerConfig, Trainer, TrainerConfig
from fastgen_kernels.sampling import sample

TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "digits_teacher"
GUIDANCE = 1.0   # classifier-free guidance of the teacher (its best FD), also what the students distill
# DMD2's recipe here, from calibration runs on these digits (FD of 1,000 samples at three sampling
# seeds, for two training seeds): critic and VSD times uniform in [0.02, 0.98] t_max (as DMD2; the
# schedule's training distribution left FD at 5-8); the fake score at three times the student's
# learning rate (twice: mean FD 2.26, three times: 2.18); the student's EMA, without which FD
# jumped between 5.5 and 15 from one evaluation to the next, at 0.995 per student step (0.98: FD
# 2.40 for one seed, 0.99: 2.28, 0.998: 3.3, still holding much of the teacher's first weights). A
# student learning rate of 5e-4 was unstable (FD 2.3-3.4 for one seed); GAN features (weight 0.01)
# and a linearly decaying rate did not help (2.5, 4.0). FD was still falling at 3,000 iterations.
DMD2_LR = 3e-4
DMD2_FAKE_SCORE_LR = 3 * DMD2_LR
DMD2_CRITIC_TIMES = (0.02, 0.98)
DMD2_EMA = 0.995   # per student step (every 3rd iteration)
# sCD's learning rate, from three training seeds: 3e-4 gave FD 12.7-18.3 at 1 step and 4.8-7.9 at
# 2 (1e-4: 50-59 and 6.5-7.2; 2e-4: 26 and 5.1 for one seed; 6e-4 and 1e-3 were unstable: 20-103)
SCD_LR = 3e-4


@dataclass(frozen=True)
class Budget:
    samples: int          # generated per model for the evaluation
    dmd2_iterations: int
    scm_iterations: int
    batch_size: int


FULL = Budget(samples=1000, dmd2_iterations=3600, scm_iterations=400, batch_size=64)
QUICK = Budget(samples=100, dmd2_iterations=10, scm_iterations=6, batch_size=16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few iterations and samples (smoke test)")
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def _distill(name: str, method, data, budget: Budget, iterations: int, out: Path, device, seed: int,
             lr: float, learning_rates: dict[str, float] | None = None, ema: float | None = None) -> Denoiser:
    """Trains ``method``; returns its student in eval mode, holding the EMA weights when ``ema``."""
    config = TrainerConfig(iterations=iterations, batch_size=budget.batch_size, ema_decays=(ema,) if ema else (),
                           seed=seed, output_dir=str(out / name), checkpoint_every=max(iterations, 1),
                           keep_checkpoints=1, resume=False, log_every=max(1, iterations // 20),
                           optimizer=OptimizerConfig(lr=lr, learning_rates=learning_rates or {}, betas=(0.0, 0.99),
                                                     clip_grad_norm=1.0))
    trainer = Trainer(method, data, config, device=device)
    trainer.train()
    if trainer.ema is not None:
        trainer.ema.copy_to(0)
    return method.student.eval()


def _timed_samples(model: Denoiser, steps: int, labels: Tensor, guidance: float, seed: int,
                   solver: str = "auto") -> tuple[Tensor, float]:
    """(samples, milliseconds per image): the median wall time of calls made until a second has
    passed and three calls or five seconds are done (one call for the teacher's 50 steps, two or
    three for a student: a call timed once took 2.5 times as long beside other work on the 2
    cores), after an untimed 1-step warm-up at the same batch size (allocations of these shapes,
    lazy initialization)."""
    def call(steps: int) -> Tensor:
        x = sample(model, steps, batch_size=len(labels), cond=labels, guidance_scale=guidance, seed=seed,
                   solver=solver)
        if labels.is_cuda:
            torch.cuda.synchronize()
        return x

    call(steps if labels.is_cuda else 1)  # on a GPU the first call of these steps captures their CUDA graph
    times, start = [], time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 1.0 or (len(times) < 3 and elapsed < 5.0):
        tic = time.perf_counter()
        x = call(steps)
        times.append(time.perf_counter() - tic)
    return x, 1000 * statistics.median(times) / len(labels)


def demo(args: argparse.Namespace) -> int:
    from fastgen_kernels.digits import evaluate, load_classifier, load_digits
    from fastgen_kernels.images import save_grid

    budget = QUICK if args.quick else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    x, labels = load_digits("all")
    classifier = load_classifier(device=str(device))
    teacher = Denoiser.from_pretrained(TEACHER_DIR, device=device).eval()
    eval_labels = torch.arange(budget.samples, device=device) % 10
    print(f"fastgen-kernels demo: {len(x)} digits, teacher {sum(p.numel() for p in teacher.parameters()):,} "
          f"parameters, device {device}, {'quick' if args.quick else 'full'} budget")

    students = {}
    tic = time.perf_counter()
    dmd2 = DMD2(build_student(StudentConfig(init="teacher"), teacher, (1, 8, 8), distilled=True), teacher,
                DMD2Config(guidance_scale=GUIDANCE, student_every=3, critic_time_range=DMD2_CRITIC_TIMES))
    students["DMD2"] = _distill("dmd2", dmd2, (x, labels), budget, budget.dmd2_iterations, out, device,
                                args.seed, lr=DMD2_LR, learning_rates={"fake_score": DMD2_FAKE_SCORE_LR}, ema=DMD2_EMA)
    scm = SCM(build_student(StudentConfig(init="teacher", net_overrides={"logvar_head": True}), teacher, (1, 8, 8),
                            distilled=True), teacher,
              SCMConfig(mode="cd", guidance_scale=GUIDANCE, warmup_iterations=budget.scm_iterations // 2))
    students["sCD"] = _distill("scd", scm, (x, labels), budget, budget.scm_iterations, out, device, args.seed,
                               lr=SCD_LR)
    train_seconds = time.perf_counter() - tic

    runs = [("teacher", teacher, 50, GUIDANCE, "euler"), ("DMD2", students["DMD2"], 1, 1.0, "auto"),
            ("sCD", students["sCD"], 1, 1.0, "auto"), ("sCD", students["sCD"], 2, 1.0, "auto")]
    rows, grids = [], []
    with torch.no_grad():
        for name, model, steps, guidance, solver in runs:
            samples, ms = _timed_samples(model, steps, eval_labels, guidance, args.seed, solver)
            scores = evaluate(samples, eval_labels, classifier)
            rows.append({"model": name, "steps": steps, "fd": scores["fd"], "accuracy": scores["accuracy"],
                         "ms_per_image": ms})
            tag = f"{name.lower()}_{steps}step"
            np.savez(out / f"samples_{tag}.npz", samples=samples.float().cpu().numpy(),
                     labels=eval_labels.cpu().numpy())
            grids.append(samples[:10].cpu())
    teacher_ms = rows[0]["ms_per_image"]
    for row in rows:
        row["speedup"] = teacher_ms / row["ms_per_image"]
    save_grid(torch.cat(grids), out / "grid.png", rows=len(grids), scale=4)
    header = "| model | steps | FD | class accuracy | ms / image | speedup vs teacher 50 steps |\n|---|---|---|---|---|---|\n"
    table = header + "".join(f"| {r['model']} | {r['steps']} | {r['fd']:.2f} | {100 * r['accuracy']:.1f}% | "
                             f"{r['ms_per_image']:.3f} | {r['speedup']:.1f}x |\n" for r in rows)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"rows": rows, "device": str(device), "quick": args.quick,
                                                  "distillation_seconds": train_seconds}, indent=1) + "\n")
    print(table)
    print(f"distillation {train_seconds:.0f} s; grid {out / 'grid.png'}; samples and runs in {out}/")
    return 0
