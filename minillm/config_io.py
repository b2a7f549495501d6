"""Strict conversion between config dataclasses and plain mappings / YAML, and ``key.sub=value`` overrides.

Generic over any dataclass tree (no knowledge of the run's sections, which live in :mod:`minillm.config`), so the
sections kept in their own modules (:mod:`minillm.adapter_config`) share one field helper and one error type without
an import cycle. Standard library and PyYAML only: ``--help`` and ``--dry-run`` stay fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with the key and the file it came from in the message."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (shown by ``--explain``)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently convert) one value against a field type; fail naming the key and file."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
        for option in inner:  # e.g. teacher.server: a list of URLs or one string; the first that fits wins
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        names = " or ".join(str(a) if typing.get_origin(a) else _type_name(a) for a in inner)
        raise ConfigError(f"{source}: `{key}` must be {names}, got {value!r} "
                          f"({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: `{key}` must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-6` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list or origin is list:
        item = (typing.get_args(tp) or [None])[0]
        if dataclasses.is_dataclass(item) and isinstance(value, (list, tuple)):  # e.g. teachers: list[TeacherConfig]
            return [v if isinstance(v, item) else _coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        if item is str and isinstance(value, (list, tuple)):  # module names, data sources: never numbers
            if all(isinstance(v, str) for v in value):
                return list(value)
        elif isinstance(value, (list, tuple)):
            return [float(v) if isinstance(v, str) else v for v in value]
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"{source}: `{key}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key `{prefix}{unknown[0]}`; valid keys here: {sorted(names)}")
    for name in getattr(cls, "DURATION_FIELDS", ()):
        if isinstance(data.get(name), (int, float)) and not isinstance(data[name], bool):
            # YAML 1.1 reads an unquoted 3:55:00 as the base-60 integer 14100, which is that duration in seconds
            data = {**data, name: str(data[name])}
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML (``true``, ``3``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override `{text}`: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{text}`: `{part}` is not a section")
            node = child
        node[path[-1]] = value
    return data
