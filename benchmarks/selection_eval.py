"""Selection in isolation and test-time scaling (issue 18, part 3): trained critics, every rule, the same states.

Not a test: hours of CPU. Two kinds of cell, each one `faster-vla eval` of a trained run's checkpoint
(`faster_vla.runs.evaluate`, greedy, `--checkpoint latest`: the run's final critics and edit policy) on the
suite's init states 0..trials-1 of the run's own task, with the run's episode length:

    isolation   every run of --runs, under each rule of --rules with the run's own N: which part of the
                run's success its selection rule is, once the critics are trained (same critics, same states)
    scaling     the --scaling-run under each of --scaling-rules for each N of --scaling-n: success against
                each decision's FLOPs and acting time as N grows (FASTER denoises 1 chunk, best-of-N N chunks);
                the isolation cell of the same run, rule and N is that point (one cell, evaluated once)

Every cell uses the same eval seed, so init state i starts from the same placement and the same noise key in
every cell: outcomes are paired across rules and N. The report compares each rule with base by exact McNemar
tests per run, and pools a task's runs with the init state as the unit, by a bootstrap over states (one
cell's 50 states cannot show a ten-point gap; a task's runs together narrow it).
Cells are resumable: each is written atomically to `--out/cells/<run>__<rule>_n<N>.json` when it ends and read
back after. The report (`--out/report.md`, `report.json`, `scaling.png`) is built from the cells alone.

    .venv/bin/python benchmarks/selection_eval.py                      # every finished FASTER-EXPO and EXPO run
    .venv/bin/python benchmarks/selection_eval.py --report-only        # the report from the committed cells

Acting times come from this machine (2 shared cores): read them as ratios between cells, not as latencies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from bench_common import write_result
from compare_runs import mcnemar_p
from faster_vla.rl.selection import Rule
from faster_vla.runs.evaluate import EvalConfig, evaluate, wilson_interval
from faster_vla.runs.logger import figure_png
from faster_vla.shared.files import atomic_write

ISOLATION_RULES: tuple[Rule, ...] = ("base", "faster", "best_of_n", "faster_idql", "idql")


@dataclasses.dataclass(frozen=True)
class SelectionEvalArgs:
    """Evaluate trained runs' critics under every selection rule, and success against N for two rules."""

    runs: tuple[Path, ...] = ()
    """Run folders for the isolation cells. Empty: every folder in --runs-root named faster_expo_* or expo_task*
    whose grid record exists in --records (a finished run)."""
    runs_root: Path = Path("runs/reproduce")
    """Where the reproduction grid's run folders are (benchmarks/reproduce.py --out)."""
    records: Path = Path("benchmarks/results/reproduce/runs")
    """The grid's records: a run counts as finished when its <name>.json is here."""
    rules: tuple[Rule, ...] = ISOLATION_RULES
    """Rules of the isolation cells."""
    trials: int = 50
    """Init states per cell (0..trials-1)."""
    scaling_run: Path | None = None
    """Run folder of the scaling curve. None: the first finished faster_expo run on task 20 (seed order)."""
    scaling_rules: tuple[Rule, ...] = ("faster", "best_of_n")
    """Rules of the scaling curve."""
    scaling_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """N of the scaling curve."""
    seed: int = 7
    """Eval seed (env placements and noises), the same for every cell."""
    num_workers: int = 1
    """Env workers per cell (faster-vla eval --num-workers); 1 keeps acting times per single decision."""
    out: Path = Path("benchmarks/results/reproduce/selection")
    """Cells (out/cells/) and the report."""
    report_only: bool = False
    """Write the report from the cells already there; evaluate nothing."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if any(n < 1 for n in self.scaling_n):
            raise ValueError(f"--scaling-n must all be >= 1, got {list(self.scaling_n)}")


@dataclasses.dataclass(frozen=True)
class Cell:
    kind: str  # "isolation" or "scaling"
    run_dir: Path
    rule: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}__{self.rule}_n{self.n}"


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no config.json")
    return json.loads(path.read_text())


def finished_runs(args: SelectionEvalArgs) -> list[Path]:
    """The grid's FASTER-EXPO and EXPO runs that have a record, in name order."""
    if not args.runs_root.is_dir():
        return []
    return sorted(d for d in args.runs_root.iterdir()
                  if d.is_dir() and (d.name.startswith("faster_expo_") or d.name.startswith("expo_task"))
                  and (args.records / f"{d.name}.json").is_file())


