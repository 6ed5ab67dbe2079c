"""modulated_layer_norm / modulated_rms_norm: every backend against an fp64 oracle written with
plain torch (F.layer_norm, F.rms_norm), gradients, forward-mode AD, opcheck and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_DTYPES, cpu_backends, cpu_isas
from tolerances import assert_close

import fastgen_kernels as fk
from fastgen_kernels.ops import modulated_norm as mn

# (B, L, D): DiT-XL's D = 1152, odd D, L = 1, B = 1.
SHAPES = [(2, 5, 72), (1, 1, 1000), (2, 1, 1152), (1, 9, 1152)]
# (rms, has_weight, has_bias)
VARIANTS = {"layer": (False, False, False), "layer_affine": (False, True, True),
            "layer_bias": (False, False, True), "rms": (True, False, False),
            "rms_weight": (True, True, False)}


def oracle(x, shift, scale, weight, bias, rms, eps=1e-6):
    """The op in plain torch (fp64 when given fp64 tensors)."""
    D = x.shape[-1]
    if rms:
        n = F.rms_norm(x, (D,), weight, eps)
    else:
        n = F.layer_norm(x, (D,), weight, bias, eps)
    per_row = lambda m: m.unsqueeze(1) if m.dim() == 2 else m  # noqa: E731
    return n * (1 + per_row(scale)) + per_row(shift)


def make_inputs(shape, dtype, variant, per_token, generator, device="cpu"):
    B, L, D = shape
    rms, has_w, has_b = VARIANTS[variant]
    mod_shape = (B, L, D) if per_token else (B, D)
    rand = lambda *s: torch.randn(*s, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    x = rand(B, L, D) * 3 + 1  # a mean and a scale far from LayerNorm's output
    return (x, rand(*mod_shape), rand(*mod_shape), rand(D) if has_w else None,
            rand(D) if has_b else None, rms)


def call(x, shift, scale, weight, bias, rms):
    if rms:
        return fk.modulated_rms_norm(x, shift, scale, weight)
    return fk.modulated_layer_norm(x, shift, scale, weight, bias)


def of_present(fn, tensors, rms):
    """fn(x, shift, scale, weight, bias, rms) as a function of the tensors that are not None."""
    present = [i for i, t in enumerate(tensors) if t is not None]

    def wrapped(*args):
        full = [None] * 5
        for i, a in zip(present, args):
            full[i] = a
        return fn(*full, rms)

    return wrapped, tuple(tensors[i] for i in present)


def check_against_oracle(backend, inputs, dtype, generator):
    *tensors, rms = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    present = [t for t in leaves if t is not None]
    with fk.use_backend(backend):
        y = call(*leaves, rms)
        grad_out = torch.randn(y.shape, generator=generator).to(y)
        grads = torch.autograd.grad(y, present, grad_out)
    wide = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y64 = oracle(*wide, rms)
    grads64 = torch.autograd.grad(y64, [t for t in wide if t is not None], grad_out.double())
    assert y.dtype == dtype and y.shape == tensors[0].shape and y.is_contiguous()
    assert_close(y, y64, dtype, "y")
    names = [n for n, t in zip(["dx", "dshift", "dscale", "dweight", "dbias"], tensors) if t is not None]
    for name, grad, grad64 in zip(names, grads, grads64):
        assert grad.dtype == dtype
        assert_close(grad, grad64, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_forward_backward_match_oracle(backend, dtype, shape, variant, per_token, generator):
    check_against_oracle(backend, make_inputs(shape, dtype, variant, per_token, generator), dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_every_cpu_instruction_set_matches_oracle(dtype, variant, per_token, cpu_isa, generator):
    # D = 1000: a vector body and a scalar tail in every copy
    inputs = make_inputs((2, 3, 1000), dtype, variant, per_token, generator)
    check_against_oracle("cpu", inputs, dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16], ids=str)
def test_every_cpu_instruction_set_writes_and_reads_narrower_dtypes(narrow, cpu_isa, generator):
    """fp32 x with the output in autocast's narrower dtype, and a bf16 upstream gradient."""
    x, shift, scale, weight, bias, rms = make_inputs((2, 3, 1000), torch.float32, "layer_affine", True,
                                                     generator)
    y = mn._extension_forward(x, shift, scale, weight, bias, 1e-6, rms, narrow)[0]
    assert y.dtype == narrow
    assert_close(y, oracle(*(t.double() for t in (x, shift, scale, weight, bias)), rms), narrow, "y")
    check_narrower_gradient("cpu", "layer_affine", True, generator, "cpu")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", ["layer_affine", "rms_weight"])
