"""Dataclass configs and counters <-> plain JSON (run configs, checkpoint metadata, bundle manifests), and a
readable diff of two JSON values for mismatch errors."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np


def to_jsonable(obj: Any, *, strict: bool = True, _where: str = "value") -> Any:
    """Dataclasses (nested), mappings, sequences, numpy/jax scalars and arrays, paths and enums -> plain JSON
    types. `strict=False` writes anything else as its repr (fine for a config record); `strict=True` raises
    TypeError instead (for data that must round-trip exactly, e.g. checkpoint counters)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), strict=strict, _where=f"{_where}.{f.name}")
                for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                if strict:
                    raise TypeError(f"{_where} has a non-string key {k!r}; JSON keys must be strings")
                k = str(k)
            out[k] = to_jsonable(v, strict=strict, _where=f"{_where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, strict=strict, _where=f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, strict=strict, _where=_where)
    if isinstance(obj, np.generic) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")):
        arr = np.asarray(obj)
        if arr.dtype.kind in "biuf":
            return arr.item() if arr.ndim == 0 else arr.tolist()
    if strict:
        raise TypeError(f"{_where} is a {type(obj).__name__}, which has no exact JSON form; pass numbers, "
                        "strings, bools, None, lists or dicts of them")
    return repr(obj)


def from_jsonable(cls: Any, data: Any) -> Any:
    """Rebuilds a (nested, frozen) dataclass from its `to_jsonable` form (a run's config.json)."""
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        fields = {f.name: from_jsonable(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
        return cls(**fields)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        for arg in typing.get_args(cls):
            if arg is type(None):
                continue
            try:
                return from_jsonable(arg, data)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"{data!r} fits none of {cls}")
    if origin is tuple:
        args = typing.get_args(cls)
        inner = args[0] if args else Any
        return tuple(from_jsonable(inner, x) for x in data)
    if origin is Literal or cls is Any:
        return data
    if cls is Path:
        return Path(data)
    if cls in (int, float, str, bool):
        if cls is int and isinstance(data, str) and not data.lstrip("-").isdigit():
            raise ValueError(f"{data!r} is not an int")
        return cls(data)
    return data


def json_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, each as 'path: old -> new' (for clear mismatch errors)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys()):
            path = f"{prefix}.{k}" if prefix else k
            if k not in new:
                out.append(f"{path}: {old[k]!r} -> (absent)")
            elif k not in old:
                out.append(f"{path}: (absent) -> {new[k]!r}")
            else:
                out += json_diff(old[k], new[k], path)
        return out
    if old != new and not (_is_nan(old) and _is_nan(new)):
        return [f"{prefix or '(root)'}: {old!r} -> {new!r}"]
    return []


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)