def cells(args: SelectionEvalArgs) -> list[Cell]:
    runs = list(args.runs) or finished_runs(args)
    out = [Cell("isolation", run, rule, 1 if rule == "base" else _run_config(run)["selection"]["num_candidates"])
           for run in runs for rule in args.rules]
    scaling = args.scaling_run
    if scaling is None:
        scaling = next((r for r in finished_runs(args)
                        if r.name.startswith("faster_expo_task20_")), None)
    if scaling is not None:
        _run_config(scaling)  # a wrong folder fails before any cell runs
        out += [Cell("scaling", scaling, rule, n) for rule in args.scaling_rules for n in args.scaling_n]
    return out


def run_cell(cell: Cell, args: SelectionEvalArgs, path: Path) -> None:
    """One evaluation, written to `path` atomically with what made it (the cell)."""
    env = _run_config(cell.run_dir)["env"]
    scratch = path.with_name(f".{path.name}.eval")
    config = EvalConfig(run_dir=cell.run_dir, checkpoint="latest", suite=env["suite"], tasks=(str(env["task"]),),
                        trials=args.trials, max_steps=env["max_steps"], seed=args.seed, rule=cell.rule,
                        num_candidates=cell.n, num_workers=args.num_workers, output=scratch)
    report = evaluate(config)
    report["cell"] = {"kind": cell.kind, "run": cell.run_dir.name, "rule": cell.rule, "n": cell.n}
    write_result(path, report)  # the cell exists only once complete
    scratch.unlink()


