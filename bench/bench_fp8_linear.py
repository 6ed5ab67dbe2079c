"""fp8_linear (FP8 GEMM + fused epilogue) against torch._scaled_mm with separate epilogue ops,
_scaled_mm alone, bf16 F.linear + epilogue, and torch.compile of the bf16 composition.

Run: ``pytest bench/bench_fp8_linear.py`` (GPU with FP8, sm_89+; it skips elsewhere: the CPU path
is the reference). Shapes: DiT-XL tokens M = 8192 and 32768 with (N, K) in {1152x1152,
4608x1152, 1152x4608} and Flux-like 3072x3072 and 12288x3072. Each shape gets the epilogue of its
place in a DiT block: widening layers (N > K, MLP fc1) bias + GELU(tanh); the others (attention
out-projection, fc2) bias + adaLN-Zero gate (B = 4, per batch) + residual. FLOPs: 2 M N K; the
peer (``speedup_vs_peer``) is _scaled_mm + the separate epilogue ops: for the rows that take x in
bf16, x's per-token quantization by eager ops first (``scaled_mm_epilogue``); for the
pre-quantized rows, the same from x's codes (``scaled_mm_codes_epilogue``). ``scaled_mm``
(pre-quantized x, no epilogue) is the FP8 ceiling the fused kernel's TFLOP/s is compared with
(bench/summarize.py prints the speedup over it too). Each call takes the next of several input
sets (x, codes, weights, residual; ``conftest.rotating``): a replay's calls find none in L2.
The three ``fused_prequantized_<variant>`` rows force each GEMM variant (tiled; on Hopper
persistent TMA, and persistent TMA with the TMA-store epilogue); the op's own rows record in
``variant`` which one it measured fastest and took. Every provider is timed as replays of a CUDA
graph of its calls (``conftest.Graphed``, mode ``cuda_graph``): the kernels' time, which is what
the goals compare and what a graphed sampling loop sees; one call at a time the host's launch
cost of a Python op would be timed as well (a small GEMM takes 20-50 us on an H100/H200).

``test_dit_xl_forward``: the reference DiT-XL/2 (256px, 32x32x4 latents; batch 32 and 128, so
M = 8192 and 32768 tokens) end to end, quantized (``quantize_fp8`` + ``fuse_epilogues``) against the
same network in bf16 with the fused ops, both launched op by op (``forward``) and both replayed
from a CUDA graph (``cuda_graph``); ``snr_db`` is the FP8 output's signal-to-noise ratio against
the bf16 output (goals: 1.4x, 20 dB). FLOPs: 2 M N K of every linear layer of the blocks plus
4 B L^2 D of attention.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import Graphed, rotating, run

import fastgen_kernels as fk
from fastgen_kernels.models import DiT, DiTConfig
from fastgen_kernels.ops.fp8_linear import E4M3_MAX, MIN_AMAX

TOKENS = [8192, 32768]
LAYERS = [(1152, 1152), (4608, 1152), (1152, 4608), (3072, 3072), (12288, 3072)]  # (N, K)
FORCED_VARIANTS = {"fused_prequantized_tiled": "tiled", "fused_prequantized_persistent_tma": "persistent_tma",
                   "fused_prequantized_persistent_tma_store": "persistent_tma_store"}
PROVIDERS = ["fused", "fused_prequantized", *FORCED_VARIANTS, "scaled_mm_epilogue", "scaled_mm_codes_epilogue",
             "scaled_mm", "bf16_epilogue", "compile"]
PEER_NAMES = {"scaled_mm_epilogue": "quantize + scaled_mm + epilogue",
              "scaled_mm_codes_epilogue": "scaled_mm + epilogue"}
BATCH = 4


def _epilogue(y, bias, gate, residual, widening):
    y = y + bias
    if widening:
        return F.gelu(y, approximate="tanh")
    return residual + gate[:, None] * y.view(BATCH, -1, y.shape[-1])


def _quantize_rows(x):
    """Per-token e4m3 scaling as eager PyTorch writes it (the peers' quantizer), with the (M, 1)
    scale _scaled_mm takes."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(MIN_AMAX) / E4M3_MAX
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _bf16_layer(x, weight, bias, gate, residual, widening):
    return _epilogue(F.linear(x, weight), bias, gate, residual, widening)


_compiled_bf16_layer = torch.compile(_bf16_layer, dynamic=False)


def layer_inputs(device, tokens: int, N: int, K: int, widening: bool):
    """A callable returning the next of several sets of a layer's inputs (x, its e4m3 codes and
    scales, the FP8 weight and its bf16 dequantization, the residual), as many as keep each call's
    out of L2 (conftest.rotating): in a network each layer reads its own."""
    def make():
        x = torch.randn(tokens, K, device=device, dtype=torch.bfloat16)
        weight_q, weight_scale = fk.ops.quantize_weight(torch.randn(N, K, device=device) / K**0.5)
        codes, x_scale = _quantize_rows(x)
        return SimpleNamespace(
            x=x, codes=codes, x_scale=x_scale, weight_q=weight_q, weight_scale=weight_scale,
            w_bf16=(weight_q.float() * weight_scale[:, None]).to(torch.bfloat16),
            residual=None if widening else torch.randn(BATCH, tokens // BATCH, N, device=device, dtype=torch.bfloat16))

    return rotating(make, device, 3 * tokens * K + 3 * N * K + (0 if widening else 2 * tokens * N))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tokens", TOKENS)
def test_fp8_linear(benchmark, device, tokens, layer, provider):
    if device != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("an FP8 GPU benchmark (sm_89+): the CPU path is the reference")
    if "persistent_tma" in provider and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper (sm_90+)")
    from fastgen_kernels.triton_ops import fp8_linear as triton_fp8_linear

    N, K = layer
    widening = N > K
    next_inputs = layer_inputs(device, tokens, N, K, widening)
    bias = torch.randn(N, device=device, dtype=torch.bfloat16)
    gate = torch.randn(BATCH, N, device=device, dtype=torch.bfloat16)

    def epilogue(s):
        return dict(bias=bias, activation="gelu_tanh") if widening else dict(bias=bias, gate=gate, residual=s.residual)

    def scaled_mm(s, codes, x_scale):
        return torch._scaled_mm(codes, s.weight_q.t(), scale_a=x_scale, scale_b=s.weight_scale.view(1, -1),
                                out_dtype=torch.bfloat16)

    def forced(variant):
        def call():
            s = next_inputs()
            return triton_fp8_linear.linear(
                s.codes, s.x_scale.view(-1), s.weight_q, s.weight_scale, bias, "gelu_tanh" if widening else None,
                None if widening else gate, 1 if widening else tokens // BATCH,
                None if widening else s.residual.view(tokens, N), torch.bfloat16, variant=variant)
        return call

    def fused():
        s = next_inputs()
        return fk.ops.fp8_linear(s.x.view(BATCH, -1, K), s.weight_q, s.weight_scale, **epilogue(s))

    def fused_prequantized():
        s = next_inputs()
        return fk.ops.fp8_linear(s.codes.view(BATCH, -1, K), s.weight_q, s.weight_scale, x_scale=s.x_scale.view(-1),
                                 **epilogue(s))

    def scaled_mm_epilogue():  # x quantized by eager ops, the GEMM, the epilogue's ops
        s = next_inputs()
        return _epilogue(scaled_mm(s, *_quantize_rows(s.x)), bias, gate, s.residual, widening)

    def scaled_mm_codes_epilogue():  # the same from x's codes: the peer of the pre-quantized rows
        s = next_inputs()
        return _epilogue(scaled_mm(s, s.codes, s.x_scale), bias, gate, s.residual, widening)

    def scaled_mm_alone():
        s = next_inputs()
        return scaled_mm(s, s.codes, s.x_scale)

    def bf16_epilogue():
        s = next_inputs()
        return _bf16_layer(s.x, s.w_bf16, bias, gate, s.residual, widening)

    def compiled():
        s = next_inputs()
        return _compiled_bf16_layer(s.x, s.w_bf16, bias, gate, s.residual, widening)

    fns = {"fused": fused, "fused_prequantized": fused_prequantized,
           **{provider: forced(variant) for provider, variant in FORCED_VARIANTS.items()},
           "scaled_mm_epilogue": scaled_mm_epilogue, "scaled_mm_codes_epilogue": scaled_mm_codes_epilogue,
           "scaled_mm": scaled_mm_alone, "bf16_epilogue": bf16_epilogue, "compile": compiled}
    # the pre-quantized rows against the same GEMM and epilogue ops from the same codes; the others
    # (x quantized inside) against the ops that quantize x too
    peer = "scaled_mm_codes_epilogue" if provider.startswith("fused_prequantized") else "scaled_mm_epilogue"
    benchmark.group = f"fp8_linear {'fc1+gelu' if widening else 'gate+residual'} M={tokens} N={N} K={K}"
    with torch.no_grad(), fk.use_backend("triton"):
        fns[provider]()  # compile / autotune before timing (and before the graph's capture)
        if provider in FORCED_VARIANTS:
            benchmark.extra_info["variant"] = FORCED_VARIANTS[provider]
        elif provider.startswith("fused"):
            s = next_inputs()
            key = triton_fp8_linear.variant_key(s.codes, N, torch.bfloat16, epilogue(s).get("activation"),
                                                not widening, None if widening else s.residual.view(tokens, N))
            benchmark.extra_info["variant"] = triton_fp8_linear.VARIANT_CHOICES.get(key, "tiled")
        if benchmark.disabled:  # --benchmark-disable (bench/gpu_check.sh's compile pass): no graphs
            return
        run(benchmark, Graphed(fns[provider]), device, peer_key=("fp8_linear", tokens, layer, peer),
            peer_fn=Graphed(fns[peer]), flops=2 * tokens * N * K, peer=PEER_NAMES[peer], op="fp8_linear",
            provider=provider, dtype=str(torch.float8_e4m3fn), mode="cuda_graph", shape=[tokens, N, K])


@pytest.mark.parametrize("launch", ["forward", "cuda_graph"])
@pytest.mark.parametrize("batch", [32, 128])
def test_dit_xl_forward(benchmark, device, batch, launch):
    if device != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("an FP8 GPU benchmark (sm_89+)")
    config = DiTConfig.preset("XL/2", input_size=32, num_classes=1000)
    torch.manual_seed(0)
    net = DiT(config).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)  # random, and the adaLN-Zero gates not zero
    bf16 = copy.deepcopy(net).bfloat16().eval()
    fp8 = fk.fuse_epilogues(fk.quantize_fp8(net.bfloat16())).eval()
    x = torch.randn(batch, config.in_channels, 32, 32, device=device, dtype=torch.bfloat16)
    t = torch.rand(batch, device=device) * 1000
    labels = torch.arange(batch, device=device) % config.num_classes
    tokens = batch * (32 // config.patch_size) ** 2
    linear_flops = sum(2 * tokens * m.in_features * m.out_features for name, m in bf16.blocks.named_modules()
                       if isinstance(m, torch.nn.Linear) and "adaLN" not in name)  # adaLN: per sample
    flops = linear_flops + config.depth * 4 * batch * (tokens // batch) ** 2 * config.hidden_size
    with torch.no_grad():
        reference, out = bf16(x, t, labels).float(), fp8(x, t, labels).float()
        snr_db = 10 * math.log10(reference.square().sum() / (out - reference).square().sum())
        benchmark.group = f"DiT-XL/2 forward batch {batch}"
        benchmark.name = f"fp8_fused_epilogues_{launch}"
        ours, peer = lambda: fp8(x, t, labels), lambda: bf16(x, t, labels)
        if launch == "cuda_graph" and not benchmark.disabled:
            ours, peer = Graphed(ours), Graphed(peer)
        run(benchmark, ours, device, peer_key=("dit_xl", batch, launch), peer_fn=peer, flops=flops,
            peer="bf16 DiT-XL/2 (fused ops)", op="dit_forward", provider="fp8", dtype=str(torch.float8_e4m3fn),
            mode=launch, shape=[batch, config.in_channels, 32, 32], snr_db=snr_db)
