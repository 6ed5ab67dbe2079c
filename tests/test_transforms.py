"""The ops under torch.func transforms and forward-mode AD inside torch.compile, and under
torch.func.vmap: there they run as their reference composition (ops/_eager_op.runs_as_composition),
so the results are plain PyTorch's. Compiled, a forward-mode tangent through a custom op came out
zero (no forward-mode rule) and torch.func.grad raised (torch.func takes no custom op's
autograd); eagerly, vmap raised (the Functions carrying the forward-mode rules have no batching
rule). The fused losses, which have no such composition, raise naming the op under the
differentiating transforms, compiled too."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastgen_kernels as fk


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _cases(generator):
    """name: (op, plain PyTorch of it, inputs). Every op returns one tensor here."""
    B, L, D, H, Dh = 2, 3, 8, 2, 6
    x = _randn(generator, B, L, D)
    shift, scale, gate = (_randn(generator, B, D) for _ in range(3))
    weight, bias = _randn(generator, D), _randn(generator, D)
    linear_weight, linear_bias = _randn(generator, 5, D), _randn(generator, 5)
    q, k, v = (_randn(generator, B, L + i, H, Dh) for i in (0, 1, 1))
    angles = torch.rand(L, Dh, generator=generator, dtype=torch.float64) * 6.3

    def modulate(n, shift, scale):
        return n * (1 + scale[:, None]) + shift[:, None]

    def plain_attention(q, k, v):  # SDPA's CPU flash kernel has no forward-mode rule
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        return (torch.softmax(qh @ kh.transpose(-1, -2) / Dh ** 0.5, -1) @ vh).transpose(1, 2)

    def plain_rope(n):
        a, b = n.unflatten(-1, (-1, 2)).unbind(-1)
        return n * angles.cos()[:, None] + torch.stack((-b, a), -1).flatten(-2) * angles.sin()[:, None]

    def qk_product(norm_rope):
        def product(q, k, q_weight, k_weight):
            q_out, k_out = norm_rope(q, k, q_weight, k_weight)
            return q_out * k_out
        return product

    return {
        "gelu_tanh": (fk.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), (x,)),
        "modulated_layer_norm": (
            fk.modulated_layer_norm,
            lambda x, shift, scale, w, b: modulate(F.layer_norm(x, (D,), w, b, eps=1e-6), shift, scale),
            (x, shift, scale, weight, bias)),
        "modulated_rms_norm": (
            fk.modulated_rms_norm,
            lambda x, shift, scale, w: modulate(F.rms_norm(x, (D,), w, eps=1e-6), shift, scale),
            (x, shift, scale, weight)),
        "gated_residual": (fk.gated_residual, lambda x, y, g: x + g[:, None] * y, (x, x.flip(1), gate)),
        "attention": (fk.attention, plain_attention, (q, k, v)),
        "qk_norm_rope": (
            qk_product(lambda q, k, qw, kw: fk.qk_norm_rope(q, k, qw, kw, angles.cos(), angles.sin())),
            qk_product(lambda q, k, qw, kw: (plain_rope(F.rms_norm(q, (Dh,), qw, eps=1e-6)),
                                             plain_rope(F.rms_norm(k, (Dh,), kw, eps=1e-6)))),
            (q, q.flip(1), _randn(generator, Dh), _randn(generator, Dh))),
        "gelu_tanh_linear": (
            fk.gelu_tanh_linear, lambda x, w, b: F.linear(F.gelu(x, approximate="tanh"), w, b),
            (x, linear_weight, linear_bias)),
        "modulated_layer_norm_linear": (
            fk.modulated_layer_norm_linear,
            lambda x, shift, scale, w, b: F.linear(modulate(F.layer_norm(x, (D,), eps=1e-6), shift, scale), w, b),
            (x, shift, scale, linear_weight, linear_bias)),
    }


CASES = ["gelu_tanh", "modulated_layer_norm", "modulated_rms_norm", "gated_residual", "attention",
         "qk_norm_rope", "gelu_tanh_linear", "modulated_layer_norm_linear"]


def _tangents(inputs, generator):
    return tuple(_randn(generator, *t.shape) for t in inputs)


def _assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_compiled_forward_mode_and_grad(case, generator):
    """Inside torch.compile (fullgraph): torch.func.jvp, a forward_ad dual level and
    torch.func.grad give plain PyTorch's tangents and gradients."""
    torch._dynamo.reset()
    op, plain, inputs = _cases(generator)[case]
    tangents = _tangents(inputs, generator)
    argnums = tuple(range(len(inputs)))

    def jvp(fn):
        return lambda *args: torch.func.jvp(fn, args[:len(inputs)], args[len(inputs):])

    def dual(fn):
        def run(*args):
            with fwAD.dual_level():
                duals = [fwAD.make_dual(p, t) for p, t in zip(args[:len(inputs)], args[len(inputs):])]
                out = fwAD.unpack_dual(fn(*duals))
                return out.primal, out.tangent
        return run

    def grad(fn):
        return torch.func.grad(lambda *args: fn(*args).square().sum(), argnums=argnums)

    for transform, args in ((jvp, inputs + tangents), (dual, inputs + tangents), (grad, inputs)):
        got = torch.compile(transform(op), fullgraph=True)(*args)
        _assert_close(got, transform(plain)(*args))


