"""The reference DiT: fused ops against its plain-PyTorch composition, JVPs, presets, saving,
and FP8 inference with fused epilogues."""

import pytest
import torch

import fastgen_kernels as fk
from fastgen_kernels.models import DiT, DiTConfig
from fastgen_kernels.models.dit import DiTBlock
from tolerances import snr_db

TINY = DiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5)


def random_dit(config=TINY, dtype=torch.float64, seed=0, **overrides):
    """A DiT with every weight random (the zero-initialized ones too, so every path matters)."""
    torch.manual_seed(seed)
    model = DiT(config, **overrides).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


def inputs(model, batch=3, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype) * 5
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen) if cfg.num_classes else None
    return x, t, y


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"num_classes": 0}, {"second_time": True},
                                       {"patch_size": 1, "input_size": 5}], ids=str)
def test_fused_equals_plain_pytorch(overrides):
    model = random_dit(**overrides)
    x, t, y = inputs(model)
    r = t / 3 if model.config.second_time else None
    fused = model(x, t, y, r)
    plain = model.set_fused(False)(x, t, y, r)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    assert fused.shape == x.shape


def test_gradients_equal_the_plain_composition():
    model = random_dit(qk_norm=True)
    x, t, y = inputs(model)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        model.set_fused(fused)(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_residual_stream_is_contiguous():
    """The patch convolution's output read as tokens was a transposed view: the first block's
    ops each copied it (forward, tangent and backward)."""
    model = random_dit()
    seen = []
    for block in [*model.blocks, model.final_layer]:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert seen == [True] * (len(model.blocks) + 1)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t, y), out, rtol=1e-12, atol=1e-12)


def test_fp32_network_under_bf16_autocast():
    """Autocast makes the modulation and the linear outputs bf16 while the residual stream stays
    fp32: the fused network converts them as eager PyTorch promotes, forward and backward, and
    samples through fk.sample's autocast."""
    model = random_dit(dtype=torch.float32)
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs(model, dtype=torch.float32))
    outs = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.set_fused(fused)(x, t, y)
        out.float().square().sum().backward()
        outs.append((out.float(), [p.grad.clone() for p in model.parameters()]))
    (fused, grads), (plain, plain_grads) = outs
    torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05 * plain.abs().max().item())
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.05 * b.abs().max().item())
    denoiser = fk.Denoiser(model.set_fused(True), "rf", "flow", null_cond=TINY.num_classes, distilled=True,
                           shape=(3, 6, 6))
    samples = fk.sample(denoiser, 2, batch_size=2, cond=torch.tensor([0, 1]), seed=0, autocast=torch.bfloat16,
                        progress=False)
    assert samples.shape == (2, 3, 6, 6) and samples.isfinite().all()


def test_jvp_through_the_fused_network_is_exact():
    """What sCM and MeanFlow need: torch.func.jvp through attention, norms and gates."""
    model = random_dit(second_time=True, logvar_head=True)
    x, t, y = inputs(model)
    r = t / 2
    gen = torch.Generator().manual_seed(5)
    tx, tt = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(t.shape, generator=gen, dtype=t.dtype)

    def f(x, t):
        return model(x, t, y, r)

    _, tangent = torch.func.jvp(f, (x, t), (tx, tt))
    h = 1e-6
    finite_difference = (f(x + h * tx, t + h * tt) - f(x - h * tx, t - h * tt)) / (2 * h)
    torch.testing.assert_close(tangent, finite_difference, rtol=1e-6, atol=1e-7)


def test_logvar_head():
    model = random_dit(logvar_head=True)
    x, t, y = inputs(model)
    out, logvar = model(x, t, y, return_logvar=True)
    assert out.shape == x.shape and logvar.shape == (3,)
    assert not torch.allclose(logvar, logvar[:1].expand(3))   # depends on t


def test_initialization_is_adaln_zero():
    model = DiT(TINY)
    x = torch.randn(2, 3, 6, 6)
    assert model(x, torch.rand(2), torch.tensor([0, 5])).abs().max() == 0   # zero output layer
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().max() == 0


def test_presets():
    with torch.device("meta"):
        xl = DiT.from_preset("XL/2", input_size=32)
    assert (len(xl.blocks), xl.config.hidden_size, xl.config.num_heads, xl.config.patch_size) == (28, 1152, 16, 2)
    params = sum(p.numel() for p in xl.parameters())
    assert 670e6 < params < 680e6, params   # DiT-XL/2: 675M
    assert DiTConfig.preset("S/4").patch_size == 4 and DiTConfig.preset("B").depth == 12
    with pytest.raises(ValueError, match="unknown size"):
        DiTConfig.preset("XXL/2")


