"""The one episode loop: episodes on given init states, in one env or in lockstep over env worker processes.

Training is rollout + store (`faster_vla.runs.run.Run.collect`), evaluation is rollout + count
(`Run.evaluate`, `faster-vla eval`, `select-tasks`): both call `run_episodes`, which returns a `Trajectory` per
episode — its outcome, the decisions' FLOPs and timing and, when asked (`record`), the observations at the rows
replay needs and the executed chunks.

On CPU an env step is mostly rendering (~120-170 ms per rendered step, one core each), so env workers (an
`EnvPool` of processes, or a `RayEnvPool` of Ray actors) step episodes in lockstep: each round, the observations
of every live episode are stacked and the agent acts once on the batch (one encode, one denoise), then every
worker executes its own chunk; an episode that ends frees its worker for the next one.

A worker that fails mid-episode (its env raised, its process or actor died, its node was lost) stops the
episodes with an `EnvWorkerError`, unless a `WorkerRecovery` is given (a training run's): then only the
episode in flight is lost — the worker is replaced and the episode runs again from its start with its own
(init state, key), so it comes out as it would have — up to the recovery's budget of failures.

An episode's randomness depends only on its own key (split once per decision), and `Agent.act_batch` gives
each row its own noise pool, ensemble pairs and edit draw. The envs reset deterministically per init state
(`LiberoEnv.reset`; not under the openpi protocol, whose resets draw from one stream per env, as openpi's do). So which worker runs an episode, and which episodes share its batches, changes its chunks
only by float rounding: XLA rounds a batch of 1 (matrix-vector products) differently from larger ones, ~1e-7
in a chunk, which the simulator carries into later observations; a long episode that is a near-tie can
therefore end differently.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np

from faster_vla.acting.agent import Agent, Decision
from faster_vla.acting.frozen_cache import row_noise
from faster_vla.libero.config import PROTOCOLS, EnvsConfig, EvalProtocol, LiberoEnvConfig, check_num_workers
from faster_vla.libero.env import LiberoEnv, libero_env_factories, make_libero_pool
from faster_vla.libero.env_pool import EnvWorkerError, EnvWorkers
from faster_vla.rl.learner import Learner
from faster_vla.rl.selection import SelectionConfig

WORKER_HINT = ("each worker is one LIBERO env process needing ~2 GB of RAM (rendering dominates its CPU time); "
               "a worker killed by a signal (negative exit code, e.g. -9) is often out of memory: lower --num-workers")

CACHE_STREAM = 0x0CAC4E
"""An episode's frozen-actor cache noises come from `fold_in(its key, CACHE_STREAM)`, apart from its decisions'."""

Record = Literal["none", "chunk", "step"]
"""What a trajectory keeps: nothing but counts (evaluation); the observation at every decision and the final one
(windows at chunk boundaries); or the observation after every step (every sliding window; the env must render
every step)."""


@dataclasses.dataclass
class Trajectory:
    """One finished episode.

    With `record` "chunk" or "step", `observations[i]` is the raw env observation at env step `rows[i]` (0 is
    the reset; the last is the final observation), `decision_rows` are the rows the agent acted at, `chunks`
    the executed chunks in robot units [H_i, 7] (H_i < H when the episode ended inside a chunk; the full
    decided chunk is kept: it is the actor's flow-loss target), `actions` [steps, A] the executed actions in the
    learner's normalised space and `rewards` [steps]; with "none" these stay empty.
    """

    init_state: int
    success: bool
    steps: int
    acting_flops: float = 0.0
    timing_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    observations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rows: list[int] = dataclasses.field(default_factory=list)
    decision_rows: list[int] = dataclasses.field(default_factory=list)
    chunks: list[np.ndarray] = dataclasses.field(default_factory=list)
    actions: list[np.ndarray] = dataclasses.field(default_factory=list)
    rewards: list[np.ndarray] = dataclasses.field(default_factory=list)
    cache_key: jax.Array | None = None
    """Row r's frozen-actor cache noises are `row_noise(cache_key, [r], ...)`, whoever draws them."""
    cache: dict[int, Decision] = dataclasses.field(default_factory=dict)
    """Row -> the decision whose acting pass computed that row's frozen-actor cache (`cache_seeds` > 0)."""

    def summary(self) -> dict[str, Any]:
        """The outcome alone (what an eval report lists per episode)."""
        return {"init_state": self.init_state, "success": self.success, "steps": self.steps}

    def decision_observations(self) -> list[dict[str, Any]]:
        """The observation each decision was made on, in order (recorded trajectories only)."""
        at = dict(zip(self.rows, self.observations))
        return [at[r] for r in self.decision_rows]


def open_envs(config: LiberoEnvConfig, num_workers: int, envs: EnvsConfig | None = None, *,
              local_ray_workers: int | None = None) -> LiberoEnv | EnvWorkers:
    """The envs episodes run in; close them after. On the local backend (the default): one env in this process
    (num_workers 1), or an `EnvPool` of that many worker processes; on the ray backend, a `RayEnvPool` of that
    many Ray actors (Ray is imported only then), in a local Ray sized for `local_ray_workers` (default
    num_workers) when there is no cluster address and this process has no Ray yet."""
    check_num_workers(num_workers)
    envs = envs or EnvsConfig()
    if envs.backend == "ray":
        envs.check_available()
        from faster_vla.libero.ray_pool import RayEnvPool  # only the ray backend imports Ray

        return RayEnvPool(libero_env_factories(config, num_workers), address=envs.ray_address,
                          cpus_per_worker=envs.cpus_per_worker, local_workers=local_ray_workers)
    return LiberoEnv(config) if num_workers == 1 else make_libero_pool(config, num_workers)


@dataclasses.dataclass
class StageTimes:
    """Where the wall time of episodes went, accumulated over `run_episodes` calls (seconds).

    Each round (one batched decision, then every live episode steps its chunk) splits into `acting` (the
    batched decision, up to its chunks on the host; the frozen-actor cache it dispatches runs during the env
    step), and the env step's wall time, itself split along its critical path (the slowest worker's
    `physics` and `rendering`, as its env measured them) and `transport` (the rest: pickling, pipes or Ray,
    waiting for the slowest worker; ~0 for the in-process env). `reset` is the episodes' starts (init
    state and wait steps), on the critical path too. `physics_cpu` and `rendering_cpu` sum every worker's own
    time: the env work a machine with a core per worker runs in parallel.
    """

    acting: float = 0.0
    physics: float = 0.0
    rendering: float = 0.0
    transport: float = 0.0
    reset: float = 0.0
    physics_cpu: float = 0.0
    rendering_cpu: float = 0.0
    rounds: int = 0

    def add_env(self, wall_s: float, results: Sequence[Any]) -> None:
        """One env call (`step_chunk` on one env or a pool) of `wall_s`; `results` its ChunkResults (None: a
        worker skipped or lost)."""
        parts = [r.info.get("timing_s", {}) for r in results if r is not None]
        slowest = max(parts, key=lambda p: p.get("physics", 0.0) + p.get("rendering", 0.0), default={})
        critical = slowest.get("physics", 0.0) + slowest.get("rendering", 0.0)
        self.physics += slowest.get("physics", 0.0)
        self.rendering += slowest.get("rendering", 0.0)
        self.transport += max(wall_s - critical, 0.0)
        self.physics_cpu += sum(p.get("physics", 0.0) for p in parts)
        self.rendering_cpu += sum(p.get("rendering", 0.0) for p in parts)


class WorkerFailuresExceededError(RuntimeError):
    """Env workers failed more often than a `WorkerRecovery` allows."""


@dataclasses.dataclass
class WorkerRecovery:
    """How episodes survive env workers that fail: the worker is replaced, the failure logged, and the episode
    it was running starts again from its beginning; the failure after `max_failures` raises
    `WorkerFailuresExceededError` (`failures` counts them over every `run_episodes` given this recovery)."""

    max_failures: int
    log: Callable[[str], None] = print
    failures: int = 0

    def replace(self, pool: EnvWorkers, worker: int, init_state: int | None, error: EnvWorkerError) -> None:
        """Counts the failure of `worker` (running `init_state`, None: idle) and replaces it (a failed
        replacement counts too); raises once the budget is spent."""
        while True:
            self.failures += 1
            what = "idle" if init_state is None else f"running init state {init_state}"
            message = error.messages.get(worker, str(error).splitlines()[0])
            if self.failures > self.max_failures:
                raise WorkerFailuresExceededError(
                    f"env workers failed {self.failures} times, more than the {self.max_failures} recovered from; "
                    f"stopping. The last: worker {worker} ({what}) failed in {error.method}(): {message}"
                ) from error
            self.log(f"env worker {worker} failed in {error.method}() ({what}): {message}; replacing the worker"
                     + ("" if init_state is None else " and running the episode again from its start")
                     + f" (failure {self.failures}; {self.max_failures} are recovered from)")
            try:
                pool.restart(worker)
                return
            except EnvWorkerError as again:
                error = again


def num_init_states(env: LiberoEnv | EnvWorkers) -> int:
    """How many fixed init states the task has (libero_90: 50), read from the env or the pool's first worker."""
    if isinstance(env, EnvWorkers):  # a property, read through the pool's generic method call
        return int(env.call("__getattribute__", [("num_init_states",)] + [None] * (env.num_workers - 1))[0])
    return env.num_init_states


def init_state_keys(init_states: Sequence[int], key: jax.Array) -> list[tuple[int, jax.Array]]:
    """Evaluation's episodes: init state i with key `fold_in(key, i)`, whatever runs it and in which order."""
    return [(int(i), jax.random.fold_in(key, int(i))) for i in init_states]


class _Live:
    """An episode in progress (on the env, or on one pool worker)."""

    def __init__(self, position: int, init_state: int, key: jax.Array, record: Record) -> None:
        self.position, self.key, self.record = position, key, record
        self.episode = (init_state, key)  # to run it again from its start
        self.trajectory = Trajectory(init_state, False, 0, cache_key=jax.random.fold_in(key, CACHE_STREAM))
        self.obs: Any = None

    def start(self, obs: dict[str, Any]) -> None:
        self.obs = obs
        if self.record != "none":
            self.trajectory.observations.append(obs)
            self.trajectory.rows.append(0)

    def next_key(self) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    def cache_noise(self, shape: tuple[int, int, int]) -> np.ndarray:
        """[K, H, A]: the cache noises of the row this episode is about to act at."""
        return row_noise(self.trajectory.cache_key, [self.trajectory.steps], shape)[0]

    def advance(self, decision: Decision, result: Any) -> bool:
        """Adds one executed chunk; True when the episode is over."""
        t = self.trajectory
        n = result.num_steps
        if decision.cache is not None:
            t.cache[t.steps] = decision
        if self.record != "none":
            t.decision_rows.append(t.steps)
            t.chunks.append(decision.actions)
            t.actions.append(decision.normalized[:n])
            t.rewards.append(result.rewards)
            if self.record == "step":
                if "observations" not in result.info:
                    raise RuntimeError("record='step' needs the env to return every step's observation "
                                       "(info['observations']): set --env.render-mode every_step")
                t.observations.extend(result.info["observations"])
                t.rows.extend(range(t.steps + 1, t.steps + n + 1))
            else:
                t.observations.append(result.obs)
                t.rows.append(t.steps + n)
        t.steps += n
        t.acting_flops += decision.flops.total
        for part, ms in decision.timing_ms.items():
            t.timing_ms[part] = t.timing_ms.get(part, 0.0) + ms
        self.obs = result.obs
        t.success = bool(result.done)
        return bool(result.done or result.truncated)


def run_episodes(agent: Agent, learner: Learner | None, selection: SelectionConfig, env: LiberoEnv | EnvWorkers,
                 episodes: Sequence[tuple[int, jax.Array]], *, record: Record = "none",
                 cache_seeds: int = 0, recovery: WorkerRecovery | None = None,
                 protocol: EvalProtocol = PROTOCOLS["chunk"], times: StageTimes | None = None) -> list[Trajectory]:
    """One episode per (init state, key), returned in that order; in `env` one after another, or in lockstep
    over a pool. Episode i's decisions use keys split from its own key, whichever way it runs. `learner` may be
    None for the base rule, which calls no critic.

    A pool's worker failure closes the pool and raises `EnvWorkerError`, or with `recovery`, costs only the
    episode in flight, which runs again (see `WorkerRecovery`); an error raised here leaves the pool closed.

    `cache_seeds` K > 0: every decision also computes the frozen-actor cache of its observation (K noises and
    their chunks) from the prefix it encoded to act, while the env steps (`Trajectory.cache`); the rows no
    decision was made at (the final observation, every-step rows) are left to the caller (`Agent.cache`).

    `protocol` sets what the env executes of each decided chunk (`EvalProtocol.executed`: the whole chunk, or
    openpi's first 5 actions); the env itself must already be the protocol's (`EvalProtocol.env_config`).
    `times` accumulates where the wall time went (acting, physics, rendering, transport, resets).
    """
    if record not in ("none", "chunk", "step"):
        raise ValueError(f"record must be 'none', 'chunk' or 'step', got {record!r}")
    if cache_seeds < 0:
        raise ValueError(f"cache_seeds must be >= 0, got {cache_seeds}")
    episodes = [(int(i), k) for i, k in episodes]
    shape = (cache_seeds, agent.actor.config.action_horizon, agent.actor.config.action_dim) if cache_seeds else (0, 0, 0)
    times = StageTimes() if times is None else times
    if isinstance(env, EnvWorkers):
        return _run_lockstep(agent, learner, selection, env, episodes, record, shape, recovery, protocol, times)
    out = []
    for position, (init_state, key) in enumerate(episodes):
        live = _Live(position, init_state, key, record)
        start = time.perf_counter()
        live.start(env.reset(init_state))
        times.reset += time.perf_counter() - start
        over = False
        while not over:
            noise = live.cache_noise(shape)[None] if cache_seeds else None
            start = time.perf_counter()
            decision = agent.act_batch(learner, [live.obs], selection=selection, rngs=[live.next_key()],
                                       cache_noise=noise)[0]
            stepped = time.perf_counter()
            result = env.step_chunk(protocol.executed(decision.actions))
            times.acting += stepped - start
            times.add_env(time.perf_counter() - stepped, [result])
            times.rounds += 1
            over = live.advance(decision, result)
        out.append(live.trajectory)
    return out


def _run_lockstep(agent: Agent, learner: Learner | None, selection: SelectionConfig, pool: EnvWorkers,
                  episodes: list[tuple[int, jax.Array]], record: Record, cache_shape: tuple[int, int, int],
                  recovery: WorkerRecovery | None, protocol: EvalProtocol, times: StageTimes) -> list[Trajectory]:
    """Every worker runs one episode at a time; each round the agent acts once on all live episodes."""
    workers = pool.num_workers
    queue = collections.deque(enumerate(episodes))
    live: dict[int, _Live] = {}  # worker -> its episode
    results: list[Trajectory | None] = [None] * len(episodes)

    def answers(call: Callable[[Sequence[Any]], list[Any]], args: Sequence[Any]) -> list[Any]:
        """`call(args)`'s results (a pool method); with recovery, a failed worker is replaced and its episode
        queued again first (its result is None, as for a worker the call skipped)."""
        try:
            return call(args)
        except EnvWorkerError as exc:
            if recovery is None:
                raise
            for w in reversed(exc.failed):
                lost = live.pop(w, None)
                recovery.replace(pool, w, None if lost is None else lost.trajectory.init_state, exc)
                if lost is not None:
                    queue.appendleft((lost.position, lost.episode))
            return exc.results

    def start_idle() -> None:  # idle workers take the next episodes; their resets run in parallel
        while queue and len(live) < workers:  # again if a reset failed and its episode was queued again
            starts: list[int | None] = [None] * workers
            for w in range(workers):
                if w not in live and queue:
                    position, (init_state, key) = queue.popleft()
                    live[w] = _Live(position, init_state, key, record)
                    starts[w] = init_state
            start = time.perf_counter()
            observations = answers(pool.reset, starts)
            times.reset += time.perf_counter() - start
            for w, obs in enumerate(observations):
                if obs is not None:
                    live[w].start(obs)

    try:
        start_idle()
        while live:
            order = sorted(live)
            rngs = [live[w].next_key() for w in order]
            # Padded to the pool's size: one compiled batch shape however many episodes are still running.
            noise = np.stack([live[w].cache_noise(cache_shape) for w in order]) if cache_shape[0] else None
            start = time.perf_counter()
            decisions = agent.act_batch(learner, [live[w].obs for w in order], selection=selection, rngs=rngs,
                                        batch_size=workers, cache_noise=noise)
            actions: list[Any] = [None] * workers
            by_worker = dict(zip(order, decisions))
            for w, decision in by_worker.items():
                actions[w] = protocol.executed(decision.actions)
            stepped = time.perf_counter()
            chunk_results = answers(pool.step_chunk, actions)
            times.acting += stepped - start
            times.add_env(time.perf_counter() - stepped, chunk_results)
            times.rounds += 1
            for w, result in enumerate(chunk_results):
                if result is None:
                    continue
                if live[w].advance(by_worker[w], result):
                    done = live.pop(w)
                    results[done.position] = done.trajectory
            start_idle()
    except EnvWorkerError as exc:
        pool.close()
        running = live.get(exc.worker)
        if running is not None:
            exc.add_note(f"worker {exc.worker} was running init state {running.trajectory.init_state}")
        exc.add_note(WORKER_HINT)
        raise
    except WorkerFailuresExceededError as exc:
        pool.close()
        exc.add_note(WORKER_HINT)
        raise
    return [r for r in results if r is not None]
