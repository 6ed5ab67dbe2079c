"""CUDA and Triton kernels on a GPU against the fp64 oracle. Skipped without CUDA; run by
bench/gpu_check.sh whenever a GPU is lent."""

import pytest
import torch
import test_attention as ta
import test_fp8_linear as fl
import test_gated_residual as gr
import test_modulated_norm as mn
import test_qk_norm_rope as qk
from conftest import HAS_CUDA
from tolerances import assert_same_codes, snr_db

import fastgen_kernels as fk
from fastgen_kernels import _extension
from fastgen_kernels.ops import _eager_op

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# DiT-XL/2 at 256 px and 512 px, odd D (scalar path: 77 is no multiple of a 16-byte vector), wide D
GPU_SHAPES = [(8, 256, 1152), (2, 1024, 1152), (3, 17, 77), (1, 1, 1000), (2, 3, 8192)]


def gpu_backends():
    marks = [] if _extension.cuda_built() else [pytest.mark.skip(reason="extension built without CUDA")]
    return [pytest.param("cuda", marks=marks), "triton"]


def to_cuda(inputs):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(mn.VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_modulated_norm_on_gpu(backend, dtype, shape, variant, per_token, generator):
    inputs = to_cuda(mn.make_inputs(shape, dtype, variant, per_token, generator))
    mn.check_against_oracle(backend, inputs, dtype, generator)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(mn.VARIANTS))
def test_modulated_norm_jvp_kernel_on_gpu(backend, dtype, variant, generator):
    """The norm's forward-mode rule on the GPU (the backend's JVP kernel) against the fp64
    formula, at DiT-XL's D with every tangent: one rounding to the dtype, plus the fp32 sums'
    error over D terms (4 ulp of the largest tangent; the interpreter's and the CUDA emulation's
    came within 1.1)."""
    import torch.autograd.forward_ad as fwAD

    *tensors, rms = to_cuda(mn.make_inputs((4, 256, 1152), dtype, variant, False, generator))
    tangents = [None if t is None else torch.randn(t.shape, generator=generator).to(t) for t in tensors]
    with fk.use_backend(backend), fwAD.dual_level():
        y = mn.call(*(t if t is None else fwAD.make_dual(t, d) for t, d in zip(tensors, tangents)), rms)
        ty = fwAD.unpack_dual(y).tangent
    x, shift, scale, weight, bias = (None if t is None else t.double() for t in tensors)
    _, mean, rstd = mn.mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    expected = mn.mn.reference_jvp(x, scale, weight, bias, mean, rstd, rms,
                                   *(None if t is None else t.double() for t in tangents))
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(ty.double(), expected, rtol=ulp, atol=4 * ulp * expected.abs().max().item())


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_gated_residual_on_gpu(backend, dtype, shape, per_token, generator):
    inputs = to_cuda(gr.make_inputs(shape, dtype, per_token, generator))
    gr.check_against_oracle(backend, inputs, dtype, generator)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_gated_residual_one_pass_step_on_gpu(backend, per_token, generator):
    """bf16 operands on an fp32 stream read as they are (the mixed-dtype kernels), the tangent in
    one call."""
    gr.check_one_pass_step(backend, per_token, generator, "cuda")


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 72), (2, 3, 1152), (1, 2, 1000)], ids=str)
@pytest.mark.parametrize("variant", ["layer_affine", "rms_weight"])
def test_norm_writes_a_narrower_output_on_gpu(backend, out_dtype, shape, variant, generator):
    """The norm of fp32 x written in the reading layer's autocast dtype (mixed-dtype kernels):
    the reference's fp32 value rounded once, and its tangent likewise (the JVP kernel)."""
    x, shift, scale, weight, bias, rms = to_cuda(mn.make_inputs(shape, torch.float32, variant, False, generator))
    module = fk.ops.OP_MODULES["modulated_norm"]
    with fk.use_backend(backend):
        y, mean, rstd = module.forward_dispatcher(x, shift, scale, weight, bias, 1e-6, rms, out_dtype)
    expected, _, _ = module.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    assert y.dtype == out_dtype
    ulp = torch.finfo(out_dtype).eps
    torch.testing.assert_close(y.float(), expected, rtol=ulp, atol=ulp * 1e-3)
    tx = torch.randn(shape, generator=generator).cuda()
    args = (x, scale, weight, bias, mean, rstd, rms, tx, None, None, None, None)
    with fk.use_backend(backend):
        ty = module.jvp_dispatcher(*args, out_dtype)
    assert ty.dtype == out_dtype
    torch.testing.assert_close(ty.float(), module.reference_jvp(*args), rtol=ulp, atol=ulp * 1e-3)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("variant", ["layer_affine", "rms_weight"])
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_norm_backward_reads_a_narrower_gradient_on_gpu(backend, variant, per_token, generator):
    mn.check_narrower_gradient(backend, variant, per_token, generator, "cuda")


