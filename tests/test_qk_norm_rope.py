"""qk_norm_rope: every backend against an fp64 oracle (F.rms_norm and an explicit rotation matrix),
the rotary conventions against complex multiplication on real frequency tables, gradients,
forward-mode AD (oracle and finite differences), gradcheck, strided heads, opcheck and bad input."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import CPU_DTYPES, cpu_backends, cpu_isas
from tolerances import assert_close

import fastgen_kernels as fk
from fastgen_kernels import _extension, backends

qnr = fk.ops.OP_MODULES["qk_norm_rope"]

# (B, L, H, Dh): Dh in {64, 72, 128}; odd L (77); L = 1; B = 1.
SHAPES = [(2, 77, 2, 64), (1, 1, 3, 72), (1, 6, 2, 128)]
# name: (rotary, interleaved, weights). Without rotary, k is longer than q (Lq != Lk).
VARIANTS = {
    "rope_interleaved": (True, True, True),
    "rope_half": (True, False, True),
    "rope_no_weights": (True, False, False),
    "norm_only": (False, True, True),
    "norm_only_no_weights": (False, True, False),
}


def rotation_matrix(Dh, interleaved):
    """R with rot(v) = R @ v, built entry by entry: each pair (a, b) -> (-b, a)."""
    R = torch.zeros(Dh, Dh, dtype=torch.float64)
    for i in range(Dh // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + Dh // 2)
        R[a, b] = -1.0
        R[b, a] = 1.0
    return R


def oracle(q, k, q_weight, k_weight, cos, sin, interleaved, eps=1e-6):
    """The op in plain torch (fp64 when given fp64 tensors)."""
    def one(x, w):
        n = F.rms_norm(x, (x.shape[-1],), w, eps)
        if cos is None:
            return n
        R = rotation_matrix(x.shape[-1], interleaved).to(x)
        return n * cos.to(x.dtype)[:, None] + (n @ R.T) * sin.to(x.dtype)[:, None]

    return one(q, q_weight), one(k, k_weight)


def make_inputs(shape, dtype, variant, generator, device="cpu"):
    """(q, k, q_weight, k_weight, cos, sin, interleaved); cos and sin from independent random
    angles per entry, so a kernel that mixes up the two entries of a pair fails."""
    B, L, H, Dh = shape
    rope, interleaved, weights = VARIANTS[variant]
    rand = lambda *s: torch.randn(*s, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    q = rand(B, L, H, Dh) * 2 + 0.5  # an rms far from 1
    k = rand(B, L if rope else L + 3, H, Dh) * 2 - 0.5
    cos = sin = None
    if rope:
        angles = torch.rand(L, Dh, generator=generator, dtype=torch.float64) * 6.3
        cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    w = (rand(Dh), rand(Dh)) if weights else (None, None)
    return (q, k, *w, cos, sin, interleaved)


def split(inputs):
    """(tensors that take gradients, a function of them returning (q_out, k_out) via `fn`)."""
    q, k, q_weight, k_weight, cos, sin, interleaved = inputs
    present = [i for i, t in enumerate((q, k, q_weight, k_weight)) if t is not None]

    def bind(fn):
        def wrapped(*args):
            full = [q, k, q_weight, k_weight]
            for i, a in zip(present, args):
                full[i] = a
            return fn(*full, cos, sin, interleaved)
        return wrapped

    return [(q, k, q_weight, k_weight)[i] for i in present], bind


def call(q, k, q_weight, k_weight, cos, sin, interleaved):
    return fk.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, interleaved=interleaved)


def check_against_oracle(backend, inputs, dtype, generator):
    tensors, bind = split(inputs)
    leaves = [t.detach().requires_grad_() for t in tensors]
    with fk.use_backend(backend):
        outs = bind(call)(*leaves)
        grads_out = [torch.randn(o.shape, generator=generator).to(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, grads_out)
    wide = [t.detach().double().requires_grad_() for t in tensors]
    outs64 = bind(oracle)(*wide)
    grads64 = torch.autograd.grad(outs64, wide, [g.double() for g in grads_out])
    assert [out.shape for out in outs] == [x.shape for x in inputs[:2]]
    assert all(out.is_contiguous() for out in outs)
    names = ["q_out", "k_out"] + [
        name for name, t in zip(["dq", "dk", "dq_weight", "dk_weight"], inputs) if t is not None]
    for name, got, expected in zip(names, [*outs, *grads], [*outs64, *grads64], strict=True):
        assert got.dtype == dtype, name
        assert_close(got, expected, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward_match_oracle(backend, dtype, shape, variant, generator):
    check_against_oracle(backend, make_inputs(shape, dtype, variant, generator), dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_cpu_instruction_set_matches_oracle(dtype, variant, cpu_isa, generator):
    # Dh = 72, 36 rotary pairs: a vector body and a scalar tail in every copy
    check_against_oracle("cpu", make_inputs((1, 5, 3, 72), dtype, variant, generator), dtype, generator)


def frequency_tables(L, Dh, interleaved):
    """Real RoPE: angle_{l,i} = l * 10000^(-2i/Dh), as (angles (L, Dh/2), cos, sin (L, Dh))."""
    freqs = 10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angles = torch.arange(L, dtype=torch.float64)[:, None] * freqs
    expand = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: t.repeat(1, 2))
    return angles, expand(angles.cos()), expand(angles.sin())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_conventions_match_complex_multiplication(backend, interleaved, generator):
    """Flux / diffusers (interleaved pairs as complex numbers) and GPT-NeoX (halves as real and
    imaginary parts): rotating by the angle is multiplying by exp(i angle)."""
    B, L, H, Dh = 2, 9, 3, 64
    q = torch.randn(B, L, H, Dh, generator=generator, dtype=torch.float64)
    k = torch.randn(B, L, H, Dh, generator=generator, dtype=torch.float64)
    angles, cos, sin = frequency_tables(L, Dh, interleaved)
    dtype = torch.float32
    with fk.use_backend(backend):
        outs = fk.qk_norm_rope(q.to(dtype), k.to(dtype), None, None, cos, sin, interleaved=interleaved)
    rotor = torch.polar(torch.ones_like(angles), angles)[:, None]  # (L, 1, Dh/2)
    for out, x in zip(outs, (q, k)):
        n = F.rms_norm(x.to(dtype).double(), (Dh,), eps=1e-6)
        if interleaved:
            expected = torch.view_as_real(torch.view_as_complex(n.unflatten(-1, (-1, 2))) * rotor).flatten(-2)
        else:
            z = torch.complex(n[..., : Dh // 2], n[..., Dh // 2:]) * rotor
            expected = torch.cat((z.real, z.imag), -1)
        assert_close(out, expected, dtype, "rotated")


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_heads(backend, generator):
    """q and k sliced from a fused (B, L, 3, H, Dh) qkv projection, k's heads transposed, a
    non-contiguous upstream gradient, strided weights, tables in other dtypes and layouts."""
    B, L, H, Dh = 2, 7, 3, 72
    qkv = torch.randn(B, L, 3, H, Dh, generator=generator) * 2
    q, _, _ = qkv.unbind(2)
    k = torch.randn(B, H, L, Dh, generator=generator).transpose(1, 2)
    angles = torch.rand(Dh, L, generator=generator, dtype=torch.float64) * 6.3
    cos, sin = angles.cos().t(), angles.sin().t().bfloat16()  # non-contiguous fp64; bf16
    weights = torch.randn(Dh, 2, generator=generator).unbind(1)  # two strided (Dh,) columns
    for interleaved in (True, False):
        inputs = (q, k, *weights, cos, sin, interleaved)
        assert not (q.is_contiguous() or k.is_contiguous() or cos.is_contiguous())
        check_against_oracle(backend, inputs, torch.float32, generator)
    # head vectors themselves strided (copied by the backends) and a strided upstream gradient
    q_strided = torch.randn(B, L, H, 2 * Dh, generator=generator)[..., ::2]
    leaves = [t.requires_grad_() for t in (q_strided, k)]
    grad_out = torch.randn(B, L, H, 2 * Dh, generator=generator)[..., ::2]
    with fk.use_backend(backend):
        q_out, _ = fk.qk_norm_rope(*leaves, None, None, cos, sin)
        (dq,) = torch.autograd.grad(q_out, leaves[0], grad_out)
    wide = q_strided.double().requires_grad_()
    q64, _ = oracle(wide, k.double(), None, None, cos.double(), sin.double(), True)
    (dq64,) = torch.autograd.grad(q64, wide, grad_out.double())
    assert_close(q_out, q64, torch.float32, "q_out")
    assert_close(dq, dq64, torch.float32, "dq")


def extension_or_reference():
    marks = [] if _extension.cpu_built() else [pytest.mark.skip(reason="extension not built")]
    return [pytest.param("cpu", marks=marks), "reference"]


@pytest.mark.parametrize("backend", extension_or_reference())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp64_matches_oracle_and_gradcheck(backend, variant, generator):
    inputs = make_inputs((2, 3, 2, 8), torch.float64, variant, generator)
    check_against_oracle(backend, inputs, torch.float64, generator)
    tensors, bind = split(inputs)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(bind(call), [t.requires_grad_() for t in tensors])


@pytest.mark.parametrize("backend", extension_or_reference())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jvp_matches_finite_differences_and_oracle(backend, variant, generator):
    inputs = make_inputs((2, 3, 2, 10), torch.float64, variant, generator)
    primals, bind = split(inputs)
    tangents = tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in primals)
    fn = bind(call)
    with fk.use_backend(backend):
        outs, touts = torch.func.jvp(fn, tuple(primals), tangents)
        h = 1e-6
        plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
        minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
    _, touts_oracle = torch.func.jvp(bind(oracle), tuple(primals), tangents)
    for tout, p, m, tout_oracle in zip(touts, plus, minus, touts_oracle):
        torch.testing.assert_close(tout, (p - m) / (2 * h), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(tout, tout_oracle, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
def test_jvp_low_precision(backend, generator):
    """The forward-mode rule on the rstd a kernel saved, in fp32, against the fp64 oracle."""
    inputs = make_inputs((1, 5, 2, 72), torch.float32, "rope_interleaved", generator)
    primals, bind = split(inputs)
    tangents = tuple(torch.randn(t.shape, generator=generator) for t in primals)
    with fk.use_backend(backend):
        _, touts = torch.func.jvp(bind(call), tuple(primals), tangents)
    _, touts64 = torch.func.jvp(bind(oracle), tuple(p.double() for p in primals),
                                tuple(t.double() for t in tangents))
    for tout, tout64 in zip(touts, touts64):
        assert tout.dtype == torch.float32
        assert_close(tout, tout64, torch.float32, "tangent")


def test_forward_ad_with_partial_tangents(generator):
    """forward_ad duals on some inputs only: a tangent for k alone, then for q_weight alone."""
    import torch.autograd.forward_ad as fwAD

    q, k, q_weight, k_weight, cos, sin, interleaved = make_inputs(
        (2, 4, 2, 16), torch.float64, "rope_half", generator)
    tk = torch.randn(k.shape, generator=generator, dtype=k.dtype)
    tw = torch.randn(q_weight.shape, generator=generator, dtype=q_weight.dtype)
    with fwAD.dual_level():
        q_out, k_out = fk.qk_norm_rope(q, fwAD.make_dual(k, tk), q_weight, k_weight, cos, sin,
                                       interleaved=interleaved)
        tq_out, tk_out = fwAD.unpack_dual(q_out).tangent, fwAD.unpack_dual(k_out).tangent
        q_out, _ = fk.qk_norm_rope(q, k, fwAD.make_dual(q_weight, tw), k_weight, cos, sin,
                                   interleaved=interleaved)
        tq_from_weight = fwAD.unpack_dual(q_out).tangent
    assert tq_out is None or torch.count_nonzero(tq_out) == 0
    _, (_, tk_oracle) = torch.func.jvp(
        lambda k: oracle(q, k, q_weight, k_weight, cos, sin, interleaved), (k,), (tk,))
    torch.testing.assert_close(tk_out, tk_oracle, rtol=1e-10, atol=1e-10)
    _, (tq_oracle, _) = torch.func.jvp(
        lambda w: oracle(q, k, w, k_weight, cos, sin, interleaved), (q_weight,), (tw,))
    torch.testing.assert_close(tq_from_weight, tq_oracle, rtol=1e-10, atol=1e-10)


# Which tangents a call passes: q's and k's (distillation's), the weights', every one, k's alone
JVP_TANGENTS = {"heads": ("tq", "tk"), "weights": ("tq_weight", "tk_weight"),
                "all": ("tq", "tk", "tq_weight", "tk_weight"), "k": ("tk",)}


def jvp_args(inputs, tangents, generator):
    """The forward-mode rule's arguments (q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd,
    interleaved, tq, tk, tq_weight, tk_weight) for ``inputs``, with random ``tangents``."""
    q, k, q_weight, k_weight, cos, sin, interleaved = inputs
    _, _, q_rstd, k_rstd = qnr.reference_forward(q, k, q_weight, k_weight, cos, sin, 1e-6, interleaved)
    primals = {"tq": q, "tk": k, "tq_weight": q_weight, "tk_weight": k_weight}
    given = {name: torch.randn(p.shape, generator=generator).to(p)
             if name in JVP_TANGENTS[tangents] and p is not None else None for name, p in primals.items()}
    return (q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, interleaved, *given.values())


def check_jvp_kernel(backend, args, dtype):
    with fk.use_backend(backend):
        touts = qnr.jvp_dispatcher(*args)
    expected = qnr.reference_jvp(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
    for name, tout, x, tout64 in zip(("tq_out", "tk_out"), touts, args[:2], expected):
        assert tout.dtype == dtype and tout.shape == x.shape, name
        assert tout.is_contiguous() or backend == "reference", name  # the kernels write contiguous rows
        assert_close(tout, tout64, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tangents", list(JVP_TANGENTS))
def test_jvp_kernel_matches_the_formula(backend, variant, tangents, generator):
    """The forward-mode rule's tangents (jvp_dispatcher; the Triton kernel on the interpreter)
    against the formula in fp64; then q and its tangent sliced from fused qkv projections, k's
    heads transposed (the kernels take their B, L, H strides); and forward-mode AD through the op,
    which runs the kernel."""
    inputs = make_inputs((2, 5, 3, 72), torch.float32, variant, generator)
    args = jvp_args(inputs, tangents, generator)
    check_jvp_kernel(backend, args, torch.float32)
    q, k, *rest = args
    B, L, H, Dh = q.shape
    strided_q = torch.randn(B, L, 3, H, Dh, generator=generator)[:, :, 1]
    strided_tq = torch.randn(B, L, 3, H, Dh, generator=generator)[:, :, 2]
    strided_k = k.transpose(1, 2).contiguous().transpose(1, 2)
    _, _, q_rstd, _ = qnr.reference_forward(strided_q, strided_k, *inputs[2:6], 1e-6, inputs[6])
    strided = [strided_q, strided_k, *rest]
    strided[6] = q_rstd
    strided[9] = None if args[9] is None else strided_tq
    check_jvp_kernel(backend, tuple(strided), torch.float32)

    q, k, q_weight, k_weight, cos, sin, interleaved = inputs
    tq, tk, tq_weight, tk_weight = args[9:]
    primals = (q, k, q_weight, k_weight)
    with fk.use_backend(backend), fwAD.dual_level():
        outs = call(*(p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, args[9:])),
                    cos, sin, interleaved)
        touts = [fwAD.unpack_dual(out).tangent for out in outs]
    expected = qnr.reference_jvp(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
    for tout, tout64 in zip(touts, expected):
        if tout is None:  # no tangent reached this output
            assert torch.count_nonzero(tout64) == 0
        else:
            assert_close(tout, tout64, torch.float32, "forward-mode AD")


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [*CPU_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_cpu_instruction_set_jvp_matches_the_formula(dtype, variant, cpu_isa, generator):
    # Dh = 72, 36 rotary pairs: a vector body and a scalar tail in every copy
    args = jvp_args(make_inputs((1, 5, 3, 72), dtype, variant, generator), "all", generator)
    check_jvp_kernel("cpu", args, dtype)


@pytest.mark.skipif(not _extension.cpu_built(), reason="extension not built")
def test_jvp_kernel_bad_input_names_the_argument(generator):
    q, k, w, _, cos, sin, interleaved = make_inputs((1, 3, 2, 8), torch.float32, "rope_interleaved", generator)
    _, _, q_rstd, k_rstd = qnr.reference_forward(q, k, w, None, cos, sin, 1e-6, interleaved)
    jvp = torch.ops.fastgen_C.qk_norm_rope_jvp
    stats = (q_rstd, k_rstd, interleaved)
    with pytest.raises(RuntimeError, match="tq must have its primal's shape"):
        jvp(q, k, w, None, cos, sin, *stats, torch.randn(1, 3, 2, 6), None, None, None)
    with pytest.raises(RuntimeError, match="tk's head vectors must be contiguous"):
        jvp(q, k, w, None, cos, sin, *stats, None, torch.randn(1, 3, 2, 16)[..., ::2], None, None)
    with pytest.raises(RuntimeError, match="tk_weight needs a weight"):
        jvp(q, k, w, None, cos, sin, *stats, None, None, None, torch.randn(8))
    with pytest.raises(RuntimeError, match="rstd must be the forward's statistics"):
        jvp(q, k, w, None, cos, sin, q_rstd[:, :1], k_rstd, interleaved, q, None, None, None)


def run_opcheck(backend, inputs):
    """torch.library.opcheck of the forward op (without and with grad) and the backward op."""
    q, k, q_weight, k_weight, cos, sin, interleaved = inputs
    args = (q, k, q_weight, k_weight, cos, sin, 1e-6, interleaved)
    forward = torch.ops.fastgen.qk_norm_rope.default
    with fk.use_backend(backend):
        torch.library.opcheck(forward, args)
        _, _, q_rstd, k_rstd = forward(*args)
        torch.library.opcheck(torch.ops.fastgen.qk_norm_rope_backward.default,
                              (torch.randn_like(q), torch.randn_like(k), q, k, q_weight, k_weight,
                               cos, sin, q_rstd, k_rstd, interleaved))
        leaves = [t if t is None else t.detach().requires_grad_() for t in args[:4]]
        torch.library.opcheck(forward, (*leaves, *args[4:]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", ["rope_interleaved", "norm_only_no_weights"])
def test_opcheck(backend, variant, generator):
    run_opcheck(backend, make_inputs((2, 3, 2, 16), torch.float32, variant, generator))


@pytest.mark.parametrize("backend", cpu_backends())
def test_rstd_matches_oracle(backend, generator):
    """The statistics saved for the backward: rstd of every head vector, fp32, shape (B, L, H)."""
    q, k, *_ = make_inputs((2, 3, 2, 72), torch.bfloat16, "norm_only", generator)
    with fk.use_backend(backend):
        _, _, q_rstd, k_rstd = torch.ops.fastgen.qk_norm_rope(q, k, None, None, None, None, 1e-6, True)
    for rstd, x in ((q_rstd, q), (k_rstd, k)):
        assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:3]
        torch.testing.assert_close(rstd, torch.rsqrt(x.double().square().mean(-1) + 1e-6).float())


def test_wide_heads_fall_back_from_gpu_kernels():
    """Dh > 256 is beyond the GPU kernels: a forced Triton run says why; `cpu` still runs it."""
    q = torch.randn(1, 2, 1, 300)
    assert "Dh = 300 exceeds the GPU kernels' limit of 256" in qnr._gpu_support(q, q)
    if backends.triton_installed() and backends.interpreting_triton():
        with fk.use_backend("triton"), pytest.raises(RuntimeError, match="Dh = 300 exceeds"):
            fk.qk_norm_rope(q, q, None, None)
    out, _ = fk.qk_norm_rope(q, q, None, None)
    torch.testing.assert_close(out, F.rms_norm(q, (300,), eps=1e-6))


def test_empty_input_falls_back_to_reference():
    q = torch.randn(0, 3, 2, 8)
    assert qnr.forward_dispatcher.select(q, q, None, None, None, None, 1e-6, True) == "reference"
    q_out, k_out = fk.qk_norm_rope(q, q, None, None)
    assert q_out.shape == k_out.shape == q.shape


def test_bad_input_names_the_argument():
    q = torch.randn(2, 3, 4, 8)
    w = torch.randn(8)
    cos = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"q must have shape \(B, L, H, Dh\)"):
        fk.qk_norm_rope(q[0], q, w, w)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fk.qk_norm_rope(q, q.numpy(), w, w)
    with pytest.raises(TypeError, match="q must be float16"):
        fk.qk_norm_rope(q.long(), q, w, w)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 5, 4, 8\)"):
        fk.qk_norm_rope(q, torch.randn(2, 5, 3, 8), w, w)  # H mismatch
    with pytest.raises(TypeError, match="k must have q's dtype"):
        fk.qk_norm_rope(q, q.half(), w, w)
    with pytest.raises(ValueError, match="k must have q's device"):
        fk.qk_norm_rope(q, q.to("meta"), w, w)
    with pytest.raises(ValueError, match=r"q_weight must have shape \(8,\)"):
        fk.qk_norm_rope(q, q, torch.randn(9), w)
    with pytest.raises(TypeError, match="k_weight must have q's dtype"):
        fk.qk_norm_rope(q, q, w, w.double())
    with pytest.raises(ValueError, match="sin is None but cos is given"):
        fk.qk_norm_rope(q, q, w, w, cos)
    with pytest.raises(ValueError, match="cos is None but sin is given"):
        fk.qk_norm_rope(q, q, w, w, None, cos)
    with pytest.raises(TypeError, match="sin must be float16"):
        fk.qk_norm_rope(q, q, w, w, cos, cos.long())
    with pytest.raises(ValueError, match=r"cos must have shape \(L, Dh\) = \(3, 8\), got \(3, 4\)"):
        fk.qk_norm_rope(q, q, w, w, cos[:, :4], cos)
    with pytest.raises(ValueError, match="sin must have shape"):
        fk.qk_norm_rope(q, q, w, w, cos, cos[:2])
    with pytest.raises(ValueError, match="cos and sin need q and k of one length.*Lk = 5"):
        fk.qk_norm_rope(q, torch.randn(2, 5, 4, 8), w, w, cos, cos)
    with pytest.raises(ValueError, match="even head dim, q has Dh = 7"):
        odd = torch.randn(2, 3, 4, 7)
        fk.qk_norm_rope(odd, odd, None, None, cos[:, :7], cos[:, :7])
    with pytest.raises(ValueError, match="sin must not require grad"):
        fk.qk_norm_rope(q, q, w, w, cos, cos.clone().requires_grad_())
    with pytest.raises(ValueError, match="cos must be on q's device"):
        fk.qk_norm_rope(q, q, w, w, cos.to("meta"), cos)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fk.qk_norm_rope(q, q, w, w, eps=-1.0)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        fk.qk_norm_rope(q, q, w, w, cos, cos, interleaved="yes")



def test_rotary_tables_with_a_tangent_raise(generator):
    """Tangents of cos and sin were dropped in silence (backward mode refuses tables that require
    grad); a table captured inside torch.func.jvp, or a plain one beside dual q and k, is fine."""
    q, k = (torch.randn(1, 4, 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    cos, sin = (torch.randn(4, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    with pytest.raises(ValueError, match="cos must not carry a forward-mode tangent"):
        torch.func.jvp(lambda c: fk.qk_norm_rope(q, k, None, None, cos=c, sin=sin)[0], (cos,), (torch.ones_like(cos),))
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="sin must not carry a forward-mode tangent"):
            fk.qk_norm_rope(q, k, None, None, cos=cos, sin=fwAD.make_dual(sin, torch.ones_like(sin)))
        out = fk.qk_norm_rope(fwAD.make_dual(q, torch.ones_like(q)), k, None, None, cos=cos, sin=sin)[0]
        assert fwAD.unpack_dual(out).tangent is not None
    _, tangent = torch.func.jvp(lambda a: fk.qk_norm_rope(a, k, None, None, cos=cos, sin=sin)[0], (q,), (torch.ones_like(q),))
    assert tangent.abs().max() > 0


@pytest.mark.skipif(not _extension.cpu_built(), reason="extension not built")
def test_forward_mode_ad_runs_the_cpu_tangent_kernel(generator):
    """Dual tensors in eager mode reach the C++ tangent kernel, not the formula's dozen ops."""
    from torch.profiler import profile

    q, k, q_weight, k_weight, cos, sin, interleaved = make_inputs((1, 4, 2, 8), torch.float32, "rope_half", generator)
    with profile() as prof, fk.use_backend("cpu"), fwAD.dual_level():
        fk.qk_norm_rope(fwAD.make_dual(q, torch.randn_like(q)), k, q_weight, k_weight, cos, sin,
                        interleaved=interleaved)
    assert "fastgen_C::qk_norm_rope_jvp" in {event.name for event in prof.events()}


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_through_the_tangents(backend, generator):
    """Tangents that backward-mode autograd records (grad mode on, inputs that require grad) are
    the formula's, differentiable: the kernels have no derivative, and their tangents would come
    back as constants whose gradients are dropped."""
    q, k, q_weight, k_weight, cos, sin, interleaved = make_inputs((1, 4, 2, 8), torch.float32, "rope_half", generator)
    tq, tk = (torch.randn(t.shape, generator=generator) for t in (q, k))

    def gradients(backend_name):
        leaves = [t.detach().requires_grad_() for t in (q, k, q_weight, k_weight)]
        with fk.use_backend(backend_name), fwAD.dual_level():
            outs = fk.qk_norm_rope(fwAD.make_dual(leaves[0], tq), fwAD.make_dual(leaves[1], tk), *leaves[2:],
                                   cos, sin, interleaved=interleaved)
            touts = [fwAD.unpack_dual(out).tangent for out in outs]
        return torch.autograd.grad(sum(t.square().sum() for t in touts), leaves)

    for got, expected in zip(gradients(backend), gradients("reference")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
