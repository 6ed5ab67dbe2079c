"""The reference adaLN-Zero DiT (Peebles & Xie 2023) built on the project's fused ops.

Tokens x (B, L, D) from a patchified latent; c = t_emb(t) + y_emb(class) [+ r_emb(t - r)]. Each block:

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)   (zero-initialized)
    x = x + gate1 * proj(attention(qkv(LN(x) * (1 + scale1) + shift1)))
    x = x + gate2 * fc2(gelu_tanh(fc1(LN(x) * (1 + scale2) + shift2)))

``fused=True`` (the default) runs ``modulated_layer_norm``, ``attention``, ``gelu_tanh`` and
``gated_residual``; ``fused=False`` runs the same math as plain PyTorch (F.layer_norm, SDPA,
nn.GELU, x + g * y), which is the eager baseline of the benchmarks and the oracle of the tests.
After ``quantize_fp8`` and ``fuse_epilogues`` the linear layers are FP8 and carry the GELU, gate
and residual in their epilogue. Optional: QK-norm (RMSNorm per head), a log-variance head u(t)
for sCM's adaptive weighting, a second time input r for flow maps (MeanFlow), embedded as t - r.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastgen_kernels as fk
from fastgen_kernels.ops.constant_operands import add_constant, mul_constant
from fastgen_kernels.ops.linear import linear
from fastgen_kernels.quantization import Fp8Linear, reads_e4m3
from fastgen_kernels.serialization import save_tensors

PRESETS = {  # name: (depth, hidden_size, num_heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32          # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000       # 0: unconditional; the label num_classes means "no class" (CFG)
    qk_norm: bool = False
    logvar_head: bool = False     # u(t) for sCM's adaptive weighting
    second_time: bool = False     # a flow map's r

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        """``"XL/2"`` -> DiT-XL with patch 2 (also S, B, L; patch 2, 4 or 8)."""
        size, _, patch = name.partition("/")
        if size not in PRESETS:
            raise ValueError(f"DiTConfig.preset: unknown size {size!r}; expected one of {tuple(PRESETS)}")
        depth, hidden, heads = PRESETS[size]
        return cls(**{"depth": depth, "hidden_size": hidden, "num_heads": heads,
                      "patch_size": int(patch or 2), **overrides})


def timestep_frequencies(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim / 2)): (B,) -> (B, dim), in fp32
    (fp64 for fp64 t)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = mul_constant(t.to(dtype)[:, None], freqs[None])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_position_embedding(dim: int, grid: int) -> Tensor:
    """The fixed 2-D sine-cosine position table of DiT/MAE, (grid * grid, dim), with the row (y)
    half first where MAE's code puts the column (x) half first: the table of the transposed grid
    (the shipped teacher learned this one; official DiT weights would need the halves swapped)."""
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(ys), embed(xs)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t (B,) -> MLP(sinusoidal(t)) (B, D)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor, fused: bool = False) -> Tensor:
        first, act, second = self.mlp
        h = act(_linear(first, timestep_frequencies(t, self.frequency_dim).to(_input_dtype(first)), fused))
        return _linear(second, h, fused)


def _input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype to give a linear layer's input: its weight's, or for an FP8 layer (e4m3 weight,
    the input quantized inside) its bias's, fp32 without one."""
    if isinstance(layer, Fp8Linear):
        return torch.float32 if layer.bias is None else layer.bias.dtype
    return layer.weight.dtype


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def heads(self, qkv: Tensor, fused: bool) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) v from qkv (B, L, 3D), heads merged back: (B, L, D) before proj."""
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, L, 3, self.num_heads, D // self.num_heads).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused:
            return fk.attention(q, k, v).reshape(B, L, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)


# Under autocast the modulation and the linear layers' outputs are bf16 while the residual stream
# x stays fp32 (the patch embedding plus the fp32 position table): eager PyTorch promotes, the
# fused ops take their inputs in x's dtype.


def _modulated_ln(x: Tensor, shift: Tensor, scale: Tensor, fused: bool) -> Tensor:
    if fused:
        return fk.modulated_layer_norm(x, shift.to(x.dtype), scale.to(x.dtype), eps=1e-6)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _norm_linear(x: Tensor, shift: Tensor, scale: Tensor, layer: nn.Module, fused: bool) -> Tensor:
    """layer(modulated LN of x). Fused with a plain nn.Linear, the norm's output is recomputed in
    the backward rather than kept; with an FP8 layer on a device with e4m3, the norm writes its
    output as the layer's per-token e4m3 input (no pass to quantize it); a wrapped (e.g. LoRA)
    layer takes the norm's output."""
    if fused and type(layer) is nn.Linear:
        return fk.modulated_layer_norm_linear(x, shift.to(x.dtype), scale.to(x.dtype), layer.weight, layer.bias,
                                              eps=1e-6)
    if fused and reads_e4m3((layer,), x.device):
        codes, x_scale = fk.modulated_layer_norm_fp8(x, shift.to(x.dtype), scale.to(x.dtype), eps=1e-6)
        return layer(codes, x_scale=x_scale, out_dtype=x.dtype)
    return layer(_modulated_ln(x, shift, scale, fused))


