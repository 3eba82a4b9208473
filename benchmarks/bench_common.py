"""What every benchmark script shares: the machine's description and writing its result JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from faster_vla.shared.files import atomic_write


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for the record of where a figure was measured."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_result(path: str | os.PathLike[str], result: Any, indent: int = 2) -> Path:
    """Writes a benchmark's result as JSON (non-JSON values as their str), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(result, indent=indent, default=str) + "\n").encode())
    return path
