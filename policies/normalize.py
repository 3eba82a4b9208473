"""openpi's normalisation statistics: the norm_stats.json format and the (un)normalisation formulas.

File layout (openpi's `normalize.save`, a pydantic dump with indent 2):
    {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, "actions": {...}}}
q01/q99 may be null or absent. Loaded arrays are float64 (as in openpi), so normalising float32 data gives
float64, exactly as openpi computes it (this matters for the state bins of the discrete-state prompt).

Dimension mismatches follow openpi (d = len(stats), D = x.shape[-1]):
- normalise: stats are cut to D (d >= D is needed; openpi fails with a broadcast error when d < D);
- unnormalise quantile: if d < D only the first d dims are unnormalised, the rest pass through unchanged;
- unnormalise z-score: mean is padded with 0 and std with 1, so dims past d become x * (1 + 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

NORM_STATS_FILENAME = "norm_stats.json"
_EPS = 1e-6


def _frozen_array(value: object, name: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)  # copy, so callers cannot alter the stats afterwards
    if arr.ndim != 1:
        raise ValueError(f"NormStats.{name} must be 1-D, got shape {arr.shape}")
    arr.flags.writeable = False
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics of one data key (state or actions): float64[d] arrays, q01/q99 optional."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None  # 1st percentile
    q99: np.ndarray | None = None  # 99th percentile

    def __post_init__(self) -> None:
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is None:
                if name in ("mean", "std"):
                    raise ValueError(f"NormStats.{name} is required")
                continue
            object.__setattr__(self, name, _frozen_array(value, name))
        if self.mean.shape != self.std.shape:
            raise ValueError(f"NormStats mean and std differ in shape: {self.mean.shape} vs {self.std.shape}")
        if (self.q01 is None) != (self.q99 is None):
            raise ValueError("NormStats needs both q01 and q99, or neither")
        if self.q01 is not None and self.q01.shape != self.q99.shape:
            raise ValueError(f"NormStats q01 and q99 differ in shape: {self.q01.shape} vs {self.q99.shape}")

    @property
    def has_quantiles(self) -> bool:
        return self.q01 is not None and self.q99 is not None


def _norm_stats_path(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    return path / NORM_STATS_FILENAME if path.is_dir() else path


def load_norm_stats(path_or_dir: str | Path) -> dict[str, NormStats]:
    """Reads openpi's norm_stats.json (the file itself, or a directory holding it) into {key: NormStats}."""
    path = _norm_stats_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"norm stats file not found at {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or "norm_stats" not in raw:
        raise ValueError(f"{path} is missing the top-level key 'norm_stats'")
    entries = raw["norm_stats"]
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: 'norm_stats' must map keys to statistics, got {type(entries).__name__}")

    stats: dict[str, NormStats] = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: norm_stats[{key!r}] must be an object, got {type(entry).__name__}")
        for required in ("mean", "std"):
            if entry.get(required) is None:
                raise ValueError(f"{path}: norm_stats[{key!r}] is missing the key {required!r}")
        try:
            stats[key] = NormStats(
                mean=entry["mean"], std=entry["std"], q01=entry.get("q01"), q99=entry.get("q99")
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: norm_stats[{key!r}] is invalid: {exc}") from exc
    return stats


def _to_list(arr: np.ndarray | None) -> list[float] | None:
    if arr is None:
        return None
    values = arr.tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("norm stats must be finite to be written as JSON")
    return values


def save_norm_stats(directory: str | Path, stats: Mapping[str, NormStats]) -> Path:
    """Writes {key: NormStats} as directory/norm_stats.json in openpi's format, atomically; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "norm_stats": {
            key: {
                "mean": _to_list(s.mean),
                "std": _to_list(s.std),
                "q01": _to_list(s.q01),
                "q99": _to_list(s.q99),
            }
            for key, s in stats.items()
        }
    }
    path = directory / NORM_STATS_FILENAME
    fd, tmp_name = tempfile.mkstemp(prefix=f".{NORM_STATS_FILENAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _cut_to(x: np.ndarray, stat: np.ndarray, name: str) -> np.ndarray:
    """stat[d] -> stat[:D]; openpi cannot normalise dims it has no statistics for."""
    dim = x.shape[-1]
    if stat.shape[-1] < dim:
        raise ValueError(f"cannot normalise {dim} dims with {stat.shape[-1]}-dim {name} statistics")
    return stat[..., :dim]


def _require_quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if not stats.has_quantiles:
        raise ValueError("quantile normalisation needs q01 and q99 in the norm stats")
    return stats.q01, stats.q99  # type: ignore[return-value]


def normalize_quantile(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """x[..., D] -> (x - q01) / (q99 - q01 + 1e-6) * 2 - 1, mapping [q01, q99] to about [-1, 1]."""
    x = np.asarray(x)
    q01, q99 = _require_quantiles(stats)
    q01, q99 = _cut_to(x, q01, "q01"), _cut_to(x, q99, "q99")
    return (x - q01) / (q99 - q01 + _EPS) * 2.0 - 1.0


def unnormalize_quantile(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """Inverse of normalize_quantile on the first len(stats) dims of x[..., D]; later dims pass through."""
    x = np.asarray(x)
    q01, q99 = _require_quantiles(stats)
    dim = q01.shape[-1]
    if dim > x.shape[-1]:
        raise ValueError(f"cannot unnormalise {x.shape[-1]} dims with {dim}-dim quantile statistics")
    if dim < x.shape[-1]:
        head = (x[..., :dim] + 1.0) / 2.0 * (q99 - q01 + _EPS) + q01
        return np.concatenate([head, x[..., dim:]], axis=-1)
    return (x + 1.0) / 2.0 * (q99 - q01 + _EPS) + q01


def normalize_zscore(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """x[..., D] -> (x - mean) / (std + 1e-6) (openpi's default, non-quantile normalisation)."""
    x = np.asarray(x)
    mean, std = _cut_to(x, stats.mean, "mean"), _cut_to(x, stats.std, "std")
    return (x - mean) / (std + _EPS)


def unnormalize_zscore(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """x[..., D] -> x * (std + 1e-6) + mean, with mean padded by 0 and std by 1 past len(stats) (as openpi)."""
    x = np.asarray(x)
    dim, target = stats.mean.shape[-1], x.shape[-1]
    if dim > target:
        raise ValueError(f"cannot unnormalise {target} dims with {dim}-dim mean/std statistics")
    mean = np.pad(stats.mean, (0, target - dim), constant_values=0.0)
    std = np.pad(stats.std, (0, target - dim), constant_values=1.0)
    return x * (std + _EPS) + mean
