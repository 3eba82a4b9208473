"""Model configuration for π0.5: one frozen dataclass describes `pi05_libero` and every small variant.

The fields mirror openpi's `Pi0Config(pi05=True)` plus the sizes openpi hard-codes (vocabulary, SigLIP
variant, image resolution), so that small configurations run exactly the same code as the 3.3B model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

PALIGEMMA_VOCAB_SIZE = 257_152

DType = Literal["bfloat16", "float32"]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One expert of the mixture transformer (openpi's gemma.Config without LoRA)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# Named Gemma variants, as openpi names them (widths/depths/heads copied from the spec fact sheet).
GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}


def get_gemma_config(variant: str | GemmaConfig) -> GemmaConfig:
    """Resolves a Gemma variant (a name, or a GemmaConfig for custom sizes); unknown names list the known."""
    if isinstance(variant, GemmaConfig):
        return variant
    try:
        return GEMMA_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"Unknown Gemma variant {variant!r}; known variants: {sorted(GEMMA_VARIANTS)}") from None


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP ViT image encoder (pool 'none', learned position embedding, head to the LLM width)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224  # square input resolution; openpi always feeds 224×224

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The three camera slots π0.5 always reads, in prefix order.
IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclasses.dataclass(frozen=True)
class Pi05Config:
    """π0.5 as openpi's `Pi0Config(pi05=True)`; defaults are openpi's, `PI05_LIBERO` is the released model."""

    # A named variant (see GEMMA_VARIANTS) or a GemmaConfig for custom sizes (e.g. small pretraining).
    paligemma_variant: str | GemmaConfig = "gemma_2b"
    action_expert_variant: str | GemmaConfig = "gemma_300m"
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 200
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    siglip: SiglipConfig = dataclasses.field(default_factory=SiglipConfig)
    dtype: DType = "bfloat16"
    # Prompt carries the discretised state (openpi's default for pi05); pi05_libero turns it off.
    discrete_state_input: bool = True

    def __post_init__(self) -> None:
        llm, expert = self.paligemma_config, self.action_expert_config
        if llm.depth != expert.depth:
            raise ValueError(f"both experts need the same depth, got {llm.depth} and {expert.depth}")
        for field in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(llm, field) != getattr(expert, field):
                raise ValueError(f"joint attention needs equal {field} in both experts")
        if llm.num_heads % llm.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.siglip.image_size % self.siglip.patch_size:
            raise ValueError("siglip.image_size must be a multiple of siglip.patch_size")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        for name in ("action_dim", "action_horizon", "max_token_len", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def paligemma_config(self) -> GemmaConfig:
        return get_gemma_config(self.paligemma_variant)

    @property
    def action_expert_config(self) -> GemmaConfig:
        return get_gemma_config(self.action_expert_variant)

    @property
    def num_prefix_tokens(self) -> int:
        return len(IMAGE_KEYS) * self.siglip.num_patches + self.max_token_len


# openpi's `pi05_libero` training config: Pi0Config(pi05=True, action_horizon=10, discrete_state_input=False).
PI05_LIBERO = Pi05Config(action_horizon=10, discrete_state_input=False)

# The golden-fixture configuration `tiny_a` (see ../shared/spec/pi05.md).
TINY_A = Pi05Config(
    paligemma_variant="dummy",
    action_expert_variant="dummy",
    action_horizon=10,
    max_token_len=24,
    vocab_size=1024,
    siglip=SiglipConfig(width=32, depth=1, mlp_dim=128, num_heads=2),
    dtype="float32",
    discrete_state_input=False,
)

# The project's built-in small π0.5 (same code as pi05_libero): runs on a laptop CPU. Its vocabulary is the
# 512-piece LIBERO tokenizer in checkpoints/pi05_small/; every LIBERO instruction fits in 22 tokens.
PI05_SMALL = Pi05Config(
    paligemma_variant=GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1, head_dim=64),
    action_expert_variant=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64),
    action_horizon=10,
    max_token_len=32,
    vocab_size=512,
    siglip=SiglipConfig(width=128, depth=4, mlp_dim=512, num_heads=4),
    dtype="float32",  # bfloat16 matmuls are slower than float32 on most CPUs
    discrete_state_input=False,
)

# The small π0.5 pretrained on scripted LIBERO demonstrations (checkpoints/pi05_libero_small, issue 6):
# pi05_small with 112² images (SigLIP's 14-pixel patches -> 64 tokens per camera instead of 256), which
# makes the prefix 224 tokens instead of 800 (3 cameras + 32 text), ~3.6x shorter (counted, not timed).
PI05_LIBERO_SMALL = dataclasses.replace(PI05_SMALL, siglip=dataclasses.replace(PI05_SMALL.siglip, image_size=112))

PRESETS: dict[str, Pi05Config] = {
    "pi05_libero": PI05_LIBERO,
    "pi05_small": PI05_SMALL,
    "pi05_libero_small": PI05_LIBERO_SMALL,
    "tiny_a": TINY_A,
}


def get_preset(name: str) -> Pi05Config:
    """A named configuration; unknown names fail with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown π0.5 preset {name!r}; known presets: {sorted(PRESETS)}") from None