def test_fused_blocks_cast_the_modulation_once():
    """Under bf16 autocast on the fp32 residual stream the fused network casts each block's
    (B, 6D) modulation to fp32 as one tensor: no (B, D) part of it is widened in the forward, nor
    its gradient narrowed in the backward (each was a kernel launch of its own: 4 a block each
    way), and the gates stay as they are. Unconditional, so that the only other (B, D) casts are
    the conditioning's: the time embedding's bf16 output widened once to the stream's dtype (and
    its gradient narrowed back), then narrowed for each block's adaLN layer (and its gradient
    widened); and the gated residuals' gate gradients, summed in fp32 and narrowed to the gates'
    bf16 (two a block)."""
    model = random_dit(dtype=torch.float32, num_classes=0)
    x, t, _ = inputs(model, dtype=torch.float32)
    B, D = x.shape[0], model.config.hidden_size

    def widened_and_narrowed(prof):
        dtypes = [e.input_dtypes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                  and tuple(e.input_shapes[0]) == (B, D)]
        return dtypes.count("c10::BFloat16"), dtypes.count("float")

    with torch.profiler.profile(record_shapes=True) as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    with torch.profiler.profile(record_shapes=True) as backward:
        out.float().square().sum().backward()
    layers = model.config.depth + 1  # the blocks' adaLN layers and the final layer's
    assert widened_and_narrowed(forward) == (1, layers)
    assert widened_and_narrowed(backward) == (layers, 1 + 2 * model.config.depth)


def test_fused_blocks_gate_in_the_residuals_operand_dtype(monkeypatch):
    """Under bf16 autocast on an fp32 residual stream each gated residual gets its gate in its
    branch's dtype (bf16 beside bf16 y: a pair the kernels read as they are); an fp32 gate beside
    bf16 y made the extension widen y to fp32 first, a copy of the block's activations a call."""
    import fastgen_kernels as fk

    seen = []
    gated_residual = fk.gated_residual

    def recording(x, y, gate):
        seen.append((x.dtype, y.dtype, gate.dtype))
        return gated_residual(x, y, gate)

    monkeypatch.setattr(fk, "gated_residual", recording)
    model = random_dit(dtype=torch.float32)
    x, t, y = inputs(model, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y).float().sum().backward()
    assert seen == [(torch.float32, torch.bfloat16, torch.bfloat16)] * 2 * model.config.depth


def test_fused_network_activates_the_conditioning_once():
    """SiLU(c), every adaLN layer's input, is computed once in the fused network (it was a SiLU a
    block, and a SiLU backward, and under forward-mode AD its tangent's ops), with the values and
    gradients of the unfused network's one a block."""
    model = random_dit(dtype=torch.float64)
    x, t, y = inputs(model)
    results = []
    for fused in (True, False):
        model.set_fused(fused)
        with torch.profiler.profile() as prof:
            out = model(x, t, y)
            grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        names = [e.name for e in prof.events()]
        results.append((out, grads, names.count("aten::silu"), names.count("aten::silu_backward")))
    (out, grads, silu, silu_backward), (ref, ref_grads, *ref_counts) = results
    # and one in the time embedding's MLP
    assert (silu, silu_backward) == (2, 2) and ref_counts == [model.config.depth + 2] * 2
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_an_empty_batch_runs_forward_and_backward(fused):
    """B = 0 through the whole network (the fused blocks' modulation split inferred a size from 0
    elements and raised)."""
    model = random_dit(dtype=torch.float32).set_fused(fused)
    x, t, y = inputs(model, dtype=torch.float32)
    out = model(x[:0], t[:0], y[:0])
    out.sum().backward()
    assert out.shape == (0, *x.shape[1:])


