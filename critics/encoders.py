"""State encoders for the critics and the edit policy: one interface, `encoder(inputs) -> embedding [B, E]`.

Two encoders of the environment state s, chosen by `EncoderConfig.kind`:

- `"backbone"` (`BackboneEncoder`): reads the frozen π0.5 prefix features (`Prefix.features`: masked mean
  and last valid token of the final-normed PaliGemma prefix, F = 2·width = 4096 on pi05_libero) and the
  robot state. The prefix is computed anyway for denoising, so the critic costs only a few matmuls, and a
  replay row stores 16 KB of features instead of two 224² images.
- `"image"` (`ImageEncoder`): the EXPO-on-π0.5 recipe: its own ResNet (stages 3,4,6,3 of basic blocks, 64
  base filters → 512-d, i.e. a ResNet-34 trunk) shared over the base and wrist cameras, plus a 64-d state
  embedding. GroupNorm instead of BatchNorm, so a critic has no mutable batch statistics.

Default for pi05_libero: `"backbone"` (`PI05_LIBERO_ENCODER`). The design card sizes the noise critic at
≈ 20M parameters (paper §4.4), and FASTER's cost argument (N·F_critic + T·F_actor) wants F_critic ≪ F_actor.
With the default head (networks.py: 10 members × (768, 768)) the backbone noise critic has 20,971,594
parameters (encoder 4,206,144). The image noise critic has 38,050,698 with the same head; its ResNet-34
trunk alone is 21,284,672, so it overshoots 20M whatever the head (25,563,018 even with EXPO's
(256, 256) members), and it runs two 224² ResNet-34 forwards per state on every critic call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from faster_vla.policies import config as pi05_config

EncoderKind = Literal["backbone", "image"]


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What the encoder reads and its sizes. Input sizes are here so callers can build example inputs.

    backbone: `features` [B, feature_dim] → LayerNorm → Dense(feature_proj_dim) → LayerNorm → tanh, concat
    with the state embedding. image: `images` uint8 [B, num_cameras, image_size, image_size, 3] through one
    shared ResNet, per-camera outputs concatenated, concat with the state embedding.
    """

    kind: EncoderKind = "backbone"
    state_dim: int = 8  # LIBERO: eef pos (3) + axis-angle (3) + gripper (2), normalised
    state_embed_dim: int = 64
    # backbone
    feature_dim: int = 4096  # 2 · PaliGemma width (pooled mean + last token)
    feature_proj_dim: int = 1024
    # image
    num_cameras: int = 2  # base + wrist
    image_size: int = 224
    resnet_stage_sizes: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-34
    resnet_filters: int = 64  # first stage; doubles per stage → 512 at the last of 4 stages
    resnet_groups: int = 32  # GroupNorm groups (reduced to gcd with the channel count for tiny nets)

    def __post_init__(self) -> None:
        if self.kind not in ("backbone", "image"):
            raise ValueError(f"kind must be 'backbone' or 'image', got {self.kind!r}")
        for name in ("state_dim", "state_embed_dim", "feature_dim", "feature_proj_dim", "num_cameras",
                     "image_size", "resnet_filters", "resnet_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.resnet_stage_sizes or any(n <= 0 for n in self.resnet_stage_sizes):
            raise ValueError(f"resnet_stage_sizes must be positive block counts, got {self.resnet_stage_sizes}")

    @property
    def embed_dim(self) -> int:
        """Width E of the embedding the encoder returns."""
        if self.kind == "backbone":
            return self.feature_proj_dim + self.state_embed_dim
        resnet_out = self.resnet_filters * 2 ** (len(self.resnet_stage_sizes) - 1)
        return self.num_cameras * resnet_out + self.state_embed_dim

    def example_inputs(self, batch_size: int, *, shapes_only: bool = False) -> dict:
        """Zero inputs of the right shapes and dtypes (ShapeDtypeStructs with `shapes_only`), for init."""
        spec = {"state": ((batch_size, self.state_dim), jnp.float32)}
        if self.kind == "backbone":
            spec["features"] = ((batch_size, self.feature_dim), jnp.float32)
        else:
            spec["images"] = ((batch_size, self.num_cameras, self.image_size, self.image_size, 3), jnp.uint8)
        if shapes_only:
            return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}
        return {k: jnp.zeros(s, d) for k, (s, d) in spec.items()}


