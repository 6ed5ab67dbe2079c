"""Several processes: ``torchrun --nproc_per_node=N`` with DDP or FSDP2.

``init()`` joins the process group torchrun describes in the environment (nccl on GPUs, gloo on
CPUs), to be destroyed at the process's exit, and says which device this rank uses. Networks are
wrapped per trainable network of a method: DDP (``find_unused_parameters``, since a method may
leave part of a network out of a step, e.g. a flow map's r-embedding; buffers are constants and
are not broadcast), or FSDP2
(``fully_shard`` on every block of ``net.blocks``, then on the network). State goes through
``torch.distributed.checkpoint.state_dict``, which gives full (unsharded) tensors for plain, DDP and
FSDP2 modules alike, so checkpoints do not depend on the number of processes.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLEL = ("none", "ddp", "fsdp")


def launched() -> bool:
    """True under torchrun (its WORLD_SIZE and RANK are in the environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins torchrun's process group if launched
    and not yet joined. device: "cpu", "cuda", "cuda:<i>" (one process: that GPU; under torchrun
    each process takes its LOCAL_RANK's) or None (cuda when available)."""
    requested = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_type = requested.type
    if not launched():
        if device_type == "cuda":
            return 0, 1, torch.device("cuda", 0 if requested.index is None else requested.index)
        return 0, 1, requested
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        # destroyed at exit, before the interpreter tears down: a group left to its destructor then
        # can abort the process ("terminate called without an active exception": gloo's threads)
        atexit.register(_destroy_process_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device_type)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            # every rank at its exit before any tears its group down: one tearing down while its
            # peer still ran aborted the peer now and then (gloo's threads, SIGABRT: about one
            # 2-process test run in five). Bounded: a peer that died does not hold the exit long.
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            except RuntimeError:
                pass
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrapper(kind: str, device: torch.device):
    """The function that wraps one network for ``kind`` ("none", "ddp", "fsdp")."""
    if kind not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {kind!r}")
    if kind != "none" and world_size() == 1 and not dist.is_initialized():
        raise ValueError(f"parallel={kind!r} needs a process group: launch with torchrun")
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (position tables) are constants: no broadcast before each forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})

        def ddp(net: nn.Module) -> nn.Module:
            ids = [device.index] if device.type == "cuda" else None
            return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=True, **no_buffer_sync)
        return ddp
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))

        def fsdp(net: nn.Module) -> nn.Module:
            for block in getattr(net, "blocks", ()):
                fully_shard(block, mesh=mesh)
            return fully_shard(net, mesh=mesh)
        return fsdp
    return lambda net: net


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (FSDP2 shards in place: the module is the network)."""
    return getattr(net, "module", net)


@contextlib.contextmanager
def no_gradient_sync(nets: Sequence[nn.Module], skip: bool) -> Iterator[None]:
    """While ``skip``: accumulate gradients locally (micro-batches before the last)."""
    with contextlib.ExitStack() as stack:
        if skip:
            for net in nets:
                if hasattr(net, "no_sync"):                           # DDP
                    stack.enter_context(net.no_sync())
                elif hasattr(net, "set_requires_gradient_sync"):      # FSDP2
                    net.set_requires_gradient_sync(False)
                    stack.callback(net.set_requires_gradient_sync, True)
        yield


def model_state(net: nn.Module) -> dict[str, Tensor]:
    """The full state dict (unsharded, no wrapper prefixes); a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def parameter_keys(net: nn.Module) -> list[list[str]]:
    """For each of ``net.parameters()`` in order, the keys of :func:`model_state` that hold it: one
    per name it is registered under, without the wrappers' prefixes (DDP's ``module.``,
    torch.compile's ``_orig_mod.``), as get_model_state_dict names them."""
    from torch.distributed.checkpoint.state_dict import _get_fqns  # the mapping get_model_state_dict uses

    keys: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        keys.setdefault(id(p), []).extend(sorted(_get_fqns(net, name)))
    return [keys[id(p)] for p in net.parameters()]


def load_model_state(net: nn.Module, state: dict[str, Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state, keyed by parameter names; a collective under FSDP2. An optimizer
    that has not stepped yet keeps no state: torch fills it by a zero-gradient step (Adam's step
    count moves, and with it every later update: a checkpoint changed the run), undone here and
    left out of the saved state (loading restores it empty, as the run had it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    unstepped = not optimizer.state
    state = get_optimizer_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if unstepped:
        optimizer.state.clear()
        state["state"] = {}
    return state


def load_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never had a gradient (unused heads) have no optimizer state
    set_optimizer_state_dict(net, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))


def replicated(value: Tensor) -> Tensor:
    """A plain tensor of the value (an FSDP2 gradient norm is a DTensor: its full value)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def all_reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """The mean over processes of each scalar (one collective for all of them)."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(keys, stacked.tolist()))
