"""The sCM step's memory traffic and matrix work, op by op, ours against the peer: a roofline
estimate of the GPU step (bench_distill.py's, DiT-XL/2 at batch 32, bf16 autocast) made on the CPU.

    python bench/step_traffic.py [--batch 32] [--rows 25]

Runs bench_distill's two steps (ours: the fused ops and the one-pass exact JVP; the peer: eager
PyTorch, SDPA and finite differences) on the CPU at DiT-XL/2's widths and the GPU's batch, under a
dispatch mode that records every op: the bytes it reads and writes (its tensor arguments and
results), and for matrix products and attention its FLOPs. Each of our ops counts as the one
kernel it is on a GPU: a call of an op's dispatcher (fastgen_kernels.backends.OpDispatcher) is one
op, whatever the CPU runs for it (the attention tangent's CPU code is a blocked composition; on a
GPU it is one Triton kernel reading and writing the same tensors). Views and allocations move
nothing and are not counted; nor are the ops whose autograd runs in C++ (``fastgen_C``: the sCM
loss, whose kernels the dispatch mode does not see; a few MB at these sizes), and an in-place
op counts its arguments only (the (B, D)-sized ``sub_`` and ``fill_`` here). The step runs at depth 1 and depth 2; their difference is a block's,
and the estimate is depth 1 plus 27 more blocks.

Per op the time is at least max(bytes / copy bandwidth, FLOPs / matmul rate) at the ceilings given
(the H200's measured ones by default: 3745 GB/s, 752 TFLOP/s bf16); the sum over ops is the
step's roofline, a lower bound of its kernel time. Against a GPU's measured kernel time
(bench/profile_gpu.py) it says how far each step is from its ceiling; ours against the peer's
says what speedup the traffic allows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily

sys.path.insert(0, str(Path(__file__).parent))  # the bench modules and their conftest

import bench_distill  # noqa: E402

from fastgen_kernels import backends  # noqa: E402
from fastgen_kernels.distill.base import Batch, forward_backward  # noqa: E402
from fastgen_kernels.models import DiTConfig  # noqa: E402
from fastgen_kernels.ops import _eager_op  # noqa: E402

H200_COPY_GBPS, H200_BF16_TFLOPS = 3745.0, 752.0
# ops that move no data (views, metadata, allocations)
FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "detach",
        "alias", "as_strided", "slice", "select", "split", "split_with_sizes", "unbind", "_reshape_alias",
        "reshape", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "is_same_size",
        "_has_same_storage_numel", "chunk", "unflatten", "flatten", "set_"}


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return tensor_bytes(list(value.values()))
    return 0


def matmul_flops(name: str, args: tuple) -> float:
    """2 M N K of a matrix product; attention's B H Lq Lk Dh times its flops per (query, key) pair
    and head dim (README: forward 4, backward 10, exact JVP 12, the tangent given O and its
    log-sum-exp 10); else 0."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "bmm", "addmm", "baddbmm", "linear", "matmul"):
        a, b = tensors[-2:] if name in ("addmm", "baddbmm") else tensors[:2]
        out_cols = b.shape[0] if name == "linear" else b.shape[-1]
        return 2.0 * a.numel() * out_cols
    if "attention" in name or "scaled_dot_product" in name:
        q, k = tensors[1:3] if "backward" in name else tensors[:2]  # a backward's first is grad_out
        if "scaled_dot_product" in name:  # SDPA's (B, H, L, Dh) layout
            B, H, Lq, Dh = q.shape
            Lk = k.shape[2]
        else:
            B, Lq, H, Dh = q.shape
            Lk = k.shape[1]
        # flops per (query, key) pair and head dim: QK^T and PV; the backward's five products; the
        # exact JVP's six (five for the tangent alone, which accumulates no O)
        per_pair = 12.0 if "jvp" in name else 10.0 if "tangent" in name or "backward" in name else 4.0
        return per_pair * B * H * Lq * Lk * Dh
    return 0.0


