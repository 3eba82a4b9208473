"""One fine-tuning run's pieces: the policy, agent, learner, replay, counters and checkpointer, built and
checked before anything expensive happens; a training episode (rollout + store), updates, the actor's
flow-loss steps, greedy evaluation (rollout + count), save and restore. The loop is `faster_vla.runs.loop`.

With `actor_update="success_bc"` (EXPO's π0.5 recipe) the action expert also learns: every successful
training episode's (observation, executed chunk) pairs go to a `SuccessBuffer`, and after the learner's
updates the actor takes flow-loss steps on them and acts with their EMA. Replay rows keep the chunks the
actor produced when they were stored (their prefix features stay exact: the VLM is frozen).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from faster_vla.acting.agent import Agent, critic_inputs
from faster_vla.acting.frozen_cache import row_noise
from faster_vla.acting.mesh import DataParallel
from faster_vla.acting.flow_trainer import ActorTrainer
from faster_vla.acting.success_buffer import SuccessBuffer
from faster_vla.libero.config import get_protocol
from faster_vla.libero.env import LiberoEnv, check_libero_installed, resolve_task
from faster_vla.libero.env_pool import EnvWorkers
from faster_vla.libero.rollout import (
    StageTimes,
    Trajectory,
    WorkerRecovery,
    init_state_keys,
    num_init_states,
    open_envs,
    run_episodes,
)
from faster_vla.policies import flops as actor_flops
from faster_vla.rl.batches import to_learner_batch
from faster_vla.rl.filtering import cached_steps
from faster_vla.rl.learner import Learner
from faster_vla.rl.replay import FrozenActorCacheSpec, ReplayBuffer
from faster_vla.rl.selection import SelectionConfig
from faster_vla.runs.checkpoint import RunCheckpointer
from faster_vla.runs.config import TrainConfig, learner_config
from faster_vla.shared.checks import raise_if_non_finite
from faster_vla.shared.files import ensure_writable_dir

EVAL_KEY_OFFSET = 1_000_003
"""A run's evaluations draw from key(seed + this): apart from its training episodes' keys, the same every time."""


@dataclasses.dataclass
class Counters:
    """Cumulative run counters (saved in every checkpoint)."""

    episodes: int = 0
    env_steps: int = 0
    successes: int = 0
    updates: int = 0
    acting_flops: float = 0.0
    cache_flops: float = 0.0
    update_flops: float = 0.0
    actor_updates: int = 0  # the actor's flow-loss steps (--actor-update success_bc)
    actor_update_flops: float = 0.0
    wall_s: float = 0.0
    worker_failures: int = 0  # env workers replaced after failing mid-episode (their episodes ran again)
    time_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Cumulative wall seconds per stage: the training rollouts' `StageTimes` (acting, physics, rendering,
    transport, reset, and the workers' summed physics_cpu/rendering_cpu), then cache (storing episodes: the
    frozen-actor cache of the rows no decision encoded), update, actor_update, eval and checkpoint."""

    def add_time(self, stage: str, seconds: float) -> None:
        self.time_s[stage] = self.time_s.get(stage, 0.0) + float(seconds)

    @property
    def flops(self) -> float:
        return self.acting_flops + self.cache_flops + self.update_flops + self.actor_update_flops


