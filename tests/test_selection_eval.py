"""benchmarks/selection_eval.py without evaluating: which cells it plans from the grid's folders and records,
and its report (paired McNemar against the base rule, refusal of unpaired cells) from synthetic cells shaped
like `faster-vla eval` reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from compare_runs import mcnemar_p  # noqa: E402
from selection_eval import SelectionEvalArgs, cells, report  # noqa: E402


def _run_folder(root: Path, name: str, n: int) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"selection": {"rule": "faster", "num_candidates": n},
                                                 "env": {"suite": "libero_90", "task": 20, "max_steps": 200}}))
    return run


def _cell(out: Path, kind: str, run: str, rule: str, n: int, wins: str, flops: float, states=None) -> None:
    states = list(range(len(wins))) if states is None else states
    report = {"cell": {"kind": kind, "run": run, "rule": rule, "n": n}, "flops_per_decision": flops,
              "flops_per_decision_by_part": {"prefix": 10, "denoise": 5 * n, "noise_critic": 0, "chunk_critic": 0,
                                             "edit": 0},
              "tasks": {"20": {"acting": {"ms_per_decision": {"total": 3.0 * n}},
                               "episodes": [{"init_state": s, "success": w == "1", "steps": 10}
                                            for s, w in zip(states, wins)]}}}
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "cells" / f"{run}__{rule}_n{n}.json").write_text(json.dumps(report))


def test_cells_come_from_finished_runs_with_their_own_n(tmp_path):
    root, records = tmp_path / "runs", tmp_path / "records"
    records.mkdir()
    for name in ("faster_expo_task20_seed0", "expo_task20_seed0", "base_task20_seed0", "faster_expo_task33_seed0"):
        _run_folder(root, name, n=8)
    for name in ("faster_expo_task20_seed0", "expo_task20_seed0", "base_task20_seed0"):  # task 33: unfinished
        (records / f"{name}.json").write_text("{}")
    args = SelectionEvalArgs(runs_root=root, records=records, rules=("base", "faster"), scaling_n=(1, 4))
    planned = [(c.kind, c.run_dir.name, c.rule, c.n) for c in cells(args)]
    assert planned == [("isolation", "expo_task20_seed0", "base", 1), ("isolation", "expo_task20_seed0", "faster", 8),
                       ("isolation", "faster_expo_task20_seed0", "base", 1),
                       ("isolation", "faster_expo_task20_seed0", "faster", 8),
                       ("scaling", "faster_expo_task20_seed0", "faster", 1),
                       ("scaling", "faster_expo_task20_seed0", "faster", 4),
                       ("scaling", "faster_expo_task20_seed0", "best_of_n", 1),
                       ("scaling", "faster_expo_task20_seed0", "best_of_n", 4)]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cells(SelectionEvalArgs(runs=(tmp_path / "nowhere",), records=records))
    with pytest.raises(ValueError, match="--scaling-n must all be >= 1"):
        SelectionEvalArgs(scaling_n=(0, 2))


def test_report_pairs_every_rule_with_base_on_the_same_states(tmp_path):
    out, run = tmp_path / "sel", "faster_expo_task20_seed0"
    _cell(out, "isolation", run, "base", 1, "1100100000", 1e9)
    _cell(out, "isolation", run, "faster", 8, "1011111100", 1.2e9)  # only base: 1, only faster: 5
    _cell(out, "scaling", run, "best_of_n", 4, "1111000000", 4e9)
    _cell(out, "scaling", run, "best_of_n", 1, "1000000000", 1e9)
    _cell(out, "isolation", run, "best_of_n", 8, "1111110000", 8e9)  # also the curve's N = 8 point
    result = report(SelectionEvalArgs(out=out, trials=10))
    faster = next(r for r in result["isolation"] if r["rule"] == "faster")
    assert faster["successes"] == 7 and faster["vs_base"] == {"only_base": 1, "only_this": 5, "p": mcnemar_p(1, 5)}
    assert "vs_base" not in next(r for r in result["isolation"] if r["rule"] == "base")
    assert [(r["rule"], r["n"]) for r in result["scaling"]] == [("best_of_n", 1), ("best_of_n", 4), ("best_of_n", 8)]
    assert [r["vs_base"]["only_this"] for r in result["scaling"]] == [0, 2, 3]  # paired with base like isolation
    text = (out / "report.md").read_text()
    assert f"| {run} | best_of_n | 8 | 6/10 |" in text.split("## Test-time scaling")[1]
    assert f"| {run} | faster | 8 | 7/10 |" in text and f"1 / 5 ({mcnemar_p(1, 5):.2g})" in text
    assert (out / "scaling.png").stat().st_size > 0

    # A second run of the task on the same 10 states. Per state, faster − base averaged over the two runs:
    # run 1 (base 1100100000, faster 1011111100) and run 2 (base 0000011111, faster 1100011110).
    _cell(out, "isolation", "expo_task20_seed0", "base", 1, "0000011111", 1e9)
    _cell(out, "isolation", "expo_task20_seed0", "faster", 8, "1100011110", 1.2e9)  # only base: 1, only faster: 2
    pooled = {r["rule"]: r for r in report(SelectionEvalArgs(out=out, trials=10))["pooled"]}
    faster = pooled["faster"]
    assert {k: faster[k] for k in ("runs", "successes", "base_successes", "trials", "only_base", "only_this",
                                   "states")} == {"runs": ["expo_task20_seed0", run], "successes": 13,
                                                  "base_successes": 8, "trials": 20, "only_base": 2,
                                                  "only_this": 7, "states": 10}
    gains = [(1 + 0) / 2, (-1 + 1) / 2, (1 + 0) / 2, (1 + 0) / 2, (0 + 0) / 2, (1 + 0) / 2, (1 + 0) / 2,
             (1 + 0) / 2, (0 + 0) / 2, (0 - 1) / 2]
    assert faster["difference"] == pytest.approx(sum(gains) / 10)  # = (7 - 2) / 20
    # A bootstrap mean of state gains lies within their range, and brackets the mean.
    assert -0.5 <= faster["ci95"][0] < faster["difference"] < faster["ci95"][1] <= 0.5
    assert pooled["best_of_n"]["runs"] == [run] and pooled["best_of_n"]["base_successes"] == 3
    assert "| 20 | faster | 2 | 8/20 | 13/20 | 2 / 7 | +25.0 points [" in (out / "report.md").read_text()
    # A second run's curve: its own cells, each paired with its own base, in a table with a run column.
    _cell(out, "scaling", "expo_task20_seed0", "faster", 2, "0100011110", 1.1e9)
    curves = report(SelectionEvalArgs(out=out, trials=10))["scaling"]
    assert [(r["run"], r["rule"], r["n"]) for r in curves] == [
        ("expo_task20_seed0", "faster", 2), ("expo_task20_seed0", "faster", 8),
        (run, "best_of_n", 1), (run, "best_of_n", 4), (run, "best_of_n", 8)]
    assert curves[0]["vs_base"]["only_this"] == 1  # state 1, against expo_task20_seed0's base

    _cell(out, "isolation", run, "idql", 8, "1111111111", 1e10, states=list(range(1, 11)))
    with pytest.raises(ValueError, match="different init states"):
        report(SelectionEvalArgs(out=out, trials=10))
