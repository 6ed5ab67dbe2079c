"""The fused losses (fastgen_kernels.losses) on every CPU-reachable backend (C++ cpu, Triton under
the interpreter, reference): value and gradients against fp64 oracles written from the papers' formulas
(tests/loss_cases.py), odd shapes, B = 1, fp16/bf16 inputs, non-contiguous inputs, gradcheck,
opcheck on every custom op, torch.compile, determinism, a property test up to magnitudes of 1e4,
and bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_DTYPES, cpu_backends, cpu_isas, extension_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_cases import CASES, SHAPES, randn, uniform
from loss_testing import check_against_oracle, check_deterministic

import fastgen_kernels as fk
from fastgen_kernels import losses
from fastgen_kernels.ops import _eager_op


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, backend, dtype, shape, reduction, generator):
    check_against_oracle(CASES[case], CASES[case].make_inputs(shape, dtype, generator), dtype, backend,
                         reduction)


@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.values[0] != "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_many_samples_match_oracle(case, backend, generator):
    """More samples than the CUDA tail's threads (each thread then takes several, and the batch mean
    adds the threads' sums): the tails' batch loop and reduction (Triton's one-program tail is
    covered by the other tests; 600 programs of the interpreter take seconds per case)."""
    inputs = CASES[case].make_inputs((600, 7), torch.float32, generator)
    for reduction in ("mean", "none"):
        check_against_oracle(CASES[case], inputs, torch.float32, backend, reduction)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", CPU_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_every_cpu_instruction_set_matches_oracle(case, dtype, cpu_isa, generator):
    """Every compiled copy of the CPU kernels this CPU runs (baseline, AVX2, AVX-512), at an odd
    size whose tail is not a multiple of any vector width."""
    inputs = CASES[case].make_inputs((3, 5, 7, 11), dtype, generator)
    check_against_oracle(CASES[case], inputs, dtype, "cpu", "none")


@pytest.mark.parametrize("backend", extension_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_fp64_matches_oracle_to_rounding(case, backend, generator):
    """In fp64 the kernels' only difference from the oracle is the summation order."""
    inputs = CASES[case].make_inputs((3, 2, 7, 5), torch.float64, generator)
    check_against_oracle(CASES[case], inputs, torch.float64, backend, "none")


