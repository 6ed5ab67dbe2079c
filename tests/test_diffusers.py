"""diffusers models from small random configs: accelerate, from_diffusers, FP8, schedulers."""

import pytest
import torch

import fastgen_kernels as fk
from fastgen_kernels.models.diffusers import FusedAttnProcessor, accelerate, from_diffusers
from fastgen_kernels.schedules import VP

diffusers = pytest.importorskip("diffusers")

from conftest import count_fp8_quantizations  # noqa: E402
from test_sampling import DATA_STD, GaussianDenoiser, marginal_std  # noqa: E402
from tolerances import snr_db  # noqa: E402


def randomized(model, dtype=torch.float64, std=0.1, seed=0):
    torch.manual_seed(seed)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def tiny_dit(dtype=torch.float64):
    return randomized(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32), dtype)


def tiny_pixart(dtype=torch.float64):
    return randomized(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=32), dtype)


def tiny_sd3(dtype=torch.float64):
    return randomized(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16), dtype)


def run(kind, model, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    t = torch.tensor([10.0, 700.0]).to(dtype)
    context = torch.randn(2, 5, 24, generator=gen).to(dtype)
    with torch.no_grad():
        if kind == "dit":
            return model(x, timestep=t, class_labels=torch.tensor([1, 10])).sample
        if kind == "pixart":
            return model(x, encoder_hidden_states=context, timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return model(x, encoder_hidden_states=context, pooled_projections=torch.randn(2, 12, generator=gen).to(dtype),
                     timestep=t).sample


MODELS = {"dit": tiny_dit, "pixart": tiny_pixart, "sd3": tiny_sd3}
EXPECTED = {"dit": {"adaLN-Zero norm": 2, "attention": 2, "transformer block": 2},
            "pixart": {"attention": 4, "transformer block": 2},
            "sd3": {"adaLN-Zero norm": 3, "joint attention": 2}}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_accelerate_keeps_the_outputs(kind, dtype, tol):
    model = MODELS[kind](dtype)
    keys = list(model.state_dict())
    expected = run(kind, model, dtype)
    report = accelerate(model)
    assert {k: len(v) for k, v in report.patched.items()} == EXPECTED[kind]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(run(kind, model, dtype), expected, rtol=tol, atol=tol)
    again = accelerate(model)   # idempotent
    assert not again.skipped and "transformer block" not in again.patched
    torch.testing.assert_close(run(kind, model, dtype), expected, rtol=tol, atol=tol)


def test_attention_processors_set_after_accelerate_take_diffusers_path():
    """set_attn_processor after accelerate(): the fused block gave the new processor its gate and
    residual, which diffusers' processors drop (a difference of 2.2 on outputs of about 1); the
    block now runs diffusers' forward while a processor is not ours."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_pixart()
    expected = run("pixart", model, torch.float64)
    accelerate(model)
    model.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(run("pixart", model, torch.float64), expected, rtol=1e-12, atol=1e-12)


def test_accelerated_pixart_keeps_diffusers_fp32_residual_stream_under_autocast():
    """PixArt's fp32 gate table promotes the residual stream to fp32 under bf16 autocast in
    diffusers; the fused blocks kept it in bf16 (8 blocks: 39 dB against fp64 where diffusers has
    48). Now within a dB of diffusers' own autocast run."""
    model = randomized(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=8, sample_size=8,
        patch_size=2, cross_attention_dim=64, caption_channels=24, norm_num_groups=32), std=0.05)
    exact = run("pixart", model, torch.float64)
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = run("pixart", model, torch.float32)
        accelerate(model)
        fused = run("pixart", model, torch.float32)
    assert snr_db(fused, exact) >= snr_db(plain, exact) - 1.0


def test_fp8_pixart_mlp_hidden_activation_in_autocast_dtype():
    """With the residual stream in fp32 under bf16 autocast, the MLP's wide hidden activation stays
    bf16 (as diffusers' feed-forward; it followed the stream into fp32: twice the bytes)."""
    model = tiny_pixart(torch.float32)
    fk.accelerate(model)
    fk.quantize_fp8(model, filter_fn=lambda module, name: True)
    fk.fuse_epilogues(model)
    block, seen = model.transformer_blocks[0], {}
    assert block.fp8_epilogues
    for name, module in (("hidden", block.ff.net[0].proj), ("block", block)):
        module.register_forward_hook(lambda module, inputs, out, name=name: seen.update({name: out.dtype}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run("pixart", model, torch.float32)
    assert seen == {"hidden": torch.bfloat16, "block": torch.float32}


@pytest.mark.parametrize("kind", list(MODELS))
def test_accelerated_fp32_model_under_bf16_autocast(kind):
    """Under autocast the attention and feed-forward outputs are bf16 and the residual stream fp32:
    the fused blocks convert them as eager PyTorch promotes."""
    model = MODELS[kind](torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run(kind, model, torch.float32).float()
        accelerate(model)
        out = run(kind, model, torch.float32).float()
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_unknown_modules_are_left_alone_and_reported():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_dit()
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor())
    expected = run("dit", model, torch.float64)
    report = accelerate(model)
    assert report.skipped["transformer_blocks.1.attn1"] == "attention processor AttnProcessor"
    assert report.skipped["transformer_blocks.1"] == "its attention was not patched"
    assert isinstance(model.transformer_blocks[0].attn1.processor, FusedAttnProcessor)
    assert "left alone transformer_blocks.1" in str(report)
    torch.testing.assert_close(run("dit", model, torch.float64), expected, rtol=1e-12, atol=1e-12)


def test_accelerate_on_the_reference_dit():
    net = fk.models.DiT(fk.models.DiTConfig(input_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2))
    net.set_fused(False)
    report = accelerate(net)
    assert net.fused and all(block.fused for block in net.blocks) and len(report.patched["DiT blocks"]) == 2


def test_from_diffusers_dit_with_a_ddpm_scheduler():
    """The Denoiser feeds diffusers' step k at our t = (k + 1) / 1000 and converts eps to x0 with
    alphas_cumprod[k]; class labels go in as cond, the null class is num_embeds_ada_norm."""
    transformer = tiny_dit()
    scheduler = diffusers.DDIMScheduler()
    model = from_diffusers(transformer, scheduler)
    assert (model.schedule.name, model.prediction, model.null_cond, model.shape) == ("vp", "eps", 10, (4, 8, 8))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    k = 599
    labels = torch.tensor([3, 10])
    with torch.no_grad():
        eps = transformer(x, timestep=torch.tensor([k, k]), class_labels=labels).sample[:, :4]
        x0 = model.x0(x, (k + 1) / 1000, labels)
    abar = scheduler.alphas_cumprod[k].double()
    # diffusers accumulates alphas_cumprod in fp32, we in fp64
    torch.testing.assert_close(x0, (x - (1 - abar).sqrt() * eps) / abar.sqrt(), rtol=1e-5, atol=1e-5)
    samples = fk.sample(model, 4, batch_size=2, cond=torch.tensor([1, 2]), guidance_scale=3.0, seed=0)
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_flow_schedulers_step_as_diffusers_pipelines(name):
    """A flow-matching scheduler's loop as diffusers' pipelines write it (SANA, Wan): the network
    fed scheduler.timesteps, guided on its velocity. DPM-Solver's and UniPC's flow sigmas list the
    timesteps as integers: fed 1000 sigma instead, the samples were 0.9-1.5% off."""
    options = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    make = lambda: getattr(diffusers, name)(**({} if name.startswith("FlowMatch") else options))
    transformer = tiny_dit()
    model = from_diffusers(transformer, "rf")
    labels, guidance = torch.tensor([1, 5, 7]), 3.0
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = fk.sample(model, 5, noise=z, cond=labels, guidance_scale=guidance, scheduler=make())
    scheduler, x = make(), z
    scheduler.set_timesteps(5)
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            out = transformer(torch.cat([x, x]), timestep=timestep.expand(6),
                              class_labels=torch.cat([labels, torch.full((3,), 10)])).sample[:, :4]
            cond, uncond = out.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), timestep, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_from_diffusers_with_a_schedule_name():
    model = from_diffusers(tiny_pixart(), "rf")
    assert (model.schedule.name, model.prediction, model.time_scale) == ("rf", "flow", 1000.0)
    context = torch.randn(1, 5, 24, dtype=torch.float64)
    assert fk.sample(model, 2, cond=context, seed=0).shape == (1, 4, 8, 8)


def test_quantized_diffusers_dit_is_within_the_snr_floor():
    model = tiny_dit(torch.float64)
    reference = run("dit", model, torch.float64)
    model = model.bfloat16()
    bf16 = run("dit", model, torch.bfloat16)
    accelerate(model)
    fk.quantize_fp8(model)
    assert isinstance(model.transformer_blocks[0].ff.net[0].proj, fk.Fp8Linear)
    assert not isinstance(model.transformer_blocks[0].norm1.linear, fk.Fp8Linear)   # adaLN kept
    assert not isinstance(model.proj_out_1, fk.Fp8Linear)   # the final adaLN modulation too
    fp8 = run("dit", model, torch.bfloat16)
    fk.fuse_epilogues(model)
    assert all(block.fp8_epilogues for block in model.transformer_blocks)
    with pytest.MonkeyPatch.context() as patch:
        calls = count_fp8_quantizations(patch)
        fused = run("dit", model, torch.bfloat16)
    # per block: the norms write q/k/v's and fc1's e4m3 input; the attention output and fc2's input
    # are quantized (q, k and v read one quantization, not three); and the output layer's
    blocks = len(model.transformer_blocks)
    assert calls == {"norm_fp8": 2 * blocks, "quantize": 2 * blocks + 1}, calls
    assert snr_db(bf16, reference) > 30
    assert snr_db(fp8, reference) >= 20 and snr_db(fused, reference) >= 20, (snr_db(fp8, reference),
                                                                             snr_db(fused, reference))


def test_fused_epilogues_with_cross_attention_kwargs():
    """Blocks given cross_attention_kwargs run diffusers' own forward, which applies the GELU and
    adds the gated residuals itself: the FP8 layers' epilogues stand aside there (GELU was applied
    twice)."""
    model = tiny_dit(torch.float32)
    accelerate(model)
    fk.quantize_fp8(model)
    fk.fuse_epilogues(model)
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0]), torch.tensor([1, 3])
    with torch.no_grad():
        fused = model(x, timestep=t, class_labels=y).sample
        own = model(x, timestep=t, class_labels=y, cross_attention_kwargs={"scale": 1.0}).sample
    torch.testing.assert_close(own, fused, rtol=1e-5, atol=1e-5)
    assert model.transformer_blocks[0].ff.net[0].proj.activation == "gelu_tanh"   # restored


