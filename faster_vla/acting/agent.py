"""Acting with π0.5 and a learner: env observation → adapter (encode once) → selection → denoise → edit → env.

`Agent.act` makes one decision (one chunk) for one observation in the robot's own format (`Agent.act_batch`:
one per observation of a batch, as `act` would make each) and reports, per part, its wall time and its FLOPs: the input transforms, the VLM prefix (encoded once, shared by every
noise), the critics (Q^dn over the N seeds, Q^a over candidates, the edit policy) and the actor's denoising
(1 chunk for FASTER, N for best-of-N, the survivors' segments for a multi-stage filter). The rule runs through
`selection.select`, the one implementation acting, evaluation and TD targets share; only the callables it is
handed differ (here: the live actor and compiled critic calls, each timed).

`Agent.cache` computes what a replay row needs from the frozen actor (`frozen_cache.frozen_actor_cache`) for a
batch of observations, so that updates never run the actor; the run hands those rows to replay, which only
stores them. With a trained actor (`--actor-update success_bc`) rows keep the chunks of the actor that stored
them.
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

from faster_vla.rl.flops import DecisionFlops, UnitFlops, decision_flops, xla_flops
from faster_vla.critics.edit_policy import EditPolicy
from faster_vla.critics.encoders import EncoderConfig
from faster_vla.critics.networks import ChunkCritic, NoiseCritic
from faster_vla.rl.filtering import cached_steps, filter_and_denoise, pi05_advance
from faster_vla.rl.learner import Inputs, Learner, LearnerConfig
from faster_vla.policies.pi05 import Observation, Prefix
from faster_vla.policies.policy import Policy, pad_rows
from faster_vla.policies.transforms import LIBERO_ACTION_DIM
from faster_vla.policies.validation import check_actions, check_noise
from faster_vla.acting.frozen_cache import cache_from_prefix, frozen_actor_cache
from faster_vla.acting.mesh import DataParallel
from faster_vla.rl.selection import SelectionConfig, select

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


def _one_state(tree: Any) -> Any:
    """A state's leaves [...] -> a batch of one [1, ...], as the critics take them."""
    return jax.tree.map(lambda x: x[None], tree)


# Critic calls over a batch of states [B], each state with its own keys (its ensemble pair, its edit draw): a
# state of a batch gets the values it would get alone, so an episode does not depend on its batch mates.
@jax.jit
def _score_noise(learner: Learner, inputs: Inputs, noise: jax.Array, rngs: jax.Array) -> jax.Array:
    def one(inp: Inputs, x: jax.Array, k: jax.Array) -> jax.Array:  # noise [N, H, Ad] -> [N]
        return learner.critic_fns(_one_state(inp), k)["score_noise"](x[None])[0]
    return jax.vmap(one)(inputs, noise, rngs)


@jax.jit
def _score_x_t(learner: Learner, inputs: Inputs, x_t: jax.Array, t: jax.Array, rngs: jax.Array) -> jax.Array:
    def one(inp: Inputs, x: jax.Array, k: jax.Array) -> jax.Array:  # x_t [M, H, Ad] -> [M]
        return learner.critic_fns(_one_state(inp), k)["score_noise"](x[None], t)[0]
    return jax.vmap(one)(inputs, x_t, rngs)


@jax.jit
def _q_chunk(learner: Learner, inputs: Inputs, chunks: jax.Array, rngs: jax.Array) -> jax.Array:
    def one(inp: Inputs, c: jax.Array, k: jax.Array) -> jax.Array:  # chunks [M, H, A] -> [M]
        return learner.critic_fns(_one_state(inp), k)["q_chunk"](c[None])[0]
    return jax.vmap(one)(inputs, chunks, rngs)


@jax.jit
def _edit(learner: Learner, inputs: Inputs, chunks: jax.Array, rngs: jax.Array, edit_rngs: jax.Array) -> jax.Array:
    def one(inp: Inputs, c: jax.Array, k: jax.Array, ek: jax.Array) -> jax.Array:  # [M, H, A] -> [M, H, A]
        return learner.critic_fns(_one_state(inp), k)["edit"](ek, c[None])[0]
    return jax.vmap(one)(inputs, chunks, rngs, edit_rngs)


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
    cache: Mapping[str, jax.Array] | None = None  # the batch's frozen-actor cache rows [size, ...] (cache_noise)
    row: int = 0  # this decision's row of `cache`
    warnings: tuple[str, ...] = ()  # what the policy changed in this observation (a truncated prompt)

    def cache_row(self) -> dict[str, np.ndarray] | None:
        """This observation's frozen-actor cache row (waits for it; None unless `cache_noise` was given)."""
        return None if self.cache is None else {k: np.asarray(v[self.row], np.float32) for k, v in self.cache.items()}


