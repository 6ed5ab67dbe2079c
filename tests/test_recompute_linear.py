"""gelu_tanh_linear and modulated_layer_norm_linear: an activation (the tanh-GELU, the modulated
LayerNorm) followed by a linear layer, keeping the activation's input for the backward and
recomputing its output there. Against the plain composition: values and gradients (fp32, bf16
autocast, fp64 gradcheck), fewer bytes saved for the backward, forward-mode AD, no-grad and
torch.compile (where they are the composition), the DiT using them, bad input."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import cpu_backends, extension_backends

import fastgen_kernels as fk
from fastgen_kernels.backends import interpreting_triton
from fastgen_kernels.ops.linear import linear, parameters_without_tangents


def _gelu_case(generator, dtype, B=2, L=7, K=40, N=24):
    x = torch.randn(B, L, K, generator=generator, dtype=dtype) * 2
    weight = torch.randn(N, K, generator=generator, dtype=dtype) / K**0.5
    bias = torch.randn(N, generator=generator, dtype=dtype)
    return (x, weight, bias), fk.gelu_tanh_linear, lambda x, w, b: F.linear(fk.gelu_tanh(x), w, b)


def _norm_case(generator, dtype, B=2, L=7, D=40, N=24):
    x = torch.randn(B, L, D, generator=generator, dtype=dtype) * 2 + 1
    shift, scale = (torch.randn(B, D, generator=generator, dtype=dtype) for _ in range(2))
    weight = torch.randn(N, D, generator=generator, dtype=dtype) / D**0.5
    bias = torch.randn(N, generator=generator, dtype=dtype)
    norm_weight, norm_bias = (1 + 0.1 * torch.randn(D, generator=generator, dtype=dtype) for _ in range(2))

    def composition(x, shift, scale, w, b, nw, nb):
        return F.linear(fk.modulated_layer_norm(x, shift, scale, nw, nb), w, b)

    return (x, shift, scale, weight, bias, norm_weight, norm_bias), fk.modulated_layer_norm_linear, composition


CASES = {"gelu_tanh_linear": _gelu_case, "modulated_layer_norm_linear": _norm_case}


def _leaves(args):
    return tuple(a.detach().clone().requires_grad_() for a in args)


def _value_and_grads(fn, args):
    out = fn(*args)
    return out, torch.autograd.grad(out.square().sum(), args)


def _saved_bytes(fn, args) -> int:
    """Bytes of the distinct storages autograd keeps for fn(*args)'s backward, args excluded."""
    inputs = {a.untyped_storage().data_ptr() for a in args}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(saved.values())


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "x_transposed_view"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", extension_backends())
def test_fp32_matches_the_composition(case, backend, contiguous, generator):
    args, fused, composition = CASES[case](generator, torch.float32)

    def leaves():
        x, *rest = _leaves(args)
        if not contiguous:  # the same values, tokens-major in memory
            x = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        return (x, *rest)

    with fk.use_backend(backend):
        out, grads = _value_and_grads(fused, leaves())
        ref, ref_grads = _value_and_grads(composition, leaves())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same kernels, in the same order
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_matches_the_composition(case, generator):
    """The linear layer in autocast's bf16 on fp32 parameters, as F.linear alone; the weight
    gradients come back fp32."""
    args, fused, composition = CASES[case](generator, torch.float32)
    results = []
    for fn in (fused, composition):
        leaves = _leaves(args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())


def activation_conversions(prof, shape) -> list[str]:
    """The dtypes of the (B, L, D) tensors that a profile recorded converted: a norm's fp32 output
    or tangent that a linear layer under autocast casts, the layer's bf16 input gradient widened
    for the norm's backward."""
    return [e.input_dtypes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
            and tuple(e.input_shapes[0]) == shape]


