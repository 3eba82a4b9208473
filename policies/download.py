"""Local cache for `gs://` checkpoints and assets, laid out exactly as openpi lays out its cache.

openpi downloads a URL `<scheme>://<bucket>/<path>` to `$OPENPI_DATA_HOME/<bucket>/<path>` (default
`~/.cache/openpi`), so a cache filled by openpi (or by hand, e.g. with `gsutil -m cp -r`) is reused here and
the other way round. Local paths pass through untouched.

A download goes to a hidden temporary sibling of the cache entry and is renamed into place only once it is
complete, so an interrupted download never looks like a cached one. Concurrent downloads of the same URL are
serialised with a lock file next to the entry. `gcsfs` is imported only when something must be downloaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OPENPI_DATA_HOME_ENV = "OPENPI_DATA_HOME"
DEFAULT_CACHE_DIR = "~/.cache/openpi"

# Prefix of the hidden work folders next to a cache entry ("." + entry name + this + random suffix).
_PARTIAL_MARK = ".partial-"


class DownloadError(OSError):
    """A remote file or folder could not be fetched into the local cache."""


def cache_dir() -> Path:
    """The cache root: `$OPENPI_DATA_HOME`, else `~/.cache/openpi` (openpi's variable and default).

    Returns an absolute path; it is not created here (a download creates what it needs).
    """
    return Path(os.environ.get(OPENPI_DATA_HOME_ENV, DEFAULT_CACHE_DIR)).expanduser().resolve()


def is_remote(url_or_path: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` URLs, False for local paths."""
    return isinstance(url_or_path, str) and urllib.parse.urlparse(url_or_path).scheme not in ("", "file")


def cache_path(url: str) -> Path:
    """Where `url` lives in the cache: `cache_dir()/<bucket>/<path>`, as openpi's `maybe_download` maps it."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "gs":
        raise ValueError(f"Only gs:// URLs can be downloaded, got {url!r}")
    if not parsed.netloc:
        raise ValueError(f"URL {url!r} names no bucket")
    parts = [part for part in parsed.path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"URL {url!r} contains '.' or '..' components")
    return cache_dir().joinpath(parsed.netloc, *parts)


def maybe_download(url_or_path: str | os.PathLike[str], *, force: bool = False, filesystem: Any = None) -> Path:
    """Returns a local path for `url_or_path`, downloading `gs://` URLs into the cache when not cached yet.

    Args:
        url_or_path: a local path (returned as given, after `~` expansion; it must exist) or a `gs://` URL of a
            file or folder.
        force: download again even if the cache already holds the entry (the old entry is replaced only once
            the new download is complete).
        filesystem: an fsspec filesystem to download with; by default an anonymous `gcsfs.GCSFileSystem`.

    Raises:
        FileNotFoundError: a local path that does not exist.
        DownloadError: the download failed; the message names the URL and the cache path to fill by hand.
    """
    if not is_remote(url_or_path):
        text = os.fspath(url_or_path)
        if text.startswith("file://"):
            text = urllib.parse.urlparse(text).path
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"No such file or directory: {str(path)!r}")
        return path

    url = str(url_or_path)
    local = cache_path(url)
    if local.exists() and not force:
        return local

    local.parent.mkdir(parents=True, exist_ok=True)
    with _lock(local):
        # Another process may have finished the same download while we waited for the lock.
        if local.exists() and not force:
            return local
        _remove_stale_partials(local)
        work = Path(tempfile.mkdtemp(prefix=f".{local.name}{_PARTIAL_MARK}", dir=local.parent))
        try:
            target = work / local.name
            try:
                fs = filesystem if filesystem is not None else _gcs_filesystem()
                remote = url.rstrip("/")
                is_dir = fs.isdir(remote)
                logger.info("Downloading %s to %s", url, local)
                fs.get(remote, str(target), recursive=is_dir)
                if not target.exists():
                    raise FileNotFoundError(f"nothing was found at {url}")
            except Exception as e:  # noqa: BLE001 - every failure gets the same actionable message
                raise DownloadError(_download_failed_message(url, local, e)) from e
            move_into_place(target, local, replace=force)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return local


def _download_failed_message(url: str, local: Path, error: BaseException) -> str:
    return (
        f"Could not download {url} to {local}: {type(error).__name__}: {error}\n"
        f"If this machine cannot reach Google Cloud Storage, download it on another machine "
        f"(e.g. `gsutil -m cp -r {url} .`) and place it at {local} "
        f"(or set {OPENPI_DATA_HOME_ENV} to a folder holding <bucket>/<path>, currently {cache_dir()})."
    )


def _gcs_filesystem() -> Any:
    """An anonymous Google Cloud Storage filesystem (openpi's buckets are public)."""
    import gcsfs  # noqa: PLC0415 - lazy: only downloads need it

    return gcsfs.GCSFileSystem(token="anon")


@contextlib.contextmanager
def _lock(local: Path) -> Iterator[None]:
    """An exclusive lock on `.<name>.lock` next to `local` (no-op where fcntl is unavailable)."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = local.parent / f".{local.name}.lock"
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(local: Path) -> None:
    """Removes work folders left by killed downloads of `local` (callers hold the lock, so none is live)."""
    for stale in local.parent.glob(f".{local.name}{_PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


# --- Atomic placement, shared with checkpoint.save_params. ---

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem or kernel cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def move_into_place(src: Path, dst: Path, *, replace: bool) -> None:
    """Moves the complete `src` to `dst` (same folder) so that `dst` is never seen half-written.

    Without `replace`, an existing `dst` raises FileExistsError. With it, an existing `dst` is swapped with
    `src` in one step where the OS supports it (Linux renameat2), else renamed aside first (a moment without
    `dst`, never a partial one), and the old content is deleted afterwards.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        try:
            # os.rename on a folder fails if dst appeared meanwhile (non-empty) instead of merging into it.
            os.rename(src, dst)
            return
        except OSError:
            if not dst.exists():
                raise
    if not replace:
        raise FileExistsError(f"{dst} already exists")
    if _exchange(src, dst):
        old = src  # after the swap, src holds the previous content
    else:
        old = src.with_name(f"{src.name}.old")
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old, dst)
            raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
