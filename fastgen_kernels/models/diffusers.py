"""diffusers models on the fused ops: ``accelerate``, ``from_diffusers`` and scheduler-driven sampling.

``accelerate(module)`` patches, in place, what it recognizes and reports the rest:

- ``Attention`` modules whose processor is diffusers' plain (``AttnProcessor2_0``) or joint
  (``JointAttnProcessor2_0``, SD3) processor, with no group/spatial norm and no residual rescaling:
  the processor becomes :class:`FusedAttnProcessor` / :class:`FusedJointAttnProcessor`
  (fused attention in the tokens-first layout, no head transposes; SDPA when a mask is given).
- ``AdaLayerNormZero`` (DiT, SD3): LayerNorm * (1 + scale) + shift in one fused op.
- ``BasicTransformerBlock`` with adaLN-Zero (DiT) or adaLN-single (PixArt): the whole block runs
  fused modulated norms, gated residuals and tanh-GELU (the attention processor takes the gate and
  the residual), and ``fuse_epilogues`` moves them into FP8 linear layers after ``quantize_fp8``;
  before FP8 q/k/v projections (and, with the epilogues fused, fc1) the norm writes their e4m3
  input itself (``modulated_layer_norm_fp8``: one quantization for q, k and v).

Blocks are patched by changing the instance's class to a subclass that overrides ``forward``
(weights, names and ``state_dict`` are untouched), so a patched model saves and loads as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastgen_kernels as fk
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.models.dit import DiT
from fastgen_kernels.quantization import Fp8Linear, reads_e4m3
from fastgen_kernels.schedules import VP

log = logging.getLogger(__name__)


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError("this needs diffusers: pip install 'fastgen_kernels[diffusers]'") from error
    return diffusers


def _project_out(attn: nn.Module, out: Tensor, gate: Tensor | None, residual: Tensor | None,
                 fp8_epilogue: bool) -> Tensor:
    """residual + gate * to_out(out) (each part optional), in to_out's epilogue when it is FP8."""
    proj = attn.to_out[0]
    if gate is not None and gate.dim() == 3:   # PixArt's (B, 1, D)
        gate = gate.squeeze(1)
    if fp8_epilogue and isinstance(proj, Fp8Linear):
        return proj(out, gate=gate, residual=residual)
    out = attn.to_out[1](proj(out))
    if gate is not None:
        return fk.gated_residual(residual, out, gate)  # autocast: bf16 out and gate, widened by the op
    return out if residual is None else out + residual


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """(B, L, H, Dh) -> (B, L, H * Dh): fused attention, or SDPA when there is a mask."""
    B, L = q.shape[:2]
    if mask is None:
        if not q.dtype == k.dtype == v.dtype:  # an fp32 qk-norm weight beside autocast's bf16 v
            dtype = (torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type)
                     else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # what SDPA does with them
        return fk.attention(q, k, v, scale=attn.scale).reshape(B, L, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2).reshape(B, L, -1)


class FusedAttnProcessor:
    """diffusers' AttnProcessor2_0 math on fused attention; also takes the adaLN gate and the
    residual (``residual + gate * to_out(attention)``) so a patched block can fuse them."""

    def __init__(self) -> None:
        self.fp8_epilogue = False

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 gate: Tensor | None = None, residual: Tensor | None = None, x_scale: Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> Tensor:
        """With ``x_scale``, hidden_states are e4m3 codes with these per-token scales (a patched
        block's norm wrote them for FP8 projections) and the projections output ``out_dtype``."""
        B = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])

        def project(layer: nn.Module, h: Tensor) -> Tensor:
            return layer(h) if x_scale is None or h is not hidden_states else layer(h, x_scale=x_scale,
                                                                                  out_dtype=out_dtype)

        q = _heads(project(attn.to_q, hidden_states), attn.heads)
        k, v = _heads(project(attn.to_k, context), attn.heads), _heads(project(attn.to_v, context), attn.heads)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = _attend(attn, q, k, v, attention_mask).to(q.dtype)
        return _project_out(attn, out, gate, residual, self.fp8_epilogue)


class FusedJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3: image and context tokens attend jointly) on fused
    attention, tokens-first: the two streams are concatenated along L, not after a transpose."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        L = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            cq, ck, cv = (_heads(proj(encoder_hidden_states), attn.heads)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        out = _attend(attn, q, k, v, attention_mask).to(q.dtype)
        sample = attn.to_out[1](attn.to_out[0](out[:, :L]))
        if encoder_hidden_states is None:
            return sample
        context = out[:, L:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return sample, context


def _layer_norm_parts(norm: nn.LayerNorm) -> tuple[Tensor | None, Tensor | None, float]:
    return norm.weight, norm.bias, norm.eps


def _modulated(x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm, layers: tuple[nn.Module, ...]
               ) -> tuple[Tensor, Tensor | None]:
    """(h, None): the modulated LayerNorm of x; or, when every one of ``layers`` (what reads it) is
    FP8 on a device with e4m3, (codes, scales): the norm written once as their per-token e4m3
    input (no pass to write h and one per layer to quantize it)."""
    shift, scale = shift.to(x.dtype), scale.to(x.dtype)
    if reads_e4m3(layers, x.device):
        return fk.modulated_layer_norm_fp8(x, shift, scale, *_layer_norm_parts(norm))
    return fk.modulated_layer_norm(x, shift, scale, *_layer_norm_parts(norm)), None


def _make_fused_norm_class(base: type) -> type:
    class FusedAdaLayerNormZero(base):
        """AdaLayerNormZero with LayerNorm * (1 + scale) + shift as one fused op."""

        def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
            if self.emb is not None:
                emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
            weight, bias, eps = _layer_norm_parts(self.norm)
            x = fk.modulated_layer_norm(x, shift_msa.to(x.dtype), scale_msa.to(x.dtype), weight, bias, eps)
            return x, gate_msa, shift_mlp, scale_mlp, gate_mlp

    return FusedAdaLayerNormZero


def _feed_forward(ff: nn.Module, h: Tensor) -> Tensor:
    """diffusers' FeedForward, its tanh-GELU (DiT's and PixArt's ``gelu-approximate``) as the fused
    ``gelu_tanh``, and with the output layer as ``gelu_tanh_linear`` (the GELU's output is not kept
    for the backward) where only a dropout that is off sits between them; other activations run as
    they are."""
    act = ff.net[0]
    if getattr(act, "approximate", None) != "tanh" or not isinstance(getattr(act, "proj", None), nn.Linear):
        return ff(h)
    h = act.proj(h)
    *between, out = ff.net[1:]
    if type(out) is nn.Linear and all(isinstance(m, nn.Dropout) and (m.p == 0 or not m.training) for m in between):
        return fk.gelu_tanh_linear(h, out.weight, out.bias)
    h = fk.gelu_tanh(h)
    for layer in ff.net[1:]:
        h = layer(h)
    return h


def _make_fused_block_class(base: type) -> type:
    class FusedBasicTransformerBlock(base):
        """BasicTransformerBlock (adaLN-Zero or adaLN-single) on fused modulated norms and gated
        residuals; the attention processors add the gated residuals."""

        fp8_epilogues = False

        def fuse_fp8_epilogues(self) -> bool:
            """GELU into the MLP's first FP8 layer, gate + residual into the attention out-projection
            and the MLP's second layer (see ``fastgen_kernels.fuse_epilogues``); True if done."""
            act, out = self.ff.net[0], self.ff.net[-1]
            layers = (getattr(act, "proj", None), out, self.attn1.to_out[0])
            if self.fp8_epilogues or getattr(act, "approximate", None) != "tanh" or \
                    not all(isinstance(layer, Fp8Linear) for layer in layers):
                return False
            act.proj.activation = "gelu_tanh"
            self.attn1.processor.fp8_epilogue = self.fp8_epilogues = True
            return True

        @contextlib.contextmanager
        def _unfused_epilogues(self) -> Iterator[None]:
            """diffusers' own forward applies the GELU and adds the gated residuals itself: inside
            the block the FP8 layers' epilogues do neither."""
            if not self.fp8_epilogues:
                yield
                return
            proj, processor = self.ff.net[0].proj, self.attn1.processor
            fused_processor = isinstance(processor, FusedAttnProcessor)
            proj.activation = None
            if fused_processor:
                processor.fp8_epilogue = False
            try:
                yield
            finally:
                proj.activation = "gelu_tanh"
                if fused_processor:
                    processor.fp8_epilogue = True

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                    class_labels=None, added_cond_kwargs=None):
            # GLIGEN and the like, or attention processors set after accelerate() (set_attn_processor,
            # fuse_qkv_projections, xformers: they drop the gate and residual ours add): diffusers' path
            if cross_attention_kwargs or not _block_attention_fused(self):
                with self._unfused_epilogues():
                    return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                           encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                           added_cond_kwargs)
            x = hidden_states
            if self.norm_type == "ada_norm_zero":
                emb = self.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
                shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1.linear(self.norm1.silu(emb)).chunk(6, dim=1)
                norm1, norm_mlp = self.norm1.norm, self.norm3
            else:   # ada_norm_single: a learned table plus the projected timestep embedding
                mods = self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
                shift1, scale1, gate1, shift2, scale2, gate2 = mods.unbind(1)
                norm1, norm_mlp = self.norm1, self.norm2
                # diffusers' gate * out + x promotes the residual stream to the fp32 table's dtype under
                # autocast (bf16 patches): kept in bf16 here it lost 8-11 dB over 8-16 blocks
                x = x.to(torch.promote_types(x.dtype, mods.dtype))
            attn1 = self.attn1
            h, h_scale = _modulated(x, shift1, scale1, norm1, (attn1.to_q, attn1.to_k, attn1.to_v))
            x = attn1(h, attention_mask=attention_mask, gate=gate1.to(x.dtype), residual=x, x_scale=h_scale,
                      out_dtype=x.dtype)
            if self.attn2 is not None:
                h = self.norm2(x) if self.norm_type == "ada_norm_zero" else x
                x = self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                               residual=x)
            if self.fp8_epilogues:
                fc1 = self.ff.net[0].proj
                h, h_scale = _modulated(x, shift2, scale2, norm_mlp, (fc1,))
                # the MLP's wide hidden activation in the layer's compute dtype (autocast's, as diffusers'
                # feed-forward), whatever the residual stream's
                device = x.device.type
                hidden_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
                return self.ff.net[-1](fc1(h, x_scale=h_scale, out_dtype=hidden_dtype), gate=gate2.to(x.dtype),
                                       residual=x)
            h = fk.modulated_layer_norm(x, shift2.to(x.dtype), scale2.to(x.dtype), *_layer_norm_parts(norm_mlp))
            return fk.gated_residual(x, _feed_forward(self.ff, h), gate2)

    return FusedBasicTransformerBlock


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(module: nn.Module, make) -> type:
    base = type(module)
    if base not in _FUSED_CLASSES:
        _FUSED_CLASSES[base] = make(base)
    return _FUSED_CLASSES[base]


