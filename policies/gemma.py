"""The two-expert Gemma of π0.5: PaliGemma's LLM for the prefix, an adaRMS action expert for the suffix.

Parameter names and layouts are openpi's (`layers/attn/q_einsum/w`, `_1` = action expert, layers stacked
on axis 0), so openpi checkpoints load unchanged. Every activation carries a candidate axis:
`[batch, cand, tokens, width]`. The prefix runs with cand = 1; the suffix can carry N candidates that all
attend to one shared prefix KV cache of shape `[batch, prefix_len, kv_heads, head_dim]` per layer, so N
denoising candidates cost N suffix passes and never a prefix recompute or a copy of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from faster_vla.policies.config import GemmaConfig

# Masked attention logits, as Gemma sets them (finite, so fully masked rows stay finite).
BIG_NEG = -2.3819763e38

KVCache = tuple[jax.Array, jax.Array]  # keys, values: [layers, batch, prefix_len, kv_heads, head_dim]


def _name(name: str, expert: int) -> str:
    """Expert 0 keeps PaliGemma's names so PaliGemma weights load as they are; expert i gets `_i`."""
    return name if expert == 0 else f"{name}_{expert}"


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """RoPE with the half-split convention; x [..., t, heads, head_dim], positions [..., t] (int)."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    radians = positions[..., None] / timescale  # [..., t, half] float32
    radians = radians[..., None, :]  # [..., t, 1, half]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # float32
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """Plain RMSNorm (cond None) or adaRMS: cond -> (scale, shift, gate); the gate scales the residual."""

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        dtype = x.dtype
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-06))  # float32
        if cond is None:
            scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
            return (normed * (1 + scale)).astype(dtype), None
        # cond [..., width] -> modulation broadcast over the token axis.
        modulation = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype, name="Dense_0")(cond)
        scale, shift, gate = jnp.split(modulation[..., None, :], 3, axis=-1)
        return (normed * (1 + scale) + shift).astype(dtype), gate


class Einsum(nn.Module):
    """A weight `w` of `shape` contracted with x in x's dtype (Gemma's Einsum)."""

    shape: tuple[int, ...]
    init_fn: nn.initializers.Initializer

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param("w", self.init_fn, self.shape)
        return jnp.einsum(eqn, x, w.astype(x.dtype))


class FeedForward(nn.Module):
    """Gated GELU MLP: gelu(x W0) * (x W1) W2, weights cast to x's dtype."""

    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        w_gating = self.param(
            "gating_einsum",
            nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (2, self.features, self.hidden_dim),
        ).astype(dtype)
        activations = nn.gelu(jnp.dot(x, w_gating[0])) * jnp.dot(x, w_gating[1])
        w_linear = self.param(
            "linear", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1), (self.hidden_dim, self.features)
        ).astype(dtype)
        return jnp.dot(activations, w_linear)