@pytest.mark.parametrize("backend", gpu_backends())
def test_misaligned_and_non_contiguous_inputs(backend, generator):
    """Tensors that start one element past a 16-byte boundary take the scalar path."""
    B, L, D = 2, 3, 1152
    flat = torch.randn(B * L * D + 1, generator=generator).cuda().bfloat16()
    x = flat[1:].view(B, L, D)
    shift = torch.randn(D, B, generator=generator).cuda().bfloat16().t()
    scale = torch.randn(B, D, generator=generator).cuda().bfloat16()
    mn.check_against_oracle(backend, (x, shift, scale, None, None, False), torch.bfloat16, generator)
    gr.check_against_oracle(backend, (x, x.clone(), shift), torch.bfloat16, generator)


@pytest.mark.parametrize("backend", gpu_backends())
def test_backward_is_deterministic(backend, generator):
    x, shift, scale, weight, bias, _ = to_cuda(mn.make_inputs((4, 300, 1152), torch.bfloat16, "layer_affine", False, generator))
    leaves = [t.requires_grad_() for t in (x, shift, scale, weight, bias)]
    g = torch.randn_like(x)
    with fk.use_backend(backend):
        first = torch.autograd.grad(fk.modulated_layer_norm(*leaves), leaves, g)
        second = torch.autograd.grad(fk.modulated_layer_norm(*leaves), leaves, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", gpu_backends())
def test_opcheck_on_gpu(backend, generator):
    x, shift, scale, weight, bias, rms = to_cuda(mn.make_inputs((2, 3, 64), torch.bfloat16, "layer_affine", False, generator))
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.modulated_norm.default, (x, shift, scale, weight, bias, 1e-6, rms))
        torch.library.opcheck(torch.ops.fastgen.gated_residual.default, (x, x.clone(), shift))


def test_automatic_choice_prefers_cuda_then_triton():
    x = torch.randn(2, 3, 64, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    expected = "cuda" if _extension.cuda_built() else "triton"
    assert fk.ops.OP_MODULES["modulated_norm"].forward_dispatcher.select(x, mod, mod, None, None, 1e-6, False) == expected


# (B, L, H, Dh): DiT-XL/2 heads (72), Flux heads (128) with several backward chunks per program,
# the widest head (256), odd sizes, tiny heads
QK_SHAPES = [(2, 256, 16, 72), (1, 1024, 6, 128), (3, 17, 5, 256), (1, 1, 1, 64), (2, 33, 3, 2)]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(qk.VARIANTS))
def test_qk_norm_rope_on_gpu(backend, dtype, shape, variant, generator):
    inputs = qk.make_inputs(shape, dtype, variant, generator, device="cuda")
    qk.check_against_oracle(backend, inputs, dtype, generator)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_qk_norm_rope_strided_heads_on_gpu(backend, interleaved, generator):
    """q and k sliced from a fused (B, L, 3, H, Dh) qkv tensor, bf16 tables."""
    B, L, H, Dh = 2, 77, 24, 128
    qkv = torch.randn(B, L, 3, H, Dh, generator=generator).cuda().bfloat16()
    q, k, _ = qkv.unbind(2)
    angles = torch.rand(L, Dh, generator=generator).cuda() * 6.3
    weights = [torch.randn(Dh, generator=generator).cuda().bfloat16() for _ in range(2)]
    inputs = (q, k, *weights, angles.cos().bfloat16(), angles.sin(), interleaved)
    qk.check_against_oracle(backend, inputs, torch.bfloat16, generator)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(qk.VARIANTS))
