"""benchmarks/device_check.py: the rehearsal (every section, tiny configurations, CPU) runs clean, so the one
device call cannot fail on a typo; and it runs without the packages the device image lacks."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
# In the project's dependencies but not on the H200 image (docs/benchmarks.md): the check must not import them.
MISSING_ON_DEVICE = ("tyro", "wandb", "gcsfs")
NUMBERS = ("median_s", "p90_s", "min_s", "first_call_s", "relative_error", "decisions_per_s",
           "server_infer_median_s")


def _load_module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rehearsal(openpi_fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    # Run as the device would: the modules it lacks made unimportable (None in sys.modules raises ImportError),
    # and faster_vla not installed (this venv's editable-install finder removed), as in a bare carried checkout.
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({MISSING_ON_DEVICE!r})); "
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
            f"sys.argv = [{str(SCRIPT)!r}, '--rehearse', '--out', {str(out)!r}, '--fixtures', "
            f"{str(openpi_fixtures)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800)
    return proc, out


def test_rehearsal_runs_every_section_with_finite_numbers(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "device_check.json").read_text())
    module = _load_module()
    assert result["rehearse"] is True
    assert set(result["sections"]) == set(module.SECTIONS), sorted(result["sections"])
    for name, section in result["sections"].items():
        assert "error" not in section, f"section {name} failed:\n{section.get('error')}"
        assert section["rows"], f"section {name} measured nothing"
        for row in section["rows"]:
            assert "skipped" not in row, f"{name}: {row}"  # a rehearsal has no time budget
            found = [k for k in NUMBERS if k in row]
            assert found, f"{name}: row {row['name']!r} carries no figure"
            for key in found:
                assert math.isfinite(row[key]) and row[key] >= 0, f"{name}: {row['name']!r} {key} = {row[key]}"
            if "times_s" in row:
                assert len(row["times_s"]) == row["n"] >= 1
    assert all(row["passed"] for row in result["sections"]["parity"]["rows"])
    assert {row["dtype"] for row in result["sections"]["parity"]["rows"]} == {"float32", "bfloat16"}
    decisions = [row["name"] for row in result["sections"]["decisions"]["rows"]]
    assert [d.split(" ")[0] for d in decisions] == ["base", "FASTER-EXPO", "EXPO,", "EXPO,"]
    assert [row["batch"] for row in result["sections"]["batched"]["rows"]] == list(result["plan"]["batch_sizes"])
    # The table is written and printed last.
    table = (out / "device_check.md").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())
    assert table.count("\n| ") >= sum(len(s["rows"]) for s in result["sections"].values())


def test_budget_skips_rows_instead_of_estimating_them():
    module = _load_module()
    assert module.Budget(None).skip("anything") is None
    row = module.Budget(0).skip("denoise N=64")
    assert row["name"] == "denoise N=64" and "time budget" in row["skipped"]
    assert "median_s" not in row  # nothing stands in for a measurement


def test_missing_fixtures_name_the_files_and_the_prepare_step(tmp_path):
    module = _load_module()
    with pytest.raises(FileNotFoundError, match=r"tiny_a_params\.npz.*prepare_device_check\.sh"):
        module.fixtures_dir(str(tmp_path))