@pytest.mark.parametrize("path", ["backward", "one_pass", "no_grad"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_norm_writes_the_layers_autocast_dtype(path, backend, generator):
    """Under bf16 autocast on an fp32 residual stream the norm writes its output (forward, the
    backward's recomputation, the one-pass step's tangent) in bf16 itself and its backward reads
    the layer's bf16 input gradient: no (B, L, D) activation is converted (kernels), and the
    values are the composition's, whose layer casts (exactly, except where Triton's interpreter
    truncates instead of rounding)."""
    from fastgen_kernels.ops.linear import parameters_without_tangents

    args, fused, composition = _norm_case(generator, torch.float32)
    tangents = [torch.randn(a.shape, generator=generator) for a in args[:3]] + [None] * 4
    results = []
    for fn in (fused, composition):
        leaves = _leaves(args) if path != "no_grad" else args
        with (torch.profiler.profile(record_shapes=True) as prof, fk.use_backend(backend),
              torch.autocast("cpu", dtype=torch.bfloat16)):
            if path == "one_pass":
                with parameters_without_tangents(), fwAD.dual_level():
                    out = fn(*(a if t is None else fwAD.make_dual(a, t) for a, t in zip(leaves, tangents)))
                    out, tangent = fwAD.unpack_dual(out)
            else:
                with torch.set_grad_enabled(path == "backward"):
                    out, tangent = fn(*leaves), None
            grads = torch.autograd.grad(out.float().square().sum(), leaves) if path != "no_grad" else ()
        results.append((out, tangent, grads, activation_conversions(prof, tuple(args[0].shape))))
    (out, tangent, grads, converted), (ref, ref_tangent, ref_grads, ref_converted) = results
    assert "float" in ref_converted  # the composition's layer casts the norm's fp32 output
    if path == "backward":
        assert "c10::BFloat16" in ref_converted  # and widens its input gradient for the norm
    # (the cpu backend's tangent is the reference formula, which computes in fp32 and narrows once)
    if backend == "triton" or (backend == "cpu" and path != "one_pass"):
        assert not converted, converted
    assert out.dtype == torch.bfloat16
    # exact, but where Triton's interpreter truncates the norm's output to bf16 (a GPU rounds): an
    # ulp of it before a GEMM over D, errors on the scale of the output's largest entries
    exact = not (backend == "triton" and interpreting_triton())
    atol = 0 if exact else 1e-2 * ref.float().abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0 if exact else 2e-2, atol=atol)
    if tangent is not None:
        assert tangent.dtype == torch.bfloat16
        # bf16 rounding of the norm's tangent (the interpreter's truncation too), before a GEMM
        scale = ref_tangent.float().abs().max().item()
        torch.testing.assert_close(tangent.float(), ref_tangent.float(), rtol=2e-2, atol=1e-2 * scale)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())


def _linear_case(generator, dtype, B=2, L=7, K=40, N=24):
    x = torch.randn(B, L, K, generator=generator, dtype=dtype)
    weight = torch.randn(N, K, generator=generator, dtype=dtype) / K**0.5
    bias = torch.randn(N, generator=generator, dtype=dtype)
    return (x, weight, bias), linear, F.linear


