"""An openpi-style policy: raw observation dict -> transforms -> π0.5 actor -> transforms -> action chunk.

`infer` takes ONE observation in the robot's own format (for LIBERO: `observation/image`,
`observation/wrist_image`, `observation/state`, `prompt`) and returns `actions` [horizon, 7] in the
robot's units plus `policy_timing` per part, as openpi's `Policy.infer` does. Serving and evaluation build
on this object; the actor underneath is the same one critics and training use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from faster_vla.policies.normalize import NormStats
from faster_vla.policies.pi05 import Observation, Pi05Actor
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from faster_vla.policies.transforms import (
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    PadStatesAndActions,
    ResizeImages,
    TokenizePrompt,
    Transform,
    Unnormalize,
    compose,
)


class Policy:
    """Transforms around a `Pi05Actor`, with its own noise stream (seeded, split per call)."""

    def __init__(
        self,
        actor: Pi05Actor,
        *,
        input_transform: Transform,
        output_transform: Transform,
        num_steps: int = 10,
        seed: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.actor = actor
        self.input_transform = input_transform
        self.output_transform = output_transform
        self.num_steps = num_steps
        self.metadata = dict(metadata or {})
        self._rng = jax.random.key(seed)

    def to_observation(self, obs: Mapping[str, Any]) -> Observation:
        """One raw observation -> the model's batched `Observation` (batch 1), through the input transforms."""
        data = self.input_transform(dict(obs))
        return Observation.from_dict(jax.tree.map(lambda x: np.asarray(x)[None], data))

    def infer(self, obs: Mapping[str, Any], *, noise: np.ndarray | None = None) -> dict[str, Any]:
        """One observation -> {'actions': [horizon, robot_action_dim], 'policy_timing': {part: ms}}.

        `noise` [horizon, action_dim] fixes the initial noise (the caller's seed); otherwise it is drawn from
        the policy's own stream.
        """
        config = self.actor.config
        t0 = time.perf_counter()
        observation = self.to_observation(obs)
        if noise is None:
            self._rng, key = jax.random.split(self._rng)
            noise = jax.random.normal(key, (1, config.action_horizon, config.action_dim))
        else:
            noise = np.asarray(noise, np.float32)[None]
        t1 = time.perf_counter()
        prefix = jax.block_until_ready(self.actor.encode(observation))
        t2 = time.perf_counter()
        actions = jax.block_until_ready(self.actor.denoise(prefix, noise[:, None], self.num_steps))
        t3 = time.perf_counter()
        # openpi hands the (normalised) state to the output transforms too; its Unnormalize expects it.
        out = self.output_transform({"state": np.asarray(observation.state[0]), "actions": np.asarray(actions[0, 0])})
        t4 = time.perf_counter()
        out["policy_timing"] = {
            "input_transform_ms": 1e3 * (t1 - t0),
            "encode_ms": 1e3 * (t2 - t1),
            "denoise_ms": 1e3 * (t3 - t2),
            "output_transform_ms": 1e3 * (t4 - t3),
            "infer_ms": 1e3 * (t4 - t0),
        }
        return out


def make_libero_policy(
    actor: Pi05Actor,
    *,
    tokenizer: PaligemmaTokenizer,
    norm_stats: Mapping[str, NormStats],
    num_steps: int = 10,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> Policy:
    """openpi's pi05_libero pipeline: LIBERO inputs, quantile norm, resize 224, tokenize, pad; and back."""
    config = actor.config
    if tokenizer.max_len != config.max_token_len:
        raise ValueError(
            f"tokenizer.max_len ({tokenizer.max_len}) must equal the model's max_token_len ({config.max_token_len})"
        )
    size = config.siglip.image_size
    inputs = compose(
        LiberoInputs(),
        Normalize(norm_stats, use_quantiles=True),
        ResizeImages(size, size),
        TokenizePrompt(tokenizer, discrete_state_input=config.discrete_state_input),
        PadStatesAndActions(config.action_dim),
    )
    outputs = compose(Unnormalize(norm_stats, use_quantiles=True), LiberoOutputs())
    return Policy(actor, input_transform=inputs, output_transform=outputs, num_steps=num_steps, seed=seed,
                  metadata=metadata)
