"""Reads openpi's golden fixtures and derives the model configuration from the arrays themselves.

Nothing here is specific to tiny_a: the configuration (Gemma sizes, vocabulary, SigLIP size, action dim,
horizon, prompt length) is read off the parameter and input shapes, so the same parity tests check any
configuration exported the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from faster_vla.policies import pi05
from faster_vla.policies.config import GemmaConfig, SiglipConfig

# The prompt openpi's tokenizer and transform goldens were made with (manifest.json: misc.tokenizer.prompt).
GOLDEN_PROMPT = " Pick_up the bowl\n"


@dataclasses.dataclass(frozen=True)
class Golden:
    config: pi05.Pi05Config
    params: dict
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def observation(self) -> pi05.Observation:
        return observation_from(self.inputs)


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (the issue's parity metric)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def observation_from(inputs: dict[str, np.ndarray]) -> pi05.Observation:
    return pi05.Observation(
        images={k: inputs[f"images/{k}"] for k in pi05.IMAGE_KEYS},
        image_masks={k: inputs[f"image_masks/{k}"] for k in pi05.IMAGE_KEYS},
        state=inputs["state"],
        tokenized_prompt=inputs["tokenized_prompt"],
        tokenized_prompt_mask=inputs["tokenized_prompt_mask"],
    )


def _gemma(flat: dict[str, np.ndarray], suffix: str) -> GemmaConfig:
    layers = "PaliGemma/llm/layers"
    depth, heads, width, head_dim = flat[f"{layers}/attn/q_einsum{suffix}/w"].shape
    kv_heads = flat[f"{layers}/attn/kv_einsum{suffix}/w"].shape[2]
    mlp_dim = flat[f"{layers}/mlp{suffix}/linear"].shape[1]
    return GemmaConfig(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim)


def config_from_arrays(flat: dict[str, np.ndarray], inputs: dict[str, np.ndarray], dtype: str) -> pi05.Pi05Config:
    img = "PaliGemma/img"
    depth, width, heads, _ = flat[f"{img}/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape
    patch = flat[f"{img}/embedding/kernel"].shape[0]
    siglip = SiglipConfig(
        width=width,
        depth=depth,
        mlp_dim=flat[f"{img}/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape[-1],
        num_heads=heads,
        patch_size=patch,
        image_size=inputs[f"images/{pi05.IMAGE_KEYS[0]}"].shape[1],
    )
    horizon, action_dim = inputs["actions"].shape[1:]
    return pi05.Pi05Config(
        paligemma_variant=_gemma(flat, ""),
        action_expert_variant=_gemma(flat, "_1"),
        action_dim=action_dim,
        action_horizon=horizon,
        max_token_len=inputs["tokenized_prompt"].shape[1],
        vocab_size=flat["PaliGemma/llm/embedder/input_embedding"].shape[0],
        siglip=siglip,
        dtype=dtype,
        discrete_state_input=False,
    )


def load_golden(fixtures: Path, name: str, dtype: str) -> Golden:
    with np.load(fixtures / f"{name}_params.npz") as f:
        flat = {k: f[k] for k in f.files}
    with np.load(fixtures / f"{name}_inputs.npz") as f:
        inputs = {k: f[k] for k in f.files}
    with np.load(fixtures / f"{name}_outputs_{dtype}.npz") as f:
        outputs = {k: f[k] for k in f.files}
    params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return Golden(config_from_arrays(flat, inputs, dtype), params, inputs, outputs)
