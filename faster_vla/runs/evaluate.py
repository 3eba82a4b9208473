"""Scoring policies on LIBERO tasks: the base π0.5, a fine-tuning run's checkpoint or a bundle; task selection.

`evaluate` runs `trials` episodes per task on the suite's init states 0..trials-1 (openpi's protocol uses 50)
under an evaluation protocol (`--protocol`: `chunk`, whole chunks as FASTER trains, or `openpi`, openpi's LIBERO
client exactly; `faster_vla.libero.config.EvalProtocol`) and writes per-task success, and the protocol, to a
JSON file atomically; `num_workers > 1` runs them in lockstep over env workers (local processes, or Ray
actors with `--envs.backend ray`; `faster_vla.libero.rollout`), with the same per-episode keys; a worker that
fails costs only its episode, which runs again on a replacement. A run's checkpoint acts with the run's
own selection rule, greedily (its learner's critics and edit policy), or by another rule and N on the same
critics (`--rule`, `--num-candidates`: selection in isolation, test-time scaling); the base policy acts with
the `base` rule, which is exactly `Policy.infer`. Reports carry each decision's FLOPs and acting time.
`select_tasks` is the paper's protocol for picking held-out libero_90 tasks worth fine-tuning on: those where
the base policy scores within [low, high] (40–60 %).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from faster_vla.acting.actor_source import ActorSource
from faster_vla.acting.agent import Agent
from faster_vla.rl.learner import Learner
from faster_vla.runs.loading import load_run, load_trained_actor
from faster_vla.libero.env import LiberoEnvConfig, check_libero_installed, parse_task, resolve_task
from faster_vla.libero.config import SUITE_MAX_STEPS, EnvsConfig, ProtocolName, check_num_workers, get_protocol
from faster_vla.libero.rollout import (Trajectory, WorkerRecovery, init_state_keys, num_init_states, open_envs,
                                      run_episodes)
from faster_vla.shared.files import atomic_write, ensure_writable_dir
from faster_vla.rl.selection import RULES, Rule, SelectionConfig


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
    rule: Rule | None = None
    """Act by this selection rule instead of the run's or bundle's own, with the same critics and edit policy
    (greedy): selection in isolation. Every run trains Q^dn and Q^a, whatever rule it trained with. None: theirs."""
    num_candidates: int | None = None
    """Seeds N per decision instead of the run's or bundle's (test-time scaling). None: theirs."""
    suite: str = "libero_90"
    """Task suite."""
    tasks: tuple[str, ...] = ("0",)
    """Task ids or names within the suite."""
    trials: int = 10
    """Episodes per task, on the suite's init states 0..trials-1 (openpi's evaluation uses 50)."""
    protocol: ProtocolName = "chunk"
    """How episodes run (docs/finetune.md, "Evaluation protocols"): chunk, every decided chunk executed whole
    (as FASTER trains and the paper evaluates), in an env rendering at the model's input size; openpi, openpi's
    LIBERO client exactly (examples/libero/main.py): replan after the first 5 actions of each chunk, 256²
    renders at every step resized with pad to 224² by PIL before the policy's own transforms, hard resets,
    one placement RNG stream per env seeded with --seed, the suite's max steps. Recorded in the output."""
    max_steps: int | None = None
    """Steps per episode; None: the suite's default (libero_90: 400). --protocol openpi runs the suite's."""
    render_mode: Literal["every_step", "chunk_boundary"] | None = None
    """Render every step or only where the policy needs an observation (same episodes, less CPU). None: the
    protocol's (chunk: chunk_boundary; openpi: every_step, which it requires)."""
    output: Path = Path("eval.json")
    """Where to write the per-task results (JSON, written atomically)."""
    seed: int = 7
    """Seed of the env and the noises."""
    num_workers: int = 1
    """Env worker processes stepping episodes in lockstep, the policy acting once per step on all of them (1: one
    env in this process). Each worker needs ~2 GB of RAM; on CPU rendering dominates a step, so use at most
    one worker per free core. Per-episode results are those of 1 worker up to float rounding."""
    envs: EnvsConfig = EnvsConfig()
    """Where the env workers run: local processes, or Ray actors on a cluster (--envs.backend ray
    --envs.ray-address auto; without an address a local Ray is started for this evaluation), and how many worker
    failures it survives (--envs.max-worker-failures)."""

    def __post_init__(self) -> None:
        check_num_workers(self.num_workers)
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if not self.tasks:
            raise ValueError("give at least one task (--tasks 0 1 ... or task names)")
        if self.run_dir is not None and self.bundle is not None:
            raise ValueError("--run-dir and --bundle both name the policy to evaluate: pass one")
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"--rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.run_dir is None and self.bundle is None and (self.rule not in (None, "base")
                                                             or self.num_candidates is not None):
            raise ValueError(f"--rule {self.rule} / --num-candidates {self.num_candidates}: the base policy has no "
                             "critics and acts on one seed; choosing among seeds needs --run-dir or --bundle")
        if self.num_candidates is not None and self.num_candidates < 1:
            raise ValueError(f"--num-candidates must be >= 1, got {self.num_candidates}")
        protocol = get_protocol(self.protocol)
        if protocol.render_mode is not None and self.render_mode not in (None, protocol.render_mode):
            raise ValueError(f"--protocol {self.protocol} renders {protocol.render_mode}, as openpi's client does; "
                             f"drop --render-mode {self.render_mode}")
        if protocol.suite_episode and self.max_steps not in (None, SUITE_MAX_STEPS.get(self.suite)):
            raise ValueError(f"--protocol {self.protocol} runs the suite's max steps, as openpi's client does "
                             f"({self.suite}: {SUITE_MAX_STEPS.get(self.suite, 'none')}); drop --max-steps "
                             f"{self.max_steps}, or use --protocol chunk")


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


