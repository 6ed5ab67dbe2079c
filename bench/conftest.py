"""Benchmark helpers: devices, timing of the peer, input rotation and extra_info bookkeeping.

Each benchmark times one provider with pytest-benchmark and records in ``benchmark.extra_info``
the device, dtype, analytic bytes moved and GB/s (or flops and TFLOP/s), and the ratio to the
natural peer (the eager PyTorch composition, or SDPA for attention) timed in the same process: the
figure that counts. bench/summarize.py turns the JSON into a table with the fraction of the
measured ceiling (copy bandwidth, bf16 matmul rate).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastgen_kernels import _extension, backends

HAS_CUDA = torch.cuda.is_available()
# a file's torch.compile peer sees every shape, dtype and device it runs (with the CPU's first, a
# GPU's rows were past Dynamo's default of 8 graphs, and ran eager under the name "compile")
torch._dynamo.config.recompile_limit = 64
# FASTGEN_BENCH_DEVICES=cuda (comma-separated) restricts the benchmarks to those devices
DEVICES = os.environ.get("FASTGEN_BENCH_DEVICES", "cpu,cuda" if HAS_CUDA else "cpu").split(",")
GPU_ROUND_BUDGET_MS = 2000.0  # timed rounds of a slow GPU call (a 50-step teacher): about this long
L2_BYTES = 64 * 2**20  # rotate GPU inputs through more than the H100/H200's 50-60 MB L2
_peer_ms: dict = {}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, rounds: int, iterations: int = 1) -> float:
    """Median over rounds of the mean time of `iterations` calls of fn(), in ms, after warm-up
    (GPU: CUDA events around the batch)."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iterations)
        else:
            t0 = time.perf_counter()
            for _ in range(iterations):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iterations)
    return statistics.median(times)


def iterations_for(fn, device: str) -> int:
    """Calls per round: about 50 ms worth on the CPU, where the small shared machine's scheduler
    stalls threads for several ms at a time and single-call timings come out quantized."""
    if device == "cuda":
        return 1
    return max(1, round(50.0 / median_ms(fn, device, rounds=3)))