@dataclasses.dataclass
class AccelerateReport:
    """What :func:`accelerate` patched (module names by kind) and what it left alone (name: why)."""

    patched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patched {kind}: {len(names)}" for kind, names in self.patched.items()]
        lines += [f"left alone {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _block_attention_fused(block: nn.Module) -> bool:
    return all(attn is None or isinstance(attn.processor, FusedAttnProcessor) for attn in (block.attn1, block.attn2))


def _block_skip_reason(block: nn.Module) -> str | None:
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return f"norm_type {block.norm_type!r} is not adaLN-Zero / adaLN-single"
    if block.pos_embed is not None or block._chunk_size is not None or block.only_cross_attention:
        return "positional embedding, chunked feed-forward or cross-attention-only blocks are not fused"
    norms = [block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1,
             block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2]
    if not all(type(n) is nn.LayerNorm for n in norms):
        return "its norms are not plain LayerNorms"
    if not _block_attention_fused(block):
        return "its attention was not patched"
    return None


def accelerate(module: nn.Module) -> AccelerateReport:
    """Patches, in place, the attention processors, adaLN-Zero norms and DiT/PixArt blocks of a
    diffusers transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
    ``SD3Transformer2DModel``; SD3's block-level gates stay as diffusers computes them) for the fused
    ops; on the reference :class:`~fastgen_kernels.models.DiT` it switches the fused ops on. Outputs
    equal the unpatched model's within the dtype's tolerance. Returns what was patched and skipped."""
    report = AccelerateReport()
    if isinstance(module, DiT):
        module.set_fused(True)
        report.patched["DiT blocks"] = [f"blocks.{i}" for i in range(len(module.blocks))]
        return report
    diffusers = _diffusers()
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.normalization import AdaLayerNormZero

    def patched(kind: str, name: str) -> None:
        report.patched.setdefault(kind, []).append(name)

    for name, child in module.named_modules():
        if isinstance(child, Attention):
            processor = child.processor
            plain = child.spatial_norm is None and child.group_norm is None and not child.residual_connection \
                and child.rescale_output_factor == 1.0 and child.norm_cross is None
            head_dim = child.inner_dim // child.heads
            if not plain or head_dim > 256:
                report.skipped[name] = "attention with group/spatial norm, residual rescaling or head dim > 256"
            elif type(processor) is AttnProcessor2_0:
                child.set_processor(FusedAttnProcessor())
                patched("attention", name)
            elif type(processor) is JointAttnProcessor2_0:
                child.set_processor(FusedJointAttnProcessor())
                patched("joint attention", name)
            elif not isinstance(processor, (FusedAttnProcessor, FusedJointAttnProcessor)):
                report.skipped[name] = f"attention processor {type(processor).__name__}"
        elif type(child) is AdaLayerNormZero:
            if type(child.norm) is nn.LayerNorm:
                child.__class__ = _fused_class(child, _make_fused_norm_class)
                patched("adaLN-Zero norm", name)
            else:
                report.skipped[name] = f"adaLN-Zero with {type(child.norm).__name__}"
    for name, child in module.named_modules():
        if type(child) is BasicTransformerBlock:
            why = _block_skip_reason(child)
            if why:
                report.skipped[name] = why
            else:
                child.__class__ = _fused_class(child, _make_fused_block_class)
                patched("transformer block", name)
    log.info("accelerate(%s, diffusers %s):\n%s", type(module).__name__, diffusers.__version__, report)
    return report


class DiffusersNet(nn.Module):
    """A diffusers transformer as a ``net(x_t, t_in, cond)``: cond is the class labels of a DiT
    model; for a PixArt model the text embeddings (``encoder_hidden_states``), or the pair
    (embeddings, mask) with the mask its ``encoder_attention_mask`` (B, L): 1 for tokens, 0 for
    padding, which diffusers' pipeline passes (without it the padding is attended). The
    learned-sigma half of a DiT's output (8 channels for 4) is dropped."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.class_conditional = "class_labels" in inspect.signature(transformer.forward).parameters \
            and "encoder_hidden_states" not in inspect.signature(transformer.forward).parameters

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | tuple[Tensor, Tensor] | None = None) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        if isinstance(cond, tuple) and (self.class_conditional or len(cond) != 2):
            raise ValueError(f"{type(self.transformer).__name__}: cond must be "
                             f"{'class labels' if self.class_conditional else 'embeddings or (embeddings, mask)'}, "
                             f"got a tuple of {len(cond)}")
        if self.class_conditional:
            kwargs = {"class_labels": cond}
        else:
            embeddings, mask = cond if isinstance(cond, tuple) else (cond, None)
            if embeddings is not None and embeddings.is_floating_point():  # as x: a bf16/fp16 model's own dtype
                embeddings = embeddings.to(dtype)
            kwargs = {"encoder_hidden_states": embeddings, "added_cond_kwargs": self._size_conditions(x, dtype)}
            if mask is not None:
                kwargs["encoder_attention_mask"] = mask
        out = self.transformer(x.to(dtype), timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


    def _size_conditions(self, x: Tensor, dtype: torch.dtype) -> dict[str, Tensor | None]:
        """PixArt's micro-conditions: none, or (PixArt-alpha at 1024 px, ``use_additional_conditions``)
        the image's size in pixels and its aspect ratio per sample, as diffusers' pipeline gives them
        (latents times its VAE's factor, 8)."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        B, (H, W) = x.shape[0], x.shape[-2:]
        # filled on the device (a copy from the host could not be captured in sample()'s CUDA graph)
        full = functools.partial(torch.full, device=x.device, dtype=dtype)
        return {"resolution": torch.cat([full((B, 1), H * 8.0), full((B, 1), W * 8.0)], 1),
                "aspect_ratio": full((B, 1), H / W)}


def scheduler_family(scheduler) -> str:
    """Which of our schedules a diffusers scheduler walks: rf, edm, trig or vp."""
    name = type(scheduler).__name__
    config = scheduler.config
    # flow sigmas in a DDPM-family solver (DPM-Solver, UniPC with use_flow_sigmas: SANA, Wan) walk rf
    if (name.startswith("FlowMatch") or config.get("use_flow_sigmas")
            or config.get("prediction_type") == "flow_prediction"):
        return "rf"
    if name.startswith("EDM"):
        return "edm"
    if name.startswith("SCM"):
        return "trig"
    if hasattr(scheduler, "alphas_cumprod"):
        return "vp"
    raise ValueError(f"scheduler {name} is not supported (flow matching, EDM, SCM and DDPM-family schedulers are)")


_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def check_scheduler(scheduler) -> None:
    """Refuses the scheduler settings whose network convention the Denoiser does not model: EDM's
    v-prediction (its output scaling is negated) and continuous timesteps (0.25 log sigma, not a
    step index)."""
    config, name = scheduler.config, type(scheduler).__name__
    if scheduler_family(scheduler) == "edm" and config.get("prediction_type") == "v_prediction":
        raise ValueError(f"{name} with prediction_type='v_prediction' is not supported (EDM's epsilon "
                         "preconditioning is)")
    if config.get("timestep_type") == "continuous":
        raise ValueError(f"{name} with timestep_type='continuous' is not supported (discrete steps are)")


def from_diffusers(transformer: nn.Module, scheduler_or_schedule, *, shape: tuple[int, ...] | None = None,
                   null_cond: int | float | None = None, distilled: bool = False) -> Denoiser:
    """A :class:`Denoiser` over a diffusers transformer, with the schedule, prediction type and
    timestep scaling its scheduler implies (or a schedule name with our defaults: edm -> EDM
    preconditioning, rf -> flow, vp -> eps, trig -> trig_F). ``shape`` defaults to the
    transformer's (in_channels, sample_size, sample_size); a class-conditional DiT's null class is
    its ``num_embeds_ada_norm``."""
    config = getattr(transformer, "config", {})
    if "pooled_projections" in inspect.signature(transformer.forward).parameters:
        raise ValueError(f"from_diffusers: {type(transformer).__name__} needs pooled text projections, which "
                         "the Denoiser's cond does not carry; DiT and PixArt transformers are supported "
                         "(accelerate() speeds up the others inside their diffusers pipelines)")
    if shape is None and "sample_size" in config and "in_channels" in config:
        shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    net = DiffusersNet(transformer)
    if null_cond is None and net.class_conditional:
        null_cond = config.get("num_embeds_ada_norm")
    options = dict(shape=shape, null_cond=null_cond, distilled=distilled)
    if isinstance(scheduler_or_schedule, str):
        name = scheduler_or_schedule
        prediction = {"edm": "x0", "rf": "flow", "vp": "eps", "trig": "trig_F"}[name]
        # vp: diffusers' step k has noise level alphas_cumprod[k], at t = (k + 1) / N in our table
        return Denoiser(net, name, prediction, time_scale=1000.0 if name in ("rf", "vp") else 1.0,
                        time_shift=-1.0 if name == "vp" else 0.0,
                        preconditioning="edm" if name == "edm" else None, **options)
    scheduler = scheduler_or_schedule
    family, sc = scheduler_family(scheduler), scheduler.config
    check_scheduler(scheduler)
    if family == "vp":
        steps = sc.num_train_timesteps
        prediction = _PREDICTION_TYPES[sc.prediction_type]
        # diffusers' step k has noise level alphas_cumprod[k], which our VP table puts at t = (k + 1) / N
        return Denoiser(net, VP(betas=tuple(scheduler.betas.double().tolist())), prediction, time_scale=steps,
                        time_shift=-1.0, **options)
    if family == "rf":
        return Denoiser(net, "rf", "flow", time_scale=sc.num_train_timesteps, **options)
    if family == "edm":
        return Denoiser(net, "edm", "x0", sigma_data=sc.sigma_data, preconditioning="edm", **options)
    return Denoiser(net, "trig", "trig_F", sigma_data=sc.sigma_data, **options)


def _step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def sample_with_scheduler(model: Denoiser, scheduler, steps: int, *, batch: int, shape: tuple[int, ...],
                          noise: Tensor | None, cond: Tensor | None, guidance_scale: float,
                          neg_cond: Tensor | None, seed: int | None, generator: torch.Generator | None,
                          return_trajectory: bool, autocast: torch.dtype | None):
    """``sample(..., scheduler=...)``: the diffusers scheduler picks the times and makes each step;
    the model supplies its x0 estimate, converted to what the scheduler expects."""
    from fastgen_kernels.sampling import _Guided, _model_device_and_dtype

    family = scheduler_family(scheduler)
    check_scheduler(scheduler)
    if model.schedule.name != family:
        raise ValueError(f"sample: scheduler {type(scheduler).__name__} walks the {family} schedule, "
                         f"the model is on {model.schedule.name}")
    if family == "vp" and (len(model.schedule.betas) != len(scheduler.betas) or not torch.allclose(
            torch.tensor(model.schedule.betas, dtype=torch.float64), scheduler.betas.double(), rtol=1e-5)):
        raise ValueError(f"sample: scheduler {type(scheduler).__name__}'s beta table differs from the model's "
                         "(build the model with from_diffusers(transformer, scheduler))")
    device, dtype = _model_device_and_dtype(model)
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    if noise is None:
        noise = torch.randn((batch, *shape), generator=generator, device=device, dtype=dtype)
    # SCM's default intermediate time is for 2 steps only (it refuses others): its even grid otherwise
    scheduler.set_timesteps(steps, device=device, **({"intermediate_timesteps": None}
                                                     if family == "trig" and steps != 2 else {}))
    guided = _Guided(model, cond, neg_cond, guidance_scale, autocast)
    timesteps = scheduler.timesteps[:-1] if family == "trig" else scheduler.timesteps   # SCM lists the final 0
    # SCM's pipelines scale the noise by sigma_data themselves (its init_noise_sigma is 1)
    start = scheduler.config["sigma_data"] if family == "trig" else getattr(scheduler, "init_noise_sigma", 1.0)
    x = noise.to(device=device, dtype=dtype) * start
    trajectory = [x]
    expected = _PREDICTION_TYPES.get(scheduler.config.get("prediction_type"))
    with torch.no_grad():
        for i, timestep in enumerate(timesteps):
            if family == "vp":
                x_in, t = scheduler.scale_model_input(x, timestep), (float(timestep) + 1) / len(model.schedule.betas)
            elif family == "trig":
                x_in, t = x, float(timestep)
            elif family == "rf":  # the network sees the scheduler's timestep, as in diffusers' pipelines
                # (DPM-Solver's and UniPC's flow sigmas list it rounded to an integer); the flow
                # prediction's round trip through x0 gives the scheduler the network's own output
                x_in, t = x, float(timestep) / scheduler.config["num_train_timesteps"]
            else:   # EDM: the noise level is the time; the Denoiser preconditions x itself (the
                # call only tells the scheduler so)
                x_in, t = x, float(scheduler.sigmas[i])
                scheduler.scale_model_input(x, timestep)
            x0 = guided.x0(x_in, t)
            if family == "edm":   # the scheduler applies EDM's output preconditioning itself
                _, _, c_skip, c_out = model.schedule.precondition(torch.tensor(t, dtype=torch.float64))
                output = (x0 - float(c_skip) * x_in) / float(c_out)
            else:
                # SCM's step takes sigma_data * F, which is the flow velocity
                prediction = {"rf": "flow", "trig": "flow"}.get(family, expected)
                output = model.schedule.from_x0(prediction, x0, x_in, t)
            x = scheduler.step(output, timestep, x, **_step_kwargs(scheduler, generator)).prev_sample.to(dtype)
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
