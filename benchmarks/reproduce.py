"""The paper's central claim at CPU scale (issue 18): FASTER-EXPO vs EXPO vs the base policy over tasks and
seeds, with the ablations that split the gain between choosing the seed and editing the chunk.

Not a test: days of CPU. Every (method, task, seed) is an ordinary fine-tuning run of the named config
`--base-config` (the built-in small π0.5 and the CPU configs' learner settings by default) for `--episodes`
training episodes; only the selection rule differs between methods:

    base         the frozen policy, one noise per decision
    expo         EXPO: denoise N, edit each, keep the argmax of Q
    faster_expo  FASTER-EXPO: Q^dn scores N seeds, the winner is denoised and edited
    faster_idql  ablation, selection without edit: Q^dn picks the seed, no edit step
    expo_n1      ablation, edit without selection: EXPO with N = 1
    <method>_every_window (expo, faster_expo, faster_idql, expo_n1)
                 the method trained on the windows starting at every step, as the paper's appendix B does
                 (`window_starts="step"`, observations rendered every step), where the methods above train on
                 the windows starting at chunk boundaries: on CPU every-step rendering and caching cost several
                 times a run, so the default grid keeps chunk windows, and these, run beside their chunk-window
                 twins, size what that choice changes, for each method and for the claims between them. Not in
                 the default grid: `--tasks 20 33 --seeds 0 1 2 --ablations faster_expo_every_window
                 expo_every_window --ablation-tasks 20 33 --report-dir <elsewhere>`.

The main methods run on every `--tasks` task, the ablations on every `--ablation-tasks` task, each over
`--seeds`. Runs with the same task and seed start training episode i from the same init state
(`faster_vla.runs.loop.episode_init_state`), so their episodes are paired; the report checks it.

Runs are resumable one by one: a run whose record exists is read back, a run folder without one is resumed
from its last checkpoint. `--parallel P` trains up to P runs side by side, each in its own process
(`reproduce_run.py`), which writes the run's compact record (`--records/<name>.json`, atomically) the moment
it ends: a stopped job loses at most the runs in flight. Then the report is written from the records alone
(`reproduce_report.py`: `report.md`, `report.json` and plots in `--report-dir`).

    .venv/bin/python benchmarks/reproduce.py --parallel 2          # the grid: 24 runs of 200 episodes
    .venv/bin/python benchmarks/reproduce.py --report-only         # the report from the committed records
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import tyro

from faster_vla.libero.env import check_libero_installed, resolve_task
from faster_vla.rl.selection import SelectionConfig
from faster_vla.runs.config import TRAIN_CONFIGS, TrainConfig
from faster_vla.shared.files import atomic_write, ensure_writable_dir
from faster_vla.shared.jsonable import json_diff, to_jsonable
from reproduce_report import EVERY_WINDOW_SUFFIX, ReportSettings, chunk_twin, write_report
from reproduce_run import JOB_FILE

Method = Literal["base", "expo", "faster_expo", "faster_idql", "expo_n1", "expo_every_window",
                 "faster_expo_every_window", "faster_idql_every_window", "expo_n1_every_window"]
CHUNK_RULES: dict[str, tuple[str, int | None]] = {
    "base": ("base", 1), "expo": ("best_of_n", None), "faster_expo": ("faster", None),
    "faster_idql": ("faster_idql", None), "expo_n1": ("best_of_n", 1)}
RULES: dict[str, tuple[str, int | None]] = {
    **CHUNK_RULES, **{f"{m}{EVERY_WINDOW_SUFFIX}": rule for m, rule in CHUNK_RULES.items() if m != "base"}}
"""Each method's selection rule and its N (None: --num-candidates). A method named with EVERY_WINDOW_SUFFIX
trains on the windows starting at every step (and so renders every step) with its chunk-window twin's rule;
the frozen base policy trains nothing, so it has no such twin."""
NOT_PART_OF_THE_RUN = ("run_dir", "resume", "progress", "wandb_mode", "envs")
"""Config fields a record may differ in from the grid's: where and how a run ran, not what it ran."""


