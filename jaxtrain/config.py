"""Typed configs: frozen dataclasses read from YAML mappings and `key=value` overrides.

A leaf module (like `errors`), usable from every layer. Each layer declares the config
sections it owns as frozen dataclasses whose fields are made with `option` (a default,
a one-line doc and the checks a value must pass) or `section` (a nested dataclass); a
field's type annotation is the type a YAML value must have. `load(cls, mapping)` reads a
mapping into `cls`, refusing in one line an unknown key (with the closest valid one), a
value of the wrong type (naming the key, the type expected and the value), a count that
is not positive, a value outside its choices, a missing required key. `to_dict` gives
the plain mapping back (what checkpoints record), `keys` every dotted key with its type,
default and doc (what `jaxtrain config --keys` and docs/config.md show).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from . import yaml_numbers
from .errors import JaxtrainError


def option(default=None, doc: str = "", *, key: str | None = None, positive: bool = False,
           minimum: int | None = None, choices: tuple | None = None, parse=None,
           required: bool = False, shorthand: str | None = None):
    """A config field: its `default`, a one-line `doc`, and what a value must be besides
    its annotated type: `positive` (an integer >= 1, or null where the type allows it),
    `minimum`, one of `choices`, `required` (no default; the loader says it is missing).
    `key` is the YAML name where it is not a Python name (`async`); `shorthand`: a bare
    string stands for `{shorthand: string}` (`model: cnn` is `{name: cnn}`); `parse(key,
    value)` checks a free-form mapping (a registry entry's `{name, **kwargs}`)."""
    meta = {"doc": doc, "key": key, "positive": positive, "minimum": minimum,
            "choices": choices, "parse": parse, "required": required, "shorthand": shorthand}
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def named(key: str, value) -> dict:
    """`parse` for a registry entry: {name, **kwargs} (with `shorthand="name"`, a bare
    name stands for {name})."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise JaxtrainError(f"config key {key!r} must be a mapping with a 'name' (and its "
                            f"keyword arguments), got {value!r}")
    return value


def section(cls, doc: str):
    """A nested section field whose default is `cls()` (every key at its default)."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "key": None})


def yaml_key(field: dataclasses.Field) -> str:
    return field.metadata.get("key") or field.name


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _options(tp) -> tuple:
    """The types a union annotation allows (`int | None` -> (int, NoneType))."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _name(tp) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {float: "int or float"}.get(tp, getattr(tp, "__name__", str(tp)))


def type_name(tp) -> str:
    """How a field's type reads in messages and docs: `int or null`."""
    return " or ".join(_name(t) for t in _options(tp))


def _check_type(key: str, value, tp):
    options = _options(tp)
    if value is None:
        if type(None) in options:
            return None
    elif isinstance(value, bool):
        if bool in options:
            return value
        raise JaxtrainError(f"config key {key!r} must be {type_name(tp)}, got {value!r}")
    for option_type in options:
        if dataclasses.is_dataclass(option_type) and isinstance(value, dict):
            return load(option_type, value, key + ".")
        if option_type is float and isinstance(value, int | float):
            return float(value)
        if option_type in (int, str, dict, list) and isinstance(value, option_type):
            return value
        if option_type is str and isinstance(value, os.PathLike):  # a folder, from Python
            return os.fspath(value)
    raise JaxtrainError(f"config key {key!r} must be {type_name(tp)}, got "
                        f"{type(value).__name__} {value!r}")


INT32_MAX = 2**31 - 1


def _check_value(key: str, value, meta, tp):
    if value is None:
        return
    if meta.get("positive") and value < 1:
        null = " or null" if type(None) in _options(tp) else ""
        raise JaxtrainError(f"config key {key!r} must be a positive integer{null}, got {value}")
    if meta.get("positive") and value > INT32_MAX:  # steps, positions: int32 on the device
        raise JaxtrainError(f"config key {key!r} must be at most {INT32_MAX} (counts are "
                            f"int32 on the device), got {value}")
    minimum = meta.get("minimum")
    if minimum is not None and value < minimum:
        raise JaxtrainError(f"config key {key!r} must be an integer >= {minimum}, got {value}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        words = [_word(c) for c in choices]
        valid = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
        raise JaxtrainError(f"config key {key!r} must be {valid}, got {value!r}")


def _word(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def unknown_key(key: str, valid) -> JaxtrainError:
    """The error for an unknown `key` (dotted): the valid names, and the closest one."""
    prefix, _, name = key.rpartition(".")
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return JaxtrainError(f"unknown config key {key!r} (valid: {', '.join(valid)}){hint}")


def load(cls, mapping, prefix: str = ""):
    """`mapping` (a YAML mapping) read into the dataclass `cls`: defaults filled in, every
    key, type and value checked (errors name the dotted key, `prefix` + name)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise JaxtrainError(f"config key {prefix.rstrip('.') or 'config'!r} must be a mapping, "
                            f"got {type(mapping).__name__}")
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            raise unknown_key(prefix + str(key), fields)
    hints, values, missing = _hints(cls), {}, []
    for key, field in fields.items():
        full, meta = prefix + key, field.metadata
        if key not in mapping:
            if meta.get("required"):
                missing.append(full)
            elif dataclasses.is_dataclass(hints[field.name]):  # a section: its defaults
                values[field.name] = load(hints[field.name], {}, full + ".")
            continue
        value = mapping[key]
        if meta.get("shorthand") and isinstance(value, str):
            value = {meta["shorthand"]: value}
        if meta.get("parse") is not None and value is not None:
            value = meta["parse"](full, value)
        value = _check_type(full, value, hints[field.name])
        _check_value(full, value, meta, hints[field.name])
        values[field.name] = value
    if missing:
        raise JaxtrainError(f"config key {missing[0]!r} is missing")
    return cls(**values)


def to_dict(config) -> dict:
    """The plain mapping of a config (YAML key names, sections as nested mappings)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[yaml_key(field)] = (to_dict(value) if dataclasses.is_dataclass(value)
                                else copy.deepcopy(value))
    return out


def checked(config):
    """`config` (built in Python) put through the loader's checks."""
    return load(type(config), to_dict(config))


def keys(cls, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """`(dotted key, type, default, doc)` of every key of `cls`, sections expanded (a
    section that may be null lists its keys after its own line)."""
    rows, hints = [], _hints(cls)
    for field in dataclasses.fields(cls):
        key, tp, doc = prefix + yaml_key(field), hints[field.name], field.metadata.get("doc", "")
        nested = [t for t in _options(tp) if dataclasses.is_dataclass(t)]
        if nested and type(None) not in _options(tp):
            rows += keys(nested[0], key + ".")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if field.metadata.get("required"):
            default = "(required)"
        rows.append((key, type_name(tp), default, doc))
        if nested:
            rows += keys(nested[0], key + ".")
    return rows


def shorthands(cls, prefix: str = "") -> dict[str, str]:
    """`{dotted key: shorthand}` of every field of `cls` (sections included) that may be
    given as a bare string (what `set_key` needs to apply an override under one)."""
    out, hints = {}, _hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + yaml_key(field)
        if field.metadata.get("shorthand"):
            out[key] = field.metadata["shorthand"]
        for nested in (t for t in _options(hints[field.name]) if dataclasses.is_dataclass(t)):
            out.update(shorthands(nested, key + "."))
    return out


def format_value(value) -> str:
    """A default as YAML writes it inline (`null`, `true`, `{data: -1}`)."""
    if isinstance(value, str) and value == "(required)":
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def to_yaml(config) -> str:
    """The config as YAML, in declaration order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


# -- reading YAML files and overrides ----------------------------------------------------

def set_key(tree: dict, key: str, value, shorthand: dict | None = None) -> None:
    """Set the dotted `key` of `tree` to `value`, making the sections on the way; a
    section given as a bare string (`model: cnn`) becomes `{shorthand[section]: string}`
    (`shorthand` by dotted key, as `shorthands` gives it)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node, dotted = tree.get(part), ".".join(parts[:i + 1])
        if node is None:
            node = tree[part] = {}
        elif isinstance(node, str) and dotted in (shorthand or {}):
            node = tree[part] = {shorthand[dotted]: node}
        elif not isinstance(node, dict):
            raise JaxtrainError(f"override {key}: {part!r} is not a section")
        tree = node
    tree[parts[-1]] = value


def read_yaml(path: str | Path, overrides=(), shorthand: dict | None = None) -> dict:
    """Read `path` (a YAML mapping) and apply `key=value` overrides (values parsed as
    YAML; see `set_key` for `shorthand`); the raw mapping, not yet checked."""
    path = Path(path)
    if not path.is_file():
        raise JaxtrainError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=yaml_numbers.Loader) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise JaxtrainError(f"config file {path} is not valid YAML{line}: "
                            f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise JaxtrainError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise JaxtrainError(f"override {item!r} must be key=value (e.g. train.steps=100)")
        try:
            value = yaml.load(text, Loader=yaml_numbers.Loader)
        except yaml.YAMLError:
            value = text
        set_key(raw, key.strip(), value, shorthand)
    return raw
