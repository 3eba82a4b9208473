"""The reproduction's report, from the committed run records alone (no run folder needed).

Per task: training-episode success per block of episodes with the paired comparisons against the base policy
and against EXPO (exact McNemar on the pairs only one run won; runs with the same task and seed start episode
i from the same init state, which is checked here), the final greedy evaluation pooled over seeds × init
states with 95 % Wilson intervals, the FLOPs (acting, cache, updates) and wall time (acting, simulator, updates)
of every run, each method's cost over EXPO's on the same task and seed, and a verdict per claim that follows
from those numbers:

- "FASTER-EXPO ≈ EXPO": the paired difference in success over the late training episodes (from
  `late_from` on) with its 95 % interval (Newcombe's hybrid score interval for paired proportions, built on
  the Wilson intervals); shown when the interval lies within ±`equivalence_margin`.
- The same claim between the two every-window runs, and "M, every window ≈ M" for FASTER-EXPO and EXPO (where the
  records hold those pairs): the same interval, for what training on the windows starting at every step instead
  of at chunk boundaries changes.
- "M > base": the exact McNemar test over the same late episodes; shown when p < `alpha` and M won more pairs.
- Over all tasks pooled, a claim's verdict stands only where every task's verdict agrees; otherwise the row says
  "mixed" and names each task's, since pooling a task that fails with one that passes can look like a pass.

Each paired episode counts as one observation (the seeds' spread is in the per-seed columns). Writes
`report.md` (the tables, reproduced byte for byte from the same records), `report.json` (the numbers and
what produced them) and per task `task<t>_success_vs_episodes.png` / `task<t>_success_vs_flops.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import write_result
from compare_runs import mcnemar_p, moving_rate
from faster_vla.runs.evaluate import wilson_interval
from faster_vla.runs.logger import figure_png
from faster_vla.runs.loop import RECENT_EPISODES
from faster_vla.shared.files import atomic_write
from reproduce_run import RECORD_FORMAT, RECORD_VERSION

LABELS: dict[str, str] = {"base": "base π0.5", "expo": "EXPO", "faster_expo": "FASTER-EXPO",
                          "faster_idql": "FASTER-IDQL (selection, no edit)", "expo_n1": "EXPO N=1 (edit, no selection)",
                          "faster_expo_every_window": "FASTER-EXPO, every window",
                          "expo_every_window": "EXPO, every window",
                          "faster_idql_every_window": "FASTER-IDQL, every window",
                          "expo_n1_every_window": "EXPO N=1, every window"}
REFERENCES = ("base", "expo")
"""The methods every other one is compared with, pair by pair."""
EVERY_WINDOW_SUFFIX = "_every_window"
"""Names a method trained on the windows starting at every step; without it, the same method on chunk windows."""
EQUIVALENCE_CLAIMS = (("expo", "faster_expo"), ("expo_every_window", "faster_expo_every_window"))
"""(reference, method) of each "method ≈ reference" claim: the paper's, on chunk windows and on every window."""


def chunk_twin(method: str) -> str | None:
    """The chunk-window method an every-window one is judged against (None for a chunk-window method)."""
    return method.removesuffix(EVERY_WINDOW_SUFFIX) if method.endswith(EVERY_WINDOW_SUFFIX) else None


def same_windows_reference(method: str) -> str | None:
    """EXPO on every window for the other every-window methods: their cost in the paper's own setting."""
    return "expo_every_window" if chunk_twin(method) not in (None, "expo") else None


