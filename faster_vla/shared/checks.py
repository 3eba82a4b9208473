"""The one non-finite check for training metrics: a NaN or Inf stops a run with a message saying where and
what to do, before anything built on it (an update, a checkpoint) is kept."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


class NonFiniteLossError(FloatingPointError):
    """An update produced a NaN or Inf; the run stops and keeps its last good checkpoint."""


def raise_if_non_finite(infos: Mapping[str, float] | Iterable[Mapping[str, float]], what: str, hint: str) -> None:
    """Raises NonFiniteLossError naming `what` (e.g. 'update 12'), the non-finite metric names, and `hint`,
    if any value of `infos` (one metrics mapping, or several) is NaN or Inf."""
    records = [infos] if isinstance(infos, Mapping) else list(infos)
    bad = sorted({k for record in records for k, v in record.items() if not math.isfinite(float(v))})
    if bad:
        raise NonFiniteLossError(f"{what} produced non-finite {bad}: {hint}")