def test_qk_norm_rope_jvp_on_gpu(backend, dtype, shape, variant, generator):
    """The forward-mode rule's kernel (CUDA or Triton) at real head sizes, every tangent."""
    args = qk.jvp_args(qk.make_inputs(shape, dtype, variant, generator, device="cuda"), "all", generator)
    qk.check_jvp_kernel(backend, args, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
def test_qk_norm_rope_backward_is_deterministic(backend, generator):
    q, k, q_weight, k_weight, cos, sin, interleaved = qk.make_inputs(
        (2, 300, 8, 128), torch.bfloat16, "rope_interleaved", generator, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, q_weight, k_weight)]
    grads_out = [torch.randn_like(q), torch.randn_like(k)]
    with fk.use_backend(backend):
        first = torch.autograd.grad(fk.qk_norm_rope(*leaves, cos, sin), leaves, grads_out)
        second = torch.autograd.grad(fk.qk_norm_rope(*leaves, cos, sin), leaves, grads_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", gpu_backends())
def test_qk_norm_rope_opcheck_on_gpu(backend, generator):
    qk.run_opcheck(backend, qk.make_inputs((2, 3, 2, 64), torch.bfloat16, "rope_half", generator, device="cuda"))


def test_qk_norm_rope_dispatch_on_gpu():
    """cuda first; heads wider than 256 fall back to the reference."""
    q = torch.randn(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    dispatcher = fk.ops.OP_MODULES["qk_norm_rope"].forward_dispatcher
    expected = "cuda" if _extension.cuda_built() else "triton"
    assert dispatcher.select(q, q, None, None, None, None, 1e-6, True) == expected
    wide = torch.randn(1, 4, 2, 320, device="cuda", dtype=torch.bfloat16)
    assert dispatcher.select(wide, wide, None, None, None, None, 1e-6, True) == "reference"


# ----------------------------------------------------------------------------- attention (Triton)

# the unit-test cases (every head dim, Lq != Lk, Lq = 1, causal, block-causal) plus DiT-XL/2 at
# 256 px, a Flux-like long sequence and a block-causal video-like one with a KV cache
ATTENTION_CASES = ta.CASES + [ta.LONG_CASE, ta.Case(4, 256, 256, 16, 72, 0),
                              ta.Case(1, 2048, 2048, 4, 128, 0), ta.Case(1, 1000, 3000, 2, 128, 500)]


# fp32 at head dims <= 64 only: exact (non-TF32) fp32 dots compile to FMA loops, 5-40 s a kernel
# variant at wider heads, which the one-call GPU check cannot afford for every case
ATTENTION_GPU_PARAMS = [(case, dtype) for case in ATTENTION_CASES for dtype in GPU_DTYPES
                        if dtype != torch.float32 or case.Dh <= 64]


@pytest.mark.parametrize(("case", "dtype"), ATTENTION_GPU_PARAMS,
                         ids=[f"{ta.case_id(c)}-{d}" for c, d in ATTENTION_GPU_PARAMS])
def test_attention_on_gpu(case, dtype, generator):
    ta.check_case("triton", case, dtype, generator, device="cuda")


def test_attention_non_contiguous_on_gpu(generator):
    case = ta.Case(2, 300, 300, 4, 72, 1)
    qkv = torch.randn(2, 300, 3, 4, 72, generator=generator).cuda().bfloat16()
    q, k, v = qkv.unbind(2)
    tq, tk, tv = torch.randn(3, 2, 4, 300, 72, generator=generator).cuda().bfloat16().transpose(2, 3)
    ta.check_case("triton", case, torch.bfloat16, generator, device="cuda",
                  inputs=(q, k, v, tq, tk, tv))


def test_attention_backward_is_deterministic(generator):
    q, k, v, *_ = ta.make_inputs(ta.Case(2, 513, 513, 4, 64, 0), torch.bfloat16, generator, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(q)
    with fk.use_backend("triton"):
        first = torch.autograd.grad(fk.attention(*leaves), leaves, g)
        second = torch.autograd.grad(fk.attention(*leaves), leaves, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_opcheck_on_gpu(generator):
    q, k, v, tq, tk, tv = ta.make_inputs(ta.Case(1, 40, 70, 2, 72, 0), torch.bfloat16, generator,
                                         "cuda")
    with fk.use_backend("triton"):
        o, lse = torch.ops.fastgen.attention(q, k, v, 0.1, 16)
        torch.library.opcheck(torch.ops.fastgen.attention.default, (q, k, v, 0.1, 16))
        torch.library.opcheck(torch.ops.fastgen.attention_backward.default,
                              (torch.randn_like(o), q, k, v, o, lse, 0.1, 16))
        torch.library.opcheck(torch.ops.fastgen.attention_jvp.default,
                              (q, k, v, tq, tk, tv, 0.1, 16))
        torch.library.opcheck(torch.ops.fastgen.attention_tangent.default,
                              (q, k, v, o, lse, tq, None, tv, 0.1, 16))


def test_attention_jvp_memory_is_linear_in_length():
    """The fused JVP allocates its outputs and nothing of size L x L: 4x the tokens, 4x the
    memory (math attention's would grow 16x)."""
    extra = []
    for L in (4096, 16384):
        q, k, v, tq, tk, tv = (torch.randn(1, L, 8, 128, device="cuda", dtype=torch.bfloat16)
                               for _ in range(6))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with fk.use_backend("triton"):
            fk.attention_jvp(q, k, v, tq, tk, tv)
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated() - before)
    assert extra[1] <= 4.5 * extra[0]


def test_attention_dispatch_on_gpu():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert ta.att.forward_dispatcher.select(q, q, q, 0.125, 0) == "triton"
    wide = torch.randn(1, 8, 2, 320, device="cuda", dtype=torch.bfloat16)
    assert ta.att.forward_dispatcher.select(wide, wide, wide, 0.125, 0) == "reference"


# --------------------------------------------------------------------------- fused losses

import loss_testing as lt  # noqa: E402
import test_losses as tl  # noqa: E402
from loss_cases import CASES  # noqa: E402

# odd D, B = 1, more samples than the tail kernel's threads, SD latents, a latent video clip (D = 99840)
LOSS_SHAPES = [(2, 3, 37, 37), (1, 5), (600, 7), (64, 4, 64, 64), (8, 16, 60, 104)]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_losses_on_gpu(backend, dtype, shape, case, generator):
    inputs = {k: v.cuda() for k, v in CASES[case].make_inputs(shape, dtype, generator).items()}
    for reduction in ("mean", "none"):
        lt.check_against_oracle(CASES[case], inputs, dtype, backend, reduction)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_losses_are_deterministic_on_gpu(backend, case, generator):
    spec = CASES[case]
    inputs = {k: v.cuda() for k, v in spec.make_inputs((3, 5, 61, 67), torch.float32, generator).items()}
    name = spec.differentiable[0]
    results = []
    for _ in range(2):
        x = inputs[name].detach().requires_grad_()
        with fk.use_backend(backend):
            value = spec.fn(**inputs | {name: x}, **spec.kwargs)
            results.append((value, torch.autograd.grad(value, x)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("case", list(CASES))
def test_loss_native_path_equals_custom_op_on_gpu(case, generator, monkeypatch):
    """On the cuda backend a plain eager call runs the loss's C++ autograd; the custom op (what
    torch.compile sees) runs the Python one over the same kernels: bit-identical values and
    gradients."""
    if not _extension.cuda_built():
        pytest.skip("extension built without CUDA")
    inputs = {k: v.cuda() for k, v in CASES[case].make_inputs((600, 3, 5), torch.float32, generator).items()}
    with fk.use_backend("cuda"):
        native = tl._value_and_grads(CASES[case], inputs)
        monkeypatch.setattr(_eager_op, "plain_eager", lambda args: False)
        through_op = tl._value_and_grads(CASES[case], inputs)
    assert all(torch.equal(a, b) for a, b in zip(native, through_op, strict=True))


@pytest.mark.parametrize("backend", gpu_backends())
def test_loss_ops_pass_opcheck_on_gpu(backend, generator):
    with fk.use_backend(backend):
        for op, args in tl.op_cases(generator):
            args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                         else a for a in args)
            torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- FP8 linear


def assert_close_to_fast_accumulation(out, exact, codes, x_scale, weight_q, weight_scale, kwargs, x):
    """out within the error of Hopper's FP8 tensor-core accumulation of the exact result.

    wgmma adds the e4m3 products of each K slice to the fp32 accumulator with about 13 bits of
    mantissa (what cuBLAS calls fast accumulation, and Triton's default for FP8 dots on sm_90), so
    the error grows with sum_k |x_k w_k|, not with the result: up to 2^-11.2 of that sum was
    measured on an H200 (K = 1152; the first GPU run, 2026-11-27), where outputs near zero were
    off by far more than the bf16 rounding. Allowed: 2^-9 of it, times the epilogue's largest
    slope (1.2 bounds GELU's and SiLU's) and |gate|, plus 2^-7 of |exact| for the bf16 output. A
    wrong tile, scale or skipped K block is off by O(|exact|), far beyond that."""
    magnitude = (codes.double().abs() @ weight_q.double().abs().T) * weight_scale.double().reshape(1, -1)
    tolerance = (2**-9 * 1.2 * magnitude * x_scale.double()[:, None]).view(*x.shape[:-1], -1)
    if kwargs["gate"] is not None:
        gate = kwargs["gate"].double().abs()
        tolerance = tolerance * (gate[:, None] if gate.dim() == 2 else gate)
    excess = (out.double() - exact).abs() - (2**-7 * exact.abs() + tolerance)
    assert excess.max() <= 0, (f"{int((excess > 0).sum())} of {excess.numel()} outputs beyond the "
                               f"fast-accumulation bound, worst by {excess.max().item():.3g}")


@pytest.mark.parametrize("epilogue", fl.EPILOGUES, ids=str)
@pytest.mark.parametrize("M,N,K", [(8192, 4608, 1152), (300, 1152, 4608), (37, 45, 70)])
def test_fp8_linear_on_gpu(M, N, K, epilogue, generator):
    """The Triton quantizer bit-identical to the reference on the GPU (hardware e4m3 casts), and
    the GEMM + epilogue against the fp64 epilogue of the same codes (within the tensor cores'
    accumulation error) and against _scaled_mm."""
    fp8 = fk.ops.OP_MODULES["fp8_linear"]
    x, weight = fl._inputs(generator, batch=1, tokens=M, K=K, N=N)
    weight_q, weight_scale = (t.cuda() for t in fp8.quantize_weight(weight))
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
              for k, v in fl._epilogue_args(epilogue, x, N, torch.bfloat16, generator).items()}
    x = x.cuda()
    with fk.use_backend("triton"), torch.no_grad():
        codes, x_scale = torch.ops.fastgen.quantize_fp8_rows(x[0])
        out = fk.ops.fp8_linear(x, weight_q, weight_scale, **kwargs)
    ref_codes, ref_scale = fp8.reference_quantize_rows(x[0])
    assert_same_codes(codes, ref_codes, "gpu")
    assert torch.equal(x_scale, ref_scale)
    exact = fl._expected(codes.double() @ weight_q.double().T, x_scale, weight_scale, kwargs, x)
    assert_close_to_fast_accumulation(out, exact, codes, x_scale, weight_q, weight_scale, kwargs, x)
    if torch.cuda.get_device_capability() >= (8, 9) and M % 16 == 0 and N % 16 == 0 and K % 16 == 0:
        # bf16 output: cuBLAS's row-wise scaled FP8 GEMM gives fp32 only on some GPUs and versions
        gemm = torch._scaled_mm(codes, weight_q.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None],
                                out_dtype=torch.bfloat16)
        assert snr_db(out, fl._expected(gemm, None, torch.ones(1, device="cuda"), kwargs, x)) >= 40.0


@pytest.mark.parametrize("K", [1152, 16384])  # one pass, two passes
def test_fp8_quantizers_keep_nan_on_gpu(K):
    """A NaN in a row gives NaN codes (the hardware cast keeps it) and a NaN scale, in the row
    quantizer and the FP8 modulated norm (the GPU's max and min drop NaN)."""
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    x[2, 7] = float("nan")
    with fk.use_backend("triton"):
        results = [torch.ops.fastgen.quantize_fp8_rows(x)]
        if K <= 8192:  # the Triton norm's widest row
            modulation = torch.zeros(1, K, device="cuda")
            norm_codes, norm_scale = fk.modulated_layer_norm_fp8(x[None], modulation, modulation)
            results.append((norm_codes[0], norm_scale))
    for c, s in results:
        assert s[2].isnan() and c[2].float().isnan().all()
        assert torch.isfinite(s[[0, 1, 3]]).all() and not c[[0, 1, 3]].float().isnan().any()


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 256, 1152), (2, 77, 1000), (1, 5, 37)], ids=str)
def test_modulated_norm_fp8_on_gpu(dtype, shape, generator):
    """The Triton norm's e4m3 codes and scales against the reference's: the fp32 norm may differ
    in its last bit (FMA contraction, summation order), so a row's scale by an ulp and a code by
    one step on rare elements; the dequantized rows within the e4m3 rounding of the fp64 norm."""
    fp8 = fk.ops.OP_MODULES["fp8_linear"]
    if not fp8.fp8_supported(torch.device("cuda")):
        pytest.skip("no e4m3 on this GPU")
    mnq = fk.ops.OP_MODULES["modulated_norm_fp8"]
    inputs = mn.make_inputs(shape, dtype, "layer_affine", True, generator, device="cuda")[:5]
    with fk.use_backend("triton"), torch.no_grad():
        codes, scales = fk.modulated_layer_norm_fp8(*inputs)
    ref_codes, ref_scales = mnq.reference_modulated_norm_fp8(*inputs, 1e-6, False)
    torch.testing.assert_close(scales, ref_scales, rtol=2e-6, atol=0)
    def ordinal(c):  # e4m3 is sign-magnitude: the signed magnitude orders the codes (and -0 = +0)
        bits = c.view(torch.uint8).int()
        return torch.where(bits >= 128, 128 - bits, bits)

    steps = (ordinal(codes) - ordinal(ref_codes)).abs()
    flips = int(steps.bool().sum())
    assert steps.max() <= 1 and flips <= max(1, steps.numel() // 1000), flips
    y64 = mn.oracle(*(t.double() for t in inputs), False).reshape(-1, shape[-1])
    assert snr_db(codes.double().reshape(-1, shape[-1]) * scales.double()[:, None], y64) >= 25.0


@pytest.mark.parametrize("variant", ["tiled", "persistent_tma", "persistent_tma_store"])
@pytest.mark.parametrize("M,N,K", [(8192, 4608, 1152), (300, 1152, 4608), (37, 48, 80)])
def test_fp8_linear_kernel_variants_on_gpu(variant, M, N, K, generator):
    """Each GEMM variant forced (the op's "auto" picks one), fc1's and fc2's epilogues, against
    the fp64 epilogue of the same e4m3 codes; and "auto" equal to the variant it chose."""
    if torch.cuda.get_device_capability() < ((8, 9) if variant == "tiled" else (9, 0)):
        pytest.skip(f"the {variant} FP8 GEMM needs a newer GPU")
    from fastgen_kernels.triton_ops import fp8_linear as triton_fp8_linear

    fp8 = fk.ops.OP_MODULES["fp8_linear"]
    x, weight = fl._inputs(generator, batch=1, tokens=M, K=K, N=N)
    codes, x_scale = (t.cuda() for t in fp8.reference_quantize_rows(x[0]))
    weight_q, weight_scale = (t.cuda() for t in fp8.quantize_weight(weight))
    for epilogue in [(True, "gelu_tanh", None, False), (True, None, "token", True)]:
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                  for k, v in fl._epilogue_args(epilogue, x, N, torch.bfloat16, generator).items()}
        args = (codes, x_scale, weight_q, weight_scale, kwargs["bias"], kwargs["activation"],
                None if kwargs["gate"] is None else kwargs["gate"].view(M, N), 1,
                None if kwargs["residual"] is None else kwargs["residual"].view(M, N), torch.bfloat16)
        out = triton_fp8_linear.linear(*args, variant=variant)
        exact = fl._expected(codes.double() @ weight_q.double().T, x_scale, weight_scale, kwargs, x.cuda())
        assert_close_to_fast_accumulation(out.view(1, M, N), exact, codes, x_scale, weight_q, weight_scale,
                                          kwargs, x)
        auto = triton_fp8_linear.linear(*args)
        key = triton_fp8_linear.variant_key(codes, N, torch.bfloat16, args[5], args[6] is not None, args[8])
        chosen = triton_fp8_linear.VARIANT_CHOICES.get(key, "tiled")
        assert torch.equal(auto, triton_fp8_linear.linear(*args, variant=chosen))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("steps", [1, 4])
