"""The FASTER-EXPO learner: a pytree of train states with `create`, jitted `update`, and `select`.

One update = `utd` critic steps, each on its own minibatch of sliding-window chunks, then one edit-policy
step and one α step (EXPO's schedule). Each critic step trains
- Q^a by chunked TD: y = R + γ^h·mask·Q̄^a(s', a'), a' chosen at s' by the SAME selection rule the
  agent acts with (FASTER: Q̄^dn picks a seed, its cached chunk is edited, Q̄^a keeps base or edit); with
  `td_backup="split"` (the FASTER authors') one random target pair (i, j) serves both: Q̄_i picks a', Q̄_j
  values it; with "min" (EXPO's) a' is picked by the min of one random pair and valued by the min of another;
- Q^dn by regression onto sg[min2 Q̄^a(s, π(s, ε_i*))], the unedited chunk of the kept seed (paper
  Algorithm 1), or of every cached seed (`noise_target="all"`);
- or, with a `filter_schedule` (the general filtering MDP of §4.1–4.2), a step-conditioned Q^dn(s, x_t, t) by
  eq. 1's TD over the filter's stages, replayed from the cached x_t of every seed at the filter steps.
Both targets read the actor's chunks from the frozen-actor cache of the replay (`cache`/`next_cache`), so
an update never runs the VLA and costs the same whatever the actor's size. When the cache holds K > N seeds
per row, every critic step first draws N of them per row, afresh (`draw_pools`), so Q^dn keeps meeting new
(state, noise) pairs as the authors' fresh noises at every critic step do (paper Algorithm 1, line 1); with
K = N every update sees each row's same N seeds.

After the critic steps, one edit-policy step and one α step; α's entropy is measured in edit space
(`alpha_entropy="edit"`, the FASTER/EXPO authors' default) or in tanh space ("tanh") against −|A|/2.

Action spaces: the actor emits chunks [H, A_model] in its normalised space (π0.5: A_model = 32); the critics,
the edit policy and the replay work on the robot's first A dims of that space ([H, A], LIBERO: 7). Q^dn
sees the full model noise [H, A_model].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from faster_vla.rl.flops import compiled_flops
from faster_vla.critics.edit_policy import (
    EditPolicy,
    EditPolicyConfig,
    Temperature,
    edit_policy_loss,
    temperature_loss,
)
from faster_vla.critics.networks import (
    ChunkCritic,
    ChunkCriticConfig,
    NoiseCritic,
    NoiseCriticConfig,
    min_of_random_pair,
    polyak,
    random_member_pair,
)
from faster_vla.rl.filtering import (
    AdvanceFn,
    FilterSchedule,
    cache_lookup,
    cached_steps,
    filter_and_denoise,
    filter_critic_loss,
    filter_td_targets,
)
from faster_vla.rl.selection import Selection, SelectionConfig, pick_seed, select

Params = Any
Inputs = dict[str, jax.Array]  # critic inputs, e.g. {"features": [B, F], "state": [B, S]}
# minibatch -> (seed indices [B, M] -> model-space chunks [B, M, H, A_model]) at s_{t+h}
NextDenoiser = Callable[[dict], Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Defaults are the paper's VLA setting (appendix B): UTD 10, batch 32, γ 0.99, τ 0.005, N 8, greedy."""

    chunk_critic: ChunkCriticConfig
    noise_critic: NoiseCriticConfig
    edit_policy: EditPolicyConfig
    selection: SelectionConfig = SelectionConfig("faster", num_candidates=8, temperature=0.0)
    gamma: float = 0.99
    tau: float = 0.005
    utd: int = 10
    batch_size: int = 32
    critic_lr: float = 3e-4
    policy_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 1.0
    noise_target: Literal["kept", "all"] = "kept"
    filter_schedule: FilterSchedule | None = None
    """The general filtering MDP (paper §4.1–4.2) instead of §4.3's single filter at the initial noise: needs
    a time-conditioned noise critic and the x_t of `cached_steps(schedule)` in the replay cache."""
    filter_gamma: float = 1.0
    """γ of eq. 1 per Euler step between filter stages (< 1 discounts later stages' values)."""
    td_backup: Literal["split", "min"] = "split"
    """How the target ensemble picks and values the TD target's a' where Q^a picks it (rules faster,
    best_of_n, idql). split: one random target pair (i, j), Q̄_i picks and Q̄_j values (the FASTER authors'
    `_outer_backup_q_scores`; one pessimistic step). min: picked by the min of one random pair, valued by the
    min of an independent pair (EXPO's; pessimistic twice, so lower targets). Rules where Q^a picks nothing
    (faster_idql, base) value a' by the min of a random pair either way."""
    alpha_entropy: Literal["edit", "tanh"] = "edit"
    """Where α's entropy is measured against the target −|A|/2. edit: the edit β·y's, −E[log π − |A|·log β]
    (the FASTER and EXPO authors' default; for β < e^{-1/2}/2 ≈ 0.303 the target is above any entropy the edit
    can reach, |A|·log 2β, so α rises at every update). tanh: the tanh sample y's, −E[log π] (|A|·log(1/β)
    higher, reachable; α decays once the edits are broad). The forms differ; they are not one target."""

    def __post_init__(self) -> None:
        if self.chunk_critic.chunk_shape != self.edit_policy.chunk_shape:
            raise ValueError(
                f"chunk critic {self.chunk_critic.chunk_shape} and edit policy {self.edit_policy.chunk_shape} "
                "must see the same chunk shape (h, A)"
            )
        if self.chunk_critic.chunk_shape[0] != self.noise_critic.noise_shape[0]:
            raise ValueError("the noise critic's horizon must equal the chunk horizon")
        if self.noise_target not in ("kept", "all"):
            raise ValueError(f"noise_target must be 'kept' or 'all', got {self.noise_target!r}")
        if self.utd < 1 or self.batch_size < 1:
            raise ValueError("utd and batch_size must be >= 1")
        schedule = self.filter_schedule
        if schedule is not None:
            if not self.selection.uses_noise_critic:
                raise ValueError(f"filter_schedule filters with Q^dn, but selection rule {self.selection.rule!r} "
                                 "uses none; choose 'faster' or 'faster_idql'")
            if not self.noise_critic.time_conditioned:
                raise ValueError("filter_schedule scores partially denoised x_t at several steps: set "
                                 "noise_critic.time_conditioned=True")
            if schedule.num_candidates != self.selection.num_candidates:
                raise ValueError(f"filter_schedule.num_candidates ({schedule.num_candidates}) must equal "
                                 f"selection.num_candidates ({self.selection.num_candidates})")
            if self.noise_target != "kept":
                raise ValueError("with filter_schedule, Q^dn learns by eq. 1's TD along the filter's own stages; "
                                 "noise_target='all' does not apply (use 'kept')")
        if not 0.0 < self.filter_gamma <= 1.0:
            raise ValueError(f"filter_gamma must be in (0, 1], got {self.filter_gamma}")
        if self.td_backup not in ("split", "min"):
            raise ValueError(f"td_backup must be 'split' or 'min', got {self.td_backup!r}")
        if self.alpha_entropy not in ("edit", "tanh"):
            raise ValueError(f"alpha_entropy must be 'edit' or 'tanh', got {self.alpha_entropy!r}")

    @property
    def horizon(self) -> int:
        return self.chunk_critic.chunk_shape[0]

    @property
    def action_dim(self) -> int:
        return self.chunk_critic.chunk_shape[1]