def test_quantized_accelerated_pixart_samples_under_autocast():
    """The caption projection, an FP8 layer, writes autocast's dtype as nn.Linear does: the
    cross-attention's keys and values then match its bf16 queries."""
    model = tiny_pixart(torch.float32)
    fk.quantize_fp8(model)
    accelerate(model)
    x = fk.sample(fk.from_diffusers(model, "rf"), 2, batch_size=2, cond=torch.randn(2, 5, 24), seed=0,
                  autocast=torch.bfloat16)
    assert x.shape == (2, 4, 8, 8) and x.isfinite().all()


def test_pixart_with_size_conditions_gets_the_pipelines():
    """PixArt-alpha at 1024 px (use_additional_conditions) is conditioned on the image's size and
    aspect ratio: from_diffusers gives them as diffusers' pipeline does (latents x 8)."""
    model = randomized(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, cross_attention_dim=48, caption_channels=24, norm_num_groups=32,
        use_additional_conditions=True), torch.float32, std=0.05)
    gen = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 12, generator=gen), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24)
    conditions = {"resolution": torch.tensor([[64.0, 96.0]]).repeat(2, 1),
                  "aspect_ratio": torch.tensor([[8 / 12]]).repeat(2, 1)}
    with torch.no_grad():
        expected = model(x, timestep=t, encoder_hidden_states=context, added_cond_kwargs=conditions).sample[:, :4]
        assert torch.equal(fk.from_diffusers(model, "vp").net(x, t, context), expected)


