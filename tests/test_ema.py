"""EMA against a per-parameter, per-decay loop in fp64, plus its swaps, state and input checks."""

import pytest
import torch
from torch import nn

from fastgen_kernels.distill.ema import EMA

DECAYS = [0.0, 0.5, 0.9, 0.999]
SHAPES = [(3, 5), (7,), (2, 3, 4), ()]  # odd sizes and a 0-dim parameter
STEPS = 60
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def make_params(generator, dtype, device="cpu"):
    return [nn.Parameter(torch.randn(s, generator=generator).to(device, dtype)) for s in SHAPES]


def assign(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def random_like(params, generator):
    return [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_per_parameter_loop(dtype, device, generator):
    params = make_params(generator, dtype, device)
    ema = EMA(params, DECAYS)
    reference = [[p.detach().double() for p in params] for _ in DECAYS]
    largest = 0.0
    for _ in range(STEPS):
        values = random_like(params, generator)
        assign(params, values)
        ema.update()
        for k, decay in enumerate(DECAYS):
            for i, p in enumerate(params):
                reference[k][i] = decay * reference[k][i] + (1 - decay) * p.detach().double()
        largest = max(largest, max(v.abs().max().item() for v in values))
    # Each fp32 lerp rounds its result and its weight (1 - decay): at most ~2 ulps of the largest
    # value per update, and decay <= 1 never amplifies earlier errors, so they add up at most.
    atol = STEPS * 2 * torch.finfo(torch.float32).eps * largest
    for k in range(len(DECAYS)):
        for got, want in zip(ema.shadow(k), reference[k]):
            assert got.dtype == torch.float32 and got.shape == want.shape and got.device == want.device
            torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


def test_starts_at_the_parameters_and_decay_zero_copies(generator):
    params = make_params(generator, torch.bfloat16)
    ema = EMA(nn.ParameterList(params), [0.0, 0.99])
    for k in range(2):
        assert all(torch.equal(s, p.float()) for s, p in zip(ema.shadow(k), params))
    assign(params, random_like(params, generator))
    ema.update()
    assert all(torch.equal(s, p.float()) for s, p in zip(ema.shadow(0), params))
    assert not any(torch.equal(s, p.float()) for s, p in zip(ema.shadow(1), params))


def test_copy_to_casts_to_the_parameter_dtype(generator):
    params = make_params(generator, torch.bfloat16)
    ema = EMA(params, [0.5])
    assign(params, random_like(params, generator))
    ema.update()
    expected = [s.to(torch.bfloat16) for s in ema.shadow(0)]
    ema.copy_to(0)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, e) for p, e in zip(params, expected))


def test_copy_from_loads_one_shadow_from_the_parameters(generator):
    params = make_params(generator, torch.bfloat16)
    ema = EMA(params, [0.5, 0.9])
    assign(params, random_like(params, generator))
    ema.update()
    untouched = [s.clone() for s in ema.shadow(0)]
    saved = random_like(params, generator)
    assign(params, saved)
    ema.copy_from(1)
    assert all(torch.equal(s, v.float()) for s, v in zip(ema.shadow(1), saved))
    assert all(torch.equal(s, u) for s, u in zip(ema.shadow(0), untouched))


def test_applied_swaps_in_and_restores_on_exception(generator):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    ema = EMA(model, [0.9, 0.99])
    params = list(model.parameters())
    for _ in range(3):
        assign(params, random_like(params, generator))
        ema.update()
    training = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied(1):
            assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow(1)))
            raise RuntimeError("inside the block")
    assert all(torch.equal(p, t) for p, t in zip(params, training))
    with ema.applied(0):
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow(0)))
    assert all(torch.equal(p, t) for p, t in zip(params, training))


def test_state_dict_round_trip(generator):
    params = make_params(generator, torch.float32)
    ema = EMA(params, DECAYS)
    for _ in range(3):
        assign(params, random_like(params, generator))
        ema.update()
    state = ema.state_dict()
    assert state["shadow"].shape == (len(DECAYS), sum(p.numel() for p in params))
    assert state["decays"].dtype == torch.float64 and state["decays"].tolist() == DECAYS

    other = EMA(make_params(generator, torch.float32), DECAYS)
    other.load_state_dict({name: t.clone() for name, t in state.items()})
    for k in range(len(DECAYS)):
        assert all(torch.equal(a, b) for a, b in zip(other.shadow(k), ema.shadow(k)))


