"""``sample(model, steps)``: 1-step and few-step students, many-step teachers, one flat loop.

Solvers (times t_0 > t_1 > ... > t_N = 0; D(x, t) the model's x0 estimate, guided when asked):

- ``consistency`` (students): x0 = D(x, t_i); if t_{i+1} > 0, re-noise
  x = alpha(t_{i+1}) x0 + sigma(t_{i+1}) eps with eps fresh noise (``stochastic=True``, "sde") or
  the eps implied by (x, x0) ("ode"). One step is just D(sigma(t_0) z, t_0).
- ``meanflow`` (flow maps): x_{t_{i+1}} = x - (t_i - t_{i+1}) u(x, t_{i+1}, t_i).
- ``euler``, ``heun`` (EDM's second-order step on all but the last step) on the probability-flow
  ODE dx/dt = alpha' x0 + sigma' (x - alpha x0) / sigma.
- ``dpm++2m``: DPM-Solver++(2M) in x0 form for any schedule (lambda = log(alpha / sigma)).

Classifier-free guidance runs the conditional and unconditional halves in one call of batch 2B and
mixes their x0 estimates (the same as mixing predictions: every conversion is affine in the output).

On a GPU the fixed-shape loop is captured once into a CUDA graph (per model, batch, shape, times
and options) and replayed: all random numbers are drawn before the replay into static buffers, so
the loop has no host syncs, and a seed gives the same samples with and without the graph.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastgen_kernels import backends
from fastgen_kernels.denoiser import Cond, Denoiser, concat_conds, cond_like, cond_parts
from fastgen_kernels.schedules import per_sample

SOLVERS = ("auto", "consistency", "meanflow", "euler", "heun", "dpm++2m")

# good few-step student times (the consistency models' 2-step midpoints: 0.821 on edm, sCM's 1.1 on
# trig); other step counts use the schedule's grid
STUDENT_TIMES = {
    "edm": {1: [80.0, 0.0], 2: [80.0, 0.821, 0.0]},
    "rf": {1: [0.999, 0.0], 2: [0.999, 0.5, 0.0], 4: [0.999, 0.937, 0.833, 0.624, 0.0]},
    "trig": {1: [math.atan(80.0 / 0.5), 0.0], 2: [math.atan(80.0 / 0.5), 1.1, 0.0]},
}


def default_timesteps(model: Denoiser, steps: int, solver: str) -> list[float]:
    """The times a solver visits when none are given."""
    schedule = model.schedule
    if solver == "meanflow":  # a flow map jumps from pure noise: rf's t = 1, another schedule's t_max
        start = 1.0 if schedule.name == "rf" else schedule.t_max
        return torch.linspace(start, 0.0, steps + 1, dtype=torch.float64).tolist()
    if solver == "consistency":
        table = STUDENT_TIMES.get(schedule.name, {})
        if steps in table and (schedule.name != "trig" or schedule.sigma_data == 0.5):
            return table[steps]
        if schedule.default_grid == "karras":  # its last time is t_min, where a step would re-noise to
            # t_min and denoise again (a 3-step student stepping as a 2-step one): the grid one longer
            return schedule.grid(steps + 1)[:steps].tolist() + [0.0]
    return schedule.grid(steps).tolist()


def choose_solver(model: Denoiser, steps: int) -> str:
    """``solver="auto"``: flow maps jump, distilled students take consistency steps, teachers
    integrate the ODE (EDM with Heun, the others with Euler; DPM-Solver++(2M) under 10 steps)."""
    if model.prediction == "mean_flow":
        return "meanflow"
    if model.distilled:
        return "consistency"
    if steps < 10:
        return "dpm++2m"
    return "heun" if model.schedule.name == "edm" else "euler"


def _check_timesteps(timesteps: Sequence[float] | Tensor) -> list[float]:
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D list of at least 2 times, got shape {tuple(ts.shape)}")
    if not torch.isfinite(ts).all() or not (ts[:-1] > ts[1:]).all() or ts[-1] != 0:
        raise ValueError(f"timesteps must be finite, strictly decreasing and end at 0, got {ts.tolist()}")
    return ts.tolist()


def _nvtx_range(name: str, on: bool):
    if not on:
        return contextlib.nullcontext()
    try:
        import nvtx

        return nvtx.annotate(name)
    except ImportError:
        return torch.cuda.nvtx.range(name)


def _check_cond(name: str, cond: Cond | None, batch: int, like: Cond | None = None) -> None:
    """cond: None, a tensor with batch ``batch``, or a tuple of them; shaped as ``like`` if given."""
    if cond is None:
        return
    parts = cond_parts(cond)
    if not isinstance(cond, (Tensor, tuple)) or not parts or any(
            not isinstance(c, Tensor) or c.dim() == 0 or c.shape[0] != batch for c in parts):
        got = ([tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in parts]
               if isinstance(cond, (Tensor, tuple)) else type(cond).__name__)
        raise ValueError(f"sample: {name} must be a tensor with batch {batch} or a tuple of them, got {got}")
    if like is not None and (isinstance(cond, Tensor) != isinstance(like, Tensor) or [c.shape for c in parts] != [
            c.shape for c in cond_parts(like)]):
        raise ValueError(f"sample: {name} must be shaped like cond "
                         f"{[tuple(c.shape) for c in cond_parts(like)]}, got {[tuple(c.shape) for c in parts]}")


class _Guided:
    """D(x, t) with classifier-free guidance in one batched call; also the flow-map step."""

    def __init__(self, model: Denoiser, cond: Cond | None, neg_cond: Cond | None, scale: float,
                 autocast: torch.dtype | None) -> None:
        self.model, self.scale, self.autocast = model, scale, autocast
        self.guided = scale != 1.0
        self.cond = concat_conds(neg_cond, cond) if self.guided else cond

    def _call(self, fn: Callable[..., Tensor], x: Tensor, *times: float) -> Tensor:
        """fn(x, *times, cond) on [x, x] with [neg_cond, cond] when guided, then mixed."""
        xin = torch.cat([x, x]) if self.guided else x
        time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        per_sample_times = [torch.full((xin.shape[0],), t, device=x.device, dtype=time_dtype) for t in times]
        # autocast's cache off: inside a caller's autocast (even a disabled one) this context's exit
        # does not clear it, and later calls (a captured graph's kernels too) would read the bf16
        # copies of weights since updated in place, or since freed
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=False):
            out = fn(xin, *per_sample_times, self.cond).to(x.dtype)
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)

    def x0(self, x: Tensor, t: float) -> Tensor:
        return self._call(self.model.x0, x, t)

    def flow_map(self, x: Tensor, t: float, r: float) -> Tensor:
        return self._call(self.model.flow_map, x, t, r)


def _solve(guided: _Guided, x: Tensor, noise: Tensor | None, times: list[float], solver: str,
           stochastic: bool, trajectory: list[Tensor] | None, nvtx: bool, bar) -> Tensor:
    """The sampling loop from x at times[0] (no host syncs: times are Python floats)."""
    schedule = guided.model.schedule
    x0_prev, h_prev = None, None
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        with _nvtx_range(f"fastgen.sample step {i}", nvtx):
            if solver == "meanflow":
                x = guided.flow_map(x, t, t_next)
            else:
                x0 = guided.x0(x, t)
                tb, nb = per_sample(t, x), per_sample(t_next, x)
                if solver == "consistency":
                    if t_next > 0:
                        eps = noise[i] if stochastic else (x - schedule.alpha(tb) * x0) / schedule.sigma(tb)
                        x = (schedule.alpha(nb) * x0 + schedule.sigma(nb) * eps).to(x.dtype)
                    else:
                        x = x0
                elif solver in ("euler", "heun"):
                    u = schedule.velocity(x0, x, t)
                    x_euler = x + (t_next - t) * u
                    if solver == "heun" and t_next > 0:
                        u_next = schedule.velocity(guided.x0(x_euler, t_next), x_euler, t_next)
                        x = x + (t_next - t) * 0.5 * (u + u_next)
                    else:
                        x = x_euler
                else:  # dpm++2m
                    if t_next == 0:
                        x = x0
                    else:
                        # alpha >= 0: trig's t_max = pi/2 rounded to fp32 lies past it (cos < 0: a NaN log);
                        # alpha = 0 gives lam = -inf and h = inf, a step to x0, as rf's t = 1 does
                        lam, lam_next = (schedule.alpha(tb).clamp_min(0) / schedule.sigma(tb)).log(), \
                            (schedule.alpha(nb).clamp_min(0) / schedule.sigma(nb)).log()
                        h = lam_next - lam
                        d = x0
                        if x0_prev is not None:
                            ratio = h_prev / h
                            d = (1 + 1 / (2 * ratio)) * x0 - 1 / (2 * ratio) * x0_prev
                        x = (schedule.sigma(nb) / schedule.sigma(tb) * x
                             - schedule.alpha(nb) * torch.expm1(-h) * d).to(x.dtype)
                        x0_prev, h_prev = x0, h
        if trajectory is not None:
            trajectory.append(x)
        if bar is not None:
            bar.update(1)
    return x


def _autocast_dtype(autocast: str | torch.dtype | None, device: torch.device,
                    model: Denoiser) -> torch.dtype | None:
    if autocast == "auto":  # bf16 for an fp32 network on a GPU; one already in 16 bits runs as it is
        weights = next((p for p in model.parameters() if p.is_floating_point()), None)
        full_precision = weights is None or weights.dtype in (torch.float32, torch.float64)
        return torch.bfloat16 if device.type == "cuda" and full_precision else None
    if autocast is not None and not isinstance(autocast, torch.dtype):
        raise ValueError(f"sample: autocast must be 'auto', None or a torch.dtype, got {autocast!r}")
    return autocast


def _model_device_and_dtype(model: Denoiser) -> tuple[torch.device, torch.dtype]:
    """Where the model lives, and the solver's dtype: fp64 for an fp64 model, else fp32 (from its
    first floating parameter or buffer: found without listing all of them, which took 1 ms of
    every sample call for DiT-XL on the CPU)."""
    first = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    return first.device, torch.float64 if first.dtype == torch.float64 else torch.float32


def sample(model: Denoiser, steps: int = 1, *, batch_size: int | None = None, shape: Sequence[int] | None = None,
           noise: Tensor | None = None, cond: Cond | None = None, guidance_scale: float = 1.0,
           neg_cond: Cond | None = None, timesteps: Sequence[float] | Tensor | None = None,
           solver: str = "auto", stochastic: bool = True, seed: int | None = None,
           generator: torch.Generator | None = None, cuda_graph: bool | str = "auto",
           progress: bool | None = None, return_trajectory: bool = False, scheduler=None,
           autocast: str | torch.dtype | None = "auto") -> Tensor | tuple[Tensor, list[Tensor]]:
    """Samples ``batch_size`` outputs of ``model`` (a :class:`Denoiser`) in ``steps`` steps.

    Args:
        batch_size: samples to draw; default: cond's batch (1 without cond).
        steps: network steps (a Heun step costs two evaluations); ignored when ``timesteps`` is given.
        shape: per-sample shape (C, H, W); defaults to ``model.shape``; not needed with ``noise``.
        noise: the starting noise (B, *shape), standard normal; drawn from ``seed``/``generator`` if None.
        cond: conditioning with batch B (class labels, embeddings), passed to the network; or a
            tuple of such tensors the network takes together, e.g. ``(text_embeddings, mask)``
            for a diffusers PixArt model (its ``encoder_attention_mask``: 1 for tokens, 0 for
            padding).
        guidance_scale: classifier-free guidance weight w (1: none); ``neg_cond`` is the
            unconditional input, shaped like ``cond`` (default for a tensor cond: ``model.null_cond``
            broadcast like it).
        timesteps: explicit times t_0 > ... > 0 (ending at 0) in the model's schedule.
        solver: "auto" | "consistency" | "meanflow" | "euler" | "heun" | "dpm++2m".
        stochastic: for consistency steps, re-noise with fresh noise (sde) or the implied noise (ode).
        seed / generator: the random stream (one of them); same seed, same device -> same samples.
        cuda_graph: "auto" (on for CUDA models), True or False.
        progress: a tqdm bar (default: on for 25+ steps in a terminal, without a CUDA graph).
        return_trajectory: also return [x at t_0, after step 1, ..., after step N].
        scheduler: a diffusers scheduler that drives the loop instead (see ``sample_with_scheduler``).
        autocast: dtype the network runs in ("auto": bf16 for an fp32 network on CUDA, else off);
            solver math is fp32.

    Returns the samples (B, *shape) in fp32 (fp64 for an fp64 model), and the trajectory if asked.
    """
    if not isinstance(model, Denoiser):
        raise TypeError("sample: model must be a fastgen_kernels.Denoiser (wrap the network with its "
                        f"schedule and prediction, or use from_diffusers), got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: steps must be an int >= 1, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"sample: solver must be one of {SOLVERS}, got {solver!r}")
    if seed is not None and generator is not None:
        raise ValueError("sample: pass seed or generator, not both")
    device, dtype = _model_device_and_dtype(model)

    if noise is None:
        shape = tuple(shape) if shape is not None else model.shape
        if shape is None:
            raise ValueError("sample: shape is needed when noise is not given (and the model has no shape)")
        if batch_size is None:  # cond's batch, checked below
            parts = cond_parts(cond)
            batch = parts[0].shape[0] if parts and isinstance(parts[0], Tensor) and parts[0].dim() else 1
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"sample: batch_size must be an int >= 1, got {batch_size!r}")
        else:
            batch = batch_size
    else:
        if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 2:
            raise ValueError("sample: noise must be a floating (B, ...) tensor")
        batch, shape = noise.shape[0], tuple(noise.shape[1:])
    _check_cond("cond", cond, batch)
    guidance_scale = float(guidance_scale)
    if guidance_scale != 1.0:
        if cond is None:
            raise ValueError("sample: guidance_scale != 1 needs cond")
        if neg_cond is None:
            neg_cond = model.unconditional(cond, "sample")
        _check_cond("neg_cond", neg_cond, batch, like=cond)
    # on the model's device, as the noise
    cond, neg_cond = (cond_like(c, [part.to(device) for part in cond_parts(c)]) for c in (cond, neg_cond))
    if scheduler is not None:
        from fastgen_kernels.models.diffusers import sample_with_scheduler

        # the scheduler picks the times and makes the steps, without a CUDA graph or a bar
        given = {"timesteps": timesteps is not None, "solver": solver != "auto", "cuda_graph": cuda_graph is True,
                 "progress": progress is True, "stochastic": stochastic is False}
        ignored = [option for option, is_given in given.items() if is_given]
        if ignored:
            raise ValueError(f"sample: {ignored[0]} does not apply with a scheduler (it picks the times and makes "
                             "the steps, eagerly)")

        return sample_with_scheduler(model, scheduler, steps, batch=batch, shape=shape, noise=noise, cond=cond,
                                     guidance_scale=guidance_scale, neg_cond=neg_cond, seed=seed,
                                     generator=generator, return_trajectory=return_trajectory,
                                     autocast=_autocast_dtype(autocast, device, model))

    if solver == "auto":
        solver = choose_solver(model, steps)
    if solver == "meanflow" and model.prediction != "mean_flow":
        raise ValueError(f"sample: solver 'meanflow' needs a flow-map model, not prediction {model.prediction!r}")
    if model.prediction == "mean_flow" and solver != "meanflow":
        raise ValueError(f"sample: a flow-map model samples with solver 'meanflow', not {solver!r}")
    times = _check_timesteps(timesteps) if timesteps is not None else default_timesteps(model, steps, solver)
    steps = len(times) - 1

    if generator is None:
        generator = torch.Generator(device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    # x at t_0 = alpha(t_0) * 0 + sigma(t_0) * z: the data's mean (0) plus the noise
    start_scale = float(model.schedule.sigma(torch.tensor([times[0]], dtype=torch.float64)))
    if noise is None:
        noise = torch.randn((batch, *shape), generator=generator, device=device, dtype=dtype)
    renoise = solver == "consistency" and stochastic and steps > 1
    step_noise = (torch.randn((steps - 1, batch, *shape), generator=generator, device=device, dtype=dtype)
                  if renoise else None)

    autocast_dtype = _autocast_dtype(autocast, device, model)
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"sample: cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    use_graph = device.type == "cuda" if cuda_graph == "auto" else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError("sample: cuda_graph=True needs a model on a CUDA device")
    nvtx = device.type == "cuda"

    given_parts, negative_parts = cond_parts(cond), cond_parts(neg_cond)

    def run(z: Tensor, eps: Tensor | None, *parts: Tensor, bar=None):
        c = cond_like(cond, parts[:len(given_parts)])
        nc = cond_like(neg_cond, parts[len(given_parts):])
        guided = _Guided(model, c, nc, guidance_scale, autocast_dtype)
        trajectory = [] if return_trajectory else None
        x = z * start_scale
        if trajectory is not None:
            trajectory.append(x)
        x = _solve(guided, x, eps, times, solver, stochastic, trajectory, nvtx, bar)
        return x, trajectory

    with torch.no_grad():
        inputs = (noise.to(device=device, dtype=dtype), step_noise, *given_parts, *negative_parts)
        if use_graph:
            key = (batch, shape, dtype, tuple(times), solver, stochastic, guidance_scale, return_trajectory,
                   autocast_dtype, type(cond), len(given_parts), *[(t.shape, t.dtype) for t in inputs[2:]],
                   graph_state(model))
            x, trajectory = _replay(model, key, run, inputs)
        else:
            if progress is None:
                progress = steps >= 25 and sys.stderr.isatty()
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, desc="sampling", unit="step")
            try:
                x, trajectory = run(*inputs, bar=bar)
            finally:
                if bar is not None:
                    bar.close()
    return (x, trajectory) if return_trajectory else x


def graph_state(model: nn.Module) -> tuple:
    """What a captured graph holds on to besides its inputs and the call's arguments: the modules
    (their types and train/eval modes), the tensors (addresses and dtypes) of their parameters and
    buffers, the switches of the fused networks (DiT's ``fused`` and ``fused_epilogues``, an FP8
    layer's ``activation``) and the types of diffusers' attention processors, the Denoiser's
    parameterization and time scaling, the forced backend, inference mode and the global switches
    that pick kernels (TF32 and reduced-precision matmuls, deterministic algorithms, the SDPA
    backends an ``sdpa_kernel`` context allows). A graph captured before model.to(...),
    quantize_fp8, fuse_epilogues, accelerate, set_fused, train() or eval(), use_backend or a new
    time_scale is not replayed after them; other changes of behaviour (a network's own Python
    flags, say) need cuda_graph=False or a new Denoiser."""
    # computed on every call: a plain recursion over the module tree (Module.modules() builds
    # names and a visited set: 0.85 ms for DiT-XL's 323 modules on the CPU, this 0.25 ms)
    modules, tensors = [], []

    def walk(module: nn.Module) -> None:
        own = module.__dict__
        modules.append((id(module), type(module), module.training, own.get("fused"), own.get("fused_epilogues"),
                        own.get("activation"), type(own.get("processor"))))
        tensors.extend(module._parameters.values())
        tensors.extend(module._buffers.values())
        for child in module._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    own = model.__dict__
    denoiser = tuple(own.get(name) for name in ("schedule", "prediction", "preconditioning", "time_scale",
                                                "time_shift"))
    matmul, cuda = torch.backends.cuda.matmul, torch.backends.cuda
    context = (backends.forced_backend()[0], torch.is_inference_mode_enabled(), torch.get_float32_matmul_precision(),
               matmul.allow_tf32, torch.backends.cudnn.allow_tf32, matmul.allow_bf16_reduced_precision_reduction,
               matmul.allow_fp16_reduced_precision_reduction, torch.are_deterministic_algorithms_enabled(),
               cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
               cuda.cudnn_sdp_enabled())
    # (the model's state, the call's context): graphs of a state the model has left are dropped,
    # those of another context are kept (a caller may alternate contexts)
    return (tuple(modules), tuple([(t.data_ptr(), t.dtype) for t in tensors if t is not None]), denoiser), context


def capture_cuda_graph(fn: Callable[[], Any], generators: Sequence[torch.Generator] = (), pool=None
                       ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, outputs): fn() captured in a CUDA graph on the current device after two warm-up
    calls on a side stream (autotuning, lazy initialization, allocator pools); graph.replay()
    recomputes the outputs in place. ``generators``: CUDA generators fn draws from besides the
    default one; each replay draws from a generator's seed and offset at the time of replay.
    ``pool``: another graph's memory pool (``graph.pool()``) to share, for graphs that never run
    at the same time and whose outputs are consumed before another of them runs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs


MAX_SAMPLING_GRAPHS = 8  # per Denoiser: each holds a memory pool of its own
# one capture or replay at a time in the process: a graph's static inputs and outputs are shared by
# every caller (threads of a server sampling from one model handed each other their noise and
# results), and no other CUDA work may run while a graph is captured (a lock per model let one
# model's capture overlap another's replay); held only while the work is launched
_GRAPH_LOCK = threading.Lock()


def _replay(model: Denoiser, key: tuple, run: Callable, inputs: tuple):
    """Runs ``run(*inputs)`` through a CUDA graph captured on first use for this ``key`` (whose
    last item is :func:`graph_state`), on the inputs' device. The Denoiser keeps the graphs of its
    current state only, and of those the MAX_SAMPLING_GRAPHS last used (a sweep over guidance
    scales or step counts would otherwise keep a graph and its memory pool per value). Threads that
    sample on CUDA streams of their own must still order those streams (see _GRAPH_LOCK)."""
    with _GRAPH_LOCK, torch.cuda.device(inputs[0].device):
        graphs = model._graphs
        # the graphs held are all of one model state (a change drops them): one comparison
        if graphs and next(iter(graphs))[-1][0] != key[-1][0]:  # captured before the model changed
            graphs.clear()
        entry = graphs.pop(key, None)  # back in last, as the most recently used
        if entry is None:
            while len(graphs) >= MAX_SAMPLING_GRAPHS:
                del graphs[next(iter(graphs))]
            static = [t.clone() if t is not None else None for t in inputs]
            entry = (*capture_cuda_graph(lambda: run(*static)), static)
        graphs[key] = entry
        graph, (x, trajectory), static = entry
        for buffer, value in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return x.clone(), [t.clone() for t in trajectory] if trajectory is not None else None