def encoder_for_pi05(config: pi05_config.Pi05Config, kind: EncoderKind = "backbone", **overrides) -> EncoderConfig:
    """EncoderConfig whose feature size matches a π0.5 config's `Prefix.features` (2 · PaliGemma width) and,
    for the image encoder, whose image size is the model's input size (the backbone one reads no image)."""
    sizes = {"image_size": config.siglip.image_size} if kind == "image" else {}
    return EncoderConfig(kind=kind, feature_dim=2 * config.paligemma_config.width, **sizes, **overrides)


# pi05_libero's default critic encoder (see the module docstring for why the backbone one).
PI05_LIBERO_ENCODER = encoder_for_pi05(pi05_config.PI05_LIBERO, "backbone")
PI05_LIBERO_IMAGE_ENCODER = encoder_for_pi05(pi05_config.PI05_LIBERO, "image")


class StateEmbedding(nn.Module):
    """state [B, S] → [B, dim]: a linear embedding; the critic head's first LayerNorm sets its scale."""

    dim: int

    @nn.compact
    def __call__(self, state: jax.Array) -> jax.Array:
        return nn.Dense(self.dim, name="dense")(state.astype(jnp.float32))


class BackboneEncoder(nn.Module):
    """Frozen π0.5 prefix features + state → embedding [B, feature_proj_dim + state_embed_dim].

    LayerNorm first because the pooled and last-token halves of `Prefix.features` have unrelated scales;
    the projection (shared by every ensemble member) then keeps the 4096-d input from being multiplied into
    each member's first layer; LayerNorm + tanh bound the projected features, as DrQ/RLPD encoders do.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, inputs: dict) -> jax.Array:
        cfg = self.config
        features = inputs["features"].astype(jnp.float32)  # [B, F]
        if features.shape[-1] != cfg.feature_dim:
            raise ValueError(f"features width {features.shape[-1]} != config.feature_dim {cfg.feature_dim}")
        x = nn.LayerNorm(name="feature_norm")(features)
        x = nn.Dense(cfg.feature_proj_dim, name="feature_proj")(x)
        x = jnp.tanh(nn.LayerNorm(name="proj_norm")(x))  # [B, P]
        state = StateEmbedding(cfg.state_embed_dim, name="state_embed")(inputs["state"])  # [B, 64]
        return jnp.concatenate([x, state], axis=-1)


def _group_norm(channels: int, groups: int, name: str, zero_scale: bool = False) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, name=name,
                        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs) with GroupNorm; the last norm starts at zero so blocks start as
    identities (stable training of a randomly initialised trunk)."""

    filters: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(_group_norm(self.filters, self.groups, "norm1")(y))
        y = nn.Conv(self.filters, (3, 3), 1, padding=1, use_bias=False, name="conv2")(y)
        y = _group_norm(self.filters, self.groups, "norm2", zero_scale=True)(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj_conv")(residual)
            residual = _group_norm(self.filters, self.groups, "proj_norm")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet trunk with GroupNorm: images float [B, H, W, 3] → global-average-pooled [B, filters·2^(S−1)]."""

    stage_sizes: tuple[int, ...]
    filters: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.filters, (7, 7), 2, padding=3, use_bias=False, name="stem_conv")(x)
        x = nn.relu(_group_norm(self.filters, self.groups, "stem_norm")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(self.filters * 2**i, strides, self.groups, name=f"stage{i}_block{j}")(x)
        return jnp.mean(x, axis=(1, 2))


class ImageEncoder(nn.Module):
    """Base + wrist uint8 images and state → embedding [B, num_cameras·512 + state_embed_dim].

    One ResNet is shared over the cameras (the cameras are folded into the batch), as in EXPO on π0.5.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, inputs: dict) -> jax.Array:
        cfg = self.config
        images = inputs["images"]  # uint8 [B, C, H, W, 3]
        if images.ndim != 5 or images.shape[1] != cfg.num_cameras or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, {cfg.num_cameras}, H, W, 3], got {images.shape}")
        b, c = images.shape[:2]
        x = images.astype(jnp.float32) / 127.5 - 1.0  # [-1, 1], as π0.5 sees its images
        x = x.reshape(b * c, *images.shape[2:])
        x = ResNet(cfg.resnet_stage_sizes, cfg.resnet_filters, cfg.resnet_groups, name="resnet")(x)
        x = x.reshape(b, c * x.shape[-1])  # per-camera features side by side
        state = StateEmbedding(cfg.state_embed_dim, name="state_embed")(inputs["state"])
        return jnp.concatenate([x, state], axis=-1)


def make_encoder(config: EncoderConfig, name: str | None = None) -> nn.Module:
    """The encoder module for `config.kind`."""
    if config.kind == "backbone":
        return BackboneEncoder(config, name=name)
    return ImageEncoder(config, name=name)