class Traffic(TorchDispatchMode):
    """Records (calls, bytes, FLOPs) per op and argument shapes; a dispatcher call is one op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0])
        self.depth = 0  # > 0 inside a dispatcher call: its inner ops are its kernel's

    def record(self, name: str, args: tuple, out) -> None:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:3]
        dtype = next((str(a.dtype)[6:] for a in args if isinstance(a, torch.Tensor)), "")
        row = self.ops[f"{name} {shapes} {dtype}"]
        row[0] += 1
        # an in-place op's result is its first argument
        row[1] += tensor_bytes(args) + (0 if name.endswith("_") else tensor_bytes(out))
        row[2] += matmul_flops(name.split("::")[-1].split(".")[-1], args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        ours = name.startswith("fastgen")  # a custom op: the dispatcher it calls is not another op
        self.depth += ours
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.depth -= ours
        if self.depth == 0 and name.split("::")[-1] not in FREE:
            self.record(name, tuple(args) + tuple((kwargs or {}).values()), out)
        return out


def counting(mode: Traffic):
    """Patches for the count: the dispatchers record their call as one op, and the fused ops take
    their eager kernels although a dispatch mode (the count's) is active."""
    call = backends.OpDispatcher.__call__

    def counted_call(self, *args):
        if mode.depth:
            return call(self, *args)
        mode.depth += 1
        try:
            out = call(self, *args)
        finally:
            mode.depth -= 1
        mode.record(self.name, args, out)
        return out

    plain_eager = _eager_op.plain_eager

    def plain_eager_under_the_count(args):
        if torch._C._len_torch_dispatch_stack() == 0:  # inside the mode's handler it is off already
            return plain_eager(args)
        with _pop_mode_temporarily():  # the count's mode is not one the fused ops must respect
            return plain_eager(args)

    class Patched:
        def __enter__(self):
            backends.OpDispatcher.__call__ = counted_call
            _eager_op.plain_eager = plain_eager_under_the_count

        def __exit__(self, *exc):
            backends.OpDispatcher.__call__ = call
            _eager_op.plain_eager = plain_eager

    return Patched()


def count_step(provider: str, depth: int, batch: int) -> dict[str, list[float]]:
    """The ops of one step of ``provider`` on a DiT-XL/2 of ``depth`` blocks."""
    config = dataclasses.replace(DiTConfig.preset("XL/2", input_size=32, num_classes=1000), depth=depth)
    bench_distill.CONFIGS["cpu"] = (config, batch)
    bench_distill._methods.clear()
    fused, jvp, _ = bench_distill.PROVIDERS[provider]
    scm = bench_distill.method("cpu", fused, jvp)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    cond = torch.arange(batch) % config.num_classes

    def step():
        forward_backward(scm, Batch(x0, cond, seed=0), 1, ("student",), autocast_dtype=torch.bfloat16)
        for p in scm.student.parameters():
            p.grad = None

    step()  # lazy initialization outside the count
    mode = Traffic()
    with counting(mode), mode:
        step()
    return dict(mode.ops)


def roofline_ms(row: list[float], gbps: float, tflops: float) -> float:
    return max(row[1] / (gbps * 1e6), row[2] / (tflops * 1e9))


def full_depth(one: dict, two: dict, depth: int) -> dict[str, list[float]]:
    """depth 1 plus (depth - 1) times the block's ops (depth 2 less depth 1), per op row."""
    rows = {}
    for key in one.keys() | two.keys():
        a, b = one.get(key, [0, 0, 0.0]), two.get(key, [0, 0, 0.0])
        rows[key] = [x + (depth - 1) * (y - x) for x, y in zip(a, b)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=28, help="the estimate's depth (DiT-XL: 28)")
    parser.add_argument("--gbps", type=float, default=H200_COPY_GBPS, help="copy bandwidth, GB/s")
    parser.add_argument("--tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 matmul rate, TFLOP/s")
    parser.add_argument("--rows", type=int, default=25, help="costliest ops listed per step")
    args = parser.parse_args()
    totals = {}
    for provider in ("fused_exact_jvp", "eager_finite_difference"):
        rows = full_depth(count_step(provider, 1, args.batch), count_step(provider, 2, args.batch), args.depth)
        times = {key: roofline_ms(row, args.gbps, args.tflops) for key, row in rows.items()}
        total_ms = sum(times.values())
        gb = sum(row[1] for row in rows.values()) / 1e9
        tflop = sum(row[2] for row in rows.values()) / 1e12
        memory_ms = sum(t for key, t in times.items() if rows[key][2] == 0)
        totals[provider] = total_ms
        print(f"{provider}: roofline {total_ms:.1f} ms ({memory_ms:.1f} ms of it in ops without matrix products), "
              f"{gb:.1f} GB moved, {tflop:.1f} TFLOP, {sum(r[0] for r in rows.values()):.0f} ops "
              f"(DiT-XL/2, depth {args.depth}, batch {args.batch})")
        print(f"{'ms':>8} {'GB':>8} {'TFLOP':>7} {'calls':>6}  op [first shapes] dtype")
        for key in sorted(times, key=times.get, reverse=True)[:args.rows]:
            calls, moved, flops = rows[key]
            print(f"{times[key]:8.2f} {moved / 1e9:8.2f} {flops / 1e12:7.2f} {calls:6.0f}  {key}")
        print()
    print(f"roofline ratio, peer / ours: {totals['eager_finite_difference'] / totals['fused_exact_jvp']:.2f}x")


if __name__ == "__main__":
    main()
