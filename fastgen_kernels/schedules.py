"""Noise schedules, prediction parameterizations and the conversions between them.

Every schedule writes a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * eps`` with
``eps ~ N(0, I)`` (TrigFlow's noise ``z = sigma_data * eps`` is folded into ``sigma``):

=====  ===========================  ======================  ===============================
name   alpha(t), sigma(t)           t from t_max down to 0  notes
=====  ===========================  ======================  ===============================
edm    1, t                         80 .. 0.002, then 0     Karras grid, rho = 7
rf     1 - t, t                     0.999 .. 0              grid shift s t / (1+(s-1) t)
vp     sqrt(abar), sqrt(1 - abar)   0.999 .. 0              abar interpolated from a beta table
trig   cos t, sigma_data sin t      atan(80 / sigma_data)   sCM / TrigFlow
=====  ===========================  ======================  ===============================

A network's output is one of the predictions below; each converts to and from the clean-data
estimate x0 given (x_t, t), so samplers only ever deal with x0:

- ``x0``: x0 itself.
- ``eps``: x0 = (x - sigma eps) / alpha.
- ``v`` (alpha^2 + sigma^2 = 1 only: vp): v = alpha eps - sigma x0, x0 = alpha x - sigma v.
- ``flow``: u = dx_t/dt = alpha' x0 + sigma' eps; eliminating eps,
  x0 = (sigma' x - sigma u) / (alpha sigma' - sigma alpha'), which is x - t u for rf and edm.
- ``trig_F`` (trig only): the TrigFlow network output F = u / sigma_data, x0 = cos t x - sin t sigma_data F.
- ``mean_flow``: the average velocity u(x_t, r, t) over [r, t] of a flow map: x_r = x_t - (t - r) u;
  at r = 0 it is x0 = x - t u (as ``flow``, which it equals in the limit r -> t).

Arithmetic is done in fp32 (fp64 when x is fp64) on per-sample times; denominators keep their sign
with magnitude at least 1e-6 (an eps prediction at alpha = 0 is undefined, not infinite).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

PREDICTIONS = ("x0", "eps", "v", "flow", "trig_F", "mean_flow")
GRIDS = ("karras", "uniform", "shifted")
MIN_DENOMINATOR = 1e-6


def safe_denominator(d: Tensor) -> Tensor:
    """d with |d| >= 1e-6, sign kept (0 counts as positive)."""
    return torch.where(d < 0, d.clamp(max=-MIN_DENOMINATOR), d.clamp(min=MIN_DENOMINATOR))


def per_sample(t: float | Tensor, x: Tensor) -> Tensor:
    """t as a (B, 1, ..., 1) tensor that broadcasts over x (B, ...), in x's compute dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(t, Tensor):   # a fill kernel, not a host-to-device copy: CUDA-graph safe
        t = torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)
    elif t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a number or a ({x.shape[0]},) tensor for x of shape "
                         f"{tuple(x.shape)}, got shape {tuple(t.shape)}")
    return t.to(dtype).reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Schedule:
    """x_t = alpha(t) x0 + sigma(t) eps; subclasses give alpha, sigma and their t-derivatives."""

    name: str = field(init=False, default="")
    t_max: float = 1.0
    t_min: float = 0.0   # smallest t > 0 a grid visits before jumping to 0
    sigma_data: float = 0.5

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def add_noise(self, x0: Tensor, eps: Tensor, t: float | Tensor) -> Tensor:
        """alpha(t) x0 + sigma(t) eps, t a number or (B,)."""
        tb = per_sample(t, x0)
        return (self.alpha(tb) * x0 + self.sigma(tb) * eps).to(x0.dtype)

    def to_x0(self, prediction: str, output: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        """The x0 estimate implied by a network ``output`` of kind ``prediction`` at (x, t)."""
        tb = per_sample(t, x)
        xf, out = x.to(tb.dtype), output.to(tb.dtype)
        alpha, sigma = self.alpha(tb), self.sigma(tb)
        if prediction == "x0":
            x0 = out
        elif prediction == "eps":
            x0 = (xf - sigma * out) / safe_denominator(alpha)
        elif prediction == "v":
            self._need_variance_preserving(prediction)
            x0 = alpha * xf - sigma * out
        elif prediction in ("flow", "mean_flow", "trig_F"):
            if prediction == "trig_F":
                self._need_trig(prediction)
                out = out * self.sigma_data
            d_alpha, d_sigma = self.d_alpha(tb), self.d_sigma(tb)
            x0 = (d_sigma * xf - sigma * out) / safe_denominator(alpha * d_sigma - sigma * d_alpha)
        else:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        return x0.to(x.dtype)

    def from_x0(self, prediction: str, x0: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        """The output of kind ``prediction`` that :meth:`to_x0` maps back to ``x0`` at (x, t)."""
        tb = per_sample(t, x)
        xf, x0f = x.to(tb.dtype), x0.to(tb.dtype)
        eps = (xf - self.alpha(tb) * x0f) / safe_denominator(self.sigma(tb))
        return self._output(prediction, x0f, eps, tb).to(x.dtype)

    def target(self, prediction: str, x0: Tensor, eps: Tensor, t: float | Tensor) -> Tensor:
        """The regression target of kind ``prediction`` for x_t = alpha x0 + sigma eps: exact, with
        no division (what a network is trained toward; a flow map's at r = t)."""
        tb = per_sample(t, x0)
        return self._output(prediction, x0.to(tb.dtype), eps.to(tb.dtype), tb).to(x0.dtype)

    def _output(self, prediction: str, x0: Tensor, eps: Tensor, tb: Tensor) -> Tensor:
        if prediction == "x0":
            return x0
        if prediction == "eps":
            return eps
        if prediction == "v":
            self._need_variance_preserving(prediction)
            return self.alpha(tb) * eps - self.sigma(tb) * x0
        if prediction in ("flow", "mean_flow", "trig_F"):
            out = self.d_alpha(tb) * x0 + self.d_sigma(tb) * eps
            if prediction == "trig_F":
                self._need_trig(prediction)
                out = out / self.sigma_data
            return out
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def velocity(self, x0: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        """The probability-flow ODE's dx/dt = alpha' x0 + sigma' eps(x, x0) at (x, t)."""
        return self.from_x0("flow", x0, x, t)

    def grid(self, steps: int, kind: str | None = None, shift: float = 3.0, t_max: float | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """``steps + 1`` times from t_max down to 0 (fp64): ``karras`` (rho = 7 in sigma), ``uniform``
        in t, or ``shifted`` (uniform, then t' = s t / (1 + (s - 1) t)); default per schedule."""
        kind = kind or self.default_grid
        if kind not in GRIDS:
            raise ValueError(f"grid kind must be one of {GRIDS}, got {kind!r}")
        t_max = self.t_max if t_max is None else t_max
        if kind == "karras":
            if self.t_min <= 0:
                raise ValueError(f"a Karras grid needs t_min > 0; the {self.name} schedule has t_min = "
                                 f"{self.t_min}: use kind='uniform' or 'shifted'")
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            s_max, s_min = self.edm_sigma(t_max), self.edm_sigma(self.t_min)
            rho = 7.0
            sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            ts = self.t_from_edm_sigma(sigmas)
            ts[0] = t_max  # no round-off at the start
        else:
            ts = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)[:-1]
            if kind == "shifted":
                ts = shift * ts / (1 + (shift - 1) * ts)
        return torch.cat([ts, ts.new_zeros(1)]).to(device)

    default_grid = "uniform"

    def edm_sigma(self, t: float | Tensor) -> float | Tensor:
        """The EDM noise level sigma / alpha of time t (for Karras grids)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.sigma(t) / self.alpha(t)

    def t_from_edm_sigma(self, s: Tensor) -> Tensor:
        raise ValueError(f"the {self.name} schedule has no Karras grid; use kind='uniform'")

    # (P_mean, P_std) of the training noise levels: ln(sigma / alpha) ~ N(P_mean, P_std^2)
    training_log_sigma = (-1.2, 1.2)

    def training_time(self, normal: Tensor) -> Tensor:
        """Training times t from standard normal draws (any shape): the EDM noise level sigma / alpha
        is log-normal with (P_mean, P_std) = ``training_log_sigma`` (edm (-1.2, 1.2), trig
        (-1.0, 1.4) as sCM, rf (0, 1): logit-normal t); vp: uniform t = Phi(normal)."""
        p_mean, p_std = self.training_log_sigma
        t = self.t_from_edm_sigma((normal.double() * p_std + p_mean).exp())
        return t.clamp(self.t_min, self.t_max).to(normal.dtype)

    def check_prediction(self, prediction: str) -> None:
        """Raises ValueError unless a network predicting ``prediction`` works on this schedule."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prediction == "v":
            self._need_variance_preserving(prediction)
        if prediction == "trig_F":
            self._need_trig(prediction)

    def _need_variance_preserving(self, prediction: str) -> None:
        if self.name != "vp":
            raise ValueError(f"prediction {prediction!r} needs alpha^2 + sigma^2 = 1 (the vp schedule), "
                             f"not the {self.name} schedule")

    def _need_trig(self, prediction: str) -> None:
        if self.name != "trig":
            raise ValueError(f"prediction {prediction!r} needs the trig schedule, not {self.name}")

    def to_dict(self) -> dict:
        """The JSON-able description :func:`get_schedule` rebuilds this schedule from."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        if "betas" in fields:
            fields["betas"] = list(fields["betas"])
        return {"name": self.name, **fields}


@dataclass(frozen=True)
class EDM(Schedule):
    name: str = field(init=False, default="edm")
    t_max: float = 80.0
    t_min: float = 0.002
    default_grid = "karras"

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_edm_sigma(self, s):
        return s

    def precondition(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM's (c_in, c_noise, c_skip, c_out) at noise level t:
        D(x, t) = c_skip x + c_out F(c_in x, c_noise)."""
        sd2, t2 = self.sigma_data ** 2, t * t
        return (1 / (sd2 + t2).sqrt(), t.clamp(min=1e-20).log() / 4, sd2 / (t2 + sd2),
                t * self.sigma_data / (t2 + sd2).sqrt())


@dataclass(frozen=True)
class RectifiedFlow(Schedule):
    name: str = field(init=False, default="rf")
    t_max: float = 0.999   # alpha(1) = 0 would make eps / x0 conversions singular
    t_min: float = 0.0

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    training_log_sigma = (0.0, 1.0)

    def t_from_edm_sigma(self, s):
        return s / (1 + s)


@dataclass(frozen=True)
class VP(Schedule):
    """DDPM's variance-preserving schedule on continuous t in [0, 1): abar(t) is the cumulative
    product of (1 - beta) over the table, log-linearly interpolated at t * len(betas), with
    abar(0) = 1: diffusers' alphas_cumprod[k] (timestep k) sits at t = (k + 1) / len(betas), so a
    diffusers network takes t * len(betas) - 1 (``Denoiser(time_shift=-1)``, from_diffusers)."""

    name: str = field(init=False, default="vp")
    t_max: float = 0.999
    t_min: float = 0.0
    betas: tuple[float, ...] = tuple(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).tolist())

    def __post_init__(self) -> None:
        # log(1 - beta) and its prefix sums, built once per device and dtype (not per step: inside
        # a CUDA-graph capture a host-to-device copy is not allowed)
        object.__setattr__(self, "_tables", {})

    def _table(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(log(1 - beta) (N,), log abar at the N + 1 grid points, log abar(0) = 0) on t's device."""
        key = (t.device, t.dtype)
        if key not in self._tables:
            log_alphas = torch.log1p(-torch.tensor(self.betas, dtype=torch.float64))
            log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_alphas.cumsum(0)])
            self._tables[key] = (log_alphas.to(device=t.device, dtype=t.dtype),
                                 log_abar.to(device=t.device, dtype=t.dtype))
        return self._tables[key]

    def _interval(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(table interval index, position within it) of t."""
        steps = len(self.betas)
        pos = (t * steps).clamp(0, steps)
        lo = pos.floor().long().clamp(max=steps - 1)
        return lo, pos - lo

    def _log_abar(self, t: Tensor) -> Tensor:
        log_alphas, log_abar = self._table(t)
        lo, frac = self._interval(t)
        return log_abar[lo] + frac * log_alphas[lo]

    def _d_log_abar(self, t: Tensor) -> Tensor:
        log_alphas, _ = self._table(t)
        return log_alphas[self._interval(t)[0]] * len(self.betas)

    def training_time(self, normal: Tensor) -> Tensor:
        t = 0.5 * torch.erfc(-normal.double() / math.sqrt(2))  # the normal CDF: uniform in (0, 1)
        return t.clamp(self.t_min, self.t_max).to(normal.dtype)

    def alpha(self, t):
        return (self._log_abar(t) / 2).exp()

    def sigma(self, t):
        return (-torch.expm1(self._log_abar(t))).clamp(min=0).sqrt()

    def d_alpha(self, t):
        return self.alpha(t) * self._d_log_abar(t) / 2

    def d_sigma(self, t):
        abar = self._log_abar(t).exp()
        return -abar * self._d_log_abar(t) / (2 * safe_denominator(self.sigma(t)))


@dataclass(frozen=True)
class Trig(Schedule):
    name: str = field(init=False, default="trig")
    t_max: float | None = None  # default: atan(80 / sigma_data), EDM's largest noise level
    t_min: float | None = None  # default: atan(0.002 / sigma_data), EDM's smallest
    default_grid = "uniform"

    def __post_init__(self) -> None:  # (defaults of sigma_data's: Trig(sigma_data=1.0) kept 0.5's)
        for name, edm_sigma in (("t_max", 80.0), ("t_min", 0.002)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, math.atan(edm_sigma / self.sigma_data))

    def alpha(self, t):
        return torch.cos(t)

    def sigma(self, t):
        return self.sigma_data * torch.sin(t)

    def d_alpha(self, t):
        return -torch.sin(t)

    def d_sigma(self, t):
        return self.sigma_data * torch.cos(t)

    training_log_sigma = (-1.0, 1.4)

    def t_from_edm_sigma(self, s):
        return torch.atan(s / self.sigma_data)

    def edm_sigma(self, t):  # sCM's sigma = sigma_data tan t (in units of the data)
        return self.sigma_data * torch.tan(torch.as_tensor(t, dtype=torch.float64))


SCHEDULES = {"edm": EDM, "rf": RectifiedFlow, "vp": VP, "trig": Trig}


def get_schedule(schedule: str | dict | Schedule, sigma_data: float = 0.5) -> Schedule:
    """A schedule from its name, its :meth:`Schedule.to_dict`, or itself."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, dict):
        options = dict(schedule)
        name = options.pop("name", None)
        if "betas" in options:
            options["betas"] = tuple(options["betas"])
    else:
        name, options = schedule, {"sigma_data": sigma_data}
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)} or a Schedule, got {name!r}")
    return SCHEDULES[name](**options)
