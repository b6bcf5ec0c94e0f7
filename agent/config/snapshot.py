"""A `Config` as JSON data and back: what the agent's config history keeps.

`svctl reload --previous` re-applies the config that ran before the current one, also
after an agent restart. The history therefore keeps the *applied* config itself, not
the file it came from: the file's includes may have changed on disk since, and after a
partly failed reload the running config mixes old and new services, which no file
holds.

Invariants:
- `config_from_data(config_to_data(c)) == c` for every `Config` the loader builds,
  also through `json.dumps`/`json.loads` (the data holds only JSON types).
- Reading checks every value against the dataclass field types (nested dataclasses,
  `X | None`, `Literal`, fixed and variadic tuples, mappings); anything else in the
  data (a field of another svcd version, a hand-edited file) raises `ValueError`, and
  the history skips that entry. Missing fields take their defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from agent.config.model import Config


def config_to_data(config: Config) -> dict[str, Any]:
    """The whole config (services, agent, registry, file text) as JSON-ready data."""
    data: dict[str, Any] = _plain(config)
    return data


def config_from_data(data: object) -> Config:
    """The `Config` that `config_to_data` made; ValueError if `data` is not one."""
    config = _typed(Config, data, "config")
    assert isinstance(config, Config)
    return config


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _typed(kind: Any, data: Any, where: str) -> Any:
    """`data` (JSON) as a value of the type `kind`; ValueError naming `where` if not."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return _dataclass(kind, data, where)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _typed(option, data, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {data!r} is none of {kind}")
    if origin is typing.Literal:
        if data in args:
            return data
        raise ValueError(f"{where}: {data!r} is not one of {args}")
    if origin is tuple:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {data!r}")
        kinds = [args[0]] * len(data) if args[-1:] == (Ellipsis,) else list(args)
        if len(kinds) != len(data):
            raise ValueError(f"{where}: expected {len(kinds)} items, got {len(data)}")
        pairs = enumerate(zip(kinds, data, strict=True))
        return tuple(_typed(k, v, f"{where}[{i}]") for i, (k, v) in pairs)
    if origin is Mapping:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        return types.MappingProxyType(
            {k: _typed(args[1], v, f"{where}.{k}") for k, v in data.items()}
        )
    return _scalar(kind, data, where)


def _scalar(kind: Any, data: Any, where: str) -> Any:
    if kind is type(None) and data is None:
        return None
    if kind is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    if kind in (str, int, bool) and type(data) is kind:
        return data
    raise ValueError(f"{where}: {data!r} is not a {getattr(kind, '__name__', kind)}")


def _dataclass(kind: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {data!r}")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    return kind(**{k: _typed(hints[k], v, f"{where}.{k}") for k, v in data.items()})
