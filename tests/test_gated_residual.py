"""gated_residual: every backend against an fp64 oracle, gradients, forward-mode AD, opcheck and
bad input."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import CPU_DTYPES, cpu_backends, cpu_isas, extension_backends
from tolerances import assert_close

import fastgen_kernels as fk
from fastgen_kernels.backends import interpreting_triton
from fastgen_kernels.ops.linear import parameters_without_tangents

SHAPES = [(2, 5, 72), (1, 1, 1000), (2, 1, 1152), (1, 9, 1152)]


def make_inputs(shape, dtype, per_token, generator):
    B, L, D = shape
    rand = lambda *s: torch.randn(*s, generator=generator).to(dtype)  # noqa: E731
    return rand(B, L, D), rand(B, L, D), rand(B, L, D) if per_token else rand(B, D)


def oracle(x, y, gate):
    return x + (gate.unsqueeze(1) if gate.dim() == 2 else gate) * y


def check_against_oracle(backend, inputs, dtype, generator):
    leaves = [t.detach().requires_grad_() for t in inputs]
    with fk.use_backend(backend):
        out = fk.gated_residual(*leaves)
        grad_out = torch.randn(out.shape, generator=generator).to(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    out64 = oracle(*wide)
    grads64 = torch.autograd.grad(out64, wide, grad_out.double())
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, out64, dtype, "out")
    for name, grad, grad64 in zip(["dx", "dy", "dgate"], grads, grads64):
        assert_close(grad, grad64, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_forward_backward_match_oracle(backend, dtype, shape, per_token, generator):
    check_against_oracle(backend, make_inputs(shape, dtype, per_token, generator), dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_every_cpu_instruction_set_matches_oracle(dtype, per_token, cpu_isa, generator):
    # D = 1000: a vector body and a scalar tail in every copy
    check_against_oracle("cpu", make_inputs((2, 3, 1000), dtype, per_token, generator), dtype, generator)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_every_cpu_instruction_set_reads_narrower_operands(per_token, cpu_isa, generator):
    test_narrower_y_and_gate_are_read_as_given_and_y_kept("cpu", per_token, generator)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend, generator):
    B, L, D = 3, 4, 72
    x = torch.randn(L, B, D, generator=generator).transpose(0, 1)
    y = torch.randn(B, L, 2 * D, generator=generator)[..., ::2]
    gate = torch.randn(D, B, generator=generator).t()
    check_against_oracle(backend, (x, y, gate), torch.float32, generator)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_fp64_gradcheck_and_jvp(backend, per_token, generator):
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    inputs = make_inputs((2, 3, 7), torch.float64, per_token, generator)
    tangents = tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in inputs)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(fk.gated_residual, [t.requires_grad_() for t in inputs])
        _, tout = torch.func.jvp(fk.gated_residual, tuple(t.detach() for t in inputs), tangents)
    _, tout_oracle = torch.func.jvp(oracle, tuple(t.detach() for t in inputs), tangents)
    torch.testing.assert_close(tout, tout_oracle, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_opcheck(backend, per_token, generator):
    x, y, gate = make_inputs((2, 3, 16), torch.float32, per_token, generator)
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.gated_residual.default, (x, y, gate))
        torch.library.opcheck(torch.ops.fastgen.gated_residual_backward.default,
                              (torch.randn_like(x), y, gate))
        torch.library.opcheck(torch.ops.fastgen.gated_residual.default,
                              (x.requires_grad_(), y.requires_grad_(), gate.requires_grad_()))
        # the tangent's form: a second term, bf16 operands on an fp32 x
        narrow = [t.detach().bfloat16().requires_grad_() for t in (y, gate, y * 2, gate / 2)]
        torch.library.opcheck(torch.ops.fastgen.gated_residual.default, (x, *narrow))
        torch.library.opcheck(torch.ops.fastgen.gated_residual_backward.default,
                              (torch.randn_like(x), *(t.detach() for t in narrow[:2])))


@pytest.mark.parametrize("backend", extension_backends())
def test_second_term_gradcheck(backend, generator):
    """The op's optional second term (what the tangent rule calls): values and gradients of all
    five inputs in fp64, one gate per batch and one per token."""
    x, y, gate = make_inputs((2, 3, 7), torch.float64, False, generator)
    _, y2, gate2 = make_inputs((2, 3, 7), torch.float64, True, generator)
    inputs = [t.requires_grad_() for t in (x, y, gate, y2, gate2)]
    with fk.use_backend(backend):
        out = torch.ops.fastgen.gated_residual(*inputs)
        assert torch.autograd.gradcheck(torch.ops.fastgen.gated_residual, inputs)
    expected = oracle(x, y, gate) + oracle(torch.zeros_like(x), y2, gate2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_operands_of_mixed_precisions_are_read_as_given(backend):
    """fp16 x with bf16 y (no pair of dtypes the kernels take): computed in fp32 from each input
    as given, as every backend does (the cpu and cuda ones by widening all to fp32), not y
    narrowed to x's fp16 first (7e4 overflows fp16; 0.5 * 7e4 does not)."""
    x = torch.zeros(1, 2, 8, dtype=torch.float16)
    y, gate = torch.full((1, 2, 8), 7e4, dtype=torch.bfloat16), torch.full((1, 8), 0.5, dtype=torch.bfloat16)
    with fk.use_backend(backend):
        out = fk.gated_residual(x.requires_grad_(), y.requires_grad_(), gate.requires_grad_())
        grads = torch.autograd.grad(out, (x, y, gate), torch.ones_like(out))
    torch.testing.assert_close(out, (0.5 * y.float()).half())
    assert [g.dtype for g in grads] == [torch.float16, torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(grads[2].float(), torch.full((1, 8), 2 * 7e4).bfloat16().float())


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="gated_residual: y2 and gate2 come together, got only y2"):
        torch.ops.fastgen.gated_residual(x, x, x[:, 0], x, None)
    with pytest.raises(ValueError, match=r"gated_residual: y2 must have shape \(2, 3, 8\)"):
        torch.ops.fastgen.gated_residual(x, x, x[:, 0], x[:, :2], x[:, 0])
    with pytest.raises(ValueError, match="gated_residual: gate2 must have shape"):
        torch.ops.fastgen.gated_residual(x, x, x[:, 0], x, x[0])
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3, 8\)"):
        fk.gated_residual(x, x[:, :2], torch.randn(2, 8))
    with pytest.raises(ValueError, match="gate must have shape"):
        fk.gated_residual(x, x, torch.randn(2, 9))
    with pytest.raises(TypeError, match="gate must be float16"):
        fk.gated_residual(x, x, torch.randn(2, 8).int())
    with pytest.raises(TypeError, match="y must be float16"):
        fk.gated_residual(x, x.int(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        fk.gated_residual(x[0], x[0], torch.randn(2, 8))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_narrower_y_and_gate_are_read_as_given_and_y_kept(backend, per_token, generator):
    """Autocast's case, bf16 y and gate on an fp32 residual stream: the op's values on the widened
    inputs, gradients in each input's dtype, forward mode too, and a backward that holds y itself
    rather than a widened copy (what the DiT's step saves per block)."""
    x, y, gate = make_inputs((2, 5, 72), torch.float32, per_token, generator)
    leaves = [x.requires_grad_(), y.bfloat16().requires_grad_(), gate.bfloat16().requires_grad_()]
    saved = []
    with fk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                          lambda t: t):
        out = fk.gated_residual(*leaves)
    g = torch.randn(out.shape, generator=generator)
    wide = [t.detach().float().requires_grad_() for t in leaves]
    with fk.use_backend(backend):
        expected = fk.gated_residual(*wide)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    for got, want, leaf in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, wide, g), leaves):
        assert got.dtype == leaf.dtype
        assert_rounded_from(got, want, backend)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    tangents = tuple(torch.randn(t.shape, generator=generator).to(t.dtype) for t in leaves)
    primals = tuple(t.detach() for t in leaves)
    with fk.use_backend(backend):
        _, tout = torch.func.jvp(fk.gated_residual, primals, tangents)
        _, tout_wide = torch.func.jvp(fk.gated_residual, tuple(t.float() for t in primals),
                                      tuple(t.float() for t in tangents))
    assert tout.dtype == torch.float32 and torch.equal(tout, tout_wide)


