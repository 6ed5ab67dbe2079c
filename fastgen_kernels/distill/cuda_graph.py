"""One training step (a method's ``training_step`` and the backward of its losses) replayed from a
CUDA graph: the step's hundreds of kernel launches, and the Python between them (forward-mode AD
and autograd included), cost one graph launch.

A step is captured per *phase*: the batch's shapes and position in the global batch, the losses
back-propagated, their scale, and ``Method.graph_key(iteration)`` (what of the iteration the step
depends on: sCM's warm-up factor, CM's curriculum stage). A phase is captured the second time it
is seen and replayed from the third on; the first time, and for methods whose ``graph_key`` is
None, the step runs eagerly. So warm-up iterations, each its own phase, never pay for a capture.

Replays are the eager step: the batch's data are copied into the graph's input buffers, and its
draws come from a generator the graph reads, reseeded with the batch's seed before each replay
(the graph-safe Philox state takes the seed and offset of the moment of replay), so a replay draws
what ``Batch(x0, cond, seed)`` draws eagerly. The gradients land in buffers the graph owns: a
parameter whose ``.grad`` is None gets the buffer itself (no copy); one that holds a gradient
(gradient accumulation) gets the buffer added.

Each micro-batch of an accumulated step is its own phase (its rows of the global batch's draws);
all phases share one memory pool, which holds about one eager step's peak.

Limits: one process (DDP and FSDP synchronize gradients with hooks a graph cannot hold); the
networks' parameters must stay where they are (``.to()``, ``load_state_dict`` into new tensors or
a changed ``requires_grad`` need a new ``GraphedStep``); what a call returns is overwritten by the
next call (the trainer consumes it at once).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from fastgen_kernels.distill.base import Batch, Method, forward_backward
from fastgen_kernels.sampling import capture_cuda_graph


GRAPH_DEVICE_TYPE = "cuda"  # where graphs are captured


class GraphedStep:
    """``step(batch, iteration, names, scale)``: runs ``method.training_step(batch, iteration)``
    under autocast to ``autocast_dtype`` (None: off) and back-propagates ``scale`` times the sum of
    the losses ``names``, through a CUDA graph per phase (see the module docstring). Returns the
    step's outputs (losses and metrics, detached). The method's networks and the batches must be
    on one CUDA device."""

    def __init__(self, method: Method, autocast_dtype: torch.dtype | None = None) -> None:
        self.method, self.autocast_dtype = method, autocast_dtype
        self.params = [p for p in method.parameters() if p.requires_grad]
        device = next(method.parameters()).device
        if device.type != GRAPH_DEVICE_TYPE:
            raise ValueError(f"GraphedStep: the method's networks must be on a CUDA device, got {device}")
        self.seen: set[Hashable] = set()
        self.graphs: dict[Hashable, _Captured] = {}

    def __call__(self, batch: Batch, iteration: int, names: Sequence[str], scale: float = 1.0) -> dict[str, Tensor]:
        phase = self.method.graph_key(iteration)
        if phase is None:
            return self._run(batch, iteration, names, scale)
        key = (phase, tuple(names), scale, batch.x0.shape, batch.x0.dtype, batch.x0.device,
               None if batch.cond is None else (batch.cond.shape, batch.cond.dtype), batch.global_size, batch.offset)
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.seen:
                self.seen.add(key)
                return self._run(batch, iteration, names, scale)
            captured = self.graphs[key] = self._capture(batch, iteration, names, scale)
        return captured.replay(batch, self.params)

    def _run(self, batch: Batch, iteration: int, names: Sequence[str], scale: float) -> dict[str, Tensor]:
        # autocast's weight cache off, as a captured step needs: eager and replayed steps cast alike
        return forward_backward(self.method, batch, iteration, names, scale, self.autocast_dtype, autocast_cache=False)

    def _capture(self, batch: Batch, iteration: int, names: Sequence[str], scale: float) -> _Captured:
        generator = torch.Generator(batch.x0.device)
        static = Batch(batch.x0.clone(), None if batch.cond is None else batch.cond.clone(), batch.seed,
                       batch.global_size, batch.offset, generator=generator)
        held = [p.grad for p in self.params]

        def step():
            # every warm-up call and the capture start from no gradient: the captured backward
            # writes fresh buffers instead of adding to a gradient of the moment
            for p in self.params:
                p.grad = None
            out = self._run(static, iteration, names, scale)
            return out, [p.grad for p in self.params]

        # one memory pool for all phases: they run one after the other, and each hands its outputs
        # over before the next runs
        pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None
        graph, (out, grads) = capture_cuda_graph(step, generators=(generator,), pool=pool)
        for p, grad in zip(self.params, held):
            p.grad = grad
        return _Captured(graph, static, generator, out, grads)


class _Captured:
    """A captured step: its graph, input batch, generator and output buffers."""

    def __init__(self, graph, static: Batch, generator: torch.Generator, out: dict[str, Tensor],
                 grads: list[Tensor | None]) -> None:
        self.graph, self.static, self.generator, self.out, self.grads = graph, static, generator, out, grads

    def replay(self, batch: Batch, params: list[Tensor]) -> dict[str, Tensor]:
        self.static.x0.copy_(batch.x0)
        if batch.cond is not None:
            self.static.cond.copy_(batch.cond)
        self.generator.manual_seed(batch.seed)
        for p, buffer in zip(params, self.grads):
            if p.grad is buffer and buffer is not None:  # the last replay's gradient, still held
                p.grad = buffer.clone()
        self.graph.replay()
        for p, buffer in zip(params, self.grads):
            if buffer is not None:
                if p.grad is None:
                    p.grad = buffer
                else:
                    p.grad += buffer
        return self.out
