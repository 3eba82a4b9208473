"""benchmarks/reproduce*.py without training: records written by the runner's own writer from small synthetic
runs, the report regenerated from them alone, its paired statistics against hand-computed values, and clear
errors for missing, partial, damaged and unpaired records; plus the committed report against its records."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from faster_vla.runs.evaluate import wilson_interval  # noqa: E402
from faster_vla.runs.loop import episode_init_state  # noqa: E402
from faster_vla.shared.jsonable import to_jsonable  # noqa: E402
from reproduce import RULES, Method, ReproduceArgs, check_records, grid, main  # noqa: E402
from reproduce_report import (REPORT_FILE, REPORT_JSON, ReportSettings, median_episode_wall_per_step,  # noqa: E402
                              paired_difference, read_record, render)
from reproduce_run import LOCK_FILE, dump_record, make_record, run_job  # noqa: E402

# Training outcomes per (method, seed) over 8 episodes; the report's late episodes are 5-8.
OUTCOMES = {
    "base": {0: "10100000", 1: "01000000", 2: "00100000"},
    "expo": {0: "10101111", 1: "01001100", 2: "00100000"},
    "faster_expo": {0: "10101111", 1: "01001111", 2: "00101100"},
}
FINAL = {"base": "10", "expo": "11", "faster_expo": "11"}  # final eval on init states 0, 1, every seed


def _args(tmp_path: Path, **overrides) -> ReproduceArgs:
    fields = dict(out=tmp_path / "runs", records=tmp_path / "records", report_dir=tmp_path / "report", tasks=(20,),
                  ablations=(), episodes=8, eval_episodes=2, report_only=True,
                  report=ReportSettings(block=4, late_from=5))
    return ReproduceArgs(**{**fields, **overrides})


def _write_records(args: ReproduceArgs, outcomes_by_task: dict[int, dict] | None = None) -> None:
    """Each run as reproduce_run writes it: a metrics.jsonl in the run folder, then make_record and dump_record.

    Runs take their outcomes from `outcomes_by_task[task]` where given, else from OUTCOMES."""
    args.records.mkdir(parents=True, exist_ok=True)
    for spec in grid(args):
        table = (outcomes_by_task or {}).get(spec.task, OUTCOMES)
        outcomes = [int(c) for c in table[spec.method][spec.seed]]
        spec.config.run_dir.mkdir(parents=True)
        # FASTER-EXPO (on either windows) acts at half EXPO's FLOPs and seconds; its run takes 72 s of wall time
        # against 90: episodes of 6 s and a last one of 30 s (the machine busy), against 10 s and a last of 20 s.
        faster = spec.method.startswith("faster_expo")
        episode_s = [6.0] * 7 + [30.0] if faster else [10.0] * 7 + [20.0]
        lines = []
        for e, success in enumerate(outcomes, start=1):
            lines.append(json.dumps({"step": e, "logged_at": 1.0, "episodes": e, "env_steps": 100 * e,
                                     "flops": 1e9 * e, "train/success": float(success), "time_ms/act": 3.0,
                                     "wall_s": sum(episode_s[:e]),
                                     "train/init_state": episode_init_state(spec.seed, e - 1, 50)}))
        (spec.config.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        counters = {"episodes": 8, "env_steps": 800, "successes": sum(outcomes),
                    "acting_flops": 2e9 if faster else 4e9, "cache_flops": 3e9, "update_flops": 1e9,
                    "actor_update_flops": 0.0, "wall_s": 72.0 if faster else 90.0,
                    "time_s": {"acting": 12.0 if faster else 24.0, "physics": 20.0, "rendering": 30.0, "reset": 10.0,
                               "cache": 1.0, "update": 5.0}}
        job = {"name": spec.name, "method": spec.method, "task": spec.task, "seed": spec.seed, "command": "test",
               "config": to_jsonable(spec.config, strict=False)}
        final = [{"init_state": i, "success": c == "1", "steps": 50} for i, c in enumerate(FINAL.get(spec.method, "11"))]
        record = make_record(job, spec.config, counters, final)
        (args.records / f"{spec.name}.json").write_text(dump_record(record))


def test_episode_init_states_depend_on_seed_and_episode_only():
    first = [episode_init_state(0, e, 50) for e in range(20)]
    assert first == [episode_init_state(0, e, 50) for e in range(20)]
    assert first != [episode_init_state(1, e, 50) for e in range(20)]
    assert all(0 <= s < 50 for s in first)


def test_report_is_regenerated_identically_with_the_hand_computed_statistics(tmp_path):
    args = _args(tmp_path)
    _write_records(args)
    text = main(args)
    assert (args.report_dir / REPORT_FILE).read_text() == text
    assert main(dataclasses.replace(args, report_dir=tmp_path / "again")) == text
    for name in ("task20_success_vs_episodes.png", "task20_success_vs_flops.png"):
        assert (args.report_dir / name).stat().st_size > 0
    assert "Records: 9 complete of 9 expected." in text
    # A record keeps metrics.jsonl's rows but not its timings.
    record = json.loads((args.records / "base_task20_seed0.json").read_text())
    assert "time_ms/act" not in record["metric_columns"] and len(record["metric_rows"]) == 8

    verdicts = {r["claim"]: r for r in json.loads((args.report_dir / REPORT_JSON).read_text())["verdicts"]}
    # Late episodes: base never succeeds; EXPO wins 4 + 2 + 0 pairs, FASTER-EXPO 4 + 4 + 2.
    assert (verdicts["expo > base"]["only_base"], verdicts["expo > base"]["only_method"]) == (0, 6)
    assert verdicts["expo > base"]["p"] == pytest.approx(0.03125)  # 2 · 0.5^6
    assert verdicts["faster_expo > base"]["p"] == pytest.approx(2 / 2**10)
    assert verdicts["faster_expo > base"]["verdict"].startswith("shown")
    # FASTER-EXPO − EXPO over the 12 late pairs: 10/12 − 6/12; its interval excludes 0, so "≈" is not shown.
    equal = verdicts["faster_expo ≈ expo"]
    assert equal["difference"] == pytest.approx(4 / 12) and equal["ci95"][0] > 0
    assert equal["verdict"] == "not shown as equal: FASTER-EXPO is above EXPO"
    # Seed by seed (late episodes): EXPO 1111, 1100, 0000 against FASTER-EXPO 1111, 1111, 1100.
    assert [(s["seed"], s["pairs"]) for s in equal["per_seed"]] == [(0, 4), (1, 4), (2, 4)]
    assert [s["difference"] for s in equal["per_seed"]] == pytest.approx([0.0, 0.5, 0.5])
    lo, hi = paired_difference(np.array([1, 1, 0, 0], bool), np.array([1, 1, 1, 1], bool))[1:]
    assert equal["per_seed"][1]["ci95"] == pytest.approx([lo, hi])
    row = next(line for line in text.splitlines() if line.startswith("| 20 | FASTER-EXPO ≈ EXPO | +0.0 ["))
    assert row.count("| +50.0 [") == 2 and "| seed 0 | seed 1 | seed 2 |" in text
    assert [s["difference"] for s in verdicts["expo > base"]["per_seed"]] == pytest.approx([1.0, 0.5, 0.0])
    # Block 1-4 of EXPO against base: identical outcomes, no discordant pair.
    assert "| 1–4 | EXPO | 3 | 4/12 (33 %) | 0 vs 0 (1) | – |" in text
    assert "| 5–8 | FASTER-EXPO | 3 | 10/12 (83 %) | 0 vs 10 (0.002) | 0 vs 4 (0.12) |" in text
    # Final eval: base 1 of 2 in each seed, 3/6 pooled; Wilson(3, 6) = 0.188..0.812 by hand.
    assert "| base π0.5 | 3 | 1/2, 1/2, 1/2 | 3/6 (50 %) | 19 %–81 % |" in text
    assert wilson_interval(3, 6) == pytest.approx((0.18761, 0.81239), abs=1e-4)
    # Compute: 72 s of wall time, of which 12 s acting, 60 s in the simulator, 6 s cache and updates.
    assert ("| faster_expo_task20_seed2 | 8 | 800 | 2e+09 | 3e+09 | 1e+09 | 6e+09 | 1.2 min | 0.2 / 1.0 / 0.1 min |"
            in text)
    # Over EXPO's run of the same seed: 6e9 / 8e9 FLOPs, 2e9 / 4e9 acting FLOPs, 12 / 24 acting s, 72 / 90 s wall,
    # and the median episode's 6 / 10 s per 100 env steps: its busy last episode moves the total, not the median.
    assert ("| 20 | FASTER-EXPO | 3 | 0.75× (0.75–0.75) | 0.50× (0.50–0.50) | 0.50× (0.50–0.50) | 0.80× (0.80–0.80) "
            "| 0.60× (0.60–0.60) |" in text)
    (ratios,) = json.loads((args.report_dir / REPORT_JSON).read_text())["cost_vs_expo"]
    assert ratios["total FLOPs"]["mean"] == pytest.approx(0.75) and ratios["wall time"]["max"] == pytest.approx(0.8)
    assert ratios["wall s per env step, median episode"]["mean"] == pytest.approx(0.6)
    # A record without per-episode wall times (NaN in `Run.wall_s`) has no median, so cost_ratios writes "–".
    run = read_record(args.records / "faster_expo_task20_seed0.json")
    assert median_episode_wall_per_step(run) == pytest.approx(0.06)
    assert math.isnan(median_episode_wall_per_step(dataclasses.replace(run, wall_s=np.full(8, math.nan))))


def test_pooled_verdict_is_mixed_when_the_tasks_disagree(tmp_path):
    # Task 33: FASTER-EXPO does exactly what the base policy does; EXPO learns as on task 20.
    task33 = {**OUTCOMES, "faster_expo": OUTCOMES["base"]}
    args = _args(tmp_path, tasks=(20, 33))
    _write_records(args, {33: task33})
    main(args)
    rows = json.loads((args.report_dir / REPORT_JSON).read_text())["verdicts"]
    kinds = {(r["tasks"], r["claim"]): r["kind"] for r in rows}
    assert kinds[(20, "faster_expo > base")] == "shown" and kinds[(33, "faster_expo > base")] == "not shown"
    # Pooled, FASTER-EXPO still wins 10 pairs to 0 (p < 0.05), but on one task only: the row must not say shown.
    pooled = next(r for r in rows if r["tasks"] == "all" and r["claim"] == "faster_expo > base")
    assert pooled["p"] < 0.05 and pooled["kind"] == "mixed"
    assert pooled["verdict"] == "mixed: the tasks disagree (20: shown, 33: not shown); read them apart"
    assert pooled["per_seed"] == []  # seed s of task 20 and of task 33 are unrelated runs: no pooled seed column
    # Task 33's FASTER-EXPO is below EXPO, task 20's above it: the pooled "≈" is mixed too.
    assert (kinds[(20, "faster_expo ≈ expo")], kinds[(33, "faster_expo ≈ expo")]) == ("above", "no")
    assert kinds[("all", "faster_expo ≈ expo")] == "mixed"
    # Where the tasks agree, the pooled verdict stands.
    assert kinds[(20, "expo > base")] == kinds[(33, "expo > base")] == kinds[("all", "expo > base")] == "shown"


def test_every_window_pairs_train_on_every_step_and_are_judged_against_chunk_windows(tmp_path):
    args = _args(tmp_path, methods=("base", "expo", "faster_expo"),
                 ablations=("faster_expo_every_window", "expo_every_window"), ablation_tasks=(20,))
    specs = {s.name: s.config for s in grid(args)}
    for method in ("faster_expo", "expo"):
        every, chunk = specs[f"{method}_every_window_task20_seed0"], specs[f"{method}_task20_seed0"]
        assert (every.window_starts, every.env.render_mode) == ("step", "every_step")
        assert (chunk.window_starts, chunk.env.render_mode) == ("chunk", "chunk_boundary")
        assert every.selection == chunk.selection and every.cache_seeds == chunk.cache_seeds  # only the windows differ
    # Every window: FASTER-EXPO's late outcomes, but seed 2 loses its two late wins (10 of 12 -> 8 of 12);
    # EXPO's are EXPO's with one more late win on seed 1 (6 of 12 -> 7 of 12).
    outcomes = {**OUTCOMES, "faster_expo_every_window": {**OUTCOMES["faster_expo"], 2: "00100000"},
                "expo_every_window": {**OUTCOMES["expo"], 1: "01001110"}}
    _write_records(args, {20: outcomes})
    text = main(args)
    verdicts = {r["claim"]: r for r in json.loads((args.report_dir / REPORT_JSON).read_text())["verdicts"]}
    pair = verdicts["faster_expo_every_window ≈ faster_expo"]
    assert pair["difference"] == pytest.approx(-2 / 12) and pair["pairs"] == 12
    # Newcombe's interval for 2 discordant pairs of 12, both lost: about [-39, +5] points, past the -10 margin.
    assert pair["ci95"][0] < -0.1 < 0 < pair["ci95"][1] and pair["kind"] == "not shown"
    assert verdicts["faster_expo_every_window > base"]["only_method"] == 8
    assert "| FASTER-EXPO, every window ≈ FASTER-EXPO | FASTER-EXPO, every window − FASTER-EXPO = -16.7 points" in text
    # The paper's claim between the two every-window runs: seed 1's last episode is FASTER-EXPO's win alone.
    claim = verdicts["faster_expo_every_window ≈ expo_every_window"]
    assert claim["difference"] == pytest.approx(1 / 12) and claim["pairs"] == 12
    same = verdicts["expo_every_window ≈ expo"]
    assert same["difference"] == pytest.approx(1 / 12) and same["ci95"][0] < 0 < same["ci95"][1]
    assert verdicts["expo_every_window > base"]["only_method"] == 7
    # Cost: every-window FASTER-EXPO over chunk-window EXPO, and over EXPO on the same (every) windows.
    rows = json.loads((args.report_dir / REPORT_JSON).read_text())["cost_vs_expo"]
    costs = {(r["method"], r["reference"]): r for r in rows}
    assert set(costs) == {("faster_expo", "expo"), ("faster_expo_every_window", "expo"), ("expo_every_window", "expo"),
                          ("faster_expo_every_window", "expo_every_window")}
    assert costs["faster_expo_every_window", "expo_every_window"]["total FLOPs"]["mean"] == pytest.approx(0.75)
    assert ("| 20 | FASTER-EXPO, every window over EXPO, every window | 3 | 0.75× (0.75–0.75) | "
            "0.50× (0.50–0.50) | 0.50× (0.50–0.50) | 0.80× (0.80–0.80) |" in text)


def test_every_window_ablations_keep_their_rule_and_are_costed_against_expo_on_every_window(tmp_path):
    assert set(typing.get_args(Method)) == set(RULES)  # every method the CLI takes has a rule, and no other
    args = _args(tmp_path, methods=("base", "expo"), ablations=("faster_idql", "expo_n1", "expo_every_window",
                                                                "faster_idql_every_window", "expo_n1_every_window"),
                 ablation_tasks=(20,), seeds=(0, 1))
    specs = {s.name: s.config for s in grid(args)}
    for method, rule, n in (("faster_idql", "faster_idql", 8), ("expo_n1", "best_of_n", 1)):
        every, chunk = specs[f"{method}_every_window_task20_seed0"], specs[f"{method}_task20_seed0"]
        assert (every.selection.rule, every.selection.num_candidates) == (rule, n)
        assert every.selection == chunk.selection and (every.window_starts, chunk.window_starts) == ("step", "chunk")
    table = {m: OUTCOMES["expo"] for m in ("faster_idql", "expo_n1", "expo_every_window", "expo_n1_every_window")}
    table |= {"base": OUTCOMES["base"], "expo": OUTCOMES["expo"], "faster_idql_every_window": OUTCOMES["faster_expo"]}
    _write_records(args, {20: table})
    main(args)
    report = json.loads((args.report_dir / REPORT_JSON).read_text())
    verdicts = {r["claim"]: r for r in report["verdicts"]}
    # Each judged against its chunk-window twin (seed 1's episodes 7-8 are FASTER-EXPO's wins alone: +2 of 8).
    assert verdicts["faster_idql_every_window ≈ faster_idql"]["difference"] == pytest.approx(2 / 8)
    assert verdicts["expo_n1_every_window ≈ expo_n1"]["difference"] == 0
    # An ablation makes no "≈ EXPO" claim, on either windows; its cost is also read against EXPO on every window.
    assert not any(c.startswith(("faster_idql", "expo_n1")) and c.endswith("≈ expo_every_window") for c in verdicts)
    costs = {(r["method"], r["reference"]) for r in report["cost_vs_expo"]}
    assert {("faster_idql_every_window", "expo_every_window"), ("expo_n1_every_window", "expo_every_window"),
            ("faster_idql_every_window", "expo")} <= costs
    assert ("expo_every_window", "expo_every_window") not in costs


def test_paired_difference_is_newcombes_interval():
    # Uncorrelated pairs (a·d = b·c): the interval is the two Wilson intervals' square-and-add.
    ref, other = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    diff, lo, hi = paired_difference(ref, other)
    low, up = wilson_interval(2, 4)
    assert diff == 0 and lo == pytest.approx(-math.sqrt(2) * (0.5 - low)) and hi == pytest.approx(math.sqrt(2) * (up - 0.5))
    # Swapping the runs negates the difference and mirrors the interval.
    ref, other = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool), np.array([1, 0, 1, 1, 1, 1, 1, 1], bool)
    d1, lo1, hi1 = paired_difference(ref, other)
    d2, lo2, hi2 = paired_difference(other, ref)
    assert d1 == pytest.approx(-d2) and lo1 == pytest.approx(-hi2) and hi1 == pytest.approx(-lo2)
    assert -1 <= lo1 < d1 < hi1 <= 1
    # Runs that agree on all 100 pairs, half of them wins: the continuity-corrected φ is (50·50 − 50)/(50·50) =
    # 0.98, not 1, so the interval is ±√(2·0.02)·(½ − Wilson's lower bound), not the zero width of φ = 1.
    ref = np.arange(100) < 50
    diff, lo, hi = paired_difference(ref, ref.copy())
    low, _ = wilson_interval(50, 100)
    assert diff == 0 and lo == pytest.approx(-0.2 * (0.5 - low)) and hi == pytest.approx(0.2 * (0.5 - low))


def test_missing_partial_damaged_and_unpaired_records_are_reported(tmp_path):
    args = _args(tmp_path)
    _write_records(args)
    expected = [{"name": s.name, "method": s.method, "task": s.task, "seed": s.seed} for s in grid(args)]
    (args.records / "expo_task20_seed2.json").unlink()
    partial = args.records / "base_task20_seed1.json"
    record = json.loads(partial.read_text())
    record["config"]["episodes"] = 10
    partial.write_text(dump_record(record))
    text, data = render(args.records, expected, args.report)
    assert "Records: 7 complete of 9 expected." in text
    assert f"- expo_task20_seed2: missing (no {args.records / 'expo_task20_seed2.json'})" in text
    assert "- base_task20_seed1: partial (8 episodes, 800 env steps; its config asks for more)" in text
    assert data["problems"] and "| 1–4 | EXPO | 2 |" in text

    damaged = args.records / "faster_expo_task20_seed0.json"
    good = damaged.read_text()
    damaged.write_text(good[:200])
    with pytest.raises(ValueError, match="faster_expo_task20_seed0.json: not a JSON record"):
        render(args.records, expected, args.report)
    record = json.loads(good)
    record["counters"] = []
    damaged.write_text(dump_record(record))
    with pytest.raises(ValueError, match="field 'counters' should be a dict, found \\[\\]"):
        render(args.records, expected, args.report)
    record = json.loads(good)
    column = record["metric_columns"].index("train/init_state")
    record["metric_rows"][0][column] = (record["metric_rows"][0][column] + 1) % 50
    damaged.write_text(dump_record(record))
    with pytest.raises(ValueError, match="not paired: episode 1 starts from init state"):
        render(args.records, expected, args.report)


def test_a_record_of_another_grid_is_refused_before_anything_runs(tmp_path):
    args = _args(tmp_path)
    _write_records(args)
    assert check_records(grid(args), args.records) == []
    with pytest.raises(ValueError, match="(?s)base_task20_seed0.json was made with another config.*episodes: 8 -> 9"):
        check_records(grid(dataclasses.replace(args, episodes=9)), args.records)


def test_a_second_process_on_a_locked_run_stops_before_training(tmp_path):
    spec = grid(_args(tmp_path))[0]
    spec.config.run_dir.mkdir(parents=True)
    job = {"name": spec.name, "config": to_jsonable(spec.config, strict=False)}
    with open(spec.config.run_dir / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match=f"locked by another process training {spec.name}"):
            run_job(job)
    assert not (spec.config.run_dir / "config.json").exists()  # nothing of the run was started


@pytest.mark.parametrize("report_dir", ["", "every_window"])
def test_the_committed_report_is_regenerated_from_the_committed_records(monkeypatch, report_dir):
    # The every-window report too: a report written by a long run that started before a change to the report's
    # code would otherwise stay committed in the old form.
    folder = BENCHMARKS / "results" / "reproduce" / report_dir
    if not (folder / REPORT_JSON).is_file():
        records = BENCHMARKS / "results" / "reproduce" / "runs"
        assert report_dir or not list(records.glob("*.json")), (
            f"{records} holds records but {folder / REPORT_JSON} is missing: run "
            "`benchmarks/reproduce.py --report-only` and commit its report with them")
        pytest.skip(f"no committed reproduction report yet ({folder / REPORT_JSON}): the grid has not been run")
    stored = json.loads((folder / REPORT_JSON).read_text())
    monkeypatch.chdir(BENCHMARKS.parent)  # the report names records by the repo-relative path it was made with
    text, _ = render(Path(stored["records"]), stored["expected"], ReportSettings(**stored["settings"]))
    assert text == (folder / REPORT_FILE).read_text()