@pytest.mark.parametrize("backend", extension_backends())
@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c.exact_gradient])
def test_gradcheck(case, backend, generator):
    """Finite differences in fp64, for the losses whose gradient is the derivative of their value
    (VSD and MeanFlow hold stop-gradient weights: their fp64 oracle test covers them)."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float64, generator)
    inputs = {k: v.double() for k, v in inputs.items()}
    names = [k for k in spec.differentiable if k in inputs]

    def loss(*leaves):
        with fk.use_backend(backend):
            return spec.fn(**inputs | dict(zip(names, leaves)), reduction="none", **spec.kwargs)

    assert torch.autograd.gradcheck(loss, [inputs[k].clone().requires_grad_() for k in names])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_non_contiguous_inputs(case, backend, generator):
    inputs = {k: v.transpose(1, 2) if v.dim() > 1 else v
              for k, v in CASES[case].make_inputs((2, 5, 7, 3), torch.float32, generator).items()}
    assert not inputs[CASES[case].tensors[0]].is_contiguous()
    check_against_oracle(CASES[case], inputs, torch.float32, backend, "mean")


@pytest.mark.parametrize("case", list(CASES))
def test_constants_get_no_gradient(case, generator):
    """Targets, teacher outputs, JVPs, times (and VSD's weight) are stop-gradients."""
    spec = CASES[case]
    inputs = {k: v.requires_grad_() for k, v in spec.make_inputs((2, 3, 4), torch.float32, generator).items()}
    with fk.use_backend("cpu"):
        spec.fn(**inputs, **spec.kwargs).backward()
    for name, value in inputs.items():
        assert (value.grad is not None) == (name in spec.differentiable), name


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_across_thread_counts(case, generator):
    check_deterministic(CASES[case], CASES[case].make_inputs((2, 3, 64, 64), torch.float32, generator))


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(list(CASES)), batch=st.integers(1, 3),
       dims=st.lists(st.integers(1, 40), min_size=1, max_size=3), log_scale=st.sampled_from([-3, 0, 2, 4]),
       dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_property_shapes_and_scales(case, batch, dims, log_scale, dtype, seed):
    """Any (B, ...) shape; magnitudes up to 1e4, where squares overflow float16 (6.5e4) unless
    accumulated in fp32, and softplus(1e4) overflows exp unless computed stably."""
    generator = torch.Generator().manual_seed(seed)
    inputs = CASES[case].make_inputs((batch, *dims), dtype, generator, scale=10.0**log_scale)
    check_against_oracle(CASES[case], inputs, dtype, "cpu", "none")


def test_compile_fullgraph_all_losses(generator):
    """Every loss inside one torch.compile(fullgraph=True) graph, forward and backward, matches
    eager: the custom ops' fake kernels and autograd trace."""
    x, y, z = (randn((2, 3, 8, 8), torch.float32, generator) for _ in range(3))
    t, w = uniform(2, generator, 0.1, 1.0), uniform(2, generator, 0.5, 1.5)

    def all_losses(x):
        return (losses.vsd_loss(x, y, z, w) + losses.denoising_loss(x, y, w)
                + losses.consistency_loss(x, y, w) + losses.meanflow_loss(x, y, z, t, t / 2)
                + losses.scm_loss(x, x.detach(), y, z, y, t, w) + losses.gan_loss(x, y, "discriminator"))

    with fk.use_backend("cpu"):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        values = [all_losses(xs[0]), torch.compile(all_losses, fullgraph=True)(xs[1])]
        grads = [torch.autograd.grad(v, leaf)[0] for v, leaf in zip(values, xs)]
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])


# --------------------------------------------------------------------------- the two paths


