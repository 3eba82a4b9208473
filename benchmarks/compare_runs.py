"""Side-by-side comparison of finished (or running) `faster-vla train` runs, episode by episode.

Runs that share a task and a seed start episode i from the same init state (`finetune.train` draws it from
(seed, i)), so their training episodes are paired: this script reports, per block of episodes, each run's
successes and, for every run against the first, the discordant pairs and an exact McNemar p-value. It also
draws the moving success rate (the runs' own `RECENT_EPISODES` window) against episodes and against
cumulative FLOPs, with the greedy evaluations as markers.

    .venv/bin/python benchmarks/compare_runs.py --runs runs/long_base runs/long_faster \\
        --labels "base π0.5" "FASTER-EXPO" --block 50 --out benchmarks/results/long_stove

Writes `results.json`, `table.md`, `success_vs_episodes.png` and `success_vs_flops.png` in `--out`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from bench_common import write_result
from faster_vla.runs.loop import RECENT_EPISODES
from faster_vla.runs.logger import figure_png, read_metrics
from faster_vla.shared.files import atomic_write


@dataclasses.dataclass(frozen=True)
class CompareArgs:
    """Paired per-block success of runs with the same task and seed, and their moving success curves."""

    runs: tuple[Path, ...]
    """Run folders (each with config.json and metrics.jsonl); the first is the reference."""
    labels: tuple[str, ...] = ()
    """One label per run (default: the folder names)."""
    block: int = 50
    """Episodes per block of the table."""
    out: Path = Path("runs/compare")
    """Folder of the report."""


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pair counts (b: only the reference succeeded, c:
    only the other run did): under no difference each discordant pair is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's config and its per-episode outcomes, FLOPs and evaluations, from its folder."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fine-tuning run folder (it needs config.json and "
                                "metrics.jsonl); pass the --run-dir given to `faster-vla train`")
    config = json.loads(config_path.read_text())
    records = [r for r in read_metrics(metrics_path) if "train/success" in r]
    if not records:
        raise ValueError(f"{run_dir} has no finished training episode yet")
    return {
        "task": config["env"]["task"], "seed": config["seed"], "rule": config["selection"]["rule"],
        "success": np.array([r["train/success"] for r in records], float),
        "env_steps": np.array([r["env_steps"] for r in records], float),
        "flops": np.array([r["flops"] for r in records], float),
        "evals": [(int(r["episodes"]), float(r["flops"]), float(r["eval/success_rate"]))
                  for r in records if "eval/success_rate" in r],
    }


def moving_rate(success: np.ndarray, window: int) -> np.ndarray:
    """Mean of each episode's outcome and the window-1 before it (fewer at the start), as the runs log it."""
    csum = np.concatenate([[0.0], np.cumsum(success)])
    i = np.arange(1, len(success) + 1)
    lo = np.maximum(0, i - window)
    return (csum[i] - csum[lo]) / (i - lo)


def compare(args: CompareArgs) -> dict[str, Any]:
    if len(args.runs) < 2:
        raise ValueError("pass at least two --runs to compare")
    if args.labels and len(args.labels) != len(args.runs):
        raise ValueError(f"pass one --labels entry per run: {len(args.runs)} runs, {len(args.labels)} labels")
    if args.block < 1:
        raise ValueError(f"--block must be >= 1, got {args.block}")
    labels = list(args.labels) or [p.name for p in args.runs]
    runs = [load_run(p) for p in args.runs]
    ref = runs[0]
    for path, run in zip(args.runs[1:], runs[1:]):
        if (run["task"], run["seed"]) != (ref["task"], ref["seed"]):
            raise ValueError(f"{path} has task {run['task']} and seed {run['seed']}, {args.runs[0]} task "
                             f"{ref['task']} and seed {ref['seed']}: their episodes are not paired; compare "
                             "runs started with the same --env.task and --seed")
    n = min(len(r["success"]) for r in runs)  # the episodes every run has finished
    blocks = []
    for start in range(0, n, args.block):
        stop = min(start + args.block, n)
        row: dict[str, Any] = {"episodes": [start + 1, stop],
                               "successes": [int(r["success"][start:stop].sum()) for r in runs]}
        pairs = []
        for run in runs[1:]:
            a, o = ref["success"][start:stop].astype(bool), run["success"][start:stop].astype(bool)
            b, c = int((a & ~o).sum()), int((~a & o).sum())
            pairs.append({"only_reference": b, "only_this": c, "mcnemar_p": mcnemar_p(b, c)})
        row["vs_reference"] = pairs
        blocks.append(row)
    total = [int(r["success"][:n].sum()) for r in runs]
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "runs": {label: {"folder": str(p), "rule": r["rule"], "episodes": len(r["success"]),
                               "flops": float(r["flops"][-1]), "evals": r["evals"]}
                       for label, p, r in zip(labels, args.runs, runs)},
              "task": ref["task"], "seed": ref["seed"], "paired_episodes": n, "block": args.block,
              "blocks": blocks, "total_successes": total}
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(args.out / "results.json", result)
    table = markdown_table(result, labels)
    atomic_write(args.out / "table.md", table.encode())
    plot(runs, labels, args.out)
    print(table)
    return result


def markdown_table(result: dict[str, Any], labels: list[str]) -> str:
    head = ["episodes", *labels] + [f"{label} vs {labels[0]}: pairs only one won (p)" for label in labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["blocks"]:
        lo, hi = row["episodes"]
        size = hi - lo + 1
        cells = [f"{lo}–{hi}", *[f"{s}/{size}" for s in row["successes"]]]
        cells += [f"{p['only_reference']} vs {p['only_this']} ({p['mcnemar_p']:.2g})" for p in row["vs_reference"]]
        lines.append("| " + " | ".join(cells) + " |")
    n = result["paired_episodes"]
    lines.append("| all | " + " | ".join(f"{s}/{n}" for s in result["total_successes"]) + " |"
                 + " |" * (len(labels) - 1))
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], labels: list[str], out: Path) -> None:
    for x_name, name, log_x in (("episodes", "success_vs_episodes.png", False),
                                ("cumulative FLOPs", "success_vs_flops.png", True)):
        def draw(fig: Any, x_name: str = x_name, log_x: bool = log_x) -> None:
            ax = fig.add_subplot()
            for label, run in zip(labels, runs):
                x = np.arange(1, len(run["success"]) + 1) if x_name == "episodes" else run["flops"]
                line, = ax.plot(x, moving_rate(run["success"], RECENT_EPISODES),
                                label=f"{label}: training, last {RECENT_EPISODES} episodes")
                if run["evals"]:
                    ex = [e[0] if x_name == "episodes" else e[1] for e in run["evals"]]
                    ax.plot(ex, [e[2] for e in run["evals"]], "o--", color=line.get_color(),
                            label=f"{label}: greedy evaluation")
            ax.set_xlabel(x_name)
            ax.set_ylabel("success rate")
            ax.set_ylim(-0.02, 1.02)
            if log_x:
                ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)

        atomic_write(out / name, figure_png(draw, (6.4, 4.2)))


if __name__ == "__main__":
    compare(tyro.cli(CompareArgs))
