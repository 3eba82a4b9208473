"""Shared pytest fixtures. Golden fixtures live in the steering repo's shared/ folder, next to this repo."""

from pathlib import Path

import pytest


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
