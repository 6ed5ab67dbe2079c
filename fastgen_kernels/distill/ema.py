"""Exponential moving averages of a set of parameters at several decay rates, in one pass.

With decays beta (K,) and the parameters flattened into theta (P,), the shadows S (K, P) follow

    S_k <- beta_k S_k + (1 - beta_k) theta  =  lerp(S_k, theta, w_k),   w_k = 1 - beta_k,

which :meth:`EMA.update` does as one broadcast ``lerp_`` of S (K, P) toward theta (1, P) with the
weights w (K, 1). theta is gathered once into an fp32 vector, so every parameter is read once per
update whatever K is. At w_k = 1 (beta_k = 0) lerp returns theta exactly: the shadow is a copy.

The shadows are fp32 whatever the parameters' dtype: a bf16 shadow would drop every increment
w_k |theta - S_k| below half a bf16 ulp of S_k (at least 2^-9 |S_k|): at beta = 0.9999, nearly all.

FSDP2 (torch.distributed) parameters are DTensors; the EMA then tracks this rank's local shards
(``p.to_local()``), so P is the rank's shard size, updates need no communication, and each rank
saves and loads its own :meth:`EMA.state_dict`; :meth:`EMA.full_shadow` and
:meth:`EMA.load_full_shadow` give and take whole fp32 tensors instead (checkpoints that do not
depend on the number of processes).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # builds without torch.distributed have no DTensors: isinstance(p, ()) is always False
    DTensor = ()

__all__ = ["EMA"]


def _local(p: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 parameter (a view: writes reach the parameter), else p."""
    return p.to_local() if isinstance(p, DTensor) else p


