"""Analytic compute model of π0.5 (openpi's `Pi0` with `pi05=True`) for any `Pi05Config`.

FASTER's argument is an accounting one: best-of-N over initial noises is cheap when the N candidates share
one prefix (SigLIP on every camera + the PaliGemma LLM over 968 tokens, ~4.6e12 FLOPs for pi05_libero) and
only re-run the action-expert suffix (~7.9e9 FLOPs per denoising step). The numbers here feed the C_BoN vs
C_FASTER comparison, so they follow one fixed convention and reproduce openpi's reference figures
(`../shared/fixtures/openpi_pi05/pi05_libero_flops.json`, blocks "analytic" and "analytic_depth1") exactly.

Convention: FLOPs = 2·m·n·k summed over matmuls/einsums only. Counted:

- SigLIP, per image (all `num_patches` tokens): the patch conv as a matmul (patch·patch·3 → width), per layer
  the q/k/v/out projections (width → width each), attention logits and probs·V (tokens² · width each) and the
  MLP (width → mlp_dim → width); then the `head` Dense width → LLM width. Every camera slot is encoded,
  masked ones included (openpi runs SigLIP on all three).
- PaliGemma LLM over `num_prefix_tokens` = 3·num_patches + max_token_len tokens (padding and masked cameras
  included, as openpi computes them), keys = the same tokens: per layer q (width → heads·head_dim),
  kv (width → 2·kv_heads·head_dim), logits and probs·V (queries · keys · heads · head_dim each), output
  projection (heads·head_dim → width), gating einsum (width → 2·mlp_dim) and linear (mlp_dim → width).
- One denoising step: the action expert with the same per-layer terms over `action_horizon` query tokens
  attending prefix + suffix keys; the adaRMS modulation Dense (width → 3·width), 2·depth + 1 of them
  (pre-attention and pre-ffw per layer, plus the final norm), applied once per example to the time
  conditioning vector (not per token); the time MLP (two width × width Dense, once per example); action_in_proj and action_out_proj
  (per action token).

Not counted: the embedding lookup, norms, softmax, RoPE, activations, residuals, biases, the sin/cos time
embedding, and any LM head (π0.5 has none in this path). `compute_loss`'s forward is modelled as the prefix
pass plus one suffix pass (suffix attending prefix + suffix); openpi's joint forward also materialises the
masked prefix-query × suffix-key logits, which the reference does not count (4·prefix·suffix·heads·head_dim
per layer, ~0.03 % at pi05_libero scale).

Everything scales linearly with the batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from faster_vla.policies.config import IMAGE_KEYS, GemmaConfig, Pi05Config, SiglipConfig

IMAGE_CHANNELS = 3  # RGB input to SigLIP's patch conv
NUM_CAMERAS = len(IMAGE_KEYS)
ADARMS_NORMS_PER_LAYER = 2  # pre-attention and pre-ffw; plus one final norm per expert


def _matmul(m: int, k: int, n: int) -> int:
    """2·m·k·n: one multiply-add per output element and contraction index."""
    return 2 * m * k * n


def _siglip_layer_flops(siglip: SiglipConfig) -> int:
    tokens, width = siglip.num_patches, siglip.width
    projections = 4 * _matmul(tokens, width, width)  # query, key, value, out
    attention = 2 * _matmul(tokens, width, tokens)  # logits and probs·V, summed over heads
    mlp = _matmul(tokens, width, siglip.mlp_dim) + _matmul(tokens, siglip.mlp_dim, width)
    return projections + attention + mlp


def _siglip_image_flops(siglip: SiglipConfig, llm_width: int, depth: int) -> int:
    """One image through SigLIP: patch conv + `depth` encoder blocks + head to the LLM width."""
    tokens = siglip.num_patches
    patch_embed = _matmul(tokens, siglip.patch_size**2 * IMAGE_CHANNELS, siglip.width)
    head = _matmul(tokens, siglip.width, llm_width)
    return patch_embed + depth * _siglip_layer_flops(siglip) + head


def _gemma_layer_flops(gemma: GemmaConfig, query_tokens: int, key_tokens: int) -> int:
    """One mixture-transformer layer of one expert for `query_tokens` queries attending `key_tokens` keys."""
    q_dim = gemma.num_heads * gemma.head_dim
    q = _matmul(query_tokens, gemma.width, q_dim)
    kv = _matmul(query_tokens, gemma.width, 2 * gemma.num_kv_heads * gemma.head_dim)
    attention = 2 * _matmul(query_tokens, q_dim, key_tokens)  # logits and probs·V
    out = _matmul(query_tokens, q_dim, gemma.width)
    mlp = _matmul(query_tokens, gemma.width, 2 * gemma.mlp_dim) + _matmul(query_tokens, gemma.mlp_dim, gemma.width)
    return q + kv + attention + out + mlp


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DenoiseStepBreakdown:
    """Where one denoising step's FLOPs go; the expert layers dominate, the adaRMS Dense layers come second."""

    expert_layers: int
    adarms_modulation: int
    time_mlp: int
    action_in_out_proj: int

    @property
    def total(self) -> int:
        return self.expert_layers + self.adarms_modulation + self.time_mlp + self.action_in_out_proj


