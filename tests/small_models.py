"""Small π0.5 configurations and parameters for tests that do not need openpi's goldens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.policies import pi05
from faster_vla.policies.config import GemmaConfig, SiglipConfig

# Deliberately unlike tiny_a: other action dim, horizon, SigLIP size, head layout, float32 compute.
SMALL = pi05.Pi05Config(
    paligemma_variant=GemmaConfig(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=12),
    action_expert_variant=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=12),
    action_dim=7,
    action_horizon=4,
    max_token_len=12,
    vocab_size=300,
    siglip=SiglipConfig(width=24, depth=2, mlp_dim=48, num_heads=2, patch_size=14, image_size=56),
    dtype="float32",
    discrete_state_input=False,
)


def perturbed_params(config: pi05.Pi05Config, seed: int = 0, scale: float = 0.05) -> dict:
    """openpi's init plus `scale`·N(0, 1), as the goldens do: openpi zero-initialises the SigLIP head and every
    adaRMS Dense, which would hide most of the model from a test."""
    params = pi05.init_params(config, seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def random_observation(config: pi05.Pi05Config, batch: int, seed: int = 0, valid_tokens: int = 5) -> pi05.Observation:
    """Images in [-1, 1], the last example's right wrist masked, `valid_tokens` prompt tokens then padding."""
    rng = np.random.default_rng(seed)
    size = config.siglip.image_size
    masks = {k: np.ones(batch, bool) for k in pi05.IMAGE_KEYS}
    masks["right_wrist_0_rgb"][-1] = False
    tokens = rng.integers(1, config.vocab_size, (batch, config.max_token_len)).astype(np.int32)
    token_mask = np.arange(config.max_token_len)[None, :] < np.arange(valid_tokens, valid_tokens + batch)[:, None]
    return pi05.Observation(
        images={k: rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32) for k in pi05.IMAGE_KEYS},
        image_masks=masks,
        state=rng.normal(size=(batch, 8)).astype(np.float32),
        tokenized_prompt=np.where(token_mask, tokens, 0),
        tokenized_prompt_mask=token_mask,
    )


def noise(config: pi05.Pi05Config, *leading: int, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (*leading, config.action_horizon, config.action_dim))
