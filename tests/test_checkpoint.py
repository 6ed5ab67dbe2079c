"""Checkpoints: exact round trips (tensors, metadata, optimizers, RNGs), atomic writes, names."""

import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastgen_kernels.distill import checkpoint as ckpt


def assert_identical(a, b, where="state"):
    """Same structure, same Python types, tensors equal in dtype, shape and every bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- files --------------------------------------------------------------------------------------

def test_round_trip_groups_and_metadata(tmp_path, generator):
    weight = torch.randn(6, 4, generator=generator)
    groups = {
        "model": {"blocks.0.weight": weight.t(),  # non-contiguous
                  "embed/weight": weight, "head/weight": weight,  # tied: safetensors refuses aliases
                  "scale": torch.randn((), generator=generator).to(torch.bfloat16),
                  "count": torch.arange(5, dtype=torch.int64)},
        "ema": {"shadow": torch.randn(2, 9, generator=generator, requires_grad=True)},
        "empty": {},
    }
    metadata = {"iteration": 1200, "loss": float("inf"), "note": None,
                "config": {"lr": 1e-4, "decays": [0.99, 0.999], "name": "dmd2"}}
    path = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.save_checkpoint(path, groups, metadata)

    for device in ("cpu", torch.device("cpu", 0)):  # safetensors refused "cpu:0"
        loaded, loaded_metadata = ckpt.load_checkpoint(path, device)
        assert_identical(loaded_metadata, metadata)
        assert list(loaded) == list(groups)
        for group, named in groups.items():
            assert_identical(loaded[group], {k: t.detach() for k, t in named.items()}, group)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 10)
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(1000)}}, {"iteration": 10})
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        assert filename.parent == tmp_path and filename.name.startswith(".")  # not onto path
        save_file(dict(tensors), str(filename), metadata=metadata)
        with open(filename, "r+b") as f:  # as if the disk filled up: half a file, then an error
            f.truncate(len(before) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_tensors", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}}, {"iteration": 20})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    groups, metadata = ckpt.load_checkpoint(path)
    assert torch.equal(groups["model"]["w"], torch.ones(1000)) and metadata == {"iteration": 10}


def test_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []

    def spy(name):
        function = getattr(os, name)

        def recorded(*args):
            events.append(name)
            return function(*args)
        monkeypatch.setattr(os, name, recorded)

    spy("fsync")
    spy("replace")
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {"model": {"w": torch.ones(3)}}, {})
    # the file's data, the rename, then (POSIX) the directory entry
    expected = ["fsync", "replace", "fsync"] if os.name == "posix" else ["fsync", "replace"]
    assert events == expected


def test_latest_and_prune(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    for iteration in (5, 100_000_000, 20):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, iteration), {}, {})
    others = [".checkpoint-999999999.safetensors.1f2e.tmp", "checkpoint-latest.safetensors",
              "notes.txt"]
    for name in others:
        (tmp_path / name).write_text("not a checkpoint")

    assert ckpt.checkpoint_path(tmp_path, 20) == tmp_path / "checkpoint-00000020.safetensors"
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100000000.safetensors"
    assert ckpt.prune_checkpoints(tmp_path, keep=2) == [ckpt.checkpoint_path(tmp_path, 5)]
    kept = {"checkpoint-00000020.safetensors", "checkpoint-100000000.safetensors", *others}
    assert {p.name for p in tmp_path.iterdir()} == kept
    assert ckpt.prune_checkpoints(tmp_path, keep=2) == []


def test_bad_inputs(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match="group names must be non-empty strings without '/'"):
        ckpt.save_checkpoint(path, {"a/b": {}}, {})
    with pytest.raises(TypeError, match=r"groups\['model'\]\['w'\] must be a tensor, got list"):
        ckpt.save_checkpoint(path, {"model": {"w": [1.0]}}, {})
    with pytest.raises(TypeError, match=r"groups\['model'\] must be a dict of tensors"):
        ckpt.save_checkpoint(path, {"model": torch.ones(1)}, {})
    with pytest.raises(TypeError, match="metadata must be JSON-serializable"):
        ckpt.save_checkpoint(path, {}, {"dtype": torch.float32})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        ckpt.save_checkpoint(path, {}, [("iteration", 1)])
    assert list(tmp_path.iterdir()) == []

    save_file({"w": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="was not written by save_checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        ckpt.checkpoint_path(tmp_path, -1)
    with pytest.raises(TypeError, match="iteration must be an int, got float"):
        ckpt.checkpoint_path(tmp_path, 1.0)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_dtensors_are_refused(single_rank_process_group, tmp_path):
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded = distribute_tensor(torch.ones(4, 3), single_rank_process_group, [Shard(0)])
    with pytest.raises(TypeError, match=r"groups\['model'\]\['w'\] is a DTensor: save this rank's"):
        ckpt.save_checkpoint(tmp_path / "c.safetensors", {"model": {"w": sharded}}, {})


# --- optimizers ---------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.05),
    "adam_amsgrad_tensor_lr": lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-2), amsgrad=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
}


def make_model(seed):
    with torch.random.fork_rng():  # seeded initial weights; the global generator is left alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 7), nn.SiLU(), nn.Linear(7, 3))


def random_batches(n, generator):
    return [(torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator))
            for _ in range(n)]


def train(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "radam"])
def test_resume_is_bit_identical(name, tmp_path, generator):
    batches = random_batches(8, generator)
    model = make_model(0)
    optimizer = OPTIMIZERS[name](model.parameters())
    train(model, optimizer, batches)

    resumed = make_model(0)
    resumed_optimizer = OPTIMIZERS[name](resumed.parameters())
    train(resumed, resumed_optimizer, batches[:5])
    tensors, meta = ckpt.optimizer_to_tensors(resumed_optimizer.state_dict())
    path = ckpt.checkpoint_path(tmp_path, 5)
    ckpt.save_checkpoint(path, {"model": resumed.state_dict(), "optimizer": tensors},
                         {"optimizer": meta})
    del resumed, resumed_optimizer

    groups, metadata = ckpt.load_checkpoint(path)
    resumed = make_model(1)  # different initial weights: all must come from the checkpoint
    resumed.load_state_dict(groups["model"])
    resumed_optimizer = OPTIMIZERS[name](resumed.parameters())
    resumed_optimizer.load_state_dict(ckpt.optimizer_from_tensors(groups["optimizer"],
                                                                  metadata["optimizer"]))
    train(resumed, resumed_optimizer, batches[5:])
    assert_identical(resumed.state_dict(), model.state_dict())
    assert_identical(resumed_optimizer.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_dict_round_trip(name, tmp_path, generator):
    model = make_model(0)
    optimizer = OPTIMIZERS[name](model.parameters())
    train(model, optimizer, random_batches(1, generator))
    state_dict = optimizer.state_dict()
    tensors, meta = ckpt.optimizer_to_tensors(state_dict)
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {"optimizer": tensors}, {"optimizer": meta})
    groups, metadata = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    restored = ckpt.optimizer_from_tensors(groups["optimizer"], metadata["optimizer"])
    assert_identical(restored, state_dict)


def test_optimizer_encoding_keeps_every_python_type(tmp_path):
    state_dict = {
        "state": {0: {"step": torch.tensor(3.0), "history": [torch.ones(2), torch.zeros(3)],
                      "count": 7, "buffer": None, "pair": (1, 2.5, "x")},
                  "1": {"nan": float("nan")}},
        "param_groups": [{"params": [0, "1"], "lr": torch.tensor(0.1), "betas": (0.9, 0.999),
                          "foreach": None, "maximize": False, "tensor": {"tuple": "not a tag"}}],
    }
    tensors, meta = ckpt.optimizer_to_tensors(state_dict)
    assert set(tensors) == {"state.0.step", "state.0.history.0", "state.0.history.1",
                            "param_groups.0.lr"}
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {"optimizer": tensors}, {"optimizer": meta})
    groups, metadata = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    restored = ckpt.optimizer_from_tensors(groups["optimizer"], metadata["optimizer"])
    nan = restored["state"]["1"].pop("nan")
    assert nan != nan
    del state_dict["state"]["1"]["nan"]
    assert_identical(restored, state_dict)


def test_optimizer_bad_inputs():
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(TypeError, match="state_dict must be a dict, got SGD"):
        ckpt.optimizer_to_tensors(optimizer)
    with pytest.raises(ValueError, match=r"must have the keys \['param_groups', 'state'\], got \['s"):
        ckpt.optimizer_to_tensors({"state": {}})
    with pytest.raises(TypeError, match="state.0.dtype has type dtype"):
        ckpt.optimizer_to_tensors({"state": {0: {"dtype": torch.float32}}, "param_groups": []})
    with pytest.raises(TypeError, match="state has a key of type tuple"):
        ckpt.optimizer_to_tensors({"state": {(0, 1): {}}, "param_groups": []})
    tensors, meta = ckpt.optimizer_to_tensors({"state": {0: {"step": torch.ones(())}},
                                               "param_groups": []})
    with pytest.raises(ValueError, match="the tensor 'state.0.step', which is missing from tensors"):
        ckpt.optimizer_from_tensors({}, meta)
    with pytest.raises(ValueError, match=r"meta does not refer to \(from another optimizer\?\): \['x"):
        ckpt.optimizer_from_tensors({**tensors, "x": torch.ones(1)}, meta)
    with pytest.raises(ValueError, match="not one of the tags"):
        ckpt.optimizer_from_tensors({}, {"state": {"step": 1}, "param_groups": []})


# --- random number generators -------------------------------------------------------------------

def draws():
    return (torch.rand(5).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(3).tolist(), np.random.standard_normal(3).tolist())


def test_rng_round_trip(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in random's state
    np.random.standard_normal(1)  # and one in numpy's
    tensors, meta = ckpt.rng_state()
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {"rng": tensors}, {"rng": meta})
    expected = draws()
    assert draws() != expected  # the generators have moved on
    groups, metadata = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    ckpt.set_rng_state(groups["rng"], metadata["rng"])
    assert draws() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_and_rng(tmp_path, generator):
    weight = torch.randn(5, 3, generator=generator).cuda()
    tensors, meta = ckpt.rng_state()
    assert {f"cuda.{i}" for i in range(torch.cuda.device_count())} <= set(tensors)
    ckpt.save_checkpoint(tmp_path / "c.safetensors", {"model": {"w": weight}, "rng": tensors},
                         {"rng": meta})
    expected = torch.rand(7, device="cuda")
    groups, metadata = ckpt.load_checkpoint(tmp_path / "c.safetensors", device="cuda")
    assert groups["model"]["w"].is_cuda and torch.equal(groups["model"]["w"], weight)
    ckpt.set_rng_state(groups["rng"], metadata["rng"])
    assert torch.equal(torch.rand(7, device="cuda"), expected)


def test_rng_bad_inputs():
    tensors, meta = ckpt.rng_state()
    with pytest.raises(ValueError, match=r"tensors must have the key 'torch'"):
        ckpt.set_rng_state({**tensors, "mps.0": tensors["torch"]}, meta)
    # saved on more GPUs than this process sees (a GPU run resumed on the CPU): the rest restored
    expected = torch.rand(3)
    ckpt.set_rng_state(tensors, meta)
    torch.rand(5)
    with pytest.warns(UserWarning, match=r"CUDA devices \[99\] saved"):
        ckpt.set_rng_state({**tensors, "cuda.99": tensors["torch"]}, meta)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match=r"meta must have the keys \['numpy', 'python'\]"):
        ckpt.set_rng_state(tensors, {"python": meta["python"]})
