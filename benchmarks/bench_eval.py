"""Evaluation with 1 vs N env workers: the same episodes in one in-process env, then in lockstep over an EnvPool.

Not a test. One process builds the policy once, starts both variants' envs, compiles both batch shapes, then
alternates rounds: each round evaluates `--episodes` init states with 1 worker and with `--workers` workers
(`faster_vla.libero.rollout.run_episodes`, what `faster-vla eval --num-workers` runs). Medians, the speedup and
whether both variants gave the same per-episode results are printed and written as JSON.

    .venv/bin/python benchmarks/bench_eval.py --json benchmarks/results/eval_workers_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax

from bench_common import cpu_model, write_result
from faster_vla.acting.actor_source import ActorSource
from faster_vla.acting.agent import Agent
from faster_vla.runs.config import learner_config
from faster_vla.runs.config import TRAIN_CONFIGS
from faster_vla.rl.learner import Learner
from faster_vla.libero.env import LiberoEnvConfig
from faster_vla.libero.rollout import init_state_keys, open_envs, run_episodes
from faster_vla.rl.selection import SelectionConfig


class TimedAgent:
    """An agent whose decisions are timed, so a round splits into acting and everything else (envs, pipes)."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.seconds = agent, 0.0

    def act(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.agent.act(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def act_batch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.agent.act_batch(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi05_small", help="actor preset (random weights unless a checkpoint)")
    parser.add_argument("--rule", default="base", choices=["base", "faster"],
                        help="base: the policy alone (select-tasks); faster: cpu_small_faster_expo's critics, greedy")
    parser.add_argument("--task", type=int, default=0, help="libero_90 task")
    parser.add_argument("--episodes", type=int, default=4, help="init states 0..episodes-1 per round")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--render-mode", default="chunk_boundary", choices=["chunk_boundary", "every_step"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()  # the machine may be shared: a busy one skews the ratio
    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    selection = (SelectionConfig("base", num_candidates=1) if args.rule == "base"
                 else dataclasses.replace(base.selection, temperature=0.0))
    tconfig = dataclasses.replace(base, actor=ActorSource(args.preset), selection=selection)
    policy = tconfig.actor.build()
    lconfig = learner_config(tconfig, policy.actor.config)
    learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=0)
    agent = Agent(policy, lconfig, seed=0)
    env_config = LiberoEnvConfig(suite="libero_90", task=args.task, max_steps=args.max_steps,
                                 resolution=args.resolution, render_mode=args.render_mode)
    variants = (1, args.workers)
    envs, start_s = {}, {}
    for n in variants:
        t = time.perf_counter()
        envs[n] = open_envs(env_config, n)
        start_s[n] = time.perf_counter() - t
    key = jax.random.key(7)
    init_states = list(range(args.episodes))
    times: dict[int, list[float]] = {n: [] for n in variants}
    acting: dict[int, list[float]] = {n: [] for n in variants}
    results: dict[int, list] = {}
    try:
        # Compile batch 1 and batch N (and warm the workers) on one short-lived decision each.
        obs = envs[1].reset(0)
        agent.act(learner, obs, selection=selection, rng=key)
        agent.act_batch(learner, [obs] * args.workers, selection=selection, rngs=[key] * args.workers)
        for _ in range(args.rounds):
            for n in variants:
                timed = TimedAgent(agent)
                t = time.perf_counter()
                results[n] = run_episodes(timed, learner, selection, envs[n], init_state_keys(init_states, key))
                times[n].append(time.perf_counter() - t)
                acting[n].append(timed.seconds)
    finally:
        for env in envs.values():
            env.close()
    steps = sum(r.steps for r in results[1])
    median = {n: statistics.median(times[n]) for n in variants}
    acting_median = {n: statistics.median(acting[n]) for n in variants}
    same = results[args.workers] == results[1]
    for n in variants:
        print(f"{n} worker(s): {median[n]:7.2f} s for {args.episodes} episodes ({steps} env steps, "
              f"{steps / median[n]:.1f} steps/s; acting {acting_median[n]:.2f} s); env start {start_s[n]:.1f} s; "
              f"rounds {[round(x, 2) for x in times[n]]}")
    speedup = median[1] / median[args.workers]
    print(f"speedup {args.workers} vs 1 workers: {speedup:.2f}x; same per-episode results: {same}")
    out = {
        "preset": args.preset, "rule": args.rule, "task": args.task, "episodes": args.episodes,
        "max_steps": args.max_steps, "resolution": args.resolution, "render_mode": args.render_mode,
        "env_steps_per_round": steps,
        "eval_s_median": {str(n): round(median[n], 3) for n in variants},
        "eval_s_rounds": {str(n): [round(x, 3) for x in times[n]] for n in variants},
        "acting_s_median": {str(n): round(acting_median[n], 3) for n in variants},
        "env_start_s": {str(n): round(start_s[n], 2) for n in variants},
        f"speedup_{args.workers}_vs_1": round(speedup, 3),
        "same_episode_results": same,
        "episodes_result": [dataclasses.asdict(r) for r in results[1]],
        "env": {
            "command": "python " + " ".join(sys.argv),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
    }
    if args.json:
        print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
