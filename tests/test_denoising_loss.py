"""denoising_loss: every backend against an fp64 oracle written from METHODS.md (weighted
per-sample MSE), gradients to pred and target, gradcheck, opcheck, a property test at large
magnitudes, bad input."""

import pytest
import torch
from conftest import CPU_DTYPES, cpu_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import (SHAPES, check_against_oracle, check_bad_input, check_deterministic,
                          per_sample_weight, randn)

import fastgen_kernels as fk
from fastgen_kernels.losses import denoising_loss


def oracle(pred, target, weight=None):
    """Per-sample weight(t) * ||pred - target||^2 / D (METHODS.md section 3, SFT)."""
    dims = tuple(range(1, pred.dim()))
    per_sample = (pred - target).square().mean(dims)
    return per_sample if weight is None else weight * per_sample


def make_inputs(shape, dtype, generator, weighted=False, scale=1.0):
    inputs = {name: randn(shape, dtype, generator, scale) for name in ("pred", "target")}
    if weighted:
        inputs["weight"] = per_sample_weight(shape[0], generator)
    return inputs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["w1", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target_grad", [False, True], ids=["pred", "pred_target"])
def test_matches_oracle(backend, dtype, shape, weighted, reduction, target_grad, generator):
    check_against_oracle(denoising_loss, oracle, make_inputs(shape, dtype, generator, weighted),
                         ["pred", "target"] if target_grad else ["pred"], dtype, backend, reduction)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend, generator):
    inputs = {k: v.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
              for k, v in make_inputs((3, 6, 5), torch.float32, generator).items()}
    check_against_oracle(denoising_loss, oracle, inputs, ["pred", "target"], torch.float32,
                         backend, "mean")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp64_gradcheck(backend, reduction, generator):
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    pred, target, weight = make_inputs((2, 3, 5), torch.float64, generator, weighted=True).values()
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda p, t: denoising_loss(p, t, weight.double(), reduction=reduction),
            [pred.requires_grad_(), target.requires_grad_()])


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend, generator):
    pred, target, weight = make_inputs((2, 3, 16), torch.float32, generator, weighted=True).values()
    factor = torch.rand(2, generator=generator)
    with fk.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.denoising_loss.default, (pred, target, weight))
        torch.library.opcheck(torch.ops.fastgen.denoising_loss.default,
                              (pred.requires_grad_(), target.requires_grad_(), None))
        for target_grad in (False, True):
            torch.library.opcheck(torch.ops.fastgen.denoising_loss_backward.default,
                                  (pred.detach(), target.detach(), factor, torch.randn(2), target_grad))


def test_target_and_weight_gradients_only_when_needed(generator):
    pred, target, weight = make_inputs((2, 4, 4), torch.float32, generator, weighted=True).values()
    pred.requires_grad_()
    weight.requires_grad_()
    with fk.use_backend("cpu"):
        denoising_loss(pred, target, weight).backward()
    assert pred.grad is not None and target.grad is None and weight.grad is None


def test_deterministic_across_thread_counts(generator):
    check_deterministic(denoising_loss, make_inputs((2, 3, 64, 64), torch.float32, generator), "pred")


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), dims=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       log_scale=st.sampled_from([-3, 0, 2, 4]), dtype=st.sampled_from(CPU_DTYPES),
       weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_shapes_and_scales(batch, dims, log_scale, dtype, weighted, seed):
    """Any (B, ...) shape; magnitudes up to 1e4, where (pred - target)^2 overflows float16 (6.5e4)
    unless accumulated in fp32."""
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs((batch, *dims), dtype, generator, weighted, scale=10.0**log_scale)
    check_against_oracle(denoising_loss, oracle, inputs, ["pred", "target"], dtype, "cpu", "none")


def test_bad_input_names_the_argument():
    check_bad_input(denoising_loss, ["pred", "target"])