REPORT_FILE, REPORT_JSON = "report.md", "report.json"


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """How the report groups and judges the records."""

    block: int = 50
    """Training episodes per block of the tables."""
    late_from: int = 101
    """The verdicts use the training episodes from this one (1-based) on: the critics learn over the first 100
    (docs/reproduction.md, the 300-episode run)."""
    equivalence_margin: float = 0.10
    """"≈" is shown when the 95 % interval of the difference in success lies within ± this."""
    alpha: float = 0.05
    """"> base" is shown when the McNemar p-value is below this."""

    def __post_init__(self) -> None:
        if self.block < 1 or self.late_from < 1:
            raise ValueError(f"report block and late_from must be >= 1, got {self.block} and {self.late_from}")
        if not 0 < self.equivalence_margin < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"report equivalence_margin and alpha must be in (0, 1), got {self.equivalence_margin} "
                             f"and {self.alpha}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One record, read into arrays (episode i at index i-1)."""

    name: str
    method: str
    task: int
    seed: int
    complete: bool
    success: np.ndarray
    init_state: np.ndarray
    flops: np.ndarray
    final: list[list[Any]]
    counters: dict[str, Any]
    env_steps: np.ndarray  # [episodes] cumulative env steps after each episode
    wall_s: np.ndarray  # [episodes] cumulative wall seconds after each episode; NaN where the log had none


REQUIRED = {"format": str, "version": int, "name": str, "method": str, "task": int, "seed": int, "config": dict,
            "counters": dict, "final_eval": dict, "metric_columns": list, "metric_rows": list}


def read_record(path: Path) -> Run:
    """A record file, checked field by field; errors name the file, the field, what was expected and found."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON record ({exc}); a record is written whole, so this file was damaged or "
                         "is no record: delete it to run that run again") from exc
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path}: field {key!r} should be a {kind.__name__}, found {data.get(key)!r:.80}")
    if (data["format"], data["version"]) != (RECORD_FORMAT, RECORD_VERSION):
        raise ValueError(f"{path}: format {data['format']!r} version {data['version']}, expected {RECORD_FORMAT!r} "
                         f"version {RECORD_VERSION}")
    # Text columns (e.g. eval/protocol, which names the protocol an eval used) are not curves: left out.
    text = {i for row in data["metric_rows"] for i, v in enumerate(row) if isinstance(v, str)}
    columns = [c for i, c in enumerate(data["metric_columns"]) if i not in text]
    for key in ("episodes", "env_steps", "flops", "train/success", "train/init_state"):
        if key not in columns:
            raise ValueError(f"{path}: metric_columns lacks {key!r}")
    rows = np.array([[math.nan if v is None else v for i, v in enumerate(row) if i not in text]
                     for row in data["metric_rows"]], float)
    rows = rows.reshape(-1, len(columns))
    col = {k: rows[:, i] for i, k in enumerate(columns)}
    if not np.array_equal(col["episodes"], np.arange(1, len(rows) + 1)):
        raise ValueError(f"{path}: metric_rows should be episodes 1..{len(rows)} in order, found "
                         f"{col['episodes'][:10].tolist()}...")
    counters, config = data["counters"], data["config"]
    if counters.get("episodes") != len(rows):
        raise ValueError(f"{path}: counters.episodes is {counters.get('episodes')}, metric_rows holds {len(rows)}")
    budget = config.get("env_step_budget")
    complete = len(rows) >= config.get("episodes", math.inf) or (budget is not None and counters["env_steps"] >= budget)
    final = data["final_eval"].get("episodes")
    if not isinstance(final, list) or not final or any(not isinstance(e, list) or len(e) != 3 for e in final):
        raise ValueError(f"{path}: final_eval.episodes should be a non-empty list of [init_state, success, steps], "
                         f"found {final!r:.80}")
    return Run(data["name"], data["method"], data["task"], data["seed"], complete, col["train/success"] > 0.5,
               col["train/init_state"].astype(int), col["flops"], final, counters, col["env_steps"],
               col.get("wall_s", np.full(len(rows), math.nan)))


def load_runs(records: Path, expected: list[dict[str, Any]]) -> tuple[list[Run], list[str]]:
    """The complete records of the expected runs, and one line per expected run that is missing or partial."""
    runs, problems = [], []
    for spec in expected:
        path = records / f"{spec['name']}.json"
        if not path.is_file():
            problems.append(f"{spec['name']}: missing (no {path})")
            continue
        run = read_record(path)
        found = {k: getattr(run, k) for k in ("method", "task", "seed")}
        if found != {k: spec[k] for k in found}:
            raise ValueError(f"{path}: record of {found}, expected {({k: spec[k] for k in found})}")
        if not run.complete:
            problems.append(f"{spec['name']}: partial ({len(run.success)} episodes, {run.counters['env_steps']} env "
                            "steps; its config asks for more), left out of the tables")
            continue
        runs.append(run)
    return runs, problems


def paired(a: list[Run], b: list[Run], start: int, stop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of the episodes [start, stop) that `a` and `b` runs of the same task and seed both ran, pooled
    over seeds; raises if a pair's init states differ (the runs would not be paired)."""
    xs, ys = [], []
    by_key = {(r.task, r.seed): r for r in b}
    for ra in a:
        rb = by_key.get((ra.task, ra.seed))
        if rb is None:
            continue
        n = min(len(ra.success), len(rb.success), math.inf if stop is None else stop)
        if not np.array_equal(ra.init_state[:n], rb.init_state[:n]):
            i = int(np.argmax(ra.init_state[:n] != rb.init_state[:n]))
            raise ValueError(f"{ra.name} and {rb.name} are not paired: episode {i + 1} starts from init state "
                             f"{ra.init_state[i]} in one, {rb.init_state[i]} in the other")
        xs.append(ra.success[start:n])
        ys.append(rb.success[start:n])
    return (np.concatenate(xs), np.concatenate(ys)) if xs else (np.zeros(0, bool), np.zeros(0, bool))


