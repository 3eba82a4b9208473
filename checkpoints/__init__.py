"""Artifacts shipped with faster-vla, read with `importlib.resources` so they work from any install."""

from importlib import resources
from pathlib import Path


def path(relative: str) -> Path:
    """Filesystem path of a shipped artifact, e.g. path("pi05_small/tokenizer.model")."""
    return Path(str(resources.files(__name__).joinpath(relative)))