@dataclasses.dataclass(frozen=True)
class ActorFlops:
    """FLOPs of π0.5's forward pieces for one batch (every field already multiplied by `batch`).

    `siglip_per_image` is one camera slot over the batch; `prefix_total` = SigLIP on all cameras + the LLM over
    the prefix, run once per observation; `denoise_step_total` is one action-expert pass over the suffix.
    """

    batch: int
    depth_override: int | None
    prefix_tokens: int
    suffix_tokens: int
    siglip_per_image: int
    siglip_all_images: int
    paligemma_llm_prefix: int
    prefix_total: int
    denoise_step_total: int
    denoise_step_breakdown: DenoiseStepBreakdown
    sample_actions_10_steps_total: int
    compute_loss_forward_total: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict in the layout of the reference JSON's "analytic" blocks (plus `batch`)."""
        return dataclasses.asdict(self)


def actor_flops(config: Pi05Config, *, batch: int = 1, depth_override: int | None = None) -> ActorFlops:
    """Analytic FLOPs of π0.5 under `config`; `depth_override` sets SigLIP's and both Gemmas' depth.

    The depth override exists to compare with XLA's cost analysis, which counts a scanned layer body once.
    """
    _check_positive(batch=batch)
    if depth_override is not None:
        _check_positive(depth_override=depth_override)
    llm, expert = config.paligemma_config, config.action_expert_config
    siglip_depth = config.siglip.depth if depth_override is None else depth_override
    gemma_depth = llm.depth if depth_override is None else depth_override

    prefix_tokens = config.num_prefix_tokens
    suffix_tokens = config.action_horizon

    siglip_per_image = batch * _siglip_image_flops(config.siglip, llm.width, siglip_depth)
    siglip_all_images = NUM_CAMERAS * siglip_per_image
    paligemma_llm_prefix = batch * gemma_depth * _gemma_layer_flops(llm, prefix_tokens, prefix_tokens)
    prefix_total = siglip_all_images + paligemma_llm_prefix

    # adaRMS Dense(width → 3·width) runs on the per-example conditioning vector, not per token.
    adarms_norms = ADARMS_NORMS_PER_LAYER * gemma_depth + 1
    breakdown = DenoiseStepBreakdown(
        expert_layers=batch * gemma_depth * _gemma_layer_flops(expert, suffix_tokens, prefix_tokens + suffix_tokens),
        adarms_modulation=batch * adarms_norms * _matmul(1, expert.width, 3 * expert.width),
        time_mlp=batch * 2 * _matmul(1, expert.width, expert.width),
        action_in_out_proj=batch * 2 * _matmul(suffix_tokens, config.action_dim, expert.width),
    )
    denoise_step_total = breakdown.total

    return ActorFlops(
        batch=batch,
        depth_override=depth_override,
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        siglip_per_image=siglip_per_image,
        siglip_all_images=siglip_all_images,
        paligemma_llm_prefix=paligemma_llm_prefix,
        prefix_total=prefix_total,
        denoise_step_total=denoise_step_total,
        denoise_step_breakdown=breakdown,
        sample_actions_10_steps_total=prefix_total + 10 * denoise_step_total,
        compute_loss_forward_total=prefix_total + denoise_step_total,
    )


def prefix_flops(config: Pi05Config, batch: int = 1) -> int:
    """FLOPs of one prefix pass (all cameras through SigLIP + PaliGemma LLM): paid once per observation,
    however many noise candidates are then denoised against its KV cache."""
    return actor_flops(config, batch=batch).prefix_total


