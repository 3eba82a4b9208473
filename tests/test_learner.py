"""The learner: updates run on cached actor outputs, and the cache changes nothing but the cost."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.rl.learner import Learner
from tests.toy_task import FlowActor, ToyRunConfig, ToyTaskConfig, toy_features, toy_learner_config

TASK = ToyTaskConfig()
B, N = 16, 8


def _batch(actor: FlowActor, seed: int = 0, utd: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    h, a = TASK.horizon, TASK.action_dim

    def leading(*shape):
        return (utd, *shape) if utd else shape

    obs = rng.uniform(-1, 1, leading(B, 4)).astype(np.float32)
    next_obs = rng.uniform(-1, 1, leading(B, 4)).astype(np.float32)
    noise = rng.normal(size=leading(B, N, h, a)).astype(np.float32)
    next_noise = rng.normal(size=leading(B, N, h, a)).astype(np.float32)
    flat = lambda x: x.reshape(-1, *x.shape[-3:]) if utd else x  # noqa: E731
    denoise = lambda o, e: np.asarray(actor.denoise(jnp.asarray(o.reshape(-1, 4)), jnp.asarray(flat(e)))).reshape(e.shape)  # noqa: E731
    return {
        "inputs": {"features": np.asarray(toy_features(obs)), "state": obs},
        "next_inputs": {"features": np.asarray(toy_features(next_obs)), "state": next_obs},
        "actions": rng.uniform(-1, 1, leading(B, h * a)).astype(np.float32),
        "returns": rng.normal(size=leading(B)).astype(np.float32),
        "discount": (0.99 ** h * (rng.uniform(size=leading(B)) > 0.2)).astype(np.float32),
        "cache": {"noise": noise, "denoised": denoise(obs, noise)},
        "next_cache": {"noise": next_noise, "denoised": denoise(next_obs, next_noise)},
    }


def _learner(rule: str, **overrides) -> Learner:
    config = toy_learner_config(TASK, ToyRunConfig(rule=rule, hidden=32, members=4, utd=2, batch_size=B))
    config = dataclasses.replace(config, **overrides)
    example = jnp.zeros((1, 4))
    return Learner.create(config, {"features": toy_features(example), "state": example}, seed=0)


@pytest.mark.parametrize("rule", ["faster", "best_of_n", "faster_idql", "base"])
def test_cached_and_recomputed_next_actions_give_the_same_targets(rule):
    actor = FlowActor(TASK)
    learner = _learner(rule)
    batch = jax.tree.map(jnp.asarray, _batch(actor))
    rng = jax.random.key(3)
    cached = learner.td_target(batch, rng)

    def run_actor(idx):  # what an update without the cache must do: run the actor on s_{t+h}
        noise = jnp.take_along_axis(batch["next_cache"]["noise"], idx[:, :, None, None], axis=1)
        return actor.denoise(batch["next_inputs"]["state"], noise)

    recomputed = learner.td_target(batch, rng, next_denoise=run_actor)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(recomputed), rtol=1e-6, atol=1e-6)
    # The discount really masks: a terminal window's target is its return.
    terminal = np.asarray(batch["discount"]) == 0
    np.testing.assert_allclose(np.asarray(cached)[terminal], np.asarray(batch["returns"])[terminal], rtol=1e-6)


@pytest.mark.parametrize("noise_target", ["kept", "all"])
def test_update_trains_both_critics_and_moves_targets_slowly(noise_target):
    learner = _learner("faster", noise_target=noise_target)
    batch = jax.tree.map(jnp.asarray, _batch(FlowActor(TASK), utd=2))
    new, info = learner.update(batch)
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in info.values())
    for online, target, before in ((new.chunk_critic.params, new.chunk_target, learner.chunk_target),
                                   (new.noise_critic.params, new.noise_target, learner.noise_target)):
        moved_online = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(online), jax.tree.leaves(before)))
        moved_target = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(before)))
        assert 0 < moved_target < moved_online  # Polyak: the target trails the online network
    assert float(jnp.abs(new.edit_policy.params["params"]["mean_head"]["kernel"]
                         - learner.edit_policy.params["params"]["mean_head"]["kernel"]).max()) > 0


def test_repeated_updates_fit_the_critic():
    learner = _learner("faster")
    batch = jax.tree.map(jnp.asarray, _batch(FlowActor(TASK), utd=2))
    losses = []
    for _ in range(30):
        learner, info = learner.update(batch)
        losses.append(float(info["critic_loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_mismatched_shapes_are_refused():
    config = toy_learner_config(TASK, ToyRunConfig())
    with pytest.raises(ValueError, match="same chunk shape"):
        dataclasses.replace(config, edit_policy=dataclasses.replace(config.edit_policy, chunk_shape=(3, 2)))


# -- the general filtering MDP (paper §4.1–4.2) wired into the learner ------------------------------------------

def _filter_learner(schedule) -> Learner:
    base = toy_learner_config(TASK, ToyRunConfig(rule="faster", hidden=32, members=4, utd=2, batch_size=B))
    config = dataclasses.replace(base, filter_schedule=schedule, filter_gamma=0.9, noise_target="kept",
                                 noise_critic=dataclasses.replace(base.noise_critic, time_conditioned=True))
    example = jnp.zeros((1, 4))
    return Learner.create(config, {"features": toy_features(example), "state": example}, seed=0)


def _with_intermediates(actor: FlowActor, batch: dict, schedule, utd: int | None = None) -> dict:
    """Adds the frozen-actor cache's x_t [.., K, S, H, A] at the schedule's filter steps to cache and next_cache."""
    from faster_vla.rl.filtering import cached_steps, flow_actor_advance

    steps = cached_steps(schedule)
    for cache_key, inputs_key in (("cache", "inputs"), ("next_cache", "next_inputs")):
        obs = np.asarray(batch[inputs_key]["state"]).reshape(-1, 4)
        noise = np.asarray(batch[cache_key]["noise"])
        flat = noise.reshape(-1, *noise.shape[-3:])
        advance = flow_actor_advance(actor, jnp.asarray(obs))
        x_t = np.stack([np.asarray(advance(jnp.asarray(flat), 0, k)) for k in steps], axis=2)
        batch[cache_key]["x_t"] = x_t.reshape(*noise.shape[:-2], len(steps), *noise.shape[-2:])
    return batch


@pytest.mark.parametrize("stages", [((0, 4), (1, 2), (2, 1)), ((3, 2), (7, 1))])
def test_filter_td_target_from_cache_equals_running_the_actor(stages):
    from faster_vla.critics.networks import min_of_random_pair
    from faster_vla.rl.filtering import FilterSchedule, flow_actor_advance

    schedule = FilterSchedule(N, TASK.num_steps, stages)
    actor = FlowActor(TASK)
    learner = _filter_learner(schedule)
    batch = jax.tree.map(jnp.asarray, _with_intermediates(actor, _batch(actor), schedule))
    rng = jax.random.key(3)
    cached = learner.td_target(batch, rng)

    # Without the cache: the acting rule at s' runs the actor segment by segment, continuing only survivors.
    k_sel, k_target = jax.random.split(rng)
    next_obs = batch["next_inputs"]["state"]
    live = learner.select(k_sel, batch["next_inputs"], batch["next_cache"]["noise"],
                          denoise=lambda idx: pytest.fail("the filter must not denoise whole seeds"),
                          advance=flow_actor_advance(actor, next_obs))
    q = learner.chunk_critic.apply_fn(learner.chunk_target, batch["next_inputs"], live.action)
    expected = batch["returns"] + batch["discount"] * min_of_random_pair(q, k_target)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_filter_update_trains_a_step_conditioned_noise_critic():
    from faster_vla.rl.filtering import successive_halving

    schedule = successive_halving(N, TASK.num_steps)  # ((0, 4), (1, 2), (2, 1))
    actor = FlowActor(TASK)
    learner = _filter_learner(schedule)
    batch = jax.tree.map(jnp.asarray, _with_intermediates(actor, _batch(actor, utd=2), schedule, utd=2))
    losses = []
    new = learner
    for _ in range(25):
        new, info = new.update(batch)
        losses.append(float(info["noise_critic_loss"]))
    assert all(np.isfinite(float(v)) for v in info.values())
    assert losses[-1] < 0.5 * losses[0]
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.noise_critic.params),
                                                          jax.tree.leaves(learner.noise_critic.params)))
    assert moved > 0
    # A cache without the filter steps' x_t is refused with the fix in the message.
    del batch["cache"]["x_t"]
    with pytest.raises(ValueError, match="intermediate_steps=cached_steps"):
        learner.update(batch)


def test_filter_config_errors():
    from faster_vla.rl.filtering import successive_halving

    base = dataclasses.replace(toy_learner_config(TASK, ToyRunConfig(rule="faster")), noise_target="kept")
    timed = dataclasses.replace(base.noise_critic, time_conditioned=True)
    with pytest.raises(ValueError, match="time_conditioned=True"):
        dataclasses.replace(base, filter_schedule=successive_halving(8))
    with pytest.raises(ValueError, match="uses none"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(8),
                            selection=dataclasses.replace(base.selection, rule="best_of_n"))
    with pytest.raises(ValueError, match="must equal"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(4))
    with pytest.raises(ValueError, match="noise_target"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(8), noise_target="all")
    learner = _filter_learner(successive_halving(N, TASK.num_steps))
    with pytest.raises(ValueError, match="pass `advance`"):
        learner.select(jax.random.key(0), {"features": toy_features(jnp.zeros((1, 4))), "state": jnp.zeros((1, 4))},
                       jnp.zeros((1, N, TASK.horizon, TASK.action_dim)), denoise=lambda idx: None)


class _ToyNextDenoiser:
    """Runs the toy actor at s_{t+h} inside the update (what the cache saves); hashable for jit."""

    def __init__(self, actor: FlowActor) -> None:
        self.actor = actor

    def __call__(self, minibatch: dict):
        def denoise(idx):
            seeds = jnp.take_along_axis(minibatch["next_cache"]["noise"], idx[:, :, None, None], axis=1)
            return self.actor._denoise_impl(minibatch["next_inputs"]["state"], seeds)
        return denoise


def test_update_flops_count_the_actor_only_without_the_cache():
    actor = FlowActor(TASK)
    learner = _learner("best_of_n")
    batch = jax.tree.map(jnp.asarray, _batch(actor, utd=2))
    cached = learner.update_flops(batch)
    recomputed = learner.update_flops(batch, _ToyNextDenoiser(actor))
    assert cached > 0
    assert recomputed > cached  # the same update plus the actor's denoising of N seeds at every s_{t+h}
