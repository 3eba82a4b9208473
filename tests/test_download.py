"""openpi-style gs:// cache: URL → path mapping, cache hits without network, atomic downloads, errors.

No test touches the network: downloads go through a fake fsspec filesystem (an in-memory one that answers
`gs://` paths), injected through `maybe_download(filesystem=...)`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from faster_vla.policies import download


class FakeGCS(MemoryFileSystem):
    """In-memory fsspec filesystem answering gs:// URLs; `fail_after=n` raises after copying n files."""

    def __init__(self, files: dict[str, bytes], fail_after: int | None = None):
        super().__init__(skip_instance_cache=True)
        self.store = {}  # MemoryFileSystem's store is class-wide by default
        self.pseudo_dirs = [""]
        self.pipe(files)
        self.fail_after = fail_after
        self.copied = 0

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("gs://"):
            path = "memory://" + path[len("gs://") :]
        return super()._strip_protocol(path)

    def get_file(self, rpath, lpath, **kwargs):
        if self.fail_after is not None and self.copied >= self.fail_after:
            raise ConnectionError("simulated network failure")
        super().get_file(rpath, lpath, **kwargs)
        self.copied += 1


CKPT_FILES = {
    "gs://bucket/ckpts/run/params/_METADATA": b"{}",
    "gs://bucket/ckpts/run/params/d/0": b"0" * 100,
    "gs://bucket/ckpts/run/params/d/1": b"1" * 100,
    "gs://bucket/ckpts/run/assets/norm_stats.json": b"{}",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OPENPI_DATA_HOME", str(root))
    return root


def _no_gcs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any attempt to reach GCS (or even import gcsfs) fail the test."""

    def forbidden():
        raise AssertionError("the network/gcsfs must not be used")

    monkeypatch.setattr(download, "_gcs_filesystem", forbidden)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` now raises ImportError


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_dir_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENPI_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert download.cache_dir() == tmp_path.resolve() / ".cache" / "openpi"
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "elsewhere"))
    assert download.cache_dir() == (tmp_path / "elsewhere").resolve()


def test_url_maps_to_openpi_cache_layout(cache: Path) -> None:
    # openpi: cache_dir / parsed.netloc / parsed.path.strip("/")
    url = "gs://openpi-assets/checkpoints/pi05_libero"
    assert download.cache_path(url) == cache.resolve() / "openpi-assets" / "checkpoints" / "pi05_libero"
    assert download.cache_path(url + "/") == download.cache_path(url)
    assert download.cache_path(url + "/params") == cache.resolve() / "openpi-assets/checkpoints/pi05_libero/params"
    assert download.cache_path("gs://bucket") == cache.resolve() / "bucket"
    for bad in ("s3://bucket/x", "gs:///x", "gs://bucket/a/../../etc"):
        with pytest.raises(ValueError):
            download.cache_path(bad)


def test_local_path_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gcs(monkeypatch)
    (tmp_path / "ckpt").mkdir()
    assert download.maybe_download(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    assert download.maybe_download(tmp_path / "ckpt") == tmp_path / "ckpt"
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        download.maybe_download(str(missing))


def test_cache_hit_needs_no_network(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gcs(monkeypatch)
    entry = cache / "openpi-assets" / "checkpoints" / "pi05_libero"
    (entry / "params").mkdir(parents=True)
    (entry / "params" / "_METADATA").write_text("{}")
    assert download.maybe_download("gs://openpi-assets/checkpoints/pi05_libero") == entry.resolve()
    # A sub-path of a cached folder is a cache hit too.
    assert download.maybe_download("gs://openpi-assets/checkpoints/pi05_libero/params") == (entry / "params").resolve()


def test_download_folder_and_file(cache: Path) -> None:
    fs = FakeGCS({**CKPT_FILES, "gs://bucket/file.txt": b"hello"})
    local = download.maybe_download("gs://bucket/ckpts/run", filesystem=fs)
    assert local == cache.resolve() / "bucket" / "ckpts" / "run"
    assert _tree(local) == {k.removeprefix("gs://bucket/ckpts/run/"): v for k, v in CKPT_FILES.items()}
    assert download.maybe_download("gs://bucket/file.txt", filesystem=fs).read_bytes() == b"hello"
    # Nothing but the entries and their lock files is left in the cache.
    leftovers = [p.name for p in (cache / "bucket" / "ckpts").iterdir()]
    assert sorted(leftovers) == [".run.lock", "run"]
    # Second call: cache hit, the filesystem is not asked again.
    fs.fail_after = 0
    assert download.maybe_download("gs://bucket/ckpts/run", filesystem=fs) == local


def test_interrupted_download_leaves_no_entry(cache: Path) -> None:
    fs = FakeGCS(CKPT_FILES, fail_after=2)  # two files copied, then the "network" fails
    url = "gs://bucket/ckpts/run"
    with pytest.raises(download.DownloadError) as info:
        download.maybe_download(url, filesystem=fs)
    local = download.cache_path(url)
    assert not local.exists()
    assert fs.copied == 2
    assert [p.name for p in local.parent.iterdir() if not p.name.endswith(".lock")] == []
    # The message names the URL and the cache path, and says how to fill the cache by hand.
    message = str(info.value)
    assert url in message and str(local) in message
    assert "simulated network failure" in message
    assert "place it at" in message and "OPENPI_DATA_HOME" in message
    assert isinstance(info.value.__cause__, ConnectionError)
    # A retry that works produces the complete entry.
    fs.fail_after = None
    assert _tree(download.maybe_download(url, filesystem=fs)) == {
        k.removeprefix(url + "/"): v for k, v in CKPT_FILES.items()
    }


def test_stale_partial_from_killed_download_is_cleaned(cache: Path) -> None:
    url = "gs://bucket/ckpts/run"
    local = download.cache_path(url)
    stale = local.parent / f".{local.name}.partial-dead"
    (stale / "run" / "params").mkdir(parents=True)
    download.maybe_download(url, filesystem=FakeGCS(CKPT_FILES))
    assert local.is_dir() and not stale.exists()


def test_force_redownload_replaces_only_when_complete(cache: Path) -> None:
    url = "gs://bucket/ckpts/run"
    local = download.maybe_download(url, filesystem=FakeGCS(CKPT_FILES))
    before = _tree(local)
    with pytest.raises(download.DownloadError):
        download.maybe_download(url, force=True, filesystem=FakeGCS(CKPT_FILES, fail_after=1))
    assert _tree(local) == before  # the old entry survives a failed refresh
    new_files = {k: b"new" for k in CKPT_FILES}
    download.maybe_download(url, force=True, filesystem=FakeGCS(new_files))
    assert set(_tree(local).values()) == {b"new"}
    assert sorted(p.name for p in local.parent.iterdir()) == [".run.lock", "run"]


def test_missing_remote_object_is_a_download_error(cache: Path) -> None:
    with pytest.raises(download.DownloadError, match="gs://bucket/nothing"):
        download.maybe_download("gs://bucket/nothing", filesystem=FakeGCS(CKPT_FILES))
    assert not download.cache_path("gs://bucket/nothing").exists()


def test_gcsfs_missing_gives_actionable_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    url = "gs://bucket/ckpts/run"
    with pytest.raises(download.DownloadError) as info:
        download.maybe_download(url)
    assert url in str(info.value) and str(download.cache_path(url)) in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_move_into_place_refuses_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange) -> None:
    if not exchange:  # the fallback for systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(download, "_exchange", lambda a, b: False)
    def folder(name: str, content: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "f").write_text(content)
        return path

    dst = folder("dst", "old")
    with pytest.raises(FileExistsError):
        download.move_into_place(folder("new1", "new"), dst, replace=False)
    assert (dst / "f").read_text() == "old"
    download.move_into_place(tmp_path / "new1", dst, replace=True)
    assert (dst / "f").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["dst"]
