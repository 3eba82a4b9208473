"""The paper's central claim at CPU scale: FASTER-EXPO vs EXPO (best-of-N) vs the base policy, on LIBERO.

Not a test: hours of CPU. Every (task, seed, method) is an ordinary `faster-vla train` run (the named config
`--base-config`, the built-in small π0.5 by default) with the same env-step budget; a run folder that is
already complete is read, a partial one resumed, so the script can be stopped and run again. Then, in one
process, the methods' acting latency (one decision on the same LIBERO observation) and update time (one
update on each run's own replay) are timed side by side, alternated, and the report is written:

    results.json              every run's curve, final eval, FLOPs and the timings (with the command line)
    table.md                  means and spread over seeds, ratios to EXPO
    success_vs_env_steps.png  success of the training episodes per env-step bin, mean ± std over seeds
    success_vs_flops.png      the same bins against each method's cumulative FLOPs (acting, cache, updates)

    .venv/bin/python benchmarks/reproduce.py                                  # the documented run
    .venv/bin/python benchmarks/reproduce.py --seeds 0 --env-step-budget 300  # a quick look

The curve is the success of the training episodes themselves (greedy choice among the N; the edit step of both
EXPO and FASTER-EXPO samples),
binned by env steps: every env step of the budget counts, none is spent on separate evaluation. The final
eval is each run's greedy evaluation on the task's first `--eval-episodes` init states after its last update.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import tyro

from bench_common import cpu_model, write_result
from faster_vla.runs.config import TrainConfig
from faster_vla.runs.loop import train
from faster_vla.runs.run import Run
from faster_vla.runs.config import TRAIN_CONFIGS
from faster_vla.libero.env import LiberoEnv
from faster_vla.runs.checkpoint import RunCheckpointer
from faster_vla.runs.logger import figure_png, read_metrics
from faster_vla.shared.files import atomic_write
from faster_vla.rl.selection import SelectionConfig

Method = Literal["base", "expo", "faster_expo"]
RULES: dict[str, str] = {"base": "base", "expo": "best_of_n", "faster_expo": "faster"}
LABELS: dict[str, str] = {"base": "base π0.5", "expo": "EXPO (best-of-N)", "faster_expo": "FASTER-EXPO"}
DONE_FILE = "reproduce_done.json"  # written in a run folder once its budget is spent


@dataclasses.dataclass(frozen=True)
class ReproduceArgs:
    """FASTER-EXPO vs EXPO vs base under one env-step budget, ≥3 seeds each, with FLOPs and timings."""

    out: Path = Path("runs/reproduce")
    """Folder of the runs (out/runs/<method>_task<t>_seed<s>) and the report."""
    base_config: str = "cpu_small_faster_expo"
    """Named train config every run starts from (actor, env, critics, update schedule)."""
    tasks: tuple[int, ...] = ()
    """libero_90 task ids; empty: the base config's task."""
    methods: tuple[Method, ...] = ("base", "expo", "faster_expo")
    """Methods to run: base (frozen policy), expo (denoise N, edit, argmax Q), faster_expo (score N seeds)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (init-state order, noises, critics, replay sampling)."""
    env_step_budget: int = 4000
    """Env steps per run: the same for every method."""
    num_candidates: int = 8
    """N: candidates EXPO denoises, seeds FASTER scores (the paper's VLA setting: 8)."""
    eval_episodes: int = 10
    """Greedy evaluation episodes at the end of each run (init states 0..n-1)."""
    updates_per_episode: int | None = None
    """Learner updates after each episode; None: the base config's."""
    edit_init_temperature: float | None = None
    """EXPO's initial α of the edit step; None: the base config's."""
    bins: int = 8
    """Env-step bins of the success curve."""
    timing_rounds: int = 20
    """Alternated timing rounds of acting and updating, after the runs."""
    report_only: bool = False
    """Do not run anything missing: report on the complete runs in `out`."""


def run_config(args: ReproduceArgs, method: str, task: int, seed: int) -> TrainConfig:
    base = TRAIN_CONFIGS[args.base_config][1]
    if args.updates_per_episode is not None:
        base = dataclasses.replace(base, updates_per_episode=args.updates_per_episode)
    if args.edit_init_temperature is not None:
        base = dataclasses.replace(base, critics=dataclasses.replace(
            base.critics, edit_init_temperature=args.edit_init_temperature))
    n = 1 if method == "base" else args.num_candidates
    return dataclasses.replace(
        base, run_dir=args.out / "runs" / f"{method}_task{task}_seed{seed}", seed=seed,
        env=dataclasses.replace(base.env, task=task), selection=SelectionConfig(RULES[method], n, 0.0),
        episodes=10**6, env_step_budget=args.env_step_budget, eval_every=0, eval_episodes=args.eval_episodes,
        progress=False, wandb_mode="disabled")