class EMA:
    """fp32 moving averages ("shadows") of ``params`` at each of ``decays``.

    params: an ``nn.Module`` (its parameters) or an iterable of floating-point tensors, all on one
    device; the EMA keeps references to them, so create it after moving the model to its device.
    decays: K >= 1 rates in [0, 1). Every shadow starts as a copy of the current parameters.
    """

    def __init__(self, params: Iterable[Tensor] | nn.Module, decays: Sequence[float]) -> None:
        self._params = list(params.parameters() if isinstance(params, nn.Module) else params)
        if not self._params:
            raise ValueError("EMA: params is empty")
        for i, p in enumerate(self._params):
            if not isinstance(p, Tensor):
                raise TypeError(f"EMA: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"EMA: params[{i}] must be floating point, got {p.dtype}")
        local = self._local_params()
        devices = sorted({str(p.device) for p in local})
        if len(devices) > 1:
            raise ValueError(f"EMA: params must all be on one device, got {devices}")

        if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence):
            raise TypeError(f"EMA: decays must be a sequence of floats, "
                            f"got {type(decays).__name__}")
        if not decays:
            raise ValueError("EMA: decays must hold at least one decay rate")
        for i, d in enumerate(decays):
            if isinstance(d, bool) or not isinstance(d, numbers.Real):
                raise TypeError(f"EMA: decays[{i}] must be a float, got {type(d).__name__}")
            if not 0 <= d < 1:
                raise ValueError(f"EMA: decays[{i}] must be in [0, 1), got {d}")
        self._decays = tuple(float(d) for d in decays)

        self._shapes = [p.shape for p in local]
        self._numels = [p.numel() for p in local]
        # 1 - beta rounded once from fp64, so that beta = 0 gives the weight 1.0 exactly
        self._weights = torch.tensor([1 - d for d in self._decays], dtype=torch.float32,
                                     device=local[0].device).unsqueeze(1)
        self._shadow = self._flat_params().repeat(len(self._decays), 1)

    @property
    def decays(self) -> tuple[float, ...]:
        """The K decay rates, in the order of the shadows' indices."""
        return self._decays

    def _local_params(self) -> list[Tensor]:
        # fetched on every use, not cached: FSDP2 may replace a DTensor's local tensor
        # (FSDPParam.reset_sharded_param, after Module._apply or load_state_dict)
        return [_local(p) for p in self._params]

    def _flat_params(self) -> Tensor:
        """theta (P,) fp32: each parameter read once, cast while copied into one vector."""
        theta = torch.empty(sum(self._numels), dtype=torch.float32, device=self._weights.device)
        return torch.cat([p.detach().reshape(-1) for p in self._local_params()], out=theta)

    @torch.no_grad()
    def update(self) -> None:
        """S_k <- lerp(S_k, theta, 1 - beta_k) for all k at once; call after each optimizer step."""
        self._shadow.lerp_(self._flat_params(), self._weights)

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"EMA: index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self._decays):
            raise ValueError(f"EMA: index must be in [0, {len(self._decays)}) "
                             f"for decays {self._decays}, got {index}")

    def shadow(self, index: int) -> list[Tensor]:
        """Shadow ``index`` as fp32 tensors shaped like the (local) parameters.

        These are views into the EMA's buffer, not copies: clone them before modifying.
        """
        self._check_index(index)
        rows = self._shadow[index].split(self._numels)
        return [row.view(shape) for row, shape in zip(rows, self._shapes)]

    @torch.no_grad()
    def full_shadow(self, index: int) -> Iterator[Tensor]:
        """Shadow ``index`` parameter by parameter as fp32 tensors shaped like the whole
        parameters: under FSDP2 each gathered from every rank's shard (a collective: every rank
        iterates to the end), else a copy. One at a time, so a caller that moves each off the
        device holds one parameter's worth there."""
        for p, s in zip(self._params, self.shadow(index)):
            if isinstance(p, DTensor):
                yield DTensor.from_local(s, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                         stride=p.stride()).full_tensor()
            else:
                yield s.clone()

    @torch.no_grad()
    def load_full_shadow(self, index: int, tensors: Sequence[Tensor]) -> None:
        """Set shadow ``index`` from whole-parameter tensors (as :meth:`full_shadow` gives them, in
        the parameters' order; any floating dtype and device); under FSDP2 this rank keeps its
        shard of each (a collective)."""
        self._check_index(index)
        if len(tensors) != len(self._params):
            raise ValueError(f"EMA: load_full_shadow got {len(tensors)} tensors for {len(self._params)} parameters")
        for i, (p, t) in enumerate(zip(self._params, tensors)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != p.shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"EMA: load_full_shadow: tensors[{i}] must be a floating tensor of the "
                                 f"parameter's shape {tuple(p.shape)}, got {got}")
        for p, s, t in zip(self._params, self.shadow(index), tensors):
            t = t.to(s.device, torch.float32)
            s.copy_(distribute_tensor(t, p.device_mesh, p.placements).to_local() if isinstance(p, DTensor) else t)

    @torch.no_grad()
    def copy_to(self, index: int) -> None:
        """Overwrite the parameters with shadow ``index``, cast to each parameter's dtype."""
        for p, s in zip(self._local_params(), self.shadow(index)):
            p.copy_(s)

    @torch.no_grad()
    def copy_from(self, index: int) -> None:
        """Overwrite shadow ``index`` with the current parameters (e.g. restart an average from
        them; under FSDP2 each rank copies its own shard)."""
        self._check_index(index)
        self._shadow[index].copy_(self._flat_params())

    @contextlib.contextmanager
    def applied(self, index: int) -> Iterator[None]:
        """Inside the block the parameters hold shadow ``index`` (e.g. for evaluation); on exit,
        also through an exception, they get their training values back, bit for bit.

        Holds a copy of the (local) parameters, in their own dtype and device, while it is open.
        """
        self._check_index(index)
        params = self._local_params()
        training = [p.detach().clone() for p in params]
        try:
            self.copy_to(index)
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, training):
                    p.copy_(t)

    def state_dict(self) -> dict[str, Tensor]:
        """{"shadow": S (K, P) fp32, "decays": beta (K,) fp64}.

        As with ``nn.Module.state_dict``, "shadow" is the live buffer, not a copy.
        """
        return {"shadow": self._shadow, "decays": torch.tensor(self._decays, dtype=torch.float64)}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the shadows saved by :meth:`state_dict` of an EMA of the same parameters (this
        rank's shards under FSDP2) and decays."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"EMA: state_dict must be a mapping, got {type(state_dict).__name__}")
        if set(state_dict) != {"shadow", "decays"}:
            raise ValueError(f"EMA: state_dict must have exactly the keys 'shadow' and 'decays', "
                             f"got {sorted(state_dict)}")
        shadow, decays = state_dict["shadow"], state_dict["decays"]
        for name, t in (("shadow", shadow), ("decays", decays)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"EMA: state_dict['{name}'] must be a floating-point tensor, "
                                f"got {t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        k, p = self._shadow.shape
        if decays.shape != (k,):
            raise ValueError(f"EMA: state_dict['decays'] has shape {tuple(decays.shape)}, "
                             f"this EMA has {k} decays {self._decays}")
        if tuple(decays.tolist()) != self._decays:
            raise ValueError(f"EMA: state_dict['decays'] {tuple(decays.tolist())} differ from "
                             f"this EMA's decays {self._decays}")
        if shadow.shape != (k, p):
            raise ValueError(
                f"EMA: state_dict['shadow'] has shape {tuple(shadow.shape)}, this EMA needs "
                f"({k}, {p}): {k} decays x {p} parameter elements (a different model, or another "
                f"rank's FSDP shard?)")
        with torch.no_grad():
            self._shadow.copy_(shadow)
