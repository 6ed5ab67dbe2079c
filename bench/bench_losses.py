"""The fused losses (fastgen_kernels.losses), forward + backward, against the eager PyTorch
composition training code writes and torch.compile of it.

Run: ``pytest bench/bench_losses.py`` (add ``--benchmark-json=out.json`` for the record).
Shapes: SD latents B=64 x 4x64x64 and Wan-style video latents B=8 x 16x60x104 (fp32 and bf16).
Every loss is timed with its per-sample inputs (weights, times, log-variance) and the gradient of
its first input. Bytes moved (analytic minimum): each (B, ...) input read once forward; the
backward reads what the gradient needs and writes it (VSD: T, Fk, dx_g; denoising, consistency:
pred, target, dpred; MeanFlow: u, v, J, du; sCM: F, dx_t/dt, J, x_t (F_minus is F), dF; GAN:
logits, dlogits).

Besides time, ``extra_info`` records ``peak_extra_bytes``: the most memory the step holds at once
beyond its inputs (so activations of the composition, pseudo-targets, gradients), and its ratio
to eager's (measured by conftest.peak_extra_bytes).

On a GPU ``test_loss_forward_backward_graphed`` also times each step as replays of a CUDA graph of
its calls (``conftest.Graphed``, mode ``cuda_graph``), eager and torch.compile included: the
kernels' time, as a graphed training step (``TrainerConfig(cuda_graph=True)``) sees it. One call
at a time these sizes are bound by the host: PyTorch's autograd engine alone takes longer per
``autograd.grad`` than the loss's kernels (the H200 run: our four launches 10-25 us of kernels in
a 0.19-0.40 ms call).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_PROVIDERS, Graphed, peak_extra_bytes, pick_provider, rotating, run

import fastgen_kernels as fk

SHAPES = [(64, 4, 64, 64), (8, 16, 60, 104)]
DTYPES = [torch.float32, torch.bfloat16]
_peer_peak: dict = {}


def _dims(x):
    return tuple(range(1, x.dim()))


def _view(v, x):
    return v.view((-1,) + (1,) * (x.dim() - 1))


# The eager compositions, as training code writes them from the papers' formulas, in fp32.


def eager_vsd(x_g, teacher, fake, weight):
    w = 1 / ((x_g - teacher).abs().mean(_dims(x_g), keepdim=True) + 1e-6)
    grad = (fake - teacher) * (w * _view(weight, x_g))
    target = (x_g - grad).detach()
    return 0.5 * F.mse_loss(x_g.float(), target.float())


def eager_denoising(pred, target, weight):
    return (weight * (pred.float() - target.float()).square().mean(_dims(pred))).mean()


def eager_consistency(pred, target, weight):
    c = 0.00054 * math.sqrt(pred[0].numel())
    sq = (pred.float() - target.detach().float()).square().sum(_dims(pred))
    return (weight * (torch.sqrt(sq + c * c) - c)).mean()


def eager_meanflow(u, v, jvp, t, r):
    target = (v.float() - _view(t - r, u) * jvp.float()).detach()
    e = (u.float() - target).square().sum(_dims(u))
    return ((e.detach() + 1e-3) ** -1.0 * e).mean()


def eager_scm(F_, dxt_dt, jvp, x_t, t, logvar, sigma_data=0.5):
    cos, sin = _view(torch.cos(t), F_), _view(torch.sin(t), F_)
    F_minus = F_.detach().float()
    g = -cos**2 * (sigma_data * F_minus - dxt_dt.float()) - (cos * sin * x_t.float() + sigma_data * jvp.float())
    g = g / _view(g.flatten(1).norm(dim=1) / math.sqrt(F_[0].numel()) + 0.1, F_)
    mse = (F_.float() - F_minus - g).square().mean(_dims(F_))
    return (mse / (sigma_data * torch.tan(t)) / torch.exp(logvar) + logvar).mean()


def eager_gan(logits_fake):
    return F.softplus(-logits_fake.float()).mean()


def fused_scm(F_, dxt_dt, jvp, x_t, t, logvar):
    return fk.losses.scm_loss(F_, F_.detach(), dxt_dt, jvp, x_t, t, logvar)


def weight(batch, device):
    return (torch.rand(batch, device=device) + 0.5,)


def times(batch, device):
    t = torch.rand(batch, device=device) * 0.9 + 0.05
    return t, t * torch.rand(batch, device=device)


def trigflow(batch, device):
    return torch.rand(batch, device=device) * 1.4 + 0.05, torch.randn(batch, device=device)


LOSSES = {
    # name: (eager, fused, (B, ...) inputs, per-sample inputs, reads + writes of whole tensors)
    "vsd": (eager_vsd, fk.losses.vsd_loss, 3, weight, 6),
    "denoising": (eager_denoising, fk.losses.denoising_loss, 2, weight, 5),
    "consistency": (eager_consistency, fk.losses.consistency_loss, 2, weight, 5),
    "meanflow": (eager_meanflow, fk.losses.meanflow_loss, 3, times, 7),
    "scm": (eager_scm, fused_scm, 4, trigflow, 9),
    "gan": (eager_gan, fk.losses.gan_loss, 1, lambda batch, device: (), 3),
}
COMPILED = {name: torch.compile(spec[0], dynamic=False) for name, spec in LOSSES.items()}


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_forward_backward(benchmark, device, loss, shape, dtype, provider):
    fn, backend = pick_provider(provider, device, LOSSES[loss][0], COMPILED[loss], LOSSES[loss][1])
    step, n, itemsize = stepper(device, loss, shape, dtype)
    eager, passes = LOSSES[loss][0], LOSSES[loss][4]
    benchmark.group = f"{loss}_loss {device} {dtype} forward_backward {'x'.join(map(str, shape))}"
    key = (loss, device, shape, dtype)
    step(fn, backend)  # compile / warm up before measuring memory
    peak = peak_extra_bytes(lambda: step(fn, backend), device)
    if key not in _peer_peak:
        step(eager, None)
        _peer_peak[key] = peak_extra_bytes(lambda: step(eager, None), device)
    run(benchmark, lambda: step(fn, backend), device, peer_key=key, peer_fn=lambda: step(eager, None),
        bytes_moved=passes * n * itemsize, op=f"{loss}_loss", provider=provider, dtype=str(dtype),
        mode="forward_backward", shape=list(shape), peak_extra_bytes=peak,
        peer_peak_extra_bytes=_peer_peak[key], memory_vs_peer=peak / max(_peer_peak[key], 1))


def stepper(device: str, loss: str, shape: tuple, dtype: torch.dtype):
    """(step(fn, backend): one forward + backward of ``fn`` on the next of the rotating input sets,
    under ``backend``; the elements per input; their item size)."""
    num_inputs, per_sample = LOSSES[loss][2], LOSSES[loss][3]
    n = torch.Size(shape).numel()
    itemsize = torch.empty(0, dtype=dtype).element_size()

    def make_inputs():
        first = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        others = (torch.randn(shape, device=device, dtype=dtype) for _ in range(num_inputs - 1))
        return (first, *others, *per_sample(shape[0], device))

    next_inputs = rotating(make_inputs, device, num_inputs * n * itemsize)

    def step(fn, backend):
        inputs = next_inputs()
        with fk.use_backend(backend):
            torch.autograd.grad(fn(*inputs), inputs[0])

    return step, n, itemsize


@pytest.mark.parametrize("provider", ["eager", "compile", "cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_forward_backward_graphed(benchmark, device, loss, shape, dtype, provider):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    fn, backend = pick_provider(provider, device, LOSSES[loss][0], COMPILED[loss], LOSSES[loss][1])
    step, n, itemsize = stepper(device, loss, shape, dtype)
    eager = LOSSES[loss][0]

    def graphed(fn, backend):
        step(fn, backend)  # compile before the capture
        return Graphed(lambda: step(fn, backend))

    benchmark.group = f"{loss}_loss {device} {dtype} cuda_graph {'x'.join(map(str, shape))}"
    run(benchmark, graphed(fn, backend), device, peer_key=(loss, device, shape, dtype, "graphed"),
        peer_fn=graphed(eager, None), bytes_moved=LOSSES[loss][4] * n * itemsize, op=f"{loss}_loss",
        provider=provider, dtype=str(dtype), mode="cuda_graph", shape=list(shape))
