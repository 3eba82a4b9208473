"""Acting with π0.5 and a learner: env observation → adapter (encode once) → selection → denoise → edit → env.

`Agent.act` makes one decision (one chunk) for one observation in the robot's own format and reports, per
part, its wall time and its FLOPs: the input transforms, the VLM prefix (encoded once, shared by every
noise), the critics (Q^dn over the N seeds, Q^a over candidates, the edit policy) and the actor's denoising
(1 chunk for FASTER, N for best-of-N, the survivors' segments for a multi-stage filter). The rule runs through
`selection.select`, the one implementation acting, evaluation and TD targets share; only the callables it is
handed differ (here: the live actor and compiled critic calls, each timed).

`Agent.cache` computes what a replay row needs from the frozen actor (`replay.frozen_actor_cache`) for a
batch of observations, so that updates never run the actor; with a trainable actor the same call refreshes
a sampled batch instead (the cache is then recomputed, not stored).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.compute import DecisionFlops, UnitFlops, decision_flops, xla_flops
from faster_vla.critics.edit_policy import EditPolicy
from faster_vla.critics.encoders import EncoderConfig
from faster_vla.critics.networks import ChunkCritic, NoiseCritic
from faster_vla.filtering import cached_steps, filter_and_denoise, pi05_advance
from faster_vla.learner import Inputs, Learner, LearnerConfig
from faster_vla.policies.pi05 import Observation, Prefix
from faster_vla.policies.policy import Policy
from faster_vla.replay import frozen_actor_cache
from faster_vla.selection import SelectionConfig, select

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")  # what the image encoder sees: agentview + wrist


def critic_inputs(encoder: EncoderConfig, observation: Observation, features: jax.Array | None) -> Inputs:
    """Critic inputs for a batch of model observations [b]: normalised state and features or uint8 images.

    `features` [b, F] are the frozen prefix's (`Prefix.features`); the image encoder instead reads the base
    and wrist cameras at its own resolution as uint8 [b, 2, S, S, 3].
    """
    inputs = {"state": jnp.asarray(observation.state)[:, : encoder.state_dim]}
    if encoder.kind == "backbone":
        if features is None:
            raise ValueError("the backbone encoder needs the prefix features: encode the observation first")
        inputs["features"] = jnp.asarray(features, jnp.float32)
        return inputs
    images = jnp.stack([jnp.asarray(observation.images[key]) for key in CAMERAS], axis=1)  # [b, 2, H, W, 3]
    if images.shape[2:4] != (encoder.image_size, encoder.image_size):
        b, c, _, _, _ = images.shape
        images = jax.image.resize(images, (b, c, encoder.image_size, encoder.image_size, 3), "bilinear")
    inputs["images"] = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    return inputs


@jax.jit
def _score_noise(learner: Learner, inputs: Inputs, noise: jax.Array, rng: jax.Array) -> jax.Array:
    return learner.critic_fns(inputs, rng)["score_noise"](noise)


@jax.jit
def _score_x_t(learner: Learner, inputs: Inputs, x_t: jax.Array, t: jax.Array, rng: jax.Array) -> jax.Array:
    return learner.critic_fns(inputs, rng)["score_noise"](x_t, t)


@jax.jit
def _q_chunk(learner: Learner, inputs: Inputs, chunks: jax.Array, rng: jax.Array) -> jax.Array:
    return learner.critic_fns(inputs, rng)["q_chunk"](chunks)


@jax.jit
def _edit(learner: Learner, inputs: Inputs, chunks: jax.Array, rng: jax.Array, edit_rng: jax.Array) -> jax.Array:
    return learner.critic_fns(inputs, rng)["edit"](edit_rng, chunks)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One chosen chunk, in the robot's units (for the env) and in the learner's normalised space (for replay)."""

    actions: np.ndarray  # [H, robot_action_dim] robot units, what the env executes
    normalized: np.ndarray  # [H, A] normalised robot dims, what replay stores and critics see
    seed_index: int  # which of the N noises the chunk came from
    edited: bool  # whether EXPO's edit won
    noise_scores: np.ndarray | None  # [N] pessimistic Q^dn of each seed (rules that score noises)
    timing_ms: dict[str, float]  # wall time per part
    flops: DecisionFlops  # FLOPs per part (analytic actor + XLA-counted critics)