def rotating(make_inputs, device: str, bytes_per_set: int):
    """A callable returning the next of several input sets: one on the CPU, enough on a GPU that
    consecutive calls never find their inputs in L2."""
    count = 1 if device == "cpu" else max(2, -(-L2_BYTES // bytes_per_set) + 1)
    return itertools.cycle([make_inputs() for _ in range(count)]).__next__


def rounds_for(fn, device: str) -> int:
    """Timed rounds: 10 on the CPU (each about 50 ms of calls); 50 on a GPU, fewer (at least 5)
    for a call so slow that 50 would take over GPU_ROUND_BUDGET_MS, timed once after a warm call."""
    if device != "cuda":
        return 10
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once_ms = (time.perf_counter() - start) * 1e3
    return max(5, min(50, int(GPU_ROUND_BUDGET_MS / once_ms)))


def peer_ms(key, fn, device: str) -> float:
    """The peer's median time per call (per call of its graph for a :class:`Graphed` fn), timed
    once per configuration in this process."""
    if key not in _peer_ms:
        def timed():
            fn()
            sync(device)

        _peer_ms[key] = median_ms(timed, device, rounds_for(timed, device), iterations_for(timed, device)) / getattr(
            fn, "calls", 1)
    return _peer_ms[key]


class Graphed:
    """fn() called ``calls`` times in one CUDA graph, replayed by calling this: timing it measures
    the kernels alone, without the host's per-call cost (as ``sample`` runs a network). ``calls``
    is chosen so that a replay takes about a millisecond of kernels (at most 64 calls), by the
    replays of a one-call graph: timed call by call, a loss's host cost (0.2-0.4 ms against 10-25
    us of kernels) made it 1-5 calls, so the replay went over the same 1-5 of a rotation's input
    sets (in L2) and the replay's launch was 10-30% of its time. :func:`run` reports times per
    call. Captured on first use: a peer whose time this process already has is never captured
    (nor kept holding its inputs and memory pool)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._calls = self._replay = None

    def _capture(self) -> None:
        if self._replay is not None:
            return
        from fastgen_kernels.sampling import capture_cuda_graph

        one_call = capture_cuda_graph(self.fn)[0]
        kernels_ms = median_ms(one_call.replay, "cuda", rounds=3, iterations=5)
        del one_call  # and its memory pool
        self._calls = max(1, min(64, round(1.0 / kernels_ms)))

        def repeated():
            for _ in range(self._calls):
                self.fn()

        self._replay = capture_cuda_graph(repeated)[0].replay

    @property
    def calls(self) -> int:
        self._capture()
        return self._calls

    def __call__(self) -> None:
        self._capture()
        self._replay()


def run(benchmark, fn, device: str, *, peer_key, peer_fn, bytes_moved: int | None = None,
        flops: int | None = None, peer: str = "eager", **info) -> None:
    """Times fn with pytest-benchmark and fills extra_info: GB/s from the analytic bytes moved
    or TFLOP/s from the analytic flops, and the ratio to ``peer`` (its name; ``peer_fn`` runs it)
    timed in the same process. A :class:`Graphed` fn or peer_fn is timed per call of its graph."""
    def timed():
        fn()
        sync(device)

    if benchmark.disabled:  # --benchmark-disable: one call, which compiles (bench/gpu_check.sh)
        timed()
        return
    try:
        benchmark.pedantic(timed, rounds=rounds_for(timed, device), warmup_rounds=3,
                           iterations=iterations_for(timed, device))
    except KeyboardInterrupt:  # stopped at a time limit (bench/gpu_check.sh) before any round was timed:
        benchmark.has_error = True  # no statistics, which pytest-benchmark's JSON writer cannot take
        raise
    ours = benchmark.stats.stats.median * 1e3 / getattr(fn, "calls", 1)
    peer_time = peer_ms(peer_key, peer_fn, device)
    if bytes_moved is not None:
        info.update(bytes=bytes_moved, gbps=bytes_moved / ours / 1e6)
    if flops is not None:
        info.update(flops=flops, tflops=flops / ours / 1e9)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu", median_ms=ours,
        peer=peer, peer_ms=peer_time, speedup_vs_peer=peer_time / ours, **info)


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory held during fn() beyond what was allocated before it, in bytes.

    GPU: torch.cuda.max_memory_allocated above the memory allocated before fn. CPU: the torch
    profiler with profile_memory=True records every allocation and free of torch's CPU allocator
    with the allocator's running total ("Total Allocated" in its trace); the peak of that total
    less its value before the first event. (Summing the ops' self memory in the order the ops
    start, as this did before, books a free inside an op at the op's start, before the
    allocations of the ops it calls: eager's 20 MiB peak of a squared error's forward + backward
    at 64x4x64x64 read 8.) Inductor's CPU buffers go through the same allocator.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:  # the allocator's totals are in the trace only
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda args: args["Ev Idx"])  # the CPU allocator's, in the order they happened
    if not memory:
        return 0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # a free's Bytes are negative
    return max(0, max(args["Total Allocated"] for args in memory) - before)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# Every provider a benchmark is parametrized by; those that cannot run on a device skip.
ALL_PROVIDERS = ["eager", "compile", "cpu", "cuda", "triton"]


def pick_provider(provider: str, device: str, eager, compiled, fused) -> tuple:
    """(function, backend forced or None) of ``provider`` on ``device``: the eager composition,
    its torch.compile, or our op on one of its backends; skips the test when it does not run."""
    available = providers(device, eager, compiled, fused)
    if provider not in available:
        pytest.skip(f"{provider} does not run on {device} here")
    return available[provider]


def providers(device: str, eager, compiled, fused) -> dict:
    """name -> (function, backend forced or None) of the providers that run on ``device``."""
    out = {"eager": (eager, None), "compile": (compiled, None)}
    if device == "cpu" and _extension.cpu_built():
        out["cpu"] = (fused, "cpu")
    if device == "cuda":
        if _extension.cuda_built():
            out["cuda"] = (fused, "cuda")
        if backends.triton_installed():
            out["triton"] = (fused, "triton")
    return out
