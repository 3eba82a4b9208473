"""Episodes on fixed init states, in one env or in lockstep over env worker processes (`EnvPool`).

Evaluation (`faster-vla eval`, `select-tasks`, a run's periodic eval) runs many episodes of one task. On
CPU an env step is mostly rendering (~120-170 ms per rendered step, one core each), so `num_workers > 1`
spreads the episodes over worker processes that step in lockstep: each round, the observations of every
live episode are stacked and the agent acts once on the batch (one encode, one denoise), then every worker
executes its own chunk; an episode that ends frees its worker for the next init state.

An episode's randomness depends only on (key, init state): its key is `fold_in(key, init_state)`, split once
per decision, and `Agent.act_batch` gives each row its own noise pool, ensemble pairs and edit draw. The
envs reset deterministically per init state (`LiberoEnv.reset`). So which worker runs an episode, and which
episodes share its batches, changes its chunks only by float rounding: XLA rounds a batch of 1
(matrix-vector products) differently from larger ones, ~1e-7 in a chunk, which the simulator carries into
later observations; a long episode that is a near-tie can therefore end differently.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from faster_vla.agent import Agent
from faster_vla.env_pool import EnvPool, EnvWorkerError
from faster_vla.learner import Learner
from faster_vla.libero_env import LiberoEnv, LiberoEnvConfig, make_libero_pool
from faster_vla.selection import SelectionConfig

WORKER_HINT = ("each worker is one LIBERO env process needing ~2 GB of RAM (rendering dominates its CPU time); "
               "a worker killed by a signal (negative exit code, e.g. -9) is often out of memory: lower --num-workers")


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    """One finished episode: its init state, whether the goal was reached, and policy steps taken."""

    init_state: int
    success: bool
    steps: int


def check_num_workers(num_workers: int, flag: str = "num_workers") -> None:
    """Raises a ValueError naming `flag` unless num_workers is an int >= 1 (1: one env in this process)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"{flag} must be an integer >= 1 (1: one env in this process), got {num_workers!r}")


def open_envs(config: LiberoEnvConfig, num_workers: int) -> LiberoEnv | EnvPool:
    """One env in this process (num_workers 1), or an `EnvPool` of that many worker processes; close it after."""
    check_num_workers(num_workers)
    return LiberoEnv(config) if num_workers == 1 else make_libero_pool(config, num_workers)


def num_init_states(env: LiberoEnv | EnvPool) -> int:
    """How many fixed init states the task has (libero_90: 50), read from the env or the pool's first worker."""
    if isinstance(env, EnvPool):  # a property, read through the pool's generic method call
        return int(env.call("__getattribute__", [("num_init_states",)] + [None] * (env.num_workers - 1))[0])
    return env.num_init_states


def run_episodes(agent: Agent, learner: Learner, selection: SelectionConfig, env: LiberoEnv | EnvPool,
                 init_states: Sequence[int], key: jax.Array) -> list[EpisodeResult]:
    """One episode per init state (in that order); in `env` one after another, or in lockstep over a pool.

    Episode i's decisions use keys split from `fold_in(key, init_states[i])`, whichever way it runs.
    """
    init_states = [int(i) for i in init_states]
    if isinstance(env, EnvPool):
        return _run_lockstep(agent, learner, selection, env, init_states, key)
    results = []
    for init_state in init_states:
        obs = env.reset(init_state)
        k = jax.random.fold_in(key, init_state)
        steps, done, truncated = 0, False, False
        while not (done or truncated):
            k, sub = jax.random.split(k)
            decision = agent.act(learner, obs, selection=selection, rng=sub)
            result = env.step_chunk(decision.actions)
            obs, done, truncated, steps = result.obs, result.done, result.truncated, steps + result.num_steps
        results.append(EpisodeResult(init_state, bool(done), steps))
    return results


@dataclasses.dataclass
class _Live:
    """An episode in progress on a worker."""

    position: int  # index into init_states
    init_state: int
    key: jax.Array
    obs: Any = None
    steps: int = 0


def _run_lockstep(agent: Agent, learner: Learner, selection: SelectionConfig, pool: EnvPool,
                  init_states: list[int], key: jax.Array) -> list[EpisodeResult]:
    """Every worker runs one episode at a time; each round the agent acts once on all live episodes."""
    workers = pool.num_workers
    queue = collections.deque(enumerate(init_states))
    live: dict[int, _Live] = {}  # worker -> its episode
    results: list[EpisodeResult | None] = [None] * len(init_states)

    def start_idle() -> None:  # idle workers take the next init states; their resets run in parallel
        starts: list[int | None] = [None] * workers
        for w in range(workers):
            if w not in live and queue:
                position, init_state = queue.popleft()
                live[w] = _Live(position, init_state, jax.random.fold_in(key, init_state))
                starts[w] = init_state
        if any(s is not None for s in starts):
            for w, obs in enumerate(pool.reset(starts)):
                if obs is not None:
                    live[w].obs = obs

    try:
        start_idle()
        while live:
            order = sorted(live)
            rngs = []
            for w in order:
                live[w].key, sub = jax.random.split(live[w].key)
                rngs.append(sub)
            # Padded to the pool's size: one compiled batch shape however many episodes are still running.
            decisions = agent.act_batch(learner, [live[w].obs for w in order], selection=selection, rngs=rngs,
                                        batch_size=workers)
            actions: list[Any] = [None] * workers
            for w, decision in zip(order, decisions):
                actions[w] = decision.actions
            for w, result in enumerate(pool.step_chunk(actions)):
                if result is None:
                    continue
                episode = live[w]
                episode.obs, episode.steps = result.obs, episode.steps + result.num_steps
                if result.done or result.truncated:
                    results[episode.position] = EpisodeResult(episode.init_state, bool(result.done), episode.steps)
                    del live[w]
            start_idle()
    except EnvWorkerError as exc:
        running = live.get(exc.worker)
        if running is not None:
            exc.add_note(f"worker {exc.worker} was running init state {running.init_state}")
        exc.add_note(WORKER_HINT)
        raise
    return [r for r in results if r is not None]
