"""The FASTER-EXPO fine-tuning run on LIBERO (the paper's VLA protocol, §5.3 and appendix B).

One episode at a time: act with the train-time selection rule, executing whole chunks; store the episode
with the frozen-actor cache of every state a window can start or bootstrap at; run the learner's updates
(episode-wise: U updates of UTD critic steps each); every K episodes evaluate greedily on a fixed set of the
suite's init states; log, plot and checkpoint. Counters: env steps, episodes, successes, and FLOPs split into
acting, caching and updates (cumulative: the paper's Fig. 7 x-axis).

With `actor_update="success_bc"` (EXPO's π0.5 recipe) the action expert also learns: every successful
training episode's (observation, executed chunk) pairs go to a `SuccessBuffer`, and after the learner's
updates the actor takes flow-loss steps on them and acts with their EMA. Replay rows keep the chunks the
actor produced when they were stored (their prefix features stay exact: the VLM is frozen).

Everything a resume needs is in the run checkpoint (learner, replay with its cache, sampling RNG, counters,
and the actor trainer with its success buffer when the actor trains); per-episode randomness (init state,
noises) derives from (seed, episode), so a resumed run continues exactly as an uninterrupted one would from
that checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.actor_finetune import ActorFinetuneConfig, ActorTrainer
from faster_vla.actor_source import ActorSource
from faster_vla.agent import Agent, critic_inputs
from faster_vla.critics.edit_policy import EditPolicyConfig
from faster_vla.critics.encoders import EncoderConfig
from faster_vla.critics.networks import ChunkCriticConfig, NoiseCriticConfig
from faster_vla.env_pool import EnvPool
from faster_vla.learner import Learner, LearnerConfig
from faster_vla.libero_env import LiberoEnv, LiberoEnvConfig, check_libero_installed, make_libero_pool, resolve_task
from faster_vla.policies import flops as actor_flops
from faster_vla.policies.config import get_preset
from faster_vla.policies.policy import Policy
from faster_vla.replay import ChunkBatch, FrozenActorCacheSpec, ReplayBuffer
from faster_vla.rollout import check_num_workers, run_episodes
from faster_vla.run_checkpoint import RunCheckpointer
from faster_vla.run_log import RunLogger, ensure_writable_dir, from_jsonable
from faster_vla.schedule import UpdateSchedule
from faster_vla.selection import SelectionConfig
from faster_vla.success_buffer import SuccessBuffer

RECENT_EPISODES = 20
"""Episodes in the moving success rate `train/recent_success_rate`: the cumulative rate hides a trend."""


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """Critic and edit-policy sizes (defaults: the ≈20M-parameter noise critic of the design card)."""

    hidden_dims: tuple[int, ...] = (768, 768)
    """Hidden widths of every ensemble member's MLP (and of the edit policy)."""
    num_members: int = 10
    """Ensemble members of Q^a and Q^dn (min over a random pair)."""
    feature_proj_dim: int = 1024
    """Width the frozen backbone's prefix features are projected to."""
    state_embed_dim: int = 64
    """Width of the proprio state embedding."""
    edit_scale: float = 0.2
    """EXPO's β: the edit's bound around the base chunk (normalised units); 0.2 for the VLA."""
    edit_init_temperature: float = 1.0
    """EXPO's initial entropy temperature α of the edit policy (1.0). log α moves by about the learning rate
    per update, so over a short run (≈100 updates) α stays near it and the edits stay near-uniform
    exploration; a smaller value lets the critic steer them from the start (docs/reproduction.md)."""

    def __post_init__(self) -> None:
        if not self.edit_init_temperature > 0:
            raise ValueError(f"edit_init_temperature must be > 0 (α is learned in log space), got "
                             f"{self.edit_init_temperature}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A FASTER-EXPO (or EXPO, or base) fine-tuning run of π0.5 on one LIBERO task."""

    run_dir: Path = Path("runs/faster_expo")
    """Run folder: config, metrics, plots, wandb files and checkpoints."""
    actor: ActorSource = ActorSource()
    """The frozen π0.5 policy being fine-tuned."""
    env: LiberoEnvConfig = LiberoEnvConfig()
    """The LIBERO task (suite, task id or name, rendering)."""
    selection: SelectionConfig = SelectionConfig("faster", num_candidates=8, temperature=0.0)
    """Train-time selection rule (evaluation uses the same rule, greedy)."""
    critics: CriticConfig = CriticConfig()
    """Critic sizes."""
    episodes: int = 500
    """Training episodes."""
    env_step_budget: int | None = None
    """Also stop after the episode that brings the run to this many env steps (methods compared side by side
    get the same budget; episodes that succeed sooner leave more of it). None: only `episodes` counts."""
    updates_per_episode: int = 3
    """Updates after each episode (the paper's VLA setting: 3)."""
    utd: int = 10
    """Critic steps per update (each on its own minibatch)."""
    batch_size: int = 32
    """Windows per critic step."""
    gamma: float = 0.99
    """Per-step discount."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    learning_rate: float = 3e-4
    """Adam learning rate of critics, edit policy and α."""
    num_steps: int = 10
    """Euler denoising steps of the actor."""
    window_starts: Literal["chunk", "step"] = "chunk"
    """Where replay windows may start: at chunk boundaries (observed when rendering chunk_boundary), or at
    every step (the paper's all-sliding-windows; needs env.render_mode=every_step and caches every step)."""
    replay_capacity: int = 100_000
    """Replay size in env steps (whole episodes are evicted, oldest first)."""
    cache_batch: int = 16
    """Observations per actor call when caching an episode."""
    eval_every: int = 10
    """Evaluate every this many episodes (0: never); also at the end."""
    eval_episodes: int = 10
    """Evaluation episodes, on the suite's init states 0..eval_episodes-1 (the same every time)."""
    eval_num_workers: int = 1
    """Env worker processes for the evaluation (1: the training env). More step the eval episodes in lockstep, the
    policy acting once per step on all of them; each needs ~2 GB of RAM and, on CPU, about a core (rendering
    dominates a step). Started at the first evaluation and kept until the run ends."""
    checkpoint_every: int = 5
    """Save a run checkpoint every this many episodes (and after each evaluation and at the end)."""
    actor_update: Literal["frozen", "success_bc"] = "frozen"
    """What happens to the actor: frozen (the FASTER-EXPO default: replay caches what the actor computes), or
    success_bc (EXPO's π0.5 recipe): after each episode's learner updates, the action expert also takes
    flow-loss steps on the chunks of the successful training episodes (VLM frozen) and the actor acts with
    their EMA. Replay rows keep the chunks the actor produced when they were stored (docs/finetune.md)."""
    actor_optimizer: ActorFinetuneConfig = ActorFinetuneConfig()
    """The action expert's optimiser, EMA, augmentation, batch size and flow-loss steps per learner update
    (with --actor-update success_bc)."""
    success_capacity: int = 2000
    """Chunks of successful episodes kept for the actor's flow loss (oldest episodes dropped first); each holds
    its two camera images, so this bounds memory and checkpoint size."""
    keep_last: int = 3
    """Checkpoints kept by recency."""
    keep_best: int = 1
    """Checkpoints kept by eval success."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb logging: offline (default, no login), online, or disabled."""
    progress: bool = True
    """Show a progress bar on a terminal."""
    seed: int = 0
    """Seed of init-state choice, noises, critics and replay sampling."""

    def __post_init__(self) -> None:
        for name in ("episodes", "updates_per_episode", "utd", "batch_size", "num_steps", "replay_capacity",
                     "cache_batch", "checkpoint_every", "keep_last", "eval_episodes", "success_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_num_workers(self.eval_num_workers, "eval_num_workers")
        if self.env_step_budget is not None and self.env_step_budget < 1:
            raise ValueError(f"env_step_budget must be >= 1 or None, got {self.env_step_budget}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        if self.window_starts not in ("chunk", "step"):
            raise ValueError(f"window_starts must be 'chunk' or 'step', got {self.window_starts!r}")
        if self.window_starts == "step" and self.env.render_mode != "every_step":
            raise ValueError("window_starts='step' trains on windows starting at every step, which needs an "
                             "observation at every step: set --env.render-mode every_step (or use "
                             "--window-starts chunk)")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.actor_update not in ("frozen", "success_bc"):
            raise ValueError(f"actor_update must be 'frozen' or 'success_bc', got {self.actor_update!r}")
        if self.actor_update == "success_bc":
            if self.actor_optimizer.trainable != "action_expert":
                raise ValueError("--actor-update success_bc trains the action expert only: replay caches the "
                                 "frozen VLM's prefix features, which training the VLM would make stale; set "
                                 "--actor-optimizer.trainable action_expert")
            if self.env.render_mode == "none":
                raise ValueError("--actor-update success_bc trains on the camera images of successful episodes: "
                                 "set --env.render-mode chunk_boundary (or every_step)")


def learner_config(config: TrainConfig, actor_config: Any) -> LearnerConfig:
    """Critics sized by `config.critics`, shaped for this actor (chunks [H, 7], noise [H, A_model])."""
    c = config.critics
    encoder = EncoderConfig(kind="backbone", state_dim=8, state_embed_dim=c.state_embed_dim,
                            feature_dim=2 * actor_config.paligemma_config.width, feature_proj_dim=c.feature_proj_dim)
    chunk = (actor_config.action_horizon, 7)
    return LearnerConfig(
        chunk_critic=ChunkCriticConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=c.hidden_dims,
                                       num_members=c.num_members),
        noise_critic=NoiseCriticConfig(encoder=encoder, noise_shape=(actor_config.action_horizon,
                                                                     actor_config.action_dim),
                                       hidden_dims=c.hidden_dims, num_members=c.num_members),
        edit_policy=EditPolicyConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=c.hidden_dims, beta=c.edit_scale),
        selection=config.selection,
        gamma=config.gamma, tau=config.tau, utd=config.utd, batch_size=config.batch_size,
        critic_lr=config.learning_rate, policy_lr=config.learning_rate, temperature_lr=config.learning_rate,
        init_temperature=c.edit_init_temperature,
    )


def to_learner_batch(windows: ChunkBatch, utd: int) -> dict:
    """Replay windows (utd·B of them) -> the learner's batch, every leaf [utd, B, ...].

    Critic inputs are the stored normalised state plus the cached prefix features; the rest of the cache
    (noises, their chunks, filter x_t) is what targets read instead of running the actor.
    """
    def inputs(obs: Mapping[str, np.ndarray], cache: Mapping[str, np.ndarray]) -> dict:
        out = {"state": obs["state"]}
        if "features" in cache:
            out["features"] = cache["features"]
        return out

    def actor_part(cache: Mapping[str, np.ndarray]) -> dict:
        return {k: v for k, v in cache.items() if k != "features"}

    batch = {
        "inputs": inputs(windows.observations, windows.cache),
        "next_inputs": inputs(windows.next_observations, windows.next_cache),
        "actions": windows.actions, "returns": windows.returns, "discount": windows.discount,
        "cache": actor_part(windows.cache), "next_cache": actor_part(windows.next_cache),
    }
    return jax.tree.map(lambda x: jnp.asarray(x).reshape(utd, -1, *x.shape[1:]), batch)


class NonFiniteLossError(FloatingPointError):
    """An update produced a NaN or Inf; the run stops and keeps its last good checkpoint."""


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
        self.agent = Agent(self.policy, self.learner_config, num_steps=config.num_steps, seed=config.seed)
        self.horizon = actor_config.action_horizon
        self.stride = self.horizon if config.window_starts == "chunk" else 1
        self.cache_spec = FrozenActorCacheSpec.from_config(actor_config, config.selection.num_candidates)
        self.eval_selection = dataclasses.replace(config.selection, temperature=0.0)
        self.schedule = UpdateSchedule("episode", updates_per_episode=config.updates_per_episode)
        example = self.learner_config.chunk_critic.encoder.example_inputs(1)
        self.learner = Learner.create(self.learner_config, example, seed=config.seed)
        self.replay = ReplayBuffer(config.replay_capacity, cache_spec=self.cache_spec)
        self.sample_rng = np.random.default_rng([config.seed, 1])
        self.counters = Counters()
        self.checkpointer = RunCheckpointer(config.run_dir / "checkpoints", keep_last=config.keep_last,
                                            keep_best=config.keep_best)
        self._update_flops: float | None = None
        self._eval_envs: EnvPool | None = None  # eval worker processes, when eval_num_workers > 1
        self._cache_row_flops = float(actor_flops.prefix_flops(actor_config) + config.selection.num_candidates
                                      * config.num_steps * actor_flops.denoise_flops(actor_config, num_candidates=1,
                                                                                     num_steps=1))
        # One flow-loss step (analytic, as acting's actor FLOPs): the prefix forward per example, and the
        # suffix (one velocity evaluation over the chunk) forward plus backward, ≈ 3× its forward.
        self._actor_step_flops = float(config.actor_optimizer.batch_size * (
            actor_flops.prefix_flops(actor_config)
            + 3 * actor_flops.denoise_flops(actor_config, num_candidates=1, num_steps=1)))

    # -- one episode -----------------------------------------------------------------------------------------

    def episode(self, env: LiberoEnv, init_state: int, key: jax.Array, *, train: bool) -> dict[str, Any]:
        """Runs one episode; when `train`, stores it (with its cache) in replay. Returns its summary."""
        selection = self.config.selection if train else self.eval_selection
        obs = env.reset(init_state)
        boundary_obs = [obs]  # observations at chunk boundaries (and the final one)
        step_obs: list[dict] = [obs]  # one per step when rendering every step
        actions, rewards = [], []
        chunks: list[np.ndarray] = []  # executed chunks [H, 7], robot units (the actor's flow-loss targets)
        done = truncated = False
        timing: dict[str, float] = {}
        acting_flops = 0.0
        while not (done or truncated):
            key, sub = jax.random.split(key)
            decision = self.agent.act(self.learner, obs, selection=selection, rng=sub)
            result = env.step_chunk(decision.actions)
            chunks.append(decision.actions)
            n = result.num_steps
            actions.append(decision.normalized[:n])
            rewards.append(result.rewards)
            done, truncated = result.done, result.truncated
            obs = result.obs
            boundary_obs.append(obs)
            if self.stride == 1:
                if "observations" not in result.info:
                    raise RuntimeError("window_starts='step' needs the env to return every step's observation "
                                       "(info['observations'], render_mode='every_step')")
                step_obs.extend(result.info["observations"])
            acting_flops += decision.flops.total
            for part, ms in decision.timing_ms.items():
                timing[part] = timing.get(part, 0.0) + ms
        actions_arr = np.concatenate(actions).astype(np.float32)
        rewards_arr = np.concatenate(rewards).astype(np.float32)
        summary = {"success": bool(done), "steps": int(len(rewards_arr)), "return": float(rewards_arr.sum()),
                   "acting_flops": acting_flops, "timing_ms": timing}
        summary["cache_flops"] = 0.0
        if train and done and self.successes is not None:
            self.successes.add_episode(boundary_obs[:-1], np.stack(chunks))
        if train and self.config.selection.rule != "base":  # nothing the base rule uses is learned
            summary["cache_flops"] = self._store(step_obs if self.stride == 1 else boundary_obs, actions_arr,
                                                 rewards_arr, done, key)
        return summary

    def _store(self, observed: list[dict], actions: np.ndarray, rewards: np.ndarray, terminal: bool,
               key: jax.Array) -> float:
        """Adds one episode to replay; rows a window can start or bootstrap at get the frozen-actor cache."""
        length = len(actions)
        rows = np.arange(length + 1)
        observed_rows = rows if self.stride == 1 else np.minimum(np.arange(len(observed)) * self.stride, length)
        model_obs = self.agent.observations(observed)
        spec = self.cache_spec
        noise = np.asarray(jax.random.normal(key, (len(observed), spec.num_seeds, spec.action_horizon,
                                                  spec.action_dim)), np.float32)
        cache_rows = self.agent.cache(model_obs, noise, batch_size=self.config.cache_batch)
        state = np.asarray(critic_inputs(self.learner_config.chunk_critic.encoder, model_obs,
                                         cache_rows["features"])["state"], np.float32)
        # Scatter the observed rows into per-step arrays; unobserved rows are never a window's s_t or s_{t+h}.
        full_state = np.zeros((length + 1, state.shape[1]), np.float32)
        full_cache = {k: np.zeros((length + 1, *v.shape[1:]), np.float32) for k, v in cache_rows.items()}
        full_state[observed_rows] = state
        for k, v in cache_rows.items():
            full_cache[k][observed_rows] = v
        terminals = np.zeros(length, bool)
        terminals[-1] = terminal
        self.replay.add_episode({"state": full_state}, actions, rewards, terminals, truncated=not terminal,
                                cache=full_cache)
        return self._cache_row_flops * len(observed)

    # -- updates -------------------------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One learner update on utd·B windows; raises NonFiniteLossError on a NaN/Inf."""
        cfg = self.config
        windows = self.replay.sample_windows(self.sample_rng, cfg.utd * cfg.batch_size, self.horizon, cfg.gamma,
                                             stride=self.stride)
        batch = to_learner_batch(windows, cfg.utd)
        if self._update_flops is None:
            self._update_flops = float(self.learner.update_flops(batch))
        learner, info = self.learner.update(batch)
        info = {k: float(v) for k, v in info.items()}
        bad = [k for k, v in info.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"update {self.counters.updates + 1} produced non-finite {bad}: the run stops; "
                                     f"its last good checkpoint is in {self.checkpointer.directory}. Lower "
                                     "--learning-rate or check the rewards and actions.")
        self.learner = learner
        self.counters.updates += 1
        self.counters.update_flops += self._update_flops
        return info

    def update_actor(self, updates: int) -> list[dict[str, float]]:
        """`updates` × steps_per_update flow-loss steps of the action expert on successful chunks, then the
        actor acts with the result (its EMA); nothing before the first success. Raises NonFiniteLossError."""
        if self.actor_trainer is None or self.successes is None or len(self.successes) == 0:
            return []
        cfg = self.config.actor_optimizer
        trainer, infos = self.actor_trainer, []
        for _ in range(updates * cfg.steps_per_update):
            observation, actions = self.policy.to_training_batch(self.successes.sample(self.sample_rng,
                                                                                       cfg.batch_size))
            trainer, info = trainer.update(self.policy.actor, observation, actions)
            infos.append(info)
        infos = [{k: float(v) for k, v in i.items()} for i in infos]
        bad = sorted({k for i in infos for k, v in i.items() if not math.isfinite(v)})
        if bad:
            raise NonFiniteLossError(f"actor update {self.counters.actor_updates + 1} produced non-finite {bad}: the "
                                     f"run stops; its last good checkpoint is in {self.checkpointer.directory}. "
                                     "Lower --actor-optimizer.learning-rate.")
        self.actor_trainer = trainer
        self.policy.actor.params = trainer.acting_params  # the agent, evaluation and caching act with it
        self.counters.actor_updates += len(infos)
        self.counters.actor_update_flops += self._actor_step_flops * len(infos)
        return infos

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, env: LiberoEnv) -> float:
        """Greedy selection on init states 0..eval_episodes-1 (the same ones every time): in `env`, or over
        the eval worker processes when eval_num_workers > 1."""
        n = min(self.config.eval_episodes, env.num_init_states)
        workers = min(self.config.eval_num_workers, n)
        if workers > 1 and (self._eval_envs is None or self._eval_envs.closed):
            self._eval_envs = make_libero_pool(self.config.env, workers)
        envs = env if workers == 1 else self._eval_envs
        results = run_episodes(self.agent, self.learner, self.eval_selection, envs, range(n),
                               jax.random.key(self.config.seed + 1_000_003))
        return float(np.mean([r.success for r in results]))

    def close(self) -> None:
        """Stops the eval worker processes, if any were started."""
        if self._eval_envs is not None:
            self._eval_envs.close()

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self, eval_success: float | None) -> None:
        self.checkpointer.save(self.counters.episodes, self.learner, self.replay, self.sample_rng,
                               dataclasses.asdict(self.counters), eval_success=eval_success,
                               actor=self.actor_trainer, successes=self.successes)

    def restore(self) -> bool:
        """Loads the latest checkpoint into this run; False when there is none."""
        restored = self.checkpointer.restore_latest(self.learner)
        if restored is None:
            return False
        self.learner, self.replay = restored.learner, restored.replay
        self.sample_rng = np.random.default_rng()
        self.sample_rng.bit_generator.state = restored.rng_state
        self.counters = Counters(**restored.counters)
        actor = self.checkpointer.restore_actor(restored.episode, self.actor_trainer)
        if actor is not None:
            self.actor_trainer, self.successes = actor
            self.policy.actor.params = self.actor_trainer.acting_params
        return True


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


