"""Critic networks of FASTER-EXPO: the action-chunk critic Q^a(s, a) and the noise critic Q^dn(s, ε).

Both are one state encoder (encoders.py) shared by an ensemble of LayerNorm MLP members (RLPD/EXPO
critics). The encoder is shared, not per member, as in EXPO on π0.5: per-member encoders would multiply its
cost by the member count (10 ResNet-34s for the image kind) while the members still disagree through their
independently initialised heads, which is what the min-of-a-random-pair pessimism needs.

Sizes at pi05_libero scale (backbone features 4096 + state 8; chunk 10×7 = 70; noise 10×32 = 320), with the
defaults below (10 members of hidden (768, 768), projection to 1024):

| network | backbone encoder | image encoder |
|---|---|---|
| NoiseCritic | 20,971,594 | 38,050,698 |
| NoiseCritic, time_conditioned | 21,217,354 | 38,296,458 |
| ChunkCritic | 19,051,594 | 36,130,698 |

(encoder 4,206,144 / 21,285,248; the ensemble head 16,765,450 either way.) The design card sizes the noise
critic at ≈ 20M (paper §4.4: "the critic has 20M parameters versus the actor's 3.3B"); 768-wide two-layer
members give that with the backbone encoder (`PI05_LIBERO_NOISE_CRITIC`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.critics.encoders import PI05_LIBERO_ENCODER, EncoderConfig, make_encoder
from faster_vla.policies.pi05 import posemb_sincos

Params = Any


def default_init(scale: float = float(np.sqrt(2))) -> Callable:
    """Orthogonal init, as jaxrl5/RLPD/EXPO use for their critics."""
    return nn.initializers.orthogonal(scale)


class MLP(nn.Module):
    """Dense → LayerNorm → activation per hidden layer (RLPD/EXPO critic body); the LayerNorm is what keeps
    high-UTD critics from diverging. `activate_final` False leaves the last layer linear (no norm)."""

    hidden_dims: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    activate_final: bool = True
    use_layer_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, kernel_init=default_init(), name=f"dense{i}")(x)
            if i + 1 < len(self.hidden_dims) or self.activate_final:
                if self.use_layer_norm:
                    x = nn.LayerNorm(name=f"norm{i}")(x)
                x = self.activation(x)
        return x


class ValueHead(nn.Module):
    """One ensemble member: MLP over [..., D] → scalar value [...]."""

    hidden_dims: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = MLP(self.hidden_dims, activate_final=True, name="mlp")(x)
        return nn.Dense(1, kernel_init=default_init(1.0), name="out")(x)[..., 0]


class Ensemble(nn.Module):
    """`num` independently initialised copies of `net_cls` on the same inputs; params and outputs stacked on
    axis 0 (nn.vmap with split param rngs), so one member is `tree_map(lambda p: p[i], params)`."""

    net_cls: Callable[..., nn.Module]
    num: int = 10

    @nn.compact
    def __call__(self, *args):
        ensemble = nn.vmap(
            self.net_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num,
        )
        return ensemble(name="members")(*args)


@dataclasses.dataclass(frozen=True)
class ChunkCriticConfig:
    """Q^a(s, a_chunk): encoder + `num_members` MLPs over (embedding, flattened normalised chunk [h·A])."""

    encoder: EncoderConfig = PI05_LIBERO_ENCODER
    chunk_shape: tuple[int, int] = (10, 7)  # (horizon h, action dim A); LIBERO: 10 steps × 7
    hidden_dims: tuple[int, ...] = (768, 768)
    num_members: int = 10

    def __post_init__(self) -> None:
        if self.num_members < 2:
            raise ValueError(f"num_members must be >= 2 (min over a random pair), got {self.num_members}")


@dataclasses.dataclass(frozen=True)
class NoiseCriticConfig:
    """Q^dn(s, ε): encoder + `num_members` MLPs over (embedding, flattened noise [h·A_model]).

    `time_conditioned` adds sin/cos features of the denoising time t (openpi's convention: t = 1 is the
    initial noise, t → 0 the action) and then takes x_t in place of ε: the step-conditioned filter of paper
    §4.1–4.2. Off by default: §4.3 filters only at t = T, where the feature would be a constant.
    """

    encoder: EncoderConfig = PI05_LIBERO_ENCODER
    noise_shape: tuple[int, int] = (10, 32)  # π0.5's noise: horizon × model action dim
    hidden_dims: tuple[int, ...] = (768, 768)
    num_members: int = 10
    time_conditioned: bool = False
    time_embed_dim: int = 32

    def __post_init__(self) -> None:
        if self.num_members < 2:
            raise ValueError(f"num_members must be >= 2 (min over a random pair), got {self.num_members}")
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")


PI05_LIBERO_CHUNK_CRITIC = ChunkCriticConfig()
PI05_LIBERO_NOISE_CRITIC = NoiseCriticConfig()


def _broadcast_embedding(emb: jax.Array, x: jax.Array, batch_ndim: int) -> jax.Array:
    """Concatenate emb [B, E] with x [B, *cands, D] (emb repeated over the candidate axes) → [B, *cands, E + D]."""
    cands = x.shape[1:batch_ndim]
    emb = jnp.broadcast_to(emb.reshape(emb.shape[0], *(1,) * len(cands), emb.shape[-1]),
                           (emb.shape[0], *cands, emb.shape[-1]))
    return jnp.concatenate([emb, x], axis=-1)


class _EncodedEnsemble(nn.Module):
    """One state encoder shared by `config.num_members` value heads (both critics are built this way)."""

    def setup(self) -> None:
        cfg = self.config
        self.encoder = make_encoder(cfg.encoder)
        self.ensemble = Ensemble(_value_head(cfg.hidden_dims), num=cfg.num_members)

    def encode(self, inputs: dict) -> jax.Array:
        """State embedding [B, E] (e.g. for an edit policy that reuses this encoder)."""
        return self.encoder(inputs)


class ChunkCritic(_EncodedEnsemble):
    """Q^a(s, a_chunk) → q [E, B, *cands].

    `chunk` is [B, h, A] or [B, *cands, h, A] (e.g. the 2N best-of-N candidates of one state): the state is
    encoded once per row and broadcast over the candidates.
    """

    config: ChunkCriticConfig = PI05_LIBERO_CHUNK_CRITIC

    def __call__(self, inputs: dict, chunk: jax.Array) -> jax.Array:
        h, a = self.config.chunk_shape
        if chunk.ndim < 3 or chunk.shape[-2:] != (h, a):
            raise ValueError(f"chunk must be [B, ..., {h}, {a}], got {chunk.shape}")
        flat = chunk.reshape(*chunk.shape[:-2], h * a).astype(jnp.float32)  # [B, *cands, h·A]
        x = _broadcast_embedding(self.encode(inputs), flat, flat.ndim - 1)
        return self.ensemble(x)


class NoiseCritic(_EncodedEnsemble):
    """Q^dn(s, ε) for N seeds per state: noise [B, N, h, A_model] or [B, N, h·A_model] → q [E, B, N].

    The state is encoded once and broadcast over the N seeds, so scoring N seeds costs one encoder pass and
    N head passes. With `time_conditioned`, pass x_t as `noise` and its time `t` (scalar, [B] or [B, N];
    default 1.0, the initial noise).
    """

    config: NoiseCriticConfig = PI05_LIBERO_NOISE_CRITIC

    def __call__(self, inputs: dict, noise: jax.Array, t: jax.Array | float | None = None) -> jax.Array:
        cfg = self.config
        d = cfg.noise_shape[0] * cfg.noise_shape[1]
        flat = noise.reshape(*noise.shape[:2], -1).astype(jnp.float32) if noise.ndim >= 3 else noise
        if flat.ndim != 3 or flat.shape[-1] != d:
            raise ValueError(f"noise must be [B, N, {cfg.noise_shape[0]}, {cfg.noise_shape[1]}] or [B, N, {d}], "
                             f"got {noise.shape}")
        b, n = flat.shape[:2]
        if cfg.time_conditioned:
            t = jnp.asarray(1.0 if t is None else t, jnp.float32)
            t = jnp.broadcast_to(t.reshape(t.shape + (1,) * (2 - t.ndim)) if t.ndim else t, (b, n))
            # π0's time embedding periods, so t resolves like the actor's own conditioning.
            flat = jnp.concatenate([flat, posemb_sincos(t, cfg.time_embed_dim, 4e-3, 4.0)], axis=-1)
        elif t is not None:
            raise ValueError("t given but config.time_conditioned is False")
        x = _broadcast_embedding(self.encode(inputs), flat, 2)  # [B, N, E + D]
        return self.ensemble(x)  # [E, B, N]


def _value_head(hidden_dims: Sequence[int]) -> Callable[..., nn.Module]:
    return functools.partial(ValueHead, hidden_dims=tuple(hidden_dims))


def random_member_pair(rng: jax.Array, num_members: int) -> jax.Array:
    """Two distinct member indices int32 [2], uniformly among the num_members·(num_members−1) ordered pairs."""
    if num_members < 2:
        raise ValueError(f"need at least 2 members, got {num_members}")
    return jax.random.choice(rng, num_members, (2,), replace=False)


def min_of_random_pair(q: jax.Array, rng: jax.Array) -> jax.Array:
    """Pessimistic value q [E, ...] → [...]: the elementwise min of two distinct random members.

    One pair per call (shared by the whole batch), as RLPD/EXPO subsample their target ensemble.
    """
    i, j = random_member_pair(rng, q.shape[0])
    return jnp.minimum(q[i], q[j])


def polyak(target: Params, online: Params, tau: float) -> Params:
    """Soft target update: target ← τ·online + (1 − τ)·target, leaf by leaf."""
    return jax.tree_util.tree_map(lambda t, o: (tau * o + (1.0 - tau) * t).astype(t.dtype), target, online)


def count_params(params: Params) -> int:
    """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))


def param_shapes(module: nn.Module, *example_args) -> Params:
    """The module's param tree as ShapeDtypeStructs, computed by jax.eval_shape (no array is allocated).

    `example_args` may themselves be ShapeDtypeStructs (e.g. `EncoderConfig.example_inputs(1, shapes_only=True)`).
    """
    return jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *example_args)["params"]
