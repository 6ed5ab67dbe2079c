"""attention forward, backward and JVP against PyTorch's SDPA backends, torch.func.jvp through math
attention and the finite-difference JVP.

Run: ``pytest bench/bench_attention.py`` (add ``--benchmark-json=out.json`` for the record).

Shapes (B, L, H, Dh) on a GPU: DiT-XL/2 at 256 px and 512 px, Flux (24 x 128 heads, 4096 tokens)
and a long video sequence (Wan 2.1 14B's 40 x 128 heads, 32760 tokens). On the CPU, smaller DiT-XL
batches (a CPU run is a smoke test of the ratios, not the target).

FLOPs, FlashAttention's count per (query, key) pair and head dim, the same for every provider of
a mode so TFLOP/s compares like with like: forward 4 (S = q k^T, P v); backward 10 (S again, dV,
dP, dQ, dK); JVP 12 (S, tq k^T, q tk^T, P v, P tv, (P * dS) v).

Peers: forward and backward against SDPA with PyTorch's own backend choice (each SDPA backend also
runs as its own row: flash, efficient, cudnn, math); the JVP against our own forward, whose 1.6x is
the goal (the finite-difference route costs two forwards). ``sdpa_<ours>_tangent`` is the one-pass
sCM step's way: SDPA's output, and our tangent kernel given it. On a GPU the JVP rows also record the
peak memory above the inputs (``extra_mb``): linear in L for ours, quadratic for math attention.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rotating, run
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastgen_kernels as fk
from fastgen_kernels import backends

GPU_SHAPES = {"dit_xl_256": (32, 256, 16, 72), "dit_xl_512": (32, 1024, 16, 72),
              "flux": (1, 4096, 24, 128), "video": (1, 32760, 40, 128)}
CPU_SHAPES = {"dit_xl_256_b2": (2, 256, 16, 72), "dit_xl_512_b1": (1, 1024, 16, 72)}
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}
FLOPS_PER_PAIR = {"forward": 4, "backward": 10, "jvp": 12}
# (B, L, H, Dh) tensors a call reads (q, k, v; the backward's O and upstream gradient; the JVP's
# tangents): the rotation's input sets, for the rows and their peers alike, add up past L2
READS = {"forward": 3, "backward": 5, "jvp": 6}
# math attention stores B*H*L^2 scores several times over: skip it where that cannot fit
MATH_MAX_SCORE_BYTES = 16 * 2**30


def heads_first(t):
    return t.transpose(1, 2)


def sdpa(q, k, v):
    """SDPA on (B, L, H, Dh) tensors, as diffusers calls it (transposed views, no copies)."""
    return heads_first(F.scaled_dot_product_attention(heads_first(q), heads_first(k),
                                                      heads_first(v)))


def math_attention(q, k, v):
    q, k, v = (heads_first(t) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return heads_first(torch.softmax(s.float(), -1).to(q.dtype) @ v)


def finite_difference_jvp(q, k, v, tq, tk, tv):
    """(O, tO) from two SDPA forwards, one-sided, step sqrt(eps) relative to the inputs."""
    h = torch.finfo(q.dtype).eps ** 0.5
    o = sdpa(q, k, v)
    return o, (sdpa(q + h * tq, k + h * tk, v + h * tv) - o) / h


def sdpa_output_our_tangent(q, k, v, tq, tk, tv):
    """(O, tO) as the one-pass sCM step makes them: O from SDPA, tO from our kernel given that O
    (its softmax normalizer recomputed online, not O)."""
    o = sdpa(q, k, v)
    scale = 1 / math.sqrt(q.shape[-1])
    return o, fk.ops.OP_MODULES["attention"].tangent_dispatcher(q, k, v, o, None, tq, tk, tv, scale, 0)


def ours_backend(device: str) -> str | None:
    if device == "cuda":
        return "triton" if backends.triton_installed() else None
    return "cpu" if fk._extension.cpu_built() else None


def providers(device: str, mode: str) -> dict:
    """name -> (function of (q, k, v, tq, tk, tv) returning what the mode times, backend)."""
    ours = ours_backend(device)
    out = {}
    if mode == "jvp":
        if ours:
            out[ours] = (lambda q, k, v, *t: fk.attention_jvp(q, k, v, *t), ours)
            out[f"{ours}_func_jvp"] = (
                lambda q, k, v, *t: torch.func.jvp(fk.attention, (q, k, v), tuple(t)), ours)
            if device == "cuda":  # the one-pass step's path (on the CPU that step runs no SDPA)
                out[f"sdpa_{ours}_tangent"] = (sdpa_output_our_tangent, ours)
        out["math_func_jvp"] = (
            lambda q, k, v, *t: torch.func.jvp(math_attention, (q, k, v), tuple(t)), None)
        out["fd_sdpa"] = (finite_difference_jvp, None)
        return out
    if ours:
        out[ours] = (lambda q, k, v, *t: fk.attention(q, k, v), ours)
    out["sdpa"] = (lambda q, k, v, *t: sdpa(q, k, v), None)
    if device == "cuda":
        for name, backend in SDPA_BACKENDS.items():
            out[name] = (lambda q, k, v, *t, backend=backend: _with_sdpa_backend(backend, q, k, v),
                         None)
    return out


def _with_sdpa_backend(backend, q, k, v):
    with sdpa_kernel(backend):
        return sdpa(q, k, v)


ALL_PROVIDERS = ["triton", "cpu", "sdpa", *SDPA_BACKENDS, "triton_func_jvp", "cpu_func_jvp",
                 "sdpa_triton_tangent", "math_func_jvp", "fd_sdpa"]
SHAPES = GPU_SHAPES | CPU_SHAPES


def _device_shapes(device: str) -> dict:
    return GPU_SHAPES if device == "cuda" else CPU_SHAPES


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "backward", "jvp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_attention(benchmark, device, shape_name, dtype, mode, provider):
    if shape_name not in _device_shapes(device):
        pytest.skip(f"{shape_name} is not a {device} shape")
    if device == "cuda" and dtype == torch.float32 and shape_name != "dit_xl_256":
        pytest.skip("fp32 only at the smallest GPU shape: bf16 is what the goals are about")
    if device == "cpu" and dtype == torch.bfloat16 and mode == "jvp":
        pytest.skip("the CPU JVP computes in fp32 either way")
    available = providers(device, mode)
    if provider not in available:
        pytest.skip(f"{provider} does not run {mode} on {device} here")
    B, L, H, Dh = SHAPES[shape_name]
    if provider.startswith(("sdpa_math", "math")) and B * H * L * L * 4 > MATH_MAX_SCORE_BYTES:
        pytest.skip("math attention's L x L scores do not fit in memory")
    fn, backend = available[provider]
    needs_grad = mode == "backward"

    def make_inputs():
        tensors = [torch.randn(B, L, H, Dh, device=device, dtype=dtype, requires_grad=needs_grad)
                   for _ in range(6)]  # q, k, v, tangents or upstream gradient
        if not needs_grad:
            return tensors
        with fk.use_backend(backend):
            o = fn(*tensors)
        return tensors[:3], o, tensors[3]

    try:  # one call, the backward included, before any input set is made
        with fk.use_backend(backend):
            probe = make_inputs()
            if needs_grad:
                torch.autograd.grad(probe[1], probe[0], probe[2])
            else:
                fn(*probe)
        del probe
    except RuntimeError as error:  # e.g. an SDPA backend without a kernel for this head dim
        pytest.skip(f"{provider}: {str(error).splitlines()[0][:120]}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    next_inputs = rotating(make_inputs, device, READS[mode] * B * L * H * Dh * itemsize)

    def step():
        with fk.use_backend(backend):
            if needs_grad:
                leaves, o, grad = next_inputs()
                torch.autograd.grad(o, leaves, grad, retain_graph=True)
            else:
                fn(*next_inputs())

    if mode == "jvp":
        peer, peer_fn = f"{ours_backend(device)} forward", _forward_step(device, B, L, H, Dh, dtype)
    else:
        peer, peer_fn = "sdpa", _sdpa_step(device, B, L, H, Dh, dtype, needs_grad)
    info = {}
    if device == "cuda" and mode == "jvp":
        info["extra_mb"] = _peak_extra_mb(step)
    benchmark.group = f"attention {device} {dtype} {mode} {shape_name}"
    run(benchmark, step, device, peer_key=(device, shape_name, dtype, mode), peer_fn=peer_fn,
        flops=FLOPS_PER_PAIR[mode] * B * H * L * L * Dh, peer=peer, op="attention",
        provider=provider, dtype=str(dtype), mode=mode, shape=[B, L, H, Dh], **info)


def _forward_step(device, B, L, H, Dh, dtype):
    """Our forward on input sets rotated as the rows' are."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    next_qkv = rotating(lambda: [torch.randn(B, L, H, Dh, device=device, dtype=dtype) for _ in range(3)], device,
                        READS["forward"] * B * L * H * Dh * itemsize)
    backend = ours_backend(device)
    return lambda: _forced(backend, fk.attention, *next_qkv())


def _sdpa_step(device, B, L, H, Dh, dtype, needs_grad):
    """SDPA's forward, or its backward (of a kept forward), on input sets rotated as the rows' are."""
    def make():
        q, k, v, g = (torch.randn(B, L, H, Dh, device=device, dtype=dtype, requires_grad=needs_grad)
                      for _ in range(4))
        return q, k, v, g, sdpa(q, k, v) if needs_grad else None

    itemsize = torch.empty(0, dtype=dtype).element_size()
    next_set = rotating(make, device, READS["backward" if needs_grad else "forward"] * B * L * H * Dh * itemsize)

    def step():
        q, k, v, g, o = next_set()
        if not needs_grad:
            return sdpa(q, k, v)
        return torch.autograd.grad(o, (q, k, v), g, retain_graph=True)

    return step


def _forced(backend, fn, *args):
    with fk.use_backend(backend):
        return fn(*args)


def _peak_extra_mb(step) -> float:
    """Peak memory of one call above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
