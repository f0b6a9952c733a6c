"""Typed, strict configuration: YAML -> frozen dataclasses.

A config file is a YAML mapping whose keys mirror the dataclasses below. It may name one
``base:`` file (path relative to itself) whose values it overrides; the base may not name
another base, so every value is at most one file away from where it is used. Trailing
``key=value`` arguments override both (``solver.base_lr=0.01 data.train.type=builtin``); the
value is read as YAML, so ``1e-3``, ``true``, ``[600, 800]`` and ``null`` mean what they look
like, and then checked against the field's type.

Every error names the file (or the command line), the full dotted key and what is valid.
This module is the engine and knows no task: each task's schema (frozen dataclasses whose
fields carry their defaults and the paper section they come from) lives beside its build
code in ``detres/tasks/<task>/config.py``. Only ``detres/tasks`` and ``detres/cli.py`` import
configs; models and data take plain constructor arguments.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from detres.atomic import atomic_write_bytes

T = TypeVar("T")
COMMAND_LINE = "<command line>"


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message says where."""



# ----------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                schema: type[T]) -> T:
    """Reads ``path`` (and its ``base:``), applies ``key=value`` overrides, returns ``schema``.

    ``path=None`` starts from the schema's defaults.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data, sources = _read_with_base(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        sources[key] = COMMAND_LINE
    return _build(schema, data, "", sources, str(path) if path is not None else COMMAND_LINE)


def from_dict(data: dict[str, Any], schema: type[T], source: str = "<dict>") -> T:
    """``schema`` from plain values, e.g. the resolved config stored in a checkpoint."""
    return _build(schema, data, "", {}, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _read_with_base(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    data = _read_yaml(path)
    sources = {k: str(path) for k in _dotted_keys(data)}
    base = data.pop("base", None)
    sources.pop("base", None)
    if base is None:
        return data, sources
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    base_path = (path.parent / base).resolve() if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file '{base}' does not exist (looked at {base_path})")
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise ConfigError(f"{base_path}: a base file may not name another base "
                          f"(only one level of 'base:' is allowed; reached from {path})")
    base_sources = {k: str(base_path) for k in _dotted_keys(base_data)}
    merged = _merge(base_data, data)
    return merged, {**base_sources, **sources}


def _dotted_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_dotted_keys(v, full + "."))
    return keys


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # plain text such as a path with a colon
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], data: Any, prefix: str, sources: dict[str, str], default_src: str) -> T:
    where = sources.get(prefix.rstrip("."), default_src) if prefix else default_src
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            src = sources.get(f"{prefix}{key}", default_src)
            section = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise ConfigError(f"{src}: unknown key '{prefix}{key}'; valid keys {section}: "
                              f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}{name}"
        tp = hints[name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{default_src}: missing required value '{full}' "
                                  f"({_type_name(tp)})")
            continue
        src = sources.get(full, default_src)
        if dataclasses.is_dataclass(tp):
            value = data[name]
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                # a section given in part keeps the parent's defaults for the rest
                # (e.g. detection's frozen_bn backbone when only the depth is set)
                value = _merge(to_dict(f.default_factory()), value)
            kwargs[name] = _build(tp, value, full + ".", sources, default_src)
        else:
            kwargs[name] = _coerce(data[name], tp, full, src)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Checks ``value`` against type ``tp``; converts lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(what: str = "") -> ConfigError:
        return ConfigError(f"{src}: '{key}' must be {what or _type_name(tp)}, got {value!r}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, src)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail()
            items = [_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp is Any:
        return value
    raise ConfigError(f"{src}: '{key}' has an unsupported type {tp!r}")  # a schema bug


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values"
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


# ----------------------------------------------------------------------------- output
def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready values (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def dump(cfg: Any, path: str | Path | None = None) -> str:
    """Writes the resolved config as YAML (loadable by ``load_config``), atomically; returns
    the text."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
    return text


def replace(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """A copy of ``cfg`` with ``key=value`` overrides applied and checked."""
    data = to_dict(cfg)
    sources: dict[str, str] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        sources[key] = COMMAND_LINE
    return _build(type(cfg), data, "", sources, COMMAND_LINE)
