"""modulated_layer_norm_fp8: the modulated LayerNorm's rows as e4m3 codes and scales. Each backend
against the reference (the fp32 norm, then quantize_fp8_rows), the reference against the fp64
oracle (the scheme's accuracy), fp8_linear on its output, the DiT's FP8 path, opcheck, bad input."""

import pytest
import torch
from conftest import count_fp8_quantizations
from test_modulated_norm import make_inputs, oracle
from tolerances import assert_same_codes, snr_db

import fastgen_kernels as fk
from fastgen_kernels.ops import modulated_norm_fp8 as mnq

BACKENDS = ["reference", "triton"]
SHAPES = [(2, 5, 72), (1, 1, 1000), (2, 3, 1152), (1, 7, 37)]  # odd D, B = 1, L = 1


def layer_norm_inputs(shape, dtype, per_token, affine, generator):
    x, shift, scale, weight, bias, _ = make_inputs(shape, dtype, "layer_affine" if affine else "layer", per_token,
                                                   generator)
    return x, shift, scale, weight, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_batch", "per_token"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_against_reference_and_oracle(backend, dtype, shape, per_token, affine, generator):
    inputs = layer_norm_inputs(shape, dtype, per_token, affine, generator)
    with fk.use_backend(backend):
        codes, scales = fk.modulated_layer_norm_fp8(*inputs)
    ref_codes, ref_scales = mnq.reference_modulated_norm_fp8(*inputs, 1e-6, False)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == inputs[0].shape
    assert scales.dtype == torch.float32 and scales.shape == (shape[0] * shape[1],)
    # the kernel's fp32 norm may differ from the reference's in the last bit (operation order),
    # which moves the row maximum's scale by an ulp and a code across a rounding boundary rarely
    torch.testing.assert_close(scales, ref_scales, rtol=2e-6, atol=0)
    if backend == "reference" or torch.equal(scales, ref_scales):
        assert_same_codes(codes, ref_codes, backend)
    # the scheme, on the codes GPUs produce (the interpreter's casts err, see assert_same_codes):
    # scale = max |y| / 448 per row, every row uses the full e4m3 range, and the dequantized
    # codes are within the e4m3 rounding (SNR >= 25 dB) of the fp64 norm
    y64 = oracle(*(t.double() if t is not None else None for t in inputs), False).reshape(-1, shape[-1])
    torch.testing.assert_close(scales.double(), y64.abs().amax(1) / 448.0, rtol=1e-5, atol=0)
    ref_codes = ref_codes.double().reshape(-1, shape[-1])
    assert ref_codes.abs().amax(1).eq(448.0).all()
    assert snr_db(ref_codes * ref_scales.double()[:, None], y64) >= 25.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_a_zero_row(backend, generator):
    x = torch.randn(6, 40, 2, generator=generator)[..., 0].reshape(2, 3, 40)  # a strided view
    shift, scale = torch.randn(40, 2, generator=generator).T, torch.randn(2, 40, generator=generator)
    x[1, 2] = 5.0  # a constant row: its norm is 0, so y = shift there
    shift[1] = 0.0  # ... and 0: an all-zero row of y gets zero codes and a finite scale
    with fk.use_backend(backend):
        codes, scales = fk.modulated_layer_norm_fp8(x, shift, scale)
    ref_codes, ref_scales = mnq.reference_modulated_norm_fp8(x.contiguous(), shift.contiguous(), scale, None, None,
                                                             1e-6, False)
    torch.testing.assert_close(scales, ref_scales, rtol=2e-6, atol=0)
    assert codes[1, 2].float().eq(0).all() and torch.isfinite(scales).all()
    assert_same_codes(codes.reshape(-1, 40)[scales == ref_scales], ref_codes.reshape(-1, 40)[scales == ref_scales],
                      backend)


def test_fp8_linear_on_its_output_equals_the_unfused_path_within_rounding(generator):
    """fp8_linear(codes, x_scale=scales) against fp8_linear on the norm's output (quantized inside
    fp8_linear): the same up to the unfused path's rounding of y to x's dtype."""
    x, shift, scale, _, _ = layer_norm_inputs((2, 9, 64), torch.bfloat16, False, False, generator)
    weight, weight_scale = fk.ops.quantize_weight(torch.randn(48, 64, generator=generator) / 8)
    with torch.no_grad():
        codes, scales = fk.modulated_layer_norm_fp8(x, shift, scale)
        fused = fk.fp8_linear(codes, weight, weight_scale, x_scale=scales, out_dtype=torch.bfloat16)
        unfused = fk.fp8_linear(fk.modulated_layer_norm(x, shift, scale), weight, weight_scale)
    assert fused.shape == unfused.shape == (2, 9, 48) and fused.dtype == torch.bfloat16
    assert snr_db(fused, unfused) >= 25.0


def test_the_fp8_dit_takes_the_fused_path(generator, monkeypatch):
    """quantize_fp8 on the fused DiT: each block's qkv and fc1 and the final layer read the norm's
    codes (quantize_fp8_rows runs only for the attention output and fc2's input)."""
    from fastgen_kernels.models import DiT, DiTConfig

    config = DiTConfig(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    model = fk.quantize_fp8(DiT(config).bfloat16())
    calls = count_fp8_quantizations(monkeypatch)
    x = torch.randn(2, 2, 4, 4, generator=generator).bfloat16()
    with torch.no_grad():
        model(x, torch.rand(2, generator=generator), torch.tensor([0, 1]))
    assert calls == {"norm_fp8": 2 * config.depth + 1, "quantize": 2 * config.depth}


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gives_nan_codes_and_scale(backend, generator):
    """A NaN in x makes its row's y, codes and scale NaN, as the reference (the GPU's max and min
    drop NaN: finite codes came out; the interpreter casts NaN to a finite code, test_gpu.py checks
    the hardware's)."""
    x, shift, scale = torch.randn(2, 3, 40, generator=generator), torch.randn(2, 40), torch.randn(2, 40)
    x[0, 1, 7] = float("nan")
    with fk.use_backend(backend):
        codes, scales = fk.modulated_layer_norm_fp8(x, shift, scale)
    assert scales[1].isnan()  # scales: one per row of (B * L, D)
    assert backend == "triton" or codes[0, 1].float().isnan().all()
    scales[1] = 0
    assert torch.isfinite(scales).all()


def test_opcheck(generator):
    inputs = layer_norm_inputs((2, 3, 16), torch.float32, True, True, generator)
    torch.library.opcheck(torch.ops.fastgen.modulated_norm_fp8, (*inputs, 1e-6, False))


def test_bad_input(generator):
    x, shift, scale, _, _ = layer_norm_inputs((2, 3, 16), torch.float32, False, False, generator)
    with pytest.raises(ValueError, match="shift must have shape"):
        fk.modulated_layer_norm_fp8(x, shift[:, :8], scale)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        fk.modulated_layer_norm_fp8(x.int(), shift, scale)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fk.modulated_layer_norm_fp8(x, shift, scale, eps=0.0)
    with pytest.raises(RuntimeError, match="no forward-mode derivative"):
        torch.func.jvp(lambda v: fk.modulated_layer_norm_fp8(v, shift, scale), (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match="inference only"):
        fk.modulated_layer_norm_fp8(x.requires_grad_(), shift, scale)
