"""fp8_linear and its quantizer (fastgen_kernels/ops/fp8_linear.py) on the reference backend and
the Triton kernels under the interpreter (small tiles: several tiles each way and ragged edges):

- quantization: per-row scales and codes, Triton bit-identical to the reference, SNR >= 25 dB;
- the GEMM + epilogue: against the fp32 matmul of the dequantized operands with an SNR floor of
  20 dB, and against the reference given the same accumulator (the exact fp32 products of e4m3
  codes: only the summation order differs) to a few fp32 ulps, before the single rounding;
- every epilogue combination, per-tensor and per-channel scales, already-quantized x, the path of
  GPUs without FP8 (operands widened, fp32 here), opcheck, torch.compile, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastgen_kernels as fk
from tolerances import assert_same_codes, snr_db

fp8 = fk.ops.OP_MODULES["fp8_linear"]

BACKENDS = ["reference", "triton"]


def _inputs(generator, batch=2, tokens=19, K=70, N=45, dtype=torch.bfloat16):
    x = torch.randn(batch, tokens, K, generator=generator).to(dtype)
    weight = torch.randn(N, K, generator=generator) / K**0.5
    return x, weight


def _dequantized(x, weight, weight_scale):
    """The fp32 matmul of the dequantized operands: what quantization approximates."""
    codes, scale = fp8.reference_quantize_rows(x.reshape(-1, x.shape[-1]))
    return (codes.float() * scale[:, None]) @ (weight.float() * weight_scale.float().reshape(-1, 1)).T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("K", [100, 24, 7], ids=lambda k: f"K{k}")  # the interpreter's tile is 64 elements:
def test_quantize_rows(backend, dtype, K, generator):  # two passes; two rows a program; eight (37 = 4 * 8 + 5)
    x = torch.randn(37, K, generator=generator).to(dtype) * torch.logspace(-3, 3, 37).to(dtype)[:, None]
    x[5] = 0  # an all-zero row: zero codes, finite scale
    with fk.use_backend(backend):
        codes, scale = torch.ops.fastgen.quantize_fp8_rows(x)
    ref_codes, ref_scale = fp8.reference_quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert_same_codes(codes, ref_codes, backend)
    assert torch.equal(scale, ref_scale)
    amax = x.float().abs().amax(1)
    torch.testing.assert_close(scale[amax > 0], amax[amax > 0] / 448.0)
    assert codes.float().abs().amax(1)[amax > 0].eq(448.0).all()  # the full e4m3 range is used
    assert torch.isfinite(scale).all() and codes[5].float().eq(0).all()
    # the scheme's accuracy, on the codes GPUs produce (see assert_same_codes for the interpreter)
    assert snr_db(ref_codes.float() * scale[:, None], x.float()) >= 25.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [24, 100], ids=lambda k: f"K{k}")  # one pass, two passes (interpreter tiles)
def test_quantize_rows_keeps_nan(backend, K, generator):
    """A row holding a NaN (one or several positions, with an inf elsewhere) gets NaN codes and a
    NaN scale, as the reference: the GPU's max and min drop NaN, which gave finite codes (-448)
    and a finite scale, so a NaN activation came out of an FP8 layer as finite numbers. (The
    interpreter casts NaN to a finite e4m3 code, hardware to NaN: codes checked in test_gpu.py.)"""
    x = torch.randn(6, K, generator=generator)
    x[1, 3] = float("nan")
    x[4, 0], x[4, K - 1], x[4, 5] = float("nan"), float("nan"), float("inf")
    with fk.use_backend(backend):
        codes, scale = torch.ops.fastgen.quantize_fp8_rows(x)
    assert scale[[1, 4]].isnan().all()
    assert backend == "triton" or codes[[1, 4]].float().isnan().all()
    clean = [0, 2, 3, 5]
    assert torch.isfinite(scale[clean]).all() and not codes[clean].float().isnan().any()
    weight, weight_scale = fp8.quantize_weight(torch.randn(8, K, generator=generator))
    with fk.use_backend(backend), torch.no_grad():
        out = fk.ops.fp8_linear(x, weight, weight_scale, out_dtype=torch.float32)
    assert out[[1, 4]].isnan().all() and torch.isfinite(out[clean]).all()


def test_quantize_rows_non_contiguous(generator):
    x = torch.randn(64, 30, generator=generator).T  # rows 64 apart... as a (30, 64) view
    with fk.use_backend("triton"):
        codes, scale = torch.ops.fastgen.quantize_fp8_rows(x)
    ref_codes, ref_scale = fp8.reference_quantize_rows(x.contiguous())
    assert_same_codes(codes, ref_codes, "triton")
    assert torch.equal(scale, ref_scale)


EPILOGUES = [  # (bias, activation, gate: None | "batch" | "token", residual)
    (False, None, None, False),
    (True, "gelu_tanh", None, False),  # MLP fc1
    (True, None, "batch", True),  # attention out-projection / fc2 of adaLN-Zero
    (True, "gelu", "token", True),
    (False, "silu", "batch", False),
    (False, None, None, True),
]


def _epilogue_args(epilogue, x, N, dtype, generator):
    has_bias, activation, gate, has_residual = epilogue
    B, L = x.shape[:2]
    return dict(
        bias=torch.randn(N, generator=generator) if has_bias else None,
        activation=activation,
        gate=None if gate is None else torch.randn(*((B, N) if gate == "batch" else (B, L, N)),
                                                     generator=generator).to(dtype),
        residual=torch.randn(B, L, N, generator=generator).to(dtype) if has_residual else None)


def _expected(acc, x_scale, weight_scale, kwargs, x):
    """The epilogue in fp64 on an accumulator."""
    y = acc.double() * weight_scale.double().reshape(1, -1)
    if x_scale is not None:
        y = y * x_scale.double()[:, None]
    if kwargs["bias"] is not None:
        y = y + kwargs["bias"].double()
    y = {None: y, "gelu_tanh": F.gelu(y, approximate="tanh"), "gelu": F.gelu(y), "silu": F.silu(y)}[kwargs["activation"]]
    y = y.view(*x.shape[:-1], -1)
    if kwargs["gate"] is not None:
        gate = kwargs["gate"].double()
        y = y * (gate[:, None] if gate.dim() == 2 else gate)
    if kwargs["residual"] is not None:
        y = y + kwargs["residual"].double()
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_against_dequantized_and_same_accumulator(backend, per_channel, epilogue, dtype, generator):
    x, weight = _inputs(generator, dtype=dtype)
    N = weight.shape[0]
    weight_q, weight_scale = fp8.quantize_weight(weight, per_channel=per_channel)
    kwargs = _epilogue_args(epilogue, x, N, dtype, generator)
    with fk.use_backend(backend), torch.no_grad():
        out = fk.ops.fp8_linear(x, weight_q, weight_scale, **kwargs)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == dtype
    # 1. the same accumulator: exact products of the codes; only the fp32 summation order and the
    #    fp32 epilogue differ from fp64, then one rounding to the output dtype
    with fk.use_backend(backend):  # the backend's own codes (see assert_same_codes)
        codes, x_scale = torch.ops.fastgen.quantize_fp8_rows(x.reshape(-1, x.shape[-1]))
    acc = codes.double() @ weight_q.double().T
    exact = _expected(acc, x_scale, weight_scale, kwargs, x)
    torch.testing.assert_close(out.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-5 * exact.abs().max().item())
    # 2. quantization error: against the same layer with fp32 operands before quantization
    full = _expected(x.reshape(-1, x.shape[-1]).double() @ weight.double().T, None, torch.ones(1), kwargs, x)
    assert snr_db(out, full) >= 20.0


def test_linear_already_quantized_x(generator):
    x, weight = _inputs(generator)
    weight_q, weight_scale = fp8.quantize_weight(weight)
    codes, scale = fp8.reference_quantize_rows(x.reshape(-1, x.shape[-1]))
    with torch.no_grad():
        from_codes = fk.ops.fp8_linear(codes.view(*x.shape), weight_q, weight_scale, x_scale=scale)
        from_x = fk.ops.fp8_linear(x, weight_q, weight_scale)
        per_tensor = fk.ops.fp8_linear(codes, weight_q, weight_scale, x_scale=torch.tensor(0.01),
                                       out_dtype=torch.float32)
    assert from_codes.dtype == torch.bfloat16 and torch.equal(from_codes, from_x)
    torch.testing.assert_close(per_tensor, 0.01 * (codes.float() @ weight_q.float().T) * weight_scale)


@pytest.mark.parametrize("epilogue", EPILOGUES[1:3], ids=str)
def test_linear_without_fp8_units_widens_the_weight(epilogue, generator, monkeypatch):
    """Before sm_89 x stays in its dtype and the weight is widened (e4m3 is exact in it): the
    Triton kernel's non-FP8 path (fp32 operands here, IEEE dot) against the reference."""
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: False)
    x, weight = _inputs(generator, dtype=torch.float32)
    weight_q, weight_scale = fp8.quantize_weight(weight)
    kwargs = _epilogue_args(epilogue, x, weight.shape[0], torch.float32, generator)
    results = []
    for backend in BACKENDS:
        with fk.use_backend(backend), torch.no_grad():
            results.append(fk.ops.fp8_linear(x, weight_q, weight_scale, **kwargs))
    exact = _expected(x.reshape(-1, x.shape[-1]).double() @ weight_q.double().T, None, weight_scale, kwargs, x)
    for out in results:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K", [(1, 16, 16), (33, 17, 130), (64, 96, 32)])