@pytest.mark.parametrize("backend", cpu_backends()[:2])  # the kernels: cpu, triton
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_one_pass_step_reads_narrow_operands_without_copies(backend, per_token, generator):
    check_one_pass_step(backend, per_token, generator, "cpu")


def check_one_pass_step(backend, per_token, generator, device):
    """The sCM step's case (forward-mode AD with gradients, inside parameters_without_tangents):
    fp32 x, bf16 y and gate, each with a tangent. The kernels read y, gate and their tangents as
    they are (no (B, L, D) conversion anywhere: forward, tangent, backward), the tangent
    tx + gate ty + tgate y is one kernel call, and all match the fp64 oracle."""
    shape = (2, 5, 72)
    x, y, gate = make_inputs(shape, torch.float32, per_token, generator)
    leaves = [t.to(device).requires_grad_() for t in (x, y.bfloat16(), gate.bfloat16())]
    tangents = [torch.randn(t.shape, generator=generator).to(device, t.dtype) for t in leaves]
    g = torch.randn(shape, generator=generator).to(device)
    with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof,
          fk.use_backend(backend), parameters_without_tangents(), fwAD.dual_level()):
        out = fk.gated_residual(*(fwAD.make_dual(t, tt) for t, tt in zip(leaves, tangents)))
        tout = fwAD.unpack_dual(out).tangent
        grads = torch.autograd.grad(out, leaves, g)
    conversions = [e for e in prof.events() if e.name in ("aten::copy_", "aten::_to_copy")
                   and e.input_shapes and tuple(e.input_shapes[0]) == shape]
    assert not conversions, [e.name for e in conversions]
    if backend in ("cpu", "cuda"):
        assert [e.name for e in prof.events()].count("fastgen_C::gated_residual_forward") == 2  # primal, tangent
    wide = [t.detach().double() for t in leaves]
    _, tout64 = torch.func.jvp(oracle, tuple(wide), tuple(t.double() for t in tangents))
    assert tout.dtype == torch.float32 and tout.grad_fn is None
    assert_close(tout, tout64, torch.float32, "tangent")
    grads64 = torch.autograd.grad(oracle(*(t.requires_grad_() for t in wide)), wide, g.double())
    for name, got, want, leaf in zip(["dx", "dy", "dgate"], grads, grads64, leaves):
        assert got.dtype == leaf.dtype
        assert_close(got, want, got.dtype, name)


