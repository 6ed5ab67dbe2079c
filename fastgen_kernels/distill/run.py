"""A training run from one config: data, teacher, student, method and trainer (``fastgen-kernels
train`` and ``distill``).

The config is a tree of frozen dataclasses (:class:`RunConfig`), loaded from YAML with dotted
command-line overrides (``trainer.iterations=2000 method_options.guidance_scale=2``) by
:func:`fastgen_kernels.config.load`, and written back, resolved, as ``config.yaml`` next to the
checkpoints. The student either starts from scratch (``student.net``: a reference-DiT config) or,
when distilling, from the teacher's weights (``student.init: teacher``), with
``student.net_overrides`` for what the method adds (``logvar_head`` for sCM, ``second_time`` for
MeanFlow: the new layers start from their own initialization).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastgen_kernels.config import from_dict, merge, to_dict
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.distill import METHODS
from fastgen_kernels.distill.trainer import Trainer, TrainerConfig
from fastgen_kernels.models.dit import DiT, DiTConfig


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"        # "digits" (scikit-learn's 8x8 digits) or a .pt / .safetensors file
    #   holding "x" (N, ...) and optionally "labels" (N,)


@dataclass(frozen=True)
class StudentConfig:
    init: Literal["scratch", "teacher"] = "scratch"
    net: DiTConfig = field(default_factory=DiTConfig)          # used from scratch
    net_overrides: dict[str, Any] = field(default_factory=dict)  # on the teacher's net config
    schedule: str | None = None     # default: the teacher's (from scratch: "edm")
    prediction: str | None = None   # default: the teacher's (from scratch: "x0")
    sigma_data: float | None = None  # default: the teacher's (from scratch: 0.5)
    preconditioning: str | None = None
    time_scale: float = 1.0         # from scratch; one made from the teacher keeps the teacher's
    time_shift: float = 0.0         # (the network's time input is t * time_scale + time_shift)
    null_cond: int | None = None    # default: net.num_classes when class-conditional
    shape: tuple[int, ...] | None = None   # default: the data's


@dataclass(frozen=True)
class RunConfig:
    method: str = "sft"
    method_options: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None      # a Denoiser.save_pretrained folder
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: str | None = None       # default: cuda when available


def load_data(config: DataConfig) -> tuple[Tensor, Tensor | None]:
    """(x (N, ...), labels (N,) or None)."""
    if config.source == "digits":
        from fastgen_kernels.digits import load_digits

        return load_digits("all")
    path = Path(config.source)
    if not path.exists():
        raise FileNotFoundError(f"data.source: {path} does not exist (expected 'digits' or a .pt/.safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    if "x" not in tensors:
        raise ValueError(f"data.source: {path} must hold a tensor 'x' (N, ...), found {sorted(tensors)}")
    return tensors["x"].float(), tensors.get("labels")


def build_student(config: StudentConfig, teacher: Denoiser | None, data_shape: tuple[int, ...],
                  distilled: bool) -> Denoiser:
    if config.init == "teacher":
        if teacher is None:
            raise ValueError("student.init='teacher' needs a teacher")
        net_config = _overridden(teacher.net.config, config.net_overrides)
        net = DiT(net_config)
        missing, unexpected = net.load_state_dict(teacher.net.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"student.net_overrides drop teacher weights: {unexpected}")
        if config.sigma_data not in (None, teacher.sigma_data):
            raise ValueError(f"student.sigma_data: a student made from the teacher keeps its sigma_data "
                             f"{teacher.sigma_data}, got {config.sigma_data}")
        schedule, prediction = teacher.schedule, teacher.prediction
        preconditioning, time_scale, time_shift = teacher.preconditioning, teacher.time_scale, teacher.time_shift
        null_cond, shape = teacher.null_cond, teacher.shape
    else:
        net = DiT(_overridden(config.net, config.net_overrides))
        schedule, prediction = config.schedule or "edm", config.prediction or "x0"
        preconditioning, time_scale, time_shift = config.preconditioning, config.time_scale, config.time_shift
        null_cond, shape = config.null_cond, data_shape
        if null_cond is None and net.config.num_classes:
            null_cond = net.config.num_classes
    return Denoiser(net, schedule if config.schedule is None else config.schedule,
                    prediction if config.prediction is None else config.prediction,
                    0.5 if config.sigma_data is None else config.sigma_data,
                    preconditioning=preconditioning, time_scale=time_scale, time_shift=time_shift,
                    distilled=distilled,
                    null_cond=null_cond, shape=config.shape or shape)


def _overridden(net: DiTConfig, overrides: dict[str, Any]) -> DiTConfig:
    """The network config with ``student.net_overrides`` applied, type-checked as the config is
    (an int where a bool belongs trained, then the run's own config.yaml failed to load back)."""
    return from_dict(DiTConfig, merge(to_dict(net), overrides), "student.net_overrides")


def run(config: RunConfig) -> Path:
    """Trains as configured; returns the output folder."""
    prepare(config).train()
    return Path(config.trainer.output_dir)


def prepare(config: RunConfig) -> Trainer:
    """The trainer of the run ``config`` describes, with its data, teacher and student loaded and
    built (what a bad config fails at, before any training)."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {config.method!r}")
    method_cls = METHODS[config.method]
    options = from_dict(method_cls.Config, config.method_options, "method_options")
    x, labels = load_data(config.data)
    teacher = Denoiser.from_pretrained(config.teacher) if config.teacher else None
    if method_cls.needs_teacher and teacher is None:
        raise ValueError(f"method {config.method!r} distills a teacher: set teacher=<folder>")
    # the networks a run creates (a student from scratch, new heads, a discriminator) start from
    # trainer.seed: runs repeat, and every process of a torchrun starts from the same weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.trainer.seed)
        student = build_student(config.student, teacher, tuple(x.shape[1:]), distilled=config.method != "sft")
        method = method_cls(student, teacher, options)
    return Trainer(method, (x, labels), config.trainer, device=config.device,
                   config_record=resolved(config, options, student))


def resolved(config: RunConfig, options: Any, student: Denoiser) -> RunConfig:
    """``config`` with what the run worked out filled in, for config.yaml: every method option
    (defaults included) and the student as built (a student made from the teacher has the teacher's
    network, schedule and conditioning, not the from-scratch defaults)."""
    built = dataclasses.replace(config.student, net=student.net.config, schedule=student.schedule.name,
                                prediction=student.prediction, sigma_data=student.sigma_data,
                                preconditioning=student.preconditioning, time_scale=student.time_scale,
                                time_shift=student.time_shift, null_cond=student.null_cond, shape=student.shape)
    return dataclasses.replace(config, method_options=to_dict(options), student=built)
