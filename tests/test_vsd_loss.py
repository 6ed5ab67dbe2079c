"""vsd_loss: every backend against an fp64 oracle written from METHODS.md (DMD2 with f-Distill's
weight), gradients, gradcheck, opcheck, a property test at large magnitudes, bad input."""

import pytest
import torch
from conftest import CPU_DTYPES, cpu_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import (SHAPES, check_against_oracle, check_bad_input, check_deterministic,
                          per_sample_weight, randn)

import fastgen_kernels as fk
from fastgen_kernels.losses import vsd_loss


def oracle(x_g, x0_teacher, x0_fake, weight=None, eps=1e-6):
    """Per-sample losses, straight from METHODS.md: the pseudo-target composition."""
    dims = tuple(range(1, x_g.dim()))
    bcast = (-1,) + (1,) * (x_g.dim() - 1)
    w = 1 / ((x_g - x0_teacher).abs().mean(dims, keepdim=True) + eps)
    h = 1 if weight is None else weight.view(bcast)
    grad = (x0_fake - x0_teacher) * (w * h).detach()
    target = (x_g - grad).detach()
    return 0.5 * (x_g - target).square().mean(dims)


def make_inputs(shape, dtype, generator, weighted=False, scale=1.0):
    inputs = {name: randn(shape, dtype, generator, scale) for name in ("x_g", "x0_teacher", "x0_fake")}
    if weighted:
        inputs["weight"] = per_sample_weight(shape[0], generator)
    return inputs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["h1", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_oracle(backend, dtype, shape, weighted, reduction, generator):
    check_against_oracle(vsd_loss, oracle, make_inputs(shape, dtype, generator, weighted),
                         ["x_g"], dtype, backend, reduction)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend, generator):
    inputs = {k: v.transpose(1, 2) for k, v in make_inputs((2, 5, 7, 3), torch.float32, generator).items()}
    check_against_oracle(vsd_loss, oracle, inputs, ["x_g"], torch.float32, backend, "mean")


def test_value_and_gradient_as_methods_md(generator):
    """loss = 0.5 * mean(grad^2) and d loss / d x_g = grad / (B * D), for the batch mean."""
    x, t, f = make_inputs((3, 2, 5, 5), torch.float64, generator).values()
    x.requires_grad_()
    with fk.use_backend("cpu"):
        loss = vsd_loss(x, t, f)
    (dx,) = torch.autograd.grad(loss, x)
    w = 1 / ((x - t).abs().mean((1, 2, 3), keepdim=True) + 1e-6)
    grad = ((f - t) * w).detach()
    torch.testing.assert_close(loss, 0.5 * grad.square().mean())
    torch.testing.assert_close(dx, grad / grad.numel())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp64_gradient_against_finite_differences(backend, reduction, generator):
    """gradcheck in fp64. The weight w = 1 / mean|x_g - T| is a stop-gradient, so the gradient is
    that of the quadratic 0.5 * mean_D((x_g - target)^2) around the frozen pseudo-target
    target = sg(x_g0 - grad): central differences of that quadratic at x_g0 must match the op's
    gradient (torch's gradcheck Jacobian tools, fp64, both reductions)."""
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    x0, t, f, h = make_inputs((2, 3, 5), torch.float64, generator, weighted=True).values()
    h = h.double()
    w = 1 / ((x0 - t).abs().mean((1, 2), keepdim=True) + 1e-6)
    target = x0 - (f - t) * w * h.view(-1, 1, 1)

    def frozen(x_g):
        per_sample = 0.5 * (x_g - target).square().mean((1, 2))
        return per_sample.mean() if reduction == "mean" else per_sample

    x = x0.clone().requires_grad_()
    with fk.use_backend(backend):
        loss = vsd_loss(x, t, f, h, reduction=reduction)
    torch.testing.assert_close(loss, frozen(x0), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(frozen, [x0.clone().requires_grad_()])
    numerical = torch.autograd.functional.jacobian(frozen, x0)  # exact for a quadratic
    analytic = torch.stack([torch.autograd.grad(loss.reshape(-1)[i], x, retain_graph=True)[0]
                            for i in range(loss.numel())]).reshape(numerical.shape)
    torch.testing.assert_close(analytic, numerical, rtol=1e-10, atol=1e-12)
    # the backward op itself, linear in the upstream gradient and in x0_fake
    factor = torch.rand(2, dtype=torch.float64, generator=generator)
    with fk.use_backend(backend):
        out = torch.ops.fastgen.vsd_loss_backward(f, t, factor, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out, factor.view(-1, 1, 1) * (f - t) / 15, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend, generator):
    x, t, f, h = make_inputs((2, 3, 16), torch.float32, generator, weighted=True).values()
    factor = torch.rand(2, generator=generator)
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.vsd_loss.default, (x, t, f, h, 1e-6))
        torch.library.opcheck(torch.ops.fastgen.vsd_loss.default, (x.requires_grad_(), t, f, None, 1e-3))
        torch.library.opcheck(torch.ops.fastgen.vsd_loss_backward.default, (f, t, factor, torch.randn(2)))


def test_teacher_fake_and_weight_get_no_gradient(generator):
    x, t, f, h = (v.requires_grad_() for v in make_inputs((2, 4, 4), torch.float32, generator, True).values())
    with fk.use_backend("cpu"):
        vsd_loss(x, t, f, h).backward()
    assert x.grad is not None and t.grad is None and f.grad is None and h.grad is None


def test_deterministic_across_thread_counts(generator):
    check_deterministic(vsd_loss, make_inputs((2, 3, 64, 64), torch.float32, generator), "x_g")


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), dims=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       log_scale=st.sampled_from([-3, 0, 2, 4]), dtype=st.sampled_from(CPU_DTYPES),
       weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_shapes_and_scales(batch, dims, log_scale, dtype, weighted, seed):
    """Any (B, ...) shape; magnitudes up to 1e4, where (Fk - T)^2 overflows float16 (6.5e4) unless
    accumulated in fp32."""
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs((batch, *dims), dtype, generator, weighted, scale=10.0**log_scale)
    check_against_oracle(vsd_loss, oracle, inputs, ["x_g"], dtype, "cpu", "none")


def test_bad_input_names_the_argument():
    check_bad_input(vsd_loss, ["x_g", "x0_teacher", "x0_fake"])
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        vsd_loss(x, x, x, eps=0.0)
