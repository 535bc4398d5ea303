"""Build dataclasses from plain dicts, strictly: unknown keys and wrong types are errors that
name the full path of the key (and the nearest valid key for a typo)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A user's configuration mistake; the message is one line naming the key and the fix."""


def bounded(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, also: tuple = (), hint: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers (each item, for a list) must lie in a range, checked by
    `build` with the key's path: `lr: float = bounded(3e-4, gt=0)`. `also` lists special values
    allowed outside the range (e.g. -1 for "all"), explained by `hint`."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le, "also": tuple(also), "hint": hint}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def describe_bounds(bounds: dict) -> str:
    lower = (f"> {_fmt(bounds['gt'])}" if bounds["gt"] is not None
             else f">= {_fmt(bounds['ge'])}" if bounds["ge"] is not None else "")
    upper = (f"< {_fmt(bounds['lt'])}" if bounds["lt"] is not None
             else f"<= {_fmt(bounds['le'])}" if bounds["le"] is not None else "")
    rule = " and ".join(r for r in (lower, upper) if r)
    if bounds["also"]:
        special = " or ".join(_fmt(a) for a in bounds["also"])
        rule = f"{special}{' (' + bounds['hint'] + ')' if bounds['hint'] else ''} or {rule}"
    elif bounds["hint"]:
        rule = f"{rule} ({bounds['hint']})"
    return rule


def check_bounds(value: Any, bounds: dict, path: str) -> None:
    """Raise ConfigError unless every number in `value` (None passes) satisfies `bounds`."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_bounds(item, bounds, f"{path}[{i}]")
        return
    if value in bounds["also"]:
        return
    gt, ge, lt, le = (bounds[k] for k in ("gt", "ge", "lt", "le"))
    ok = (math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge)
          and (lt is None or value < lt) and (le is None or value <= le))
    if not ok:
        raise ConfigError(f"{path}={value!r}: must be {describe_bounds(bounds)}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(err)
        # a nested mistake inside the one mapping option that fits is the useful message
        nested = [e for e in errors if not str(e).startswith(f"{path}=")]
        if nested:
            raise nested[0]
        raise ConfigError(f"{path}={value!r}: expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r}: expected null")
    if origin is Literal:
        if value in get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{path}={value!r}: expected one of {_describe(tp)}{hint}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML
            return int(value)
        raise ConfigError(f"{path}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r}: expected a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected {_describe(tp)}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} at {path}")


def build(cls: type, values: Any, path: str):
    """Instantiate dataclass `cls` from `values`, checking every key and type recursively."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}={values!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {path}.{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {path}.{key}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], f"{path}.{name}")
            if "bounds" in f.metadata:
                check_bounds(kwargs[name], f.metadata["bounds"], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {path}.{name} ({_describe(hints[name])})")
    return cls(**kwargs)