def test_sample_cuda_graph_matches_eager(steps):
    """The captured loop replays the eager loop: same seed, same samples; a second call reuses the graph."""
    from fastgen_kernels.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=8, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=10)).cuda()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    model = fk.Denoiser(net, "rf", "flow", time_scale=1000.0, distilled=True, null_cond=10, shape=(4, 8, 8))
    labels = torch.arange(6, device="cuda") % 10
    kwargs = dict(batch_size=6, cond=labels, guidance_scale=2.0, seed=3)
    eager = fk.sample(model, steps, cuda_graph=False, **kwargs)
    graphed = fk.sample(model, steps, cuda_graph=True, **kwargs)
    assert len(model._graphs) == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-3)
    again = fk.sample(model, steps, cuda_graph=True, **{**kwargs, "seed": 4})
    assert len(model._graphs) == 1 and not again.equal(graphed)
    torch.testing.assert_close(again, fk.sample(model, steps, cuda_graph=False, **{**kwargs, "seed": 4}),
                               rtol=1e-3, atol=1e-3)


def test_attention_with_no_keys_on_gpu():
    """No keys: the output is 0 (queries that see no key), as on the CPU; SDPA, which takes the
    other unmasked calls on a GPU, is not given it."""
    q = torch.randn(2, 5, 2, 64, device="cuda", requires_grad=True)
    k = v = torch.randn(2, 0, 2, 64, device="cuda")
    out = fk.attention(q, k, v)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_sample_cuda_graph_with_a_tuple_cond():
    """A PixArt cond (embeddings, mask) through the captured loop: the graph holds each part, and
    new values of both replay the eager loop's result. PixArt-alpha's size conditions are made
    on the device inside the capture (a tensor copied from the host could not be)."""
    diffusers = pytest.importorskip("diffusers")
    import test_diffusers as td

    model = fk.from_diffusers(td.randomized(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=32,
        use_additional_conditions=True), torch.float32).cuda(), "rf")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for padding in (3, 1):
        embeddings = torch.randn(2, 6, 24, device="cuda", generator=gen)
        mask = (torch.arange(6, device="cuda") < 6 - padding).long().expand(2, 6)
        kwargs = dict(batch_size=2, cond=(embeddings, mask), guidance_scale=2.0,
                      neg_cond=(torch.zeros_like(embeddings), torch.ones_like(mask)), seed=1)
        graphed = fk.sample(model, 2, cuda_graph=True, **kwargs)
        torch.testing.assert_close(graphed, fk.sample(model, 2, cuda_graph=False, **kwargs), rtol=1e-3, atol=1e-3)
    assert len(model._graphs) == 1