def ensure_run(config: TrainConfig, *, report_only: bool) -> dict[str, Any] | None:
    """Runs (or resumes) one run to its budget unless it is complete; returns its done record, or None."""
    done = config.run_dir / DONE_FILE
    if done.is_file():
        return json.loads(done.read_text())
    if report_only:
        return None
    resume = RunCheckpointer(config.run_dir / "checkpoints").latest_episode is not None
    print(f"{'resuming' if resume else 'running'} {config.run_dir}", flush=True)
    start = time.perf_counter()
    result = train(dataclasses.replace(config, resume=resume), log=lambda *_: None)
    record = {**result, "seconds_this_process": time.perf_counter() - start}
    atomic_write(done, (json.dumps(record, indent=1) + "\n").encode())
    return record


def curve(records: list[dict], budget: int, bins: int) -> dict[str, list[float]]:
    """Success rate of the training episodes in each env-step bin, and the cumulative FLOPs at its end."""
    edges = np.linspace(0, budget, bins + 1)
    steps = np.array([r["env_steps"] for r in records], float)
    success = np.array([r["train/success"] for r in records], float)
    flops = np.array([r["flops"] for r in records], float)
    rates, flops_at = [], []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        # An episode belongs to the bin its last step falls in; the run's last episode may end past the budget.
        inside = (steps > lo) & ((steps <= hi) | (i == bins - 1))
        rates.append(float(success[inside].mean()) if inside.any() else float("nan"))
        upto = (steps <= hi) | (i == bins - 1)
        flops_at.append(float(flops[upto].max()) if upto.any() else float("nan"))
    return {"env_steps": [float(x) for x in edges[1:]], "success": rates, "flops": flops_at}


def time_side_by_side(configs: dict[str, TrainConfig], rounds: int) -> dict[str, dict[str, float]]:
    """Median wall time of one decision (each method's own rule, greedy) on the same observation, and of one
    update on each run's own replay; the methods alternate within each round so machine load hits all alike."""
    runs = {}
    for method, config in configs.items():
        run = Run(dataclasses.replace(config, resume=True), log=lambda *_: None)
        if not run.restore():
            raise FileNotFoundError(f"{config.run_dir} has no checkpoint to time")
        runs[method] = run
    with LiberoEnv(next(iter(configs.values())).env) as env:
        obs = env.reset(0)
    acts: dict[str, list[float]] = {m: [] for m in runs}
    updates: dict[str, list[float]] = {m: [] for m in runs if configs[m].selection.rule != "base"}
    key = jax.random.key(0)
    for r in range(rounds + 1):  # round 0 compiles
        for method, run in runs.items():
            key, sub = jax.random.split(key)
            start = time.perf_counter()
            run.agent.act(run.learner, obs, selection=run.eval_selection, rng=sub)
            if r:
                acts[method].append(time.perf_counter() - start)
            if method in updates:
                start = time.perf_counter()
                run.update()
                if r:
                    updates[method].append(time.perf_counter() - start)
    for run in runs.values():
        run.close()
    return {m: {"act_ms": 1e3 * statistics.median(acts[m]),
                "update_ms": 1e3 * statistics.median(updates[m]) if m in updates else float("nan")} for m in runs}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if np.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _pct(x: float) -> str:
    return f"{x:.0%}" if np.isfinite(x) else "–"


