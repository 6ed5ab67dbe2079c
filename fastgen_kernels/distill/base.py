"""What every training method shares: the batch and its randomness, the method protocol, and the
building blocks of the distillation methods (training times, label dropout, the denoising loss in a
model's prediction space, guided teacher estimates, student generation, JVPs).

A method is an ``nn.Module`` over its networks (a student :class:`~fastgen_kernels.Denoiser`, a
frozen teacher, a fake score, a discriminator) with::

    optimizer_names                 ("student", ...): one optimizer per trainable network
    optimizers_at(iteration)        the names whose optimizers step at this iteration
    training_step(batch, iteration) {name: loss to back-propagate for that optimizer, ...,
                                     other keys: detached metrics}

Randomness belongs to the batch: a :class:`Batch` draws every noise tensor for the whole global
batch from a generator seeded by (seed, iteration) and keeps its own rows. So a run on
N processes (each holding 1/N of the batch) draws exactly what a single process does, and a run
resumed from a checkpoint draws what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from fastgen_kernels import losses
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.ops.linear import parameters_without_tangents
from fastgen_kernels.schedules import Schedule, per_sample

JVP_METHODS = ("exact", "finite_difference", "finite_difference_autocast")


def batch_seed(seed: int, iteration: int) -> int:
    """A 63-bit seed for one iteration's batch, well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, iteration]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@dataclass
class Batch:
    """One (micro-)batch of training data and its randomness.

    x0: (B, ...) clean data; cond: (B,) labels or None. The batch holds rows
    ``offset .. offset + B`` of a global batch of ``global_size`` rows (all processes and
    micro-batches); every draw is made for the global batch and sliced, so it does not depend on
    how the global batch is split. The draws come from ``generator`` (on x0's device) seeded with
    ``seed``: a new one by default, a given one (reseeded here) where a CUDA graph reads it.
    """

    x0: Tensor
    cond: Tensor | None = None
    seed: int = 0
    global_size: int | None = None
    offset: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        B = self.x0.shape[0]
        self.global_size = B if self.global_size is None else int(self.global_size)
        if self.offset < 0 or self.offset + B > self.global_size:
            raise ValueError(f"Batch: rows {self.offset}..{self.offset + B} do not fit in a global batch of "
                             f"{self.global_size}")
        if self.cond is not None and not isinstance(self.cond, Tensor):
            raise ValueError(f"Batch: cond must be a tensor of labels (distillation takes no tuple conditions), "
                             f"got {type(self.cond).__name__}")
        if self.cond is not None and self.cond.shape[0] != B:
            raise ValueError(f"Batch: cond has {self.cond.shape[0]} rows for {B} samples")
        if self.generator is None:
            self.generator = torch.Generator(self.x0.device)
        self.generator.manual_seed(self.seed)

    def __len__(self) -> int:
        return self.x0.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of draws: fp32, or fp64 for fp64 data."""
        return torch.float64 if self.x0.dtype == torch.float64 else torch.float32

    def _rows(self, full: Tensor) -> Tensor:
        return full[self.offset:self.offset + len(self)]

    def randn(self, *shape: int) -> Tensor:
        """Standard normal (B, *shape), fp32 (fp64 for fp64 data)."""
        return self._rows(torch.randn((self.global_size, *shape), generator=self.generator,
                                      device=self.x0.device, dtype=self.dtype))

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) (B, *shape), fp32 (fp64 for fp64 data)."""
        return self._rows(torch.rand((self.global_size, *shape), generator=self.generator,
                                     device=self.x0.device, dtype=self.dtype))

    def randint(self, high: int) -> Tensor:
        """Uniform integers in [0, high), (B,)."""
        return self._rows(torch.randint(high, (self.global_size,), generator=self.generator,
                                        device=self.x0.device))

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal shaped like x (B, ...), in x's dtype."""
        return self.randn(*x.shape[1:]).to(x.dtype)


def frozen(model: nn.Module | None) -> nn.Module | None:
    """The model in eval mode with no parameter gradients (a teacher)."""
    if model is not None:
        model.requires_grad_(False).eval()
    return model


def trainable_copy(model: Denoiser) -> Denoiser:
    """A deep copy with gradients on (DMD2's fake score starts as the teacher)."""
    return copy.deepcopy(model).requires_grad_(True).train()


