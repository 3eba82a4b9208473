"""The dependency rule (docs/architecture.md) holds: `lint-imports` checks the contracts in pyproject.toml.

`policies/`, `critics/`, `launch/` and `checkpoints/` sit at the top of the repository but install under
`faster_vla.` (a package-dir mapping), which import-linter's file walk cannot follow; so the check runs on a
copy of the sources laid out as installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("policies", "critics", "launch", "checkpoints")  # top-level folders installed as faster_vla.<name>

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")


def _installed_layout(dest: Path) -> Path:
    """A copy of every .py file of the package at dest/faster_vla/..., the mapped folders inside it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.model", "*.json", "*.md", "*.npz", "*.txt", "pi05_libero_small")
    shutil.copytree(ROOT / "faster_vla", dest / "faster_vla", ignore=ignore)
    for name in MAPPED:
        shutil.copytree(ROOT / name, dest / "faster_vla" / name, ignore=ignore)
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*cmd, str(ROOT / "pyproject.toml")], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=600)


def test_import_contracts_hold(tmp_path):
    result = _lint(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_a_core_module_importing_a_run_breaks_the_contract(tmp_path):
    """The check can fail: the RL core reaching up into the run loop is reported, naming both modules."""
    tree = _installed_layout(tmp_path)
    selection = tree / "faster_vla" / "rl" / "selection.py"
    selection.write_text(selection.read_text() + "\nimport faster_vla.runs.loop  # noqa: E402, F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "faster_vla.rl.selection -> faster_vla.runs.loop" in result.stdout
