"""A small chunked-control task with a fixed flow actor, where some noise seeds are better than others.

It exists to check the learning machinery end to end in seconds on a CPU (the CI learning check): the
same replay, chunked TD, critics, selection rules and learner as the VLA runs, with a "VLA" whose cost is
trivial but which is still a T-step flow model driven by an initial noise.

Task: a point at `pos` in the plane must reach `goal` (both in [-1, 1]²); an action chunk is H planar
velocity commands, each moving the point by 0.1·clip(a, -1, 1). Termination when within `radius` of the
goal, `max_chunks` chunks per episode. Reward per step: the distance gained towards the goal, plus 1 on
success (dense, so a CI-sized run learns its critics; the check is about selection, not exploration).

Actor: Euler integration of the fixed velocity field v(x, t) = x − m(s) from x_1 = ε over T steps, so the
chunk is m(s) + (1 − 1/T)^T·(ε − m(s)): the mean m(s) points to the goal rotated by `mean_rotation`
radians (the pretrained policy is biased), and the noise moves the chunk around it. Seeds that undo the
bias reach the goal in fewer chunks, so best-of-N and FASTER have something to find, and the gain is
exactly attributable to choosing among seeds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.critics.edit_policy import EditPolicyConfig
from faster_vla.critics.encoders import EncoderConfig
from faster_vla.critics.networks import ChunkCriticConfig, NoiseCriticConfig
from faster_vla.rl.learner import Learner, LearnerConfig
from faster_vla.rl.batches import to_learner_batch
from faster_vla.rl.replay import ReplayBuffer
from faster_vla.rl.selection import SelectionConfig


@dataclasses.dataclass(frozen=True)
class ToyTaskConfig:
    horizon: int = 2  # H: actions per chunk
    action_dim: int = 2
    num_steps: int = 10  # T: Euler steps of the flow actor
    max_chunks: int = 24
    radius: float = 0.15
    step_size: float = 0.1
    mean_rotation: float = 0.9  # radians; the actor's bias (base ≈ 40 % success, learned best-of-8 ≈ 90 %)
    mean_speed: float = 0.6

    @property
    def obs_dim(self) -> int:
        return 4  # pos, goal

    @property
    def feature_dim(self) -> int:
        return 8  # see toy_features


def toy_features(obs: jax.Array) -> jax.Array:
    """obs [..., 4] -> critic features [..., 8]: pos, goal, offset and unit direction to the goal.

    The stand-in for the frozen backbone's features: the VLA's critics read a learned representation of
    the scene, not raw coordinates, so the toy's critics get the task-relevant geometry directly.
    """
    offset = obs[..., 2:] - obs[..., :2]
    unit = offset / (jnp.linalg.norm(offset, axis=-1, keepdims=True) + 1e-6)
    return jnp.concatenate([obs, offset, unit], axis=-1)


class FlowActor:
    """A fixed flow policy over chunks [H, 2]; `denoise` mirrors `Pi05Actor.denoise` (batched candidates)."""

    def __init__(self, config: ToyTaskConfig) -> None:
        self.config = config
        self._denoise = jax.jit(self._denoise_impl)

    def mean(self, obs: jax.Array) -> jax.Array:
        """obs [B, 4] -> the biased mean chunk [B, H, 2]."""
        cfg = self.config
        direction = obs[:, 2:] - obs[:, :2]
        c, s = jnp.cos(cfg.mean_rotation), jnp.sin(cfg.mean_rotation)
        rotated = jnp.stack([c * direction[:, 0] - s * direction[:, 1], s * direction[:, 0] + c * direction[:, 1]], -1)
        unit = rotated / (jnp.linalg.norm(rotated, axis=-1, keepdims=True) + 1e-6)
        return jnp.broadcast_to(cfg.mean_speed * unit[:, None, :], (obs.shape[0], cfg.horizon, 2))

    def _denoise_impl(self, obs: jax.Array, noise: jax.Array) -> jax.Array:
        dt = -1.0 / self.config.num_steps
        m = self.mean(obs)[:, None]  # [B, 1, H, 2]

        def step(x, _):
            return x + dt * (x - m), None

        x, _ = jax.lax.scan(step, noise, None, length=self.config.num_steps)
        return x

    def denoise(self, obs: jax.Array, noise: jax.Array) -> jax.Array:
        """obs [B, 4], noise [B, N, H, 2] -> chunks [B, N, H, 2] (T Euler steps per candidate)."""
        return self._denoise(obs, noise)


class ToyEnv:
    """Batched-free numpy env; one episode at a time, chunk-stepped."""

    def __init__(self, config: ToyTaskConfig, seed: int = 0) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.pos = np.zeros(2)
        self.goal = np.zeros(2)

    def reset(self) -> np.ndarray:
        while True:
            self.pos, self.goal = self.rng.uniform(-1, 1, 2), self.rng.uniform(-1, 1, 2)
            if np.linalg.norm(self.pos - self.goal) > 0.8:
                return self.obs()

    def obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.goal]).astype(np.float32)

    def step_chunk(self, chunk: np.ndarray) -> tuple[list[np.ndarray], list[float], list[bool]]:
        """Executes a whole chunk [H, 2]; stops at success. Returns per-step next obs, rewards, terminals."""
        observations, rewards, terminals = [], [], []
        for action in np.asarray(chunk):
            before = np.linalg.norm(self.pos - self.goal)
            self.pos = self.pos + self.config.step_size * np.clip(action, -1, 1)
            after = np.linalg.norm(self.pos - self.goal)
            done = bool(after < self.config.radius)
            observations.append(self.obs())
            rewards.append(float(before - after) + (1.0 if done else 0.0))
            terminals.append(done)
            if done:
                break
        return observations, rewards, terminals


@dataclasses.dataclass(frozen=True)
class ToyRunConfig:
    """One online run on the toy task: collect with `rule`, store with the frozen-actor cache, update."""

    rule: str = "faster"
    num_candidates: int = 8
    episodes: int = 40
    updates_per_episode: int = 4
    utd: int = 10
    batch_size: int = 32
    eval_episodes: int = 40
    hidden: int = 64
    members: int = 10
    noise_target: str = "all"  # regress Q^dn on every cached seed (all K chunks are in the cache)
    # The TD backup and α's entropy space the toy tests were calibrated with (EXPO's min backup, tanh-space α);
    # the authors' forms, the learner's defaults, are tested on their own in test_learner.py.
    td_backup: str = "min"
    alpha_entropy: str = "tanh"
    seed: int = 0


def toy_learner_config(task: ToyTaskConfig, run: ToyRunConfig) -> LearnerConfig:
    """Small critics for the toy task (the same network code as pi05_libero's, other sizes)."""

    encoder = EncoderConfig(kind="backbone", state_dim=task.obs_dim, state_embed_dim=16,
                            feature_dim=task.feature_dim, feature_proj_dim=64)
    chunk = (task.horizon, task.action_dim)
    return LearnerConfig(
        chunk_critic=ChunkCriticConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=(run.hidden, run.hidden),
                                       num_members=run.members),
        noise_critic=NoiseCriticConfig(encoder=encoder, noise_shape=chunk, hidden_dims=(run.hidden, run.hidden),
                                       num_members=run.members),
        edit_policy=EditPolicyConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=(run.hidden, run.hidden),
                                     beta=0.2),
        selection=SelectionConfig(run.rule, run.num_candidates, 0.0),
        utd=run.utd,
        batch_size=run.batch_size,
        noise_target=run.noise_target,
        td_backup=run.td_backup,
        alpha_entropy=run.alpha_entropy,
    )


