"""Tensors to safetensors files: safetensors refuses tensors that share memory (tied weights, a
module registered under two names, a state dict holding one EMA shadow under both names), and
takes only contiguous CPU tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

from safetensors.torch import save_file
from torch import Tensor


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` to the safetensors file ``path``: detached, on the CPU, contiguous; a
    tensor sharing memory with an earlier one is written from a copy (loading gives each name its
    own tensor, which load_state_dict copies into the tied parameter once per name)."""
    ready, storages = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in storages:
            t = t.clone()
        storages.add(storage)
        ready[name] = t
    save_file(ready, str(path), metadata=None if metadata is None else dict(metadata))
