"""The frozen-backbone adapter: encode once, denoise N candidates that share the prefix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.policies import pi05
from faster_vla.policies.pi05 import Pi05Module
from tests.small_models import SMALL, noise, perturbed_params, random_observation

BATCH, N = 3, 5


@pytest.fixture(scope="module")
def actor():
    return pi05.Pi05Actor(SMALL, perturbed_params(SMALL))


@pytest.fixture(scope="module")
def obs():
    return random_observation(SMALL, BATCH)


@pytest.fixture(scope="module")
def prefix(actor, obs):
    return actor.encode(obs)


def test_candidate_i_of_denoise_equals_sample_actions_with_noise_i(actor, obs, prefix):
    eps = noise(SMALL, BATCH, N)
    candidates = np.asarray(actor.denoise(prefix, eps, num_steps=10))
    assert candidates.shape == (BATCH, N, SMALL.action_horizon, SMALL.action_dim)
    for i in range(N):
        single = np.asarray(actor.sample_actions(obs, noise=eps[:, i], num_steps=10))
        np.testing.assert_allclose(candidates[:, i], single, rtol=1e-5, atol=1e-5)
    # The candidates really differ: the test is not comparing one action to itself.
    assert np.abs(candidates[:, 0] - candidates[:, 1]).max() > 1e-2


def test_each_observation_uses_its_own_prefix(actor, obs, prefix):
    eps = noise(SMALL, BATCH, 1)
    together = np.asarray(actor.denoise(prefix, eps))
    for b in range(BATCH):
        one = jax.tree.map(lambda x: x[b : b + 1], obs)
        alone = np.asarray(actor.denoise(actor.encode(one), eps[b : b + 1]))
        np.testing.assert_allclose(together[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_intermediates_and_resuming_from_an_intermediate_step(actor, prefix):
    eps = noise(SMALL, BATCH, N, seed=1)
    final, trajectory = actor.denoise(prefix, eps, num_steps=10, return_intermediates=True)
    assert trajectory.x_t.shape == (11, BATCH, N, SMALL.action_horizon, SMALL.action_dim)
    np.testing.assert_array_equal(np.asarray(trajectory.t), pi05.euler_times(10))
    np.testing.assert_array_equal(np.asarray(trajectory.x_t[0]), np.asarray(eps))
    np.testing.assert_array_equal(np.asarray(trajectory.x_t[-1]), np.asarray(final))
    for k in (1, 4, 9):
        resumed = actor.denoise(prefix, trajectory.x_t[k], num_steps=10, start_step=k)
        np.testing.assert_allclose(np.asarray(resumed), np.asarray(final), rtol=1e-6, atol=1e-6)
        # Stopping early gives the partially denoised x_t of the same run (what intermediate filters score).
        partial = actor.denoise(prefix, eps, num_steps=10, end_step=k)
        np.testing.assert_allclose(np.asarray(partial), np.asarray(trajectory.x_t[k]), rtol=1e-6, atol=1e-6)


def test_euler_times_accumulate_like_openpis_loop():
    times = pi05.euler_times(10)
    t = np.float32(1.0)
    for k in range(11):
        assert times[k] == t
        t = np.float32(t + np.float32(-0.1))
    assert abs(times[-1]) < 1e-6


def test_features_are_masked_mean_and_last_valid_token(actor, obs, prefix):
    hidden, _, mask = Pi05Module(SMALL).apply({"params": actor.params}, actor.prepare(obs), method=Pi05Module.encode)
    hidden, mask = np.asarray(hidden, np.float64), np.asarray(mask)
    width = SMALL.paligemma_config.width
    assert prefix.features.shape == (BATCH, 2 * width)
    for b in range(BATCH):
        np.testing.assert_allclose(prefix.pooled[b], hidden[b][mask[b]].mean(0), rtol=1e-5, atol=1e-6)
        last = np.flatnonzero(mask[b])[-1]
        np.testing.assert_allclose(prefix.last_token[b], hidden[b, last], rtol=1e-5, atol=1e-5)
    # The prompts have different lengths, so the last valid tokens sit at different positions.
    assert len({int(np.flatnonzero(m)[-1]) for m in mask}) == BATCH


def test_no_gradient_reaches_the_frozen_actor(actor, prefix):
    eps = noise(SMALL, BATCH, 2)
    # Through the public path: the actor's parameters are behind stop_gradient ...
    grads = jax.grad(lambda p: jnp.sum(actor._denoise(p, prefix, eps, 3, 0, False, 3)))(actor.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # ... while callers can still differentiate actions with respect to the noise.
    g_noise = jax.grad(lambda e: jnp.sum(actor.denoise(prefix, e, num_steps=3)))(eps)
    assert float(jnp.abs(g_noise).max()) > 0.0


def test_trainable_actor_gets_gradients(obs):
    actor = pi05.Pi05Actor(SMALL, perturbed_params(SMALL), trainable=True)
    actions = noise(SMALL, BATCH, seed=3)
    grads = jax.grad(lambda p: jnp.mean(actor.loss(p, obs, actions, rng=jax.random.key(0))))(actor.params)
    expert = grads["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"]
    assert float(jnp.abs(expert).max()) > 0.0


def test_bad_inputs_give_clear_errors(actor, obs, prefix):
    with pytest.raises(ValueError, match="noise must have shape"):
        actor.denoise(prefix, noise(SMALL, BATCH + 1, 2))
    with pytest.raises(ValueError, match=r"\[batch, n, horizon, action_dim\]"):
        actor.denoise(prefix, noise(SMALL, BATCH))
    with pytest.raises(ValueError, match="start_step"):
        actor.denoise(prefix, noise(SMALL, BATCH, 1), num_steps=3, start_step=3)
    with pytest.raises(ValueError, match="lacks"):
        actor.encode(obs.replace(images={"base_0_rgb": obs.images["base_0_rgb"]}))
    with pytest.raises(ValueError, match="needs `noise` or `rng`"):
        actor.sample_actions(obs)
    bad = {**obs.images, "base_0_rgb": np.zeros((BATCH, 56, 56, 3), np.uint8)}
    with pytest.raises(ValueError, match="uint8"):
        actor.encode(obs.replace(images=bad))


def test_images_of_another_size_are_resized_with_padding(actor, obs):
    big = {k: np.repeat(np.repeat(np.asarray(v), 2, axis=1), 2, axis=2) for k, v in obs.images.items()}
    prepared = actor.prepare(obs.replace(images=big))
    assert prepared.images["base_0_rgb"].shape == (BATCH, 56, 56, 3)


def test_frozen_actor_cache_holds_what_the_actor_computes(actor, obs, prefix):
    from faster_vla.acting.frozen_cache import frozen_actor_cache

    eps = np.asarray(noise(SMALL, BATCH, N, seed=5))
    cache = frozen_actor_cache(actor, obs, eps, num_steps=10)
    np.testing.assert_array_equal(cache["noise"], eps)
    np.testing.assert_allclose(cache["features"], np.asarray(prefix.features), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cache["denoised"], np.asarray(actor.denoise(prefix, eps, num_steps=10)), rtol=1e-6,
                               atol=1e-6)
