r"""The eager fast paths of custom ops whose kernels take tens of microseconds.

A torch.library custom op with registered autograd costs about 80 us more per forward + backward
on the CPU than an ``autograd.Function`` doing the same work: the generated autograd wrapper, the
redispatch, the filling of default arguments and the dynamo guards around them. At training
sizes that is as long as the loss kernels themselves. :class:`EagerOp` runs the very functions
registered with torch.library (the backend dispatcher, ``setup_context`` and ``backward``)
through a plain ``autograd.Function`` when nothing needs the op's registration, and calls the
custom op otherwise: under torch.compile or export, with a tensor subclass (fake, functional,
DTensor), a dispatch or torch-function mode (make_fx, FlopCounterMode) or a functorch transform.
Both paths compute the same thing; the tests run each. An op may also have a *native* path: the
same kernels with their autograd in C++ (torch.ops.fastgen_C), taken for the backends that have it
(cpu, cuda), which leaves no Python between the kernels of a forward + backward.

Inference (:func:`no_autograd`): where no autograd of any kind sees a call, the activation ops
(norms, gated residual, GELU, attention, QK-norm + RoPE) call their backend dispatcher directly, which
skips the autograd.Function that carries their forward-mode rule as well (50-120 us per call on
the CPU, as long as these kernels take at a small DiT's sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager(args: tuple) -> bool:
    """True when ``args`` can skip the custom op: eager mode, plain tensors, no mode active."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and all(type(a) in _PLAIN_TYPES for a in args if isinstance(a, Tensor)))


def transforms_active(*kinds: TransformType) -> bool:
    """True inside a torch.func transform of one of ``kinds`` (jvp, grad, vmap, ...), at any depth of
    nested transforms."""
    return torch._C._are_functorch_transforms_active() and any(
        interpreter.key() in kinds for interpreter in retrieve_all_functorch_interpreters())


def functorch_jvp_active() -> bool:
    """True inside torch.func.jvp (or jacfwd, hessian), at any depth of nested transforms."""
    return transforms_active(TransformType.Jvp)


def runs_as_composition() -> bool:
    """True where the activation ops must run as their reference composition (plain PyTorch ops,
    which every transform handles and Inductor fuses), not their kernels:

    - traced by torch.compile inside a torch.func transform or with a forward-mode dual level open:
      compiled, an op is its custom op, which has no forward-mode rule (its tangent would be zero)
      and whose registered autograd torch.func cannot take (PyTorch raises), and Dynamo traces no
      autograd.Function with a ``jvp``;
    - under torch.func.vmap, compiled or not: the autograd.Functions that carry the forward-mode
      rules have no batching rule.
    """
    if torch.compiler.is_compiling():
        return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
    return transforms_active(TransformType.Vmap)