def test_non_contiguous_inputs(backend, variant, generator):
    B, L, D = 3, 4, 72
    x, shift, scale, weight, bias, rms = make_inputs((B, L, D), torch.float32, variant, False, generator)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (B, L, D) strides permuted
    shift = shift.t().contiguous().t()
    scale_full = torch.randn(B, 2 * L, D, generator=generator)[:, ::2]  # per-token, strided
    weight, bias = (None if p is None else torch.stack([p, -p], 1)[:, 0] for p in (weight, bias))  # stride 2
    assert not (x.is_contiguous() or shift.is_contiguous() or scale_full.is_contiguous())
    assert all(p is None or not p.is_contiguous() for p in (weight, bias))
    check_against_oracle(backend, (x, shift, scale_full, weight, bias, rms), torch.float32, generator)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_fp64_matches_oracle_and_gradcheck(backend, variant, per_token, generator):
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    *tensors, rms = make_inputs((2, 3, 7), torch.float64, variant, per_token, generator)
    check_against_oracle(backend, (*tensors, rms), torch.float64, generator)
    fn, leaves = of_present(call, tensors, rms)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in leaves])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_jvp_matches_finite_differences(backend, variant, per_token, generator):
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    *tensors, rms = make_inputs((2, 3, 9), torch.float64, variant, per_token, generator)
    fn, primals = of_present(call, tensors, rms)
    tangents = tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in primals)
    with fk.use_backend(backend):
        y, ty = torch.func.jvp(fn, primals, tangents)
        h = 1e-6
        plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
        minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
    torch.testing.assert_close(ty, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-7)
    # and against forward-mode AD through the plain-torch oracle
    _, ty_oracle = torch.func.jvp(of_present(oracle, tensors, rms)[0], primals, tangents)
    torch.testing.assert_close(ty, ty_oracle, rtol=1e-10, atol=1e-10)


def test_jvp_through_forward_ad_and_partial_tangents(generator):
    import torch.autograd.forward_ad as fwAD

    x, shift, scale, weight, bias, _ = make_inputs((2, 3, 16), torch.float64, "layer_affine", False, generator)
    tx = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    with fwAD.dual_level():
        y = fk.modulated_layer_norm(fwAD.make_dual(x, tx), shift, scale, weight, bias)
        ty = fwAD.unpack_dual(y).tangent
    _, ty_oracle = torch.func.jvp(lambda x: oracle(x, shift, scale, weight, bias, False), (x,), (tx,))
    torch.testing.assert_close(ty, ty_oracle, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", ["layer_affine", "rms"])
def test_opcheck(backend, variant, generator):
    *tensors, rms = make_inputs((2, 3, 16), torch.float32, variant, False, generator)
    x, shift, scale, weight, bias = tensors
    args = (x, shift, scale, weight, bias, 1e-6, rms)
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.modulated_norm.default, args)
        _, mean, rstd = torch.ops.fastgen.modulated_norm(*args)
        torch.library.opcheck(torch.ops.fastgen.modulated_norm_backward.default,
                              (torch.randn_like(x), x, shift, scale, weight, bias, mean, rstd, rms))
        grad_args = tuple(t.requires_grad_() if t is not None else None for t in tensors)
        torch.library.opcheck(torch.ops.fastgen.modulated_norm.default, (*grad_args, 1e-6, rms))