class Run:
    """The pieces of one run, built and checked before anything expensive happens."""

    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        ensure_writable_dir(config.run_dir)
        check_libero_installed()
        config.envs.check_available()
        resolve_task(config.env.suite, config.env.task)
        config.env.episode_max_steps()
        config.actor.check()
        train_actor = config.actor_update == "success_bc"
        self.policy = config.actor.build(num_steps=config.num_steps, policy_seed=config.seed, trainable=train_actor)
        actor_config = self.policy.actor.config
        # The trained actor and what it learns from (None: the actor stays frozen).
        self.actor_trainer: ActorTrainer | None = None
        self.successes: SuccessBuffer | None = None
        if train_actor:
            self.actor_trainer = ActorTrainer.create(self.policy.actor.params, config.actor_optimizer, seed=config.seed)
            self.successes = SuccessBuffer(config.success_capacity)
        self.learner_config = learner_config(config, actor_config)
        self.agent = Agent(self.policy, self.learner_config, num_steps=config.num_steps, seed=config.seed,
                           parallel=DataParallel(shard_params=config.shard_actor_params))
        self.parallel = self.agent.parallel  # decisions and critic minibatches split over the local devices
        self.parallel.check_divisible(config.batch_size, "batch_size (windows per critic step)")
        self.horizon = actor_config.action_horizon
        self.stride = self.horizon if config.window_starts == "chunk" else 1
        schedule = self.learner_config.filter_schedule
        self.cache_spec = FrozenActorCacheSpec.from_config(actor_config, config.cache_seeds,
                                                           cached_steps(schedule) if schedule else ())
        self.uses_features = self.learner_config.chunk_critic.encoder.kind == "backbone"
        self.eval_selection = dataclasses.replace(config.selection, temperature=0.0)
        example = self.learner_config.chunk_critic.encoder.example_inputs(1)
        self.learner = self.parallel.replicate(Learner.create(self.learner_config, example, seed=config.seed))
        self.replay = ReplayBuffer(config.replay_capacity, cache_spec=self.cache_spec)
        self.sample_rng = np.random.default_rng([config.seed, 1])
        self.counters = Counters()
        self.checkpointer = RunCheckpointer(config.run_dir / "checkpoints", keep_last=config.keep_last,
                                            keep_best=config.keep_best)
        self._update_flops: float | None = None
        self._eval_envs: LiberoEnv | EnvWorkers | None = None  # evaluation's own envs (see `evaluate`)
        self.last_eval: list[dict[str, Any]] | None = None  # the last evaluation's per-episode outcomes
        # Env workers that fail mid-episode are replaced and their episodes run again, up to a budget.
        self.recovery = WorkerRecovery(config.envs.max_worker_failures, log=log)
        self._prefix_flops = float(actor_flops.prefix_flops(actor_config))
        self._cache_denoise_flops = float(config.cache_seeds * config.num_steps
                                          * actor_flops.denoise_flops(actor_config, num_candidates=1, num_steps=1))
        # One flow-loss step (analytic, as acting's actor FLOPs): the prefix forward per example, and the
        # suffix (one velocity evaluation over the chunk) forward plus backward, ≈ 3× its forward.
        self._actor_step_flops = float(config.actor_optimizer.batch_size * (
            actor_flops.prefix_flops(actor_config)
            + 3 * actor_flops.denoise_flops(actor_config, num_candidates=1, num_steps=1)))

    # -- one training episode: rollout + store ---------------------------------------------------------------

    def rollout(self, envs: LiberoEnv | EnvWorkers, episodes: Sequence[tuple[int, jax.Array]]) -> list[Trajectory]:
        """Training episodes (init state, key) with the train-time rule, in one env or in lockstep over a pool;
        each decision also computes its observation's frozen-actor cache from the prefix it encoded to act
        (unless the rule learns nothing). Nothing is stored yet: see `store`."""
        record = "step" if self.stride == 1 else "chunk"
        seeds = self.cache_spec.num_seeds if self.learns and self.config.cache_from_acting else 0
        times = StageTimes()
        trajectories = self._episodes(self.config.selection, envs, episodes, record=record, cache_seeds=seeds,
                                      times=times)
        for stage, seconds in dataclasses.asdict(times).items():
            if stage != "rounds":
                self.counters.add_time(stage, seconds)
        return trajectories

    def _episodes(self, selection: SelectionConfig, envs: LiberoEnv | EnvWorkers,
                  episodes: Sequence[tuple[int, jax.Array]], **kwargs: Any) -> list[Trajectory]:
        """`run_episodes` with the run's worker recovery; its failures are counted in the counters."""
        before = self.recovery.failures
        try:
            return run_episodes(self.agent, self.learner, selection, envs, episodes, recovery=self.recovery, **kwargs)
        finally:
            self.counters.worker_failures += self.recovery.failures - before

    @property
    def learns(self) -> bool:
        """Whether the critics learn (the base rule uses nothing they learn, so its episodes are not stored)."""
        return self.config.selection.rule != "base"

    def store(self, trajectory: Trajectory) -> float:
        """Stores one episode: the success buffer when the actor trains, and replay (with the frozen-actor cache
        of its observed rows) when the critics learn. Returns the FLOPs the cache cost."""
        start = time.perf_counter()
        if trajectory.success and self.successes is not None:
            self.successes.add_episode(trajectory.decision_observations(), np.stack(trajectory.chunks))
        flops = self._store(trajectory) if self.learns else 0.0
        self.counters.add_time("cache", time.perf_counter() - start)
        return flops

    def _store(self, trajectory: Trajectory) -> float:
        """Adds one episode to replay. The acting side computed the frozen-actor cache of the rows it acted at;
        the rest (the final observation, and every-step rows) is encoded here (`Agent.cache`); replay only
        stores it."""
        actions = np.concatenate(trajectory.actions).astype(np.float32)
        rewards = np.concatenate(trajectory.rewards).astype(np.float32)
        length = len(actions)
        observed_rows = np.asarray(trajectory.rows)
        model_obs = self.agent.observations(trajectory.observations)
        spec = self.cache_spec
        missing = [i for i, r in enumerate(trajectory.rows) if r not in trajectory.cache]
        encoded: dict[str, np.ndarray] = {}
        if missing:
            noise = row_noise(trajectory.cache_key, [trajectory.rows[i] for i in missing],
                              (spec.num_seeds, spec.action_horizon, spec.action_dim))
            take = lambda x: np.asarray(x)[missing]  # noqa: E731
            # Batches of cache_batch, or of the next power of two above fewer rows: with the acting pass's cache
            # an episode leaves one row (its final observation) here, which a full batch would encode 8-16 times.
            size = min(self.config.cache_batch, 1 << (len(missing) - 1).bit_length())
            encoded = self.agent.cache(jax.tree.map(take, model_obs), noise, batch_size=size)
        from_acting = {i: trajectory.cache[r].cache_row() for i, r in enumerate(trajectory.rows) if r in trajectory.cache}
        fields = encoded.keys() if encoded else next(iter(from_acting.values())).keys()
        cache_rows = {k: np.stack([from_acting[i][k] if i in from_acting else encoded[k][missing.index(i)]
                                   for i in range(len(observed_rows))]) for k in fields}
        inputs = critic_inputs(self.learner_config.chunk_critic.encoder, model_obs, cache_rows["features"])
        stored = {k: np.asarray(v) for k, v in inputs.items() if k != "features"}  # state, and images if read
        # Scatter the observed rows into per-step arrays; unobserved rows are never a window's s_t or s_{t+h}.
        full_obs = {k: np.zeros((length + 1, *v.shape[1:]), v.dtype) for k, v in stored.items()}
        full_cache = {k: np.zeros((length + 1, *v.shape[1:]), np.float32) for k, v in cache_rows.items()}
        for k, v in stored.items():
            full_obs[k][observed_rows] = v
        for k, v in cache_rows.items():
            full_cache[k][observed_rows] = v
        terminals = np.zeros(length, bool)
        terminals[-1] = trajectory.success
        self.replay.add_episode(full_obs, actions, rewards, terminals, truncated=not trajectory.success,
                                cache=full_cache)
        # Acted rows cost the cache's denoising only (their prefix was encoded to act); the rest a prefix too.
        return self._cache_denoise_flops * len(observed_rows) + self._prefix_flops * len(missing)

    # -- updates -------------------------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One learner update on utd·B windows; raises NonFiniteLossError on a NaN/Inf."""
        start = time.perf_counter()
        cfg = self.config
        windows = self.replay.sample_windows(self.sample_rng, cfg.utd * cfg.batch_size, self.horizon, cfg.gamma,
                                             stride=self.stride)
        # Data-parallel over the local devices: the minibatch axis is split, the gradients all-reduced by XLA.
        batch = self.parallel.shard(to_learner_batch(windows, cfg.utd, features=self.uses_features), axis=1)
        if self._update_flops is None:
            self._update_flops = float(self.learner.update_flops(batch))
        learner, info = self.learner.update(batch)
        info = {k: float(v) for k, v in info.items()}
        raise_if_non_finite(info, f"update {self.counters.updates + 1}",
                            f"the run stops; its last good checkpoint is in {self.checkpointer.directory}. Lower "
                            "--learning-rate or check the rewards and actions.")
        self.learner = learner
        self.counters.updates += 1
        self.counters.update_flops += self._update_flops
        self.counters.add_time("update", time.perf_counter() - start)
        return info

    def update_actor(self, updates: int) -> list[dict[str, float]]:
        """`updates` × steps_per_update flow-loss steps of the action expert on successful chunks, then the
        actor acts with the result (its EMA); nothing before the first success. Raises NonFiniteLossError."""
        if self.actor_trainer is None or self.successes is None or len(self.successes) == 0:
            return []
        start = time.perf_counter()
        cfg = self.config.actor_optimizer
        trainer, infos = self.actor_trainer, []
        for _ in range(updates * cfg.steps_per_update):
            observation, actions = self.policy.to_training_batch(self.successes.sample(self.sample_rng,
                                                                                       cfg.batch_size))
            trainer, info = trainer.update(self.policy.actor, observation, actions)
            infos.append(info)
        infos = [{k: float(v) for k, v in i.items()} for i in infos]
        raise_if_non_finite(infos, f"actor update {self.counters.actor_updates + 1}",
                            f"the run stops; its last good checkpoint is in {self.checkpointer.directory}. Lower "
                            "--actor-optimizer.learning-rate.")
        self.actor_trainer = trainer
        self.policy.actor.params = trainer.acting_params  # the agent, evaluation and caching act with it
        self.counters.actor_updates += len(infos)
        self.counters.actor_update_flops += self._actor_step_flops * len(infos)
        self.counters.add_time("actor_update", time.perf_counter() - start)
        return infos

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, env: LiberoEnv | EnvWorkers) -> float:
        """Greedy selection on init states 0..eval_episodes-1 (the same ones every time): in `env` (the training
        env, or the training pool in lockstep), or in envs of its own (on the run's env backend) when
        eval_num_workers > 1 or the training env renders every step. A failed worker is replaced and its
        episode run again (the run's recovery). With --eval-protocol openpi the episodes run in envs of that
        protocol, opened for this evaluation only."""
        start = time.perf_counter()
        n = min(self.config.eval_episodes, num_init_states(env))
        workers = min(self.config.eval_num_workers, n)
        episodes = init_state_keys(range(n), jax.random.key(self.config.seed + EVAL_KEY_OFFSET))
        protocol = get_protocol(self.config.eval_protocol)
        if protocol.name != "chunk":
            # Its own envs (openpi's renders, resets and episode length), opened afresh for each evaluation: a
            # placement stream seeded at creation, so every evaluation sees the same fixture placements.
            env_config = protocol.env_config(self.config.env, self.policy.actor.config.siglip.image_size)
            with open_envs(env_config, workers, self.config.envs) as envs:
                results = self._episodes(self.eval_selection, envs, episodes, protocol=protocol)
        else:
            # Greedy episodes read chunk-end observations only, which chunk_boundary renders bit for bit as
            # every_step does: an every_step run (every-window training) evaluates in envs of its own that skip
            # the other renders, rather than in its training env.
            env_config = self.config.env
            if env_config.render_mode == "every_step":
                env_config = dataclasses.replace(env_config, render_mode="chunk_boundary")
            own = workers > 1 or env_config != self.config.env
            if own and self._eval_envs is None:
                self._eval_envs = open_envs(env_config, workers, self.config.envs)
            envs = self._eval_envs if own else env
            results = self._episodes(self.eval_selection, envs, episodes)
        self.last_eval = [r.summary() for r in results]
        self.counters.add_time("eval", time.perf_counter() - start)
        return float(np.mean([r.success for r in results]))

    def close(self) -> None:
        """Closes the evaluation's own envs, if any were opened (a later evaluation opens them again)."""
        if self._eval_envs is not None:
            self._eval_envs.close()
            self._eval_envs = None

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self, eval_success: float | None) -> None:
        start = time.perf_counter()  # counted from the next checkpoint on (this one holds the counters)
        self.checkpointer.save(self.counters.episodes, self.learner, self.replay, self.sample_rng,
                               dataclasses.asdict(self.counters), eval_success=eval_success,
                               actor=self.actor_trainer, successes=self.successes)
        self.counters.add_time("checkpoint", time.perf_counter() - start)

    def restore(self) -> bool:
        """Loads the latest checkpoint into this run; False when there is none."""
        restored = self.checkpointer.restore_latest(self.learner)
        if restored is None:
            return False
        self.learner, self.replay = self.parallel.replicate(restored.learner), restored.replay
        self.sample_rng = np.random.default_rng()
        self.sample_rng.bit_generator.state = restored.rng_state
        self.counters = Counters(**restored.counters)
        actor = self.checkpointer.restore_actor(restored.episode, self.actor_trainer)
        if actor is not None:
            self.actor_trainer, self.successes = actor
            self.policy.actor.params = self.actor_trainer.acting_params
        return True

