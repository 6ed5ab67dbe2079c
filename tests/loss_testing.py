"""Helpers shared by the tests of the fused losses (fastgen_kernels.losses): random inputs, the
comparison of a loss and its gradients with an fp64 oracle, and the bad-input checks."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, assert_close_scaled

import fastgen_kernels as fk

# (B, ...) shapes: odd D = 3*37*37, B = 1, rank 2 and rank 4
SHAPES = [(2, 3, 37, 37), (1, 5), (3, 4, 8, 8)]


def randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def per_sample_weight(batch, generator):
    return torch.rand(batch, generator=generator, dtype=torch.float64).float() + 0.5


def check_against_oracle(loss_fn, oracle, inputs: dict, differentiable: list[str], dtype, backend,
                         reduction, **kwargs):
    """loss_fn(**inputs, reduction=...) on ``backend`` against ``oracle`` (per-sample losses, fp64,
    written from METHODS.md), value and gradients of the inputs named in ``differentiable``."""
    leaves = {k: v.detach().requires_grad_(k in differentiable) for k, v in inputs.items()}
    with fk.use_backend(backend):
        loss = loss_fn(**leaves, reduction=reduction, **kwargs)
        grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in differentiable])
    wide = {k: v.detach().double().requires_grad_(k in differentiable) for k, v in inputs.items()}
    per_sample = oracle(**wide, **kwargs)
    loss64 = per_sample.mean() if reduction == "mean" else per_sample
    grads64 = torch.autograd.grad(loss64.sum(), [wide[k] for k in differentiable])
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == loss64.shape
    assert_close(loss, loss64, loss.dtype, "loss")
    for name, grad, grad64 in zip(differentiable, grads, grads64):
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert torch.isfinite(grad).all(), name
        assert_close_scaled(grad, grad64, dtype, f"d{name}")


def check_bad_input(loss_fn, names: list[str]):
    """Wrong shape, dtype, device-less types and per-sample lengths raise, naming the argument."""
    x = torch.randn(2, 3, 4)
    good = {n: x for n in names}
    first, second = names[0], names[1]
    with pytest.raises(ValueError, match=rf"{second} must have shape \(2, 3, 4\)"):
        loss_fn(**good | {second: x[:, :2]})
    with pytest.raises(TypeError, match=rf"{second} must have {first}'s dtype"):
        loss_fn(**good | {second: x.double()})
    with pytest.raises(TypeError, match=rf"{first} must be float16"):
        loss_fn(**good | {first: x.int()})
    with pytest.raises(TypeError, match=rf"{second} must be a torch.Tensor"):
        loss_fn(**good | {second: 1.0})
    with pytest.raises(ValueError, match=rf"{first} must be a non-empty"):
        loss_fn(**{n: torch.randn(0, 3) for n in names})
    with pytest.raises(ValueError, match=r"weight must have shape \(B,\) = \(2,\)"):
        loss_fn(**good, weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        loss_fn(**good, weight=torch.ones(2, 1))
    with pytest.raises(TypeError, match="weight must be float16"):
        loss_fn(**good, weight=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss_fn(**good, reduction="sum")


def check_deterministic(loss_fn, inputs: dict, differentiable: str):
    """Bit-identical loss and gradient across runs and thread counts on the cpu backend."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            x = inputs[differentiable].detach().requires_grad_()
            with fk.use_backend("cpu"):
                loss = loss_fn(**inputs | {differentiable: x})
                (grad,) = torch.autograd.grad(loss, x)
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