@pytest.mark.parametrize("case", [*CASES, "linear"])
# (not Triton's interpreter: it truncates the norm's output to bf16 where the composition rounds)
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_the_one_pass_casts_each_weight_once(case, backend, generator):
    """Under bf16 autocast the one pass (forward-mode AD, then the backward) casts a layer's fp32
    weight to bf16 once for the forward, the tangent and the backward together, as eager
    autocast's F.linear does (the backward used to cast it again: autocast's cache is gone by
    then), and the gradients are the composition's bit for bit."""
    args, fused, composition = {**CASES, "linear": _linear_case}[case](generator, torch.float32)
    weight_index = 1 if case != "modulated_layer_norm_linear" else 3
    tangents = [torch.randn(a.shape, generator=generator) if i != weight_index and i < 3 else None
                for i, a in enumerate(args)]
    results = []
    for fn in (fused, composition):
        leaves = _leaves(args)
        with torch.profiler.profile(record_shapes=True) as prof, fk.use_backend(backend):
            with torch.autocast("cpu", dtype=torch.bfloat16), parameters_without_tangents(), fwAD.dual_level():
                out = fn(*(a if t is None else fwAD.make_dual(a, t) for a, t in zip(leaves, tangents)))
                out = fwAD.unpack_dual(out).primal
            grads = torch.autograd.grad(out.float().square().sum(), leaves)
        casts = [e.input_dtypes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                 and tuple(e.input_shapes[0]) == tuple(args[weight_index].shape)]
        results.append(grads)
        if fn is fused:
            assert casts.count("float") == 1, casts
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.values[0] != "triton"])
def test_a_weight_is_kept_cast_only_where_autocast_would_cache_it(case, backend, generator):
    """The layer keeps its weight's bf16 cast for the backward only in the one pass, and only
    where autocast's cache would hold that copy through the forward anyway (a trainable weight,
    the cache on): for a frozen weight (a teacher differentiated along its input), with the cache
    off (CUDA-graphed steps) or in a plain forward + backward (whose peak is in the backward) the
    copy would be memory held until the backward, which casts again instead."""
    from fastgen_kernels.ops.linear import parameters_without_tangents

    args, fused, _ = CASES[case](generator, torch.float32)
    weight_index = 1 if case == "gelu_tanh_linear" else 3
    for one_pass, trainable, cache, kept_cast in ((True, True, True, True), (True, False, True, False),
                                                  (True, True, False, False), (False, True, True, False)):
        leaves = [a.detach().clone().requires_grad_(i != weight_index or trainable) for i, a in enumerate(args)]
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with (fk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
              torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)):
            if one_pass:
                with parameters_without_tangents(), fwAD.dual_level():
                    out = fwAD.unpack_dual(fused(fwAD.make_dual(leaves[0], torch.ones_like(leaves[0])),
                                                 *leaves[1:])).primal
            else:
                out = fused(*leaves)
        assert ((tuple(args[weight_index].shape), torch.bfloat16) in saved) == kept_cast, (one_pass, trainable, cache)
        torch.autograd.grad(out.float().sum(), [a for a in leaves if a.requires_grad])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", extension_backends())
def test_fp64_gradcheck(case, backend, generator):
    args, fused, _ = CASES[case](generator, torch.float64, B=2, L=3, N=5)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(fused, _leaves(args))
        # without the optional tensors (biases; the norm's affine)
        assert torch.autograd.gradcheck(fused, _leaves(args[:2] if case == "gelu_tanh_linear" else args[:4]))