def carries_tangent(args: tuple) -> bool:
    """True when forward-mode AD would want a tangent of the call: inside torch.func.jvp, or a
    tensor argument is dual (``torch.autograd.forward_ad``)."""
    if functorch_jvp_active():
        return True
    return torch.autograd.forward_ad._current_level >= 0 and any(
        isinstance(a, Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None for a in args)


def has_own_tangent(t: Tensor) -> bool:
    """Whether t itself carries a forward-mode tangent (unlike :func:`carries_tangent`, which asks
    about a call): a dual tensor, or an input of torch.func.jvp (a tensor captured from outside it
    carries none)."""
    if torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
        return True
    return functorch_jvp_active() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def composition_gradients(reference: Callable[..., Any], inputs: tuple, needs: tuple,
                          grad_outputs: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """For a backward that records a graph (create_graph=True, torch.func.grad, vjp, jacrev):
    the gradients of ``reference(*inputs)`` (plain PyTorch ops; its first outputs against
    ``grad_outputs``, None for none), so that they differentiate again: the kernels' gradients
    would differentiate as constants. By ``torch.func.vjp`` of the reference, not
    ``torch.autograd.grad`` of its recomputation: torch.func.vjp and jacrev call the backward
    outside their transform, where the saved inputs record no graph (the recomputation's
    gradients came back None, and autograd made them zeros). One entry per input, None where
    ``needs`` says no or the input is not a tensor."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and isinstance(t, Tensor)]
    grads: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return grads

    def of_wanted(*tensors: Tensor) -> tuple[Tensor, ...]:
        args = list(inputs)
        for i, t in zip(wanted, tensors):
            args[i] = t
        out = reference(*args)
        return (out if isinstance(out, tuple) else (out,))[:len(grad_outputs)]

    outs, pullback = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
    got = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grad_outputs)))
    for i, g in zip(wanted, got):
        grads[i] = g
    return grads


def records_grad(args: tuple) -> bool:
    """True when backward-mode autograd records the call: grad mode is on and a tensor argument
    requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def check_inference_only(op: str, args: tuple) -> None:
    """Raises where autograd of either mode would see a call of inference-only op ``op`` (one
    without a derivative, whose result would otherwise come back as a constant)."""
    if records_grad(args):
        raise RuntimeError(f"{op}: inference only, it has no backward; call it under torch.no_grad() "
                           "or torch.inference_mode()")
    if carries_tangent(args):
        raise RuntimeError(f"{op}: inference only, it has no forward-mode derivative (an input's tangent "
                           "would be dropped)")


def no_autograd(args: tuple) -> bool:
    """True when the call is plain eager (:func:`plain_eager`) and invisible to autograd: not
    recorded (:func:`records_grad`), and no forward-mode dual level is open (dual tensors look like
    plain ones, and grad mode does not switch forward mode off)."""
    return torch.autograd.forward_ad._current_level < 0 and not records_grad(args) and plain_eager(args)


def backward_will_follow(args: tuple) -> bool:
    """True when the call is plain eager, recorded by autograd and no forward-mode dual level is
    open: where an ``autograd.Function`` that recomputes in its backward (gelu_tanh_linear,
    modulated_layer_norm_linear) replaces a composition of ops."""
    return records_grad(args) and torch.autograd.forward_ad._current_level < 0 and plain_eager(args)


class Function(torch.autograd.Function):
    """An autograd.Function whose ``apply`` goes straight to the C++ one outside functorch
    transforms: torch's ``Function.apply`` first binds the arguments to forward's signature with
    ``inspect.signature`` when setup_context is defined, about 10 us per call on the CPU, as long
    as a small kernel runs on a GPU. Callers pass every argument of forward positionally."""

    @classmethod
    @torch._dynamo.disable  # compiled code calls the custom ops; a frame Dynamo compiles apart after
    def apply(cls, *args):  # skipping its caller under torch.func.vmap could reach this (it raised)
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)


class EagerOp:
    """Calls custom op ``op`` (positional arguments only), or in plain eager mode ``forward(*args)``
    (its backend dispatcher), or ``native(*args)`` when given and the dispatcher picks one of
    ``native_backends``. Given ``setup_context(ctx, args, output)`` and ``backward(ctx,
    *grads)`` (the functions given to ``op.register_autograd``), the eager path runs them as an
    ``autograd.Function``; without them the op is one called where grad mode is off: a backward
    op, an inference-only op, or an op inside another autograd.Function's forward, backward or
    jvp (the activation ops' Functions carry their forward-mode rules that way)."""

    def __init__(self, op: Callable[..., Any], forward: Callable[..., Any],
                 setup_context: Callable[..., None] | None = None,
                 backward: Callable[..., Any] | None = None,
                 native: Callable[..., Any] | None = None,
                 native_backends: tuple[str, ...] = ("cuda", "cpu")) -> None:
        self.op = op
        self.forward = forward
        self.native = native
        self.native_backends = native_backends
        self.function = None
        if backward is not None:
            def function_forward(ctx, *args):
                output = forward(*args)
                setup_context(ctx, args, output)
                return output

            self.function = type(f"Eager_{op.__name__}", (torch.autograd.Function,), {
                "forward": staticmethod(function_forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if self.function is not None:
            self._check_derivatives(args)
        if not plain_eager(args) or (self.function is None and records_grad(args)):
            # an op without autograd where autograd would record it (a backward with
            # create_graph=True): the custom op, which says it has no derivative
            return self.op(*args)
        if self.native is not None and self.forward.select(*args) in self.native_backends:
            return self.native(*args)
        return self.forward(*args) if self.function is None else self.function.apply(*args)

    def _check_derivatives(self, args: tuple) -> None:
        """An op with a backward has that backward alone: forward-mode AD (a dual input,
        torch.func.jvp) and torch.func's differentiating transforms raise naming the op, where
        PyTorch's errors name none (and a compiled jvp would give a zero tangent). Compiled inside
        a transform the check is untraceable: Dynamo breaks the graph and the call runs eagerly."""
        if carries_tangent(args):
            raise RuntimeError(f"{self.op.__name__}: the fused op has no forward-mode derivative "
                               "(torch.func.jvp / jacfwd, a dual input)")
        if transforms_active(TransformType.Grad) and records_grad(args):  # (not a metric under no_grad)
            raise RuntimeError(f"{self.op.__name__}: torch.func.grad / vjp / jacrev cannot differentiate "
                               "the fused op (a custom op's autograd); use backward() or torch.autograd.grad")
