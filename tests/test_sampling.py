"""Schedules, the Denoiser protocol and ``sample``, checked against closed forms.

For Gaussian data x0 ~ N(0, s^2 I) the ideal denoiser is linear, E[x0 | x_t] = alpha s^2 / m(t)^2 x_t
with m(t)^2 = alpha^2 s^2 + sigma^2, and the probability-flow ODE maps x_T to x_0 = s x_T / m(T)
exactly (it keeps x_t / m(t) fixed). So every teacher solver's answer has a known error, which must
shrink at the solver's order, and a 1-step student that is this ODE map must reproduce it.
"""

import contextlib
import math

import pytest
import torch
from torch import nn

import fastgen_kernels as fk
from fastgen_kernels.schedules import GRIDS, PREDICTIONS, get_schedule
from fastgen_kernels.sampling import default_timesteps

DATA_STD = 0.7
PAIRS = [("edm", "x0"), ("edm", "eps"), ("edm", "flow"), ("rf", "flow"), ("rf", "x0"), ("rf", "eps"),
         ("vp", "eps"), ("vp", "v"), ("vp", "x0"), ("trig", "trig_F"), ("trig", "flow")]


def marginal_std(schedule, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return (schedule.alpha(t) ** 2 * DATA_STD ** 2 + schedule.sigma(t) ** 2).sqrt()


class GaussianDenoiser(nn.Module):
    """The ideal network for N(0, DATA_STD^2) data, in a chosen prediction; ``ode_map`` makes it the
    exact ODE map x_t -> x_0 instead (a perfect consistency model); ``cond`` (B,) shifts its mean."""

    def __init__(self, schedule, prediction, ode_map=False, time_scale=1.0):
        super().__init__()
        self.schedule, self.prediction, self.ode_map = get_schedule(schedule), prediction, ode_map
        self.time_scale = time_scale
        self.calls = 0
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))  # the device and dtype

    def forward(self, x, t_in, cond=None):
        self.calls += 1
        t = t_in / self.time_scale
        tb = t.reshape(-1, *[1] * (x.dim() - 1))
        mean = 0 if cond is None else cond.to(x.dtype).reshape(tb.shape)
        alpha, m = self.schedule.alpha(tb), marginal_std(self.schedule, tb)
        if self.ode_map:
            x0 = DATA_STD * (x - alpha * mean) / m + mean
        else:
            x0 = mean + alpha * DATA_STD ** 2 / m ** 2 * (x - alpha * mean)
        return self.schedule.from_x0(self.prediction, x0, x, t)


def ode_solution(model, times, z):
    """x_0 of the exact ODE from x = sigma(t_0) z at t_0."""
    t0 = torch.tensor(times[0], dtype=torch.float64)
    return DATA_STD * model.schedule.sigma(t0) * z / marginal_std(model.schedule, t0)