def _outcomes(report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    (task,) = report["tasks"].values()
    episodes = task["episodes"]
    return np.array([e["init_state"] for e in episodes]), np.array([bool(e["success"]) for e in episodes])


def _row(report: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    ((task_id, task),) = report["tasks"].items()
    states, wins = _outcomes(report)
    row = {**report["cell"], "task": task_id, "successes": int(wins.sum()), "trials": len(wins),
           "ci95": list(wilson_interval(int(wins.sum()), len(wins))),
           "flops_per_decision": report["flops_per_decision"],
           "denoised_per_decision": report["flops_per_decision_by_part"]["denoise"],
           "ms_per_decision": task["acting"]["ms_per_decision"].get("total", 0.0)}
    if reference is not None:
        ref_states, ref_wins = _outcomes(reference)
        if not np.array_equal(states, ref_states):
            raise ValueError(f"cells {report['cell']} and {reference['cell']} ran different init states")
        b, c = int((ref_wins & ~wins).sum()), int((~ref_wins & wins).sum())
        row["vs_base"] = {"only_base": b, "only_this": c, "p": mcnemar_p(b, c)}
    return row


def pooled(cells: list[tuple[dict[str, Any], dict[str, Any]]], resamples: int = 10_000) -> list[dict[str, Any]]:
    """Each rule against base on the same critics, pooled by task over the runs: `cells` holds (cell, the base
    cell of its run) pairs.

    A cell is 50 init states, too few to show a ten-point gap alone. Pooling runs does not make their pairs
    independent: every run of a task evaluates the same 50 states (and the base rule, which ignores the
    critics, gives the same 50 outcomes in every run), so a McNemar test over all pairs would count each
    state once per run and overstate its evidence. The unit is the init state: per state, the mean over runs
    of (this rule's success − base's); the interval is a percentile bootstrap over states (fixed seed, so the
    report is regenerated identically)."""
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for cell, base in cells:
        groups.setdefault((next(iter(cell["tasks"])), cell["cell"]["rule"]), []).append((cell, base))
    out = []
    for (task, rule), members in groups.items():
        by_state: dict[int, list[float]] = {}
        row: dict[str, Any] = {"task": task, "rule": rule, "runs": [], "successes": 0, "base_successes": 0,
                               "trials": 0, "only_base": 0, "only_this": 0}
        for cell, base in members:
            states, wins = _outcomes(cell)
            base_states, base_wins = _outcomes(base)
            if not np.array_equal(states, base_states):
                raise ValueError(f"cells {cell['cell']} and {base['cell']} ran different init states")
            row["runs"].append(cell["cell"]["run"])
            row["successes"] += int(wins.sum())
            row["base_successes"] += int(base_wins.sum())
            row["trials"] += len(wins)
            row["only_base"] += int((base_wins & ~wins).sum())
            row["only_this"] += int((~base_wins & wins).sum())
            for state, gain in zip(states.tolist(), (wins.astype(float) - base_wins).tolist()):
                by_state.setdefault(state, []).append(gain)
        gains = np.array([np.mean(g) for _, g in sorted(by_state.items())])  # [states]
        boot = gains[np.random.default_rng(0).integers(0, len(gains), (resamples, len(gains)))].mean(axis=1)
        row["states"] = len(gains)
        row["difference"] = float(gains.mean())
        row["ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        out.append(row)
    return sorted(out, key=lambda p: (int(p["task"]) if p["task"].isdigit() else 0, p["task"], p["rule"]))


def _pair(row: dict[str, Any]) -> str:
    vs = row.get("vs_base")
    return "–" if vs is None else f"{vs['only_base']} / {vs['only_this']} ({vs['p']:.2g})"


def report(args: SelectionEvalArgs) -> dict[str, Any]:
    """report.md/report.json (and scaling.png) from the cells in --out/cells."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted((args.out / "cells").glob("*.json"))}
    isolation = [r for r in found.values() if r["cell"]["kind"] == "isolation"]
    # A scaling point is a cell like any other: the isolation cell of the scaling run at its own N (same name,
    # evaluated once) is also the curve's point at that N.
    curve = {(r["cell"]["run"], r["cell"]["rule"]) for r in found.values() if r["cell"]["kind"] == "scaling"}
    scaling = [r for r in found.values() if (r["cell"]["run"], r["cell"]["rule"]) in curve]
    base = {r["cell"]["run"]: r for r in isolation if r["cell"]["rule"] == "base"}
    iso_rows = [_row(r, base.get(r["cell"]["run"]) if r["cell"]["rule"] != "base" else None) for r in isolation]
    scale_rows = sorted((_row(r, base.get(r["cell"]["run"])) for r in scaling),
                        key=lambda r: (r["run"], r["rule"], r["n"]))
    lines = ["# Selection in isolation and test-time scaling", "",
             "Generated by `benchmarks/selection_eval.py --report-only` from the cells in `cells/` (greedy, each "
             f"run's final checkpoint, init states 0..{args.trials - 1}, eval seed {args.seed}).", "",
             "## Every rule on the same critics", "",
             "| run | rule | N | successes | 95 % interval | only base / only this (McNemar p) | GFLOPs per "
             "decision | acting ms per decision |", "|---|---|---|---|---|---|---|---|"]
    for r in iso_rows:
        lines.append(f"| {r['run']} | {r['rule']} | {r['n']} | {r['successes']}/{r['trials']} | "
                     f"{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f} % | {_pair(r)} | "
                     f"{r['flops_per_decision'] / 1e9:.3g} | {r['ms_per_decision']:.0f} |")
    pool_rows = pooled([(r, base[r["cell"]["run"]]) for r in isolation
                        if r["cell"]["rule"] != "base" and r["cell"]["run"] in base])
    if pool_rows:
        lines += ["", "## Each rule against base, pooled by task over the runs", "",
                  "The unit is the init state (every run evaluates the same ones): per state, this rule's success "
                  "minus base's, averaged over the runs; 95 % interval by a bootstrap over the states.", "",
                  "| task | rule | runs | base | this rule | pairs only base / only this | difference (95 % interval) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['task']} | {p['rule']} | {len(p['runs'])} | {p['base_successes']}/{p['trials']} | "
                  f"{p['successes']}/{p['trials']} | {p['only_base']} / {p['only_this']} | "
                  f"{100 * p['difference']:+.1f} points [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] |"
                  for p in pool_rows]
    if scale_rows:
        lines += ["", "## Test-time scaling", "",
                  "| run | rule | N | successes | 95 % interval | only base / only this (McNemar p) | GFLOPs per "
                  "decision | acting ms per decision |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['rule']} | {r['n']} | {r['successes']}/{r['trials']} | "
                  f"{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f} % | {_pair(r)} | "
                  f"{r['flops_per_decision'] / 1e9:.3g} | {r['ms_per_decision']:.0f} |" for r in scale_rows]
        runs = sorted({r["run"] for r in scale_rows})
        _plot_scaling(scale_rows, [r for r in iso_rows if r["rule"] == "base" and r["run"] in runs],
                      args.out / "scaling.png")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "report.md", text.encode())
    result = {"isolation": iso_rows, "pooled": pool_rows, "scaling": scale_rows}
    write_result(args.out / "report.json", result)
    return result


def _plot_scaling(rows: list[dict[str, Any]], bases: list[dict[str, Any]], path: Path) -> None:
    """Success (95 % Wilson) against N and against FLOPs per decision, one line per run and rule, and each run's
    base success as a level line (what selection and edit add)."""
    several = len({r["run"] for r in rows}) > 1

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for run, rule in sorted({(r["run"], r["rule"]) for r in rows}):
            mine = [r for r in rows if (r["run"], r["rule"]) == (run, rule)]
            rate = [r["successes"] / r["trials"] for r in mine]
            err = np.array([[s - r["ci95"][0], r["ci95"][1] - s] for s, r in zip(rate, mine)]).T
            for ax, x in zip(axes, ([r["n"] for r in mine], [r["flops_per_decision"] for r in mine])):
                ax.errorbar(x, rate, yerr=err, marker="o", capsize=3, label=f"{rule} ({run})" if several else rule)
        axes[0].set(xscale="log", xlabel="N (seeds per decision)", ylabel="success (95 % Wilson)")
        axes[1].set(xscale="log", xlabel="FLOPs per decision")
        levels: dict[tuple[int, int], list[str]] = {}  # runs of a task share base's outcomes: one line each
        for base in bases:
            levels.setdefault((base["successes"], base["trials"]), []).append(base["run"])
        for ax in axes:
            for (wins, trials), runs in sorted(levels.items()):
                ax.axhline(wins / trials, color="gray", linestyle="--", label=f"base ({wins}/{trials}"
                           + (f", {', '.join(runs)})" if len(levels) > 1 else ")"))
            ax.legend(fontsize="small")

    atomic_write(path, figure_png(draw, (10.0, 4.0)))


def main(args: SelectionEvalArgs) -> None:
    if not args.report_only:
        todo = cells(args)
        for i, cell in enumerate(todo):
            path = args.out / "cells" / f"{cell.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                continue
            print(f"[{i + 1}/{len(todo)}] {cell.kind}: {cell.run_dir.name} under {cell.rule}, N = {cell.n}", flush=True)
            run_cell(cell, args, path)
    result = report(args)
    print(f"report: {args.out / 'report.md'} ({len(result['isolation'])} isolation, {len(result['scaling'])} "
          "scaling cells)")


if __name__ == "__main__":
    main(tyro.cli(SelectionEvalArgs))
