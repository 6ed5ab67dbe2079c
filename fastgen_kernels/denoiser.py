"""The model protocol: a network, its noise schedule and what it predicts, in one module.

``Denoiser(net, schedule, prediction)`` wraps any ``nn.Module`` called as
``net(x_t, t_in, cond)`` (or ``net(x_t, t_in, cond, r_in)`` for flow maps) and gives samplers and
distillation methods one view of it: ``x0(x_t, t, cond)``, the clean-data estimate, whatever the
network's parameterization (see :mod:`fastgen_kernels.schedules`).

What the network is fed: ``t_in = time_scale * t + time_shift`` (rf networks are often trained on
1000 t; diffusers' DDPM step k sits at our t = (k + 1) / 1000: scale 1000, shift -1), or,
with ``preconditioning="edm"``, EDM's ``F(c_in x, c_noise)`` wrapped as
``D = c_skip x + c_out F`` (schedule must then be ``edm`` and prediction ``x0``: D is the x0 estimate).

``save_pretrained(dir)`` writes ``model.safetensors`` (the network's weights) and ``fastgen.json``
(schedule, prediction, preconditioning, time scale, sample shape, the unconditional label and,
when the network has a ``config`` and is importable, how to rebuild it), so that
``Denoiser.from_pretrained(dir)`` loads a distilled student that samples with no extra arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fastgen_kernels.ops.constant_operands import add_constant, mul_constant
from fastgen_kernels.schedules import EDM, Schedule, get_schedule, per_sample
from fastgen_kernels.serialization import save_tensors

CONFIG_NAME = "fastgen.json"
WEIGHTS_NAME = "model.safetensors"


# A condition: one tensor (class labels, embeddings), or a tuple of tensors the network takes
# together (PixArt's text embeddings and their attention mask), each with the batch first
Cond = Tensor | tuple[Tensor, ...]


def cond_parts(cond: Cond | None) -> list[Tensor]:
    return [] if cond is None else [cond] if isinstance(cond, Tensor) else list(cond)


def cond_like(cond: Cond | None, parts: Sequence[Tensor]) -> Cond | None:
    """``parts`` (as :func:`cond_parts` gives them) in the form of ``cond``."""
    return None if cond is None else parts[0] if isinstance(cond, Tensor) else tuple(parts)


def concat_conds(first: Cond, second: Cond) -> Cond:
    """The batch of ``first`` followed by ``second`` (of one form), part by part: guidance's
    unconditional and conditional halves."""
    return cond_like(second, [torch.cat(pair) for pair in zip(cond_parts(first), cond_parts(second))])


class Denoiser(nn.Module):
    """A network with its schedule and prediction type.

    Args:
        net: ``net(x_t, t_in, cond)`` or, for flow maps, ``net(x_t, t_in, cond, r_in)``.
        schedule: "edm" | "rf" | "vp" | "trig" or a :class:`~fastgen_kernels.schedules.Schedule`.
        prediction: "x0" | "eps" | "v" | "flow" | "trig_F" | "mean_flow".
        sigma_data: the data's standard deviation (EDM preconditioning, trig noise scale).
        preconditioning: None or "edm".
        time_scale, time_shift: the network sees ``time_scale * t + time_shift`` (r likewise).
        distilled: a few-step student (``sample`` then defaults to consistency steps).
        null_cond: the label that means "unconditional" for classifier-free guidance
            (e.g. the extra class index of a class-conditional DiT), or None.
        shape: the per-sample shape ``(C, H, W)`` of what it generates, or None.
    """

    def __init__(self, net: nn.Module, schedule: str | dict | Schedule = "edm", prediction: str = "x0",
                 sigma_data: float = 0.5, *, preconditioning: str | None = None, time_scale: float = 1.0,
                 time_shift: float = 0.0, distilled: bool = False, null_cond: int | float | None = None,
                 shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"Denoiser: net must be an nn.Module, got {type(net).__name__}")
        if preconditioning not in (None, "edm"):
            raise ValueError(f"Denoiser: preconditioning must be None or 'edm', got {preconditioning!r}")
        self.net = net
        self.schedule = get_schedule(schedule, sigma_data)
        try:
            self.schedule.check_prediction(prediction)
        except ValueError as error:
            raise ValueError(f"Denoiser: {error}") from None
        self.prediction = prediction
        self.preconditioning = preconditioning
        if preconditioning == "edm" and not (isinstance(self.schedule, EDM) and prediction == "x0"):
            raise ValueError("Denoiser: preconditioning='edm' needs schedule='edm' and prediction='x0' "
                             f"(got {self.schedule.name!r}, {prediction!r})")
        self.time_scale, self.time_shift = float(time_scale), float(time_shift)
        self.distilled = bool(distilled)
        self.null_cond = null_cond
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        # solver state that outlives one call: CUDA graphs of sampling loops (see sampling.py)
        self._graphs: dict = {}

    def __getstate__(self) -> dict:
        """Copies (copy.deepcopy, a student made from a teacher) and pickles leave the captured CUDA
        graphs behind: they cannot be copied, and they hold the original's tensors."""
        state = self.__dict__.copy()
        state["_graphs"] = {}
        return state

    @property
    def sigma_data(self) -> float:
        return self.schedule.sigma_data

    def forward(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """The x0 estimate (see :meth:`x0`)."""
        return self.x0(x_t, t, cond)

    def _times(self, t: float | Tensor, x: Tensor) -> Tensor:
        return per_sample(t, x).reshape(-1)

    def raw(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None,
            r: float | Tensor | None = None, **net_kwargs) -> Tensor:
        """The network's own output at (x_t, t) (with the EDM input scaling when preconditioned), in
        x_t's dtype (under autocast the network's may be bf16; the losses and solvers take x_t's);
        ``net_kwargs`` go to the network (e.g. the reference DiT's ``return_logvar=True``, which
        makes it (output, logvar))."""
        tb = self._times(t, x_t)
        if self.preconditioning == "edm":
            c_in, c_noise, _, _ = self.schedule.precondition(per_sample(tb, x_t))
            out = self.net((x_t * c_in).to(x_t.dtype), c_noise.reshape(-1), cond, **net_kwargs)
        else:
            t_in = add_constant(mul_constant(tb, self.time_scale), self.time_shift)
            if self.prediction == "mean_flow":
                r_in = add_constant(mul_constant(self._times(0.0 if r is None else r, x_t), self.time_scale),
                                    self.time_shift)
                out = self.net(x_t, t_in, cond, r_in, **net_kwargs)
            else:
                out = self.net(x_t, t_in, cond, **net_kwargs)
        if isinstance(out, tuple):
            return (out[0].to(x_t.dtype), *out[1:])
        return out.to(x_t.dtype)

    def x0(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """The clean-data estimate at (x_t, t); x_t (B, ...), t a number or (B,). For a flow map
        (prediction "mean_flow") this is the jump to r = 0."""
        if self.prediction == "mean_flow":
            return self.flow_map(x_t, t, 0.0, cond)
        out = self.raw(x_t, t, cond)
        if self.preconditioning == "edm":
            _, _, c_skip, c_out = self.schedule.precondition(per_sample(t, x_t))
            return (c_skip * x_t + c_out * out).to(x_t.dtype)
        return self.schedule.to_x0(self.prediction, out, x_t, t)

    def guided_x0(self, x_t: Tensor, t: float | Tensor, cond: Cond | None, guidance_scale: float = 1.0,
                  neg_cond: Cond | None = None) -> Tensor:
        """Classifier-free guidance x0_u + w (x0_c - x0_u) in one call on 2B samples (w = 1: the
        conditional x0 alone); ``neg_cond`` defaults to ``null_cond`` broadcast like a tensor
        ``cond`` (a tuple cond needs its own)."""
        if guidance_scale == 1.0:
            return self.x0(x_t, t, cond)
        if cond is None:
            raise ValueError("Denoiser.guided_x0: guidance needs cond")
        neg_cond = self.unconditional(cond, "Denoiser.guided_x0") if neg_cond is None else neg_cond
        tb = self._times(t, x_t)
        out = self.x0(torch.cat([x_t, x_t]), torch.cat([tb, tb]), concat_conds(neg_cond, cond))
        uncond, conditional = out.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    def unconditional(self, cond: Cond, caller: str) -> Tensor:
        """``null_cond`` broadcast like ``cond`` (the default negative condition of guidance)."""
        if not isinstance(cond, Tensor):
            raise ValueError(f"{caller}: guidance with a tuple cond needs neg_cond (e.g. the empty prompt's "
                             "embeddings and mask)")
        if self.null_cond is None:
            raise ValueError(f"{caller}: guidance needs neg_cond (the model has no null_cond)")
        return torch.full_like(cond, self.null_cond)

    def flow_map(self, x_t: Tensor, t: float | Tensor, r: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """x_r = x_t - (t - r) u(x_t, r, t) for a flow map (prediction "mean_flow")."""
        if self.prediction != "mean_flow":
            raise ValueError(f"Denoiser.flow_map needs prediction='mean_flow', not {self.prediction!r}")
        u = self.raw(x_t, t, cond, r)
        tb, rb = per_sample(t, x_t), per_sample(r, x_t)
        return (x_t - (tb - rb) * u).to(x_t.dtype)

    # saving and loading -------------------------------------------------------------------------

    def config(self) -> dict:
        """What ``fastgen.json`` holds."""
        config = {"schedule": self.schedule.to_dict(), "prediction": self.prediction,
                  "preconditioning": self.preconditioning, "time_scale": self.time_scale,
                  "time_shift": self.time_shift, "distilled": self.distilled, "null_cond": self.null_cond,
                  "shape": list(self.shape) if self.shape else None}
        net = getattr(self.net, "module", self.net)  # inside a DDP wrapper
        net_config = getattr(net, "config", None)
        if dataclasses.is_dataclass(net_config):
            net_config = dataclasses.asdict(net_config)
        if isinstance(net_config, dict):
            # FSDP2 shards in place by swapping in a subclass it makes (FSDP<Name>): the network's
            # own class is the first one of its lineage that is not torch.distributed's
            cls = next(c for c in type(net).__mro__ if not c.__module__.startswith("torch.distributed"))
            config["net"] = {"class": f"{cls.__module__}.{cls.__qualname__}", "config": net_config}
        return config

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Writes ``model.safetensors`` and ``fastgen.json`` into ``directory``; ``state_dict``: the
        network's weights to write instead of its own (e.g. an EMA, or gathered FSDP shards)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(self.net.state_dict() if state_dict is None else state_dict, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, net: nn.Module | None = None,
                        device: torch.device | str | None = None) -> Denoiser:
        """Loads what :meth:`save_pretrained` wrote; ``net`` is rebuilt from ``fastgen.json`` when
        not given (networks with a ``config`` and a ``from_config`` or ``__init__(config)``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if net is None:
            if "net" not in config:
                raise ValueError(f"Denoiser.from_pretrained: {directory / CONFIG_NAME} does not say how "
                                 "to build the network; pass net=")
            module_name, _, class_name = config["net"]["class"].rpartition(".")
            net_cls = getattr(importlib.import_module(module_name), class_name)
            build = getattr(net_cls, "from_config", net_cls)
            net = build(config["net"]["config"])
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device or "cpu"))
        _quantize_like(net, state)
        net.load_state_dict(state)
        if device is not None:
            net = net.to(device)
        return cls(net, config["schedule"], config["prediction"], preconditioning=config["preconditioning"],
                   time_scale=config["time_scale"], time_shift=config.get("time_shift", 0.0), distilled=config["distilled"],
                   null_cond=config["null_cond"], shape=config["shape"])


def _quantize_like(net: nn.Module, state: dict[str, Tensor]) -> None:
    """The layers that ``state`` holds as FP8 (e4m3 weight + weight_scale) made FP8 in ``net``, per
    channel or per tensor as saved, so that a quantized model's save loads into its rebuilt network
    (``fuse_epilogues`` is not saved: call it again)."""
    quantized = {name.removesuffix(".weight_scale"): value.numel() > 1 for name, value in state.items()
                 if name.endswith(".weight_scale")}
    if not quantized:
        return
    from fastgen_kernels.quantization import quantize_fp8

    for per_channel in {*quantized.values()}:
        quantize_fp8(net, lambda module, name: quantized.get(name) == per_channel, per_channel=per_channel)