def paired_difference(ref: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """success(other) − success(ref) over paired outcomes, with Newcombe's 95 % hybrid score interval (his method
    10: the two Wilson intervals combined with the pairs' correlation φ).

    φ carries Newcombe's continuity correction (a·d − b·c shrunk by n/2 towards 0 when positive): without it, runs
    that agree on every pair get φ = 1 and, at 50 % success, a zero-width interval that would call them "equal"
    from any number of pairs."""
    n = len(ref)
    a, b = int((ref & other).sum()), int((ref & ~other).sum())
    c, d = int((~ref & other).sum()), int((~ref & ~other).sum())
    p1, p2 = (a + c) / n, (a + b) / n  # other, ref
    l1, u1 = wilson_interval(a + c, n)
    l2, u2 = wilson_interval(a + b, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    cross = cross if cross < 0 else max(0.0, cross - n / 2)
    phi = cross / math.sqrt(margins) if margins else 0.0
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, p1 - p2 - lower, p1 - p2 + upper


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _pair_cell(ref: np.ndarray, other: np.ndarray) -> str:
    if not len(ref):
        return "–"
    b, c = int((ref & ~other).sum()), int((~ref & other).sum())
    return f"{b} vs {c} ({mcnemar_p(b, c):.2g})"


def block_table(task: int, by_method: dict[str, list[Run]], settings: ReportSettings) -> list[str]:
    longest = max(len(r.success) for runs in by_method.values() for r in runs)
    starts = list(range(0, longest, settings.block))
    spans = [(s, min(s + settings.block, longest), f"{s + 1}–{min(s + settings.block, longest)}") for s in starts]
    spans += [(settings.late_from - 1, None, f"{settings.late_from}–end"), (0, None, "all")]
    refs = [m for m in REFERENCES if m in by_method]
    lines = [f"Task {task}: training episodes (successes pooled over seeds; pairs only one run won, reference vs "
             "this method, and the exact McNemar p)", "",
             "| episodes | method | seeds | successes | " + " | ".join(f"vs {LABELS[m]}" for m in refs) + " |",
             "|" + "---|" * (4 + len(refs))]
    for start, stop, label in spans:
        for method, runs in by_method.items():
            wins = [r.success[start:stop] for r in runs]
            n, s = sum(len(w) for w in wins), int(sum(w.sum() for w in wins))
            if not n:
                continue
            cells = ["–" if m == method else _pair_cell(*paired(by_method[m], runs, start, stop)) for m in refs]
            lines.append(f"| {label} | {LABELS[method]} | {len(runs)} | {s}/{n} ({_pct(s / n)}) | "
                         + " | ".join(cells) + " |")
    return lines


def eval_table(task: int, by_method: dict[str, list[Run]]) -> list[str]:
    lines = [f"Task {task}: final greedy evaluation (pooled over seeds × init states; 95 % Wilson interval)", "",
             "| method | seeds | successes per seed | pooled | 95 % interval |", "|---|---|---|---|---|"]
    for method, runs in by_method.items():
        per_seed = [(sum(bool(e[1]) for e in r.final), len(r.final)) for r in runs]
        s, n = sum(x for x, _ in per_seed), sum(y for _, y in per_seed)
        lo, hi = wilson_interval(s, n)
        lines.append(f"| {LABELS[method]} | {len(runs)} | {', '.join(f'{x}/{y}' for x, y in per_seed)} | "
                     f"{s}/{n} ({_pct(s / n)}) | {_pct(lo)}–{_pct(hi)} |")
    return lines


def _stage_s(counters: dict[str, Any], *stages: str) -> float:
    return sum(counters.get("time_s", {}).get(s, 0.0) for s in stages)


ENV_STAGES = ("physics", "rendering", "reset")  # the simulator's share of a run's wall time


def _flops_parts(counters: dict[str, Any]) -> list[float]:
    """Acting, frozen-actor cache and update (critics + actor) FLOPs of a run."""
    return [counters["acting_flops"], counters["cache_flops"],
            counters["update_flops"] + counters.get("actor_update_flops", 0.0)]


def median_episode_wall_per_step(run: Run) -> float:
    """Wall seconds per env step of the run's median episode: a run's total wall time also counts the stretches
    when the shared machine was busy with other work (or the run was paused), which a median over episodes
    leaves out; NaN for a record without per-episode wall times."""
    wall = np.diff(run.wall_s, prepend=0.0)
    steps = np.diff(run.env_steps, prepend=0.0)
    ok = np.isfinite(wall) & (steps > 0)
    return float(np.median(wall[ok] / steps[ok])) if ok.any() else math.nan


def compute_table(runs: list[Run]) -> list[str]:
    """FLOPs by part and wall time by stage per run: on CPU the simulator's stages can outweigh the model's, which
    the FLOPs alone would hide."""
    lines = ["| run | episodes | env steps | acting FLOPs | cache FLOPs | update FLOPs | total FLOPs | wall time | "
             "acting / env / updates |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r.counters
        parts = _flops_parts(c)
        stages = [_stage_s(c, "acting"), _stage_s(c, *ENV_STAGES), _stage_s(c, "cache", "update", "actor_update")]
        lines.append(f"| {r.name} | {c['episodes']} | {c['env_steps']} | "
                     + " | ".join(f"{x:.3g}" for x in parts) + f" | {sum(parts):.3g} | {c['wall_s'] / 60:.1f} min | "
                     + " / ".join(f"{x / 60:.1f}" for x in stages) + " min |")
    return lines


def cost_ratios(tasks: dict[Any, dict[str, list[Run]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Each trained method's cost over EXPO's on the same task and seed, and each other every-window method's
    over EXPO on every window (`same_windows_reference`): total and acting FLOPs, acting seconds per env step (the
    part selection changes), wall time, and the median episode's wall time per env step
    (`median_episode_wall_per_step`, which a busy stretch of the machine moves far less than the total); the mean
    ratio and its range over the pairs ("–" where a record lacks per-episode wall times)."""
    keys: dict[str, Callable[[Run], float]] = {
        "total FLOPs": lambda r: sum(_flops_parts(r.counters)),
        "acting FLOPs": lambda r: r.counters["acting_flops"],
        "acting s per env step": lambda r: _stage_s(r.counters, "acting") / max(r.counters["env_steps"], 1),
        "wall time": lambda r: r.counters["wall_s"],
        "wall s per env step, median episode": median_episode_wall_per_step}
    lines = ["| tasks | method | pairs | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    rows = []
    for where, by_method in tasks.items():
        comparisons = [(m, "expo") for m in by_method if m not in ("base", "expo")]
        comparisons += [(m, ref) for m in by_method if (ref := same_windows_reference(m))]
        for method, reference in comparisons:
            refs = {(r.task, r.seed): r for r in by_method.get(reference, [])}
            pairs = [(r, refs[r.task, r.seed]) for r in by_method[method] if (r.task, r.seed) in refs]
            if not pairs:
                continue
            row: dict[str, Any] = {"tasks": where, "method": method, "reference": reference, "pairs": len(pairs)}
            cells = []
            for name, value in keys.items():
                ratios = np.array([value(mine) / value(ref) for mine, ref in pairs])
                if not np.isfinite(ratios).all():  # a record without per-episode wall times
                    row[name] = None
                    cells.append("–")
                    continue
                row[name] = {"mean": float(ratios.mean()), "min": float(ratios.min()), "max": float(ratios.max())}
                cells.append(f"{ratios.mean():.2f}× ({ratios.min():.2f}–{ratios.max():.2f})")
            label = LABELS[method] if reference == "expo" else f"{LABELS[method]} over {LABELS[reference]}"
            lines.append(f"| {where} | {label} | {len(pairs)} | " + " | ".join(cells) + " |")
            rows.append(row)
    return (lines if rows else []), rows


def _equivalence_verdict(lo: float, hi: float, m: float, method: str = "faster_expo",
                         ref: str = "expo") -> tuple[str, str]:
    """(kind, words) of "method ≈ ref" from the difference's 95 % interval [lo, hi] and the margin m."""
    if -m <= lo and hi <= m:
        return "shown", f"shown: the interval lies within ±{100 * m:.0f} points"
    if hi < 0:
        return "no", f"no: {LABELS[method]} is below {LABELS[ref]}"
    if lo > 0:
        return "above", f"not shown as equal: {LABELS[method]} is above {LABELS[ref]}"
    return "not shown", f"not shown: the interval reaches beyond ±{100 * m:.0f} points"


def per_seed_differences(ref: list[Run], other: list[Run], start: int) -> list[dict[str, Any]]:
    """success(other) − success(ref) on each seed's paired episodes from `start` on: the seeds a pooled verdict
    pools, so a reader can see whether they agree or one seed carries it."""
    out = []
    for seed in sorted({r.seed for r in ref} & {r.seed for r in other}):
        x, y = paired([r for r in ref if r.seed == seed], [r for r in other if r.seed == seed], start, None)
        if len(x):
            diff, lo, hi = paired_difference(x, y)
            out.append({"seed": seed, "difference": diff, "ci95": [lo, hi], "pairs": len(x)})
    return out


def seed_table(rows: list[dict[str, Any]], late_from: int) -> list[str]:
    """The per-seed differences of each task's claims (rows from `verdicts`), one column per seed."""
    rows = [r for r in rows if r["tasks"] != "all" and r["per_seed"]]
    if not rows:
        return []
    seeds = sorted({s["seed"] for r in rows for s in r["per_seed"]})
    lines = [f"Per seed: each claim's difference (method − reference, points, 95 % interval) on one seed's paired "
             f"episodes from episode {late_from} on; the verdicts above pool the seeds", "",
             "| tasks | claim | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for row in rows:
        by_seed = {s["seed"]: s for s in row["per_seed"]}
        cells = [f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
                 if (c := by_seed.get(s)) else "–" for s in seeds]
        lines.append(f"| {row['tasks']} | {row['label']} | " + " | ".join(cells) + " |")
    return lines


def _better_verdict(only_base: int, only_method: int, p: float, alpha: float) -> tuple[str, str]:
    """(kind, words) of "M > base" from the McNemar counts and p-value."""
    if p < alpha and only_method > only_base:
        return "shown", f"shown (p < {alpha:g})"
    if p < alpha:
        return "no", "no: the base policy is better"
    return "not shown", f"not shown (p ≥ {alpha:g})"


def verdicts(tasks: dict[Any, dict[str, list[Run]]], settings: ReportSettings) -> tuple[list[str], list[dict]]:
    """One row per (task or all tasks, claim), with the numbers and a verdict that follows from them.

    A pooled ("all") verdict stands only where every task's verdict on that claim is the same: pooling a task
    where a claim holds with one where it fails can put the pooled interval inside the margin and hide the
    failure, so such a row says "mixed" and names each task's verdict.
    Below the verdicts, each task claim's difference seed by seed (`seed_table`).
    """
    m, late = settings.equivalence_margin, settings.late_from - 1
    lines = [f"Verdicts, on the training episodes from episode {settings.late_from} on (paired by seed and init "
             "state)", "", "| tasks | claim | numbers | verdict |", "|---|---|---|---|"]
    rows: list[dict[str, Any]] = []
    for where, by_method in tasks.items():
        def pairs(ref: str, other: str) -> tuple[np.ndarray, np.ndarray]:
            if ref not in by_method or other not in by_method:
                return np.zeros(0, bool), np.zeros(0, bool)
            return paired(by_method[ref], by_method[other], late, None)

        def seeds(ref: str, other: str) -> list[dict[str, Any]]:
            return [] if where == "all" else per_seed_differences(by_method[ref], by_method[other], late)

        # The paper's claim on chunk windows and on every window, and whether training on every window instead
        # of chunk windows changes each method.
        twins = [(twin, m) for m in by_method if (twin := chunk_twin(m))]
        for ref, method in (*EQUIVALENCE_CLAIMS, *twins):
            x, y = pairs(ref, method)
            if not len(x):
                continue
            diff, lo, hi = paired_difference(x, y)
            numbers = (f"{LABELS[method]} − {LABELS[ref]} = {100 * diff:+.1f} points, 95 % interval "
                       f"[{100 * lo:+.1f}, {100 * hi:+.1f}], {len(x)} pairs")
            kind, verdict = _equivalence_verdict(lo, hi, m, method, ref)
            rows.append({"tasks": where, "claim": f"{method} ≈ {ref}", "difference": diff, "ci95": [lo, hi],
                         "pairs": len(x), "kind": kind, "verdict": verdict, "per_seed": seeds(ref, method),
                         "label": f"{LABELS[method]} ≈ {LABELS[ref]}", "numbers": numbers})
        for method in (m for m in LABELS if m != "base"):  # every trained method, in the report's order
            x, y = pairs("base", method)
            if not len(x):
                continue
            b, c = int((x & ~y).sum()), int((~x & y).sum())
            p = mcnemar_p(b, c)
            kind, verdict = _better_verdict(b, c, p, settings.alpha)
            numbers = (f"{int(y.sum())}/{len(y)} vs {int(x.sum())}/{len(x)}; pairs only one won: base {b}, "
                       f"{LABELS[method]} {c}; p = {p:.2g}")
            rows.append({"tasks": where, "claim": f"{method} > base", "only_base": b, "only_method": c, "p": p,
                         "kind": kind, "verdict": verdict, "per_seed": seeds("base", method),
                         "label": f"{LABELS[method]} > base", "numbers": numbers})
    for row in rows:
        if row["tasks"] != "all":
            continue
        per_task = [(r["tasks"], r["kind"]) for r in rows if r["claim"] == row["claim"] and r["tasks"] != "all"]
        if len({kind for _, kind in per_task}) > 1:
            row["kind"] = "mixed"
            row["verdict"] = ("mixed: the tasks disagree (" + ", ".join(f"{t}: {k}" for t, k in per_task)
                              + "); read them apart")
    for row in rows:
        lines.append(f"| {row['tasks']} | {row['label']} | {row['numbers']} | {row['verdict']} |")
    if not rows:
        lines = [f"No verdict: no run pair (with the base policy or EXPO) has training episodes from episode "
                 f"{settings.late_from} on."]
    if by_seed := seed_table(rows, settings.late_from):
        lines += ["", *by_seed]
    for row in rows:
        del row["label"], row["numbers"]
    return lines, rows


def plot_task(task: int, by_method: dict[str, list[Run]], out: Path) -> list[Path]:
    """Success of the last RECENT_EPISODES training episodes against episodes and cumulative FLOPs: mean over
    seeds, with ± one standard deviation shaded."""
    written = []
    for x_name, log_x in (("episodes", False), ("flops", True)):
        def draw(fig: Any, x_name: str = x_name, log_x: bool = log_x) -> None:
            ax = fig.add_subplot()
            for method, runs in by_method.items():
                n = min(len(r.success) for r in runs)
                rates = np.array([moving_rate(r.success[:n].astype(float), RECENT_EPISODES) for r in runs])
                x = np.arange(1, n + 1) if x_name == "episodes" else np.mean([r.flops[:n] for r in runs], axis=0)
                mean, std = rates.mean(axis=0), rates.std(axis=0)
                ax.plot(x, mean, label=f"{LABELS[method]} ({len(runs)} seeds)")
                ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
            ax.set_xlabel("training episodes" if x_name == "episodes" else "cumulative FLOPs (acting + cache + updates)")
            ax.set_ylabel(f"success, last {RECENT_EPISODES} training episodes")
            ax.set_ylim(-0.02, 1.02)
            if log_x:
                ax.set_xscale("log")
            ax.set_title(f"libero_90 task {task}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)

        path = out / f"task{task}_success_vs_{x_name}.png"
        atomic_write(path, figure_png(draw, (6.4, 4.2)))
        written.append(path)
    return written


def render(records: Path, expected: list[dict[str, Any]], settings: ReportSettings) -> tuple[str, dict[str, Any]]:
    """The report's markdown and numbers from the records alone (deterministic: the same records, the same text)."""
    runs, problems = load_runs(records, expected)
    tasks: dict[Any, dict[str, list[Run]]] = {}
    for run in runs:
        tasks.setdefault(run.task, {}).setdefault(run.method, []).append(run)
    lines = [f"Records: {len(runs)} complete of {len(expected)} expected."]
    if problems:
        lines += ["", "Not in the tables:", ""] + [f"- {p}" for p in problems]
    for task, by_method in tasks.items():
        lines += ["", *block_table(task, by_method, settings), "", *eval_table(task, by_method)]
    if runs:
        lines += ["", "Compute per run (FLOPs analytic, from `faster_vla.rl.flops`; wall time of the run's loop)", "",
                  *compute_table(runs)]
        pooled: dict[str, list[Run]] = {}
        for by_method in tasks.values():
            for method, method_runs in by_method.items():
                pooled.setdefault(method, []).extend(method_runs)
        verdict_tasks: dict[Any, dict[str, list[Run]]] = {**tasks, "all": pooled} if len(tasks) > 1 else tasks
        ratio_lines, ratio_rows = cost_ratios(verdict_tasks)
        if ratio_lines:
            lines += ["", "Cost over EXPO's on the same task and seed (mean ratio over seeds, range)", "",
                      *ratio_lines]
        verdict_lines, verdict_rows = verdicts(verdict_tasks, settings)
        lines += ["", *verdict_lines]
    else:
        verdict_rows, ratio_rows = [], []
    data = {"expected": expected, "settings": dataclasses.asdict(settings), "complete": [r.name for r in runs],
            "problems": problems, "cost_vs_expo": ratio_rows, "verdicts": verdict_rows}
    return "\n".join(lines) + "\n", data


def write_report(records: Path, expected: list[dict[str, Any]], settings: ReportSettings, out: Path,
                 command: str) -> str:
    """Writes report.md, report.json and the plots into `out`; returns the markdown."""
    text, data = render(records, expected, settings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / REPORT_FILE, text.encode())
    write_result(out / REPORT_JSON, {"command": command, "records": str(records), **data})
    tasks: dict[int, dict[str, list[Run]]] = {}
    for run in load_runs(records, expected)[0]:
        tasks.setdefault(run.task, {}).setdefault(run.method, []).append(run)
    for task, by_method in tasks.items():
        plot_task(task, by_method, out)
    return text