@pytest.mark.parametrize("affine", [True, False], ids=["norm_affine", "plain_norm"])
@pytest.mark.parametrize("needs", ["all", "x", "weight", "modulation"])
def test_norm_linear_cpp_autograd_equals_the_python_function(affine, needs, generator):
    """On the extension's backends the op records its autograd in C++ (fastgen_C::modulated_norm_linear):
    the same kernels as the Python autograd.Function, so the same values and gradients, with the
    norm's affine or without (absent optional inputs shift the C++ node's input edges) and with
    gradients for some inputs only."""
    if not fk._extension.cpu_built():
        pytest.skip("extension not built")
    args, fused, _ = _norm_case(generator, torch.float32)
    x, shift, scale, weight, bias, nw, nb = args if affine else (*args[:5], None, None)
    wanted = {"all": "x shift scale weight bias nw nb", "x": "x", "weight": "weight bias",
              "modulation": "shift scale"}[needs].split()
    named = dict(x=x, shift=shift, scale=scale, weight=weight, bias=bias, nw=nw, nb=nb)
    leaves = {k: (v.detach().clone().requires_grad_(k in wanted) if v is not None else None) for k, v in named.items()}
    inputs = [leaves[k] for k in ("x", "shift", "scale", "weight", "bias", "nw", "nb")]
    out = fused(*inputs)
    assert "CppNode<fastgen" in out.grad_fn.name()
    mn = fk.ops.OP_MODULES["modulated_norm"]
    python_out = mn._ModulatedNormLinearFunction.apply(inputs[0], inputs[1], inputs[2], inputs[5], inputs[6], 1e-6,
                                                       False, inputs[3], inputs[4])
    assert torch.equal(out, python_out)
    differentiable = [t for t in inputs if t is not None and t.requires_grad]
    g = torch.randn(out.shape, generator=generator)
    for got, want in zip(torch.autograd.grad(out, differentiable, g), torch.autograd.grad(python_out, differentiable, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("norm_weight, norm_bias", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["norm_affine", "norm_weight", "norm_bias", "plain_norm"])
def test_norm_linear_second_derivatives(backend, norm_weight, norm_bias, generator):
    """A create_graph=True backward (a gradient penalty through a DiT) differentiates again, on the
    C++ autograd path (cpu backend) and the Python Function (reference): gradgradcheck in fp64,
    with each of the norm's own affine parameters or none (a bias without a weight came out
    wrong through ATen's layer_norm)."""
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    args, fused, _ = _norm_case(generator, torch.float64, B=2, L=3, D=6, N=4)
    inputs = _leaves(args[:5] + tuple(a for a, kept in zip(args[5:], (norm_weight, norm_bias)) if kept))

    def function(x, shift, scale, weight, bias, *affine):
        affine = iter(affine)
        return fused(x, shift, scale, weight, bias, next(affine) if norm_weight else None,
                     next(affine) if norm_bias else None)

    with fk.use_backend(backend):
        assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_norm_linear_second_derivatives_with_strided_norm_affine(backend, generator):
    """A norm weight and bias that are strided views: the C++ node differentiated its contiguous
    copies, tensors off the graph, and the second backward failed."""
    if backend == "cpu" and not fk._extension.cpu_built():
        pytest.skip("extension not built")
    args, fused, _ = _norm_case(generator, torch.float64, B=2, L=3, D=6, N=4)
    leaves = _leaves(args[:5] + tuple(torch.stack([a, a], -1) for a in args[5:]))

    def function(x, shift, scale, weight, bias, norm_weight_pairs, norm_bias_pairs):
        return fused(x, shift, scale, weight, bias, norm_weight_pairs[:, 0], norm_bias_pairs[:, 1])

    with fk.use_backend(backend):
        assert torch.autograd.gradgradcheck(function, leaves)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gelu_linear_second_derivatives(backend, generator):
    """A create_graph=True backward through the GELU + linear op (a gradient penalty through a
    DiT's MLP) differentiates again (it raised: the backward kernel has no derivative), the weight
    gradient's dependence on x included."""
    args, fused, composition = _gelu_case(generator, torch.float64, B=2, L=3, K=5, N=4)
    with fk.use_backend(backend):
        assert torch.autograd.gradgradcheck(fused, _leaves(args))
        (x, weight, bias), (x2, weight2, bias2) = _leaves(args), _leaves(args)
        dweight = torch.autograd.grad(fused(x, weight, bias).square().sum(), weight, create_graph=True)[0]
        expected = torch.autograd.grad(composition(x2, weight2, bias2).square().sum(), weight2, create_graph=True)[0]
        mixed = torch.autograd.grad(dweight.square().sum(), x)[0]
    torch.testing.assert_close(mixed, torch.autograd.grad(expected.square().sum(), x2)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_zero_tokens(case, generator):
    """No tokens: an empty output, and gradients as the composition's (the weight's zero, the
    bias's zero); the recomputed input's reshape read the row count from an empty tensor."""
    args, fused, composition = CASES[case](generator, torch.float32, B=2, L=0)
    (out, grads), (expected, expected_grads) = (_value_and_grads(fn, _leaves(args)) for fn in (fused, composition))
    for a, b in zip((out, *grads), (expected, *expected_grads), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_zero_features(case, generator):
    """An empty feature dimension (K = 0): the output is the bias and the gradients are the
    composition's (the backward's reshape(-1, 0) of the recomputed input raised)."""
    args, fused, composition = CASES[case](generator, torch.float32, 2, 3, 0)
    (out, grads), (expected, expected_grads) = (_value_and_grads(fn, _leaves(args)) for fn in (fused, composition))
    for a, b in zip((out, *grads), (expected, *expected_grads), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_keeps_less_for_the_backward(case, generator):
    """The composition keeps the activation's output as the linear layer's input; these do not."""
    args, fused, composition = CASES[case](generator, torch.float32, B=4, L=16)
    intermediate = args[0].numel() * args[0].element_size()  # the (B, L, K) activation output
    ours, theirs = _saved_bytes(fused, _leaves(args)), _saved_bytes(composition, _leaves(args))
    assert ours <= theirs - intermediate


@pytest.mark.parametrize("case", CASES)
def test_forward_mode_no_grad_and_compile_are_the_composition(case, generator):
    args, fused, composition = CASES[case](generator, torch.float32)
    tangents = tuple(torch.randn(a.shape, generator=generator) for a in args)
    out, tangent = torch.func.jvp(fused, args, tangents)
    ref, ref_tangent = torch.func.jvp(composition, args, tangents)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tangent, ref_tangent)
    with torch.no_grad():
        torch.testing.assert_close(fused(*args), ref)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(*args), ref, rtol=1e-5, atol=1e-5)


def test_dit_block_keeps_less_and_computes_the_same(generator, monkeypatch):
    """The fused reference DiT uses both (its qkv, fc1, fc2 and final layer are plain nn.Linear):
    same output and gradients as with the composition, and fewer bytes kept for the backward."""
    from fastgen_kernels.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        num_classes=10))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    t, labels = torch.rand(3, generator=generator), torch.tensor([1, 2, 3])

    def run():
        out = net(x, t, labels)
        return out, torch.autograd.grad(out.square().sum(), list(net.parameters()))

    out, grads = run()
    params = tuple(net.parameters())
    saved = _saved_bytes(lambda *_: net(x, t, labels), params)
    # the compositions in their place
    monkeypatch.setattr(fk, "gelu_tanh_linear", lambda h, w, b: F.linear(fk.gelu_tanh(h), w, b))
    monkeypatch.setattr(fk, "modulated_layer_norm_linear", lambda x, s, c, w, b, eps: F.linear(
        fk.modulated_layer_norm(x, s, c, eps=eps), w, b))
    ref, ref_grads = run()
    ref_saved = _saved_bytes(lambda *_: net(x, t, labels), params)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert saved < 0.8 * ref_saved  # 0.67 at this size


def test_bad_input(generator):
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="gelu_tanh_linear: x must be"):
        fk.gelu_tanh_linear(torch.ones(2, 8, dtype=torch.int32), w)
    x, mod = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="modulated_layer_norm_linear: shift"):
        fk.modulated_layer_norm_linear(x, torch.randn(3, 8), mod, w)
    with pytest.raises(ValueError, match="modulated_layer_norm_linear: eps"):
        fk.modulated_layer_norm_linear(x, mod, mod, w, eps=0)
    with pytest.raises(ValueError, match="modulated_layer_norm_linear: eps"):
        fk.modulated_layer_norm_linear(x, mod, mod, w, eps=float("inf"))
    # the layer's own arguments, before any kernel runs
    with pytest.raises(ValueError, match=r"gelu_tanh_linear: weight must have shape \(N, 8\), got \(4, 7\)"):
        fk.gelu_tanh_linear(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"gelu_tanh_linear: bias must have shape \(4,\)"):
        fk.gelu_tanh_linear(x, w, torch.randn(5))
    with pytest.raises(TypeError, match="modulated_layer_norm_linear: linear_weight must be float16"):
        fk.modulated_layer_norm_linear(x, mod, mod, w.int())
    with pytest.raises(ValueError, match=r"modulated_layer_norm_linear: linear_bias must have shape \(4,\)"):
        fk.modulated_layer_norm_linear(x, mod, mod, w, torch.randn(3))