def _robot(chunks: jax.Array, action_dim: int) -> jax.Array:
    """Model-space chunks [..., H, A_model] -> the robot's dims [..., H, A] that critics and edits see."""
    return chunks[..., :action_dim]


POOL_STREAM = 0x9001
"""`draw_pools` keys come from `fold_in(critic step key, POOL_STREAM)`: the step's other draws are unchanged."""


def draw_pools(rng: jax.Array, cache: dict, n: int) -> dict:
    """A replay cache with K seeds per row -> the same fields with n of them per row, drawn without replacement.

    cache: {'noise' [B, K, H, A_model], 'denoised' [B, K, H, A_model], 'x_t'? [B, K, S, H, A_model]}; every
    field is gathered with the same indices [B, n], so a seed keeps its own chunk and x_t. Each row draws its own
    subset from `rng`. With K == n the cache is returned as it is (every seed, in stored order).
    """
    k = cache["noise"].shape[1]
    if k < n:
        raise ValueError(f"the replay cache holds {k} seeds per row but selection.num_candidates is {n}: cache at "
                         f"least N seeds per row (FrozenActorCacheSpec.num_seeds, --cache-seeds >= {n})")
    if k == n:
        return cache
    b = cache["noise"].shape[0]
    idx = jnp.argsort(jax.random.uniform(rng, (b, k)), axis=1)[:, :n]  # [B, n]: a random n-subset per row

    def take(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    return {name: take(x) for name, x in cache.items()}


def _tile(inputs: Inputs, m: int) -> Inputs:
    """Inputs [B, ...] -> [B·m, ...], each state repeated for its m candidates."""
    return jax.tree.map(lambda x: jnp.repeat(x, m, axis=0), inputs)


@functools.cache
def _networks(config: LearnerConfig) -> tuple[tuple[Any, optax.GradientTransformation], ...]:
    """(module, optimiser) of the chunk critic, noise critic, edit policy and α, one set per config: their apply
    functions and optimisers are the static part of a `Learner`, so learners of equal configs (a restore's
    template, a second run in one process) share the compiled `update` and critic calls instead of compiling
    them again."""
    return ((ChunkCritic(config.chunk_critic), optax.adam(config.critic_lr)),
            (NoiseCritic(config.noise_critic), optax.adam(config.critic_lr)),
            (EditPolicy(config.edit_policy), optax.adam(config.policy_lr)),
            (Temperature(config.init_temperature), optax.adam(config.temperature_lr)))


def _train_state(*, apply_fn: Callable, params: Params, tx: optax.GradientTransformation) -> TrainState:
    """`TrainState.create` with its step an int32 array, as `apply_gradients` returns it: with flax's Python int
    0, the first `update` would compile for a weak-typed int and the second compile it all over again."""
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx).replace(step=jnp.zeros((), jnp.int32))