def test_linear_shapes(M, N, K, generator):
    """A single token, edges in every direction, K not a multiple of the tile; Triton against the
    reference on the same codes (x given quantized)."""
    codes, scale = fp8.reference_quantize_rows(torch.randn(M, K, generator=generator))
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(N, K, generator=generator))
    outs = []
    for backend in BACKENDS:
        with fk.use_backend(backend), torch.no_grad():
            outs.append(fk.ops.fp8_linear(codes, weight_q, weight_scale, x_scale=scale, out_dtype=torch.float32))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K", [(1, 16, 16), (33, 17, 128), (70, 96, 48), (45, 40, 32)])
@pytest.mark.parametrize("variant", ["tiled", "persistent_tma", "persistent_tma_store"])
def test_linear_kernel_variants(variant, M, N, K, generator):
    """The GEMM variants on the same codes and on fp32 operands (IEEE dot), every epilogue option
    on: the tiled kernel, and the persistent ones whose 3 programs walk all the tiles with TMA
    tile loads (zero-filled past the edges), one of them also reading the residual and writing
    the output in half tiles by TMA (clipped at the edges; N = 40: a last tile whose right half
    lies wholly outside), against the fp64 epilogue of the same product."""
    from fastgen_kernels.triton_ops import fp8_linear as triton_fp8_linear

    if variant == "persistent_tma_store" and N * 4 % 16:
        pytest.skip("the TMA store needs 16-byte aligned rows (test_linear_kernel_variant_errors)")
    x = torch.randn(1, M, K, generator=generator)
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(N, K, generator=generator))
    kwargs = _epilogue_args((True, "gelu_tanh", "token", True), x, N, torch.float32, generator)
    codes, x_scale = fp8.reference_quantize_rows(x[0])
    for operand, scale, weight in [(codes, x_scale, weight_q), (x[0], None, weight_q.float())]:
        out = triton_fp8_linear.linear(operand, scale, weight, weight_scale, kwargs["bias"], "gelu_tanh",
                                       kwargs["gate"].view(M, N), 1, kwargs["residual"].view(M, N),
                                       torch.float32, variant=variant)
        exact = _expected(operand.double() @ weight.double().T, scale, weight_scale, kwargs, x)
        torch.testing.assert_close(out.double().view(1, M, N), exact, rtol=1e-5, atol=1e-5)


