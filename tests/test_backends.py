"""The backend registry: automatic choice, forcing by context manager and environment, errors."""

import logging

import pytest
import torch

import fastgen_kernels as fk
from fastgen_kernels import _extension, backends
from fastgen_kernels.ops import modulated_norm as mn


def args():
    x = torch.randn(2, 3, 8)
    mod = torch.randn(2, 8)
    return (x, mod, mod, None, None, 1e-6, False)


def test_automatic_choice_on_cpu():
    expected = "cpu" if _extension.cpu_built() else "reference"
    assert mn.forward_dispatcher.select(*args()) == expected


def test_empty_input_falls_back_to_reference():
    x = torch.randn(0, 3, 8)
    mod = torch.randn(0, 8)
    assert mn.forward_dispatcher.select(x, mod, mod, None, None, 1e-6, False) == "reference"
    y = fk.modulated_layer_norm(x, mod, mod)
    assert y.shape == x.shape


def test_use_backend_forces_and_restores():
    with fk.use_backend("reference"):
        assert mn.forward_dispatcher.select(*args()) == "reference"
        with fk.use_backend(None):
            assert mn.forward_dispatcher.select(*args()) != "reference" or not _extension.cpu_built()
    assert backends.forced_backend() == (None, "")


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("FASTGEN_BACKEND", "reference")
    assert mn.forward_dispatcher.select(*args()) == "reference"
    with fk.use_backend(None):  # automatic choice inside, the variable notwithstanding (it held)
        assert backends.forced_backend() == (None, "")
    monkeypatch.setenv("FASTGEN_BACKEND", " Reference ")
    assert backends.forced_backend() == ("reference", "FASTGEN_BACKEND")
    monkeypatch.setenv("FASTGEN_BACKEND", "auto")
    assert backends.forced_backend() == (None, "")
    monkeypatch.setenv("FASTGEN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTGEN_BACKEND: unknown backend 'fastest'"):
        mn.forward_dispatcher.select(*args())


def test_context_manager_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTGEN_BACKEND", "cuda")
    with fk.use_backend("reference"):
        assert mn.forward_dispatcher.select(*args()) == "reference"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with fk.use_backend("gpu"):
            pass


def test_forced_backend_that_cannot_run_raises_with_reason():
    with fk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested via use_backend"):
            fk.modulated_layer_norm(*args()[:3])


def test_forced_kernel_backend_rejects_fp64():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mod = torch.randn(2, 8, dtype=torch.float64)
    with fk.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64 input"):
            fk.modulated_layer_norm(x, mod, mod)


def test_fallback_is_logged_once(caplog):
    dispatcher = backends.OpDispatcher(
        "fastgen.test_op", {"cpu": lambda x: x + 1, "reference": lambda x: x + 2},
        {"cpu": lambda x: "odd reason"})
    with caplog.at_level(logging.WARNING, logger="fastgen_kernels"):
        for _ in range(3):
            assert dispatcher(torch.zeros(1)).item() == 2
    records = [r for r in caplog.records if "fastgen.test_op" in r.message]
    assert len(records) == 1
    assert "using the reference backend" in records[0].message and "odd reason" in records[0].message


def test_a_dispatcher_call_is_a_profiler_range_named_after_its_op():
    """Under the profiler a dispatcher's call is a range named after the op (where a GPU profile
    attributes the op's Triton kernels, which are no op of their own)."""
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    for backend in ("reference", *(("cpu",) if _extension.cpu_built() else ())):
        with torch.profiler.profile() as prof, fk.use_backend(backend):
            fk.modulated_layer_norm(x, shift, scale)
        names = [event.name for event in prof.events()]
        assert names.count(mn.forward_dispatcher.name) == 1, names


def test_dispatcher_requires_a_reference():
    with pytest.raises(ValueError, match="must include 'reference'"):
        backends.OpDispatcher("fastgen.bad", {"cpu": lambda x: x})


@pytest.mark.parametrize("op", ["gated_residual", "modulated_layer_norm_linear", "denoising_loss"])
def test_the_forwards_forced_backend_reaches_the_backward_on_another_thread(op, monkeypatch):
    """Autograd runs the backward of CUDA tensors on a thread of its own, where use_backend's
    context variable is unset: each op's backward takes the backend forced at its forward
    (emulated on the CPU by a backward on a new thread, outside the block)."""
    import threading

    used = []
    for module in ("gated_residual", "modulated_norm", "squared_residual"):
        dispatcher = fk.ops.OP_MODULES[module].backward_dispatcher
        monkeypatch.setattr(dispatcher, "select", lambda *args, _select=dispatcher.select:
                            used.append(_select(*args)) or used[-1])
    x = torch.randn(2, 3, 8, requires_grad=True)
    mod, weight = torch.randn(2, 8), torch.randn(5, 8, requires_grad=True)
    with fk.use_backend("reference"):
        out = {"gated_residual": lambda: fk.gated_residual(x, x * 2, mod),
               "modulated_layer_norm_linear": lambda: fk.modulated_layer_norm_linear(x, mod, mod, weight),
               "denoising_loss": lambda: fk.losses.denoising_loss(x, torch.zeros_like(x))}[op]()
    thread = threading.Thread(target=lambda: out.sum().backward())
    thread.start()
    thread.join()
    assert used and set(used) == {"reference"} and x.grad is not None