def _linear(layer: nn.Module, x: Tensor, fused: bool) -> Tensor:
    """layer(x); fused with a plain nn.Linear, through ops.linear: in the distillation methods'
    forward-mode AD its tangent is one GEMM, not PyTorch's two, and its bias adds no host cost
    (PyTorch's rule gives the bias a zero tangent whose sum with the output's tangent it sizes
    by running the op on meta tensors through Python, 0.1-0.2 ms a call)."""
    if fused and type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def _modulation(modulation: nn.Module, c: Tensor, fused: bool, c_silu: Tensor | None = None) -> Tensor:
    """modulation(c); fused, DiT's Sequential(SiLU, Linear) with the Linear through :func:`_linear`,
    on ``c_silu`` = SiLU(c) where the caller has it (DiT.forward computes it once for every block:
    a SiLU, its tangent's five ops and its backward a block each fewer)."""
    if fused and isinstance(modulation, nn.Sequential) and len(modulation) == 2 and type(modulation[0]) is nn.SiLU:
        return _linear(modulation[1], modulation[0](c) if c_silu is None else c_silu, fused)
    return modulation(c)


def _norm_modulation(modulation: Tensor, x: Tensor, norms: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """((shift, scale) of each of ``norms`` norms, (gate) of each but a final layer's) from the
    (B, k D) adaLN modulation, laid out (shift, scale[, gate]) per norm: the shifts and scales in
    the residual stream's dtype (the fused norms take theirs in x's), contiguous, by one cast;
    the gates as they are (the gated residual reads a bf16 gate beside bf16 y; an fp32 one made
    it widen y). One cast where a cast per part was four small kernels a block each way, and
    again for the tangents."""
    B, D = modulation.shape[0], x.shape[-1]
    per_norm = modulation.shape[-1] // (norms * D)  # 3: shift, scale, gate; 2: no gate
    shifts_scales, gates = modulation.view(B, norms, per_norm, D).split([2, per_norm - 2], dim=2)
    shifts_scales = shifts_scales.movedim(0, 2).to(x.dtype, copy=True, memory_format=torch.contiguous_format)
    gates = tuple(gates.squeeze(2).unbind(1)) if per_norm == 3 else ()
    return tuple(shifts_scales.view(2 * norms, B, D).unbind(0)), gates


def _gelu_linear(h: Tensor, mlp: Mlp, fused: bool) -> Tensor:
    """fc2(GELU(h)). Fused with a plain nn.Linear fc2, the GELU's output is recomputed in the
    backward rather than kept next to h."""
    if not fused:
        return mlp.fc2(mlp.act(h))
    if type(mlp.fc2) is nn.Linear:
        return fk.gelu_tanh_linear(h, mlp.fc2.weight, mlp.fc2.bias)
    return mlp.fc2(fk.gelu_tanh(h))


def _gated_residual(x: Tensor, y: Tensor, gate: Tensor, fused: bool) -> Tensor:
    return fk.gated_residual(x, y, gate) if fused else x + gate[:, None] * y


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.attn = Attention(D, config.num_heads, config.qk_norm)
        self.mlp = Mlp(D, int(D * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.fused = True
        # set by fuse_epilogues: fc1 carries the GELU, proj and fc2 the gate and the residual
        self.fused_epilogues = False

    def fuse_fp8_epilogues(self) -> bool:
        """GELU into fc1's epilogue, gate and residual into proj's and fc2's, when all three are
        FP8 layers (see ``fastgen_kernels.fuse_epilogues``); True if done."""
        layers = (self.attn.proj, self.mlp.fc1, self.mlp.fc2)
        if self.fused_epilogues or not all(isinstance(layer, Fp8Linear) for layer in layers):
            return False
        self.mlp.fc1.activation = "gelu_tanh"
        self.fused_epilogues = True
        return True

    def forward(self, x: Tensor, c: Tensor, c_silu: Tensor | None = None) -> Tensor:
        """x (B, L, D), c (B, D) the conditioning; ``c_silu``: SiLU(c), where the caller computed it
        once for several blocks (used by the fused path)."""
        modulation = _modulation(self.adaLN_modulation, c, self.fused, c_silu)
        if self.fused and not self.fused_epilogues:
            (shift1, scale1, shift2, scale2), (gate1, gate2) = _norm_modulation(modulation, x, 2)
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        a = self.attn.heads(_norm_linear(x, shift1, scale1, self.attn.qkv, self.fused), self.fused)
        if self.fused_epilogues:
            x = self.attn.proj(a, gate=gate1, residual=x)
            h = _norm_linear(x, shift2, scale2, self.mlp.fc1, self.fused)
            return self.mlp.fc2(h, gate=gate2, residual=x)
        x = _gated_residual(x, _linear(self.attn.proj, a, self.fused), gate1, self.fused)
        h = _norm_linear(x, shift2, scale2, self.mlp.fc1, self.fused)
        return _gated_residual(x, _gelu_linear(h, self.mlp, self.fused), gate2, self.fused)


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, p * p * config.in_channels)

    def forward(self, x: Tensor, c: Tensor, fused: bool, c_silu: Tensor | None = None) -> Tensor:
        modulation = _modulation(self.adaLN_modulation, c, fused, c_silu)
        shift, scale = _norm_modulation(modulation, x, 1)[0] if fused else modulation.chunk(2, dim=-1)
        return _norm_linear(x, shift, scale, self.linear, fused)


class DiT(nn.Module):
    """``DiT(config)(x, t, cond=None, r=None)``: x (B, C, H, W), t (B,) (any scale: the network
    embeds it sinusoidally), cond (B,) class labels (None or ``num_classes``: unconditional),
    r (B,) the flow map's second time. Returns the prediction shaped like x; with
    ``return_logvar=True`` also u(t) (B,) from the log-variance head."""

    def __init__(self, config: DiTConfig | None = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config or DiTConfig(), **overrides)
        self.config = config
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        if config.input_size % p or D % config.num_heads or (D // config.num_heads) % 2 or D % 4:
            raise ValueError(f"DiT: input_size {config.input_size} must be a multiple of patch_size {p} and "
                             f"hidden_size {D} a multiple of 2 * num_heads ({config.num_heads}) and of 4 (the "
                             "2-D sine-cosine position table)")
        self.x_embedder = nn.Conv2d(C, D, kernel_size=p, stride=p)
        grid = config.input_size // p
        self.register_buffer("pos_embed", sincos_position_embedding(D, grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(D)
        self.r_embedder = TimestepEmbedder(D) if config.second_time else None
        self.y_embedder = nn.Embedding(config.num_classes + 1, D) if config.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.logvar_linear = nn.Linear(self.t_embedder.frequency_dim, 1) if config.logvar_head else None
        self.fused = True
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: dict | DiTConfig) -> DiT:
        return cls(config if isinstance(config, DiTConfig) else DiTConfig(**config))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiT:
        return cls(DiTConfig.preset(name, **overrides))

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier-uniform linears, zero adaLN modulation and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for embedder in (self.t_embedder, self.r_embedder):
            if embedder is not None:
                for layer in (embedder.mlp[0], embedder.mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02)
        for module in list(self.blocks) + [self.final_layer]:
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_fused(self, fused: bool = True) -> DiT:
        """Fused kernels (True) or the plain PyTorch composition (False) in every block."""
        for block in self.blocks:
            block.fused = fused
        self.fused = fused
        return self

    def condition(self, t: Tensor, cond: Tensor | None, r: Tensor | None) -> Tensor:
        """c = t_emb(t) [+ y_emb(cond)] [+ r_emb(t - r)]: (B, D)."""
        c = self.t_embedder(t, self.fused)
        if self.y_embedder is not None:
            if cond is None:
                cond = torch.full_like(t, self.config.num_classes, dtype=torch.long)
            if cond.dtype.is_floating_point or cond.dim() != 1 or cond.shape[0] != t.shape[0]:
                raise ValueError(f"DiT: cond must be ({t.shape[0]},) integer class labels, got "
                                 f"{tuple(cond.shape)} {cond.dtype}")
            c = add_constant(c, self.y_embedder(cond))
        if self.r_embedder is not None:
            if r is None:
                raise ValueError("DiT: this network takes a second time r (config.second_time)")
            c = c + self.r_embedder(t - r, self.fused)
        elif r is not None:  # a flow map on it would not depend on r
            raise ValueError("DiT: this network takes no second time r (build it with second_time=True)")
        return c

    def patch_embedding(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> tokens (B, L, D), contiguous. Fused, the stride-p convolution runs as
        the linear layer it is over the flattened (C, p, p) patches (a copy of x, D / (C p^2)
        times smaller than the tokens): the convolution's (B, D, L) output read as (B, L, D) made
        the first block's residual stream non-contiguous, which every op of that block copied."""
        conv = self.x_embedder
        if not (self.fused and type(conv) is nn.Conv2d):
            return conv(x).flatten(2).transpose(1, 2)
        B, C, H, W = x.shape
        p, g = self.config.patch_size, H // self.config.patch_size
        patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        return linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None,
                return_logvar: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        cfg = self.config
        B, C, H, W = x.shape
        if C != cfg.in_channels or H != cfg.input_size or W != cfg.input_size:
            raise ValueError(f"DiT: x must have shape (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), "
                             f"got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        dtype = self.x_embedder.weight.dtype
        tokens = add_constant(self.patch_embedding(x.to(dtype)), self.pos_embed.to(dtype))
        c = self.condition(t, cond, None if r is None else torch.as_tensor(r, device=x.device).reshape(-1).expand(B))
        c = c.to(tokens.dtype)
        c_silu = F.silu(c) if self.fused else None  # each block's adaLN input, computed once
        for block in self.blocks:
            tokens = block(tokens, c, c_silu)
        out = self.final_layer(tokens, c, self.fused, c_silu)
        p, g = cfg.patch_size, H // cfg.patch_size
        out = out.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        if return_logvar:
            if self.logvar_linear is None:
                raise ValueError("DiT: return_logvar needs config.logvar_head=True")
            frequencies = timestep_frequencies(t, self.t_embedder.frequency_dim).to(_input_dtype(self.logvar_linear))
            # u (B,) as a tensor of its own: FSDP2 warns of a view among a sharded module's outputs
            return out, self.logvar_linear(frequencies).reshape(B).clone()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """The weights as a safetensors file (the config goes with a Denoiser's fastgen.json)."""
        save_tensors(self.state_dict(), path, metadata={"config": str(dataclasses.asdict(self.config))})

    def load(self, path: str | os.PathLike) -> DiT:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path), device=str(self.x_embedder.weight.device)))
        return self