def test_linear_kernel_variant_errors(generator):
    from fastgen_kernels.triton_ops import fp8_linear as triton_fp8_linear

    codes, scale = fp8.reference_quantize_rows(torch.randn(4, 24, generator=generator))
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(8, 24, generator=generator))
    args = (codes, scale, weight_q, weight_scale, None, None, None, 1, None, torch.float32)
    with pytest.raises(ValueError, match="16-byte aligned rows"):  # K = 24 one-byte codes
        triton_fp8_linear.linear(*args, variant="persistent_tma")
    codes, scale = fp8.reference_quantize_rows(torch.randn(4, 32, generator=generator))
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(6, 32, generator=generator))
    with pytest.raises(ValueError, match="persistent_tma_store.*aligned output"):  # N = 6 bf16 outputs
        triton_fp8_linear.linear(codes, scale, weight_q, weight_scale, None, None, None, 1, None, torch.bfloat16,
                                 variant="persistent_tma_store")
    # one row of a wider matrix: torch calls it contiguous, but its row stride (33 fp32) is what TMA reads
    codes, scale = fp8.reference_quantize_rows(torch.randn(1, 32, generator=generator))
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(32, 32, generator=generator))
    residual = torch.randn(1, 33, generator=generator)[:, :32]
    assert residual.is_contiguous() and residual.stride(0) == 33
    with pytest.raises(ValueError, match="persistent_tma_store.*aligned output and residual rows"):
        triton_fp8_linear.linear(codes, scale, weight_q, weight_scale, None, None, None, 1, residual, torch.float32,
                                 variant="persistent_tma_store")
    with pytest.raises(ValueError, match="variant must be one of"):
        triton_fp8_linear.linear(*args, variant="split_k")
    # "auto" off the GPU: the tiled kernel
    torch.testing.assert_close(triton_fp8_linear.linear(*args), fp8.reference_linear(*args))


