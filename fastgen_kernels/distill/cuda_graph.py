"""One training step (a method's ``training_step`` and the backward of its losses) replayed from a
CUDA graph: the step's hundreds of kernel launches, and the Python between them (forward-mode AD
and autograd included), cost one graph launch.

A step is captured per *phase* and micro-batch. The phase: the losses back-propagated, their
scale, ``Method.graph_key(iteration)`` (what of the iteration the step depends on: sCM's warm-up
factor, CM's curriculum stage, whose turn it is in DMD2 and LADD) and the networks' state
(``sampling.graph_state``: the modules, their tensors' addresses, the forced backend). The
micro-batch: its shapes and rows of the global batch. A step is captured the second time it is
seen and replayed from the third on; the first time, and for methods whose ``graph_key`` is None,
it runs eagerly. So warm-up iterations, each its own phase, never pay for a capture.

Replays are the eager step: the batch's data are copied into the graph's input buffers, and its
draws come from a generator the graph reads, reseeded with the batch's seed before each replay
(the graph-safe Philox state takes the seed and offset of the moment of replay), so a replay draws
what ``Batch(x0, cond, seed)`` draws eagerly. The gradients land in buffers the graph owns: a
parameter whose ``.grad`` is None gets the buffer itself (no copy); one that holds a gradient
(gradient accumulation) gets the buffer added.

Each micro-batch of an accumulated step has its own graph (its rows of the global batch's draws).
A phase's first captured graph writes the gradient buffers; the others add to them in place, so a
phase holds one set (the trained parameters' size, kept between steps where an eager step frees
its gradients). All graphs share one memory pool for the step's temporaries (about one eager
step's peak). The graphs of the last two phases are kept: a curriculum's past stages are dropped.

Limits: one process (DDP and FSDP synchronize gradients with hooks a graph cannot hold); the
parameters trained are those that required gradients when the ``GraphedStep`` was made; other
changes of behaviour than those the phase sees (``DiT.set_fused``, say) need a new one; what a
call returns is overwritten by the next call (the trainer consumes it at once).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from fastgen_kernels.distill.base import Batch, Method, forward_backward
from fastgen_kernels.sampling import capture_cuda_graph, graph_state


GRAPH_DEVICE_TYPE = "cuda"  # where graphs are captured
# Phases whose graphs and sightings are kept, the most recently used: a method alternating between
# two phases has both captured; a curriculum's past stages are dropped with their memory.
MAX_PHASES = 2


class GraphedStep:
    """``step(batch, iteration, names, scale)``: runs ``method.training_step(batch, iteration)``
    under autocast to ``autocast_dtype`` (None: off) and back-propagates ``scale`` times the sum of
    the losses ``names``, through a CUDA graph per phase and micro-batch (see the module
    docstring). Returns the step's outputs (losses and metrics, detached). The method's networks
    and the batches must be on one CUDA device."""

    def __init__(self, method: Method, autocast_dtype: torch.dtype | None = None) -> None:
        self.method, self.autocast_dtype = method, autocast_dtype
        self.params = [p for p in method.parameters() if p.requires_grad]
        device = next(method.parameters()).device
        if device.type != GRAPH_DEVICE_TYPE:
            raise ValueError(f"GraphedStep: the method's networks must be on a CUDA device, got {device}")
        # phase -> {micro-batch: its graph, or None when seen once}, least recently used first
        self.phases: dict[Hashable, dict[Hashable, _Captured | None]] = {}
        self.captures = 0

    @property
    def graphs(self) -> list[_Captured]:
        """The captured graphs held."""
        return [g for graphs in self.phases.values() for g in graphs.values() if g is not None]

    def __call__(self, batch: Batch, iteration: int, names: Sequence[str], scale: float = 1.0) -> dict[str, Tensor]:
        key = self.method.graph_key(iteration)
        if key is None:
            return self._run(batch, iteration, names, scale)
        # graph_state: the modules, their tensors' addresses and the forced backend (0.2-0.3 ms
        # for a DiT-XL student and teacher on the host)
        phase = (key, tuple(names), scale, graph_state(self.method))
        micro = (batch.x0.shape, batch.x0.dtype, batch.x0.device, batch.global_size, batch.offset,
                 None if batch.cond is None else (batch.cond.shape, batch.cond.dtype))
        graphs = self.phases.pop(phase, None)
        if graphs is None:
            graphs = {}
            while len(self.phases) >= MAX_PHASES:
                del self.phases[next(iter(self.phases))]
        self.phases[phase] = graphs  # the most recently used last
        if micro not in graphs:
            graphs[micro] = None
            return self._run(batch, iteration, names, scale)
        with torch.cuda.device(batch.x0.device):
            if graphs[micro] is None:
                # the phase's first graph writes the gradient buffers; its other micro-batches'
                # graphs add to them
                first = next((g for g in graphs.values() if g is not None and not g.accumulates), None)
                graphs[micro] = self._capture(batch, iteration, names, scale, first)
            replaying = graphs[micro]
            # what the replay may overwrite: the buffers it writes, and those of graphs captured after
            # it (in the shared pool they may lie where its temporaries were)
            at_risk = {id(g) for captured in self.graphs if captured.order >= replaying.order
                       and not (captured.accumulates and captured.grads is replaying.grads)
                       for g in captured.grads if g is not None}
            return replaying.replay(batch, self.params, at_risk)

    def _run(self, batch: Batch, iteration: int, names: Sequence[str], scale: float) -> dict[str, Tensor]:
        # autocast's weight cache off, as a captured step needs: eager and replayed steps cast alike
        return forward_backward(self.method, batch, iteration, names, scale, self.autocast_dtype, autocast_cache=False)

    def _capture(self, batch: Batch, iteration: int, names: Sequence[str], scale: float,
                 first: _Captured | None) -> _Captured:
        """A graph of the step on ``batch``: writing fresh gradient buffers, or with ``first`` (the
        phase's graph that does), adding to ``first``'s buffers, which the capture then holds as
        the parameters' gradients (autograd adds to an existing gradient in place)."""
        generator = torch.Generator(batch.x0.device)
        static = Batch(batch.x0.clone(), None if batch.cond is None else batch.cond.clone(), batch.seed,
                       batch.global_size, batch.offset, generator=generator)
        held = [p.grad for p in self.params]
        start = [None] * len(self.params) if first is None else first.grads
        # the warm-up calls add to first's buffers too: keep what they hold
        kept = [None if b is None else b.clone() for b in start]

        def step():
            for p, grad in zip(self.params, start):
                p.grad = grad
            out = self._run(static, iteration, names, scale)
            return out, [p.grad for p in self.params]

        # one memory pool for all graphs: they run one after the other, and each hands its
        # outputs over before the next runs
        pool = self.graphs[0].graph.pool() if self.graphs else None
        try:
            graph, (out, grads) = capture_cuda_graph(step, generators=(generator,), pool=pool)
        finally:
            for p, grad in zip(self.params, held):
                p.grad = grad
            for buffer, value in zip(start, kept):
                if buffer is not None:
                    buffer.copy_(value)
        if first is not None:
            if any(g is not b for g, b in zip(grads, first.grads)):
                raise RuntimeError("GraphedStep: the captured backward did not add to the first micro-batch's "
                                   "gradient buffers in place")
            grads = first.grads
        self.captures += 1
        return _Captured(graph, static, generator, out, grads, self.captures, accumulates=first is not None)


class _Captured:
    """A captured step: its graph, input batch, generator, output and gradient buffers, capture
    order, and whether it adds to its gradient buffers (a phase's later micro-batches) or writes
    them."""

    def __init__(self, graph, static: Batch, generator: torch.Generator, out: dict[str, Tensor],
                 grads: list[Tensor | None], order: int, accumulates: bool) -> None:
        self.graph, self.static, self.generator, self.out, self.grads = graph, static, generator, out, grads
        self.order, self.accumulates = order, accumulates

    def replay(self, batch: Batch, params: list[Tensor], at_risk: set[int]) -> dict[str, Tensor]:
        """Copies the batch in, replays, and hands the gradients over (``at_risk``: the ids of the
        gradient buffers this replay may overwrite)."""
        self.static.x0.copy_(batch.x0)
        if batch.cond is not None:
            self.static.cond.copy_(batch.cond)
        self.generator.manual_seed(batch.seed)
        for p in params:
            if p.grad is not None and id(p.grad) in at_risk:  # an earlier replay's gradient, still held
                p.grad = p.grad.clone()
        if self.accumulates:  # buffers that are not the gradient they will add to start from zero
            stale = [b for p, b in zip(params, self.grads) if b is not None and p.grad is not b]
            if stale:
                torch._foreach_zero_(stale)
        self.graph.replay()
        for p, buffer in zip(params, self.grads):
            if buffer is not None and p.grad is not buffer:
                if p.grad is None:
                    p.grad = buffer
                else:
                    p.grad += buffer
        return self.out