# Which tangents a call passes: x's alone (distillation's), the modulation's, the parameters',
# every one, and none at all (a zero tangent)
JVP_TANGENTS = {"x": ("tx",), "modulation": ("tshift", "tscale"), "parameters": ("tweight", "tbias"),
                "all": ("tx", "tshift", "tscale", "tweight", "tbias"), "none": ()}


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [*CPU_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tangents", list(JVP_TANGENTS))
def test_every_cpu_instruction_set_jvp_matches_the_formula(dtype, variant, tangents, cpu_isa, generator):
    """The C++ tangent kernel against the fp64 formula in every dtype and copy, with shift per
    token and scale per batch (their tangents alike) and D = 1000: a vector body and a scalar tail."""
    x, shift, _, weight, bias, rms = make_inputs((2, 3, 1000), dtype, variant, True, generator)
    scale = make_inputs((2, 3, 1000), dtype, variant, False, generator)[2]
    _, mean, rstd = mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    primals = {"tx": x, "tshift": shift, "tscale": scale, "tweight": weight, "tbias": bias}
    tangent = {name: torch.randn(p.shape, generator=generator).to(dtype)
               if name in JVP_TANGENTS[tangents] and p is not None else None for name, p in primals.items()}
    args = (x, scale, weight, bias, mean, rstd, rms, *tangent.values())
    ty = mn._extension_jvp(*args)
    expected = mn.reference_jvp(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
    assert ty.dtype == dtype and ty.shape == x.shape
    assert_close(ty, expected, dtype, "ty")


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16], ids=str)
def test_every_cpu_instruction_set_jvp_writes_a_narrower_dtype(narrow, cpu_isa, generator):
    """fp32 x with the tangent in autocast's dtype, as the norm + linear layer's rule asks for."""
    x, shift, scale, weight, bias, rms = make_inputs((2, 3, 1000), torch.float32, "layer_affine", False, generator)
    _, mean, rstd = mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    tx, tshift, tscale = (torch.randn(t.shape, generator=generator) for t in (x, shift, scale))
    args = (x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, None, None)
    ty = mn._extension_jvp(*args, narrow)
    assert ty.dtype == narrow
    assert_close(ty, mn.reference_jvp(*(t.double() if isinstance(t, torch.Tensor) else t for t in args)),
                 narrow, "ty")


@pytest.mark.skipif(not fk._extension.cpu_built(), reason="extension not built")
def test_jvp_kernel_bad_input_names_the_argument(generator):
    x, shift, scale, weight, bias, rms = make_inputs((2, 3, 8), torch.float32, "layer", False, generator)
    _, mean, rstd = mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    jvp = torch.ops.fastgen_C.modulated_norm_jvp
    with pytest.raises(RuntimeError, match="tx must be contiguous with x's shape"):
        jvp(x, scale, None, None, mean, rstd, rms, torch.randn(2, 3, 7), None, None, None, None)
    with pytest.raises(RuntimeError, match=r"tscale must be \(B, D\) or \(B, L, D\)"):
        jvp(x, scale, None, None, mean, rstd, rms, None, None, torch.randn(3, 8), None, None)
    with pytest.raises(RuntimeError, match="tweight needs a weight"):
        jvp(x, scale, None, None, mean, rstd, rms, None, None, None, torch.randn(8), None)
    with pytest.raises(RuntimeError, match="mean and rstd must be the forward's statistics"):
        jvp(x, scale, None, None, mean, rstd[:1], rms, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="out_dtype must be x's dtype"):
        jvp(x.double(), scale.double(), None, None, mean.double(), rstd.double(), rms, None, None, None, None, None,
            torch.float16)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 8)
    mod = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        fk.modulated_layer_norm(x[0], mod, mod)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fk.modulated_layer_norm(x.numpy(), mod, mod)
    with pytest.raises(TypeError, match="x must be float16"):
        fk.modulated_layer_norm(x.long(), mod, mod)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\) or \(2, 3, 8\)"):
        fk.modulated_layer_norm(x, torch.randn(2, 7), mod)  # D mismatch
    with pytest.raises(ValueError, match="scale must have shape"):
        fk.modulated_layer_norm(x, mod, torch.randn(1, 8))  # B mismatch
    with pytest.raises(TypeError, match="scale must have x's dtype"):
        fk.modulated_layer_norm(x, mod, mod.half())
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fk.modulated_rms_norm(x, mod, mod, torch.randn(9))
    with pytest.raises(ValueError, match="bias must have shape"):
        fk.modulated_layer_norm(x, mod, mod, None, torch.randn(2, 8))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fk.modulated_layer_norm(x, mod, mod, eps=0.0)
    with pytest.raises(ValueError, match="shift must be on x's device"):
        fk.modulated_layer_norm(x, mod.to("meta"), mod)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", ["layer_affine", "rms_weight"])
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
def test_backward_reads_a_narrower_gradient(backend, variant, per_token, generator):
    check_narrower_gradient(backend, variant, per_token, generator, "cpu")