class Learner(flax.struct.PyTreeNode):
    chunk_critic: TrainState
    chunk_target: Params
    noise_critic: TrainState
    noise_target: Params
    edit_policy: TrainState
    temperature: TrainState
    rng: jax.Array
    step: jax.Array
    config: LearnerConfig = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, config: LearnerConfig, example_inputs: Inputs, seed: int = 0) -> Learner:
        """Initialises every network from one example batch of critic inputs (shapes only matter)."""
        rng = jax.random.key(seed)
        rng, k_q, k_dn, k_pi, k_t = jax.random.split(rng, 5)
        b = jax.tree.leaves(example_inputs)[0].shape[0]
        h, a = config.chunk_critic.chunk_shape
        chunk = jnp.zeros((b, h, a))
        noise = jnp.zeros((b, 1, *config.noise_critic.noise_shape))
        (q_mod, q_tx), (dn_mod, dn_tx), (pi_mod, pi_tx), (t_mod, t_tx) = _networks(config)
        q_params = q_mod.init(k_q, example_inputs, chunk)
        dn_params = dn_mod.init(k_dn, example_inputs, noise)
        return cls(
            chunk_critic=_train_state(apply_fn=q_mod.apply, params=q_params, tx=q_tx),
            chunk_target=q_params,
            noise_critic=_train_state(apply_fn=dn_mod.apply, params=dn_params, tx=dn_tx),
            noise_target=dn_params,
            edit_policy=_train_state(apply_fn=pi_mod.apply, params=pi_mod.init(k_pi, example_inputs, chunk), tx=pi_tx),
            temperature=_train_state(apply_fn=t_mod.apply, params=t_mod.init(k_t), tx=t_tx),
            rng=rng,
            step=jnp.zeros((), jnp.int32),
            config=config,
        )

    # -- the selection rule, wired to this learner's (target) critics --------------------------------

    def critic_fns(self, inputs: Inputs, rng: jax.Array) -> dict[str, Callable]:
        """The selection rule's critic callables at states `inputs`, on the TARGET critics (pessimistic pairs).

        'score_noise' is Q^dn(s, ε) (or, with a filter schedule, the step-conditioned Q^dn(s, x_t, t)),
        'q_chunk' is Q^a, 'edit' the edit policy's sample. Acting, evaluation and TD targets all use these.
        """
        cfg = self.config
        k_dn, k_q = jax.random.split(rng)
        policy = EditPolicy(cfg.edit_policy)

        def score_noise(noise: jax.Array) -> jax.Array:  # [B, N, H, Ad] -> [B, N]
            q = self.noise_critic.apply_fn(self.noise_target, inputs, noise)
            return min_of_random_pair(q, k_dn)

        def score_x_t(x_t: jax.Array, t: float) -> jax.Array:  # [B, M, H, Ad] at time t -> [B, M]
            return min_of_random_pair(self.noise_critic.apply_fn(self.noise_target, inputs, x_t, t), k_dn)

        def q_chunk(chunks: jax.Array) -> jax.Array:  # [B, M, H, A] -> [B, M]
            return min_of_random_pair(self.chunk_critic.apply_fn(self.chunk_target, inputs, chunks), k_q)

        def edit(rng: jax.Array, chunks: jax.Array) -> jax.Array:  # [B, M, H, A] -> [B, M, H, A]
            b, m = chunks.shape[:2]
            flat = chunks.reshape(b * m, *chunks.shape[2:])
            edited, _ = policy.apply(self.edit_policy.params, _tile(inputs, m), flat, rng, method=EditPolicy.sample_edit)
            return edited.reshape(chunks.shape)

        return {"score_noise": score_x_t if cfg.filter_schedule else score_noise, "q_chunk": q_chunk, "edit": edit}

    def filter_denoise_fn(self, score: Callable, *, advance: AdvanceFn | None = None, lookup: Callable | None = None):
        """The selection rule's `filter_denoise` for this learner's filter schedule (robot dims out)."""
        cfg = self.config

        def filter_denoise(rng: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            chunk, seed, visited = filter_and_denoise(cfg.filter_schedule, rng, noise, advance=advance, lookup=lookup,
                                                      score=score, temperature=cfg.selection.temperature)
            return _robot(chunk, cfg.action_dim), seed, visited["scores"][0]

        return filter_denoise

    def _cache_lookup(self, cache: dict) -> Callable:
        """`filtering.cache_lookup` over a replay cache {'noise', 'denoised', 'x_t'?} (model-space chunks)."""
        schedule = self.config.filter_schedule
        steps = cached_steps(schedule)
        if steps and "x_t" not in cache:
            raise ValueError(f"filter schedule {schedule.stages} needs the cached x_t at steps {steps}: build the "
                             "replay's FrozenActorCacheSpec with intermediate_steps=cached_steps(schedule)")
        return cache_lookup(cache["noise"], cache.get("x_t"), cache["denoised"], steps, schedule.num_steps)

    def select(
        self,
        rng: jax.Array,
        inputs: Inputs,
        noise: jax.Array,  # [B, N, H, A_model]
        denoise: Callable[[jax.Array], jax.Array],  # idx [B, M] -> model-space chunks [B, M, H, A_model]
        selection: SelectionConfig | None = None,
        advance: AdvanceFn | None = None,
    ) -> Selection:
        """Chooses chunks (robot dims, normalised) with the train rule or `selection` (e.g. greedy eval).

        With a `filter_schedule`, the `faster` rules reach the actor through `advance(x, start_step, end_step)`
        (e.g. `filtering.pi05_advance`) instead, so the filter continues only its survivors; it is required then.
        """
        config = selection or self.config.selection
        robot = lambda idx: _robot(denoise(idx), self.config.action_dim)  # noqa: E731
        fns = self.critic_fns(inputs, rng)
        if self.config.filter_schedule is not None and config.uses_noise_critic:
            if advance is None:
                raise ValueError("this learner filters at several denoising steps: pass `advance` (the actor's "
                                 "Euler steps from start_step to end_step, e.g. filtering.pi05_advance)")
            fns["filter_denoise"] = self.filter_denoise_fn(fns.pop("score_noise"), advance=advance)
        return select(config, rng, noise, denoise=robot, **fns)

    # -- the update ----------------------------------------------------------------------------------

    def td_target(
        self, batch: dict, rng: jax.Array, next_denoise: Callable[[jax.Array], jax.Array] | None = None
    ) -> jax.Array:
        """Chunked TD target y [B] = R + γ^h·mask·Q̄^a(s', a'), a' by the acting rule at s' (`td_backup`: which
        target members pick a' and which value it).

        `batch["next_cache"]` holds the pool of N seeds per row (`update` draws it from a larger cache first).

        `next_denoise(idx [B, M]) -> model-space chunks [B, M, H, A_model]` gives the actor's chunks for seeds of
        `batch["next_cache"]["noise"]`; by default they are looked up in `batch["next_cache"]["denoised"]`
        (the frozen-actor cache). Passing a function that runs the actor gives the same target, at the
        actor's cost (tested).
        """
        cfg = self.config
        k_sel, k_target = jax.random.split(rng)
        next_inputs = batch["next_inputs"]
        if next_denoise is None:
            cached = batch["next_cache"]["denoised"]  # [B, K, H, A_model]
            next_denoise = lambda idx: jnp.take_along_axis(cached, idx[:, :, None, None], axis=1)  # noqa: E731
        robot = lambda idx: _robot(next_denoise(idx), cfg.action_dim)  # noqa: E731
        fns = self.critic_fns(next_inputs, k_sel)
        if cfg.filter_schedule is not None:
            fns["filter_denoise"] = self.filter_denoise_fn(fns.pop("score_noise"),
                                                         lookup=self._cache_lookup(batch["next_cache"]))
        target_q = lambda chunks: self.chunk_critic.apply_fn(self.chunk_target, next_inputs, chunks)  # noqa: E731
        if cfg.td_backup == "split" and cfg.selection.uses_chunk_critic:
            # The authors' form: one random pair of target members, the first picks a', the second values it.
            pick, value = random_member_pair(k_target, cfg.chunk_critic.num_members)
            fns["q_chunk"] = lambda chunks: target_q(chunks)[pick]  # [B, M, H, A] -> [B, M]
            next_action = select(cfg.selection, k_sel, batch["next_cache"]["noise"], denoise=robot, **fns).action
            next_q = target_q(next_action)[value]
        else:  # EXPO's: picked by the min of one random pair (critic_fns), valued by the min of another
            next_action = select(cfg.selection, k_sel, batch["next_cache"]["noise"], denoise=robot, **fns).action
            next_q = min_of_random_pair(target_q(next_action), k_target)
        return batch["returns"] + batch["discount"] * next_q

    def draw_pools(self, batch: dict, rng: jax.Array) -> dict:
        """A minibatch whose cache and next_cache hold K seeds per row -> N = selection.num_candidates per row,
        drawn afresh for s and s' (`draw_pools`); unchanged when K = N."""
        n = self.config.selection.num_candidates
        k_now, k_next = jax.random.split(rng)
        return batch | {"cache": draw_pools(k_now, batch["cache"], n),
                        "next_cache": draw_pools(k_next, batch["next_cache"], n)}

    def _critic_step(self, batch: dict, rng: jax.Array, next_denoiser: NextDenoiser | None) -> tuple[Learner, dict]:
        cfg = self.config
        batch = self.draw_pools(batch, jax.random.fold_in(rng, POOL_STREAM))
        k_td, k_dn = jax.random.split(rng)
        inputs = batch["inputs"]
        a = cfg.action_dim
        next_denoise = None if next_denoiser is None else next_denoiser(batch)
        target = jax.lax.stop_gradient(self.td_target(batch, k_td, next_denoise))  # [B]
        chunk = batch["actions"].reshape(-1, *cfg.chunk_critic.chunk_shape)

        def q_loss(params: Params) -> tuple[jax.Array, jax.Array]:
            q = self.chunk_critic.apply_fn(params, inputs, chunk)  # [E, B]
            return jnp.mean(jnp.square(q - target[None])), q

        (loss_q, q), grads = jax.value_and_grad(q_loss, has_aux=True)(self.chunk_critic.params)
        chunk_critic = self.chunk_critic.apply_gradients(grads=grads)

        # Q^dn regression onto min2 Q̄^a of the unedited cached chunk of the kept seed (or of every seed).
        pool = batch["cache"]["noise"]  # [B, K, H, Ad]
        denoised = _robot(batch["cache"]["denoised"], a)  # [B, K, H, A]
        k1, k2, k3 = jax.random.split(k_dn, 3)
        if cfg.filter_schedule is not None:
            loss_dn, q_dn, noise_critic = self._filter_critic_step(batch, k1, k3)
            return self._finish_critic_step(chunk_critic, noise_critic, target, loss_q, q, loss_dn, q_dn)
        if cfg.noise_target == "kept":
            scores = min_of_random_pair(self.noise_critic.apply_fn(self.noise_target, inputs, pool), k1)
            kept = pick_seed(k2, scores, cfg.selection.temperature)[:, None]  # [B, 1]
        else:
            kept = jnp.broadcast_to(jnp.arange(pool.shape[1]), pool.shape[:2])  # [B, K]
        seeds = jnp.take_along_axis(pool, kept[:, :, None, None], axis=1)
        chunks = jnp.take_along_axis(denoised, kept[:, :, None, None], axis=1)
        dn_target = jax.lax.stop_gradient(
            min_of_random_pair(self.chunk_critic.apply_fn(self.chunk_target, inputs, chunks), k3)
        )  # [B, M]

        def dn_loss(params: Params) -> tuple[jax.Array, jax.Array]:
            q = self.noise_critic.apply_fn(params, inputs, seeds)  # [E, B, M]
            return jnp.mean(jnp.square(q - dn_target[None])), q

        (loss_dn, q_dn), grads = jax.value_and_grad(dn_loss, has_aux=True)(self.noise_critic.params)
        noise_critic = self.noise_critic.apply_gradients(grads=grads)
        return self._finish_critic_step(chunk_critic, noise_critic, target, loss_q, q, loss_dn, q_dn)

    def _filter_critic_step(self, batch: dict, k_filter: jax.Array, k_value: jax.Array) -> tuple:
        """Eq. 1 on the filtering episode replayed from the cache at s: target Q̄^dn filters, the executed
        (unedited) survivor's min2 Q̄^a is the terminal reward, earlier stages bootstrap on the next's max."""
        cfg = self.config
        inputs = batch["inputs"]
        score = self.critic_fns(inputs, k_filter)["score_noise"]  # target Q^dn(s, x_t, t), min of a random pair
        final, _, visited = filter_and_denoise(cfg.filter_schedule, k_filter, batch["cache"]["noise"],
                                               lookup=self._cache_lookup(batch["cache"]), score=score,
                                               temperature=cfg.selection.temperature)
        executed = _robot(final, cfg.action_dim)[:, None]  # [B, 1, H, A]
        final_value = min_of_random_pair(self.chunk_critic.apply_fn(self.chunk_target, inputs, executed), k_value)[:, 0]
        targets = filter_td_targets(visited, final_value, cfg.filter_gamma)

        def dn_loss(params: Params) -> tuple[jax.Array, jax.Array]:
            first = self.noise_critic.apply_fn(params, inputs, visited["kept_x_t"][0], visited["t"][0])  # [E, B, m1]
            return filter_critic_loss(params, self.noise_critic.apply_fn, inputs, visited, targets), first

        (loss_dn, q_dn), grads = jax.value_and_grad(dn_loss, has_aux=True)(self.noise_critic.params)
        return loss_dn, jnp.mean(q_dn), self.noise_critic.apply_gradients(grads=grads)

    def _finish_critic_step(self, chunk_critic: TrainState, noise_critic: TrainState, target: jax.Array,
                            loss_q: jax.Array, q: jax.Array, loss_dn: jax.Array, q_dn: jax.Array) -> tuple[Learner, dict]:
        cfg = self.config
        new = self.replace(
            chunk_critic=chunk_critic,
            chunk_target=polyak(self.chunk_target, chunk_critic.params, cfg.tau),
            noise_critic=noise_critic,
            noise_target=polyak(self.noise_target, noise_critic.params, cfg.tau),
        )
        info = {"critic_loss": loss_q, "q": jnp.mean(q), "td_target": jnp.mean(target),
                "noise_critic_loss": loss_dn, "q_noise": jnp.mean(q_dn)}
        return new, info

    def _policy_step(self, batch: dict, rng: jax.Array) -> tuple[Learner, dict]:
        cfg = self.config
        inputs = batch["inputs"]
        base = batch["actions"].reshape(-1, *cfg.chunk_critic.chunk_shape)  # EXPO: edit the replay chunk
        alpha = jnp.exp(self.temperature.params["params"]["log_alpha"])
        critic = lambda inp, chunk: self.chunk_critic.apply_fn(self.chunk_critic.params, inp, chunk)  # noqa: E731
        policy = EditPolicy(cfg.edit_policy)

        def loss_fn(params: Params) -> tuple[jax.Array, dict]:
            return edit_policy_loss(params, policy, critic, inputs, base, rng, alpha)

        (_, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(self.edit_policy.params)
        edit_policy = self.edit_policy.apply_gradients(grads=grads)
        log_prob = info.pop("log_prob")

        if cfg.alpha_entropy == "edit":  # the log-density of the edit β·y, as the authors tune α on
            log_prob = log_prob - cfg.edit_policy.flat_dim * np.log(cfg.edit_policy.beta)

        def t_loss(params: Params) -> jax.Array:
            return temperature_loss(params["params"]["log_alpha"], log_prob, cfg.edit_policy.target_entropy)

        loss_t, grads = jax.value_and_grad(t_loss)(self.temperature.params)
        temperature = self.temperature.apply_gradients(grads=grads)
        info.update(temperature_loss=loss_t, alpha=alpha, alpha_entropy=-jnp.mean(log_prob))
        return self.replace(edit_policy=edit_policy, temperature=temperature), info

    def update_flops(self, batch: dict, next_denoiser: NextDenoiser | None = None) -> int:
        """FLOPs XLA counts for one `update(batch, next_denoiser)`: with the cache, critics only (no actor).
        Compiles `update` itself for these shapes, so the update that follows does not compile it again."""
        return compiled_flops(Learner.update.lower(self, batch, next_denoiser=next_denoiser))

    @functools.partial(jax.jit, static_argnames="next_denoiser")
    def update(self, batch: dict, next_denoiser: NextDenoiser | None = None) -> tuple[Learner, dict]:
        """One update on `utd` minibatches stacked on axis 0 (every leaf [utd, B, ...]).

        `batch` keys: inputs, next_inputs (critic inputs at s_t and s_{t+h}), actions [B, h·A] (normalised
        robot dims), returns [B], discount [B] (γ^h·mask), cache and next_cache ({'noise', 'denoised'}, K >= N
        seeds per row; each critic step draws N of them per row from the learner's key, so a resumed learner
        draws the same). With the cache, that is all: no actor call. `next_denoiser(minibatch) -> (idx -> chunks)` instead
        runs an actor at s_{t+h} (for a trainable actor, or to measure what the cache saves); it must be
        hashable (a module-level function or a frozen object), and `next_cache["denoised"]` is then unused.
        """
        rng, step_rng, policy_rng = jax.random.split(self.rng, 3)

        def body(learner: Learner, xs: tuple[dict, jax.Array]) -> tuple[Learner, dict]:
            minibatch, key = xs
            return learner._critic_step(minibatch, key, next_denoiser)

        keys = jax.random.split(step_rng, self.config.utd)
        learner, critic_info = jax.lax.scan(body, self, (batch, keys))
        last = jax.tree.map(lambda x: x[-1], batch)
        learner, policy_info = learner._policy_step(last, policy_rng)
        info = {k: v[-1] for k, v in critic_info.items()} | policy_info
        return learner.replace(rng=rng, step=learner.step + 1), info
