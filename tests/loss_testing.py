"""Checks shared by the tests of the fused losses (fastgen_kernels.losses): a loss and its
gradients against the fp64 oracle, and determinism across thread counts."""

from __future__ import annotations

import math

import torch
from loss_cases import LossCase
from tolerances import assert_close, assert_close_scaled

import fastgen_kernels as fk


def check_against_oracle(case: LossCase, inputs: dict, dtype, backend, reduction) -> None:
    """case.fn(**inputs, reduction=...) on ``backend`` against the fp64 oracle: the value and the
    gradients of the differentiable inputs."""
    leaves = {k: v.detach().requires_grad_(k in case.differentiable) for k, v in inputs.items()}
    names = [k for k in case.differentiable if k in inputs]
    with fk.use_backend(backend):
        loss = case.fn(**leaves, reduction=reduction, **case.kwargs)
        grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in names])
    wide = {k: v.detach().double().requires_grad_(k in names) for k, v in inputs.items()}
    per_sample = case.oracle(**wide, **case.kwargs)
    loss64 = per_sample.mean() if reduction == "mean" else per_sample
    grads64 = torch.autograd.grad(loss64.sum(), [wide[k] for k in names])
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == loss64.shape
    assert_close(loss, loss64, loss.dtype, "loss")
    for name, grad, grad64 in zip(names, grads, grads64):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        # a gradient beyond the dtype's range (float16 at magnitudes of 1e4: 2 (a - b) > 65504)
        # rounds to inf, as it must; every other element is finite and close. Within the fp32
        # computation's rounding of the boundary (largest finite value + half an ulp) either is right
        info = torch.finfo(grad.dtype)
        boundary = info.max + math.ldexp(info.eps, math.frexp(info.max)[1] - 2)   # + half the top ulp
        fits, overflows = grad64.abs() < boundary * (1 - 1e-4), grad64.abs() > boundary * (1 + 1e-4)
        assert torch.isfinite(grad[fits]).all() and torch.isinf(grad[overflows]).all(), name
        # a per-sample input's gradient (weight, logvar) is made of terms of size red = 1 / B
        # ("mean") or 1: its error is the dtype's eps of those, however small their sum
        red = 1.0 / inputs[name].shape[0] if reduction == "mean" else 1.0
        assert_close_scaled(grad[fits], grad64[fits], inputs[name].dtype, f"d{name}",
                            floor=red if inputs[name].dim() == 1 else 0.0)


def check_deterministic(case: LossCase, inputs: dict) -> None:
    """Bit-identical loss and gradient across runs and thread counts on the cpu backend."""
    name = case.differentiable[0]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            x = inputs[name].detach().requires_grad_()
            with fk.use_backend("cpu"):
                loss = case.fn(**inputs | {name: x}, **case.kwargs)
                (grad,) = torch.autograd.grad(loss, x)
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
