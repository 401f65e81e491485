"""Strict mapping of YAML onto typed dataclasses.

A config is a tree of dataclasses with type hints. Loading checks every key and
value against those hints: an unknown key, a missing required key or a value of
the wrong type is a one-line `ConfigError` naming the key, its section and the
allowed keys (with a did-you-mean). Nothing is read with a silent default.

A section that is a choice among several dataclasses (the `model` section: one model
family's config) defines a classmethod `parse_section(data, where)` that picks the
dataclass and builds it with `from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from echoic.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from `data`, validating keys and types.

    `where` is the dotted name of this section (e.g. "data.spec_augment"), used in
    errors; "" for the top level of a file.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"'{where or 'the config'}' must be a mapping of keys, got {_describe(data)}"
        )
    if "parse_section" in vars(cls):  # a choice among several dataclasses parses itself
        return cls.parse_section(data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(str(key), where, list(fields)))
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(where, name)}'")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        # __post_init__ checks raise ValueError for conflicting or out-of-range options.
        raise ConfigError(f"'{where or 'the config'}': {error}") from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def one_of(config: Any, names: list[str], default: dict[str, Any] | None = None) -> str:
    """For a frozen config's __post_init__: exactly one of the sections `names` is set
    (when none is, `default` supplies one). Returns the name of the one set."""
    chosen = [name for name in names if getattr(config, name) is not None]
    if not chosen and default:
        for name, value in default.items():
            object.__setattr__(config, name, value)
        chosen = list(default)
    if len(chosen) != 1:
        raise ValueError(
            f"set exactly one of {', '.join(names)} (got {', '.join(chosen) or 'none'})"
        )
    return chosen[0]


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (what `from_dict` reads back)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_describe(data)}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config mapping.

    Validation happens when the result goes through `from_dict`, so a misspelt
    override fails exactly like a misspelt key in the file.
    """
    result = _deep_copy(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like section.key=value")
        dotted, raw_value = override.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override '{override}' has an empty key")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError:
            value = raw_value
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                prefix = ".".join(keys[: depth + 1])
                raise ConfigError(f"override '{override}': '{prefix}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def unknown_key_message(key: str, where: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = f"in '{where}'" if where else "at the top level"
    return f"unknown key '{_join(where, key)}'{hint} (allowed {section}: {', '.join(allowed)})"


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        present = [o for o in options if o is not type(None)]
        structured = dataclasses.is_dataclass(present[0]) or typing.get_origin(present[0]) in (
            list,
            tuple,
            dict,
        )
        if len(present) == 1 and structured:
            # "section | null": the section's own error names the exact key inside it.
            return _convert(value, present[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"'{where}' must be {_type_name(hint)}, got {_describe(value)}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            names = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"'{where}' must be one of {names}, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{where}' must be a list, got {_describe(value)}")
        (item_hint, *_rest) = typing.get_args(hint) or (Any,)
        items = [_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping, got {_describe(value)}")
        _key_hint, value_hint = typing.get_args(hint) or (str, Any)
        return {str(k): _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str):
            return Path(value)
    else:
        raise TypeError(f"config type {hint!r} at '{where}' is not supported")
    raise ConfigError(f"'{where}' must be {_type_name(hint)}, got {_describe(value)}")
