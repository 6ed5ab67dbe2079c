"""The inference path of the activation ops (ops/_eager_op.py ``no_autograd``): where autograd
cannot see a call, the public functions call their backend dispatcher directly. It must compute
exactly what the autograd path computes, and step aside whenever backward or forward mode (dual
tensors, torch.func) or a tracing mode needs the registered op."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastgen_kernels as fk
from fastgen_kernels.ops import _eager_op
from conftest import cpu_backends


def _inputs(generator):
    """op name -> (function, arguments); the rotary tables (qk_norm_rope's last two) are constants."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).float()

    x, y = randn(2, 5, 24), randn(2, 5, 24)
    q, k, v = randn(2, 5, 3, 8), randn(2, 7, 3, 8), randn(2, 7, 3, 8)
    angles = randn(5, 8)
    return {
        "modulated_layer_norm": (fk.modulated_layer_norm, (x, randn(2, 24), randn(2, 24), randn(24), randn(24))),
        "modulated_rms_norm": (fk.modulated_rms_norm, (x, randn(2, 5, 24), randn(2, 5, 24), randn(24))),
        "gated_residual": (fk.gated_residual, (x, y, randn(2, 24))),
        "attention": (fk.attention, (q, k, v)),
        "qk_norm_rope": (fk.qk_norm_rope, (q, randn(2, 5, 3, 8), randn(8), randn(8), angles.cos(),
                                           angles.sin())),
    }


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", ["modulated_layer_norm", "modulated_rms_norm", "gated_residual", "attention",
                                "qk_norm_rope"])
def test_inference_path_equals_autograd_path(op, backend, generator, monkeypatch):
    fn, args = _inputs(generator)[op]
    calls = []
    original = _eager_op.no_autograd
    monkeypatch.setattr(_eager_op, "no_autograd", lambda a: calls.append(original(a)) or calls[-1])
    with fk.use_backend(backend):
        with torch.no_grad():
            inference = _outputs(fn(*args))
        constants = 2 if op == "qk_norm_rope" else 0
        leaves = [a.detach().requires_grad_(i < len(args) - constants) for i, a in enumerate(args)]
        with_grad = _outputs(fn(*leaves))
    assert calls == [True, False]
    assert all(out.grad_fn is not None for out in with_grad)
    for a, b in zip(inference, with_grad, strict=True):
        assert not a.requires_grad and torch.equal(a, b.detach())


def test_no_autograd_sees_backward_forward_mode_and_tracing():
    x = torch.randn(2, 3)
    w = torch.randn(3, requires_grad=True)
    assert _eager_op.no_autograd((x, None, 1.0))
    assert not _eager_op.no_autograd((x, w))
    with torch.no_grad():
        assert _eager_op.no_autograd((x, w))
        with fwAD.dual_level():  # grad mode does not switch forward mode off
            assert not _eager_op.no_autograd((x,))
    assert not torch.func.vmap(lambda v: torch.tensor(_eager_op.no_autograd((v,))))(x).any()
    with torch.device("cpu"):  # a torch-function mode
        assert not _eager_op.no_autograd((x,))


def test_forward_mode_under_no_grad_keeps_its_tangent(generator):
    """Dual tensors under torch.no_grad: the op must still carry the tangent (forward AD is not
    switched off by grad mode), so the inference path must not take the call."""
    x = torch.randn(2, 5, 24, generator=generator, dtype=torch.float64)
    tx = torch.randn(2, 5, 24, generator=generator, dtype=torch.float64)
    gate = torch.randn(2, 24, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 5, 24, generator=generator, dtype=torch.float64)
    with torch.no_grad(), fwAD.dual_level():
        out = fk.gated_residual(fwAD.make_dual(x, tx), y, gate)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None and torch.equal(tangent, tx)