class Agent:
    """A `Policy`'s transforms and π0.5 actor, acting by a learner's selection rule."""

    def __init__(self, policy: Policy, config: LearnerConfig, *, num_steps: int = 10, seed: int = 0) -> None:
        actor_config = policy.actor.config
        h, a = config.chunk_critic.chunk_shape
        if h != actor_config.action_horizon or config.noise_critic.noise_shape != (h, actor_config.action_dim):
            raise ValueError(
                f"critics see chunks {config.chunk_critic.chunk_shape} and noise {config.noise_critic.noise_shape}, "
                f"the actor emits [{actor_config.action_horizon}, {actor_config.action_dim}]: build the learner "
                "config for this actor")
        schedule = config.filter_schedule
        if schedule is not None and schedule.num_steps != num_steps:
            raise ValueError(f"the filter schedule is for {schedule.num_steps} denoising steps, the agent runs {num_steps}")
        self.policy = policy
        self.actor = policy.actor
        self.config = config
        self.num_steps = num_steps
        self._rng = jax.random.key(seed)
        self._units: UnitFlops | None = None

    # -- FLOPs -----------------------------------------------------------------------------------------

    def unit_flops(self, learner: Learner) -> UnitFlops:
        """Per-call FLOPs: analytic for π0.5 (prefix, one Euler step), XLA-counted for the critics (one state)."""
        if self._units is None:
            cfg = self.config
            inputs = cfg.chunk_critic.encoder.example_inputs(1)
            h, a = cfg.chunk_critic.chunk_shape
            noise = jnp.zeros((1, 1, *cfg.noise_critic.noise_shape))
            chunk = jnp.zeros((1, 1, h, a))
            q_dn = xla_flops(lambda p, x, e: NoiseCritic(cfg.noise_critic).apply(p, x, e), learner.noise_target,
                             inputs, noise)
            q_a = xla_flops(lambda p, x, c: ChunkCritic(cfg.chunk_critic).apply(p, x, c), learner.chunk_target,
                            inputs, chunk)
            edit = xla_flops(
                lambda p, x, c: EditPolicy(cfg.edit_policy).apply(p, x, c, jax.random.key(0),
                                                                  method=EditPolicy.sample_edit),
                learner.edit_policy.params, inputs, chunk[:, 0])
            self._units = UnitFlops.for_pi05(self.actor.config, noise_critic=q_dn, chunk_critic=q_a, edit=edit)
        return self._units

    def decision_flops(self, learner: Learner, selection: SelectionConfig | None = None) -> DecisionFlops:
        selection = selection or self.config.selection
        schedule = self.config.filter_schedule if selection.uses_noise_critic else None
        return decision_flops(selection, self.unit_flops(learner), num_steps=self.num_steps,
                              filter_schedule=schedule)

    # -- acting ----------------------------------------------------------------------------------------

    def act(
        self,
        learner: Learner,
        obs: Mapping[str, Any],
        *,
        selection: SelectionConfig | None = None,
        rng: jax.Array | None = None,
        noise: np.ndarray | None = None,
    ) -> Decision:
        """One decision for one raw observation, by the learner's train rule or `selection` (e.g. greedy eval).

        `noise` [N, H, A_model] fixes the seed pool; otherwise it is drawn from the agent's stream.
        """
        cfg = self.config
        selection = selection or cfg.selection
        if rng is None:
            self._rng, rng = jax.random.split(self._rng)
        k_noise, k_sel, k_critic = jax.random.split(rng, 3)
        actor_config = self.actor.config
        timing: dict[str, float] = collections.defaultdict(float)

        def timed(part: str, fn):
            def run(*args):
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*args))
                timing[part] += 1e3 * (time.perf_counter() - start)
                return out
            return run

        start = time.perf_counter()
        observation = self.policy.to_observation(obs)
        timing["input_transform"] += 1e3 * (time.perf_counter() - start)
        prefix: Prefix = timed("encode", self.actor.encode)(observation)
        inputs = critic_inputs(cfg.chunk_critic.encoder, observation, prefix.features)
        shape = (1, selection.num_candidates, actor_config.action_horizon, actor_config.action_dim)
        pool = jax.random.normal(k_noise, shape) if noise is None else jnp.asarray(noise, jnp.float32)[None]
        if pool.shape != shape:
            raise ValueError(f"noise must be [{', '.join(map(str, shape[1:]))}], got {list(pool.shape[1:])}")

        def denoise(idx: jax.Array) -> jax.Array:  # [1, M] -> robot dims [1, M, H, A]
            seeds = jnp.take_along_axis(pool, idx[:, :, None, None], axis=1)
            return self.actor.denoise(prefix, seeds, self.num_steps)[..., : cfg.action_dim]

        fns = {
            "score_noise": timed("noise_critic", lambda x: _score_noise(learner, inputs, x, k_critic)),
            "q_chunk": timed("chunk_critic", lambda c: _q_chunk(learner, inputs, c, k_critic)),
            "edit": timed("edit", lambda key, c: _edit(learner, inputs, c, k_critic, key)),
        }
        schedule = cfg.filter_schedule
        if schedule is not None and selection.uses_noise_critic:
            score = timed("noise_critic", lambda x, t: _score_x_t(learner, inputs, x, jnp.float32(t), k_critic))
            advance = timed("denoise", pi05_advance(self.actor, prefix, self.num_steps))

            def filter_denoise(key: jax.Array, noise: jax.Array):
                chunk, seed, visited = filter_and_denoise(schedule, key, noise, advance=advance, score=score,
                                                          temperature=selection.temperature)
                return chunk[..., : cfg.action_dim], seed, visited["scores"][0]

            fns["filter_denoise"] = filter_denoise
        chosen = select(selection, k_sel, pool, denoise=timed("denoise", denoise), **fns)

        start = time.perf_counter()
        normalized = np.asarray(chosen.action[0], np.float32)  # [H, A]
        padded = np.zeros((actor_config.action_horizon, actor_config.action_dim), np.float32)
        padded[:, : cfg.action_dim] = normalized
        out = self.policy.output_transform({"state": np.asarray(observation.state[0]), "actions": padded})
        timing["output_transform"] += 1e3 * (time.perf_counter() - start)
        timing["total"] = sum(timing.values())
        return Decision(actions=np.asarray(out["actions"]), normalized=normalized, seed_index=int(chosen.seed_index[0]),
                        edited=bool(chosen.edited[0]),
                        noise_scores=None if chosen.noise_scores is None else np.asarray(chosen.noise_scores[0]),
                        timing_ms=dict(timing),
                        flops=self.decision_flops(learner, selection))

    # -- what replay rows need from the actor --------------------------------------------------------------

    def observations(self, raw: Sequence[Mapping[str, Any]]) -> Observation:
        """Raw observations (one per step) -> one batched model `Observation` through the policy's transforms."""
        rows = [self.policy.input_transform(dict(obs)) for obs in raw]
        batched = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows)
        return Observation.from_dict(batched)

    def cache(self, observation: Observation, noise: np.ndarray, *, batch_size: int = 16) -> dict[str, np.ndarray]:
        """The frozen-actor cache of b observations [b] for noises [b, K, H, A_model], in fixed-size batches.

        Padding every batch to `batch_size` keeps one compiled encode/denoise for episodes of any length.
        Includes the filter steps' x_t when the learner filters at several steps.
        """
        steps = cached_steps(self.config.filter_schedule) if self.config.filter_schedule else ()
        b = int(np.asarray(observation.state).shape[0])
        parts = []
        for start in range(0, b, batch_size):
            stop = min(start + batch_size, b)
            pad = lambda x: np.concatenate([np.asarray(x)[start:stop]] +  # noqa: E731
                                           [np.asarray(x)[stop - 1: stop]] * (batch_size - (stop - start)))
            chunk = frozen_actor_cache(self.actor, jax.tree.map(pad, observation), pad(noise),
                                       num_steps=self.num_steps, intermediate_steps=steps)
            parts.append({k: v[: stop - start] for k, v in chunk.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
