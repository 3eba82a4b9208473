"""Shared pytest fixtures. Golden fixtures live in the steering repo's shared/ folder, next to this repo."""

import gc
from pathlib import Path

import pytest


def memory_map_count() -> int:
    """Memory regions this process has mapped (lines of /proc/self/maps); 0 where there is no /proc."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def release_compiled_programs() -> None:
    """Drops every executable jax has cached (`jax.clear_caches`) and collects what held them.

    Why: XLA:CPU maps about 3 memory regions per loaded executable and unmaps them only when the executable is
    freed, while jax's jit caches keep every executable alive for the life of the process. A pytest worker that
    ran a few hundred tests held ~58,000 regions (measured in a one-process replay of a CI worker's 187 tests),
    close to Linux's default `vm.max_map_count` of 65,530; past it the next mmap fails and XLA 0.7.1 aborted or
    segfaulted inside `backend_compile_and_load` (CI, stops 21 and 22, a different test each time). A user's
    run compiles its few programs once and stays far below the limit; a test process compiles thousands.
    """
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs_after_each_module():
    """After each test module, its compiled programs are released (see `release_compiled_programs`): tests in
    one module share their programs; later modules recompile what they need."""
    yield
    release_compiled_programs()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared not found: golden fixtures come from the steering repo's shared/ folder")
    return path


@pytest.fixture(scope="session")
def openpi_fixtures(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "openpi_pi05"


@pytest.fixture(scope="session")
def goldens(openpi_fixtures: Path) -> dict:
    """openpi's pure-function goldens (misc_goldens.npz), every array by its key."""
    import numpy as np

    with np.load(openpi_fixtures / "misc_goldens.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def libero_installed() -> None:
    """Skips a test where the LIBERO extra is missing or unusable (pip install -e '.[libero]')."""
    from faster_vla.libero import env as libero_env

    try:
        libero_env.check_libero_installed()
    except ImportError as exc:
        pytest.skip(f"LIBERO extra not usable here: {exc}")