class Agent:
    """A `Policy`'s transforms and π0.5 actor, acting by a learner's selection rule.

    `config` None: the agent has no critics and acts with the base rule only (`act(None, obs)`), e.g. to
    evaluate a base policy; it then emits the robot's LIBERO action dims.
    """

    def __init__(self, policy: Policy, config: LearnerConfig | None = None, *, num_steps: int = 10,
                 seed: int = 0, parallel: DataParallel | None = None) -> None:
        actor_config = policy.actor.config
        if config is not None:
            h, a = config.chunk_critic.chunk_shape
            if h != actor_config.action_horizon or config.noise_critic.noise_shape != (h, actor_config.action_dim):
                raise ValueError(
                    f"critics see chunks {config.chunk_critic.chunk_shape} and noise {config.noise_critic.noise_shape}, "
                    f"the actor emits [{actor_config.action_horizon}, {actor_config.action_dim}]: build the learner "
                    "config for this actor")
        schedule = None if config is None else config.filter_schedule
        if schedule is not None and schedule.num_steps != num_steps:
            raise ValueError(f"the filter schedule is for {schedule.num_steps} denoising steps, the agent runs {num_steps}")
        self.policy = policy
        self.actor = policy.actor
        self.config = config
        self.action_dim = LIBERO_ACTION_DIM if config is None else config.action_dim  # robot dims the rule emits
        self.num_steps = num_steps
        self._rng = jax.random.key(seed)
        # Batches split over all local devices, parameters replicated (one device: nothing changes).
        self.parallel = DataParallel() if parallel is None else parallel
        self._units: UnitFlops | None = None

    # -- FLOPs -----------------------------------------------------------------------------------------

    def unit_flops(self, learner: Learner | None) -> UnitFlops:
        """Per-call FLOPs: analytic for π0.5 (prefix, one Euler step), XLA-counted for the critics (one state);
        without a learner, the actor's alone."""
        if learner is None:
            return UnitFlops.for_pi05(self.actor.config)
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

    def decision_flops(self, learner: Learner | None, selection: SelectionConfig | None = None) -> DecisionFlops:
        selection = self._selection(learner, selection)
        schedule = self.config.filter_schedule if self.config is not None and selection.uses_noise_critic else None
        return decision_flops(selection, self.unit_flops(learner), num_steps=self.num_steps,
                              filter_schedule=schedule)

    @property
    def cached_steps(self) -> tuple[int, ...]:
        """The Euler steps whose x_t the frozen-actor cache holds (a multi-stage filter's), else none."""
        schedule = None if self.config is None else self.config.filter_schedule
        return cached_steps(schedule) if schedule else ()

    # -- acting ----------------------------------------------------------------------------------------

    def _selection(self, learner: Learner | None, selection: SelectionConfig | None) -> SelectionConfig:
        """The rule to act by (the learner config's train rule by default); the base rule without critics."""
        if self.config is None or learner is None:
            selection = selection or SelectionConfig("base", num_candidates=1)
            if selection.rule != "base":
                raise ValueError(f"selection rule {selection.rule!r} needs critics: pass the learner (and build the "
                                 "Agent with its config); without them only the 'base' rule acts")
            return selection
        return selection or self.config.selection

    def act(
        self,
        learner: Learner | None,
        obs: Mapping[str, Any],
        *,
        selection: SelectionConfig | None = None,
        rng: jax.Array | None = None,
        noise: np.ndarray | None = None,
    ) -> Decision:
        """One decision for one raw observation, by the learner's train rule or `selection` (e.g. greedy eval).

        `noise` [N, H, A_model] fixes the seed pool; otherwise it is drawn from the agent's stream.
        """
        return self.act_batch(learner, [obs], selection=selection, rngs=None if rng is None else [rng],
                              noise=None if noise is None else np.asarray(noise)[None])[0]

    def act_batch(
        self,
        learner: Learner | None,
        observations: Sequence[Mapping[str, Any]],
        *,
        selection: SelectionConfig | None = None,
        rngs: Sequence[jax.Array] | None = None,
        noise: np.ndarray | None = None,
        batch_size: int | None = None,
        cache_noise: np.ndarray | None = None,
    ) -> list[Decision]:
        """One decision per raw observation [B], with one encode and one denoise call for the whole batch.

        Row i decides as `act(observations[i], rng=rngs[i])` would: its noise pool, its critics' ensemble pairs
        and its edit draw come from its own key, so (up to float rounding of the batched matmuls) an episode's
        chunks do not depend on which episodes share its batch. Only draws `select` makes once per call are
        shared by the batch, from row 0's key: the seed pick at temperature > 0 and a filter's random keep.
        `noise` [B, N, H, A_model] fixes the seed pools. `batch_size` pads the batch (repeating its last row) to
        a fixed size, so a batch that shrinks as episodes end keeps one compiled shape. Each decision's
        `timing_ms` is the whole batch's wall time; its `flops` are one state's.

        `cache_noise` [B, K, H, A_model] also computes replay's frozen-actor cache of these observations from
        the prefix acting encoded (so no observation is encoded twice): dispatched after the chunks are ready,
        it runs while the caller steps the env; `Decision.cache_row()` waits for it.
        """
        cfg = self.config
        selection = self._selection(learner, selection)
        b = len(observations)
        size = b if batch_size is None else batch_size
        if b == 0 or size < b:
            raise ValueError(f"act_batch needs 1 <= observations <= batch_size, got {b} and batch_size={batch_size}")
        size = self.parallel.padded(size)  # the batch axis splits evenly over the devices
        self.actor.params = self.parallel.place_params(self.actor.params)  # a no-op once they are
        learner = None if learner is None else self.parallel.replicate(learner)
        if rngs is None:
            rngs = []
            for _ in range(b):
                self._rng, rng = jax.random.split(self._rng)
                rngs.append(rng)
        if len(rngs) != b:
            raise ValueError(f"got {len(rngs)} rngs for {b} observations")
        rows = np.minimum(np.arange(size), b - 1)  # padding repeats the last row
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(jnp.stack(list(rngs))[rows])  # [size, 3]
        k_noise, k_sel, k_critic = keys[:, 0], keys[:, 1], keys[:, 2]
        edit_keys = jax.vmap(lambda k: jax.random.split(k)[1])(k_sel)  # the edit key `select` derives from k_sel
        actor_config = self.actor.config
        timing: dict[str, float] = collections.defaultdict(float)

        def timed(part: str, fn):
            def run(*args):
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*args))
                timing[part] += 1e3 * (time.perf_counter() - start)
                return out
            return run

        shape = (selection.num_candidates, actor_config.action_horizon, actor_config.action_dim)
        if noise is not None:  # checked (shape, finite) before any compute
            noise = check_noise(noise, (b, *shape))
        start = time.perf_counter()
        prepared = self.policy.prepare(observations)  # every row checked (`validation`), then transformed
        observation = self.parallel.shard(prepared.observation if size == b else pad_rows(prepared.observation, size))
        timing["input_transform"] += 1e3 * (time.perf_counter() - start)
        prefix: Prefix = timed("encode", self.actor.encode)(observation)
        inputs = None if learner is None else critic_inputs(cfg.chunk_critic.encoder, observation, prefix.features)
        if noise is None:
            pool = jax.vmap(lambda k: jax.random.normal(k, shape))(k_noise)  # [size, N, H, A_model]
        else:
            pool = jnp.asarray(noise)[rows]
        pool = self.parallel.shard(pool)

        def denoise(idx: jax.Array) -> jax.Array:  # [size, M] -> robot dims [size, M, H, A]
            seeds = jnp.take_along_axis(pool, idx[:, :, None, None], axis=1)
            return self.actor.denoise(prefix, seeds, self.num_steps)[..., : self.action_dim]

        fns = {
            "score_noise": timed("noise_critic", lambda x: _score_noise(learner, inputs, x, k_critic)),
            "q_chunk": timed("chunk_critic", lambda c: _q_chunk(learner, inputs, c, k_critic)),
            # Each row's own edit key, in place of the one `select` splits from the key it is given (row 0's).
            "edit": timed("edit", lambda _, c: _edit(learner, inputs, c, k_critic, edit_keys)),
        }
        schedule = None if cfg is None else cfg.filter_schedule
        if schedule is not None and selection.uses_noise_critic:
            score = timed("noise_critic", lambda x, t: _score_x_t(learner, inputs, x, jnp.float32(t), k_critic))
            advance = timed("denoise", pi05_advance(self.actor, prefix, self.num_steps))

            def filter_denoise(key: jax.Array, noise: jax.Array):
                chunk, seed, visited = filter_and_denoise(schedule, key, noise, advance=advance, score=score,
                                                          temperature=selection.temperature)
                return chunk[..., : self.action_dim], seed, visited["scores"][0]

            fns["filter_denoise"] = filter_denoise
        chosen = select(selection, k_sel[0], pool, denoise=timed("denoise", denoise), **fns)

        start = time.perf_counter()
        normalized = np.asarray(chosen.action[:b], np.float32)  # [B, H, A]
        states = np.asarray(observation.state)
        robot_actions = []
        for i in range(b):
            padded = np.zeros((actor_config.action_horizon, actor_config.action_dim), np.float32)
            padded[:, : self.action_dim] = normalized[i]
            out = self.policy.output_transform({"state": states[i], "actions": padded})
            check_actions(out["actions"], f"observation {i}" if b > 1 else "the observation")  # never to a robot
            robot_actions.append(np.asarray(out["actions"]))
        timing["output_transform"] += 1e3 * (time.perf_counter() - start)
        timing["total"] = sum(timing.values())
        cache = None
        if cache_noise is not None:  # off the acting path: the chunks above are already on the host
            cache_noise = np.asarray(cache_noise, np.float32)
            expected = (b, cache_noise.shape[1] if cache_noise.ndim == 4 else -1, *shape[1:])
            if cache_noise.shape != expected:
                raise ValueError(f"cache_noise must be [{b}, K, {shape[1]}, {shape[2]}], got {list(cache_noise.shape)}")
            cache = cache_from_prefix(self.actor, prefix, cache_noise[rows], num_steps=self.num_steps,
                                      intermediate_steps=self.cached_steps)
        flops = self.decision_flops(learner, selection)
        seed_index, edited = np.asarray(chosen.seed_index), np.asarray(chosen.edited)
        scores = None if chosen.noise_scores is None else np.asarray(chosen.noise_scores)
        return [Decision(actions=robot_actions[i], normalized=normalized[i], seed_index=int(seed_index[i]),
                         edited=bool(edited[i]), noise_scores=None if scores is None else scores[i],
                         timing_ms=dict(timing), flops=flops, cache=cache, row=i,
                         warnings=tuple(prepared.warnings[i])) for i in range(b)]

    # -- what replay rows need from the actor --------------------------------------------------------------

    def observations(self, raw: Sequence[Mapping[str, Any]]) -> Observation:
        """Raw observations (one per step) -> one batched model `Observation` through the policy's transforms."""
        return self.policy.to_observations(raw)

    def cache(self, observation: Observation, noise: np.ndarray, *, batch_size: int = 16) -> dict[str, np.ndarray]:
        """The frozen-actor cache of b observations [b] for noises [b, K, H, A_model], in fixed-size batches.

        Padding every batch to `batch_size` keeps one compiled encode/denoise for episodes of any length.
        Includes the filter steps' x_t when the learner filters at several steps.
        """
        steps = self.cached_steps
        batch_size = self.parallel.padded(batch_size)
        self.actor.params = self.parallel.place_params(self.actor.params)
        b = int(np.asarray(observation.state).shape[0])
        parts = []
        for start in range(0, b, batch_size):
            stop = min(start + batch_size, b)
            pad = lambda x: np.concatenate([np.asarray(x)[start:stop]] +  # noqa: E731
                                           [np.asarray(x)[stop - 1: stop]] * (batch_size - (stop - start)))
            chunk = frozen_actor_cache(self.actor, self.parallel.shard(jax.tree.map(pad, observation)), pad(noise),
                                       num_steps=self.num_steps, intermediate_steps=steps)
            parts.append({k: v[: stop - start] for k, v in chunk.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
