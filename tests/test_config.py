"""Configs: nested frozen dataclasses from YAML and dotted overrides, with checked types."""

from __future__ import annotations  # string annotations, as get_type_hints must resolve them

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from fastgen_kernels import config


@dataclass(frozen=True)
class Model:
    depth: int = 12
    hidden: int = 768
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    resolution: int | tuple[int, int] = 256


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass(frozen=True)
class Stage:
    steps: int
    name: Optional[str] = None


@dataclass(frozen=True)
class Train:
    name: str = "run"
    seed: int | None = 0
    compile: bool = False
    model: Model = field(default_factory=lambda: Model(depth=4))
    optim: Optim = Optim()
    ema_decays: tuple[float, ...] = (0.999,)
    stages: tuple[Stage, ...] = ()
    extra: dict[str, Any] = field(default_factory=lambda: {"tag": "base"})
    note: Any = None


FULL = {
    "name": "1e-4",  # a string that YAML 1.2 would read as a float
    "seed": None,
    "compile": True,
    "model": {"depth": 28, "hidden": 1152, "dtype": "float32", "resolution": [256, 512]},
    "optim": {"lr": 2e-5, "betas": [0.0, 0.99], "schedule": "cosine"},
    "ema_decays": [0.99, 0.999, 0.9999],
    "stages": [{"steps": 100, "name": None}, {"steps": 50, "name": "finetune"}],
    "extra": {"nested": {"a": [1, 2]}},
    "note": {"free": "form"},
}