def check_narrower_gradient(backend, variant, per_token, generator, device):
    """fp32 x with a bf16 upstream gradient (a linear layer's input gradient under autocast):
    the kernels read it as it is, with the results of its (exact) fp32 widening, in x's dtype."""
    x, shift, scale, weight, bias, rms = (t if not isinstance(t, torch.Tensor) else t.to(device) for t in
                                          make_inputs((2, 5, 72), torch.float32, variant, per_token, generator))
    _, mean, rstd = mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)
    grad = torch.randn(x.shape, generator=generator).to(device, torch.bfloat16)
    with fk.use_backend(backend):
        narrow = mn.backward_dispatcher(grad, x, shift, scale, weight, bias, mean, rstd, rms)
        wide = mn.backward_dispatcher(grad.float(), x, shift, scale, weight, bias, mean, rstd, rms)
    for got, want in zip(narrow, wide):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_statistics_match_oracle(generator):
    """mean and rstd, saved for the backward, are those of LayerNorm in fp32."""
    x, shift, scale, *_ = make_inputs((2, 3, 72), torch.bfloat16, "layer", False, generator)
    _, mean, rstd = mn.modulated_norm(x, shift, scale, None, None, 1e-6, False)
    x64 = x.double()
    torch.testing.assert_close(mean, x64.mean(-1).float())
    torch.testing.assert_close(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + 1e-6).float())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
@pytest.mark.parametrize("tangents", ["all", "x", "modulation"])
def test_jvp_kernel_matches_the_formula(backend, variant, per_token, tangents, generator):
    """The forward-mode rule's tangent (jvp_dispatcher; the Triton kernel on the interpreter) against
    the reference formula in fp64, with every subset of tangents the DiT passes (its parameters have
    none in distillation) plus weight and bias ones, odd D and a non-contiguous tangent; and
    forward-mode AD through the op, which runs it."""
    import torch.autograd.forward_ad as fwAD

    *tensors, rms = make_inputs((2, 3, 37), torch.float32, variant, per_token, generator)
    x, shift, scale, weight, bias = tensors
    _, mean, rstd = mn.reference_forward(x, shift, scale, weight, bias, 1e-6, rms)

    def tangent(t, wanted):
        return torch.randn(t.shape, generator=generator) if wanted and t is not None else None

    tx = torch.randn(3, 2, 37, generator=generator).transpose(0, 1) if tangents != "modulation" else None
    tshift, tscale = (tangent(t, tangents != "x") for t in (shift, scale))
    tweight, tbias = (tangent(t, tangents == "all") for t in (weight, bias))
    args = (x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, tweight, tbias)
    with fk.use_backend(backend):
        ty = mn.jvp_dispatcher(*args)
    wide = tuple(t.double() if isinstance(t, torch.Tensor) else t for t in args)
    expected = mn.reference_jvp(*wide)
    assert ty.dtype == x.dtype
    torch.testing.assert_close(ty.double(), expected, rtol=1e-5, atol=1e-5)

    primals = (x, shift, scale, weight, bias)
    duals = (tx, tshift, tscale, tweight, tbias)
    with fk.use_backend(backend), fwAD.dual_level():
        y = call(*(p if p is None or d is None else fwAD.make_dual(p, d) for p, d in zip(primals, duals)), rms)
        ty_ad = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(ty_ad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fk._extension.cpu_built(), reason="extension not built")
def test_forward_mode_ad_runs_the_cpu_tangent_kernel(generator):
    """Dual tensors in eager mode reach the C++ tangent kernel, not the formula's dozen ops."""
    import torch.autograd.forward_ad as fwAD
    from torch.profiler import profile

    x, shift, scale, weight, bias, _ = make_inputs((2, 3, 16), torch.float32, "layer_affine", False, generator)
    with profile() as prof, fk.use_backend("cpu"), fwAD.dual_level():
        fk.modulated_layer_norm(fwAD.make_dual(x, torch.randn_like(x)), shift, scale, weight, bias)
    assert "fastgen_C::modulated_norm_jvp" in {event.name for event in prof.events()}


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_through_the_tangent(backend, generator):
    """A tangent that backward-mode autograd records (grad mode on, inputs that require grad) is
    the formula's, differentiable: the kernels have no derivative, and their tangent would come
    back as a constant whose gradients are dropped."""
    import torch.autograd.forward_ad as fwAD

    x, shift, scale, weight, bias, _ = make_inputs((2, 3, 37), torch.float32, "layer_affine", True, generator)
    tx = torch.randn(x.shape, generator=generator, dtype=x.dtype)

    def gradients(backend_name):
        leaves = [t.detach().requires_grad_() for t in (x, shift, scale, weight, bias)]
        with fk.use_backend(backend_name), fwAD.dual_level():
            y = fk.modulated_layer_norm(fwAD.make_dual(leaves[0], tx), *leaves[1:])
            ty = fwAD.unpack_dual(y).tangent
        return torch.autograd.grad(ty.square().sum(), leaves, allow_unused=True)

    got, expected = gradients(backend), gradients("reference")
    # ty depends on x, scale and weight (not on shift)
    assert all(g is not None for g in got[0:1] + got[2:4])
    for g, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
