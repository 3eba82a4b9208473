"""SigLIP ViT image encoder as π0.5 uses it: learned position embedding, pool 'none', head to the LLM width.

Built from flax.linen's own layers so that the parameter tree is openpi's (`PaliGemma/img/...`, blocks
stacked on axis 0) and the numerics are those of the same flax layers openpi uses. The patch embedding and
position embedding run in float32; everything after runs in the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.policies.config import SiglipConfig


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [b, p, w] -> [b, p, w]
        inits = {"kernel_init": nn.initializers.xavier_uniform(), "bias_init": nn.initializers.normal(stddev=1e-6)}
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0", **inits)(x)
        x = nn.gelu(x)  # tanh approximation, as big_vision
        return nn.Dense(width, dtype=self.dtype, name="Dense_1", **inits)(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block; a scan carry in, (carry, None) out."""

    mlp_dim: int
    num_heads: int
    dtype: str

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=True,
            dtype=self.dtype,
            name="MultiHeadDotProductAttention_0",
        )(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
        return x + y, None


class Encoder(nn.Module):
    config: SiglipConfig
    dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(EncoderBlock, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        x, _ = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.config.depth,
        )(mlp_dim=self.config.mlp_dim, num_heads=self.config.num_heads, dtype=self.dtype, name="encoderblock")(
            x, None
        )
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class Siglip(nn.Module):
    """Images [b, h, w, 3] float in [-1, 1] -> tokens [b, num_patches, out_width] in `dtype`."""

    config: SiglipConfig
    out_width: int
    dtype: str

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        cfg = self.config
        image = jnp.asarray(image, jnp.float32)
        x = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            name="embedding",
            dtype=jnp.float32,
        )(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c), jnp.float32
        )
        x = (x + pos).astype(self.dtype)
        x = Encoder(cfg, self.dtype, name="Transformer")(x)
        # Zero-initialised as in openpi (head_zeroinit): a fresh model starts from the same point as openpi's.
        return nn.Dense(self.out_width, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="head")(x)