class Attention(nn.Module):
    """Joint attention over every expert's tokens, plus (optionally) a shared prefix KV cache.

    xs[i]: [b, c, t_i, width_i] or None. `shared_kv` keys/values [b, s, k, h] are attended by every
    candidate c without being repeated. Returns per-expert outputs and this call's own (k, v)
    [b, c, t, k, h] after RoPE (the cache content when this is the prefix pass).
    """

    configs: Sequence[GemmaConfig]

    @nn.compact
    def __call__(self, xs, positions, mask, shared_kv, shared_mask):
        cfg0 = self.configs[0]
        dtype = next(x.dtype for x in xs if x is not None)
        qs, ks, vs = [], [], []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            if cfg.num_kv_heads == cfg.num_heads:
                qkv = Einsum(
                    (3, cfg.num_heads, cfg.width, cfg.head_dim),
                    nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    name=_name("qkv_einsum", i),
                )("bctd,snde->sbctne", x)
                q, k, v = qkv[0], qkv[1], qkv[2]
            else:
                q = Einsum(
                    (cfg.num_heads, cfg.width, cfg.head_dim),
                    nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                    name=_name("q_einsum", i),
                )("bctd,nde->bctne", x)
                k, v = Einsum(
                    (2, cfg.num_kv_heads, cfg.width, cfg.head_dim),
                    nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    name=_name("kv_einsum", i),
                )("bctd,skde->sbctke", x)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q, k, v = (jnp.concatenate(y, axis=2) for y in (qs, ks, vs))  # [b, c, t, heads, h]

        q = apply_rope(q, positions)
        q *= cfg0.head_dim**-0.5
        k = apply_rope(k, positions)

        b, c, t = q.shape[:3]
        q = q.reshape(b, c, t, cfg0.num_kv_heads, cfg0.num_heads // cfg0.num_kv_heads, cfg0.head_dim)
        logits = jnp.einsum("bctkgh,bcskh->bckgts", q, k, preferred_element_type=jnp.float32)
        full_mask = mask
        if shared_kv is not None:
            shared_logits = jnp.einsum(
                "bctkgh,bskh->bckgts", q, shared_kv[0], preferred_element_type=jnp.float32
            )
            logits = jnp.concatenate([shared_logits, logits], axis=-1)
            full_mask = jnp.concatenate([shared_mask, mask], axis=-1)
        masked = jnp.where(full_mask[:, :, None, None], logits, BIG_NEG)
        probs = jax.nn.softmax(masked, axis=-1).astype(dtype)
        if shared_kv is None:
            encoded = jnp.einsum("bckgts,bcskh->bctkgh", probs, v)
        else:
            s = shared_kv[0].shape[1]
            encoded = jnp.einsum(
                "bckgts,bskh->bctkgh", probs[..., :s], shared_kv[1], preferred_element_type=jnp.float32
            ) + jnp.einsum("bckgts,bcskh->bctkgh", probs[..., s:], v, preferred_element_type=jnp.float32)
            encoded = encoded.astype(dtype)
        encoded = encoded.reshape(b, c, t, cfg0.num_heads, cfg0.head_dim)

        outs = []
        start = 0
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                outs.append(None)
                continue
            end = start + x.shape[2]
            outs.append(
                Einsum(
                    (cfg.num_heads, cfg.head_dim, cfg.width),
                    nn.initializers.lecun_normal(in_axis=(-3, -2), out_axis=-1),
                    name=_name("attn_vec_einsum", i),
                )("bctne,ned->bctd", encoded[:, :, start:end])
            )
            start = end
        return outs, (k, v)


def _gated_residual(x: jax.Array | None, y: jax.Array | None, gate: jax.Array | None) -> jax.Array | None:
    if x is None:
        return None
    return x + y if gate is None else x + y * gate


class Block(nn.Module):
    """One layer of both experts; a scan body: carry = xs, scanned input = this layer's shared KV."""

    configs: Sequence[GemmaConfig]

    @nn.compact
    def __call__(self, xs, shared_kv, positions, mask, shared_mask, adarms_cond):
        normed, gates = [], []
        for i, x in enumerate(xs):
            y, gate = (None, None) if x is None else RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i])
            normed.append(y)
            gates.append(gate)
        attn_out, kv = Attention(self.configs, name="attn")(normed, positions, mask, shared_kv, shared_mask)
        xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attn_out, gates, strict=True)]

        mlp_out, gates = [], []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                mlp_out.append(None)
                gates.append(None)
                continue
            y, gate = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
            mlp_out.append(FeedForward(cfg.width, cfg.mlp_dim, name=_name("mlp", i))(y))
            gates.append(gate)
        xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, mlp_out, gates, strict=True)]
        # Stacked over layers by the scan; under jit, passes that drop it never compute the stack.
        return xs, kv


class Embedder(nn.Module):
    vocab_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:  # int [b, t] -> [b, t, embed_dim]
        table = self.param("input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim))
        x = table[(tokens,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)


class MixtureGemma(nn.Module):
    """Gemma layers shared by the experts; expert 1 uses adaRMS when `adarms` is set."""

    configs: Sequence[GemmaConfig]
    vocab_size: int
    dtype: str

    def setup(self) -> None:
        self.embedder = Embedder(self.vocab_size, self.configs[0].width, name="embedder")
        self.final_norms = [RMSNorm(name=_name("final_norm", i)) for i in range(len(self.configs))]
        block = nn.remat(Block, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.configs[0].depth,
        )(configs=self.configs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Prompt tokens [b, t] -> embeddings [b, t, width0] in the compute dtype."""
        return self.embedder(tokens).astype(self.dtype)

    def __call__(
        self,
        xs: Sequence[jax.Array | None],  # per expert [b, c, t_i, width_i] or None
        positions: jax.Array,  # [b, c|1, t]
        mask: jax.Array,  # [b, c|1, t, t] bool, own-token attention
        adarms_cond: Sequence[jax.Array | None],  # per expert [b, c, width_i] or None
        shared_kv: KVCache | None = None,  # [layers, b, s, k, h]
        shared_mask: jax.Array | None = None,  # [b, c|1, t, s] bool
    ) -> tuple[list[jax.Array | None], KVCache]:
        """Returns per-expert final-normed outputs and this pass's own keys/values [layers, b, c, t, k, h]."""
        xs = [None if x is None else x.astype(self.dtype) for x in xs]
        xs, kv = self.layers(xs, shared_kv, positions, mask, shared_mask, adarms_cond)
        outs = [None if x is None else norm(x, cond)[0] for norm, x, cond in zip(self.final_norms, xs, adarms_cond)]
        return outs, kv

    def init_all(self, use_adarms: Sequence[bool]) -> None:
        """Touches every parameter once (linen creates parameters lazily)."""
        self.embed(jnp.zeros((1, 1), jnp.int32))
        n = len(self.configs)
        self(
            [jnp.zeros((1, 1, 1, c.width)) for c in self.configs],
            jnp.zeros((1, 1, n), jnp.int32),
            jnp.zeros((1, 1, n, n), bool),
            [jnp.zeros((1, 1, c.width)) if u else None for u, c in zip(use_adarms, self.configs, strict=True)],
        )
