"""Training checkpoints: one safetensors file each, written atomically.

A checkpoint holds named groups of tensors (``{"model": ..., "ema": ..., "optimizer": ...}``) and a
JSON-serializable ``metadata`` dict (iteration, config, ...). In the file, tensor ``name`` of group
``group`` is stored under the key ``"group/name"`` (group names hold no "/", tensor names may), and
the header's string metadata holds ``"fastgen.metadata"`` (the metadata as JSON) and
``"fastgen.groups"`` (JSON ``{group: [names]}``: groups come back in their order, empty ones too).

Atomic write: the file is written under a temporary name in the target directory, fsync'd, then
``os.replace``'d onto the final name, which is atomic within a file system; a crash leaves the
previous file or the new one under the final name, never a truncated one (at worst a stray hidden
``.checkpoint-*.tmp`` file, which the functions here ignore).

Optimizer state dicts and RNG states are Python structures around tensors: ``optimizer_to_tensors``
and ``rng_state`` split them into flat tensors (a group) and JSON-serializable meta (for metadata):

    tensors, meta = optimizer_to_tensors(optimizer.state_dict())
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": tensors},
                    {"iteration": it, "optimizer": meta})
    groups, metadata = load_checkpoint(path)
    optimizer.load_state_dict(optimizer_from_tensors(groups["optimizer"], metadata["optimizer"]))

Everything is per process: under torch.distributed each rank saves its own shards and RNG state
(or the caller gathers them first).
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from fastgen_kernels.serialization import save_tensors

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # builds without torch.distributed have no DTensors: isinstance(t, ()) is always False
    DTensor = ()

__all__ = [
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_METADATA_KEY = "fastgen.metadata"
_GROUPS_KEY = "fastgen.groups"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{8,})\.safetensors")


# --- files --------------------------------------------------------------------------------------

def _flatten_groups(groups: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """{"group/name": tensor}, checked."""
    if not isinstance(groups, Mapping):
        raise TypeError(f"save_checkpoint: groups must be a dict of dicts of tensors, "
                        f"got {type(groups).__name__}")
    flat = {}
    for group, named in groups.items():
        if not isinstance(group, str) or not group or "/" in group:
            raise ValueError(f"save_checkpoint: group names must be non-empty strings without '/', "
                             f"got {group!r}")
        if not isinstance(named, Mapping):
            raise TypeError(f"save_checkpoint: groups[{group!r}] must be a dict of tensors, "
                            f"got {type(named).__name__}")
        for name, t in named.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"save_checkpoint: tensor names in groups[{group!r}] must be "
                                 f"non-empty strings, got {name!r}")
            if not isinstance(t, Tensor):
                raise TypeError(f"save_checkpoint: groups[{group!r}][{name!r}] must be a tensor, "
                                f"got {type(t).__name__}")
            if isinstance(t, DTensor):
                raise TypeError(f"save_checkpoint: groups[{group!r}][{name!r}] is a DTensor: save "
                                f"this rank's shard (.to_local()) or the gathered .full_tensor()")
            flat[f"{group}/{name}"] = t
    return flat


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (POSIX; Windows cannot open directories)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | os.PathLike, groups: Mapping[str, Mapping[str, Tensor]],
                    metadata: Mapping[str, Any]) -> None:
    """Write ``groups`` ({group: {name: tensor}}) and ``metadata`` to ``path``, atomically.

    Tensors are detached and copied to the CPU; metadata goes through JSON (tuples come back as
    lists, non-string keys as strings). Missing parent directories are created.
    """
    path = Path(path)
    tensors = _flatten_groups(groups)
    if not isinstance(metadata, Mapping):
        raise TypeError(f"save_checkpoint: metadata must be a dict, got {type(metadata).__name__}")
    try:
        header = {_METADATA_KEY: json.dumps(dict(metadata))}
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: metadata must be JSON-serializable: {e}") from e
    header[_GROUPS_KEY] = json.dumps({group: list(named) for group, named in groups.items()})

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        # safetensors streams the tensors to the file (no second copy in memory) and closes it;
        # reopening it for fsync gets its data onto the disk before the rename publishes it
        save_tensors(tensors, temporary, metadata=header)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """(groups, metadata) as given to :func:`save_checkpoint`, tensors on ``device``."""
    device = torch.device(device)  # safetensors names the CPU "cpu", never "cpu:0"
    with safe_open(os.fspath(path), framework="pt", device="cpu" if device.type == "cpu" else str(device)) as f:
        header = f.metadata() or {}
        if _METADATA_KEY not in header or _GROUPS_KEY not in header:
            raise ValueError(f"load_checkpoint: {path} was not written by save_checkpoint "
                             f"(its header has no {_METADATA_KEY!r} and {_GROUPS_KEY!r})")
        groups = {group: {name: f.get_tensor(f"{group}/{name}") for name in names}
                  for group, names in json.loads(header[_GROUPS_KEY]).items()}
    return groups, json.loads(header[_METADATA_KEY])


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> Path:
    """``directory/checkpoint-{iteration:08d}.safetensors``."""
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise TypeError(f"checkpoint_path: iteration must be an int, "
                        f"got {type(iteration).__name__}")
    if iteration < 0:
        raise ValueError(f"checkpoint_path: iteration must be >= 0, got {iteration}")
    return Path(directory) / f"checkpoint-{iteration:08d}.safetensors"


def _checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``directory`` (none if it does not exist), oldest iteration first."""
    directory = Path(directory)
    if not directory.exists():
        return []
    found = []
    for p in directory.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(p.name)
        if match and p.is_file():
            found.append((int(match[1]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest iteration in ``directory``; None if there is none."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` >= 1 newest checkpoints in ``directory``; return the deleted."""
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"prune_checkpoints: keep must be an int, got {type(keep).__name__}")
    if keep < 1:  # 0 would delete the checkpoint a trainer has just written
        raise ValueError(f"prune_checkpoints: keep must be >= 1, got {keep}")
    return _delete(_checkpoints(directory)[:-keep])


def delete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Delete every checkpoint in ``directory``; return the deleted."""
    return _delete(_checkpoints(directory))


def _delete(paths: list[Path]) -> list[Path]:
    for p in paths:
        p.unlink()
    return paths


def _check_keys(function: str, name: str, value: object, keys: set[str], why: str = "") -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{function}: {name} must be a dict, got {type(value).__name__}")
    if set(value) != keys:
        raise ValueError(f"{function}: {name} must have the keys {sorted(keys)}{why}, "
                         f"got {sorted(value, key=str)}")


# --- optimizer state ----------------------------------------------------------------------------
# Encoding of a nested structure as JSON around a flat {key: tensor} dict. Every JSON object in the
# encoding is a one-key tag, so no value can be mistaken for one:
#   tensor -> {"tensor": key}, key the tensor's path ("state.0.exp_avg")
#   tuple  -> {"tuple": [items]}
#   dict   -> {"dict": [[key, value], ...]}  (keys are scalars: optimizer state is keyed by ints)
#   list -> list; None, bool, int, float, str -> themselves (JSON keeps floats exact)

_SCALARS = (bool, int, float, str, type(None))

def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        if path in tensors:
            raise ValueError(f"optimizer_to_tensors: two tensors at the path {path!r}")
        tensors[path] = value
        return {"tensor": path}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, _SCALARS):
                raise TypeError(f"optimizer_to_tensors: {path} has a key of type "
                                f"{type(k).__name__}; only None, bool, int, float and str keys "
                                f"can be stored")
        return {"dict": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"optimizer_to_tensors: {path} has type {type(value).__name__}; only tensors, "
                    f"None, bool, int, float, str, lists, tuples and dicts can be stored")


def _decode(value: Any, tensors: Mapping[str, Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in ("tensor", "tuple", "dict"):
        raise ValueError(f"optimizer_from_tensors: meta holds {value!r}, which is not "
                         f"one of the tags 'tensor', 'tuple', 'dict'")
    (tag, content), = value.items()
    if tag == "tensor":
        if content not in tensors:
            raise ValueError(f"optimizer_from_tensors: meta refers to the tensor {content!r}, "
                             f"which is missing from tensors")
        used.add(content)
        return tensors[content]
    if tag == "tuple":
        return tuple(_decode(v, tensors, used) for v in content)
    return {k: _decode(v, tensors, used) for k, v in content}


def optimizer_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into ({path: tensor}, JSON-serializable meta).

    Every tensor (per-parameter state, 0-dim ``step`` counters, tensor hyperparameters) goes into
    the first dict, keyed by its path in the state dict (``"state.0.exp_avg"``); meta keeps the
    structure and every other value (param_groups' hyperparameters, ints, None, ...).
    """
    _check_keys("optimizer_to_tensors", "state_dict", state_dict, {"state", "param_groups"})
    tensors: dict[str, Tensor] = {}
    meta = {key: _encode(state_dict[key], key, tensors) for key in ("state", "param_groups")}
    return tensors, meta


def optimizer_from_tensors(tensors: Mapping[str, Tensor],
                           meta: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer state dict that :func:`optimizer_to_tensors` split into (tensors, meta)."""
    _check_keys("optimizer_from_tensors", "meta", meta, {"state", "param_groups"})
    used: set[str] = set()
    state_dict = {key: _decode(meta[key], tensors, used) for key in ("state", "param_groups")}
    if unused := sorted(set(tensors) - used):
        raise ValueError(f"optimizer_from_tensors: tensors has entries that meta does not refer to "
                         f"(from another optimizer?): {unused}")
    return state_dict


# --- random number generators -------------------------------------------------------------------

def rng_state() -> tuple[dict[str, Tensor], dict]:
    """The state of every global RNG of this process, as ({name: tensor}, JSON-serializable meta).

    tensors: uint8 states "torch" (the CPU generator) and "cuda.{i}" for each visible CUDA device;
    meta: "python" (``random``) and "numpy" (``np.random``'s legacy global generator).
    """
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    meta = {"python": [version, list(internal), gauss_next],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian]}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`: the CPU's, Python's, NumPy's, and
    each CUDA device's that this process also sees. A run resumed on another number of GPUs (or
    on the CPU) restores what it can, with a warning: the trainer's draws come from each batch's
    own generator, so only code drawing from the global generators would notice.
    """
    if not isinstance(tensors, Mapping) or "torch" not in tensors or any(
            key != "torch" and not re.fullmatch(r"cuda\.\d+", key) for key in tensors):
        raise ValueError(f"set_rng_state: tensors must have the key 'torch' and 'cuda.<i>' ones, got "
                         f"{sorted(tensors, key=str) if isinstance(tensors, Mapping) else type(tensors).__name__}")
    _check_keys("set_rng_state", "meta", meta, {"python", "numpy"})
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    saved = {int(key.split(".")[1]) for key in tensors if key != "torch"}
    if saved != set(range(devices)):
        warnings.warn(f"set_rng_state: RNG states of CUDA devices {sorted(saved)} saved, this process sees "
                      f"{devices}: those of devices {sorted(saved & set(range(devices)))} restored", stacklevel=2)
    torch.set_rng_state(tensors["torch"].cpu())
    for i in sorted(saved & set(range(devices))):
        torch.cuda.set_rng_state(tensors[f"cuda.{i}"].cpu(), i)
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