def _value_and_grads(case, inputs):
    leaves = {k: v.detach().requires_grad_(k in case.differentiable) for k, v in inputs.items()}
    names = [k for k in case.differentiable if k in inputs]
    loss = case.fn(**leaves, reduction="none", **case.kwargs)
    return (loss, *torch.autograd.grad(loss.sum(), [leaves[k] for k in names]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_custom_op_path_equals_eager_path(case, backend, generator, monkeypatch):
    """The custom ops (what torch.compile, make_fx and tensor subclasses see) and the eager fast
    path (ops/_eager_op.py) run the same kernels: bit-identical values and gradients."""
    inputs = CASES[case].make_inputs((2, 3, 5, 7), torch.float32, generator)
    with fk.use_backend(backend):
        eager = _value_and_grads(CASES[case], inputs)
        monkeypatch.setattr(_eager_op, "plain_eager", lambda args: False)
        through_op = _value_and_grads(CASES[case], inputs)
    for a, b in zip(eager, through_op, strict=True):
        assert torch.equal(a, b)


def test_eager_path_only_without_modes_and_subclasses():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3)
    assert _eager_op.plain_eager((x, torch.nn.Parameter(x), None, 1.0))
    with FlopCounterMode(display=False):
        assert not _eager_op.plain_eager((x,))
    with torch.device("cpu"):  # a torch-function mode
        assert not _eager_op.plain_eager((x,))
    with FakeTensorMode() as mode:
        assert not _eager_op.plain_eager((mode.from_tensor(x),))
    assert not torch.func.vmap(lambda v: torch.tensor(_eager_op.plain_eager((v,))))(x).any()
    graph = make_fx(lambda a, b: losses.consistency_loss(a, b))(x, x + 1)
    assert "fastgen.squared_residual_loss" in str(graph.graph)


# --------------------------------------------------------------------------- the custom ops


def op_cases(generator):
    """(forward op, its args) and (backward op, its args) for every loss custom op."""
    x, y, z = (randn((2, 3, 16), torch.float32, generator) for _ in range(3))
    k, s = uniform(2, generator, -1.0, 1.0), uniform(2, generator, 0.5, 1.5)
    t = uniform(2, generator, 0.1, 1.4)
    q = randn((2, 4), torch.float32, generator)
    ops = torch.ops.fastgen
    one = torch.ones(())
    return [
        (ops.vsd_loss.default, (x, y, z, s, 1e-6, True)),
        (ops.vsd_loss.default, (x.clone().requires_grad_(), y, z, None, 1e-3, False)),
        (ops.vsd_loss_backward.default, (z, y, s, one)),
        (ops.squared_residual_loss.default, (x, y, None, None, None, 0.1, 0.0, 0.0, 0.0, True)),
        (ops.squared_residual_loss.default, (x.clone().requires_grad_(), y.clone().requires_grad_(), z, k,
                                             s.clone().requires_grad_(), 1.0, 0.0, 1.0, 1e-3, False)),
        (ops.squared_residual_loss.default, (x.clone().requires_grad_(), y.clone().requires_grad_(), None, None,
                                             None, 1.0, 0.3, 0.0, 0.0, True)),
        (ops.squared_residual_backward.default, (x, y, z, k, s, one, True)),
        (ops.squared_residual_backward.default, (x, y, None, None, s, k, False)),
        (ops.scm_loss.default, (x.clone().requires_grad_(), y, z, x, y, t, k.clone().requires_grad_(), 0.5, 1.0,
                                0.1, True)),
        (ops.scm_loss.default, (x.clone().requires_grad_(), y, z, x, y, t, k, 0.5, 0.3, 0.1, False)),
        (ops.scm_loss_backward.default, (x, y, z, x, y, q, s, one)),
        (ops.softplus_loss.default, (x.clone().requires_grad_(), True, True)),
        (ops.softplus_loss.default, (x.clone().requires_grad_(), False, False)),
        (ops.softplus_loss_backward.default, (x, False, s, k)),
    ]


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend, generator):
    with fk.use_backend(backend):
        for op, args in op_cases(generator):
            torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- loss specifics


def test_vsd_value_and_gradient_as_methods_md(generator):
    """loss = 0.5 * mean(grad^2) and d loss / d x_g = grad / (B * D), for the batch mean."""
    x, t, f = (randn((3, 2, 5, 5), torch.float64, generator) for _ in range(3))
    x.requires_grad_()
    with fk.use_backend("cpu"):
        loss = losses.vsd_loss(x, t, f)
    (dx,) = torch.autograd.grad(loss, x)
    w = 1 / ((x - t).abs().mean((1, 2, 3), keepdim=True) + 1e-6)
    grad = ((f - t) * w).detach()
    torch.testing.assert_close(loss, 0.5 * grad.square().mean())
    torch.testing.assert_close(dx, grad / grad.numel())