def acting_cost(episodes: Sequence[Trajectory], flops_per_decision: float) -> dict[str, Any]:
    """Decisions, acting FLOPs and acting wall time per decision of a task's episodes. The time is the median over
    episodes of each one's mean per decision, so the first episode's compilation does not count; with
    num_workers > 1 a decision's time is its whole batch's (`Agent.act_batch`)."""
    decisions = [round(e.acting_flops / flops_per_decision) if flops_per_decision else 0 for e in episodes]
    per_episode = [{part: ms / n for part, ms in e.timing_ms.items()} for e, n in zip(episodes, decisions) if n]
    parts = sorted({part for times in per_episode for part in times})
    return {"decisions": int(sum(decisions)), "flops": float(sum(e.acting_flops for e in episodes)),
            "ms_per_decision": {part: float(np.median([t.get(part, 0.0) for t in per_episode])) for part in parts}}


@dataclasses.dataclass(frozen=True)
class Acting:
    """What an evaluation acts with: the agent, its learner (None for the base rule) and the (greedy) rule."""

    agent: Agent
    learner: Learner | None
    selection: SelectionConfig
    description: str


def acting_for(config: EvalConfig) -> Acting:
    """The run's checkpoint (its rule, greedy, and its tuned actor if it trained one) or the base policy. A
    bundle is loaded by the caller (`faster_vla.launch.evaluate`: bundles are the serving layer's)."""
    if config.bundle is not None:
        raise ValueError("--bundle: a bundle is loaded by the serving layer; evaluate it with `faster-vla eval "
                         "--bundle` (it passes make_acting=faster_vla.launch.evaluate.bundle_acting)")
    if config.run_dir is not None:
        train_config, learner, episode = load_run(config.run_dir, config.checkpoint)
        selection = dataclasses.replace(train_config.selection, temperature=0.0)
        # The run's denoising steps (its filter schedule, if any, is laid out over them).
        policy = train_config.actor.build(num_steps=train_config.num_steps, policy_seed=config.seed)
        load_trained_actor(config.run_dir, train_config, episode, policy)  # its tuned actor, if it trained one
        return Acting(Agent(policy, learner.config, num_steps=train_config.num_steps, seed=config.seed), learner,
                      selection, f"run {config.run_dir} checkpoint {episode} ({selection.rule})")
    policy = config.actor.build(policy_seed=config.seed)
    return Acting(Agent(policy, seed=config.seed), None, SelectionConfig("base", num_candidates=1),
                  f"base policy {config.actor.preset}")  # the base rule calls no critic


