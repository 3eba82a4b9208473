"""One run of the reproduction grid, in its own process: train (or resume) it, then write its compact record.

`benchmarks/reproduce.py` starts this script once per run (up to `--parallel` at a time) with a job file it
wrote into the run folder: the run's name, method, task and seed, its full `TrainConfig` and where its record
goes. The record is what the report reads, so that the report needs no run folder (checkpoints, replay and
plots stay in `runs/`; the records are small enough to commit):

    format, version        what this file is (RECORD_FORMAT, RECORD_VERSION)
    name, method, task, seed, command, cpu
    config                 the run's TrainConfig as JSON (as its config.json)
    counters               episodes, env steps, successes, updates, FLOPs by part, wall time by stage
    final_eval             the greedy evaluation after the last episode: its rate and, per init state,
                           [init_state, success, steps]
    metric_columns/_rows   metrics.jsonl, one row per training episode, without the per-stage timings

A process holds an exclusive lock on its run folder while it runs, so a second one started on the same run
(say by a rerun of reproduce.py while an orphan of the first still trains) stops at once instead of writing
beside it.

    .venv/bin/python benchmarks/reproduce_run.py --job runs/reproduce/expo_task20_seed0/reproduce_job.json
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from pathlib import Path
from typing import Any

import tyro

from bench_common import cpu_model
from faster_vla.libero.rollout import open_envs
from faster_vla.runs.config import TrainConfig
from faster_vla.runs.logger import CONFIG_FILE, METRICS_FILE, read_metrics
from faster_vla.runs.loop import train
from faster_vla.runs.run import Run
from faster_vla.shared.files import atomic_write
from faster_vla.shared.jsonable import from_jsonable

RECORD_FORMAT = "faster_vla.reproduce_record"
RECORD_VERSION = 1
JOB_FILE = "reproduce_job.json"
LOCK_FILE = ".reproduce.lock"
DROPPED_METRICS = ("logged_at", "train/success_rate", "train/recent_success_rate")
"""Metrics left out of a record: the wall-clock stamp, and rates the report recomputes from train/success."""
DROPPED_PREFIXES = ("time_ms/", "time_s/", "envs/")
"""Per-stage timings and worker counts: the record keeps their totals in `counters`."""


@dataclasses.dataclass(frozen=True)
class RunJobArgs:
    """Train (or resume) one run of the reproduction grid and write its record."""

    job: Path
    """The job file reproduce.py wrote into the run folder (JOB_FILE)."""


def run_job(job: dict[str, Any]) -> Path:
    """Trains or resumes the job's run to its end, then writes its record atomically; returns the record path."""
    config = from_jsonable(TrainConfig, job["config"])
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with open(config.run_dir / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{config.run_dir} is locked by another process training {job['name']}: stop it "
                               "(or wait for it) before running this run again") from None
        resume = (config.run_dir / CONFIG_FILE).is_file()
        print(f"{'resuming' if resume else 'starting'} {job['name']} in {config.run_dir}", flush=True)
        result = train(dataclasses.replace(config, resume=resume))
        episodes = result["eval_episodes"]
        if episodes is None:  # finished before this process (stopped after its final eval, before its record)
            print(f"{job['name']} had finished; evaluating its last checkpoint again for the per-episode outcomes",
                  flush=True)
            episodes = final_eval(config)
        record = make_record(job, config, result["counters"], episodes)
        atomic_write(Path(job["record"]), dump_record(record).encode())
    return Path(job["record"])


def final_eval(config: TrainConfig) -> list[dict[str, Any]]:
    """The run's greedy evaluation from its latest checkpoint: the same init states and keys as the one the loop
    ran after the last episode (`Run.evaluate`), so the same outcomes."""
    run = Run(dataclasses.replace(config, resume=True), log=print)
    try:
        if not run.restore():
            raise FileNotFoundError(f"{config.run_dir} has no checkpoint to evaluate")
        with open_envs(config.env, 1, config.envs) as env:
            run.evaluate(env)
    finally:
        run.close()
    assert run.last_eval is not None
    return run.last_eval


def make_record(job: dict[str, Any], config: TrainConfig, counters: dict[str, Any],
                eval_episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The compact record of a finished run (see the module docstring)."""
    rows = [r for r in read_metrics(config.run_dir / METRICS_FILE) if "train/success" in r]
    if len(rows) != counters["episodes"]:
        raise ValueError(f"{config.run_dir / METRICS_FILE} holds {len(rows)} training episodes, the run's counters "
                         f"{counters['episodes']}: the log does not match the checkpoint")
    columns = sorted({k for r in rows for k in r if k not in DROPPED_METRICS
                      and not k.startswith(DROPPED_PREFIXES) and not isinstance(r[k], str)})  # numbers only
    final = [[int(e["init_state"]), bool(e["success"]), int(e["steps"])] for e in eval_episodes]
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
            **{k: job[k] for k in ("name", "method", "task", "seed", "command")}, "cpu": cpu_model(),
            "config": job["config"], "counters": counters,
            "final_eval": {"success_rate": sum(s for _, s, _ in final) / len(final), "episodes": final},
            "metric_columns": columns, "metric_rows": [[r.get(k) for k in columns] for r in rows]}


def dump_record(record: dict[str, Any]) -> str:
    """JSON with one top-level field, and one metrics row, per line: small diffs, readable in a pager."""
    lines = []
    for key, value in record.items():
        if key == "metric_rows":
            rows = ",\n  ".join(json.dumps(row, allow_nan=True) for row in value)
            lines.append(f"{json.dumps(key)}: [\n  {rows}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, allow_nan=True)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


if __name__ == "__main__":
    args = tyro.cli(RunJobArgs)
    print(f"record written: {run_job(json.loads(args.job.read_text()))}", flush=True)