# --------------------------------------------------------------------------- the one-pass JVP


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["scm-cd", "meanflow-data"])
def test_one_pass_step_equals_the_two_pass_step_on_gpu(name, autocast_dtype, monkeypatch):
    """sCM's and MeanFlow's one pass (forward_and_jvp: SDPA's output and backward, our JVP
    kernel's tangent) against the JVP as a pass of its own (our forward and tangent kernels, then
    SDPA's forward with gradients): the same loss and gradients, within the kernels' rounding."""
    import test_distill as td

    from fastgen_kernels.distill import base
    from fastgen_kernels.distill.base import Batch, forward_backward

    method = td._dit_methods()[name]().cuda()
    params = [p for p in method.parameters() if p.requires_grad]
    x0, cond = torch.randn(4, 4, 8, 8, device="cuda"), torch.arange(4, device="cuda")
    runs = []
    for two_pass in (False, True):
        monkeypatch.setattr(base, "data_parallel", lambda model, two_pass=two_pass: two_pass)
        for p in params:
            p.grad = None
        out = forward_backward(method, Batch(x0, cond, seed=3), 10**6, ("student",), 1.0, autocast_dtype)
        runs.append((out["student"], torch.cat([p.grad.flatten() for p in params])))
    (loss, grads), (two_loss, two_grads) = runs
    tolerance = 1e-4 if autocast_dtype is None else 2e-2
    assert torch.isfinite(loss) and abs(loss - two_loss) <= tolerance * abs(two_loss), (loss, two_loss)
    assert (grads - two_grads).norm() <= tolerance * two_grads.norm()