def test_shapes_propagate_on_the_meta_device():
    """A DiT built under torch.device("meta") (shapes without memory, as before FSDP's to_empty)
    runs forward and backward there: the fused layers asked autocast about the meta device, which
    has none (RuntimeError)."""
    with torch.device("meta"):
        model = DiT(TINY)
        x, t, y = torch.randn(2, 3, 6, 6), torch.rand(2), torch.tensor([0, 5])
    out = model(x, t, y)
    out.square().mean().backward()
    assert out.shape == x.shape and out.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_bad_inputs():
    model = random_dit(dtype=torch.float32)
    x, t, y = inputs(model, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 6, 6\)"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="return_logvar needs"):
        model(x, t, y, return_logvar=True)
    with pytest.raises(ValueError, match="second time r"):
        random_dit(second_time=True)(x.double(), t.double(), y)
    with pytest.raises(ValueError, match="takes no second time r"):  # a flow map on it ignored r
        model(x, t, y, t / 2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(TINY, input_size=7)
    with pytest.raises(ValueError, match="and of 4"):  # it failed at the first forward
        DiT(TINY, hidden_size=18, num_heads=3)


def test_save_and_load_a_student_that_samples_without_arguments(tmp_path):
    model = fk.Denoiser(random_dit(dtype=torch.float32), "rf", "flow", time_scale=1000.0, distilled=True,
                        null_cond=TINY.num_classes, shape=(3, 6, 6))
    cond = torch.tensor([1, 4])
    expected = fk.sample(model, 2, batch_size=2, cond=cond, seed=3, guidance_scale=2.0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "fastgen.json").exists()
    loaded = fk.Denoiser.from_pretrained(tmp_path)
    assert isinstance(loaded.net, DiT) and loaded.net.config == TINY
    assert (loaded.schedule.name, loaded.prediction, loaded.time_scale, loaded.shape) == ("rf", "flow", 1000.0, (3, 6, 6))
    torch.testing.assert_close(fk.sample(loaded, 2, batch_size=2, cond=cond, seed=3, guidance_scale=2.0), expected)
    net = random_dit(dtype=torch.float32, seed=9)
    net.save(tmp_path / "dit.safetensors")
    torch.testing.assert_close(DiT(TINY).load(tmp_path / "dit.safetensors").state_dict(), net.state_dict())


def test_fp8_dit_with_every_linear_quantized_and_a_logvar_head():
    """The time embedding's and the log-variance head's inputs are made in the FP8 layers' bias
    dtype, not their e4m3 weights' (which an input cannot be quantized from)."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                       num_classes=5, logvar_head=True)
    model = random_dit(config, dtype=torch.float32)
    x, t, y = inputs(model, batch=3, dtype=torch.float32)
    with torch.no_grad():
        expected, expected_logvar = model(x, t, y, return_logvar=True)
        fk.quantize_fp8(model, filter_fn=lambda module, name: True)
        assert isinstance(model.t_embedder.mlp[0], fk.Fp8Linear) and isinstance(model.logvar_linear, fk.Fp8Linear)
        out, logvar = model(x, t, y, return_logvar=True)
    assert snr_db(out, expected) >= 20
    assert snr_db(logvar, expected_logvar) >= 15   # one number a sample, from e4m3 frequencies


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_a_quantized_denoiser_saves_and_loads(per_channel, tmp_path):
    """save_pretrained of a quantized model -> from_pretrained rebuilds the network and makes the
    layers the save holds in e4m3 FP8 again (per channel or per tensor as saved): the same samples."""
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    model = fk.Denoiser(DiT(config), "rf", "flow", null_cond=3, shape=(4, 8, 8), distilled=True)
    fk.quantize_fp8(model.net, per_channel=per_channel)
    model.save_pretrained(tmp_path)
    loaded = fk.Denoiser.from_pretrained(tmp_path)
    assert isinstance(loaded.net.blocks[0].mlp.fc1, fk.Fp8Linear)
    assert not isinstance(loaded.net.blocks[0].adaLN_modulation[-1], fk.Fp8Linear)
    assert torch.equal(fk.sample(loaded, 1, batch_size=2, seed=0), fk.sample(model, 1, batch_size=2, seed=0))


def test_fp8_dit_with_fused_epilogues_is_within_the_snr_floor():
    """quantize_fp8 + fuse_epilogues on the reference DiT (CPU: the reference FP8 path) against the
    bf16 network: output SNR >= 20 dB; the fused epilogue equals the unfused FP8 network."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=5)
    model = random_dit(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    x, t, y = inputs(model, batch=4, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = model.double()(x.double(), t.double(), y)
        model = model.bfloat16()
        bf16 = model(x, t, y)
        fk.quantize_fp8(model)
        assert isinstance(model.blocks[0].mlp.fc1, fk.Fp8Linear)
        assert not isinstance(model.blocks[0].adaLN_modulation[-1], fk.Fp8Linear)   # adaLN stays
        fp8 = model(x, t, y)
        fk.fuse_epilogues(model)
        assert all(block.fused_epilogues for block in model.blocks)
        assert model.blocks[0].mlp.fc1.activation == "gelu_tanh"
        fused = model(x, t, y)
    assert snr_db(bf16, reference) > 30
    assert snr_db(fp8, reference) >= 20, snr_db(fp8, reference)
    assert snr_db(fused, reference) >= 20, snr_db(fused, reference)
    # the same weight codes; the unfused path rounds fc1's output to bf16 before GELU (and so may
    # quantize fc2's input to neighbouring codes): close, not equal
    assert snr_db(fused, fp8) >= 30, snr_db(fused, fp8)
    assert not any(isinstance(m, DiTBlock) and m.fuse_fp8_epilogues() for m in model.modules())  # done once