class Method(nn.Module):
    """The protocol of a training method (see the module docstring). Subclasses set ``Config`` (a
    frozen dataclass of options), ``optimizer_names`` and ``training_step``."""

    Config: ClassVar[type] = type(None)
    optimizer_names: tuple[str, ...] = ("student",)
    needs_teacher: ClassVar[bool] = False
    # True where a loss is normalized by a statistic of the (micro-)batch it sees: then gradient
    # accumulation over micro-batches is close to, not equal to, one step on the whole batch
    batch_statistics: ClassVar[bool] = False

    def __init__(self, student: Denoiser, teacher: Denoiser | None = None, config: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(student, Denoiser):
            raise TypeError(f"{name}: student must be a fastgen_kernels.Denoiser, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, Denoiser):
            raise TypeError(f"{name}: teacher must be a Denoiser or None, got {type(teacher).__name__}")
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.student = student.requires_grad_(True)
        self.teacher = frozen(teacher)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{name}: this method distills a teacher; pass teacher=")

    def optimizers_at(self, iteration: int) -> tuple[str, ...]:
        """The optimizers that step at ``iteration`` (all of them by default)."""
        return self.optimizer_names

    def network(self, name: str) -> nn.Module:
        """The module optimizer ``name`` trains (a Denoiser's network, or a plain module)."""
        module = getattr(self, name)
        return module.net if isinstance(module, Denoiser) else module

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replaces each trainable network by ``fn(network)`` (DDP, FSDP2)."""
        for name in self.optimizer_names:
            module = getattr(self, name)
            if isinstance(module, Denoiser):
                module.net = fn(module.net)
            else:
                setattr(self, name, fn(module))

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def training_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def graph_key(self, iteration: int) -> Hashable | None:
        """What of ``iteration`` training_step's work depends on besides the batch (a warm-up
        factor, a curriculum stage, whose turn it is): steps with equal keys and equally shaped
        batches run the same kernels with the same constants, so one CUDA graph replays them all
        (:class:`~fastgen_kernels.distill.cuda_graph.GraphedStep`). None (the default): this
        method's steps are not captured."""
        return None


def forward_backward(method: Method, batch: Batch, iteration: int, names: Sequence[str], scale: float = 1.0,
                     autocast_dtype: torch.dtype | None = None, autocast_cache: bool = True) -> dict[str, Tensor]:
    """``method.training_step(batch, iteration)`` under autocast to ``autocast_dtype`` (None: off)
    and the backward of ``scale`` times the sum of its losses ``names``; its outputs, detached."""
    with torch.autocast(batch.x0.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None, cache_enabled=autocast_cache):
        out = method.training_step(batch, iteration)
    missing = [n for n in names if n not in out]
    if missing:
        raise RuntimeError(f"{type(method).__name__}.training_step returned no loss for {missing}")
    (sum(out[n] for n in names) * scale).backward()
    return {k: v.detach() for k, v in out.items()}


# ----------------------------------------------------------------------------- building blocks


def drop_labels(model: Denoiser, batch: Batch, probability: float) -> Tensor | None:
    """The batch's labels with each replaced by the model's ``null_cond`` with ``probability``
    (training for classifier-free guidance); None stays None."""
    cond = batch.cond
    draw = batch.rand()  # drawn even when unused, so the randomness does not depend on options
    if cond is None or probability <= 0:
        return cond
    if model.null_cond is None:
        raise ValueError("label dropout needs the model's null_cond (the unconditional label)")
    return torch.where(draw < probability, torch.full_like(cond, model.null_cond), cond)


def noised(model: Denoiser, batch: Batch, x0: Tensor,
           time_range: tuple[float, float] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """(t, eps, x_t), x_t = alpha x0 + sigma eps: t from the schedule's training distribution, or
    with ``time_range = (lo, hi)`` uniform in [lo, hi] * t_max (DMD2's critic times)."""
    schedule = model.schedule
    if time_range:
        lo, hi = time_range
        t = ((lo + (hi - lo) * batch.rand()) * schedule.t_max).clamp(min=schedule.t_min)
    else:
        t = schedule.training_time(batch.randn())
    eps = batch.randn_like(x0)
    return t, eps, schedule.add_noise(x0, eps, t)


def denoising_loss(model: Denoiser, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                   cond: Tensor | None) -> Tensor:
    """Denoising score matching in the model's prediction space: mean_b weight(t) * mean_D
    (net - target)^2, with EDM's weight (t^2 + sd^2) / (t sd)^2 on the x0 estimate when
    preconditioned; unit weight on the network output otherwise (eps, v, flow and trig_F targets
    have unit scale already). A flow map is trained at r = t (flow matching)."""
    if model.preconditioning == "edm":
        sd2 = model.sigma_data ** 2
        weight = (t * t + sd2) / (t * t * sd2)
        return losses.denoising_loss(model.x0(x_t, t, cond), x0, weight)
    output = model.raw(x_t, t, cond, t) if model.prediction == "mean_flow" else model.raw(x_t, t, cond)
    return losses.denoising_loss(output, model.schedule.target(model.prediction, x0, eps, t))


def at_teacher_point(teacher: Denoiser, schedule: Schedule, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """A point (x_t, t) of ``schedule`` (the student's) in the teacher's schedule: the time of equal
    noise level sigma / alpha, x rescaled by the ratio of the alphas (unchanged when the schedules
    are the same)."""
    if teacher.schedule == schedule:
        return x_t, t
    tt = teacher.schedule.t_from_edm_sigma(schedule.edm_sigma(t)).to(t.dtype)
    scale = teacher.schedule.alpha(per_sample(tt, x_t)) / schedule.alpha(per_sample(t, x_t))
    return (x_t * scale).to(x_t.dtype), tt


def teacher_x0(teacher: Denoiser, schedule: Schedule, x_t: Tensor, t: Tensor, cond: Tensor | None,
               guidance_scale: float = 1.0) -> Tensor:
    """The teacher's (guided) x0 estimate at a point (x_t, t) of ``schedule``."""
    return teacher.guided_x0(*at_teacher_point(teacher, schedule, x_t, t), cond, guidance_scale)


def student_times(model: Denoiser, steps: int, times: Sequence[float] | None = None) -> list[float]:
    """The student's sampling times t_0 > ... > t_{steps-1} (the final 0 left out)."""
    from fastgen_kernels.sampling import default_timesteps

    times = list(times) if times else default_timesteps(model, steps, "consistency")
    return [float(t) for t in times[:steps]]


def generate(model: Denoiser, batch: Batch, cond: Tensor | None, times: Sequence[float]) -> Tensor:
    """A student sample x_g for training (DMD2, LADD): one step from pure noise at t_0, or, with
    several steps, one step from a per-sample random t_i of the student's times, where the input is
    the batch's real data noised to t_i (x_start = alpha(t_i) x0 + sigma(t_i) z, pure noise at t_0)."""
    x0, schedule = batch.x0, model.schedule
    z = batch.randn_like(x0)
    if len(times) == 1:
        return model.x0(schedule.add_noise(torch.zeros_like(x0), z, times[0]), times[0], cond)
    # fills, not a copy from the host, which a CUDA graph cannot capture
    table = torch.stack([torch.full((), t, device=x0.device, dtype=batch.dtype) for t in times])
    t = table[batch.randint(len(times))]
    start = torch.where(per_sample(t, x0) == times[0], torch.zeros_like(x0), x0)
    return model.x0(schedule.add_noise(start, z, t), t, cond)


def unwrapped(model: Denoiser) -> Denoiser:
    """The Denoiser over the network inside a DDP wrapper (a shallow view sharing the weights), for
    evaluations with no gradient, such as the JVPs: DDP's output hook has no forward-mode rule."""
    inner = getattr(model.net, "module", None)
    if inner is None:
        return model
    view = copy.copy(model)
    view._modules = {**model._modules, "net": inner}
    return view


def data_parallel(model: Denoiser) -> bool:
    """Whether the model's network is wrapped by DDP or sharded by FSDP2 (``distill.parallel``):
    their hooks have no forward-mode rules, so a JVP runs apart from the forward with gradients
    (through :func:`unwrapped`) instead of in its pass (:func:`forward_and_jvp`)."""
    net = model.net
    if getattr(net, "module", None) is not None:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
        method: str = "exact", step: float | None = None) -> Tensor:
    """The directional derivative of fn at ``primals`` along ``tangents``, with no gradients.

    ``exact``: forward-mode AD (dual tensors, ``torch.autograd.forward_ad``; the fused ops carry
    their own JVP rules, the attention's included, and the fused networks' linear layers compute
    their tangent in one GEMM, ``fastgen_kernels.ops.linear``). Dual tensors rather than
    ``torch.func.jvp``: the same values, but functorch wraps every autograd.Function call in a
    new class and the custom op, 2.5x the host time of the pass (a DiT of 28 blocks on the CPU).
    ``finite_difference``: (fn(p + h v) - fn(p - h v)) / 2h, combined in fp64, with a step relative
    to the point, per sample b over all the (B, ...) primals: h_b = ``step`` |p_b| / |v_b| (``step``
    itself where either is zero). Two evaluations, the baseline the exact JVP replaces, with
    autocast off: evaluated in bf16, the difference at h = 1e-3 is rounding noise (the tangent's
    relative error was above 1 on a small DiT, against 5e-4 in fp32). The network runs in its own
    dtype: METHODS.md's fp64 difference is an fp64 network's. ``step=None`` balances the
    difference's truncation error (h^2) against rounding (eps / h): :func:`finite_difference_step`
    of the primals' dtypes (:func:`output_and_jvp` adds the network's parameters'). Time embedded
    at a scale of 1000 (rf teachers' ``time_scale``) makes the step in t a large one for the
    network: a small fp64 DiT's tangent was 0.36 off (relative) at 1e-3 against 9e-7 at the
    default; in fp32 no step is accurate there (0.36 at the default, 3e-4 with time unscaled), so
    take the exact method.
    ``finite_difference_autocast``: the same under the caller's autocast, cheaper and that
    inaccurate: for cost comparisons only (bench_distill's peer, as the H200 measured it). The
    callers take fn(primals) from their own forward pass with gradients, so no method returns it.
    """
    if method not in JVP_METHODS:
        raise ValueError(f"jvp: method must be one of {JVP_METHODS}, got {method!r}")
    with torch.no_grad():
        if method == "exact":  # along the inputs: the parameters' tangents are zero
            with parameters_without_tangents(), forward_ad.dual_level():
                out = fn(*(forward_ad.make_dual(p, v) for p, v in zip(primals, tangents)))
                tangent = forward_ad.unpack_dual(out).tangent
                return torch.zeros_like(out) if tangent is None else tangent
        if step is None:
            step = finite_difference_step(p.dtype for p in primals)
        p_norm, v_norm = (torch.sqrt(sum(t.reshape(t.shape[0], -1).double().square().sum(1) for t in ts))
                          for ts in (primals, tangents))
        h = torch.where((p_norm > 0) & (v_norm > 0), step * p_norm / v_norm, step)

        def per_sample(t: Tensor) -> Tensor:
            return h.view(-1, *[1] * (t.dim() - 1))

        autocast_off = torch.autocast(primals[0].device.type, enabled=False)
        with contextlib.nullcontext() if method == "finite_difference_autocast" else autocast_off:
            plus = fn(*(p + (per_sample(p) * v).to(p.dtype) for p, v in zip(primals, tangents)))
            minus = fn(*(p - (per_sample(p) * v).to(p.dtype) for p, v in zip(primals, tangents)))
        return ((plus.double() - minus.double()) / (2 * per_sample(plus))).to(plus.dtype)


def finite_difference_step(dtypes: Iterable[torch.dtype]) -> float:
    """eps^(1/3) / 5 of the least precise of ``dtypes`` (1e-3 in fp32, 1.2e-6 in fp64): the
    central difference's step relative to the point where its h^2 error meets rounding's eps / h.
    An fp32 network fed fp64 data computes in fp32: at fp64's step a small DiT's difference was
    0.22 off, 4e-4 at fp32's."""
    return max(torch.finfo(d).eps for d in dtypes) ** (1 / 3) / 5


def forward_and_jvp(fn: Callable[..., Any], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
                    ) -> tuple[Any, Tensor]:
    """(fn(*primals), the directional derivative of its output's first tensor along ``tangents``)
    from one forward-mode pass with grad mode as it is: the output keeps its autograd history
    (the forward a loss differentiates), the tangent has none (it enters the loss as a constant).
    The exact method of :func:`jvp` and the forward in one: inside parameters_without_tangents the
    fused ops' tangent rules run without backward-mode AD and their linear layers' tangents take
    one GEMM (``fastgen_kernels.ops.linear``), so the pass costs the JVP's and holds the forward's
    activations. ``fn`` returns a tensor or a tuple of tensors, returned alike."""
    with parameters_without_tangents(), forward_ad.dual_level():
        out = fn(*(forward_ad.make_dual(p, v) for p, v in zip(primals, tangents)))
        unpacked = [forward_ad.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))]
    primals_out = tuple(u.primal for u in unpacked)
    tangent = unpacked[0].tangent
    tangent = torch.zeros_like(primals_out[0]) if tangent is None else tangent.detach()
    return (primals_out if isinstance(out, tuple) else primals_out[0]), tangent


