"""Scoring policies on LIBERO tasks: the base π0.5, or a fine-tuning run's checkpoint; and task selection.

`evaluate` runs `trials` episodes per task on the suite's init states 0..trials-1 (openpi's protocol uses 50)
and writes per-task success to a JSON file atomically. A run's checkpoint acts with the run's own selection
rule, greedily (its learner's critics and edit policy); the base policy acts with the `base` rule, which is
exactly `Policy.infer`. `select_tasks` is the paper's protocol for picking held-out libero_90 tasks worth
fine-tuning on: those where the base policy scores within [low, high] (40–60 %).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from faster_vla.actor_source import ActorSource
from faster_vla.agent import Agent
from faster_vla.finetune import TrainConfig, learner_config
from faster_vla.learner import Learner
from faster_vla.policies.config import get_preset
from faster_vla.libero_env import LiberoEnv, LiberoEnvConfig, check_libero_installed, resolve_task
from faster_vla.run_checkpoint import RunCheckpointer
from faster_vla.run_log import atomic_write, ensure_writable_dir
from faster_vla.selection import SelectionConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Score a policy on LIBERO tasks: per-task success over fixed init states, written to `output`."""

    actor: ActorSource = ActorSource()
    """The π0.5 policy (ignored with --run-dir: the run's own actor is used)."""
    run_dir: Path | None = None
    """A fine-tuning run folder: evaluate its checkpoint with its selection rule (greedy) instead of the base policy."""
    checkpoint: Literal["best", "latest"] = "best"
    """Which of the run's checkpoints: best by eval success (falls back to latest), or latest."""
    suite: str = "libero_90"
    """Task suite."""
    tasks: tuple[str, ...] = ("0",)
    """Task ids or names within the suite."""
    trials: int = 10
    """Episodes per task, on the suite's init states 0..trials-1 (openpi's evaluation uses 50)."""
    max_steps: int | None = None
    """Steps per episode; None: the suite's default (libero_90: 400)."""
    render_mode: Literal["every_step", "chunk_boundary"] = "chunk_boundary"
    """Render every step or only where the policy needs an observation (same episodes, less CPU)."""
    output: Path = Path("eval.json")
    """Where to write the per-task results (JSON, written atomically)."""
    seed: int = 7
    """Seed of the env and the noises."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if not self.tasks:
            raise ValueError("give at least one task (--tasks 0 1 ... or task names)")


@dataclasses.dataclass(frozen=True)
class SelectTasksConfig:
    """Score the base policy on libero_90 tasks and keep those in [low, high] success (the paper's 40–60 %)."""

    eval: EvalConfig = EvalConfig(tasks=tuple(str(i) for i in range(90)), trials=10, output=Path("tasks.json"))
    """The evaluation (its --eval.tasks, --eval.trials, --eval.actor.*, --eval.output)."""
    low: float = 0.4
    """Lowest base success kept."""
    high: float = 0.6
    """Highest base success kept."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")


def _task_arg(task: str) -> int | str:
    return int(task) if task.strip().lstrip("-").isdigit() else task


def from_jsonable(cls: Any, data: Any) -> Any:
    """Rebuilds a (nested, frozen) dataclass from its `run_log.to_jsonable` form (a run's config.json)."""
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        fields = {f.name: from_jsonable(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
        return cls(**fields)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        for arg in typing.get_args(cls):
            if arg is type(None):
                continue
            try:
                return from_jsonable(arg, data)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"{data!r} fits none of {cls}")
    if origin is tuple:
        args = typing.get_args(cls)
        inner = args[0] if args else Any
        return tuple(from_jsonable(inner, x) for x in data)
    if origin is Literal or cls is Any:
        return data
    if cls is Path:
        return Path(data)
    if cls in (int, float, str, bool):
        if cls is int and isinstance(data, str) and not data.lstrip("-").isdigit():
            raise ValueError(f"{data!r} is not an int")
        return cls(data)
    return data


def load_run(run_dir: Path, which: Literal["best", "latest"] = "best") -> tuple[TrainConfig, Learner, int]:
    """A run's config and the learner of its best (or latest) checkpoint, and that checkpoint's episode."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fine-tuning run folder (no config.json); pass the --run-dir "
                                "given to `faster-vla train`")
    config = from_jsonable(TrainConfig, json.loads(config_path.read_text()))
    checkpointer = RunCheckpointer(Path(run_dir) / "checkpoints", keep_last=config.keep_last, keep_best=config.keep_best)
    episode = checkpointer.best_episode if which == "best" else None
    episode = checkpointer.latest_episode if episode is None else episode
    if episode is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    lconfig = learner_config(config, get_preset(config.actor.preset))
    template = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=config.seed)
    return config, checkpointer.restore(episode, template).learner, episode


def run_episodes(agent: Agent, learner: Learner, selection: SelectionConfig, env: LiberoEnv, trials: int,
                 seed: int) -> list[bool]:
    """`trials` episodes on init states 0..trials-1; success of each."""
    key = jax.random.key(seed)
    successes = []
    for i in range(min(trials, env.num_init_states)):
        obs = env.reset(i)
        k = jax.random.fold_in(key, i)
        done = truncated = False
        while not (done or truncated):
            k, sub = jax.random.split(k)
            decision = agent.act(learner, obs, selection=selection, rng=sub)
            result = env.step_chunk(decision.actions)
            obs, done, truncated = result.obs, result.done, result.truncated
        successes.append(bool(done))
    return successes


def evaluate(config: EvalConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Scores the policy on every task; writes and returns {'tasks': {id: {...}}, 'mean_success': ...}."""
    check_libero_installed()
    tasks = [resolve_task(config.suite, _task_arg(t)) for t in config.tasks]  # bad names fail here, first
    ensure_writable_dir(Path(config.output).expanduser().resolve().parent, "output folder")
    if config.run_dir is not None:
        train_config, learner, episode = load_run(config.run_dir, config.checkpoint)
        source, selection = train_config.actor, dataclasses.replace(train_config.selection, temperature=0.0)
        lconfig = learner.config
        what = f"run {config.run_dir} checkpoint {episode} ({selection.rule})"
    else:
        source, selection = config.actor, SelectionConfig("base", num_candidates=1)
        what = f"base policy {config.actor.preset}"
    policy = source.build(policy_seed=config.seed)
    if config.run_dir is None:
        tconfig = TrainConfig(actor=source, selection=selection)
        lconfig = learner_config(tconfig, policy.actor.config)
        learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=0)  # unused by `base`
    agent = Agent(policy, lconfig, seed=config.seed)
    results: dict[str, Any] = {}
    for task in tasks:
        env_config = LiberoEnvConfig(suite=config.suite, task=task.task_id, max_steps=config.max_steps,
                                     seed=config.seed, render_mode=config.render_mode)
        with LiberoEnv(env_config) as env:
            successes = run_episodes(agent, learner, selection, env, config.trials, config.seed)
        rate = float(np.mean(successes))
        results[str(task.task_id)] = {"name": task.name, "instruction": task.instruction, "trials": len(successes),
                                      "successes": int(sum(successes)), "success_rate": rate}
        log(f"{what}: {config.suite} task {task.task_id} ({task.name}): {rate:.0%} of {len(successes)}")
    report = {"policy": what, "suite": config.suite, "tasks": results,
              "mean_success": float(np.mean([r["success_rate"] for r in results.values()]))}
    atomic_write(Path(config.output), (json.dumps(report, indent=2) + "\n").encode())
    return report


def select_tasks(config: SelectTasksConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates the base policy and adds the selection: tasks with success in [low, high]."""
    if config.eval.run_dir is not None:
        raise ValueError("select-tasks scores the BASE policy; drop --eval.run-dir")
    report = evaluate(config.eval, log=log)
    selected = [tid for tid, r in report["tasks"].items() if config.low <= r["success_rate"] <= config.high]
    report["selection"] = {"low": config.low, "high": config.high, "selected": selected}
    atomic_write(Path(config.eval.output), (json.dumps(report, indent=2) + "\n").encode())
    log(f"selected {len(selected)} task(s) with base success in [{config.low:.0%}, {config.high:.0%}]: {selected}")
    return report