def test_defaults_and_full_data():
    assert config.from_dict(Train, {}) == Train()
    cfg = config.from_dict(Train, FULL)
    assert cfg.model == Model(depth=28, hidden=1152, dtype="float32", resolution=(256, 512))
    assert cfg.optim.betas == (0.0, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.stages == (Stage(100), Stage(50, "finetune"))
    assert cfg.ema_decays == (0.99, 0.999, 0.9999) and cfg.seed is None and cfg.name == "1e-4"
    assert cfg.extra == {"tag": "base", "nested": {"a": [1, 2]}}  # over the default dict
    assert config.to_dict(cfg) == {**FULL, "extra": {"tag": "base", "nested": {"a": [1, 2]}}}


def test_yaml_round_trip(tmp_path):
    cfg = config.from_dict(Train, FULL)
    path = tmp_path / "train.yaml"
    config.save_yaml(cfg, path)
    assert config.load(Train, path) == cfg
    text = path.read_text()
    assert text.index("name:") < text.index("model:") < text.index("stages:")  # declaration order
    assert "name: '1e-4'" in text  # quoted, or it would come back as a float
    config.save_yaml(config.to_dict(cfg), tmp_path / "plain.yaml")  # a mapping is written as is
    assert (tmp_path / "plain.yaml").read_text() == text


def test_yaml_floats_without_dot_or_exponent_sign(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  betas: [0, 1.0e0]\n")
    cfg = config.load(Train, path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.0, 1.0)
    assert all(type(b) is float for b in cfg.optim.betas)  # ints accepted for floats, as floats


def test_yaml_1_2_scalars_and_repeated_keys(tmp_path):
    """YAML 1.1's implicit types surprised: 0123 was octal 83, 2:00 the int 120, a date a
    datetime.date, off the bool False; a key given twice kept its last value silently."""
    cfg = config.load(Train, overrides=["seed=0123", "name=2024-01-01", "note=off", "model.hidden=1_024"])
    assert cfg.seed == 123 and cfg.name == "2024-01-01" and cfg.note == "off" and cfg.model.hidden == 1024
    assert config.load(Train, overrides=["name='0123'"]).name == "0123"
    with pytest.raises(TypeError, match=r"name: expected str, got int 123 \(quote the value to give a string\)"):
        config.load(Train, overrides=["name=0123"])
    with pytest.raises(TypeError, match=r"model.depth: expected int, got str '2:00'"):
        config.load(Train, overrides=["model.depth=2:00"])
    with pytest.raises(TypeError, match=r"compile: expected bool, got str 'yes'"):
        config.load(Train, overrides=["compile=yes"])
    path = tmp_path / "train.yaml"
    path.write_text("model:\n  depth: 10\nseed: 1\nmodel:\n  hidden: 8\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="key 'model' is given twice"):
        config.load(Train, path)
    path.write_text("extra:\n  base: &b {depth: 3, hidden: 5}\nmodel:\n  <<: *b\n  depth: 2\n")  # merges override
    assert config.load(Train, path).model == Model(depth=2, hidden=5)
    config.save_yaml(config.to_dict(Train(name="0o17", note="yes")), tmp_path / "round.yaml")
    assert config.load(Train, tmp_path / "round.yaml") == Train(name="0o17", note="yes")


def test_overrides_over_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model:\n  hidden: 64\noptim:\n  lr: 0.1\nstages:\n  - steps: 3\n")
    cfg = config.load(Train, path, ["optim.lr=1e-4", "model.dtype=float32", "seed=null",
                                    "ema_decays=[0.99,0.999]", "name=foo", "extra.a.b=1",
                                    "stages=[{steps: 10}, {steps: 5, name: b}]", "optim.lr=2e-4"])
    assert cfg.optim == Optim(lr=2e-4)  # the later of two overrides wins
    assert cfg.model == Model(depth=4, hidden=64, dtype="float32")  # depth: the field's default
    assert cfg.seed is None and cfg.ema_decays == (0.99, 0.999) and cfg.name == "foo"
    assert cfg.stages == (Stage(10), Stage(5, "b"))
    assert cfg.extra == {"tag": "base", "a": {"b": 1}}
    assert config.load(Train, overrides=["compile=true"]) == Train(compile=True)


def test_empty_file_gives_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert config.load(Train, tmp_path / "empty.yaml") == Train()


def test_parse_overrides():
    assert config.parse_overrides(["a.b.c=1", "a.b.d=x", "a.e=[1, 2.5]", "f=null", "g='7'"]) == {
        "a": {"b": {"c": 1, "d": "x"}, "e": [1, 2.5]}, "f": None, "g": "7"}
    assert config.parse_overrides(["a=1", "a.b=2"]) == {"a": {"b": 2}}
    assert config.parse_overrides(["url=http://x.org/?q=1"]) == {"url": "http://x.org/?q=1"}
    assert config.parse_overrides([]) == {}


@pytest.mark.parametrize("item, match", [
    ("lr", "'lr' is not of the form dotted.key=value"),
    ("=1", "'=1' is not of the form"),
    ("a..b=1", "'a..b=1' is not of the form"),
    ("a b=1", "'a b=1' is not of the form"),
    ("lr=", r"'lr=' has no value \(write lr=null for None\)"),
    ("decays=[0.9,", "the value of 'decays=\\[0.9,' is not valid YAML"),
])
def test_malformed_overrides(item, match):
    with pytest.raises(ValueError, match=match):
        config.parse_overrides(["ok=1", item])


def test_overrides_must_be_a_sequence_of_strings():
    with pytest.raises(TypeError, match="overrides must be a sequence of 'key=value' strings, got str"):
        config.parse_overrides("lr=1")
    with pytest.raises(TypeError, match="overrides must hold strings, got int 3"):
        config.parse_overrides([3])


def test_merge():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {"g": 4}}
    update = {"a": {"c": {"d": 5, "h": 6}}, "e": {"i": 7}, "f": 8}
    assert config.merge(base, update) == {"a": {"b": 1, "c": {"d": 5, "h": 6}}, "e": {"i": 7}, "f": 8}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {"g": 4}}  # unchanged
    with pytest.raises(TypeError, match="merge: update must be a mapping, got list"):
        config.merge({}, [("a", 1)])


def test_unknown_keys_name_the_dotted_key_and_the_valid_ones():
    valid = "Model has the keys depth, hidden, dtype, resolution"
    with pytest.raises(ValueError, match=f"unknown key 'model.detph'; {valid}"):
        config.from_dict(Train, {"model": {"detph": 3}})
    with pytest.raises(ValueError, match=r"unknown key 'stages\[1\].nmae'"):
        config.load(Train, overrides=["stages=[{steps: 1}, {steps: 2, nmae: x}]"])
    with pytest.raises(ValueError, match=r"missing key 'stages\[0\].steps' \(Stage.steps has no default\)"):
        config.from_dict(Train, {"stages": [{"name": "a"}]})


@pytest.mark.parametrize("data, match", [
    ({"model": {"depth": "4"}}, "model.depth: expected int, got str '4'"),
    ({"model": {"depth": 4.0}}, "model.depth: expected int, got float 4.0"),
    ({"model": {"depth": True}}, "model.depth: expected int, got bool True"),
    ({"compile": 1}, "compile: expected bool, got int 1"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected float, got str 'fast'"),
    ({"optim": {"betas": [0.9]}}, r"optim.betas: expected tuple\[float, float\] \(2 items\), got 1 items"),
    ({"optim": {"betas": 0.9}}, r"optim.betas: expected tuple\[float, float\], got float 0.9"),
    ({"ema_decays": [0.9, "x"]}, r"ema_decays\[1\]: expected float, got str 'x'"),
    ({"stages": [{"steps": 1, "name": 2}]}, r"stages\[0\].name: expected str, got int 2"),
    ({"model": {"resolution": "big"}}, r"model.resolution: expected int \| tuple\[int, int\], got str"),
    ({"model": 3}, "model: expected a mapping of Model's fields, got int 3"),
    ({"extra": {1: "x"}}, "extra: keys must be str, got int 1"),
    ({"extra": ["x"]}, r"extra: expected dict\[str, Any\], got list"),
    ({"name": None}, "name: expected str, got NoneType None"),
])
def test_wrong_types_name_the_dotted_key(data, match):
    with pytest.raises(TypeError, match=match):
        config.from_dict(Train, data)


def test_literal_values_are_checked():
    assert config.from_dict(Optim, {"schedule": "cosine"}).schedule == "cosine"
    message = "optim.schedule: expected one of 'constant', 'cosine', got 'linear'"
    with pytest.raises(ValueError, match=message):
        config.load(Train, overrides=["optim.schedule=linear"])


def test_instances_are_frozen():
    cfg = config.from_dict(Train, FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.depth = 1
    assert hash(cfg.model) == hash(Model(28, 1152, "float32", (256, 512)))  # tuples, not lists


@dataclass(frozen=True)
class Unsupported:
    sizes: list[int] = field(default_factory=list)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"sizes: unsupported annotation list\[int\]"):
        config.from_dict(Unsupported, {"sizes": [1]})
    with pytest.raises(TypeError, match="from_dict: cls must be a dataclass type"):
        config.from_dict(dict, {})
    with pytest.raises(TypeError, match="data: expected a mapping of Train's fields, got list"):
        config.from_dict(Train, [])
    with pytest.raises(TypeError, match="to_dict: obj must be a dataclass instance, got type"):
        config.to_dict(Train)


def test_file_must_hold_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="list.yaml must hold a YAML mapping, got list"):
        config.load(Train, tmp_path / "list.yaml")