def assert_rounded_from(got, want, backend):
    """got is want (fp32) rounded to got's dtype: exactly, except where Triton's interpreter
    narrows, which truncates (round toward zero) where a GPU rounds to nearest even."""
    if backend == "triton" and interpreting_triton():
        torch.testing.assert_close(got.float(), want, rtol=torch.finfo(got.dtype).eps, atol=0)
    else:
        assert torch.equal(got, want.to(got.dtype))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("per_token", [False, True], ids=["gate_BD", "gate_BLD"])
def test_second_derivatives(backend, per_token, generator):
    """A create_graph=True backward (a gradient penalty through a DiT) differentiates again, on the
    C++ autograd path (cpu backend) and the Python one: gradgradcheck in fp64 and the oracle's
    second derivative."""
    if backend == "triton":
        pytest.skip("fp64: the kernels' backends read float16, bfloat16 and float32")
    inputs = [t.requires_grad_() for t in make_inputs((2, 3, 7), torch.float64, per_token, generator)]
    with fk.use_backend(backend):
        assert torch.autograd.gradgradcheck(fk.gated_residual, inputs)
        dy = torch.autograd.grad(fk.gated_residual(*inputs).square().sum(), inputs[1], create_graph=True)[0]
        second = torch.autograd.grad(dy.sum(), inputs)
    expected = torch.autograd.grad(
        torch.autograd.grad(oracle(*inputs).square().sum(), inputs[1], create_graph=True)[0].sum(), inputs)
    for got, want in zip(second, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cpp_autograd_path_equals_the_python_one(dtype, generator):
    """Where a backward follows on the extension's backends, the op records its autograd in C++
    (fastgen_C::gated_residual); the same kernels as the Python autograd.Function's, so the same
    values and gradients, narrower y and gate included; forward-mode AD keeps the Python one."""
    if not fk._extension.cpu_built():
        pytest.skip("extension not built")
    gr = fk.ops.OP_MODULES["gated_residual"]

    x, y, gate = make_inputs((2, 5, 40), torch.float32, False, generator)
    leaves = [x.to(dtype).requires_grad_(), y.bfloat16().requires_grad_(), gate.bfloat16().requires_grad_()]
    out = fk.gated_residual(*leaves)
    assert "CppNode<fastgen" in out.grad_fn.name()
    g = torch.randn(out.shape, generator=generator).to(out.dtype)
    python_out = gr._GatedResidualFunction.apply(*leaves)
    assert torch.equal(out, python_out)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(python_out, leaves, g)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(leaves[0].detach(), torch.ones_like(x).to(dtype))
        assert forward_ad_tangent(fk.gated_residual(dual, *leaves[1:])) is not None


def forward_ad_tangent(t):
    return torch.autograd.forward_ad.unpack_dual(t).tangent


def test_gpu_kernels_decline_fp64_operands():
    """fp32 x beside an fp64 y or gate is computed in fp64, which the CUDA and Triton kernels do not
    read: automatic choice passes it on (the CUDA binding raised) instead of taking it."""
    import importlib

    gr = importlib.import_module("fastgen_kernels.ops.gated_residual")

    x, y, gate = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8, dtype=torch.float64), torch.zeros(2, 8)
    for backend in ("cuda", "triton"):
        assert "float64 operand" in gr.forward_dispatcher.supports[backend](x, y, gate)
        assert "float64 operand" in gr.backward_dispatcher.supports[backend](x, x, gate.double())
        assert gr.forward_dispatcher.supports[backend](x, y.float(), gate.bfloat16()) is None


def test_native_ops_refuse_empty_rows():
    """The extension's row ops called directly with no elements raise (their work sizing divided
    by zero: SIGFPE); the public ops give empty inputs to the reference."""
    if not fk._extension.cpu_built():
        pytest.skip("extension not built")
    empty, mod = torch.randn(2, 3, 0), torch.randn(2, 0)
    with pytest.raises(RuntimeError, match="x must not be empty"):
        torch.ops.fastgen_C.gated_residual_forward(empty, empty, mod, None, None)
    with pytest.raises(RuntimeError, match="x must not be empty"):
        torch.ops.fastgen_C.modulated_norm_forward(empty, mod, mod, None, None, 1e-6, False)
    with pytest.raises(RuntimeError, match="grad_out must not be empty"):
        torch.ops.fastgen_C.gated_residual_backward(torch.randn(0, 3, 4), torch.randn(0, 3, 4), torch.randn(0, 4))