def output_and_jvp(model: Denoiser, fn: Callable[..., Any], primals: tuple[Tensor, ...],
                   tangents: tuple[Tensor, ...], method: str = "exact", step: float | None = None
                   ) -> tuple[Any, Tensor]:
    """(fn(model, *primals) with gradients, the JVP of its output's first tensor along
    ``tangents``), as sCM and MeanFlow need them: from one pass (:func:`forward_and_jvp`) for the
    exact method, or the JVP apart (:func:`jvp`, through :func:`unwrapped`) for finite
    differences and networks under DDP or FSDP2 (:func:`data_parallel`)."""
    if method == "exact" and not data_parallel(model):
        return forward_and_jvp(lambda *p: fn(model, *p), primals, tangents)
    inner = unwrapped(model)
    if step is None:  # the precision the network computes in, not only its inputs'
        floats = [p.dtype for p in inner.parameters() if p.is_floating_point()]
        step = finite_difference_step([p.dtype for p in primals] + floats)
    J = jvp(lambda *p: _first(fn(inner, *p)), primals, tangents, method, step)
    return fn(model, *primals), J


def _first(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def ramp(iteration: int, iterations: int) -> float:
    """min(1, iteration / iterations) (1 when iterations is 0): a linear warm-up factor."""
    return 1.0 if iterations <= 0 else min(1.0, iteration / iterations)
