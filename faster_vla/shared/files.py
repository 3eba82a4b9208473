"""File helpers every layer shares: a writable folder checked before expensive work, atomic replacement
(readers never see half a file, whenever the writer dies), and self-describing .npz archives whose JSON
metadata names their format and version (replay, success buffer)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "run folder") -> Path:
    """Creates `path` if needed and proves it writable by creating a file in it; raises PermissionError
    saying what to do otherwise. Done up front so that a bad path fails before any expensive work."""
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"cannot write the {what} {str(path)!r} ({type(exc).__name__}: {exc}); choose a writable folder "
            "or fix its permissions"
        ) from exc
    return path


NPZ_META_KEY = "__meta__"


def read_npz_meta(path: str | os.PathLike[str], *, fmt: str, version: int, what: str,
                  error: type[Exception]) -> tuple[np.lib.npyio.NpzFile, dict[str, Any]]:
    """Opens an .npz whose JSON metadata sits in its `__meta__` entry (how our buffers save themselves) and
    checks its format and version; returns the open archive (close it, e.g. `with data:`) and the metadata.
    Anything else raises `error` naming the file and what it is not."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not a faster_vla {what} file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise error(f"{path}: not a faster_vla {what} file (a bare array, not an .npz archive)")
    try:
        if NPZ_META_KEY not in data.files:
            raise error(f"{path}: not a faster_vla {what} file (no {NPZ_META_KEY} entry)")
        try:
            meta = json.loads(bytes(data[NPZ_META_KEY]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise error(f"{path}: unreadable {what} metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != fmt:
            raise error(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r} is not {fmt!r}")
        if meta.get("version") != version:
            raise error(f"{path}: {what} format version {meta.get('version')!r}; this faster_vla reads version "
                        f"{version} only (written by another faster_vla version)")
    except BaseException:
        data.close()
        raise
    return data, meta


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Replaces `path` with `data` in one step (temp file in the same folder, fsync, os.replace): readers see
    the old content or the new, never a mix, whenever the writer dies. `data` is the bytes, or a function
    that writes them to the open file (large payloads, e.g. a replay buffer, are streamed, not copied)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
