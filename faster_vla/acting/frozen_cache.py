"""The frozen-actor cache, computed on the acting side and handed to replay: for each stored observation, the
prefix features and K noises with the chunks the frozen actor denoises them into (and a filter's x_t), so that
learner updates never run the VLA."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    if noise.ndim != 4:
        raise ValueError(f"noise must be [batch, K, horizon, action_dim], got shape {list(noise.shape)}")
    steps = tuple(int(k) for k in intermediate_steps)
    if any(not 0 < k < num_steps for k in steps):
        raise ValueError(f"intermediate_steps must lie strictly between 0 and num_steps={num_steps}, got {steps}")
    prefix = actor.encode(obs)
    features = np.asarray(prefix.features, np.float32)
    cache = {"features": features, "noise": noise}
    if steps:
        denoised, trajectory = actor.denoise(prefix, noise, num_steps=num_steps, return_intermediates=True)
        # trajectory.x_t [T + 1, b, K, H, A] -> [b, K, S, H, A]
        cache["x_t"] = np.moveaxis(np.asarray(trajectory.x_t, np.float32)[list(steps)], 0, 2)
    else:
        denoised = actor.denoise(prefix, noise, num_steps=num_steps)
    cache["denoised"] = np.asarray(denoised, np.float32)
    if features.shape[0] != noise.shape[0] or cache["denoised"].shape != noise.shape:
        raise ValueError(f"actor returned features {list(features.shape)} and chunks {list(cache['denoised'].shape)} "
                         f"for noise {list(noise.shape)}")
    return cache
