"""Typed, strict configuration: YAML -> frozen dataclasses.

A config file is a YAML mapping whose keys mirror the dataclasses below. It may name one
``base:`` file (path relative to itself) whose values it overrides; the base may not name
another base, so every value is at most one file away from where it is used. Trailing
``key=value`` arguments override both (``solver.base_lr=0.01 data.train.type=builtin``); the
value is read as YAML, so ``1e-3``, ``true``, ``[600, 800]`` and ``null`` mean what they look
like, and then checked against the field's type.

Every error names the file (or the command line), the full dotted key and what is valid.
Values are checked against what the schema declares beside each field (``checked(default,
Range(...))``) before any data loads. Configs are plain YAML: no anchors or aliases, bounded size.
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
PRESETS = Path(__file__).resolve().parent / "configs"     # the YAML presets, package data
COMMAND_LINE = "<command line>"
# An aliased YAML document of a few hundred bytes expands to gigabytes when walked, and
# thousands of nested levels exhaust Python's recursion: neither is a config.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 64


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
        path = preset_path(path)
        data, sources = _read_with_base(path)
    for item in overrides:
        _apply_override(data, sources, item)
    return _build_checked(schema, data, sources,
                          str(path) if path is not None else COMMAND_LINE)


def preset_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else the preset of that name shipped in the package
    (``frcnn_r101_coco.yaml``, ``frcnn_r101_coco`` or ``configs/frcnn_r101_coco.yaml``, as
    detectron2's model zoo resolves names), so an installed detres runs its presets from
    anywhere."""
    path = Path(path)
    if path.exists() or path.parent not in (Path("."), Path("configs")):
        return path
    preset = PRESETS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"{path}: no such config file, nor a preset of that name; the presets: "
                      f"{names}")


def from_dict(data: dict[str, Any], schema: type[T], source: str = "<dict>") -> T:
    """``schema`` from plain values, e.g. the resolved config stored in a checkpoint."""
    keys = _dotted_keys(data) if isinstance(data, dict) else []
    return _build_checked(schema, data, dict.fromkeys(keys, source), source)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (walking an aliased document
    expands it exponentially) and more than ``MAX_NESTING`` levels (the composer recurses)."""

    def __init__(self, stream: Any, name: str) -> None:
        super().__init__(stream)
        self.name, self.depth = name, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"{self.name} line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"{where}: YAML anchors and aliases (&name, *name) are not "
                              "supported in configs")
        if self.depth >= MAX_NESTING:
            raise ConfigError(f"{where}: nested more than {MAX_NESTING} levels deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _parse_yaml(text: str, name: str) -> Any:
    loader = _ConfigLoader(text, name)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a config file may hold at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
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


def _dotted_keys(d: dict[str, Any], prefix: str = "", depth: int = 0) -> list[str]:
    keys = []
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict) and depth < MAX_NESTING:   # no schema nests deeper
            keys.extend(_dotted_keys(v, full + ".", depth + 1))
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
        value = _parse_yaml(text, f"{COMMAND_LINE} override '{item}'") if text.strip() else None
    except yaml.YAMLError:
        value = text  # plain text such as a path with a colon
    return key, value


def _apply_override(data: dict[str, Any], sources: dict[str, str], item: str) -> None:
    key, value = _parse_override(item)
    _set_dotted(data, key, value)
    for inner in [k for k in sources if k.startswith(key + ".")]:   # replaced with the section
        del sources[inner]
    inner = _dotted_keys(value, key + ".") if isinstance(value, dict) else []
    sources.update(dict.fromkeys([key, *inner], COMMAND_LINE))


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


def _build_checked(cls: type[T], data: Any, sources: dict[str, str], default_src: str) -> T:
    cfg = _build(cls, data, "", sources, default_src)
    _check_values(cfg, "", sources, default_src)
    return cfg


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


def _check_values(cfg: Any, prefix: str, sources: dict[str, str], default_src: str) -> None:
    """Applies each field's declared check (defaults included), naming the first failure."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_values(value, key + ".", sources, default_src)
            continue
        check = f.metadata.get("check")
        problem = check(value, cfg) if check is not None else None
        if problem:
            src = sources.get(key)
            raise ConfigError(f"{src or default_src}: {key} = {_show(value)}"
                              f"{'' if src else ' (the default)'}: {problem}")


def _show(value: Any) -> str:
    """A value as it is written in YAML."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_show, value)) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


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
    sources = dict.fromkeys(_dotted_keys(data), COMMAND_LINE)   # no value is a default here
    for item in overrides:
        _apply_override(data, sources, item)
    return _build_checked(type(cfg), data, sources, COMMAND_LINE)