def test_load_state_dict_names_what_differs(generator):
    params = make_params(generator, torch.float32)
    state = EMA(params, DECAYS).state_dict()
    with pytest.raises(ValueError, match="parameter elements"):
        EMA(params[:-1], DECAYS).load_state_dict(state)
    with pytest.raises(ValueError, match=r"has shape \(4,\), this EMA has 2 decays"):
        EMA(params, DECAYS[:2]).load_state_dict(state)
    with pytest.raises(ValueError, match="differ from this EMA's decays"):
        EMA(params, [0.0, 0.5, 0.9, 0.9999]).load_state_dict(state)
    with pytest.raises(ValueError, match="exactly the keys"):
        EMA(params, DECAYS).load_state_dict({"shadow": state["shadow"]})
    with pytest.raises(TypeError, match=r"state_dict\['shadow'\] must be a floating-point tensor"):
        EMA(params, DECAYS).load_state_dict({"shadow": [0.0], "decays": state["decays"]})


@pytest.mark.parametrize("decays, error, match", [
    ([], ValueError, "at least one"),
    ([0.9, 1.0], ValueError, r"decays\[1\] must be in \[0, 1\), got 1.0"),
    ([-0.1], ValueError, r"decays\[0\] must be in \[0, 1\)"),
    ([float("nan")], ValueError, r"decays\[0\] must be in \[0, 1\)"),
    ([True], TypeError, r"decays\[0\] must be a float, got bool"),
    (0.9, TypeError, "decays must be a sequence"),
    ("0.9", TypeError, "decays must be a sequence"),
])
def test_bad_decays(decays, error, match):
    with pytest.raises(error, match=match):
        EMA([nn.Parameter(torch.ones(2))], decays)


def test_bad_params_and_index():
    with pytest.raises(ValueError, match="params is empty"):
        EMA([], [0.9])
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got list"):
        EMA([torch.ones(2), [1.0]], [0.9])
    with pytest.raises(TypeError, match=r"params\[0\] must be floating point, got torch.int64"):
        EMA([torch.ones(2, dtype=torch.int64)], [0.9])
    with pytest.raises(ValueError, match="one device"):
        EMA([torch.ones(2), torch.ones(2, device="meta")], [0.9])
    ema = EMA([torch.ones(2)], [0.9, 0.99])
    with pytest.raises(ValueError, match=r"index must be in \[0, 2\)"):
        ema.shadow(2)
    with pytest.raises(ValueError, match=r"index must be in \[0, 2\)"):
        ema.copy_to(-1)
    with pytest.raises(TypeError, match="index must be an int, got float"):
        with ema.applied(0.0):
            pass


def test_fsdp2_tracks_local_shards(single_rank_process_group, generator):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    fully_shard(model, mesh=single_rank_process_group)
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    ema = EMA(model, [0.5])
    locals_ = [p.to_local() for p in params]
    before = [t.clone() for t in locals_]
    assign(locals_, random_like(locals_, generator))
    ema.update()
    for s, b, p in zip(ema.shadow(0), before, params):
        torch.testing.assert_close(s, 0.5 * b + 0.5 * p.to_local(), rtol=0, atol=1e-6)
    ema.copy_to(0)
    assert all(torch.equal(p.full_tensor(), s) for p, s in zip(params, ema.shadow(0)))
    shadow = [t.clone() for t in ema.full_shadow(0)]  # whole tensors (one rank: the shard is whole)
    assert all(torch.equal(s, t) for s, t in zip(shadow, ema.shadow(0)))
    ema.update()
    ema.load_full_shadow(0, shadow)
    assert all(torch.equal(s, t) for s, t in zip(shadow, ema.shadow(0)))


def test_full_shadow_round_trip_keeps_fp32(generator):
    """Whole fp32 shadows out and back in (what checkpoints hold), exactly, whatever the
    parameters' dtype; bad tensors name what is wrong."""
    params = make_params(generator, torch.bfloat16)
    ema = EMA(params, [0.9, 0.99])
    for _ in range(3):
        assign(params, random_like(params, generator))
        ema.update()
    saved = [[t.double() for t in ema.full_shadow(k)] for k in range(2)]  # any floating dtype loads
    assert all(t.dtype == torch.float64 and t.shape == p.shape for t, p in zip(saved[0], params))
    expected = ema.state_dict()["shadow"].clone()
    assign(params, random_like(params, generator))
    ema.update()
    for k in range(2):
        ema.load_full_shadow(k, saved[k])
    assert torch.equal(ema.state_dict()["shadow"], expected)
    with pytest.raises(ValueError, match="got 3 tensors for 4 parameters"):
        ema.load_full_shadow(0, saved[0][:3])
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a floating tensor of the parameter's shape \(7,\)"):
        ema.load_full_shadow(0, [saved[0][0], torch.zeros(8), *saved[0][2:]])
