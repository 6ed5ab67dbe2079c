"""The training methods (fastgen_kernels.distill): randomness, building blocks, each method's step
(finite losses, the right parameters change, the teacher never does), and learning on a 2-D
mixture of Gaussians where a 1-step student must put its samples on the modes."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastgen_kernels as fk
from fastgen_kernels.distill import (CM, DMD2, LADD, SCM, SFT, Batch, CMConfig, DMD2Config, FDistill,
                                     FDistillConfig, LADDConfig, MeanFlow, MeanFlowConfig, SCMConfig, SFTConfig)
from fastgen_kernels.distill import base
from fastgen_kernels.distill.base import forward_and_jvp, forward_backward, jvp, noised, teacher_x0
from fastgen_kernels.distill.trainer import OptimizerConfig, Trainer, TrainerConfig
from toy import ToyNet, mixture, near_modes

DATA = mixture(4096)


def toy(schedule="trig", prediction="trig_F", **kw) -> fk.Denoiser:
    return fk.Denoiser(ToyNet(), schedule, prediction, sigma_data=1.0, null_cond=4, shape=(2,), **kw)


def trainer(method, tmp_path, lr=1e-3, betas=(0.9, 0.999), labels=True, **kw) -> Trainer:
    config = TrainerConfig(batch_size=kw.pop("batch_size", 128), output_dir=str(tmp_path), progress=False,
                           ema_decays=kw.pop("ema_decays", ()), resume=False,
                           optimizer=OptimizerConfig(lr=lr, betas=betas), **kw)
    return Trainer(method, (DATA[0], DATA[1] if labels else None), config)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> fk.Denoiser:
    """An unconditional toy teacher trained by SFT (its 50-step samples sit on the modes)."""
    torch.manual_seed(0)
    model = toy()
    run = trainer(SFT(model, config=SFTConfig(cond_dropout=0.0)), tmp_path_factory.mktemp("teacher"), lr=2e-3,
                  labels=False, batch_size=256, iterations=500)
    losses = [run.step(i)["loss"].item() for i in range(500)]
    assert sum(losses[-50:]) < 0.7 * sum(losses[:50])
    return model.requires_grad_(False).eval()


def student_of(teacher: fk.Denoiser, **kw) -> fk.Denoiser:
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    student.distilled = True
    return student


# --------------------------------------------------------------------------- building blocks


def test_batch_draws_do_not_depend_on_how_the_batch_is_split():
    x = torch.randn(8, 3)
    whole = Batch(x, seed=5)
    halves = [Batch(x[:4], seed=5, global_size=8), Batch(x[4:], seed=5, global_size=8, offset=4)]
    for draw in (lambda b: b.randn(3), lambda b: b.rand(), lambda b: b.randint(7)):
        torch.testing.assert_close(torch.cat([draw(h) for h in halves]), draw(whole), rtol=0, atol=0)
    with pytest.raises(ValueError, match="global batch"):
        Batch(x, global_size=4)
    with pytest.raises(ValueError, match="cond"):
        Batch(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no tuple conditions"):
        Batch(x, (torch.zeros(8, 3), torch.ones(8, 3)))


@pytest.mark.parametrize("name, p_mean, p_std", [("edm", -1.2, 1.2), ("trig", -1.0, 1.4), ("rf", 0.0, 1.0)])
def test_training_times_are_log_normal_in_the_edm_noise_level(name, p_mean, p_std):
    schedule = fk.schedules.get_schedule(name)
    normal = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = schedule.training_time(normal)
    assert t.min() >= schedule.t_min and t.max() <= schedule.t_max
    log_sigma = torch.log(schedule.edm_sigma(t))
    inside = (t > schedule.t_min) & (t < schedule.t_max)   # the clamped tails aside
    torch.testing.assert_close(log_sigma[inside], (normal * p_std + p_mean)[inside], rtol=1e-9, atol=1e-9)


def test_noised_with_a_time_range_draws_uniform_times():
    model = fk.Denoiser(ToyNet(), "trig", "trig_F")
    schedule = model.schedule
    x0 = torch.zeros(100_000, 2)
    t, eps, x_t = noised(model, Batch(x0, seed=0), x0, (0.25, 0.75))
    assert t.min() >= 0.25 * schedule.t_max and t.max() <= 0.75 * schedule.t_max
    assert abs(t.mean().item() / schedule.t_max - 0.5) < 0.005
    torch.testing.assert_close(x_t, schedule.sigma(t)[:, None] * eps)


@pytest.mark.parametrize("name, prediction", [("edm", "eps"), ("vp", "v"), ("rf", "flow"), ("trig", "trig_F"),
                                              ("edm", "x0"), ("rf", "mean_flow")])
def test_target_is_what_from_x0_gives_at_the_noised_point(name, prediction):
    schedule = fk.schedules.get_schedule(name)
    x0, eps = torch.randn(2, 5, 3, dtype=torch.float64).unbind(0)
    t = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.target(prediction, x0, eps, t), schedule.from_x0(prediction, x0, x_t, t))


def test_teacher_x0_moves_points_between_schedules(teacher):
    """An rf point asks the trig teacher at the time of the same noise level, rescaled."""
    x0 = torch.randn(6, 2)
    eps = torch.randn(6, 2)
    t = torch.rand(6) * 0.8 + 0.1
    rf = fk.schedules.get_schedule("rf")
    x_rf = rf.add_noise(x0, eps, t)
    tt = torch.atan(t / (1 - t))                       # sigma_data 1: edm sigma = tan tt = t / (1 - t)
    x_trig = x_rf * (torch.cos(tt) / (1 - t))[:, None]
    with torch.no_grad():
        torch.testing.assert_close(teacher_x0(teacher, rf, x_rf, t, None), teacher.x0(x_trig, tt), rtol=1e-4, atol=1e-5)


def test_exact_jvp_matches_finite_differences():
    net = fk.Denoiser(ToyNet().double(), "trig", "trig_F")
    x, v = torch.randn(2, 4, 2, dtype=torch.float64).unbind(0)
    t = torch.rand(4, dtype=torch.float64) + 0.2

    def fn(a, s):
        return net.raw(a, s)

    exact = jvp(fn, (x, t), (v, torch.ones_like(t)))
    fd = jvp(fn, (x, t), (v, torch.ones_like(t)), "finite_difference", 1e-6)  # relative step
    torch.testing.assert_close(exact, fd, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="method"):
        jvp(fn, (x, t), (v, t), "forward")


def test_finite_difference_step_follows_the_dtype():
    """The default step (eps^(1/3) / 5 of the primals' dtype: 1.2e-6 in fp64) keeps the difference
    accurate where the network sees time at a scale of 1000 (a sinusoidal embedding of 1000 t);
    fp32's 1e-3 there is a step of about 1 in the network's time."""
    from fastgen_kernels.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=None)).double()
    for p in net.parameters():  # adaLN-Zero starts at zero: give the time a path to the output
        p.data.normal_(0, 0.2)
    model = fk.Denoiser(net, "rf", "flow", time_scale=1000.0)
    x, v = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64).unbind(0)
    t = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)

    def fn(a, s):
        return model.raw(a, s)

    exact = jvp(fn, (x, t), (v, torch.ones_like(t)))
    error = lambda J: ((J - exact).norm() / exact.norm()).item()
    assert error(jvp(fn, (x, t), (v, torch.ones_like(t)), "finite_difference")) < 1e-5  # 9e-7
    assert error(jvp(fn, (x, t), (v, torch.ones_like(t)), "finite_difference", 1e-3)) > 0.1  # 0.36
    # an fp32 network fed fp64 data (numpy's) computes in fp32: the methods' step is fp32's (at
    # fp64's its difference was 0.22 off at time_scale 1, 4e-4 at fp32's)
    model32 = fk.Denoiser(net.float(), "rf", "flow")
    exact = jvp(lambda a, s: model32.raw(a, s), (x, t), (v, torch.ones_like(t))).double()
    _, fd = base.output_and_jvp(model32, lambda m, a, s: m.raw(a, s), (x, t), (v, torch.ones_like(t)),
                                "finite_difference")
    assert error(fd.double()) < 1e-2
    assert base.finite_difference_step([torch.float64, torch.float32]) == pytest.approx(1e-3, rel=0.05)


def test_finite_difference_runs_outside_autocast():
    """Under the training step's bf16 autocast the finite difference evaluates in fp32: a
    difference of bf16 outputs at h = 1e-3 is rounding noise (relative error above 1 on a small
    DiT); "finite_difference_autocast" keeps autocast (the benchmarks' cost peer)."""
    torch.manual_seed(0)
    net = fk.Denoiser(ToyNet(), "trig", "trig_F")
    x, v = torch.randn(2, 64, 2).unbind(0)
    t = torch.rand(64) + 0.2

    def fn(a, s):
        return net.raw(a, s)

    exact = jvp(fn, (x, t), (v, torch.ones_like(t)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fd = jvp(fn, (x, t), (v, torch.ones_like(t)), "finite_difference")
        noisy = jvp(fn, (x, t), (v, torch.ones_like(t)), "finite_difference_autocast")
    error = lambda J: ((J - exact).norm() / exact.norm()).item()
    assert error(fd) < 1e-2 and error(noisy) > 0.1


# --------------------------------------------------------------------------- each method's step

def _methods(teacher):
    trig = lambda **kw: student_of(teacher)
    yield "sft", SFT(toy()), ("student",)
    yield "cm-ct", CM(toy()), ("student",)
    yield "cm-cd", CM(trig(), teacher, CMConfig(mode="cd", guidance_scale=1.5)), ("student",)
    scm_student = toy()
    yield "scm-cd", SCM(scm_student, teacher, SCMConfig(guidance_scale=1.5, warmup_iterations=2)), ("student",)
    yield "scm-ct-fd", SCM(toy(), config=SCMConfig(mode="ct", jvp="finite_difference")), ("student",)
    mean_flow = lambda: toy("rf", "mean_flow")
    yield "meanflow-data", MeanFlow(mean_flow()), ("student",)
    yield "meanflow-distill", MeanFlow(mean_flow(), teacher, MeanFlowConfig(mode="distill")), ("student",)
    yield "dmd2", DMD2(trig(), teacher, DMD2Config(student_every=2)), ("student",)
    yield "dmd2-gan", DMD2(trig(), teacher, DMD2Config(student_every=2, gan_weight=0.1, r1_weight=0.1,
                                                        student_steps=2)), ("student",)
    yield "f-distill", FDistill(trig(), teacher, FDistillConfig(student_every=2, divergence="kl")), ("student",)
    yield "ladd", LADD(trig(), teacher, LADDConfig()), ("student",)


METHOD_NAMES = ["sft", "cm-ct", "cm-cd", "scm-cd", "scm-ct-fd", "meanflow-data", "meanflow-distill", "dmd2",
                "dmd2-gan", "f-distill", "ladd"]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_step_changes_only_the_networks_that_step(name, teacher, tmp_path):
    method = next(m for n, m, _ in _methods(teacher) if n == name)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    run = trainer(method, tmp_path, iterations=5)
    # from iteration 1: at 0, DMD2's fake score is still the teacher and the student's gradient is 0
    for iteration in range(1, 5):
        names = method.optimizers_at(iteration)
        before = {n: [p.detach().clone() for p in method.network(n).parameters()] for n in method.optimizer_names}
        metrics = run.step(iteration)
        assert all(math.isfinite(v.item()) for v in metrics.values()), metrics
        for n in method.optimizer_names:
            changed = any(not torch.equal(a, p) for a, p in zip(before[n], method.network(n).parameters()))
            assert changed == (n in names), (iteration, n, names)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())


def test_two_time_scales_and_optimizer_sets(teacher):
    dmd2 = DMD2(student_of(teacher), teacher, DMD2Config(student_every=5, gan_weight=0.01))
    assert dmd2.optimizer_names == ("student", "fake_score", "discriminator")
    assert [dmd2.optimizers_at(i) for i in range(3)] == [("student",), ("fake_score", "discriminator"),
                                                          ("fake_score", "discriminator")]
    assert DMD2(student_of(teacher), teacher).optimizer_names == ("student", "fake_score")
    assert FDistill(student_of(teacher), teacher).optimizer_names[-1] == "discriminator"
    assert LADD(student_of(teacher), teacher).optimizers_at(1) == ("discriminator",)


@pytest.mark.parametrize("name", ["dmd2", "ladd"])
def test_discriminator_sees_real_and_fake_at_the_same_times(name, teacher):
    """The critic step noises the data at the fakes' own times: drawn apart (the real ones from
    the teacher's training distribution while DMD2's critic_time_range drew the fakes'), the
    noise level alone told them apart. R1's perturbed real points too."""
    method = (DMD2(student_of(teacher), teacher, DMD2Config(gan_weight=0.1, r1_weight=0.1,
                                                           critic_time_range=(0.02, 0.3)))
              if name == "dmd2" else LADD(student_of(teacher), teacher, LADDConfig(r1_weight=0.1)))
    seen = []
    logits = method.logits
    method.logits = lambda schedule, x_t, t, cond: seen.append((schedule, t)) or logits(schedule, x_t, t, cond)
    step = method.critic_step if name == "dmd2" else method.training_step
    step(Batch(torch.randn(16, 2), seed=3), *(() if name == "dmd2" else (1,)))
    assert len(seen) == 3  # fake, real, perturbed real
    assert all(s is seen[0][0] and torch.equal(t, seen[0][1]) for s, t in seen)
    if name == "dmd2":
        assert seen[0][1].max() <= 0.3 * teacher.schedule.t_max


def test_student_from_the_teacher_keeps_its_time_input():
    """A student made from a diffusers-style teacher (time_scale 1000, time_shift -1) keeps both:
    it dropped the shift, one diffusers step late, and 3e-3 off the teacher at initialisation."""
    from fastgen_kernels.distill.run import StudentConfig, build_student, resolved, RunConfig
    from fastgen_kernels.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = fk.Denoiser(net, "vp", "eps", time_scale=1000.0, time_shift=-1.0, null_cond=3, shape=(4, 4, 4))
    student = build_student(StudentConfig(init="teacher"), teacher, (4, 4, 4), distilled=True)
    assert (student.time_scale, student.time_shift) == (1000.0, -1.0)
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([0.3, 0.05]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(student.x0(x, t, c), teacher.x0(x, t, c))
    assert resolved(RunConfig(student=StudentConfig(init="teacher")), SFTConfig(), student).student.time_shift == -1.0


def test_logged_metrics_cover_the_student_iterations(teacher, tmp_path):
    """Each logged metric is its mean over the window's iterations that reported it: with
    log_every a multiple of student_every the student's metrics were never logged (the line held
    the last iteration's alone, a critic step); a truncated last line of metrics.jsonl (a killed
    process) does not stop a resume."""
    method = DMD2(student_of(teacher), teacher, DMD2Config(student_every=2))
    run = trainer(method, tmp_path, iterations=8, log_every=4, checkpoint_every=4)
    records = run.train()
    assert [r["iteration"] for r in records] == [3, 7]
    assert all("vsd" in r and "fake_score_loss" in r and "grad_norm/student" in r for r in records)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    run._open_log(8).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:1]


def test_a_checkpoint_before_an_optimizer_steps_leaves_the_run_unchanged(teacher, tmp_path):
    """DMD2's student steps every third iteration: a checkpoint after iteration 0 saved its
    unstepped optimizers, and torch's state_dict initialised them by a zero step (Adam's step
    count one ahead: different weights after). Checkpointing every iteration or never now gives
    the same run."""
    weights = []
    for every in (1, 100):
        torch.manual_seed(0)
        method = DMD2(student_of(teacher), teacher, DMD2Config(student_every=3))
        trainer(method, tmp_path / str(every), iterations=4, checkpoint_every=every).train()
        weights.append([p.detach().clone() for name in ("student", "fake_score")
                        for p in method.network(name).parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_trainer_keeps_the_requested_gpu(teacher, tmp_path, monkeypatch):
    """device="cuda:1" reaches parallel.init whole, which outside torchrun keeps its index (the
    trainer passed the type alone: cuda:0)."""
    from fastgen_kernels.distill import parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.init("cuda:1")[2] == torch.device("cuda", 1)
    seen = []
    init = parallel.init
    monkeypatch.setattr(parallel, "init", lambda device: seen.append(device) or init("cpu"))
    Trainer(SFT(toy()), DATA, TrainerConfig(output_dir=str(tmp_path), progress=False, resume=False),
            device="cuda:1")
    assert seen == ["cuda:1"]


def test_bad_configurations_are_refused(teacher):
    with pytest.raises(ValueError, match="teacher"):
        DMD2(toy())
    with pytest.raises(ValueError, match="trig"):
        SCM(toy("edm", "x0"))
    with pytest.raises(ValueError, match="mean_flow"):
        MeanFlow(toy())
    with pytest.raises(ValueError, match="cd"):
        CM(toy(), config=CMConfig(mode="cd"))
    with pytest.raises(TypeError, match="config"):
        SFT(toy(), config=CMConfig())
    with pytest.raises(TypeError, match="student"):
        SFT(ToyNet())
    with pytest.raises(ValueError, match="student_every"):
        LADD(toy(), teacher, LADDConfig(student_every=1))
    with pytest.raises(ValueError, match="critic_time_range"):
        DMD2(student_of(teacher), teacher, DMD2Config(critic_time_range=(0.5, 0.2)))
    with pytest.raises(ValueError, match="student_every must be >= 2"):  # the fake score would never step
        DMD2(student_of(teacher), teacher, DMD2Config(student_every=1))
    from fastgen_kernels.distill.run import StudentConfig, build_student
    from fastgen_kernels.models import DiTConfig

    net = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="student.net_overrides.qk_norm: expected bool"):  # trained, then
        build_student(StudentConfig(net=net, net_overrides={"qk_norm": 1}), None, (4, 4, 4), False)  # yaml failed


def test_a_batch_given_a_generator_draws_what_a_new_one_draws():
    """A CUDA graph reads one generator, reseeded per batch (distill.cuda_graph)."""
    x = torch.randn(6, 3)
    given = torch.Generator().manual_seed(7)
    torch.randn(5, generator=given)  # a used generator: the batch reseeds it
    draws = [(b.randn(), b.rand(), b.randint(9), b.randn_like(x))
             for b in (Batch(x, seed=11), Batch(x, seed=11, generator=given))]
    for a, b in zip(*draws):
        assert torch.equal(a, b)


def test_cm_curriculum_keeps_a_gap_on_long_runs():
    """r < t at every stage: the gap stops at min_gap (halving on, r rounded to t in fp32 for
    every sample by iteration 30,000 with the defaults, and the loss and its gradient were 0),
    and lambda is 1 / (sigma_t - sigma_r) of the r the network sees (its fp32 rounding)."""
    student = fk.Denoiser(ToyNet(hidden=16, depth=1), "edm", "x0", sigma_data=0.5, preconditioning="edm",
                          null_cond=4, shape=(2,))
    cm = CM(student)
    t = student.schedule.training_time(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    for iteration in (5_000, 30_000, 10**6):
        r, sigma_t, sigma_r = cm.r_of(t, iteration)
        assert (r < t).all() and torch.equal(sigma_r, r.double())  # edm: sigma is t
    out = cm.training_step(Batch(torch.randn(64, 2), torch.randint(4, (64,)), seed=0), 30_000)
    out["student"].backward()
    assert out["loss"] > 0 and all(p.grad.abs().sum() > 0 for p in student.net.parameters() if p.grad is not None)


def test_graph_keys_say_which_steps_one_graph_replays(teacher):
    """Equal keys: the same kernels with the same constants. sCM's warm-up factor, CM's curriculum
    stage and the GAN methods' turns change the step."""
    scm = SCM(student_of(teacher), teacher, SCMConfig(warmup_iterations=4))
    assert len({scm.graph_key(i) for i in range(5)}) == 5
    assert {scm.graph_key(i) for i in range(4, 50)} == {(1.0,)}
    cm = CM(student_of(teacher), teacher, CMConfig(mode="cd", stage_iterations=10))
    assert cm.graph_key(9) == cm.graph_key(0) != cm.graph_key(10)
    assert cm.graph_key(160) == cm.graph_key(10**6)  # past 2^-16, min_gap's stage
    assert SFT(toy()).graph_key(0) == SFT(toy()).graph_key(99) == ()
    assert MeanFlow(toy("rf", "mean_flow")).graph_key(3) == ()
    dmd2 = DMD2(student_of(teacher), teacher, DMD2Config(student_every=3))
    assert dmd2.graph_key(0) == dmd2.graph_key(3) == ("student",) != dmd2.graph_key(1) == dmd2.graph_key(2)
    ladd = LADD(student_of(teacher), teacher)
    assert ladd.graph_key(0) == ("student",) and ladd.graph_key(1) == ("discriminator",)


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    with pytest.raises(ValueError, match="GraphedStep: the method's networks must be on a CUDA device, got cpu"):
        trainer(SFT(toy()), tmp_path, cuda_graph=True)


def replaying_capture(params):
    """A CPU stand-in for capture_cuda_graph: replay() runs the captured function again and writes
    its results into the capture's output tensors, as a graph's replay rewrites its buffers, and
    leaves the parameters' .grad as it found them (a graph does not assign attributes)."""
    from torch.utils._pytree import tree_leaves

    def capture(fn, generators=(), pool=None):
        outputs = fn()

        class Replay:
            def pool(self):
                return None

            def replay(self):
                held = [p.grad for p in params]
                for buffer, value in zip(tree_leaves(outputs), tree_leaves(fn())):
                    if buffer is not None:  # a parameter the losses do not reach
                        buffer.copy_(value)
                for p, grad in zip(params, held):
                    p.grad = grad

        return Replay(), outputs

    return capture


def stand_in_graphs(monkeypatch, method) -> None:
    """GraphedStep on the CPU for ``method``, with replaying_capture for its graphs."""
    from fastgen_kernels.distill import cuda_graph

    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graph, "capture_cuda_graph",
                        replaying_capture([p for p in method.parameters() if p.requires_grad]))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def test_graphed_steps_add_to_the_gradient_they_find(monkeypatch):
    """Three steps of one phase: eager, then (gradients cleared) captured + replayed, which hands
    over its gradient buffer as .grad, then replayed again without clearing: the last replay must
    not overwrite the gradient it finds. Their gradients sum like eager steps'."""
    from fastgen_kernels.distill.cuda_graph import GraphedStep

    torch.manual_seed(0)
    method = SFT(toy())
    data = [(torch.randn(8, 2), torch.arange(8) % 4, i) for i in range(3)]
    for x0, cond, seed in data[1:]:
        forward_backward(method, Batch(x0, cond, seed), 0, ("student",))
    params = [p for p in method.parameters() if p.grad is not None]
    expected = [p.grad.clone() for p in params]
    method.zero_grad(set_to_none=True)
    stand_in_graphs(monkeypatch, method)
    graphed = GraphedStep(method)
    for x0, cond, seed in data:
        graphed(Batch(x0, cond, seed), 0, ("student",))
        if seed == 0:
            method.zero_grad(set_to_none=True)
    assert len(graphed.graphs) == 1
    for p, grad in zip(params, expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-6, atol=1e-7)


def test_a_later_micro_batch_graph_adds_to_the_first_ones_gradients(monkeypatch):
    """Two micro-batches of one phase: the second's graph adds to the first's gradient buffers in
    place (one set per phase); replayed on its own, with no gradient or another one held, it
    starts from zero and hands over or adds what it computed."""
    from fastgen_kernels.distill.cuda_graph import GraphedStep

    torch.manual_seed(0)
    method = SFT(toy())
    x, labels = torch.randn(16, 2), torch.arange(16) % 4
    halves = [lambda: Batch(x[:8], labels[:8], 5, 16, 0), lambda: Batch(x[8:], labels[8:], 5, 16, 8)]
    forward_backward(method, halves[0](), 0, ("student",))
    params = [p for p in method.parameters() if p.grad is not None]  # those the loss reaches
    grads = []
    for half in halves:
        method.zero_grad(set_to_none=True)
        forward_backward(method, half(), 0, ("student",))
        grads.append([p.grad.clone() for p in params])
    method.zero_grad(set_to_none=True)
    stand_in_graphs(monkeypatch, method)
    graphed = GraphedStep(method)
    for _ in range(3):  # eager, captured, replayed
        method.zero_grad(set_to_none=True)
        for half in halves:
            graphed(half(), 0, ("student",))
        for p, first, second in zip(params, *grads):
            torch.testing.assert_close(p.grad, first + second, rtol=1e-6, atol=1e-7)
    first_graph, second_graph = graphed.graphs
    assert second_graph.accumulates and second_graph.grads is first_graph.grads
    method.zero_grad(set_to_none=True)
    graphed(halves[1](), 0, ("student",))
    for p, second in zip(params, grads[1]):
        torch.testing.assert_close(p.grad, second, rtol=1e-6, atol=1e-7)
    for p in method.parameters():
        p.grad = torch.ones_like(p)
    graphed(halves[1](), 0, ("student",))
    for p, second in zip(params, grads[1]):
        torch.testing.assert_close(p.grad, 1 + second, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "accumulation", "graphs"), [("scm", 1, 1), ("scm", 2, 2), ("cm", 1, 2),
                                                            ("dmd2", 1, 2), ("f-distill", 2, 4)])
def test_graphed_trainer_bookkeeping_follows_the_eager_run(name, accumulation, graphs, teacher, tmp_path,
                                                           monkeypatch):
    """GraphedStep's own work (phases seen, captured, replayed and dropped; the batch copied in and
    the generator reseeded; gradients handed over or added) with a stand-in graph on the CPU: the
    same losses and weights as the eager trainer. sCM: a new phase per warm-up iteration (never
    captured), then one, with a graph per micro-batch. CM: a new curriculum stage every 2
    iterations, the last two stages' graphs kept. DMD2 and f-Distill (GAN head, R1): the student's
    and the critics' turns alternate, two phases. tests/test_gpu.py runs the real graph."""
    make = {"scm": lambda: SCM(student_of(teacher), teacher, SCMConfig(warmup_iterations=3)),
            "cm": lambda: CM(student_of(teacher), teacher, CMConfig(mode="cd", stage_iterations=2)),
            "dmd2": lambda: DMD2(student_of(teacher), teacher, DMD2Config(student_every=2, student_steps=2)),
            "f-distill": lambda: FDistill(student_of(teacher), teacher,
                                          FDistillConfig(student_every=2, r1_weight=0.1))}[name]
    runs = []
    for graphed in (False, True):
        torch.manual_seed(5)
        method = make()
        if graphed:
            stand_in_graphs(monkeypatch, method)
        run = trainer(method, tmp_path / str(graphed), batch_size=32, grad_accumulation=accumulation,
                      cuda_graph=graphed)
        metrics = [run.step(i) for i in range(8)]  # losses and gradient norms
        runs.append((metrics, [p.detach().clone() for p in method.parameters()]))
        if graphed:
            assert len(run.graphed.graphs) == graphs and len(run.graphed.phases) <= 2
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# --------------------------------------------------------------------------- learning


def test_the_teacher_samples_the_modes_and_its_one_step_does_not(teacher):
    assert near_modes(fk.sample(teacher, 50, batch_size=1000, seed=0, solver="euler")) > 0.95
    assert near_modes(fk.sample(teacher, 1, batch_size=1000, seed=0, solver="consistency")) < 0.1


def _one_step_modes_after(method, tmp_path, iterations, lr=3e-4) -> tuple[float, float]:
    """near_modes of the student's 1-step samples before and after ``iterations`` of training."""
    before = near_modes(fk.sample(method.student, 1, batch_size=1000, seed=0))
    run = trainer(method, tmp_path, lr=lr, betas=(0.0, 0.99), labels=False, batch_size=256)
    for iteration in range(iterations):
        run.step(iteration)
    return before, near_modes(fk.sample(method.student.eval(), 1, batch_size=1000, seed=0))


@pytest.mark.parametrize("name, make, floor", [
    ("dmd2", lambda t: DMD2(student_of(t), t, DMD2Config(student_every=3)), 0.4),
    # f-Distill's weights come from a discriminator's random start: 0.33-0.69 of the samples near
    # the modes after 300 iterations over 17 seeds (DMD2: 0.61, LADD: 0.77-0.81 over 5)
    ("f-distill", lambda t: FDistill(student_of(t), t, FDistillConfig(student_every=3)), 0.25),
    ("ladd", lambda t: LADD(student_of(t), t), 0.5),
])
def test_a_one_step_student_learns_to_place_samples_on_the_modes(name, make, floor, teacher, tmp_path):
    torch.manual_seed(0)  # the discriminators' start, whatever ran before
    before, after = _one_step_modes_after(make(teacher), tmp_path, 300)
    assert before < 0.1 and after > floor, (before, after)


@pytest.mark.parametrize("name, make, floor", [
    ("cm-cd", lambda t: CM(student_of(t), t, CMConfig(mode="cd", stage_iterations=50)), 0.15),
    ("scm-cd", lambda t: SCM(student_of(t), t, SCMConfig(warmup_iterations=100)), 0.01),
])
def test_consistency_distillation_moves_one_step_samples_toward_the_modes(name, make, floor, teacher, tmp_path):
    before, after = _one_step_modes_after(make(teacher), tmp_path, 300, lr=1e-4)
    assert before < 0.01 and after > floor, (before, after)


def test_meanflow_from_data_learns_a_one_step_map(tmp_path):
    """From noise (u = 0 at the start: x0 = z, ~5% near a mode) toward the modes in one jump."""
    torch.manual_seed(1)
    method = MeanFlow(toy("rf", "mean_flow"), config=MeanFlowConfig(p=0.0))
    before = near_modes(fk.sample(method.student, 1, batch_size=1000, seed=0))
    run = trainer(method, tmp_path, lr=3e-4, labels=False, batch_size=256)
    for iteration in range(150):
        run.step(iteration)
    after = near_modes(fk.sample(method.student.eval(), 1, batch_size=1000, seed=0))
    assert before < 0.1 and after > 0.15, (before, after)


# --------------------------------------------------------------------------- the trainer


def test_learning_rate_warm_up_and_decay():
    from fastgen_kernels.distill.trainer import learning_rate_factor as f

    config = OptimizerConfig(warmup_iterations=10, decay="cosine", min_lr_ratio=0.1)
    assert f(config, 0, 110) == pytest.approx(0.1) and f(config, 9, 110) == pytest.approx(1.0)
    assert f(config, 10, 110) == pytest.approx(1.0) and f(config, 60, 110) == pytest.approx(0.55)
    assert f(config, 110, 110) == pytest.approx(0.1)
    linear = OptimizerConfig(decay="linear")
    assert f(linear, 50, 100) == pytest.approx(0.5)
    assert f(OptimizerConfig(), 99, 100) == 1.0


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    states = []
    for accumulation in (1, 4):
        torch.manual_seed(3)
        model = toy()
        run = trainer(SFT(model), tmp_path / str(accumulation), batch_size=64, grad_accumulation=accumulation)
        losses = [run.step(i)["loss"].item() for i in range(3)]
        states.append((losses, [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(states[0][0], states[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(states[0][1], states[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _run(tmp_path, iterations, resume, method_seed=4):
    torch.manual_seed(4)
    teacher = toy().eval()       # frozen, not in checkpoints: a resumed run loads the same one
    torch.manual_seed(method_seed)
    method = DMD2(student_of(teacher), teacher, DMD2Config(student_every=2, gan_weight=0.05))
    config = TrainerConfig(iterations=iterations, batch_size=32, output_dir=str(tmp_path), progress=False,
                           checkpoint_every=4, log_every=1, resume=resume, ema_decays=(0.9, 0.99),
                           optimizer=OptimizerConfig(name="radam", lr=1e-3))
    return Trainer(method, DATA, config).train(), method


def test_resume_continues_the_same_trajectory(tmp_path):
    full, method_full = _run(tmp_path / "full", 12, resume=False)
    _run(tmp_path / "split", 8, resume=False)
    rest, method_rest = _run(tmp_path / "split", 12, resume=True, method_seed=99)   # another discriminator init
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(rest) == strip(full[8:])
    for a, b in zip(method_full.state_dict().values(), method_rest.state_dict().values()):
        assert torch.equal(a, b)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(12))
    exported = {}
    for run in ("full", "split"):
        for folder in ("student", "student_ema0.9", "student_ema0.99"):
            loaded = fk.Denoiser.from_pretrained(tmp_path / run / folder, net=ToyNet())
            assert loaded.schedule.name == "trig" and loaded.distilled
            exported[run, folder] = loaded.net.state_dict()
    for folder in ("student", "student_ema0.9", "student_ema0.99"):  # the EMA, too, continues
        for a, b in zip(exported["full", folder].values(), exported["split", folder].values()):
            assert torch.equal(a, b)
    for folder in ("student_ema0.9", "student_ema0.99"):  # the averages, not the last weights
        assert any(not torch.equal(a, b) for a, b in zip(exported["split", folder].values(),
                                                          exported["split", "student"].values()))


def test_resume_keeps_the_fp32_ema_of_a_bf16_student(tmp_path):
    """Checkpoints hold the EMA shadows in fp32 whatever the parameters' dtype: a bf16 student's
    shadows went through its bf16 parameters, and a resumed run continued other averages."""
    def run(out, iterations, resume):
        torch.manual_seed(0)
        model = toy().to(torch.bfloat16)
        config = TrainerConfig(iterations=iterations, batch_size=64, output_dir=str(out), progress=False,
                               checkpoint_every=4, log_every=1, resume=resume, ema_decays=(0.999,),
                               optimizer=OptimizerConfig(lr=1e-3))
        trainer = Trainer(SFT(model), DATA, config)
        trainer.train()
        return trainer

    full = run(tmp_path / "full", 12, False)
    run(tmp_path / "split", 8, False)
    rest = run(tmp_path / "split", 12, True)
    assert torch.equal(full.ema.state_dict()["shadow"], rest.ema.state_dict()["shadow"])
    groups, _ = fk.distill.checkpoint.load_checkpoint(tmp_path / "split" / "checkpoints" /
                                                      "checkpoint-00000008.safetensors")
    assert {value.dtype for value in groups["ema0"].values()} == {torch.float32}
    exported = load_file(tmp_path / "split" / "student_ema0.999" / "model.safetensors")
    assert {value.dtype for value in exported.values()} == {torch.bfloat16}  # the parameters' dtype

def test_a_compiled_students_ema_is_exported_and_resumed_under_its_networks_names(tmp_path):
    """torch.compile's _orig_mod. prefix: the state dict drops it, the EMA was saved under it, so
    the export held the training weights under the network's names and the EMA beside them."""
    def run(iterations, resume):
        torch.manual_seed(0)
        model = toy()
        model.net = torch.compile(model.net, backend="eager")
        config = TrainerConfig(iterations=iterations, batch_size=64, output_dir=str(tmp_path), progress=False,
                               checkpoint_every=2, resume=resume, ema_decays=(0.5,), optimizer=OptimizerConfig(lr=1e-2))
        trainer = Trainer(SFT(model), DATA, config)
        trainer.train()
        return trainer

    run(2, False)
    trainer = run(4, True)
    exported = load_file(tmp_path / "student_ema0.5" / "model.safetensors")
    assert exported.keys() == trainer.method.student.net._orig_mod.state_dict().keys()
    with trainer.ema.applied(0):
        for name, p in trainer.method.student.net._orig_mod.named_parameters():
            assert torch.equal(exported[name], p.detach()), name


def test_a_student_with_a_module_under_two_names_exports_and_loads(tmp_path):
    """Tied weights: safetensors refuses tensors that share memory, so save_pretrained of such a
    student raised (the trainer's checkpoints copied aliases, its exports did not)."""
    torch.manual_seed(0)
    model = toy()
    model.net.alias = model.net.inp
    config = TrainerConfig(iterations=2, batch_size=64, output_dir=str(tmp_path), progress=False,
                           ema_decays=(0.5,), optimizer=OptimizerConfig(lr=1e-2))
    trainer = Trainer(SFT(model), DATA, config)
    trainer.train()
    for folder in ("student", "student_ema0.5"):
        net = ToyNet()
        net.alias = net.inp
        loaded = fk.Denoiser.from_pretrained(tmp_path / folder, net=net)
        assert loaded.net.alias is loaded.net.inp
    torch.testing.assert_close(loaded.net.inp.weight, trainer.ema.shadow(0)[0].view_as(loaded.net.inp.weight))


def test_a_fresh_run_replaces_the_earlier_runs_checkpoints(tmp_path):
    """resume=False: the earlier run's checkpoints go (a later resume would load them, and pruning
    would delete the new run's own); resuming a checkpoint beyond the iterations asked for raises."""
    _run(tmp_path, 8, resume=False)
    with pytest.warns(UserWarning, match="deleted 2 checkpoints of an earlier run"):
        _run(tmp_path, 4, resume=False)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["checkpoint-00000004.safetensors"]
    _run(tmp_path, 8, resume=False)
    with pytest.raises(ValueError, match="at iteration 8, beyond trainer.iterations 4"):
        _run(tmp_path, 4, resume=True)


def test_resuming_another_methods_checkpoint_raises(tmp_path):
    """A DMD2 run's checkpoint holds the student (and more): CM on the same folder must not take
    it up (only fewer networks were caught before), nor the other way round."""
    _run(tmp_path, 4, resume=False)
    teacher = toy().eval()
    config = TrainerConfig(iterations=8, batch_size=32, output_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"a checkpoint of DMD2 .* not of CM"):
        Trainer(CM(student_of(teacher), teacher, CMConfig(mode="cd")), DATA, config).train()


def test_torchrun_processes_without_a_parallel_mode_raise(monkeypatch):
    """Launched as several processes with parallel='none', each would train its own copy."""
    from fastgen_kernels.distill import parallel

    monkeypatch.setattr(parallel, "init", lambda device=None: (0, 2, torch.device("cpu")))
    teacher = toy().eval()
    with pytest.raises(ValueError, match="launched as 2 processes .* set trainer.parallel to 'ddp' or 'fsdp'"):
        Trainer(SFT(student_of(teacher)), DATA, TrainerConfig(batch_size=32, progress=False))


def test_scm_needs_a_logvar_head():
    from fastgen_kernels.models import DiT, DiTConfig

    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2))
    student = fk.Denoiser(net, "trig", "trig_F", sigma_data=0.5, distilled=True)
    with pytest.raises(ValueError, match="needs a log-variance head .* student.net_overrides.logvar_head=true"):
        SCM(student, None, SCMConfig(mode="ct"))


@pytest.mark.parametrize("override, message", [
    (dict(iterations=-1), "trainer.iterations must be >= 0"),
    (dict(batch_size=0), "trainer.batch_size must be >= 1"),
    (dict(grad_accumulation=0), "trainer.grad_accumulation must be >= 1"),
    (dict(log_every=0), "trainer.log_every must be >= 1"),
    (dict(checkpoint_every=0), "trainer.checkpoint_every must be >= 1"),
    (dict(keep_checkpoints=0), "trainer.keep_checkpoints must be >= 1"),
    (dict(optimizer=dict(lr=0.0)), "optimizer.lr must be > 0"),
    (dict(optimizer=dict(learning_rates={"fake_score": -1.0})), "optimizer.learning_rates.fake_score must be > 0"),
    (dict(optimizer=dict(min_lr_ratio=1.5)), r"optimizer.min_lr_ratio must be in \[0, 1\]"),
    (dict(optimizer=dict(warmup_iterations=-2)), "optimizer.warmup_iterations must be >= 0"),
    (dict(optimizer=dict(clip_grad_norm=0.0)), "optimizer.clip_grad_norm must be > 0 or None"),
    (dict(optimizer=dict(betas=(0.9, 1.0))), r"optimizer.betas must be in \[0, 1\)"),
])
def test_bad_trainer_settings_raise_before_training(override, message):
    """Each would otherwise fail mid-run (a division by zero at the first log, a pruning error
    after the first checkpoint) or train nonsense."""
    optimizer = override.pop("optimizer", None)
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**override, **({"optimizer": OptimizerConfig(**optimizer)} if optimizer else {}))


def test_each_optimizers_learning_rate_is_logged(tmp_path):
    """The logged lr is the student's; an optimizer given its own (DMD2's fake score) gets its own
    lr_<name> entry."""
    torch.manual_seed(0)
    teacher = toy().eval()
    optimizer = OptimizerConfig(lr=1e-3, learning_rates={"fake_score": 3e-3}, warmup_iterations=2)
    config = TrainerConfig(iterations=2, batch_size=16, output_dir=str(tmp_path), progress=False, log_every=1,
                           optimizer=optimizer)
    records = Trainer(DMD2(student_of(teacher), teacher), DATA, config).train()
    logged = [(r["lr"], r["lr_fake_score"]) for r in records]
    assert logged == [pytest.approx((5e-4, 1.5e-3)), pytest.approx((1e-3, 3e-3))]
    assert "lr_discriminator" not in records[0]


def test_accumulating_a_batch_normalized_loss_warns(tmp_path):
    """f-Distill normalizes h by its micro-batch mean: accumulation only approximates the big step."""
    torch.manual_seed(0)
    teacher = toy().eval()
    config = TrainerConfig(iterations=1, batch_size=32, grad_accumulation=2, output_dir=str(tmp_path), progress=False)
    with pytest.warns(UserWarning, match="FDistill normalizes its loss by a statistic of each micro-batch of 16"):
        Trainer(FDistill(student_of(teacher), teacher), DATA, config)


KILLED_RUN = r"""
import sys, time
sys.path.insert(0, {tests!r})
import torch
from toy import ToyNet, mixture
import fastgen_kernels as fk
from fastgen_kernels.distill import SFT
from fastgen_kernels.distill.trainer import OptimizerConfig, Trainer, TrainerConfig

torch.manual_seed(0)
model = fk.Denoiser(ToyNet(), "trig", "trig_F", sigma_data=1.0, null_cond=4, shape=(2,))
config = TrainerConfig(iterations=60, batch_size=64, output_dir=sys.argv[1], progress=False, checkpoint_every=5,
                       log_every=1, ema_decays=(0.99,), optimizer=OptimizerConfig(lr=1e-3, decay="cosine"))
trainer = Trainer(SFT(model), mixture(512), config)
step = trainer.step
trainer.step = lambda i: (time.sleep(float(sys.argv[2])), step(i))[1]   # slow enough to be killed mid-run
trainer.train()
"""


def test_a_killed_run_resumes_where_its_last_checkpoint_left_off(tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent)))
    subprocess.run([sys.executable, str(script), str(tmp_path / "full"), "0"], check=True)
    victim = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), "0.05"])
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-00000020.safetensors"
    deadline = time.time() + 120
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    logged = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert 20 <= len(logged) < 60, "the run was not interrupted mid-way"
    subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "0"], check=True)
    read = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert read("killed") == read("full")