# --------------------------------------------------------------------------- training step in a CUDA graph


@pytest.mark.parametrize(("name", "autocast_dtype"), [("scm-cd", None), ("scm-cd", torch.bfloat16),
                                                      ("meanflow-data", None), ("cm-cd", None), ("sft", None),
                                                      ("dmd2-gan", torch.bfloat16)])
def test_graphed_training_step_replays_the_eager_step(name, autocast_dtype):
    """Each replay equals the eager step on that batch and seed (outputs and gradients); one graph
    serves every batch of the phase; a gradient already held is added to."""
    import test_distill as td

    from fastgen_kernels.distill.base import Batch, forward_backward
    from fastgen_kernels.distill.cuda_graph import GraphedStep

    method = td._dit_methods()[name]().cuda()
    params = [p for p in method.parameters() if p.requires_grad]
    graphed = GraphedStep(method, autocast_dtype)
    # past sCM's warm-up; CM in its third curriculum stage (by 10**6 its gap, and loss, are zero)
    iteration = 2000 if name.startswith("cm") else 10**6
    for i in range(4):
        gen = torch.Generator("cuda").manual_seed(i)
        x0, cond = torch.randn(4, 4, 8, 8, device="cuda", generator=gen), torch.arange(i, i + 4, device="cuda") % 10
        for p in params:
            p.grad = None
        eager = forward_backward(method, Batch(x0, cond, seed=100 + i), iteration, ("student",), 0.5,
                                 autocast_dtype, autocast_cache=False)
        expected = [p.grad for p in params]
        for p in params:
            p.grad = None
        replayed = graphed(Batch(x0, cond, seed=100 + i), iteration + i, ("student",), 0.5)
        assert replayed.keys() == eager.keys()
        for key in eager:
            torch.testing.assert_close(replayed[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
        for p, grad in zip(params, expected):
            torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-7)
    assert len(graphed.graphs) == 1
    assert any(grad is not None and grad.abs().max() > 0 for grad in expected)
    held = [None if p.grad is None else torch.ones_like(p.grad) for p in params]
    for p, h in zip(params, held):
        p.grad = None if h is None else h.clone()  # the replay adds to it in place
    graphed(Batch(x0, cond, seed=103), iteration, ("student",), 0.5)
    for p, h, grad in zip(params, held, expected):
        if h is not None:
            torch.testing.assert_close(p.grad, h + grad, rtol=1e-5, atol=1e-6)


def test_trainer_with_cuda_graph_follows_the_eager_trajectory(tmp_path):
    """sCD of a tiny DiT, 6 iterations with 2 micro-batches each: the same losses and weights with
    and without the graph."""
    import copy

    import test_distill as td

    from fastgen_kernels.distill.trainer import OptimizerConfig, Trainer, TrainerConfig

    method = td._dit_methods()["scm-cd"]()
    data = (torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10)
    runs = []
    for graphed in (False, True):
        config = TrainerConfig(iterations=6, batch_size=8, grad_accumulation=2, ema_decays=(), progress=False,
                               resume=False, cuda_graph=graphed, output_dir=str(tmp_path / str(graphed)),
                               optimizer=OptimizerConfig(lr=1e-3))
        run = Trainer(copy.deepcopy(method), data, config, device="cuda")
        losses = [run.step(10**6 + i)["loss"] for i in range(6)]
        runs.append((torch.stack(losses), [p.detach().clone() for p in run.method.student.parameters()]))
        if graphed:  # one per micro-batch
            assert len(run.graphed.graphs) == 2
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