# --- schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,prediction", PAIRS)
def test_prediction_conversions_round_trip(schedule, prediction, generator):
    sched = get_schedule(schedule)
    x, x0 = torch.randn(2, 5, 3, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(5, generator=generator, dtype=torch.float64) * (sched.t_max - 0.01) + 0.01
    out = sched.from_x0(prediction, x0, x, t)
    torch.testing.assert_close(sched.to_x0(prediction, out, x, t), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ["edm", "rf", "vp", "trig"])
def test_derivatives_and_velocity(schedule, generator):
    """alpha', sigma' against central differences; velocity = d/dt (alpha x0 + sigma eps)."""
    sched = get_schedule(schedule)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * (sched.t_max - 0.02) + 0.01
    h = 1e-7
    for f, df in ((sched.alpha, sched.d_alpha), (sched.sigma, sched.d_sigma)):
        torch.testing.assert_close(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)
    x0, eps = torch.randn(2, 6, 7, generator=generator, dtype=torch.float64)
    x = sched.add_noise(x0, eps, t)
    tb = t[:, None]
    expected = sched.d_alpha(tb) * x0 + sched.d_sigma(tb) * eps
    torch.testing.assert_close(sched.velocity(x0, x, t), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ["edm", "rf", "vp", "trig"])
@pytest.mark.parametrize("kind", GRIDS)
def test_grids(schedule, kind):
    sched = get_schedule(schedule)
    if kind == "karras" and schedule in ("rf", "vp"):
        with pytest.raises(ValueError, match="Karras"):
            sched.grid(7, kind)
        return
    ts = sched.grid(7, kind)
    assert ts.shape == (8,) and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    if kind != "shifted":
        assert ts[0].item() == pytest.approx(sched.t_max)
    if kind == "karras":
        assert ts[-2].item() == pytest.approx(sched.t_min)


def test_karras_grid_is_the_edm_formula():
    n, s_max, s_min = 5, 80.0, 0.002
    expected = [(s_max ** (1 / 7) + i / (n - 1) * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7 for i in range(n)]
    torch.testing.assert_close(get_schedule("edm").grid(n).tolist(), expected + [0.0])


def test_shifted_grid():
    ts = get_schedule("rf").grid(4, "shifted", shift=3.0)
    uniform = torch.linspace(0.999, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(ts, 3 * uniform / (1 + 2 * uniform))


def test_vp_matches_the_ddpm_table():
    sched = get_schedule("vp")
    abar = torch.cumprod(1 - torch.tensor(sched.betas, dtype=torch.float64), 0)
    k = torch.tensor([0, 10, 500, 998])
    t = (k + 1).double() / len(sched.betas)   # diffusers step k has noise level abar[k]
    torch.testing.assert_close(sched.alpha(t) ** 2, abar[k])
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones(4, dtype=torch.float64))


def test_prediction_needing_another_schedule_is_refused():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="vp"):
        get_schedule("rf").to_x0("v", x, x, 0.5)
    with pytest.raises(ValueError, match="trig"):
        get_schedule("edm").from_x0("trig_F", x, x, 0.5)
    with pytest.raises(ValueError, match="prediction must be one of"):
        get_schedule("edm").to_x0("score", x, x, 0.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        get_schedule("edm").to_x0("x0", x, x, torch.ones(3))


def test_schedule_round_trips_through_its_dict():
    for name in ("edm", "rf", "vp", "trig"):
        sched = get_schedule(name, sigma_data=1.0)
        assert get_schedule(sched.to_dict()) == sched


# --- the Denoiser --------------------------------------------------------------------------------

def test_edm_preconditioning_is_the_edm_formula(generator):
    seen = {}

    class Net(nn.Module):
        def forward(self, x, t, cond=None):
            seen["x"], seen["t"] = x, t
            return torch.tanh(x)

    model = fk.Denoiser(Net(), "edm", "x0", sigma_data=0.5, preconditioning="edm")
    x = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    d = model.x0(x, t)
    tb = t[:, None, None]
    c_in, c_skip = 1 / (0.25 + tb ** 2).sqrt(), 0.25 / (tb ** 2 + 0.25)
    c_out = tb * 0.5 / (tb ** 2 + 0.25).sqrt()
    torch.testing.assert_close(seen["x"], c_in * x)
    torch.testing.assert_close(seen["t"], t.log() / 4)
    torch.testing.assert_close(d, c_skip * x + c_out * torch.tanh(c_in * x))


def test_time_scale_feeds_the_network_scaled_times(generator):
    net = GaussianDenoiser("rf", "flow", time_scale=1000.0)
    scaled = fk.Denoiser(net, "rf", "flow", time_scale=1000.0)
    plain = fk.Denoiser(GaussianDenoiser("rf", "flow"), "rf", "flow")
    x = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(scaled.x0(x, 0.3), plain.x0(x, 0.3))


def test_denoiser_bad_arguments():
    with pytest.raises(TypeError, match="net must be an nn.Module"):
        fk.Denoiser(lambda x, t: x)
    with pytest.raises(ValueError, match="prediction must be one of"):
        fk.Denoiser(nn.Identity(), "edm", "score")
    with pytest.raises(ValueError, match="preconditioning='edm' needs"):
        fk.Denoiser(nn.Identity(), "rf", "flow", preconditioning="edm")
    # predictions their schedule cannot convert: at construction, not at the first sampling step
    with pytest.raises(ValueError, match="Denoiser: prediction 'v' needs alpha"):
        fk.Denoiser(nn.Identity(), "edm", "v")
    with pytest.raises(ValueError, match="Denoiser: prediction 'trig_F' needs the trig schedule"):
        fk.Denoiser(nn.Identity(), "rf", "trig_F")


# --- teacher solvers ------------------------------------------------------------------------------

def test_dpm_solver_from_trig_t_max_in_fp32():
    """DPM-Solver++(2M) from trig's t = pi/2 in fp32, where cos(fp32(pi/2)) < 0: all NaN before (a
    log of a negative alpha / sigma); now alpha = 0 there, as rf's at t = 1, and the 16-step error
    against the exact ODE is fp64's."""
    errors = {}
    for dtype in (torch.float32, torch.float64):
        model = fk.Denoiser(GaussianDenoiser("trig", "trig_F").to(dtype), "trig", "trig_F")
        z = torch.randn(4, 1, dtype=dtype, generator=torch.Generator().manual_seed(0))
        times = model.schedule.grid(16, t_max=math.pi / 2).tolist()
        x = fk.sample(model, noise=z, solver="dpm++2m", timesteps=times)
        errors[dtype] = (x.double() - ode_solution(model, times, z.double())).abs().max().item()
    assert errors[torch.float32] < 0.05 and abs(errors[torch.float32] - errors[torch.float64]) < 1e-3, errors


def test_trig_time_range_follows_its_sigma_data():
    """Trig(sigma_data=...) built directly spans EDM's noise levels 0.002 to 80 as get_schedule's
    does (its defaults were sigma_data 0.5's: noise level 160 at t_max for sigma_data 1)."""
    from fastgen_kernels.schedules import Trig

    schedule = Trig(sigma_data=1.0)
    assert schedule.t_max == math.atan(80.0) and schedule.t_min == math.atan(0.002)
    assert get_schedule("trig", 1.0) == schedule and get_schedule(schedule.to_dict()) == schedule


def test_neg_cond_may_be_a_parameter():
    """neg_cond shaped like cond but of a Tensor subclass (a learned null embedding, nn.Parameter)
    is taken (the form check compared exact types: 'must be shaped like cond [(8,)], got [(8,)]')."""
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0")
    cond = torch.zeros(8, dtype=torch.float64)
    x = fk.sample(model, 2, batch_size=8, shape=(1,), cond=cond, guidance_scale=2.0,
                  neg_cond=nn.Parameter(torch.ones(8, dtype=torch.float64)), seed=0)
    assert x.shape == (8, 1)


def test_batch_size_defaults_to_conds_batch():
    """sample(model, steps, cond=labels) draws one sample per label (the default batch of 1 refused
    a cond of 8: 'cond must be a tensor with batch 1')."""
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0", shape=(1,))
    cond = torch.zeros(8, dtype=torch.float64)
    x = fk.sample(model, 2, cond=cond, guidance_scale=2.0, neg_cond=torch.ones(8, dtype=torch.float64), seed=0)
    assert x.equal(fk.sample(model, 2, batch_size=8, cond=cond, guidance_scale=2.0,
                             neg_cond=torch.ones(8, dtype=torch.float64), seed=0))
    assert fk.sample(model, 2, seed=0).shape == (1, 1)
    with pytest.raises(ValueError, match=r"cond must be a tensor with batch 3"):
        fk.sample(model, 2, batch_size=3, cond=cond)


def test_meanflow_default_times_start_at_the_schedules_noise():
    """A flow map's default jump starts at pure noise on its schedule: rf's t = 1, else t_max (edm
    started at noise level 1, not 80, and trig at 1 rad)."""
    for schedule in ("rf", "edm", "trig"):
        model = fk.Denoiser(nn.Identity(), schedule, "mean_flow")
        start = default_timesteps(model, 2, "meanflow")[0]
        assert start == (1.0 if schedule == "rf" else model.schedule.t_max)


def solver_errors(schedule, prediction, solver, steps_list):
    model = fk.Denoiser(GaussianDenoiser(schedule, prediction), schedule, prediction)
    z = torch.ones(1, 1, dtype=torch.float64)
    errors = []
    for steps in steps_list:
        times = model.schedule.grid(steps).tolist()
        x = fk.sample(model, steps, noise=z, solver=solver, timesteps=times)
        errors.append((x - ode_solution(model, times, z)).abs().item())
    return errors


@pytest.mark.parametrize("schedule,prediction", [("edm", "x0"), ("edm", "eps"), ("rf", "flow"),
                                                 ("rf", "x0"), ("trig", "trig_F")])
@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpm++2m", 2)])
def test_teacher_solvers_converge_at_their_order(schedule, prediction, solver, order):
    errors = solver_errors(schedule, prediction, solver, [16, 32, 64, 128])
    ratios = [a / b for a, b in zip(errors[1:], errors[2:])]
    assert errors[-1] < (0.03 if order == 1 else 3e-3)
    for ratio in ratios:  # halving the step divides the error by about 2^order
        assert 2 ** order * 0.75 < ratio < 2 ** order * 1.35, (errors, ratios)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_teacher_solvers_on_the_vp_table(prediction, solver):
    """VP's piecewise-interpolated table is not smooth enough for clean orders; accuracy only."""
    errors = solver_errors("vp", prediction, solver, [64, 256])
    assert errors[-1] < 3e-3 and errors[-1] < errors[0] + 1e-4, errors


def test_teacher_samples_have_the_data_variance():
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0")
    x = fk.sample(model, 32, batch_size=20000, shape=(1,), solver="heun", seed=0)
    assert x.dtype == torch.float64 and x.shape == (20000, 1)
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.03)


# --- students -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,prediction", [("edm", "x0"), ("rf", "flow"), ("trig", "trig_F"),
                                                 ("vp", "eps")])
