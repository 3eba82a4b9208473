"""The one learner-batch builder: replay windows -> the learner's batch, every leaf [utd, B, ...]."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.rl.replay import ChunkBatch


def to_learner_batch(windows: ChunkBatch, utd: int, *, features: bool = True) -> dict:
    """Replay windows (utd·B of them) -> the learner's batch, every leaf [utd, B, ...].

    Critic inputs are the stored observation fields (the normalised state, and the camera images when the
    critics have their own image encoder) plus, with `features`, the cached prefix features; the rest of the
    cache (noises, their chunks, filter x_t) is what targets read instead of running the actor.
    """
    def inputs(obs: Mapping[str, np.ndarray], cache: Mapping[str, np.ndarray]) -> dict:
        out = dict(obs)
        if features:
            out["features"] = cache["features"]
        return out

    def actor_part(cache: Mapping[str, np.ndarray]) -> dict:
        return {k: v for k, v in cache.items() if k != "features"}

    batch = {
        "inputs": inputs(windows.observations, windows.cache),
        "next_inputs": inputs(windows.next_observations, windows.next_cache),
        "actions": windows.actions, "returns": windows.returns, "discount": windows.discount,
        "cache": actor_part(windows.cache), "next_cache": actor_part(windows.next_cache),
    }
    return jax.tree.map(lambda x: jnp.asarray(x).reshape(utd, -1, *x.shape[1:]), batch)
