"""EXPO's edit policy and its temperature: a tanh-Gaussian over a small edit of the base action chunk.

The base policy (π0.5, denoising the seed FASTER picked) proposes a chunk; the edit policy adds
β·tanh(u), u ~ N(μ(s, a_base), σ(s, a_base)²), over the flattened chunk [h·A], and clips to the action
bounds. β (0.2 on pi05_libero, paper appendix B) keeps the edited chunk near the base policy's support.
The policy maximises the mean over ALL critic members of Q(s, a_base + edit) with a SAC entropy bonus whose
weight α is tuned to a target entropy of −|A|/2 (|A| = h·A), measured either on the edit β·y (the FASTER and
EXPO authors' default) or on the tanh sample y; the two differ by |A|·log β (`temperature_loss`).

Size at pi05_libero (chunk 10×7, hidden (256, 256)): 4,607,692 parameters with its own backbone encoder,
21,686,796 with its own image encoder, 401,548 with `own_encoder=False` (the critic's embedding passed in).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.critics.encoders import PI05_LIBERO_ENCODER, EncoderConfig, make_encoder
from faster_vla.critics.networks import MLP, default_init

Params = Any
Bound = float | tuple[float, ...]

_LOG_2PI = float(np.log(2 * np.pi))


@dataclasses.dataclass(frozen=True)
class EditPolicyConfig:
    """Edit policy over the flattened chunk [h·A], conditioned on (state embedding, state, base chunk).

    `own_encoder` False drops the policy's encoder: the caller then passes `inputs["embedding"]` [B, E]
    (e.g. `stop_gradient(critic.encode(...))`, as DrQ-style pixel agents share the critic's encoder).
    `action_low/high`: bounds of the normalised chunk (a float, or one value per action dim).
    """

    encoder: EncoderConfig = PI05_LIBERO_ENCODER
    chunk_shape: tuple[int, int] = (10, 7)  # (h, A)
    hidden_dims: tuple[int, ...] = (256, 256)  # EXPO's actor width
    beta: float = 0.2  # edit scale
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    action_low: Bound = -1.0
    action_high: Bound = 1.0
    own_encoder: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.beta:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"log_std_min {self.log_std_min} must be < log_std_max {self.log_std_max}")

    @property
    def flat_dim(self) -> int:
        """|A| = h·A, the dimension the edit lives in."""
        return self.chunk_shape[0] * self.chunk_shape[1]

    @property
    def target_entropy(self) -> float:
        """EXPO's target entropy −|A|/2, in whichever space the learner measures α's entropy (see
        `temperature_loss` and `LearnerConfig.alpha_entropy`)."""
        return -self.flat_dim / 2.0


PI05_LIBERO_EDIT_POLICY = EditPolicyConfig()


def _log1m_tanh_sq(u: jax.Array) -> jax.Array:
    """log(1 − tanh(u)²), stable for large |u|: 2·(log 2 − u − softplus(−2u))."""
    return 2.0 * (np.log(2.0) - u - jax.nn.softplus(-2.0 * u))


@flax.struct.dataclass
class TanhGaussian:
    """y = tanh(u), u ~ N(mean, exp(log_std)²), independent over the last axis [..., D]."""

    mean: jax.Array
    log_std: jax.Array

    def _log_prob_pre_tanh(self, u: jax.Array) -> jax.Array:
        z = (u - self.mean) * jnp.exp(-self.log_std)
        gauss = -0.5 * z**2 - self.log_std - 0.5 * _LOG_2PI
        return jnp.sum(gauss - _log1m_tanh_sq(u), axis=-1)  # change of variables: p(y) = p(u)/|dy/du|

    def sample(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Reparameterised draw: (y [..., D] in (−1, 1), log p(y) [...]), the log-prob computed from u exactly."""
        u = self.mean + jnp.exp(self.log_std) * jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return jnp.tanh(u), self._log_prob_pre_tanh(u)

    def log_prob(self, y: jax.Array) -> jax.Array:
        """log p(y) [...] for y [..., D] in (−1, 1) (clipped 1e-6 inside the open interval before atanh)."""
        u = jnp.arctanh(jnp.clip(y, -1.0 + 1e-6, 1.0 - 1e-6))
        return self._log_prob_pre_tanh(u)

    def mode(self) -> jax.Array:
        """tanh(mean): the deterministic edit direction."""
        return jnp.tanh(self.mean)


def apply_edit(base_chunk: jax.Array, tanh_sample: jax.Array, beta: float, low: Bound = -1.0,
               high: Bound = 1.0) -> jax.Array:
    """clip(base [..., h, A] + β·tanh_sample [..., h·A], low, high) → [..., h, A]."""
    edit = beta * tanh_sample.reshape(base_chunk.shape)
    return jnp.clip(base_chunk + edit, jnp.asarray(low, base_chunk.dtype), jnp.asarray(high, base_chunk.dtype))


class EditPolicy(nn.Module):
    """π_edit(· | s, a_base) → TanhGaussian over [B, h·A] (log-std clipped to [log_std_min, log_std_max])."""

    config: EditPolicyConfig = PI05_LIBERO_EDIT_POLICY

    def setup(self) -> None:
        cfg = self.config
        if cfg.own_encoder:
            self.encoder = make_encoder(cfg.encoder)
        self.mlp = MLP(cfg.hidden_dims, activate_final=True)
        self.mean_head = nn.Dense(cfg.flat_dim, kernel_init=default_init(1.0))
        self.log_std_head = nn.Dense(cfg.flat_dim, kernel_init=default_init(1.0))

    def __call__(self, inputs: dict, base_chunk: jax.Array) -> TanhGaussian:
        cfg = self.config
        h, a = cfg.chunk_shape
        if base_chunk.shape[-2:] != (h, a) or base_chunk.ndim != 3:
            raise ValueError(f"base_chunk must be [B, {h}, {a}], got {base_chunk.shape}")
        emb = self.encoder(inputs) if cfg.own_encoder else inputs["embedding"]  # [B, E]
        state = inputs["state"].astype(jnp.float32)  # [B, S]
        flat = base_chunk.reshape(base_chunk.shape[0], h * a).astype(jnp.float32)  # [B, h·A]
        x = self.mlp(jnp.concatenate([emb, state, flat], axis=-1))
        log_std = jnp.clip(self.log_std_head(x), cfg.log_std_min, cfg.log_std_max)
        return TanhGaussian(mean=self.mean_head(x), log_std=log_std)

    def sample_edit(self, inputs: dict, base_chunk: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(edited chunk [B, h, A] within the bounds, tanh-space log-prob [B]) for acting or a TD target."""
        y, log_prob = self(inputs, base_chunk).sample(rng)
        cfg = self.config
        return apply_edit(base_chunk, y, cfg.beta, cfg.action_low, cfg.action_high), log_prob


class Temperature(nn.Module):
    """SAC temperature α = exp(log_alpha), one scalar parameter; α starts at `init_value` (EXPO: 1.0)."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self) -> jax.Array:
        log_alpha = self.param("log_alpha", lambda _: jnp.asarray(np.log(self.init_value), jnp.float32))
        return jnp.exp(log_alpha)


CriticFn = Callable[[dict, jax.Array], jax.Array]  # (inputs, chunk [B, h, A]) -> q [E, B]


def edit_policy_loss(
    policy_params: Params,
    policy: EditPolicy,
    critic_fn: CriticFn,
    inputs: dict,
    base_chunk: jax.Array,
    rng: jax.Array,
    alpha: jax.Array | float,
) -> tuple[jax.Array, dict]:
    """EXPO's edit loss: mean_B[ α·(log π − |A|·log β) − mean_E Q_e(s, clip(a_base + β·y)) ].

    `base_chunk` [B, h, A] is the REPLAY chunk of the batch (EXPO trains the edit on replay actions, not on
    fresh base-policy samples). `critic_fn` returns every member, q [E, B]; all members are averaged (not a
    min of two). α is a constant here (stop-gradient). The −|A|·log β term turns log π of the tanh sample
    into the log-density of the edit β·y; it is constant in the policy params and only shifts the loss.
    Returns (loss, info) with info["log_prob"] [B] the tanh-space log π (subtract |A|·log β for the edit's,
    as `temperature_loss` is given it by default).
    """
    cfg = policy.config
    dist = policy.apply(policy_params, inputs, base_chunk)
    y, log_prob = dist.sample(rng)  # [B, h·A], [B]
    edited = apply_edit(base_chunk, y, cfg.beta, cfg.action_low, cfg.action_high)
    q = critic_fn(inputs, edited)  # [E, B]
    if q.ndim != 2 or q.shape[1] != base_chunk.shape[0]:
        raise ValueError(f"critic_fn must return q [E, B], got {q.shape}")
    q_mean = jnp.mean(q, axis=0)  # [B]
    edit_log_prob = log_prob - cfg.flat_dim * np.log(cfg.beta)
    alpha = jax.lax.stop_gradient(jnp.asarray(alpha, jnp.float32))
    loss = jnp.mean(alpha * edit_log_prob - q_mean)
    info = {
        "edit_loss": loss,
        "edit_q": jnp.mean(q_mean),
        "edit_entropy": -jnp.mean(edit_log_prob),  # entropy of the edit β·y (edit space)
        "edit_abs": jnp.mean(jnp.abs(edited - base_chunk)),
        "log_prob": log_prob,
    }
    return loss, info


def temperature_loss(log_alpha: jax.Array, log_prob: jax.Array, target_entropy: float) -> jax.Array:
    """α·sg(H − H_target), H = −mean(log_prob): descending on log α lowers α when the entropy is above target.

    Which log π is passed decides what α does. The FASTER and EXPO authors' default passes the edit's
    log-density, log π − |A|·log β (`edit_policy_loss`'s tanh-space log π shifted), against −|A|/2. Passing the tanh
    sample's log π against the same −|A|/2 is NOT the same target: it equals their edit-space form against
    −|A|/2 + |A|·log β (their `adjust_target_entropy` option), |A|·log(1/β) nats lower (112.7 at |A| = 70,
    β = 0.2). The edit's entropy is at most |A|·log 2β, so in edit space with β < e^{-1/2}/2 ≈ 0.303 the
    target is out of reach and α rises at every step; in tanh space it decays once the edits are broad.
    """
    entropy = -jnp.mean(log_prob)
    return jnp.exp(log_alpha) * jax.lax.stop_gradient(entropy - target_entropy)