def test_one_step_student_that_is_the_ode_map(schedule, prediction, generator):
    model = fk.Denoiser(GaussianDenoiser(schedule, prediction, ode_map=True), schedule, prediction,
                        distilled=True)
    z = torch.randn(4096, 1, generator=generator, dtype=torch.float64)
    times = default_timesteps(model, 1, "consistency")
    x = fk.sample(model, 1, noise=z)
    torch.testing.assert_close(x, ode_solution(model, times, z), rtol=1e-6, atol=1e-6)
    teacher = fk.Denoiser(GaussianDenoiser(schedule, prediction), schedule, prediction)
    x_teacher = fk.sample(teacher, noise=z, solver="heun", timesteps=teacher.schedule.grid(256,
                          t_max=times[0]).tolist())
    torch.testing.assert_close(x, x_teacher, rtol=0, atol=2e-3)


@pytest.mark.parametrize("stochastic", [True, False], ids=["sde", "ode"])
def test_few_step_renoising_matches_a_hand_written_loop(stochastic):
    model = fk.Denoiser(GaussianDenoiser("edm", "x0", ode_map=True), "edm", "x0", distilled=True)
    times = [80.0, 2.0, 0.3, 0.0]
    x = fk.sample(model, noise=None, shape=(2, 3), batch_size=5, timesteps=times, stochastic=stochastic, seed=7)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    step_noise = torch.randn(2, 5, 2, 3, generator=gen, dtype=torch.float64)
    y = times[0] * z
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        x0 = model.x0(y, t)
        if t_next > 0:
            y = x0 + t_next * (step_noise[i] if stochastic else (y - x0) / t)
        else:
            y = x0
    torch.testing.assert_close(x, y)


