"""The frozen-actor cache, computed on the acting side and handed to replay: for each stored observation, the
prefix features and K noises with the chunks the frozen actor denoises them into (and a filter's x_t), so that
learner updates never run the VLA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cache_from_prefix(actor: Any, prefix: Any, noise: Any, *, num_steps: int = 10,
                      intermediate_steps: tuple[int, ...] = ()) -> dict[str, Any]:
    """The cache rows of already-encoded observations: denoise all K noises against their prefix.

    prefix: the `Prefix` acting computed (so no observation is encoded twice); noise [b, K, H, A]. Returns
    device arrays {'features' [b, F], 'noise', 'denoised' [b, K, H, A]} (plus 'x_t' [b, K, S, H, A] at
    `intermediate_steps`), dispatched but not waited for: acting can step the env while they compute.
    """
    noise = jnp.asarray(noise, jnp.float32)
    if noise.ndim != 4:
        raise ValueError(f"noise must be [batch, K, horizon, action_dim], got shape {list(noise.shape)}")
    steps = tuple(int(k) for k in intermediate_steps)
    if any(not 0 < k < num_steps for k in steps):
        raise ValueError(f"intermediate_steps must lie strictly between 0 and num_steps={num_steps}, got {steps}")
    cache = {"features": jnp.asarray(prefix.features, jnp.float32), "noise": noise}
    if steps:
        denoised, trajectory = actor.denoise(prefix, noise, num_steps=num_steps, return_intermediates=True)
        # trajectory.x_t [T + 1, b, K, H, A] -> [b, K, S, H, A]
        cache["x_t"] = jnp.moveaxis(jnp.asarray(trajectory.x_t, jnp.float32)[jnp.asarray(steps)], 0, 2)
    else:
        denoised = actor.denoise(prefix, noise, num_steps=num_steps)
    cache["denoised"] = jnp.asarray(denoised, jnp.float32)
    if cache["features"].shape[0] != noise.shape[0] or cache["denoised"].shape != noise.shape:
        raise ValueError(f"actor returned features {list(cache['features'].shape)} and chunks "
                         f"{list(cache['denoised'].shape)} for noise {list(noise.shape)}")
    return cache


def frozen_actor_cache(
    actor: Any, obs: Any, noise: Any, *, num_steps: int = 10, intermediate_steps: tuple[int, ...] = ()
) -> dict[str, np.ndarray]:
    """The cache rows of a batch of observations: encode once, denoise all K noises against that prefix.

    actor: a `Pi05Actor` (anything with `encode(obs) -> prefix with .features [b, F]` and
    `denoise(prefix, noise [b, K, H, A], num_steps, return_intermediates=) -> [b, K, H, A]`); obs: a batch of b
    observations (e.g. an episode's T + 1); noise [b, K, H, A]. Returns float32 numpy {'features' [b, F],
    'noise' [b, K, H, A], 'denoised' [b, K, H, A]}, plus 'x_t' [b, K, S, H, A] at `intermediate_steps` when
    given; 'denoised'[:, k] is the actor's chunk for noise k. The intermediates come from the same denoise.
    """
    noise = np.asarray(noise, np.float32)
    cache = cache_from_prefix(actor, actor.encode(obs), noise, num_steps=num_steps,
                              intermediate_steps=intermediate_steps)
    return {k: np.asarray(v, np.float32) for k, v in cache.items()}


def row_noise(key: jax.Array, rows: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """float32 [len(rows), K, H, A]: the cache noises of an episode's rows, row r's from `fold_in(key, r)`, so a
    row's noises do not depend on when (acting, or after the episode) or with which rows they are drawn."""
    if len(rows) == 0:
        return np.zeros((0, *shape), np.float32)
    draw = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), shape))
    return np.asarray(draw(jnp.asarray(rows, jnp.uint32)), np.float32)