def markdown_table(results: dict[str, Any]) -> str:
    rows = results["methods"]
    ref = rows.get("expo")
    lines = ["| method | seeds | final eval success | training success | first → last bin | acting FLOPs | / EXPO "
             "| all FLOPs | / EXPO | decision latency | / EXPO | update time | / EXPO |", "|" + "---|" * 13]
    nan = float("nan")
    rt = results["timing"].get("expo", {})

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}×" if b and np.isfinite(a) and np.isfinite(b) else "–"

    def ms(x: float) -> str:
        return f"{x:.0f} ms" if np.isfinite(x) else "–"

    for method, row in rows.items():
        t = results["timing"].get(method, {})
        lines.append(
            f"| {LABELS[method]} | {len(row['runs'])} | {_pct(row['final_mean'])} ± {_pct(row['final_std'])} | "
            f"{_pct(row['train_mean'])} ± {_pct(row['train_std'])} | "
            f"{_pct(row['first_bin_mean'])} → {_pct(row['last_bin_mean'])} | {row['acting_flops_mean']:.3g} | "
            f"{ratio(row['acting_flops_mean'], ref['acting_flops_mean'] if ref else None)} | "
            f"{row['flops_mean']:.3g} | {ratio(row['flops_mean'], ref['flops_mean'] if ref else None)} | "
            f"{ms(t.get('act_ms', nan))} | {ratio(t.get('act_ms', nan), rt.get('act_ms'))} | "
            f"{ms(t.get('update_ms', nan))} | {ratio(t.get('update_ms', nan), rt.get('update_ms'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """The two figures (success per env-step bin against env steps, and against cumulative FLOPs)."""
    written = []
    for x_key, label, name, log_x in (("env_steps", "env steps", "success_vs_env_steps.png", False),
                                      ("flops", "cumulative FLOPs (acting + cache + updates)",
                                       "success_vs_flops.png", True)):
        def draw(fig: Any, x_key: str = x_key, label: str = label, log_x: bool = log_x) -> None:
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a bin no seed has an episode in
            ax = fig.add_subplot()
            for method, row in results["methods"].items():
                x = np.nanmean(np.array(row["curves"][x_key], float), axis=0)
                y = np.array(row["curves"]["success"], float)
                mean, std = np.nanmean(y, axis=0), np.nanstd(y, axis=0)
                ok = np.isfinite(x) & np.isfinite(mean) & (x > 0)  # bins no episode ended in have no point
                ax.plot(x[ok], mean[ok], marker="o", label=f"{LABELS[method]} ({len(y)} seeds)")
                ax.fill_between(x[ok], np.clip(mean - std, 0, 1)[ok], np.clip(mean + std, 0, 1)[ok], alpha=0.2)
            ax.set_xlabel(label)
            ax.set_ylabel("success of training episodes")
            ax.set_ylim(-0.02, 1.02)
            if log_x:
                ax.set_xscale("log")
            ax.set_title(f"libero_90 task(s) {results['tasks']}, {results['env_step_budget']} env steps per run")
            ax.legend()

        with warnings.catch_warnings():
            atomic_write(out / name, figure_png(draw, (6.4, 4.2)))
        written.append(out / name)
    return written


def main(args: ReproduceArgs) -> dict[str, Any]:
    base = TRAIN_CONFIGS[args.base_config][1]
    tasks = args.tasks or (int(base.env.task),)
    configs = {(m, t, s): run_config(args, m, t, s) for t in tasks for s in args.seeds for m in args.methods}
    # Seeds outermost: a stopped reproduction has every method at the seeds it finished.
    done = {key: ensure_run(config, report_only=args.report_only) for key, config in configs.items()}
    methods: dict[str, Any] = {}
    for method in args.methods:
        keys = [k for k in configs if k[0] == method and done[k] is not None]
        if not keys:
            continue
        curves = [curve(read_metrics(configs[k].run_dir / "metrics.jsonl"), args.env_step_budget, args.bins) for k in keys]
        finals = [done[k]["eval_success"] for k in keys]
        flops = [done[k]["counters"]["acting_flops"] + done[k]["counters"]["cache_flops"]
                 + done[k]["counters"]["update_flops"] for k in keys]
        first, last = [c["success"][0] for c in curves], [c["success"][-1] for c in curves]
        train_rates = [done[k]["counters"]["successes"] / done[k]["counters"]["episodes"] for k in keys]
        methods[method] = {
            "runs": [str(configs[k].run_dir) for k in keys], "final_eval": finals,
            "final_mean": _mean_std(finals)[0], "final_std": _mean_std(finals)[1],
            "first_bin_mean": _mean_std(first)[0], "last_bin_mean": _mean_std(last)[0],
            "train_mean": _mean_std(train_rates)[0], "train_std": _mean_std(train_rates)[1],
            "flops_mean": float(np.mean(flops)),
            "acting_flops_mean": float(np.mean([done[k]["counters"]["acting_flops"] for k in keys])),
            "counters": [done[k]["counters"] for k in keys],
            "curves": {k: [c[k] for c in curves] for k in ("env_steps", "success", "flops")}}
    timing: dict[str, Any] = {}
    complete = [m for m in methods if all(done[(m, t, s)] for t in tasks for s in args.seeds)]
    if complete and args.timing_rounds > 0:
        timing = time_side_by_side({m: configs[(m, tasks[0], args.seeds[0])] for m in complete}, args.timing_rounds)
    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cpu": cpu_model(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()},
               "tasks": list(tasks), "env_step_budget": args.env_step_budget, "methods": methods, "timing": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(args.out / "results.json", results)
    table = markdown_table(results)
    atomic_write(args.out / "table.md", table.encode())
    plot(results, args.out)
    print(table)
    return results


if __name__ == "__main__":
    main(tyro.cli(ReproduceArgs))