@pytest.mark.parametrize("case", CASES)
def test_vjp_and_jacrev(case, generator):
    """torch.func.vjp and jacrev call the backward outside their transform, where the saved inputs
    record no graph: the composition's gradients came back None, and autograd made them zeros."""
    op, plain, inputs = _cases(generator)[case]
    argnums = tuple(range(len(inputs)))
    (out, pullback), (expected, expected_pullback) = (torch.func.vjp(fn, *inputs) for fn in (op, plain))
    _assert_close((out,), (expected,))
    cotangent = _randn(generator, *out.shape)
    _assert_close(pullback(cotangent), expected_pullback(cotangent))
    _assert_close(torch.func.jacrev(op, argnums=argnums)(*inputs), torch.func.jacrev(plain, argnums=argnums)(*inputs))


@pytest.mark.parametrize("case", CASES)
def test_vmap(case, generator):
    """torch.func.vmap over a leading dim of every input, alone and around torch.func.jvp, equals
    the op applied to each slice."""
    op, plain, inputs = _cases(generator)[case]
    stacked = tuple(torch.stack([t, 2 * t]) for t in inputs)
    tangents = _tangents(stacked, generator)
    got = torch.func.vmap(op)(*stacked)
    _assert_close((got,), (torch.stack([plain(*(t[i] for t in stacked)) for i in range(2)]),))
    got = torch.func.vmap(lambda p, t: torch.func.jvp(op, p, t))(stacked, tangents)
    want = [torch.func.jvp(plain, tuple(p[i] for p in stacked), tuple(t[i] for t in tangents)) for i in range(2)]
    _assert_close(got, tuple(torch.stack(parts) for parts in zip(*want)))


def test_compiled_losses_under_differentiating_transforms_raise(generator):
    """Compiled, torch.func.grad and torch.func.jvp of a fused loss raise naming the op, as they do
    eagerly (tests/test_losses.py); a compiled jvp gave a zero tangent."""
    torch._dynamo.reset()
    x, target, tangent = (_randn(generator, 2, 3, 4) for _ in range(3))

    def loss(x):
        return fk.losses.denoising_loss(x, target)

    calls = {"grad": lambda x, t: torch.func.grad(loss)(x), "jvp": lambda x, t: torch.func.jvp(loss, (x,), (t,))}
    for call in calls.values():
        with pytest.raises(RuntimeError, match="squared_residual_loss: .*(torch.func.grad|forward-mode)"):
            torch.compile(call)(x, tangent)


def test_losses_inside_func_grad_that_nothing_differentiates():
    """A loss logged under torch.no_grad (or of detached tensors) inside torch.func.grad is a
    metric: it runs (the transform check raised on it)."""
    target = torch.randn(2, 3, dtype=torch.float64)

    def objective(x):
        with torch.no_grad():
            metric = fk.losses.denoising_loss(x, target)
        return (x * x).sum() + 0 * metric

    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(objective)(x), 2 * x)


def test_compiled_function_runs_plainly_after_vmap():
    """torch.func.vmap of a compiled function using a fused op, then a plain call of it: Dynamo had
    compiled an inner frame apart and reached the autograd.Function's apply (it raised)."""
    torch._dynamo.reset()
    g = torch.compile(lambda a: fk.gelu_tanh(a) + 1)
    x = torch.randn(3, 4, requires_grad=True)
    torch.testing.assert_close(torch.func.vmap(g)(x), F.gelu(x, approximate="tanh") + 1)
    torch.testing.assert_close(g(x[0]), F.gelu(x[0], approximate="tanh") + 1)


def test_rotary_tables_stay_constants_under_vmap_of_jvp(generator):
    """Under vmap(jvp) (the reference composition) a tangent given to cos is not differentiated, as
    the tables are constants (eagerly such a tangent raises)."""
    q = _randn(generator, 2, 1, 4, 2, 8)
    angles = _randn(generator, 4, 8)
    cos, sin = angles.cos(), angles.sin()

    def rotated(q, cos):
        return fk.qk_norm_rope(q, q, None, None, cos, sin)[0]

    _, tangent = torch.func.vmap(lambda q: torch.func.jvp(rotated, (q, cos), (torch.zeros_like(q), cos)))(q)
    assert torch.equal(tangent, torch.zeros_like(tangent))