def load_trained_actor(run_dir: Path, config: TrainConfig, episode: int, policy: Policy) -> bool:
    """Puts the acting params (EMA) of a `--actor-update success_bc` run's checkpoint into `policy`, built
    from the run's `config.actor`; False, leaving it untouched, for a frozen-actor run."""
    if config.actor_update == "frozen":
        return False
    template = ActorTrainer.create(policy.actor.params, config.actor_optimizer, seed=config.seed)
    checkpointer = RunCheckpointer(Path(run_dir) / "checkpoints", keep_last=config.keep_last,
                                   keep_best=config.keep_best)
    # A checkpoint without an actor raises here (RunCheckpointError), since the template asks for one.
    trainer, _ = checkpointer.restore_actor(episode, template, successes=False)
    policy.actor.params = trainer.acting_params
    return True


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns the final counters and last eval success."""
    run = Run(config, log=log)
    if config.resume:
        if not run.restore():
            raise FileNotFoundError(f"--resume: no checkpoint in {run.checkpointer.directory}; start without --resume")
        log(f"resumed {config.run_dir} at episode {run.counters.episodes} ({run.counters.env_steps} env steps)")
    elif run.checkpointer.latest_episode is not None:
        raise FileExistsError(f"{config.run_dir} already holds a run: pass --resume to continue it, or choose "
                              "another --run-dir")
    total_env_steps = config.episodes * config.env.episode_max_steps()
    if config.env_step_budget is not None:
        total_env_steps = min(total_env_steps, config.env_step_budget)
    eval_success: float | None = None

    def finished() -> bool:  # episodes done, or the env-step budget spent
        c = run.counters
        return c.episodes >= config.episodes or (config.env_step_budget is not None
                                                 and c.env_steps >= config.env_step_budget)

    # `resume` is how this process starts, not part of the run: the stored config never carries it.
    with RunLogger(config.run_dir, dataclasses.replace(config, resume=False), resume=config.resume, wandb_mode=config.wandb_mode,
                   total_env_steps=total_env_steps, progress=config.progress) as logger:
        if config.resume:
            logger.rewind(run.counters.episodes)  # drop records logged after the checkpoint
        env = LiberoEnv(config.env)
        try:
            key = jax.random.key(config.seed)
            while not finished():
                start = time.perf_counter()
                episode = run.counters.episodes
                init_state = int(np.random.default_rng([config.seed, 2, episode]).integers(env.num_init_states))
                summary = run.episode(env, init_state, jax.random.fold_in(key, episode), train=True)
                steps_before = run.replay.steps_added - summary["steps"]
                c = run.counters
                c.episodes += 1
                c.env_steps += summary["steps"]
                c.successes += int(summary["success"])
                c.acting_flops += summary["acting_flops"]
                c.cache_flops += summary["cache_flops"]
                infos = []
                due = run.schedule.updates_due(steps_before=steps_before, steps_after=run.replay.steps_added,
                                               episode_done=True)
                update_start = time.perf_counter()
                if config.selection.rule != "base" and run.replay.num_windows(run.horizon, run.stride) > 0:
                    infos = [run.update() for _ in range(due)]  # each ends on a host sync (float(info))
                update_ms = (time.perf_counter() - update_start) * 1e3 / max(len(infos), 1)
                actor_start = time.perf_counter()
                actor_infos = run.update_actor(due)  # nothing unless the actor trains and something succeeded
                actor_ms = (time.perf_counter() - actor_start) * 1e3 / max(len(actor_infos), 1)
                c.wall_s += time.perf_counter() - start
                # The log holds one record per earlier episode (a resume rewinds it to the checkpoint).
                recent = [r["train/success"] for r in logger.records[-(RECENT_EPISODES - 1):]]
                recent.append(float(summary["success"]))
                metrics = {"episodes": c.episodes, "env_steps": c.env_steps, "updates": c.updates,
                           "flops": c.flops, "flops/acting": c.acting_flops, "flops/cache": c.cache_flops,
                           "flops/update": c.update_flops, "train/success": float(summary["success"]),
                           "train/success_rate": c.successes / c.episodes,
                           "train/recent_success_rate": float(np.mean(recent)), "train/episode_steps": summary["steps"],
                           "wall_s": c.wall_s}
                metrics.update({f"time_ms/{k}": v for k, v in summary["timing_ms"].items()})
                if infos:
                    metrics.update({f"update/{k}": float(np.mean([i[k] for i in infos])) for k in infos[0]})
                    metrics["time_ms/update"] = update_ms  # mean wall time of one update (first ones compile)
                if run.successes is not None:
                    metrics.update({"actor/updates": c.actor_updates, "actor/success_chunks": len(run.successes),
                                    "flops/actor_update": c.actor_update_flops})
                if actor_infos:
                    metrics.update({f"actor/{k}": float(np.mean([i[k] for i in actor_infos])) for k in actor_infos[0]})
                    metrics["time_ms/actor_update"] = actor_ms  # mean wall time of one flow-loss step
                evaluate = (config.eval_every and c.episodes % config.eval_every == 0) or finished()
                if evaluate:
                    eval_success = run.evaluate(env)
                    metrics["eval/success_rate"] = eval_success
                logger.log(metrics, step=c.episodes)
                if evaluate or c.episodes % config.checkpoint_every == 0:
                    run.save(eval_success if evaluate else None)
        finally:
            env.close()
            run.close()
    return {"counters": dataclasses.asdict(run.counters), "eval_success": eval_success}
