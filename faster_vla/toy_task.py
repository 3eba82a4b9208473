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


@dataclasses.dataclass(frozen=True)
class ToyTaskConfig:
    horizon: int = 4  # H: actions per chunk
    action_dim: int = 2
    num_steps: int = 10  # T: Euler steps of the flow actor
    max_chunks: int = 12
    radius: float = 0.15
    step_size: float = 0.1
    mean_rotation: float = 0.9  # radians; the actor's bias (base ≈ 20 % success, oracle best-of-8 ≈ 99 %)
    mean_speed: float = 0.6

    @property
    def obs_dim(self) -> int:
        return 4  # pos, goal


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
    updates_per_episode: int = 3
    utd: int = 10
    batch_size: int = 64
    eval_episodes: int = 60
    hidden: int = 128
    members: int = 10
    noise_target: str = "all"  # regress Q^dn on every cached seed (all K chunks are in the cache)
    seed: int = 0


def toy_learner_config(task: ToyTaskConfig, run: ToyRunConfig):
    """Small critics for the toy task (the same network code as pi05_libero's, other sizes)."""
    from faster_vla.critics.edit_policy import EditPolicyConfig
    from faster_vla.critics.encoders import EncoderConfig
    from faster_vla.critics.networks import ChunkCriticConfig, NoiseCriticConfig
    from faster_vla.learner import LearnerConfig
    from faster_vla.selection import SelectionConfig

    encoder = EncoderConfig(kind="backbone", state_dim=task.obs_dim, state_embed_dim=16, feature_dim=task.obs_dim,
                            feature_proj_dim=64)
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
    )


def train_and_evaluate(task: ToyTaskConfig, run: ToyRunConfig) -> dict[str, float]:
    """Online training then greedy evaluation; returns eval return/success and the actor compute spent.

    Every stored step carries its cache (K = N noises and their chunks), so updates never call the actor;
    `actor_steps_per_decision` counts what the RULE needs the actor for when acting (Euler steps × chunks).
    """
    from faster_vla.learner import Learner
    from faster_vla.replay import ReplayBuffer

    actor = FlowActor(task)
    config = toy_learner_config(task, run)
    n, h, a = run.num_candidates, task.horizon, task.action_dim
    obs_example = jnp.zeros((1, task.obs_dim))
    learner = Learner.create(config, {"features": obs_example, "state": obs_example}, seed=run.seed)
    replay = ReplayBuffer(capacity=(run.episodes + 1) * (task.max_chunks * h + 1))
    rng = np.random.default_rng(run.seed)
    key = jax.random.key(run.seed)

    @jax.jit
    def act(learner, key, obs, noise, denoised):  # obs [1, 4], noise/denoised [1, N, H, A]
        inputs = {"features": obs, "state": obs}
        lookup = lambda idx: jnp.take_along_axis(denoised, idx[:, :, None, None], axis=1)  # noqa: E731
        return learner.select(key, inputs, noise, lookup).action[0]

    def pool(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        noise = rng.normal(size=(1, n, h, a)).astype(np.float32)
        return noise, np.asarray(actor.denoise(jnp.asarray(obs[None]), jnp.asarray(noise)))

    def episode(env: ToyEnv, learner, key, store: bool) -> tuple[float, bool]:
        # Every observation gets its own pool; acting at a chunk start uses that observation's pool, which is
        # exactly what the TD target will see there.
        observations = [env.reset()]
        pools = [pool(observations[0])]
        actions, rewards, terminals = [], [], []
        for _ in range(task.max_chunks):
            key, sub = jax.random.split(key)
            noise, denoised = pools[-1]
            chunk = np.asarray(act(learner, sub, jnp.asarray(observations[-1][None]), noise, denoised))
            next_obs, r, d = env.step_chunk(chunk)
            for i, o in enumerate(next_obs):
                actions.append(chunk[i])
                observations.append(o)
                # Stored episodes need a pool at every step; evaluation only at the next chunk start.
                pools.append(pool(o) if store or i == len(next_obs) - 1 else None)
                rewards.append(r[i])
                terminals.append(d[i])
            if terminals[-1]:
                break
        if store:
            replay.add_episode({"obs": np.stack(observations)}, np.stack(actions), np.asarray(rewards, np.float32),
                               np.asarray(terminals), truncated=not terminals[-1],
                               cache={"noise": np.stack([p[0][0] for p in pools]),
                                      "denoised": np.stack([p[1][0] for p in pools])})
        return float(np.sum(rewards)), bool(terminals[-1])

    train_env = ToyEnv(task, seed=run.seed)
    for _ in range(run.episodes):
        key, sub = jax.random.split(key)
        episode(train_env, learner, sub, store=True)
        if run.rule == "base":
            continue  # nothing the base rule uses is learned
        for _ in range(run.updates_per_episode):
            if replay.num_windows(h) == 0:
                break
            batch = replay.sample_windows(rng, run.utd * run.batch_size, h, config.gamma)
            learner, _ = learner.update(_stack_minibatches(batch, run.utd))

    eval_env = ToyEnv(task, seed=10_000 + run.seed)
    results = [episode(eval_env, learner, jax.random.fold_in(key, i), store=False) for i in range(run.eval_episodes)]
    return {
        "return": float(np.mean([r for r, _ in results])),
        "success": float(np.mean([s for _, s in results])),
        "actor_steps_per_decision": float(config.selection.denoised_per_state * task.num_steps),
    }


def _stack_minibatches(batch, utd: int) -> dict:
    """A ChunkBatch of utd·B windows -> learner batch with every leaf [utd, B, ...]."""
    split = lambda x: jnp.asarray(x).reshape(utd, -1, *x.shape[1:])  # noqa: E731
    inputs = {"features": batch.observations["obs"], "state": batch.observations["obs"]}
    next_inputs = {"features": batch.next_observations["obs"], "state": batch.next_observations["obs"]}
    return jax.tree.map(split, {
        "inputs": inputs, "next_inputs": next_inputs, "actions": batch.actions, "returns": batch.returns,
        "discount": batch.discount, "cache": batch.cache, "next_cache": batch.next_cache,
    })