def _dit_methods():
    """Each method over a tiny reference DiT (fused ops) as student, teacher and fake score."""
    from fastgen_kernels.models import DiT, DiTConfig

    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=10)

    def denoiser(schedule="trig", prediction="trig_F", **overrides):
        torch.manual_seed(0)
        net = DiT(config, **overrides)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
        return fk.Denoiser(net, schedule, prediction, sigma_data=0.5, null_cond=10, shape=(4, 8, 8))

    teacher = denoiser().requires_grad_(False).eval()
    return {"sft": lambda: SFT(denoiser()), "cm-cd": lambda: CM(student_of(teacher), teacher, CMConfig(mode="cd")),
            "scm-cd": lambda: SCM(denoiser(logvar_head=True), teacher, SCMConfig()),
            "meanflow-data": lambda: MeanFlow(denoiser("rf", "mean_flow", second_time=True)),
            "dmd2-gan": lambda: DMD2(student_of(teacher), teacher, DMD2Config(student_every=2, gan_weight=0.1)),
            "ladd": lambda: LADD(student_of(teacher), teacher, LADDConfig())}


@pytest.mark.parametrize("name", list(_dit_methods()))
def test_each_step_of_a_dit_runs_under_bf16_autocast(name):
    """Trainer precision "bf16": the network runs in bf16 while data, targets and the solver's
    quantities stay fp32; the methods' losses get them in one dtype."""
    method = _dit_methods()[name]()
    x0, cond = torch.randn(4, 4, 8, 8), torch.arange(4)
    for iteration in (1, 2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            metrics = method.training_step(Batch(x0, cond, seed=iteration), iteration)
        differentiable = [v for v in metrics.values() if v.requires_grad]
        assert differentiable and all(math.isfinite(v.item()) for v in metrics.values()), metrics
        torch.autograd.backward(differentiable)


# --------------------------------------------------------------------------- one pass for the JVP and the forward


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", ["scm-cd", "meanflow-data"])
def test_one_pass_step_equals_the_two_pass_step(name, backend, monkeypatch):
    """sCM and MeanFlow take their exact JVP and the forward their loss differentiates from one
    pass (base.output_and_jvp -> forward_and_jvp); through DDP or FSDP2 they run the two apart.
    Both give the same loss and gradients (the fused DiT, its cpu kernels or the reference)."""
    method = _dit_methods()[name]()
    params = [p for p in method.parameters() if p.requires_grad]
    x0, cond = torch.randn(4, 4, 8, 8), torch.arange(4)
    runs = []
    for two_pass in (False, True):
        monkeypatch.setattr(base, "data_parallel", lambda model, two_pass=two_pass: two_pass)
        for p in params:
            p.grad = None
        with fk.use_backend(backend):
            out = forward_backward(method, Batch(x0, cond, seed=3), 10**6, ("student",))
        runs.append((out, [p.grad for p in params]))
    (one, one_grads), (two, two_grads) = runs
    torch.testing.assert_close(one["student"], two["student"], rtol=1e-6, atol=0)
    assert any(g.abs().max() > 0 for g in one_grads)
    for a, b in zip(one_grads, two_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while fn() runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("name", ["scm-cd", "meanflow-data"])
def test_one_pass_keeps_the_forwards_activations_and_no_tangents_history(name):
    """forward_and_jvp's tangent equals jvp's and has no history; the pass saves about what the
    forward alone saves (a few (B, D)-sized tensors more, for the tangents of the embeddings'
    PyTorch ops: 1.2-1.4x at this tiny width), where tangents with a backward history doubled it."""
    model = _dit_methods()[name]().student
    x, v = torch.randn(2, 4, 4, 8, 8).unbind(0)
    t, cond = torch.rand(4) + 0.3, torch.arange(4)
    extra = {"return_logvar": True} if name.startswith("scm") else {"r": 0.5 * t}

    def fn(a, s):
        return model.raw(a, s, cond, **extra)

    out, tangent = forward_and_jvp(fn, (x, t), (v, torch.ones_like(t)))
    primal = out[0] if isinstance(out, tuple) else out
    assert primal.grad_fn is not None and not tangent.requires_grad
    expected = jvp(lambda a, s: (lambda o: o[0] if isinstance(o, tuple) else o)(fn(a, s)), (x, t),
                   (v, torch.ones_like(t)))
    torch.testing.assert_close(tangent, expected, rtol=1e-5, atol=1e-7)
    ratio = _saved_bytes(lambda: forward_and_jvp(fn, (x, t), (v, torch.ones_like(t)))) / _saved_bytes(lambda: fn(x, t))
    assert ratio < 1.5, ratio


def test_one_pass_frees_each_tangent_after_its_last_use():
    """The pass saves activations for the backward without their tangents (a saved dual tensor
    keeps its tangent until the dual level closes): a block's output tangent is gone once the next
    blocks have run, before the pass ends."""
    import weakref

    from fastgen_kernels.models import DiT, DiTConfig

    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    model = fk.Denoiser(DiT(config), "trig", "trig_F", sigma_data=0.5, null_cond=10, shape=(4, 8, 8))
    tangents, alive_at_the_end = [], []
    model.net.blocks[0].register_forward_hook(
        lambda module, args, out: tangents.append(weakref.ref(torch.autograd.forward_ad.unpack_dual(out).tangent)))
    model.net.final_layer.register_forward_pre_hook(
        lambda module, args: alive_at_the_end.append(tangents[0]() is not None))
    x, v = torch.randn(2, 4, 4, 8, 8).unbind(0)
    t, cond = torch.rand(4) + 0.3, torch.arange(4)
    forward_and_jvp(lambda a, s: model.raw(a, s, cond), (x, t), (v, torch.ones_like(t)))
    assert alive_at_the_end == [False]


def test_prepare_builds_the_same_networks_from_the_same_seed(tmp_path):
    """The command line's runs repeat (and every torchrun process starts from the same weights):
    a student from scratch is initialized from trainer.seed, and the caller's generator is left
    alone."""
    from fastgen_kernels.distill.run import DataConfig, RunConfig, StudentConfig, prepare
    from fastgen_kernels.models import DiTConfig

    torch.save({"x": torch.randn(16, 1, 8, 8)}, tmp_path / "data.pt")
    net = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=0)

    def student_weights(seed):
        config = RunConfig(data=DataConfig(source=str(tmp_path / "data.pt")), student=StudentConfig(net=net),
                           trainer=TrainerConfig(seed=seed, output_dir=str(tmp_path / "out"), progress=False))
        torch.manual_seed(seed + 100)  # a caller's own draws do not change the weights
        before = torch.random.get_rng_state()
        weights = [p.detach().clone() for p in prepare(config).method.student.parameters()]
        assert torch.equal(torch.random.get_rng_state(), before)
        return weights

    first, again, other = student_weights(0), student_weights(0), student_weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