@pytest.mark.parametrize("accelerated", [False, True], ids=["diffusers", "accelerated"])
def test_pixart_prompt_mask(accelerated):
    """cond = (embeddings, mask): the mask is PixArt's encoder_attention_mask, as diffusers'
    pipeline passes it, so padded tokens are not attended: the samples do not depend on the
    embeddings there (they did: the mask was not passed), with guidance too; guidance with a tuple
    cond needs neg_cond, and a badly shaped part is refused naming it."""
    model = tiny_pixart()
    if accelerated:
        accelerate(model)
    denoiser = fk.from_diffusers(model, "rf")
    gen = torch.Generator().manual_seed(2)
    embeddings, negative = (torch.randn(2, 6, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    x, t = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([10.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        expected = model(x, timestep=t, encoder_hidden_states=embeddings, encoder_attention_mask=mask,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
        torch.testing.assert_close(denoiser.net(x, t, (embeddings, mask)), expected, rtol=1e-10, atol=1e-12)
    padding_changed = torch.where(mask[..., None].bool(), embeddings, 5.0)
    for options in ({}, {"guidance_scale": 3.0, "neg_cond": (negative, torch.ones_like(mask))}):
        samples = [fk.sample(denoiser, 2, batch_size=2, cond=(e, mask), seed=0, **options)
                   for e in (embeddings, padding_changed)]
        torch.testing.assert_close(samples[0], samples[1], rtol=1e-10, atol=1e-12)
    unmasked = [fk.sample(denoiser, 2, batch_size=2, cond=e, seed=0) for e in (embeddings, padding_changed)]
    assert not torch.allclose(unmasked[0], unmasked[1])  # without the mask the padding counts
    with pytest.raises(ValueError, match="tuple cond needs neg_cond"):
        fk.sample(denoiser, 1, batch_size=2, cond=(embeddings, mask), guidance_scale=2.0)
    with pytest.raises(ValueError, match="neg_cond must be shaped like cond"):
        fk.sample(denoiser, 1, batch_size=2, cond=(embeddings, mask), guidance_scale=2.0,
                  neg_cond=(negative, mask[:, :5]))
    with pytest.raises(ValueError, match="cond must be a tensor with batch 2 or a tuple of them"):
        fk.sample(denoiser, 1, batch_size=2, cond=(embeddings, mask[:1]))


def test_half_precision_pixart_takes_fp32_embeddings_and_guidance_takes_tuple_conds():
    """A bf16 PixArt samples from fp32 text embeddings (cast as x is; a dtype error before), and
    Denoiser.guided_x0 takes (embeddings, mask) conds as sample() does."""
    denoiser = fk.from_diffusers(tiny_pixart(torch.bfloat16), "rf")
    embeddings, mask = torch.randn(2, 6, 24), torch.ones(2, 6, dtype=torch.long)
    x = fk.sample(denoiser, 1, batch_size=2, cond=(embeddings, mask), seed=0)
    assert x.isfinite().all()
    denoiser = fk.from_diffusers(tiny_pixart(), "rf")
    x_t, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    negative = (torch.zeros(2, 6, 24), mask)
    with torch.no_grad():
        guided = denoiser.guided_x0(x_t, t, (embeddings, mask), 3.0, negative)
        uncond, cond = denoiser.x0(x_t, t, negative), denoiser.x0(x_t, t, (embeddings, mask))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="tuple cond needs neg_cond"):
        denoiser.guided_x0(x_t, t, (embeddings, mask), 3.0)


class _RecordingNet(torch.nn.Module):
    """A transformer stand-in: output p x + 1 (a fixed linear map), the timesteps it saw recorded."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.seen = []

    def forward(self, x, timestep, class_labels=None, return_dict=False):
        self.seen.append(timestep[0].item())
        return (self.p * x + 1.0,)


def test_scheduler_conventions():
    """from_diffusers(net, 'vp') calls the network at diffusers' timesteps (one step late before);
    DPM-Solver and UniPC on flow sigmas (SANA, Wan) walk rf, x0 = x - sigma u as they convert it
    (read as VP before); EDM v-prediction, continuous timesteps and a transformer needing pooled
    projections (SD3) are refused, not misread."""
    net = _RecordingNet()
    fk.sample(fk.from_diffusers(net, "vp", shape=(1, 2, 2)), 4, batch_size=1, scheduler=diffusers.DDIMScheduler(),
              cond=torch.tensor([0]), seed=0)
    ddim = diffusers.DDIMScheduler()
    ddim.set_timesteps(4)
    assert net.seen == ddim.timesteps.tolist()
    for scheduler_class in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
        scheduler = scheduler_class(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
        scheduler.set_timesteps(10)
        model = fk.from_diffusers(_RecordingNet(), scheduler, shape=(1, 2, 2))
        assert model.schedule.name == "rf" and model.prediction == "flow"
        sigma = scheduler.sigmas[3].item()
        x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
        with torch.no_grad():
            u = model.net(x, torch.tensor([sigma * 1000], dtype=torch.float64))
            torch.testing.assert_close(model.x0(x, sigma, torch.zeros(1)), x - sigma * u)
    with pytest.raises(ValueError, match="v_prediction"):
        fk.from_diffusers(_RecordingNet(), diffusers.EDMEulerScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="continuous"):
        fk.from_diffusers(_RecordingNet(), diffusers.EulerDiscreteScheduler(
            timestep_type="continuous", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="pooled"):
        fk.from_diffusers(tiny_sd3(), "rf")
    for option in ({"timesteps": [0.9, 0.0]}, {"solver": "heun"}, {"cuda_graph": True}, {"stochastic": False}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} does not apply with a scheduler"):
            fk.sample(fk.from_diffusers(net, "vp", shape=(1, 2, 2)), 2, scheduler=diffusers.DDIMScheduler(),
                      cond=torch.tensor([0]), **option)


# --- diffusers schedulers driving the loop, on Gaussian data --------------------------------------

def vp_gaussian_model(scheduler, ode_map=False):
    schedule = VP(betas=tuple(scheduler.betas.double().tolist()))
    return fk.Denoiser(GaussianDenoiser(schedule, "eps", ode_map=ode_map), schedule, "eps")


def start_noise():
    return torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"])
def test_euler_schedulers_equal_our_euler_on_their_times(name):
    scheduler = getattr(diffusers, name)()
    if name.startswith("EDM"):
        model = from_diffusers(torch.nn.Identity(), scheduler)   # the schedule and preconditioning
        model.net = PreconditionedGaussian(model)
    else:
        model = from_diffusers(torch.nn.Identity(), scheduler)
        model.net = GaussianDenoiser("rf", "flow", time_scale=1000.0)
    z = start_noise()
    theirs = fk.sample(model, 16, noise=z, scheduler=scheduler)
    scheduler.set_timesteps(16)
    ours = fk.sample(model, noise=z, solver="euler", timesteps=scheduler.sigmas.double().tolist())
    # EDM's scheduler starts from sqrt(80^2 + 1) z, we from 80 z
    torch.testing.assert_close(theirs, ours, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name,steps,tol", [("DDIMScheduler", 200, 0.02), ("DPMSolverMultistepScheduler", 50, 0.005)])
def test_ddpm_family_teachers_reach_the_ode_solution(name, steps, tol):
    scheduler = getattr(diffusers, name)(**({"clip_sample": False} if name == "DDIMScheduler" else {}))
    model = vp_gaussian_model(scheduler)
    z = start_noise()
    x = fk.sample(model, steps, noise=z, scheduler=scheduler)
    # x_T = z at the scheduler's first step, where m(T) is 1 to within 1e-4; the map is linear
    ratio = x / z
    assert ratio.std() < 1e-6 and ratio.mean().item() == pytest.approx(DATA_STD, rel=tol)


def test_a_scheduler_with_another_beta_table_is_refused():
    model = vp_gaussian_model(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="beta table differs"):
        fk.sample(model, 4, noise=start_noise(), scheduler=diffusers.LCMScheduler())


class PreconditionedGaussian(torch.nn.Module):
    """The raw EDM network F whose preconditioned output is the ideal Gaussian denoiser."""

    def __init__(self, model):
        super().__init__()
        self.schedule = model.schedule
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))

    def forward(self, x_in, c_noise, cond=None):
        t = (4 * c_noise).exp().reshape(-1, *[1] * (x_in.dim() - 1))
        c_in, _, c_skip, c_out = self.schedule.precondition(t)
        x = x_in / c_in
        x0 = DATA_STD ** 2 / marginal_std(self.schedule, t) ** 2 * x
        return (x0 - c_skip * x) / c_out


def test_lcm_scheduler_with_the_exact_ode_map_keeps_the_data_variance():
    """Fresh-noise re-noising keeps an exact ODE map on the marginals: samples have the data's std."""
    scheduler = diffusers.LCMScheduler()
    model = vp_gaussian_model(scheduler, ode_map=True)
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = fk.sample(model, 4, noise=z, scheduler=scheduler, seed=1)
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.03)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_scheduler_with_the_exact_ode_map_keeps_the_data_variance(steps):
    """2 steps: pi/2, 1.3, 0 (diffusers' default intermediate time, which it refuses at other
    step counts: those take its even grid)."""
    scheduler = diffusers.SCMScheduler()
    model = fk.Denoiser(GaussianDenoiser("trig", "trig_F", ode_map=True), "trig", "trig_F", distilled=True)
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, trajectory = fk.sample(model, steps, noise=z, scheduler=scheduler, seed=1, return_trajectory=True)
    assert len(trajectory) == steps + 1
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.03)


def test_scheduler_on_another_schedule_is_refused():
    model = fk.Denoiser(GaussianDenoiser("edm", "x0"), "edm", "x0", shape=(2,))
    with pytest.raises(ValueError, match="walks the rf schedule"):
        fk.sample(model, 4, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def test_rms_qk_norm_under_autocast():
    """diffusers' RMSNorm with an fp32 weight returns fp32 q and k beside autocast's bf16 v: the
    patched processor gives attention one dtype, as SDPA does (it raised)."""
    import copy

    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="rms_norm", eps=1e-6)
    fused = copy.deepcopy(attn)
    accelerate(fused)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = attn(x), fused(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
