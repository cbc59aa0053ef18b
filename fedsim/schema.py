"""Schema helpers every plug-in uses: `knob` declares a config field with its constraints, `build_config` checks a
config node against a dataclass of knobs (key, type, range), `plain` turns OmegaConf containers into plain Python.

Core layer: imports nothing of fedsim but its errors, so data, models, attacks, defenses, the federation and the
runtimes all build their configs with it.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from fedsim.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def knob(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with range/choice constraints checked by `build_config`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; returns the value converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, value, " or ".join(_type_name(a) for a in args))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list ({_type_name(tp)})")
        item = args[0] if args else Any
        items = [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    return value


def check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(str(c) for c in choices))
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, (compare, sign) in _BOUNDS.items():
        bound = meta.get(name)
        if bound is not None and not compare(value, bound):
            raise ConfigError(key, value, f"a number {sign} {bound}")


def build_config(cls: type[T], node: Any, prefix: str, *, ignore: tuple[str, ...] = ()) -> T:
    """Build the dataclass `cls` from a config node, checking keys, types and ranges.

    `prefix` is the dotted config path of the node (for error messages); keys in `ignore` are skipped.
    """
    values = plain(node) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(prefix, values, "a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in ignore:
            continue
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            allowed = ", ".join(sorted(n for n in fields if n not in ignore))
            raise ConfigError(key, value, f"a known key of {prefix or 'the config'} ({allowed})")
        converted = coerce(key, value, hints[name])
        check_range(key, converted, fields[name].metadata)
        kwargs[name] = converted
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ConfigError(f"{prefix}.{name}" if prefix else name, None, "a value (this key is required)")
    return cls(**kwargs)


def knobs_of(cls: type) -> dict[str, dict[str, Any]]:
    """The knobs of a config dataclass with default and help text (for docs and `fedsim --help`)."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)  # type: ignore[misc]
        out[f.name] = {"default": default, "help": f.metadata.get("help", "")}
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict, for writing into results."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