def denoise_flops(config: Pi05Config, *, num_candidates: int, num_steps: int, batch: int = 1) -> int:
    """FLOPs of denoising `num_candidates` noises for `num_steps` Euler steps against one shared prefix.

    The candidates are extra suffix rows over the same KV cache, so the cost is
    num_candidates · num_steps · denoise_step — the prefix is not repeated (add `prefix_flops` once).
    """
    _check_positive(num_candidates=num_candidates, num_steps=num_steps)
    return num_candidates * num_steps * actor_flops(config, batch=batch).denoise_step_total


def sample_actions_flops(config: Pi05Config, num_steps: int = 10, batch: int = 1) -> int:
    """FLOPs of openpi's `sample_actions`: one prefix pass, then `num_steps` denoising steps of one noise."""
    _check_positive(num_steps=num_steps)
    flops = actor_flops(config, batch=batch)
    return flops.prefix_total + num_steps * flops.denoise_step_total


def compute_loss_flops(config: Pi05Config, batch: int = 1) -> int:
    """FLOPs of the forward of openpi's `compute_loss`: the prefix plus one suffix pass whose action tokens
    attend prefix + suffix keys (the reference's "compute_loss_forward_total"; backward not included)."""
    return actor_flops(config, batch=batch).compute_loss_forward_total


def _gemma_expert_params(gemma: GemmaConfig, *, adaptive_norms: bool) -> int:
    """Parameters of one expert's stacked layers and final norm (no embedder)."""
    q = gemma.num_heads * gemma.width * gemma.head_dim
    kv = 2 * gemma.num_kv_heads * gemma.width * gemma.head_dim
    out = gemma.num_heads * gemma.head_dim * gemma.width
    mlp = 2 * gemma.width * gemma.mlp_dim + gemma.mlp_dim * gemma.width
    # Plain RMSNorm: a scale per channel; adaRMS: Dense(width → 3·width) with bias on the conditioning vector.
    norm = gemma.width * 3 * gemma.width + 3 * gemma.width if adaptive_norms else gemma.width
    per_layer = q + kv + out + mlp + ADARMS_NORMS_PER_LAYER * norm
    return gemma.depth * per_layer + norm


def _siglip_params(siglip: SiglipConfig, llm_width: int) -> int:
    width = siglip.width
    patch_embed = siglip.patch_size**2 * IMAGE_CHANNELS * width + width
    pos_embedding = siglip.num_patches * width
    attention = 4 * (width * width + width)  # query/key/value/out kernels (heads·head_dim = width) and biases
    mlp = width * siglip.mlp_dim + siglip.mlp_dim + siglip.mlp_dim * width + width
    layer_norms = 2 * 2 * width
    encoder_norm = 2 * width
    head = width * llm_width + llm_width
    return patch_embed + pos_embedding + siglip.depth * (attention + mlp + layer_norms) + encoder_norm + head


def param_count(config: Pi05Config) -> dict[str, int]:
    """Analytic parameter count per part, from shapes alone (3,353,433,872 for pi05_libero).

    Parts follow openpi's tree: `paligemma_llm` = PaliGemma/llm expert 0 incl. the embedder, `action_expert` =
    the `*_1` leaves (incl. adaRMS Dense layers), `siglip` = PaliGemma/img incl. head, `projections` =
    action_in/out_proj and time_mlp_in/out.
    """
    llm, expert = config.paligemma_config, config.action_expert_config
    counts = {
        "paligemma_llm": config.vocab_size * llm.width + _gemma_expert_params(llm, adaptive_norms=False),
        "action_expert": _gemma_expert_params(expert, adaptive_norms=True),
        "siglip": _siglip_params(config.siglip, llm.width),
        "projections": (
            config.action_dim * expert.width + expert.width  # action_in_proj
            + expert.width * config.action_dim + config.action_dim  # action_out_proj
            + 2 * (expert.width * expert.width + expert.width)  # time_mlp_in, time_mlp_out
        ),
    }
    counts["total"] = sum(counts.values())
    return counts


__all__ = [
    "ActorFlops",
    "DenoiseStepBreakdown",
    "actor_flops",
    "compute_loss_flops",
    "denoise_flops",
    "param_count",
    "prefix_flops",
    "sample_actions_flops",
]