def test_student_defaults_follow_the_methods_table():
    rf = fk.Denoiser(nn.Identity(), "rf", "flow", distilled=True)
    edm = fk.Denoiser(nn.Identity(), "edm", "x0", distilled=True)
    assert default_timesteps(rf, 4, "consistency") == [0.999, 0.937, 0.833, 0.624, 0.0]
    assert default_timesteps(edm, 2, "consistency") == [80.0, 0.821, 0.0]
    assert default_timesteps(rf, 3, "consistency") == rf.schedule.grid(3).tolist()
    # off the table a Karras grid one longer, without its t_min: a last step at t_min = 0.002 would
    # re-noise to 0.002 and denoise again
    for steps in (3, 4):
        times = default_timesteps(edm, steps, "consistency")
        assert times == edm.schedule.grid(steps + 1)[:steps].tolist() + [0.0] and times[-2] > 0.1


class GaussianFlowMap(nn.Module):
    """The exact average velocity of the rf ODE for Gaussian data: u = (x_t - x_r) / (t - r)."""

    def __init__(self):
        super().__init__()
        self.schedule = get_schedule("rf")
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, cond, r):
        tb, rb = t[:, None], r[:, None]
        x_r = x * marginal_std(self.schedule, rb) / marginal_std(self.schedule, tb)
        return (x - x_r) / (tb - rb)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_map_steps_are_exact(steps, generator):
    model = fk.Denoiser(GaussianFlowMap(), "rf", "mean_flow", distilled=True)
    z = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    x = fk.sample(model, steps, noise=z)
    torch.testing.assert_close(x, DATA_STD * z)   # m(1) = 1 for rf
    assert fk.sample(model, steps, noise=z, solver="meanflow").equal(x)