def evaluate(config: EvalConfig, *, log: Callable[[str], None] = print,
             make_acting: Callable[[EvalConfig], Acting] | None = None) -> dict[str, Any]:
    """Scores the policy on every task; writes and returns {'tasks': {id: {...}}, 'mean_success': ...}.
    `make_acting` builds what acts (default `acting_for`; `faster-vla eval --bundle` passes the bundle's), after
    bad task names and an unwritable output have failed, so they fail before any model is built."""
    check_libero_installed()
    config.envs.check_available()  # a missing Ray fails here, before any model is built
    tasks = [resolve_task(config.suite, parse_task(t)) for t in config.tasks]  # bad names fail here, first
    ensure_writable_dir(Path(config.output).expanduser().resolve().parent, "output folder")
    acting = (make_acting or acting_for)(config)
    agent, learner, selection, what = acting.agent, acting.learner, acting.selection, acting.description
    if config.rule is not None or config.num_candidates is not None:
        schedule = None if agent.config is None else agent.config.filter_schedule
        if schedule is not None and config.num_candidates not in (None, schedule.num_candidates):
            raise ValueError(f"--num-candidates {config.num_candidates}: this policy's critics filter "
                             f"{schedule.num_candidates} seeds over several denoising steps (its filter schedule), "
                             "a count they were trained for; drop --num-candidates")
        selection = dataclasses.replace(selection, rule=config.rule or selection.rule,
                                        num_candidates=config.num_candidates or selection.num_candidates)
        what = f"{what}, acting by {selection.rule} over N = {selection.num_candidates}"
    per_decision = agent.decision_flops(learner, selection)  # a rule without the critics it needs fails here
    results: dict[str, Any] = {}
    # chunk: camera images reach the policy at its own input size (resize-with-pad in the env, as the built-in
    # model's demonstrations were recorded), not resized twice; openpi: at openpi's client's 224² (PIL), which
    # the policy's input transforms resize to its own size, as openpi's server does.
    protocol = get_protocol(config.protocol)
    image_size = agent.actor.config.siglip.image_size
    recovery = WorkerRecovery(config.envs.max_worker_failures, log=log)  # over all tasks, as a run counts them
    for task in tasks:
        env_config = protocol.env_config(
            LiberoEnvConfig(suite=config.suite, task=task.task_id, max_steps=config.max_steps, seed=config.seed,
                            render_mode=config.render_mode or "chunk_boundary"), image_size)
        with open_envs(env_config, min(config.num_workers, config.trials), config.envs) as env:
            init_states = range(min(config.trials, num_init_states(env)))
            episodes = run_episodes(agent, learner, selection, env, init_state_keys(init_states, jax.random.key(config.seed)),
                                    protocol=protocol, recovery=recovery)
        successes = [e.success for e in episodes]
        rate = float(np.mean(successes))
        results[str(task.task_id)] = {"name": task.name, "instruction": task.instruction, "trials": len(successes),
                                      "successes": int(sum(successes)), "success_rate": rate,
                                      "ci95": wilson_interval(int(sum(successes)), len(successes)),
                                      "acting": acting_cost(episodes, per_decision.total),
                                      "episodes": [e.summary() for e in episodes]}
        log(f"{what}: {config.suite} task {task.task_id} ({task.name}): {rate:.0%} of {len(successes)} "
            f"(protocol {protocol.name})")
    report = {"policy": what, "suite": config.suite, "protocol": protocol.record(),
              "selection": dataclasses.asdict(selection), "flops_per_decision": per_decision.total,
              "flops_per_decision_by_part": dataclasses.asdict(per_decision),
              "max_steps": env_config.episode_max_steps(), "seed": config.seed,
              "num_workers": config.num_workers, "envs_backend": config.envs.backend,
              "worker_failures": recovery.failures, "tasks": results,
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