def test_opcheck(generator):
    x = torch.randn(20, 48, generator=generator, dtype=torch.bfloat16)
    codes, scale = fp8.reference_quantize_rows(x)
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(24, 48, generator=generator))
    gate = torch.randn(2, 24, generator=generator, dtype=torch.bfloat16)
    for backend in BACKENDS:
        with fk.use_backend(backend):
            torch.library.opcheck(torch.ops.fastgen.quantize_fp8_rows.default, (x,))
            # test_schema is left out: its aliasing check multiplies the inputs, which PyTorch
            # does not implement for float8_e4m3fn on the CPU (the quantizer's output is checked)
            torch.library.opcheck(torch.ops.fastgen.fp8_linear.default,
                                  (codes, scale, weight_q, weight_scale, None, "silu", gate, 10, None, torch.bfloat16),
                                  test_utils=("test_autograd_registration", "test_faketensor",
                                              "test_aot_dispatch_dynamic"))


def test_compile_fullgraph(generator):
    x = torch.randn(2, 8, 32, generator=generator, dtype=torch.bfloat16)
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(16, 32, generator=generator))
    bias, gate = torch.randn(16, generator=generator), torch.randn(2, 16, generator=generator, dtype=torch.bfloat16)

    def layer(x):
        return fk.ops.fp8_linear(x, weight_q, weight_scale, bias=bias, activation="gelu_tanh", gate=gate, residual=x[..., :16])

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_bad_input(generator):
    x = torch.randn(2, 4, 32, dtype=torch.bfloat16)
    w = torch.randn(16, 32)
    wq, ws = fp8.quantize_weight(w)
    cases = [
        (dict(weight=w), TypeError, "weight must be a torch.float8_e4m3fn"),
        (dict(weight=fp8.quantize_weight(torch.randn(16, 31))[0]), ValueError, "K = x.shape"),
        (dict(x=x.to(torch.int32)), TypeError, "x must be"),
        (dict(weight_scale=ws.double()), TypeError, "weight_scale must be a float32"),
        (dict(weight_scale=torch.ones(3)), ValueError, "weight_scale must hold one value or"),
        (dict(bias=torch.randn(15)), ValueError, "bias must have shape"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(gate=torch.randn(2, 15)), ValueError, "gate must have shape"),
        (dict(residual=torch.randn(2, 4, 15)), ValueError, "residual must have the output's shape"),
        (dict(x=wq[:4]), ValueError, "x_scale (its dequantization scale) is required"),
        (dict(x_scale=torch.ones(8)), ValueError, "x_scale goes with a float8_e4m3fn x"),
        (dict(out_dtype=torch.int8), TypeError, "out_dtype must be"),
    ]
    for override, error, message in cases:
        args = dict(x=x, weight=wq, weight_scale=ws) | override
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")), torch.no_grad():
            fk.ops.fp8_linear(args.pop("x"), args.pop("weight"), args.pop("weight_scale"), **args)
    with pytest.raises(RuntimeError, match="inference only, it has no backward"):
        fk.ops.fp8_linear(x.clone().requires_grad_(), wq, ws)
    # forward-mode AD would take the output as a constant: a zero tangent, silently
    with pytest.raises(RuntimeError, match="inference only, it has no forward-mode derivative"):
        torch.func.jvp(lambda v: fk.ops.fp8_linear(v, wq, ws), (x,), (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative"):
        fk.ops.fp8_linear(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), wq, ws)


def test_epilogue_combinations_compile_away(generator):
    """Every on/off combination of bias, gate and residual under the interpreter (each a separate
    constexpr specialization of the kernel) agrees with the reference."""
    x, weight = _inputs(generator, batch=1, tokens=5, K=32, N=16)
    wq, ws = fp8.quantize_weight(weight)
    codes, scale = fp8.reference_quantize_rows(x.reshape(-1, 32))
    for has_bias, gate, has_residual in itertools.product([False, True], [None, "batch", "token"], [False, True]):
        kwargs = _epilogue_args((has_bias, "silu", gate, has_residual), x, 16, torch.bfloat16, generator)
        outs = []
        for backend in BACKENDS:
            with fk.use_backend(backend), torch.no_grad():
                outs.append(fk.ops.fp8_linear(codes.view(1, 5, 32), wq, ws, x_scale=scale, out_dtype=torch.float32,
                                              **kwargs))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- whole models


class _Block(torch.nn.Module):
    """An adaLN-Zero block's linear layers: modulation, MLP, a norm, an embedding."""

    def __init__(self, D=64):
        super().__init__()
        self.t_embedder = torch.nn.Linear(16, D)
        self.adaLN_modulation = torch.nn.Linear(D, 2 * D)
        self.norm = torch.nn.LayerNorm(D, elementwise_affine=False)
        self.fc1 = torch.nn.Linear(D, 4 * D)
        self.fc2 = torch.nn.Linear(4 * D, D)

    def forward(self, x, t):
        shift, gate = self.adaLN_modulation(F.silu(self.t_embedder(t))).chunk(2, -1)
        h = F.gelu(self.fc1(self.norm(x) + shift[:, None]), approximate="tanh")
        return x + gate[:, None] * self.fc2(h)


def test_quantize_fp8_model_snr_and_safetensors_round_trip(generator, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(generator.initial_seed())
    model = torch.nn.Sequential()
    model.block = _Block()
    model.to(torch.bfloat16)
    x = torch.randn(2, 24, 64, generator=generator).to(torch.bfloat16)
    t = torch.randn(2, 16, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        expected = model.block(x, t)
        fk.quantize_fp8(model)
        out = model.block(x, t)
    swapped = {name for name, m in model.named_modules() if isinstance(m, fk.Fp8Linear)}
    assert swapped == {"block.fc1", "block.fc2"}  # embeddings, modulation and norms stay
    assert snr_db(out, expected) >= 20.0
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    state = load_file(str(path))
    assert state["block.fc1.weight"].dtype == torch.float8_e4m3fn and state["block.fc1.weight_scale"].shape == (256,)
    fresh = torch.nn.Sequential()
    fresh.block = _Block()
    fk.quantize_fp8(fresh.to(torch.bfloat16))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.block(x, t), out)


def test_a_layer_with_several_names_stays_one_layer(generator):
    """A Linear registered twice in one parent (named_children lists it once: one name stayed
    high precision) or in two parents (each got its own copy: the tie broken, the weight stored
    twice) becomes one Fp8Linear; a model that is itself a Linear comes back quantized."""
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.Module()
    model.proj_in = model.proj_out = shared
    model.a, model.b = torch.nn.Module(), torch.nn.Module()
    model.a.fc = model.b.fc = shared
    fk.quantize_fp8(model)
    assert isinstance(model.proj_in, fk.Fp8Linear)
    assert model.proj_in is model.proj_out is model.a.fc is model.b.fc
    assert isinstance(fk.quantize_fp8(torch.nn.Linear(16, 16)), fk.Fp8Linear)
    kept = torch.nn.Linear(16, 16)
    assert fk.quantize_fp8(kept, filter_fn=lambda module, name: False) is kept


def test_meta_initialisation_then_to_empty():
    """The big-model path: built (or moved) on the meta device, then to_empty on a real one (the
    layer copied its meta codes back and raised)."""
    with torch.device("meta"):
        layer = fk.Fp8Linear(8, 4)
    moved = fk.quantize_fp8(torch.nn.Sequential(torch.nn.Linear(8, 4)), filter_fn=lambda m, n: True).to("meta")
    for module in (layer, moved[0]):
        module.to_empty(device="cpu")
        assert module.weight.device.type == "cpu" and module.weight.dtype == torch.float8_e4m3fn
        assert module.weight_scale.dtype == torch.float32 and module.bias.device.type == "cpu"


def test_no_tokens_or_features_give_an_empty_output():
    """As nn.Linear: (0, K) -> (0, N), (B, 0, K) -> (B, 0, N), and N = 0 -> (M, 0) (on a GPU the TMA
    variants' descriptors refuse an empty matrix)."""
    layer = fk.quantize_fp8(torch.nn.Sequential(torch.nn.Linear(16, 8)), filter_fn=lambda module, name: True)[0]
    with torch.no_grad():
        assert layer(torch.randn(0, 16)).shape == (0, 8) and layer(torch.randn(2, 0, 16)).shape == (2, 0, 8)
    weight = torch.empty(0, 16, dtype=torch.float8_e4m3fn)
    for backend in BACKENDS:
        with fk.use_backend(backend), torch.no_grad():
            out = fk.ops.fp8_linear(torch.randn(3, 16), weight, torch.ones(()), residual=torch.randn(3, 0))
        assert out.shape == (3, 0)


def test_fp8_layer_output_follows_autocast(generator):
    """Under autocast an Fp8Linear writes autocast's dtype, as nn.Linear does; with a residual, the
    residual's (the residual stream keeps its precision)."""
    layer = fk.quantize_fp8(torch.nn.Sequential(torch.nn.Linear(32, 48)), filter_fn=lambda module, name: True)[0]
    x, residual = torch.randn(4, 32, generator=generator), torch.randn(4, 48, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert layer(x, residual=residual).dtype == torch.float32
    with torch.no_grad():
        assert layer(x).dtype == torch.float32


def test_dtype_casts_of_a_quantized_model_keep_the_fp8_weights(generator):
    """model.bfloat16() / .to(dtype) cast the bias only: the e4m3 codes and fp32 scales stay."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 48))
    fk.quantize_fp8(model, filter_fn=lambda module, name: True)
    layer = model[0]
    codes, scale = layer.weight.clone(), layer.weight_scale.clone()
    x = torch.randn(4, 32, generator=generator, dtype=torch.bfloat16)

    def assert_fp8_weights_kept():
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(layer.weight_scale, scale)

    with torch.no_grad():
        model.bfloat16()
        assert_fp8_weights_kept()
        expected = model(x)
        for cast in (lambda m: m.to(torch.float16), lambda m: m.float(), lambda m: m.to("cpu", torch.bfloat16)):
            cast(model)
            assert_fp8_weights_kept()
        # the bias went bf16 -> fp16 -> fp32 -> bf16, exactly: the same output
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_strided_parameters(generator):
    """A bias and per-channel scales that are strided views give the contiguous copies' result."""
    codes, x_scale = fp8.reference_quantize_rows(torch.randn(9, 32, generator=generator))
    weight_q, weight_scale = fp8.quantize_weight(torch.randn(16, 32, generator=generator))
    bias = torch.randn(32, generator=generator)
    strided = (torch.stack([weight_scale, weight_scale], 1)[:, 0], bias[::2])
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    for backend in BACKENDS:
        with fk.use_backend(backend), torch.no_grad():
            out = fk.ops.fp8_linear(codes, weight_q, strided[0], bias=strided[1], x_scale=x_scale,
                                    out_dtype=torch.float32)
            ref = fk.ops.fp8_linear(codes, weight_q, strided[0].contiguous(), bias=strided[1].contiguous(),
                                    x_scale=x_scale, out_dtype=torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_fp8_linear_module_epilogue(generator):
    linear = torch.nn.Linear(32, 48).to(torch.bfloat16)
    layer = fk.Fp8Linear.from_linear(linear, per_channel=False, activation="gelu_tanh")
    x = torch.randn(2, 5, 32, generator=generator).to(torch.bfloat16)
    gate, residual = torch.randn(2, 48).to(torch.bfloat16), torch.randn(2, 5, 48).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x, gate=gate, residual=residual)
        expected = residual.float() + gate.float()[:, None] * F.gelu(linear(x).float(), approximate="tanh")
    assert layer.weight_scale.shape == (1,) and snr_db(out, expected) >= 20.0
    with pytest.raises(ValueError, match="activation must be one of"):
        fk.Fp8Linear(4, 4, activation="tanh")