# --- guidance, randomness, options ----------------------------------------------------------------

def test_guidance_of_one_is_the_conditional_model(generator):
    net = GaussianDenoiser("edm", "x0")
    model = fk.Denoiser(net, "edm", "x0", null_cond=0)
    cond = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    z = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    plain = fk.sample(model, 12, noise=z, cond=cond)
    calls = net.calls
    assert fk.sample(model, 12, noise=z, cond=cond, guidance_scale=1.0).equal(plain)
    assert net.calls - calls == calls   # no unconditional evaluations


def test_guidance_mixes_conditional_and_unconditional_in_one_call(generator):
    net = GaussianDenoiser("edm", "x0", ode_map=True)
    model = fk.Denoiser(net, "edm", "x0", null_cond=0.0, distilled=True)
    cond = torch.tensor([1.0, -2.0], dtype=torch.float64)
    z = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    x = fk.sample(model, 1, noise=z, cond=cond, guidance_scale=3.0)
    assert net.calls == 1
    x_t = 80.0 * z
    conditional, unconditional = model.x0(x_t, 80.0, cond), model.x0(x_t, 80.0, torch.zeros_like(cond))
    torch.testing.assert_close(x, unconditional + 3.0 * (conditional - unconditional))
    explicit = fk.sample(model, 1, noise=z, cond=cond, guidance_scale=3.0, neg_cond=torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(explicit, x)


def test_seed_determinism():
    model = fk.Denoiser(GaussianDenoiser("rf", "flow", ode_map=True), "rf", "flow", distilled=True, shape=(3, 5))
    a = fk.sample(model, 4, batch_size=3, seed=11)
    assert a.shape == (3, 3, 5)
    assert fk.sample(model, 4, batch_size=3, seed=11).equal(a)
    assert fk.sample(model, 4, batch_size=3, generator=torch.Generator().manual_seed(11)).equal(a)
    assert not fk.sample(model, 4, batch_size=3, seed=12).equal(a)


def test_trajectory_and_progress_bar(capsys):
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0", shape=(2,))
    x, trajectory = fk.sample(model, 5, solver="euler", seed=0, return_trajectory=True, progress=True)
    assert len(trajectory) == 6 and trajectory[-1].equal(x)
    assert trajectory[0].abs().max() > 10      # starts at sigma = 80
    assert "5/5" in capsys.readouterr().err


def test_solver_auto():
    assert fk.sampling.choose_solver(fk.Denoiser(nn.Identity(), "edm"), 50) == "heun"
    assert fk.sampling.choose_solver(fk.Denoiser(nn.Identity(), "rf", "flow"), 50) == "euler"
    assert fk.sampling.choose_solver(fk.Denoiser(nn.Identity(), "rf", "flow"), 4) == "dpm++2m"
    assert fk.sampling.choose_solver(fk.Denoiser(nn.Identity(), "rf", "flow", distilled=True), 4) == "consistency"
    assert fk.sampling.choose_solver(fk.Denoiser(nn.Identity(), "rf", "mean_flow"), 50) == "meanflow"


def test_bad_inputs():
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0", shape=(2,))
    cases = [
        (dict(steps=0), ValueError, "steps must be an int >= 1"),
        (dict(steps=True), ValueError, "steps must be an int >= 1"),
        (dict(timesteps=[80.0, 90.0, 0.0]), ValueError, "strictly decreasing"),
        (dict(timesteps=[80.0, 1.0]), ValueError, "end at 0"),
        (dict(timesteps=[0.0]), ValueError, "at least 2"),
        (dict(batch_size=1, cond=torch.zeros(3)), ValueError, "cond must be a tensor with batch 1"),
        (dict(guidance_scale=2.0, cond=torch.zeros(1)), ValueError, "neg_cond"),
        (dict(guidance_scale=2.0), ValueError, "needs cond"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
        (dict(solver="ddim"), ValueError, "solver must be one of"),
        (dict(solver="meanflow"), ValueError, "flow-map model"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(noise=torch.zeros(3, dtype=torch.long)), ValueError, "noise must be"),
        (dict(cuda_graph=True), ValueError, "CUDA device"),
        (dict(cuda_graph="false"), ValueError, "cuda_graph must be 'auto', True or False"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fk.sample(model, **kwargs)
    with pytest.raises(ValueError, match="shape is needed"):
        fk.sample(fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0"))
    with pytest.raises(TypeError, match="must be a fastgen_kernels.Denoiser"):
        fk.sample(GaussianDenoiser("edm", "x0"), shape=(2,))
    flow_map = fk.Denoiser(GaussianFlowMap(), "rf", "mean_flow")
    with pytest.raises(ValueError, match="samples with solver 'meanflow'"):
        fk.sample(flow_map, shape=(2,), solver="euler")


def test_every_prediction_is_known():
    assert set(PREDICTIONS) == {"x0", "eps", "v", "flow", "trig_F", "mean_flow"}
    assert math.isclose(get_schedule("trig", sigma_data=1.0).t_max, math.atan(80.0))


def test_copies_leave_captured_graphs_behind():
    """A CUDA graph can be neither copied nor pickled: a deepcopy of a Denoiser that has sampled
    through one (a DMD2 fake score made from its teacher) starts without graphs."""
    import copy

    class Uncopyable:
        def __deepcopy__(self, memo):
            raise RuntimeError("CUDA graphs cannot be copied")

    model = fk.Denoiser(torch.nn.Linear(2, 2), "rf", "flow")
    model._graphs["captured"] = Uncopyable()
    clone = copy.deepcopy(model)
    assert clone._graphs == {} and list(model._graphs) == ["captured"]
    torch.testing.assert_close(clone.net.weight, model.net.weight)


def test_auto_autocast_is_bf16_for_full_precision_networks_on_gpus_only():
    from fastgen_kernels.sampling import _autocast_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dtype, expected in [(torch.float32, torch.bfloat16), (torch.float16, None), (torch.bfloat16, None)]:
        model = fk.Denoiser(torch.nn.Linear(2, 2).to(dtype), "rf", "flow")
        assert _autocast_dtype("auto", cuda, model) == expected
        assert _autocast_dtype("auto", cpu, model) is None
        assert _autocast_dtype(torch.float16, cuda, model) == torch.float16


def test_the_cuda_graph_key_follows_what_the_graph_holds():
    """sample replays a captured graph only while its key (sampling.graph_state) is unchanged:
    the same for an untouched model, another after a dtype cast (new tensors), quantize_fp8 (new
    modules and buffers) or under a forced backend."""
    from fastgen_kernels.models import DiT, DiTConfig
    from fastgen_kernels.sampling import graph_state

    net = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=3))
    model = fk.Denoiser(net, "rf", "flow", null_cond=3, shape=(4, 4, 4))
    key = graph_state(model)
    assert graph_state(model) == key
    with fk.use_backend("reference"):
        assert graph_state(model) != key
    model.to(torch.float64)
    cast = graph_state(model)
    assert cast != key
    fk.quantize_fp8(model.net)
    assert graph_state(model) != cast


def test_the_cuda_graph_key_follows_the_networks_switches_and_modes():
    """Changes that keep every tensor but change what the network computes give another key:
    train() (dropout, diffusers' label dropout) and eval(), set_fused, fuse_epilogues, the
    Denoiser's time scaling, inference mode (its static inputs would be inference tensors), the
    global switches that pick kernels (an SDPA backend choice, TF32); before, graph_state was
    equal across them and a graph replayed the old computation."""
    from fastgen_kernels.models import DiT, DiTConfig
    from fastgen_kernels.sampling import graph_state

    net = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                        num_classes=3))
    model = fk.Denoiser(net, "rf", "flow", null_cond=3, shape=(4, 4, 4)).eval()
    seen = [graph_state(model)]

    def changed():
        key = graph_state(model)
        assert key not in seen
        seen.append(key)

    model.train()
    changed()
    model.eval()
    assert graph_state(model) == seen[0]
    net.set_fused(False)
    changed()
    net.set_fused(True)
    model.time_scale = 1000.0
    changed()
    with torch.inference_mode():
        changed()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # kernels of another choice
        changed()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        changed()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fk.quantize_fp8(net)
    changed()
    fk.fuse_epilogues(net)
    changed()


def test_sampling_keeps_the_graphs_of_the_models_state_only(monkeypatch):
    """sampling._replay (with a stand-in for the capture, on the CPU) keeps at most
    MAX_SAMPLING_GRAPHS graphs, the most recently used, and none of a state the model has left;
    calls that alternate contexts (inference mode on and off) each keep their graph, and one
    captured under inference mode does not serve a call outside it (its static inputs would be
    inference tensors)."""
    from fastgen_kernels import sampling

    class Graph:
        def __init__(self, fn, outputs):
            self.fn, self.outputs = fn, outputs

        def replay(self):
            self.outputs[0].copy_(self.fn()[0])

    def capture(fn, generators=(), pool=None):
        outputs = fn()
        return Graph(fn, outputs), outputs

    monkeypatch.setattr(sampling, "capture_cuda_graph", capture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    model = fk.Denoiser(nn.Linear(2, 2), "rf", "flow")

    def call(scale, x=torch.ones(2)):
        key = (scale, sampling.graph_state(model))
        return sampling._replay(model, key, lambda z: (z * scale, None), (x,))[0]

    captures = []
    monkeypatch.setattr(sampling, "capture_cuda_graph", lambda fn, *a, **k: captures.append(fn) or capture(fn))
    for _ in range(3):
        with torch.inference_mode():
            assert call(2.0).tolist() == [2.0, 2.0]
        assert call(2.0, torch.full((2,), 3.0)).tolist() == [6.0, 6.0]  # another context: a graph of its own
    assert len(captures) == 2
    for scale in range(20):
        assert call(float(scale)).tolist() == [scale, scale]
    assert len(model._graphs) == sampling.MAX_SAMPLING_GRAPHS
    assert [key[0] for key in model._graphs] == [float(s) for s in range(12, 20)]
    call(12.0)  # a hit moves its graph to the end
    assert next(iter(model._graphs))[0] == 13.0
    model.net.weight.data = model.net.weight.data.clone()  # a new tensor: every graph is stale
    call(1.0)
    assert [key[0] for key in model._graphs] == [1.0]


def test_sampling_inside_a_callers_autocast_reads_the_weights_of_each_call():
    """sample's autocast keeps no cache: inside a caller's autocast context (whose nesting kept the
    inner one's cache alive) a weight updated in place between two calls was read as its first
    bf16 copy, and the second sample equalled the first."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, t, cond=None):
            return self.lin(x)

    torch.manual_seed(0)
    model = fk.Denoiser(Net(), "rf", "flow", shape=(8,), distilled=True)
    kwargs = dict(batch_size=2, seed=0, autocast=torch.bfloat16, cuda_graph=False)
    for outer in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with outer:
            first = fk.sample(model, 1, **kwargs)
            with torch.no_grad():
                model.net.lin.weight.mul_(2.0)
            second = fk.sample(model, 1, **kwargs)
        assert not torch.equal(first, second)
        assert torch.equal(second, fk.sample(model, 1, **kwargs))
