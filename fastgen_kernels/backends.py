"""Backend registry: which implementation runs an op.

Every op has up to four implementations, tried in this priority order:

=========  ===============================================  =============================
backend    runs on                                          needs
=========  ===============================================  =============================
cuda       CUDA tensors                                     extension built with CUDA
triton     CUDA tensors (CPU tensors under the interpreter  the ``triton`` package
           ``TRITON_INTERPRET=1``, only when requested)
cpu        CPU tensors                                      extension built (C++ kernels)
reference  any device                                       nothing (PyTorch; fp32/fp64)
=========  ===============================================  =============================

Automatic choice takes the first backend that is available, runs on the tensors' device and
supports the arguments (dtype, sizes); skipping a backend that targets the device is logged once
per op and reason. ``use_backend(name)`` (a context manager) or the environment variable
``FASTGEN_BACKEND`` force one backend for every op; a forced backend that cannot run raises
``RuntimeError`` with the reason instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fastgen_kernels import _extension

log = logging.getLogger("fastgen_kernels")

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "FASTGEN_BACKEND"

# what use_backend set: a backend's name, AUTO (automatic choice, FASTGEN_BACKEND ignored) or None
# (nothing set: FASTGEN_BACKEND decides)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgen_backend", default=None)
AUTO = "auto"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS} or {AUTO!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (one of ``BACKENDS``) for every op inside the block; ``None`` or ``"auto"``
    restores automatic choice. Takes precedence over ``FASTGEN_BACKEND``. A context variable: new
    threads (``threading.Thread``, executors) start without it; ``asyncio`` tasks inherit it."""
    token = _forced.set(AUTO if name in (None, AUTO) else _check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def record_forced_backend(ctx: Any) -> None:
    """Keeps on an autograd context the backend ``use_backend`` forces now, for its backward."""
    ctx.forced_backend = _forced.get()


def under_forced_backend(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``backward(ctx, *grads)`` run under the backend ``use_backend`` forced at its forward
    (:func:`record_forced_backend`). Autograd runs the backward of CUDA tensors on a thread of its
    own, which does not see this thread's context variables: without this a forced backend would
    hold for the forward alone. A forward that forced none leaves the backward's choice as it is."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        forced = getattr(ctx, "forced_backend", None)
        if forced is None:
            return backward(ctx, *grads)
        token = _forced.set(forced)
        try:
            return backward(ctx, *grads)
        finally:
            _forced.reset(token)
    return run


def carry_forced_backend(setup_context: Callable[..., None], backward: Callable[..., Any]
                         ) -> tuple[Callable[..., None], Callable[..., Any]]:
    """An autograd rule's (setup_context, backward) with the forward's forced backend carried into
    the backward (:func:`under_forced_backend`)."""
    def setup(ctx, inputs, output):
        record_forced_backend(ctx)
        setup_context(ctx, inputs, output)
    return setup, under_forced_backend(backward)


def forced_backend() -> tuple[str | None, str]:
    """The backend forced right now and by what, or ``(None, "")``."""
    name = _forced.get()
    if name == AUTO:
        return None, ""
    if name is not None:
        return name, "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != AUTO:
        return _check_name(env, ENV_VAR), ENV_VAR
    return None, ""


def interpreting_triton() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run at all in this process, or None."""
    if name == "cuda" and not _extension.cuda_built():
        return _extension.unavailable_reason() or "extension built without CUDA kernels"
    if name == "cpu" and not _extension.cpu_built():
        return _extension.unavailable_reason()
    if name == "triton" and not triton_installed():
        return "the triton package is not installed"
    return None


def _wrong_device(name: str, device: torch.device, automatic: bool) -> str | None:
    """Why backend ``name`` does not run on ``device``, or None."""
    if name == "reference":
        return None
    if name == "cpu":
        return None if device.type == "cpu" else f"runs on CPU tensors, got {device.type}"
    if name == "cuda":
        return None if device.type == "cuda" else f"runs on CUDA tensors, got {device.type}"
    # triton
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting_triton():
        # The interpreter is a testing tool, orders of magnitude slower than the C++ kernels.
        return "the Triton interpreter runs only when requested" if automatic else None
    return f"runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device.type}"


SupportsFn = Callable[..., "str | None"]


class OpDispatcher:
    """Picks and runs one implementation of op ``name``.

    ``impls`` maps backend name -> callable taking the op's arguments. ``supports`` maps backend
    name -> callable taking the same arguments and returning None when it can run them, else the
    reason (e.g. "fp64 input"). ``device_of`` returns the device the op runs on.
    """

    def __init__(
        self,
        name: str,
        impls: Mapping[str, Callable[..., Any]],
        supports: Mapping[str, SupportsFn] | None = None,
        device_of: Callable[..., torch.device] = lambda x, *args: x.device,
    ) -> None:
        unknown = set(impls) - set(BACKENDS)
        if unknown or "reference" not in impls:
            raise ValueError(f"{name}: impls must include 'reference', unknown: {sorted(unknown)}")
        self.name = name
        self.impls = dict(impls)
        self.supports = dict(supports or {})
        self.device_of = device_of
        self._logged: set[tuple[str, str]] = set()
        self._candidates: dict[str, tuple[tuple[str, str | None], ...]] = {}

    def reason(self, backend: str, args: tuple, automatic: bool) -> tuple[str | None, bool]:
        """(why ``backend`` cannot run ``args`` or None, whether that is by design: another
        device, or no implementation at all; automatic choice logs only the other skips)."""
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation", True
        why = _wrong_device(backend, self.device_of(*args), automatic)
        if why:
            return why, True
        why = _unavailable(backend)
        if why:
            return why, False
        check = self.supports.get(backend)
        return (check(*args) if check else None), False

    def _automatic_candidates(self, device_type: str) -> tuple[tuple[str, str | None], ...]:
        """(backend, why it cannot run in this process or None) of every backend automatic choice
        may take on ``device_type``, in priority order: what depends only on the process (the
        extension's build, the triton package) and the device, worked out once per device type."""
        candidates = self._candidates.get(device_type)
        if candidates is None:
            device = torch.device(device_type)
            candidates = tuple((name, _unavailable(name)) for name in BACKENDS
                               if name in self.impls and _wrong_device(name, device, automatic=True) is None)
            self._candidates[device_type] = candidates
        return candidates

    def select(self, *args: Any) -> str:
        forced, source = forced_backend()
        if forced is not None:
            why, _ = self.reason(forced, args, automatic=False)
            if why:
                raise RuntimeError(
                    f"{self.name}: backend {forced!r} was requested via {source} but cannot run "
                    f"these arguments: {why}"
                )
            return forced
        skipped: dict[str, list[str]] = {}  # reason -> backends skipped for it
        for backend, unavailable in self._automatic_candidates(self.device_of(*args).type):
            check = self.supports.get(backend)
            why = unavailable or (check(*args) if check else None)
            if why is None:
                if skipped:
                    self._log_fallback(backend, skipped)
                return backend
            skipped.setdefault(why, []).append(backend)
        raise AssertionError("the reference backend always runs")  # pragma: no cover

    def _log_fallback(self, chosen: str, skipped: dict[str, list[str]]) -> None:
        detail = "; ".join(f"{', '.join(names)}: {why}" for why, names in skipped.items())
        if (chosen, detail) not in self._logged:
            self._logged.add((chosen, detail))
            log.warning("%s: using the %s backend (skipped %s)", self.name, chosen, detail)

    def __call__(self, *args: Any) -> Any:
        impl = self.impls[self.select(*args)]
        if torch._C._autograd._profiler_enabled():
            # a range named after the op, which the profiler attributes its kernels to: a Triton
            # launch is no op of its own, and outside one its time belonged to no op
            with torch.profiler.record_function(self.name):
                return impl(*args)
        return impl(*args)


def choice(dispatcher: OpDispatcher, *args: Any) -> str:
    """The backend ``dispatcher`` would use for ``args``, or why none can (for `info`)."""
    try:
        return dispatcher.select(*args)
    except (RuntimeError, ValueError) as error:
        return f"none: {str(error).split(': ', 1)[-1]}"