@pytest.mark.parametrize("backend", extension_backends())
def test_vsd_gradient_is_that_of_the_frozen_quadratic(backend, generator):
    """The weight w = 1 / mean|x_g - T| is a stop-gradient, so the gradient is that of
    0.5 * mean_D((x_g - target)^2) around the frozen pseudo-target target = sg(x_g0 - grad):
    central differences of that quadratic at x_g0 must match the op's gradient."""
    x0, t, f = (randn((2, 3, 5), torch.float64, generator) for _ in range(3))
    h = uniform(2, generator, 0.5, 1.5).double()
    w = 1 / ((x0 - t).abs().mean((1, 2), keepdim=True) + 1e-6)
    target = x0 - (f - t) * w * h.view(-1, 1, 1)

    def frozen(x_g):
        return 0.5 * (x_g - target).square().mean((1, 2))

    x = x0.clone().requires_grad_()
    with fk.use_backend(backend):
        loss = losses.vsd_loss(x, t, f, h, reduction="none")
    torch.testing.assert_close(loss, frozen(x0), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(frozen, [x0.clone().requires_grad_()])
    numerical = torch.autograd.functional.jacobian(frozen, x0)  # exact for a quadratic
    analytic = torch.stack([torch.autograd.grad(loss[i], x, retain_graph=True)[0] for i in range(2)])
    torch.testing.assert_close(analytic, numerical, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", extension_backends())
def test_meanflow_gradient_is_that_of_the_frozen_weight(backend, generator):
    """sg(1 / (e + c)^p) * e: the gradient is 2 Delta / (e + c)^p, the derivative of e times the
    weight frozen at the current point."""
    u, v, j = (randn((2, 3, 5), torch.float64, generator) for _ in range(3))
    t = uniform(2, generator, 0.1, 1.0).double()
    r = t / 3
    delta = u - (v - (t - r).view(-1, 1, 1) * j)
    weight = (delta.square().sum((1, 2)) + 1e-3) ** -0.75
    x = u.clone().requires_grad_()
    with fk.use_backend(backend):
        loss = losses.meanflow_loss(x, v, j, t, r, p=0.75, reduction="none")
    (du,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(du, 2 * delta * weight.view(-1, 1, 1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pseudo_huber_keeps_precision_near_zero(backend, generator):
    """sqrt(S + c^2) - c cancels in fp32 when S << c^2 (pred close to target late in training);
    the kernel's S / (sqrt(S + c^2) + c) keeps full relative precision."""
    target = randn((2, 4, 16, 16), torch.float32, generator)
    pred = target + randn((2, 4, 16, 16), torch.float32, generator, 1e-6)
    with fk.use_backend(backend):
        loss = losses.consistency_loss(pred, target, reduction="none")
    S = (pred.double() - target.double()).square().sum((1, 2, 3))
    c = 0.00054 * math.sqrt(1024)
    exact = S / (torch.sqrt(S + c * c) + c)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
    naive = torch.sqrt(S.float() + c * c) - c  # what the textbook formula gives in fp32
    assert ((naive.double() - exact).abs() / exact).max() > 1e-4


def test_scm_logvar_gradient(generator):
    """d loss_b / d u_b = 1 - S / (D sigma_edm e^u): the adaptive weighting's fixed point is
    u = log(mean squared residual / sigma_edm)."""
    spec = CASES["scm_offset"]
    inputs = spec.make_inputs((3, 2, 6, 6), torch.float64, generator)
    u = inputs["logvar"].double().requires_grad_()
    with fk.use_backend("cpu"):
        loss = losses.scm_loss(**inputs | {"logvar": u}, reduction="none", **spec.kwargs)
    (du,) = torch.autograd.grad(loss.sum(), u)
    torch.testing.assert_close(du, 1 - (loss.detach() - u.detach()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_scm_at_the_end_of_the_time_range(backend, generator):
    """At t = pi/2 (in fp32 a little past it, where tan t < 0) the prior weight 1 / sigma is 0, its
    limit: the loss is the log-variance alone and F gets no gradient (the clamp for small sigma
    gave a weight of 1e6 there)."""
    spec = CASES["scm"]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    inputs["t"] = torch.full((2,), math.pi / 2, dtype=torch.float32)
    F_ = inputs["F"].requires_grad_()
    with fk.use_backend(backend):
        loss = losses.scm_loss(**inputs, reduction="none", **spec.kwargs)
        (dF,) = torch.autograd.grad(loss.sum(), F_)
    torch.testing.assert_close(loss, inputs["logvar"].float(), rtol=0, atol=0)
    assert torch.equal(dF, torch.zeros_like(dF))


@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_loss_keeps_the_digits_of_confident_logits(backend):
    """softplus(-z) for a confident logit z is about e^-z, far below fp32's epsilon next to 1:
    computed as log(1 + e^-z) it came out 0 (Triton) from z = 17 on."""
    logits = torch.tensor([[17.0], [20.0], [40.0], [10.0], [-3.0], [1e-3]])
    with fk.use_backend(backend):
        loss = losses.gan_loss(logits, reduction="none")
    expected = torch.nn.functional.softplus(-logits.double()).reshape(-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_discriminator_with_different_real_and_fake_shapes(backend, generator):
    """mean reduction: each term is the mean over its own logits (real batch and patch grid may
    differ from fake's)."""
    fake, real = randn((4, 1, 5, 5), torch.float32, generator, 3), randn((3, 7), torch.float32, generator, 3)
    with fk.use_backend(backend):
        loss = losses.gan_loss(fake, real, mode="discriminator")
    expected = torch.nn.functional.softplus(fake.double()).mean() + torch.nn.functional.softplus(-real.double()).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_discriminator_with_fp64_real_logits_keeps_fp64(backend, generator):
    """fp32 fake and fp64 real logits: the loss and the real logits' gradient in fp64 (the real
    term was rounded to fp32)."""
    if backend == "triton":
        pytest.skip("the Triton kernels read fp16, bf16 and fp32")
    fake = randn((4, 6), torch.float32, generator, 3).requires_grad_()
    real = (randn((4, 6), torch.float64, generator, 3) + 1e-9).requires_grad_()
    with fk.use_backend(backend):
        loss = losses.gan_loss(fake, real, mode="discriminator")
    dfake, dreal = torch.autograd.grad(loss, (fake, real))
    assert loss.dtype == torch.float64 and dreal.dtype == torch.float64 and dfake.dtype == torch.float32
    fake64, real64 = fake.detach().double().requires_grad_(), real.detach().requires_grad_()
    expected = torch.nn.functional.softplus(fake64).mean() + torch.nn.functional.softplus(-real64).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # fp32's rounding of the fake term only
    torch.testing.assert_close(dreal, torch.autograd.grad(expected, real64)[0], rtol=1e-12, atol=0)



@pytest.mark.parametrize("backend", extension_backends())
def test_batch_mean_of_a_large_batch(backend):
    """The C++ tail summed the batch in fp32, index order: past 2^24 samples adding a sample's
    1.0 changed nothing (the mean of 2^25 ones came out 0.5)."""
    batch = 1 << 25
    with fk.use_backend(backend):
        denoising = losses.denoising_loss(torch.ones(batch, 1), torch.zeros(batch, 1))
        gan = losses.gan_loss(torch.zeros(batch))
    assert denoising.item() == 1.0
    assert gan.item() == pytest.approx(math.log(2), rel=1e-5)  # softplus(0) rounded to fp32


@pytest.mark.parametrize("backend", cpu_backends())
def test_batch_mean_walks_the_batch_in_blocks(backend, generator):
    """More samples than the Triton tail's block (16 under the interpreter): every block counts,
    the last one ragged; per sample too."""
    pred, target = randn((45, 3, 5), torch.float32, generator, 1), randn((45, 3, 5), torch.float32, generator, 1)
    weight = uniform(45, generator, 0.5, 1.5)
    expected = (weight.double() * (pred.double() - target.double()).square().mean((1, 2)))
    with fk.use_backend(backend):
        mean = losses.denoising_loss(pred, target, weight)
        each = losses.denoising_loss(pred, target, weight, reduction="none")
    torch.testing.assert_close(mean.double(), expected.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(each.double(), expected, rtol=1e-6, atol=0)


LONG_SAMPLES = {"one_chunk_per_sample": (256, 65536 + 3), "many_chunks": (1, 1 << 22)}


def _check_long_samples_sum(backend, batch, numel, generator):
    """DESIGN's rule for reductions: at most twice PyTorch's error in the same precision, plus the
    output's rounding."""
    pred = torch.randn(batch, numel, generator=generator) + 3  # a biased residual: sums that grow
    target = torch.zeros(batch, numel)
    with fk.use_backend(backend):
        ours = losses.denoising_loss(pred, target, reduction="none")
    exact = pred.double().square().mean(1)
    error = ((ours.double() - exact) / exact).abs().max().item()
    pytorch_error = ((pred.square().mean(1).double() - exact) / exact).abs().max().item()
    assert error <= 2 * pytorch_error + torch.finfo(torch.float32).eps / 2, (error, pytorch_error)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("shape", LONG_SAMPLES)
def test_long_samples_sum_as_accurately_as_pytorch(shape, cpu_isa, generator):
    """A lane summed a whole chunk in fp32 (4.6x PyTorch's error with a sample per chunk), and a
    sample's many chunk sums were added in fp32 (B = 1: 400x at 2^24 elements)."""
    _check_long_samples_sum("cpu", *LONG_SAMPLES[shape], generator)


@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.values[0] == "triton"])
def test_triton_tail_adds_many_chunks_as_accurately_as_pytorch(backend, generator):
    """The Triton tail added a sample's chunk sums in fp32 (as the CUDA one did)."""
    _check_long_samples_sum(backend, *LONG_SAMPLES["many_chunks"], generator)


NATIVE_CASES = ["vsd", "denoising", "consistency", "meanflow", "scm", "gan_generator"]


@pytest.mark.parametrize("case", NATIVE_CASES)
def test_native_autograd_on_the_extension_backends(case, generator):
    """On the cpu (and cuda) backend a plain eager call runs the op's C++ autograd (a CppNode, no
    Python between the kernels); a forced Python-side backend runs the Python one. A second
    derivative through the native backward raises instead of coming back as zero."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 4), torch.float32, generator)
    leaf = inputs[spec.differentiable[0]].requires_grad_()
    with fk.use_backend("cpu"):
        loss = spec.fn(**inputs, **spec.kwargs)
    assert "CppNode<fastgen" in loss.grad_fn.name()
    with pytest.raises(RuntimeError, match="no second derivative"):
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        grad.sum().backward()
    with fk.use_backend("reference"):
        assert "CppNode" not in spec.fn(**inputs, **spec.kwargs).grad_fn.name()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_inference_mode(case, backend, generator):
    """Under torch.inference_mode (no autograd at all) every loss still computes its value."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    with fk.use_backend(backend):
        expected = spec.fn(**inputs, **spec.kwargs)
        with torch.inference_mode():
            assert torch.equal(spec.fn(**inputs, **spec.kwargs), expected)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["scm", "scm_offset", "denoising", "vsd"])
def test_a_diverged_sample_stays_nan(case, backend, generator):
    """A NaN in one sample's input makes that sample's loss NaN (no clamp or max drops it) and
    leaves the others finite."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    first = inputs[spec.tensors[0]].clone()
    first[0, 0, 0] = float("nan")
    inputs[spec.tensors[0]] = first
    with fk.use_backend(backend):
        loss = spec.fn(**inputs, reduction="none", **spec.kwargs)
    assert loss[0].isnan() and loss[1].isfinite()


@pytest.mark.parametrize("custom_op_path", [False, True], ids=["eager", "custom_op"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_second_derivative_raises(case, backend, custom_op_path, generator, monkeypatch):
    """A create_graph=True backward would need the derivative of the kernels' saved factors,
    which they do not have: it raises on every path (the native C++ autograd, the Python one, the
    custom op) instead of returning a gradient that differentiates as if they were constants (a
    VSD gradient's own derivative came back silently wrong that way)."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    first = inputs[spec.differentiable[0]].requires_grad_()
    if custom_op_path:
        monkeypatch.setattr(_eager_op, "plain_eager", lambda args: False)
    with fk.use_backend(backend), pytest.raises(RuntimeError, match="no second derivative"):
        (grad,) = torch.autograd.grad(spec.fn(**inputs, **spec.kwargs), first, create_graph=True)
        torch.autograd.grad((grad * first).sum(), first)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case, wrt", [("denoising", "weight"), ("scm", "logvar")])
def test_second_derivative_through_per_sample_gradients_raises(case, wrt, backend, generator):
    """The same through the gradient of a weight (or sCM's log-variance)."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    first = inputs[spec.differentiable[0]].requires_grad_()
    other = inputs[wrt].requires_grad_()
    with fk.use_backend(backend), pytest.raises(RuntimeError, match="no second derivative"):
        (grad,) = torch.autograd.grad(spec.fn(**inputs, **spec.kwargs), other, create_graph=True)
        torch.autograd.grad(grad.sum(), first)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_and_func_grad_raise(case, generator):
    """The losses have no forward-mode rule: torch.func.jvp (which would take the custom op's
    result as a constant, a zero tangent) and a dual input both raise naming the fused op, and so
    does torch.func.grad (which takes no custom op's autograd: PyTorch's error named no op)."""
    spec = CASES[case]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    name = spec.differentiable[0]

    def loss_of(value):
        return spec.fn(**(inputs | {name: value}), **spec.kwargs)

    with pytest.raises(RuntimeError, match="_loss: the fused op has no forward-mode derivative"):
        torch.func.jvp(loss_of, (inputs[name],), (torch.ones_like(inputs[name]),))
    dual_level = torch.autograd.forward_ad.dual_level()
    with pytest.raises(RuntimeError, match="_loss: the fused op has no forward-mode derivative"), dual_level:
        loss_of(torch.autograd.forward_ad.make_dual(inputs[name], torch.ones_like(inputs[name])))
    with pytest.raises(RuntimeError, match="_loss: torch.func.grad / vjp / jacrev cannot differentiate"):
        torch.func.grad(loss_of)(inputs[name])


def test_native_loss_under_compiled_autograd(generator):
    """The C++ autograd node runs under compiled autograd (torch.compile of the backward)."""
    spec = CASES["denoising"]
    inputs = spec.make_inputs((2, 3, 5), torch.float32, generator)
    pred = inputs["pred"].requires_grad_()
    with fk.use_backend("cpu"):
        (expected,) = torch.autograd.grad(spec.fn(**inputs), pred)
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
            spec.fn(**inputs).backward()
    torch.testing.assert_close(pred.grad, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case):
    """Wrong shapes, dtypes, types, empty tensors, per-sample lengths and reductions raise before
    any kernel runs, naming the argument."""
    spec = CASES[case]
    good = spec.make_inputs((2, 3, 4), torch.float32, torch.Generator().manual_seed(0))
    names = [k for k, v in good.items() if v.dim() > 1]
    scalars = [k for k, v in good.items() if v.dim() == 1]
    first = names[0]

    def call(**changes):
        return spec.fn(**good | changes, **spec.kwargs)

    with pytest.raises(TypeError, match=rf"{first} must be float16"):
        call(**{first: good[first].int()})
    with pytest.raises(ValueError, match=rf"{first} must be a non-empty"):
        call(**{n: torch.randn(0, 3) for n in names})
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(reduction="sum")
    if len(names) > 1 and spec.fn is not losses.gan_loss:
        second = names[1]
        with pytest.raises(ValueError, match=rf"{second} must have shape \(2, 3, 4\)"):
            call(**{second: good[second][:, :2]})
        with pytest.raises(TypeError, match=rf"{second} must have {first}'s dtype"):
            call(**{second: good[second].double()})
        with pytest.raises(TypeError, match=rf"{second} must be a torch.Tensor"):
            call(**{second: 1.0})
    for name in scalars:
        with pytest.raises(ValueError, match=rf"{name} must have shape \(B,\) = \(2,\)"):
            call(**{name: torch.ones(3)})
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            call(**{name: torch.ones(2, 1)})
        with pytest.raises(TypeError, match=rf"{name} must be float16"):
            call(**{name: torch.ones(2, dtype=torch.long)})


def test_bad_options_name_the_argument():
    x = torch.randn(2, 3)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        losses.vsd_loss(x, x, x, eps=0.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        losses.consistency_loss(x, x, metric="l1")
    with pytest.raises(ValueError, match="c is the pseudo-Huber constant"):
        losses.consistency_loss(x, x, metric="l2", c=0.1)
    with pytest.raises(ValueError, match="c must be a positive number"):
        losses.consistency_loss(x, x, c=-1.0)
    # constants that vanish in the kernels' fp32 (pseudo-Huber c: its square): they turned the
    # pseudo-Huber metric into the squared L2 on the cpu backend only, or gave NaN gradients
    for call in (lambda: losses.consistency_loss(x, x, c=1e-20), lambda: losses.vsd_loss(x, x, x, eps=1e-50),
                 lambda: losses.meanflow_loss(x, x, x, t, t, c=1e-39),
                 lambda: losses.scm_loss(x, x, x, x, x, t, t, c=1e-45)):
        with pytest.raises(ValueError, match=r"must be a positive number of at least .* \(the kernels compute in"):
            call()
    losses.consistency_loss(x, x, c=2e-19)  # c^2 a normal fp32 number
    with pytest.raises(ValueError, match="r is required"):
        losses.meanflow_loss(x, x, x, t, None)
    for p in (-1, float("inf")):  # p = inf gave an infinite loss
        with pytest.raises(ValueError, match="p must be a finite non-negative number"):
            losses.meanflow_loss(x, x, x, t, t, p=p)
    with pytest.raises(ValueError, match="logvar is required"):
        losses.scm_loss(x, x, x, x, x, t, None)
    with pytest.raises(ValueError, match=r"warmup must be a number in \[0.0, 1.0\]"):
        losses.scm_loss(x, x, x, x, x, t, t, warmup=2.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        losses.gan_loss(x, mode="critic")
    # constants are Python or NumPy numbers (np.float32 was refused as not a number); a tensor
    # or a bool is named
    assert losses.scm_loss(x, x, x, x, x, t, t, sigma_data=np.float32(0.5), c=np.float64(0.1),
                           warmup=np.float32(1)).isfinite()
    for bad in (torch.tensor(0.1), True):
        with pytest.raises(ValueError, match="c must be a positive number"):
            losses.consistency_loss(x, x, c=bad)
    with pytest.raises(ValueError, match="logits_real is for mode='discriminator'"):
        losses.gan_loss(x, x)
    with pytest.raises(ValueError, match="needs logits_real"):
        losses.gan_loss(x, mode="discriminator")
    with pytest.raises(ValueError, match="needs one batch size"):
        losses.gan_loss(x, torch.randn(3, 3), mode="discriminator", reduction="none")


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_conversions_match_torch_on_every_bit_pattern(dtype, cpu_isa):
    """The CPU kernels convert fp16/bf16 with their own vectorizable bit arithmetic
    (csrc/cpu/convert.h): every one of the 65536 values must load exactly, and fp32 results must
    round as torch rounds them (to nearest even, subnormals, overflow to inf, NaN)."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    a = bits.view(dtype).reshape(2, -1)
    zero, one = torch.zeros_like(a), torch.ones(2)
    for s in (1.0, 1 / 3, 1e3, 1e-3):
        scale = one * s
        out, _ = torch.ops.fastgen_C.scaled_residual(a, zero, None, None, scale, False)
        expected = (a.float() * torch.tensor(s, dtype=torch.float32)).to(dtype)
        same = (out.view(torch.int16) == expected.view(torch.int16)) | (out.isnan() & expected.isnan())
        assert same.all(), f"scale {s}: {(~same).sum()} values differ"
