"""Shared pytest fixtures, and the `own_process` marker. Golden fixtures live in the steering repo's shared/
folder, next to this repo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

OWN_PROCESS_ENV = "FASTER_VLA_TEST_OWN_PROCESS"  # set in the child that runs an `own_process` test


def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs a test marked `own_process` in a fresh Python process (pytest on that one test) and reports its outcome.

    Why: XLA 0.7.1 (the pinned stack) has aborted or segfaulted while compiling inside a pytest worker that had
    already compiled a few hundred programs of other tests: the ResNet-encoder run of test_train_options, in CI
    and in a one-process replay of that worker's 186 tests, each time in `backend_compile_and_load` during the
    resumed run. Alone, and on jax 0.11.2, the same test passes. A fresh process is what a user's run is.
    """
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(OWN_PROCESS_ENV):
        return None  # the usual call
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
           "--no-header", "-rfEs", pyfuncitem.nodeid]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, **{OWN_PROCESS_ENV: "1"}), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.fail(f"{pyfuncitem.nodeid} failed in its own process (exit {proc.returncode}):\n"
                    f"{(proc.stdout + proc.stderr)[-6000:]}", pytrace=False)
    if " passed" not in proc.stdout:
        if " skipped" in proc.stdout:
            reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
            pytest.skip(f"in its own process: {reasons[-1] if reasons else proc.stdout[-500:]}")
        pytest.fail(f"{pyfuncitem.nodeid} did not pass in its own process:\n{proc.stdout[-3000:]}", pytrace=False)
    return True


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
