"""Configs as (frozen) dataclasses, loaded from YAML with dotted command-line overrides.

    cfg = load(TrainConfig, "run.yaml", ["optim.lr=1e-4", "ema.decays=[0.99,0.999]", "seed=null"])

:func:`from_dict` builds a dataclass from plain data (YAML, JSON), recursing into nested dataclasses
and checking each value against its field's annotation (``typing.get_type_hints``):

=============================  =================================================================
annotation                     accepted value
=============================  =================================================================
``int``, ``bool``, ``str``     exactly that type (``True`` is not an int, ``1`` is not a bool)
``float``                      a float or an int (stored as a float)
``X | None``, ``A | B``        None where allowed, else the first member type that accepts it
``Literal[a, b, ...]``         one of a, b, ... of the same type
``tuple[T, ...]``              a list or tuple of Ts, stored as a tuple
``tuple[A, B]``                a list or tuple of exactly an A and a B, stored as a tuple
``dict[str, V]``               a mapping with str keys and V values
a dataclass                    a mapping of its fields (or an instance of it)
``Any``                        anything, unchanged
=============================  =================================================================

A key that is not given takes the field's default. A mapping given for a field whose default is a
dataclass instance or a dict is applied over that default, so ``model.depth=4`` changes only the
depth of the default model. Errors name the dotted key (``stages[1].steps``): ValueError for unknown
or missing keys and values outside a Literal, TypeError for values of the wrong type.

YAML is read with PyYAML's safe loader resolving plain scalars as YAML 1.2's core schema does:
``1e-4`` is a float (YAML 1.1: a string), ``0123`` the int 123 (1.1: octal 83), and ``yes``,
``off``, ``2:00`` and ``2024-01-01`` are strings (1.1: a bool, 120 and a date). A key given twice
in one mapping is an error (PyYAML keeps the last silently).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["from_dict", "load", "merge", "parse_overrides", "save_yaml", "to_dict"]

T = TypeVar("T")


# YAML 1.2 core schema: the plain scalars that are not strings (null keeps SafeLoader's rule;
# digits may be grouped with "_", as in Python)
_CORE_SCALARS = {
    "tag:yaml.org,2002:bool": (re.compile(r"(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    "tag:yaml.org,2002:int": (re.compile(r"(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), "-+0123456789"),
    "tag:yaml.org,2002:float": (re.compile(r"(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), "-+.0123456789"),
}
_YAML11_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp")


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader reading plain scalars by YAML 1.2's core schema, refusing repeated keys."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_TAGS]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text.replace("_", ""), 10)  # leading zeros are decimal

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" merges may override; other keys are strings here
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes strings either YAML 1.1 or _Loader would read as another type
    (a str "1e-4", "0o17" or "yes")."""


for _tag, (_regexp, _first) in _CORE_SCALARS.items():
    _Loader.add_implicit_resolver(_tag, _regexp, list(_first))
    _Dumper.add_implicit_resolver(_tag, _regexp, list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

# a dotted key: parts without dots, "=" or white space
_OVERRIDE_KEY = re.compile(r"[^\s.=]+(?:\.[^\s.=]+)*")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _mismatch(tp: Any, value: Any, key: str) -> TypeError:
    hint = ""
    if isinstance(value, (bool, int, float)) and "str" in _type_name(tp):  # YAML read a number or bool
        hint = " (quote the value to give a string)"
    return TypeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``, tuples and floats coerced; ``key`` (dotted)
    for the error messages."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error, which names nested keys precisely
            return _convert(options[0], value, key)
        for option in options:
            try:
                return _convert(option, value, key)
            except (TypeError, ValueError):
                continue
        raise _mismatch(tp, value, key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, key)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise TypeError(f"{key}: expected {_type_name(tp)} ({len(args)} items), "
                            f"got {len(value)} items {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict and args and args[0] is str:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, key)
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{key}: keys must be str, got {type(k).__name__} {k!r}")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(tp, value, key)
    if tp in (int, bool, str):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise _mismatch(tp, value, key)
    raise TypeError(f"{key}: unsupported annotation {_type_name(tp)} (supported: int, float, bool, "
                    f"str, X | None, Literal, tuple[T, ...], tuple[A, B], dict[str, V], "
                    f"dataclasses, Any)")


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """cls from the mapping ``data`` found at the dotted key ``prefix`` ("" at the top)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{prefix or 'data'}: expected a mapping of {cls.__name__}'s fields, "
                        f"got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ValueError(f"unknown key {_join(prefix, key)!r}; {cls.__name__} has the keys "
                             f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing key {key!r} ({cls.__name__}.{name} has no default)")
            continue
        value = data[name]
        if isinstance(value, Mapping):  # applied over a default dataclass instance or dict
            default = (f.default if f.default_factory is dataclasses.MISSING
                       else f.default_factory())
            if isinstance(default, Mapping) or (dataclasses.is_dataclass(default)
                                                and not isinstance(default, type)):
                value = merge(_plain(default), value)
        kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from plain data, type-checked (see the module doc);
    errors name keys under the dotted ``prefix`` (where ``data`` sits in a larger config)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict: cls must be a dataclass type, got {cls!r}")
    return _build(cls, data, prefix)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass instance ``obj`` as plain data (dicts, lists for tuples) that from_dict reads
    back; fields with ``init=False`` are left out, as from_dict cannot set them."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict: obj must be a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``: where both hold a mapping under a key the two are merged
    recursively, elsewhere ``update``'s value wins. Returns a new dict; the arguments are left
    unchanged (values are shared, not copied)."""
    for name, arg in (("base", base), ("update", update)):
        if not isinstance(arg, Mapping):
            raise TypeError(f"merge: {name} must be a mapping, got {type(arg).__name__}")
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["a.b.c=value", ...] as the nested dict {"a": {"b": {"c": value}}}, later items winning.

    Each value is YAML: ``lr=1e-4`` (float), ``decays=[0.99,0.999]``, ``name=foo``, ``seed=null``,
    ``name="1e-4"`` (a string).
    """
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise TypeError(f"parse_overrides: overrides must be a sequence of 'key=value' strings, "
                        f"got {type(overrides).__name__}")
    result: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str):
            raise TypeError(f"parse_overrides: overrides must hold strings, "
                            f"got {type(item).__name__} {item!r}")
        key, equals, text = item.partition("=")
        if not equals or not _OVERRIDE_KEY.fullmatch(key):
            raise ValueError(f"parse_overrides: {item!r} is not of the form dotted.key=value")
        if not text.strip():  # most likely an unset shell variable: null must be explicit
            raise ValueError(f"parse_overrides: {item!r} has no value (write {key}=null for None)")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ValueError(f"parse_overrides: the value of {item!r} is not valid YAML: "
                             f"{e}") from e
        for part in reversed(key.split(".")):
            value = {part: value}
        result = merge(result, value)
    return result


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from the YAML file ``path`` (optional) with ``overrides`` (see parse_overrides)
    merged over it."""
    data: Any = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, Mapping):
            raise TypeError(f"load: {path} must hold a YAML mapping, got {type(data).__name__}")
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write ``to_dict(obj)`` (or ``obj`` itself, if a mapping such as to_dict's output) to ``path``
    as YAML that :func:`load` reads back, keys in their order (fields in declaration order)."""
    data = _plain(obj) if isinstance(obj, Mapping) else to_dict(obj)
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(data, f, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
