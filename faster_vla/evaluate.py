"""Scoring policies on LIBERO tasks: the base π0.5, a fine-tuning run's checkpoint or a bundle; task selection.

`evaluate` runs `trials` episodes per task on the suite's init states 0..trials-1 (openpi's protocol uses 50)
and writes per-task success to a JSON file atomically; `num_workers > 1` runs them in lockstep over env worker
processes (`faster_vla.rollout`), with the same per-episode keys. A run's checkpoint acts with the run's
own selection rule, greedily (its learner's critics and edit policy); the base policy acts with the `base`
rule, which is exactly `Policy.infer`. `select_tasks` is the paper's protocol for picking held-out libero_90
tasks worth fine-tuning on: those where the base policy scores within [low, high] (40–60 %).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from faster_vla.actor_source import ActorSource
from faster_vla.agent import Agent
from faster_vla.bundle import TunedPolicy, load_policy
from faster_vla.finetune import CriticConfig, TrainConfig, learner_config, load_run, load_trained_actor
from faster_vla.learner import Learner
from faster_vla.libero_env import LiberoEnvConfig, check_libero_installed, resolve_task
from faster_vla.rollout import check_num_workers, num_init_states, open_envs, run_episodes
from faster_vla.run_log import atomic_write, ensure_writable_dir
from faster_vla.selection import SelectionConfig


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95 % at z=1.96): sound at 0 or all successes and for
    few trials, where the normal approximation gives intervals outside [0, 1] or of zero width."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Score a policy on LIBERO tasks: per-task success over fixed init states, written to `output`."""

    actor: ActorSource = ActorSource()
    """The π0.5 policy (ignored with --run-dir: the run's own actor is used)."""
    run_dir: Path | None = None
    """A fine-tuning run folder: evaluate its checkpoint with its selection rule (greedy) instead of the base policy."""
    bundle: Path | None = None
    """An exported bundle (`faster-vla export`): evaluate it with its selection rule (greedy)."""
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
    num_workers: int = 1
    """Env worker processes stepping episodes in lockstep, the policy acting once per step on all of them (1: one
    env in this process). Each worker needs ~2 GB of RAM; on CPU rendering dominates a step, so use at most
    one worker per free core. Per-episode results are those of 1 worker up to float rounding."""

    def __post_init__(self) -> None:
        check_num_workers(self.num_workers)
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if not self.tasks:
            raise ValueError("give at least one task (--tasks 0 1 ... or task names)")
        if self.run_dir is not None and self.bundle is not None:
            raise ValueError("--run-dir and --bundle both name the policy to evaluate: pass one")


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


def evaluate(config: EvalConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Scores the policy on every task; writes and returns {'tasks': {id: {...}}, 'mean_success': ...}."""
    check_libero_installed()
    tasks = [resolve_task(config.suite, _task_arg(t)) for t in config.tasks]  # bad names fail here, first
    ensure_writable_dir(Path(config.output).expanduser().resolve().parent, "output folder")
    if config.bundle is not None:
        tuned = load_policy(config.bundle, seed=config.seed)
        if not isinstance(tuned, TunedPolicy):
            raise ValueError(f"{config.bundle} is an openpi checkpoint, not a bundle: evaluate it with "
                             "--actor.checkpoint")
        agent, learner, selection = tuned.agent, tuned.learner, tuned.selection
        what = f"bundle {config.bundle} ({selection.rule})"
    elif config.run_dir is not None:
        train_config, learner, episode = load_run(config.run_dir, config.checkpoint)
        source, selection = train_config.actor, dataclasses.replace(train_config.selection, temperature=0.0)
        lconfig = learner.config
        what = f"run {config.run_dir} checkpoint {episode} ({selection.rule})"
    else:
        source, selection = config.actor, SelectionConfig("base", num_candidates=1)
        what = f"base policy {config.actor.preset}"
    if config.bundle is None:
        policy = source.build(policy_seed=config.seed)
        if config.run_dir is not None:
            load_trained_actor(config.run_dir, train_config, episode, policy)  # its tuned actor, if it trained one
        else:
            # The base rule calls no critic: the smallest ones (building the default ~20M-parameter critics
            # took ~1 min on CPU for nothing).
            unused = CriticConfig(hidden_dims=(8,), num_members=2, feature_proj_dim=8, state_embed_dim=8)
            tconfig = TrainConfig(actor=source, selection=selection, critics=unused)
            lconfig = learner_config(tconfig, policy.actor.config)
            learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=0)
        agent = Agent(policy, lconfig, seed=config.seed)
    results: dict[str, Any] = {}
    # Camera images reach the policy at its own input size (resize-with-pad in the env, as in openpi's LIBERO
    # example and the recorded demonstrations), not resized twice.
    image_size = agent.actor.config.siglip.image_size
    for task in tasks:
        env_config = LiberoEnvConfig(suite=config.suite, task=task.task_id, max_steps=config.max_steps,
                                     seed=config.seed, render_mode=config.render_mode, image_size=image_size)
        with open_envs(env_config, min(config.num_workers, config.trials)) as env:
            init_states = range(min(config.trials, num_init_states(env)))
            episodes = run_episodes(agent, learner, selection, env, init_states, jax.random.key(config.seed))
        successes = [e.success for e in episodes]
        rate = float(np.mean(successes))
        results[str(task.task_id)] = {"name": task.name, "instruction": task.instruction, "trials": len(successes),
                                      "successes": int(sum(successes)), "success_rate": rate,
                                      "ci95": wilson_interval(int(sum(successes)), len(successes)),
                                      "episodes": [dataclasses.asdict(e) for e in episodes]}
        log(f"{what}: {config.suite} task {task.task_id} ({task.name}): {rate:.0%} of {len(successes)}")
    report = {"policy": what, "suite": config.suite, "max_steps": config.max_steps, "seed": config.seed, "tasks": results,
              "mean_success": float(np.mean([r["success_rate"] for r in results.values()]))}
    atomic_write(Path(config.output), (json.dumps(report, indent=2) + "\n").encode())
    return report


def select_tasks(config: SelectTasksConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates the base policy and adds the selection: tasks with success in [low, high]."""
    if config.eval.run_dir is not None or config.eval.bundle is not None:
        raise ValueError("select-tasks scores the BASE policy; drop --eval.run-dir / --eval.bundle")
    report = evaluate(config.eval, log=log)
    selected = [tid for tid, r in report["tasks"].items() if config.low <= r["success_rate"] <= config.high]
    report["selection"] = {"low": config.low, "high": config.high, "selected": selected}
    atomic_write(Path(config.eval.output), (json.dumps(report, indent=2) + "\n").encode())
    log(f"selected {len(selected)} task(s) with base success in [{config.low:.0%}, {config.high:.0%}]: {selected}")
    return report