@dataclasses.dataclass(frozen=True)
class ReproduceArgs:
    """FASTER-EXPO vs EXPO vs base over tasks and seeds, plus ablations; resumable, parallel, with a report."""

    out: Path = Path("runs/reproduce")
    """Folder of the run folders (out/<method>_task<t>_seed<s>, with checkpoints and each run's log)."""
    records: Path = Path("benchmarks/results/reproduce/runs")
    """Folder of the runs' compact records (<name>.json): what the report reads, and what gets committed."""
    report_dir: Path = Path("benchmarks/results/reproduce")
    """Folder of the report (report.md, report.json, plots)."""
    base_config: str = "cpu_small_faster_expo"
    """Named train config every run starts from (actor, env, critics, update schedule)."""
    tasks: tuple[int, ...] = (20, 33)
    """libero_90 tasks of the main methods (20: turn on the stove, 33: the microwave)."""
    methods: tuple[Method, ...] = ("base", "expo", "faster_expo")
    """Main methods, run on every task of --tasks."""
    ablation_tasks: tuple[int, ...] = (20,)
    """Tasks of the ablations."""
    ablations: tuple[Method, ...] = ("faster_idql", "expo_n1")
    """Methods run only on --ablation-tasks."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (init-state order, noises, critics, replay sampling): at least 3 for a result."""
    episodes: int = 200
    """Training episodes per run (the main command's length)."""
    env_step_budget: int | None = None
    """Also stop a run at this many env steps (None: episodes alone size the runs)."""
    num_candidates: int = 8
    """N: candidates EXPO denoises, seeds FASTER scores (the paper's VLA setting: 8)."""
    eval_episodes: int | None = None
    """Greedy evaluation episodes after the last one (init states 0..n-1); None: the base config's."""
    updates_per_episode: int | None = None
    """Learner updates after each episode; None: the base config's."""
    edit_init_temperature: float | None = None
    """EXPO's initial α of the edit step; None: the base config's."""
    max_steps: int | None = None
    """Env steps per episode; None: the base config's (for quick checks of the runner only)."""
    parallel: int = 1
    """Runs trained side by side, each in its own process (on CPU each wants about a core)."""
    report_only: bool = False
    """Run nothing: write the report from the records there are."""
    report: ReportSettings = ReportSettings()
    """Blocks, late episodes and thresholds of the report."""

    def __post_init__(self) -> None:
        if self.base_config not in TRAIN_CONFIGS:
            raise ValueError(f"base_config {self.base_config!r} is not a named train config; choose one of "
                             f"{sorted(TRAIN_CONFIGS)}")
        for name in ("tasks", "methods", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("episodes", "num_candidates", "parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.ablations and not self.ablation_tasks:
            raise ValueError("ablations need --ablation-tasks (or pass --ablations with no method)")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    method: str
    task: int
    seed: int
    config: TrainConfig


def grid(args: ReproduceArgs) -> list[RunSpec]:
    """Every run, seeds outermost: a stopped grid has every method at the seeds it got through."""
    base = TRAIN_CONFIGS[args.base_config][1]
    if args.updates_per_episode is not None:
        base = dataclasses.replace(base, updates_per_episode=args.updates_per_episode)
    if args.edit_init_temperature is not None:
        base = dataclasses.replace(base, critics=dataclasses.replace(
            base.critics, edit_init_temperature=args.edit_init_temperature))
    if args.max_steps is not None:
        base = dataclasses.replace(base, env=dataclasses.replace(base.env, max_steps=args.max_steps))
    cells = [(m, t) for t in args.tasks for m in args.methods]
    cells += [(m, t) for t in args.ablation_tasks for m in args.ablations if (m, t) not in cells]
    specs = []
    for seed in args.seeds:
        for method, task in cells:
            rule, n = RULES[method]
            n = args.num_candidates if n is None else n
            name = f"{method}_task{task}_seed{seed}"
            env = dataclasses.replace(base.env, task=task)
            every_window = chunk_twin(method) is not None
            if every_window:
                env = dataclasses.replace(env, render_mode="every_step")
            config = dataclasses.replace(
                base, run_dir=args.out / name, seed=seed, env=env,
                window_starts="step" if every_window else base.window_starts,
                selection=SelectionConfig(rule, n, 0.0), cache_seeds=max(base.cache_seeds, n),
                episodes=args.episodes, env_step_budget=args.env_step_budget, eval_every=0,
                eval_episodes=args.eval_episodes or base.eval_episodes, progress=False, wandb_mode="disabled")
            specs.append(RunSpec(name, method, task, seed, config))
    return specs


def _what_ran(config: Any) -> dict[str, Any]:
    data = config if isinstance(config, dict) else to_jsonable(config, strict=False)
    return {k: v for k, v in data.items() if k not in NOT_PART_OF_THE_RUN}


def check_records(specs: list[RunSpec], records: Path) -> list[RunSpec]:
    """The runs without a record; a record made with another config than its run's here is an error (before
    anything runs), since it would be reported as this grid's."""
    todo = []
    for spec in specs:
        path = records / f"{spec.name}.json"
        if not path.is_file():
            todo.append(spec)
            continue
        try:
            stored = json.loads(path.read_text())["config"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a run record ({exc!r}); delete it to run {spec.name} again") from exc
        if _what_ran(stored) != _what_ran(spec.config):
            diff = "\n  ".join(json_diff(_what_ran(stored), _what_ran(spec.config)))
            raise ValueError(f"{path} was made with another config than this grid's {spec.name} (record → now):\n  "
                             f"{diff}\nuse another --records folder for a different grid")
    return todo


def run_all(todo: list[RunSpec], args: ReproduceArgs, command: str) -> list[str]:
    """Trains the runs, up to `args.parallel` at a time, each in a `reproduce_run.py` process writing its record;
    returns one line per run that failed (its log's tail)."""
    script = Path(__file__).resolve().with_name("reproduce_run.py")
    pending, running, failed = list(todo), {}, []
    while pending or running:
        while pending and len(running) < args.parallel:
            spec = pending.pop(0)
            ensure_writable_dir(spec.config.run_dir)
            job = {"name": spec.name, "method": spec.method, "task": spec.task, "seed": spec.seed,
                   "command": command, "record": str(args.records / f"{spec.name}.json"),
                   "config": to_jsonable(spec.config, strict=False)}
            atomic_write(spec.config.run_dir / JOB_FILE, (json.dumps(job, indent=1) + "\n").encode())
            log = open(spec.config.run_dir / "reproduce.log", "ab")
            proc = subprocess.Popen([sys.executable, str(script), "--job", str(spec.config.run_dir / JOB_FILE)],
                                    stdout=log, stderr=subprocess.STDOUT)
            running[spec.name] = (proc, log, spec)
            print(f"started {spec.name} (pid {proc.pid}; log {spec.config.run_dir / 'reproduce.log'})", flush=True)
        time.sleep(1.0)
        for name, (proc, log, spec) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode == 0:
                print(f"finished {name}: {args.records / (name + '.json')}", flush=True)
            else:
                tail = (spec.config.run_dir / "reproduce.log").read_text(errors="replace")[-2000:]
                failed.append(f"{name} exited with {proc.returncode}; the end of its log:\n{tail}")
                print(f"FAILED {name} (exit {proc.returncode}); see {spec.config.run_dir / 'reproduce.log'}", flush=True)
    return failed


def main(args: ReproduceArgs) -> str:
    """Runs what is missing (unless --report-only), then writes and returns the report."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    specs = grid(args)
    todo = check_records(specs, args.records)
    failed: list[str] = []
    if todo and not args.report_only:
        check_libero_installed()  # and bad tasks fail here, not in P processes after their models are built
        for spec in todo:
            resolve_task(spec.config.env.suite, spec.config.env.task)
        ensure_writable_dir(args.records, "records folder")
        print(f"{len(specs) - len(todo)} of {len(specs)} runs have records; training {len(todo)}, "
              f"{args.parallel} at a time", flush=True)
        failed = run_all(todo, args, command)
    expected = [{"name": s.name, "method": s.method, "task": s.task, "seed": s.seed} for s in specs]
    text = write_report(args.records, expected, args.report, args.report_dir, command)
    print(text)
    if failed:
        raise SystemExit("runs failed (the report holds the others):\n\n" + "\n\n".join(failed))
    return text


if __name__ == "__main__":
    main(tyro.cli(ReproduceArgs))