def train_and_evaluate(task: ToyTaskConfig, run: ToyRunConfig) -> dict[str, float]:
    """Online training then greedy evaluation; returns eval return/success and the actor compute spent.

    Every stored step carries its cache (K = N noises and their chunks), so updates never call the actor;
    `actor_steps_per_decision` counts what the RULE needs the actor for when acting (Euler steps × chunks).
    """

    actor = FlowActor(task)
    config = toy_learner_config(task, run)
    n, h, a = run.num_candidates, task.horizon, task.action_dim
    learner = Learner.create(config, _inputs(jnp.zeros((1, task.obs_dim))), seed=run.seed)
    replay = ReplayBuffer(capacity=(run.episodes + 1) * (task.max_chunks * h + 1))
    rng = np.random.default_rng(run.seed)
    key = jax.random.key(run.seed)

    @jax.jit
    def act(learner, key, obs, noise, denoised):  # obs [1, 4], noise/denoised [1, N, H, A]
        inputs = _inputs(obs)
        lookup = lambda idx: jnp.take_along_axis(denoised, idx[:, :, None, None], axis=1)  # noqa: E731
        return learner.select(key, inputs, noise, lookup).action[0]

    max_rows = task.max_chunks * h + 1

    def pool(obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """obs [T, 4] -> K noises [T, K, H, A] and their chunks: one batched actor call, padded to a fixed
        row count so episodes of every length share one compiled function."""
        rows = obs.shape[0]
        noise = rng.normal(size=(rows, n, h, a)).astype(np.float32)
        padded_obs = np.zeros((max_rows, obs.shape[1]), np.float32)
        padded_obs[:rows] = obs
        padded_noise = np.zeros((max_rows, n, h, a), np.float32)
        padded_noise[:rows] = noise
        return noise, np.asarray(actor.denoise(jnp.asarray(padded_obs), jnp.asarray(padded_noise)))[:rows]

    def episode(env: ToyEnv, learner, key, store: bool, rng: np.random.Generator) -> tuple[float, bool]:
        observations = [env.reset()]
        actions, rewards, terminals = [], [], []
        for _ in range(task.max_chunks):
            key, sub = jax.random.split(key)
            noise, denoised = pool(observations[-1][None], rng)  # the acting rule's N seeds at this chunk start
            chunk = np.asarray(act(learner, sub, jnp.asarray(observations[-1][None]), noise, denoised))
            next_obs, r, d = env.step_chunk(chunk)
            actions.extend(chunk[: len(next_obs)])
            observations.extend(next_obs)
            rewards.extend(r)
            terminals.extend(d)
            if terminals[-1]:
                break
        if store:
            # The cache: every stored step (windows start anywhere) gets K seeds and the actor's chunks.
            noise, denoised = pool(np.stack(observations), rng)
            obs = np.stack(observations)
            replay.add_episode({"state": obs}, np.stack(actions), np.asarray(rewards, np.float32),
                               np.asarray(terminals), truncated=not terminals[-1],
                               cache={"noise": noise, "denoised": denoised,
                                      "features": np.asarray(toy_features(jnp.asarray(obs)))})
        return float(np.sum(rewards)), bool(terminals[-1])

    train_env = ToyEnv(task, seed=run.seed)
    for _ in range(run.episodes if run.rule != "base" else 0):  # nothing the base rule uses is learned
        key, sub = jax.random.split(key)
        episode(train_env, learner, sub, store=True, rng=rng)
        for _ in range(run.updates_per_episode):
            if replay.num_windows(h) == 0:
                break
            batch = replay.sample_windows(rng, run.utd * run.batch_size, h, config.gamma)
            learner, _ = learner.update(to_learner_batch(batch, run.utd))

    # Common random numbers: every rule is evaluated on the same start states and the same noise pools, so
    # differences between rules come from their choices, not from luck.
    eval_env = ToyEnv(task, seed=10_000 + run.seed)  # start states: one draw sequence, whatever the policy
    eval_key = jax.random.key(30_000 + run.seed)
    results = [episode(eval_env, learner, jax.random.fold_in(eval_key, i), store=False,
                       rng=np.random.default_rng([20_000 + run.seed, i]))  # per-episode noise stream
               for i in range(run.eval_episodes)]
    return {
        "return": float(np.mean([r for r, _ in results])),
        "success": float(np.mean([s for _, s in results])),
        "actor_steps_per_decision": float(config.selection.denoised_per_state * task.num_steps),
    }


def _inputs(obs: jax.Array) -> dict[str, jax.Array]:
    """Critic inputs for observations [B, 4] (what `to_learner_batch` builds from the stored state and cache)."""
    return {"features": toy_features(obs), "state": obs}
