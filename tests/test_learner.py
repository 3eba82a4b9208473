"""The learner: updates run on cached actor outputs, and the cache changes nothing but the cost."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.learner import Learner
from faster_vla.toy_task import FlowActor, ToyRunConfig, ToyTaskConfig, toy_features, toy_learner_config

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
