"""π0.5 (openpi's `Pi0` with `pi05=True`) and the frozen-backbone actor FASTER needs.

`Pi05Actor` splits openpi's `sample_actions` at the seam FASTER exploits: `encode` runs the VLM prefix once
per observation (SigLIP + PaliGemma, ~98 % of the FLOPs at pi05_libero scale) and keeps its KV cache and
pooled features; `denoise` runs only the action expert for any number of noise candidates per observation,
all attending to that one cache. `sample_actions` is `encode` + `denoise` with one candidate, so every
caller (parity tests, critics, serving) runs the same code as the 3.3B model with a smaller config.

Why one file of ~500 lines: the model, its adapter (encode once, denoise many) and the flow loss are
openpi's pi0.py in our terms; kept together so a diff against openpi's stays readable.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.policies.config import (
    IMAGE_KEYS,
    PI05_LIBERO,
    PI05_SMALL,
    TINY_A,
    GemmaConfig,
    Pi05Config,
    SiglipConfig,
    get_preset,
)
from faster_vla.policies.checkpoint import restore_params
from faster_vla.policies.gemma import KVCache, MixtureGemma
from faster_vla.policies.image_tools import resize_with_pad
from faster_vla.policies.siglip import Siglip

__all__ = [
    "IMAGE_KEYS",
    "PI05_LIBERO",
    "PI05_SMALL",
    "TINY_A",
    "GemmaConfig",
    "Observation",
    "Pi05Actor",
    "Pi05Config",
    "Prefix",
    "SiglipConfig",
    "Trajectory",
    "euler_times",
    "get_preset",
    "init_params",
    "load_openpi",
    "make_attn_mask",
    "param_shapes",
    "posemb_sincos",
]

Params = dict[str, Any]


@flax.struct.dataclass
class Observation:
    """Model inputs in openpi's layout. Images float32 in [-1, 1], [b, h, w, 3]; masks bool [b]."""

    images: dict[str, jax.Array]
    image_masks: dict[str, jax.Array]
    state: jax.Array  # [b, state_dim]
    tokenized_prompt: jax.Array | None = None  # int32 [b, max_token_len]
    tokenized_prompt_mask: jax.Array | None = None  # bool [b, max_token_len]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observation:
        """openpi's dict form ('image', 'image_mask', 'state', ...); uint8 images become [-1, 1] float32."""
        if ("tokenized_prompt" in data) != ("tokenized_prompt_mask" in data):
            raise ValueError("tokenized_prompt and tokenized_prompt_mask must be given together")
        images = {
            key: image.astype(np.float32) / 255.0 * 2.0 - 1.0 if image.dtype == np.uint8 else image
            for key, image in data["image"].items()
        }
        return cls(
            images=images,
            image_masks=dict(data["image_mask"]),
            state=data["state"],
            tokenized_prompt=data.get("tokenized_prompt"),
            tokenized_prompt_mask=data.get("tokenized_prompt_mask"),
        )


@flax.struct.dataclass
class Prefix:
    """What `encode` computed once per observation, shared by every candidate `denoise` runs.

    `kv_cache` keys/values are post-RoPE, [layers, b, prefix_len, kv_heads, head_dim] in the compute
    dtype; `mask` [b, prefix_len] marks valid tokens. `pooled` (masked mean of the final-normed prefix
    hidden states) and `last_token` (the last valid token's state) are float32 [b, width] critic features.
    """

    kv_cache: KVCache
    mask: jax.Array
    pooled: jax.Array
    last_token: jax.Array

    @property
    def features(self) -> jax.Array:
        """Critic input [b, 2 * width]: pooled mean and last valid token, concatenated."""
        return jnp.concatenate([self.pooled, self.last_token], axis=-1)


@flax.struct.dataclass
class Trajectory:
    """Every Euler step of a denoise: `x_t[k]` is the state at `t[k]`; the last entry is the action (t ≈ 0)."""

    x_t: jax.Array  # [steps + 1, b, n, horizon, action_dim]
    t: jax.Array  # [steps + 1]


def make_attn_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """big_vision's rule: i attends j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid. -> [b, t, t]."""
    mask_ar = jnp.broadcast_to(mask_ar, input_mask.shape)
    cumsum = jnp.cumsum(mask_ar, axis=1)
    attn = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] * input_mask[:, :, None]
    return jnp.logical_and(attn, valid)


def posemb_sincos(pos: jax.Array, embedding_dim: int, min_period: float, max_period: float) -> jax.Array:
    """Sine-cosine embedding of scalar positions [...] -> [..., embedding_dim] (π0's time embedding)."""
    if embedding_dim % 2:
        raise ValueError(f"embedding_dim ({embedding_dim}) must be even")
    fraction = jnp.linspace(0.0, 1.0, embedding_dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    sinusoid = pos[..., None] * (1.0 / period * 2 * jnp.pi)
    return jnp.concatenate([jnp.sin(sinusoid), jnp.cos(sinusoid)], axis=-1)


def euler_times(num_steps: int) -> np.ndarray:
    """Times [num_steps + 1] of openpi's Euler loop: 1.0 then repeated float32 `t + dt`, dt = -1/num_steps.

    Accumulated exactly as openpi's while loop does, so starting a denoise at step k resumes a full run.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = np.float32(-1.0 / num_steps)
    times = [np.float32(1.0)]
    for _ in range(num_steps):
        times.append(np.float32(times[-1] + dt))
    return np.asarray(times, np.float32)


class _PaliGemma(nn.Module):
    config: Pi05Config

    def setup(self) -> None:
        cfg = self.config
        self.llm = MixtureGemma([cfg.paligemma_config, cfg.action_expert_config], cfg.vocab_size, cfg.dtype)
        self.img = Siglip(cfg.siglip, cfg.paligemma_config.width, cfg.dtype)


class Pi05Module(nn.Module):
    """The network; parameter tree identical to openpi's Pi0(pi05=True) pure dict."""

    config: Pi05Config

    def setup(self) -> None:
        width = self.config.action_expert_config.width
        self.PaliGemma = _PaliGemma(self.config)
        self.action_in_proj = nn.Dense(width)
        self.time_mlp_in = nn.Dense(width)
        self.time_mlp_out = nn.Dense(width)
        self.action_out_proj = nn.Dense(self.config.action_dim)

    def embed_prefix(self, obs: Observation) -> tuple[jax.Array, jax.Array]:
        """-> tokens [b, s, width], valid mask [b, s]. All prefix tokens attend each other (ar all False)."""
        tokens, masks = [], []
        for key in IMAGE_KEYS:
            image_tokens = self.PaliGemma.img(obs.images[key])
            tokens.append(image_tokens)
            masks.append(jnp.broadcast_to(obs.image_masks[key][:, None], image_tokens.shape[:2]))
        if obs.tokenized_prompt is not None:
            tokens.append(self.PaliGemma.llm.embed(obs.tokenized_prompt))
            masks.append(obs.tokenized_prompt_mask)
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)

    def embed_suffix(self, x_t: jax.Array, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x_t [..., horizon, action_dim], time [...] -> action tokens [..., horizon, w], adaRMS cond [..., w]."""
        tokens = self.action_in_proj(x_t)
        emb = posemb_sincos(time, self.action_in_proj.features, min_period=4e-3, max_period=4.0)
        cond = nn.swish(self.time_mlp_out(nn.swish(self.time_mlp_in(emb))))
        return tokens, cond

    def encode(self, obs: Observation) -> tuple[jax.Array, KVCache, jax.Array]:
        """Prefix pass -> final hidden [b, s, w], KV cache [layers, b, s, k, h], mask [b, s]."""
        tokens, mask = self.embed_prefix(obs)
        attn = make_attn_mask(mask, jnp.zeros(mask.shape[1], bool))
        positions = jnp.cumsum(mask, axis=1) - 1
        (out, _), (k, v) = self.PaliGemma.llm(
            [tokens[:, None], None], positions[:, None], attn[:, None], [None, None]
        )
        return out[:, 0], (k[:, :, 0], v[:, :, 0]), mask

    def velocity(self, kv_cache: KVCache, prefix_mask: jax.Array, x_t: jax.Array, time: jax.Array) -> jax.Array:
        """Suffix pass for n candidates sharing one prefix: x_t [b, n, h, a], time [b, n] -> v [b, n, h, a]."""
        tokens, cond = self.embed_suffix(x_t, time)
        b, _, horizon = tokens.shape[:3]
        # Suffix tokens see every valid prefix token and each other (ar = [True, False, ...]).
        shared_mask = jnp.broadcast_to(prefix_mask[:, None, None, :], (b, 1, horizon, prefix_mask.shape[1]))
        own_mask = jnp.ones((b, 1, horizon, horizon), bool)
        positions = jnp.sum(prefix_mask, axis=-1)[:, None, None] + jnp.arange(horizon)[None, None, :]
        (_, out), _ = self.PaliGemma.llm(
            [None, tokens], positions, own_mask, [None, cond], shared_kv=kv_cache, shared_mask=shared_mask
        )
        return self.action_out_proj(out)

    def joint_velocity(self, obs: Observation, x_t: jax.Array, time: jax.Array) -> jax.Array:
        """Training pass: prefix and suffix in one joint forward, x_t [b, h, a], time [b] -> v [b, h, a]."""
        prefix_tokens, prefix_mask = self.embed_prefix(obs)
        suffix_tokens, cond = self.embed_suffix(x_t, time)
        horizon = suffix_tokens.shape[1]
        mask = jnp.concatenate([prefix_mask, jnp.ones(suffix_tokens.shape[:2], bool)], axis=1)
        ar = jnp.concatenate([jnp.zeros(prefix_mask.shape[1], bool), jnp.arange(horizon) == 0])
        attn = make_attn_mask(mask, ar)
        positions = jnp.cumsum(mask, axis=1) - 1
        (_, out), _ = self.PaliGemma.llm(
            [prefix_tokens[:, None], suffix_tokens[:, None]], positions[:, None], attn[:, None], [None, cond[:, None]]
        )
        return self.action_out_proj(out[:, 0])

    def init_all(self, obs: Observation) -> None:
        """Touches every parameter once (linen creates parameters lazily)."""
        self.PaliGemma.llm.init_all([False, True])
        self.embed_prefix(obs)
        horizon, dim = self.config.action_horizon, self.config.action_dim
        self.embed_suffix(jnp.zeros((1, horizon, dim)), jnp.ones((1,)))
        self.action_out_proj(jnp.zeros((1, horizon, self.config.action_expert_config.width)))


def fake_observation(config: Pi05Config, batch: int = 1) -> Observation:
    """An all-zero observation of the right shapes (for initialisation and shape checks)."""
    size = config.siglip.image_size
    return Observation(
        images={k: jnp.zeros((batch, size, size, 3), jnp.float32) for k in IMAGE_KEYS},
        image_masks={k: jnp.ones((batch,), bool) for k in IMAGE_KEYS},
        state=jnp.zeros((batch, config.action_dim), jnp.float32),
        tokenized_prompt=jnp.zeros((batch, config.max_token_len), jnp.int32),
        tokenized_prompt_mask=jnp.ones((batch, config.max_token_len), bool),
    )


def _init(config: Pi05Config, rng: jax.Array) -> Params:
    obs = fake_observation(config)
    return Pi05Module(config).init(rng, obs, method=Pi05Module.init_all)["params"]


def param_shapes(config: Pi05Config) -> Params:
    """Nested dict of jax.ShapeDtypeStruct: the exact tree openpi's checkpoints hold for `config` (no compute)."""
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


def init_params(config: Pi05Config, rng: jax.Array | int = 0) -> Params:
    """Randomly initialised float32 parameters, with openpi's initialisers (zero SigLIP head and adaRMS)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    return jax.jit(functools.partial(_init, config))(rng)


class Pi05Actor:
    """π0.5 with fixed parameters, split at the prefix/suffix seam (see the module docstring).

    Parameters are an argument of every jitted function, never a constant folded into the program, so a
    3.3B model compiles once and its weights are not copied. Unless `trainable`, `stop_gradient` guards the
    parameters: critics can differentiate through actions without a gradient ever reaching the actor.
    `loss` is the one differentiable entry point, for callers that do fine-tune (they pass params).
    """

    def __init__(self, config: Pi05Config, params: Params, *, trainable: bool = False) -> None:
        self.config = config
        self.params = params
        self.trainable = trainable
        module = Pi05Module(config)
        guard = (lambda p: p) if trainable else jax.lax.stop_gradient

        def encode(params: Params, obs: Observation) -> Prefix:
            hidden, kv_cache, mask = module.apply({"params": guard(params)}, obs, method=Pi05Module.encode)
            hidden = hidden.astype(jnp.float32)
            weights = mask[..., None].astype(jnp.float32)
            pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
            last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
            last_token = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
            return Prefix(kv_cache=kv_cache, mask=mask, pooled=pooled, last_token=last_token)

        def denoise(
            params: Params,
            prefix: Prefix,
            x: jax.Array,
            num_steps: int,
            start_step: int,
            return_intermediates: bool,
            end_step: int,
        ) -> jax.Array | tuple[jax.Array, Trajectory]:
            params = {"params": guard(params)}
            times = euler_times(num_steps)
            dt = -1.0 / num_steps

            def step(x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
                time = jnp.broadcast_to(t, x_t.shape[:2])
                v_t = module.apply(params, prefix.kv_cache, prefix.mask, x_t, time, method=Pi05Module.velocity)
                return x_t + dt * v_t, x_t

            x_end, history = jax.lax.scan(step, x, jnp.asarray(times[start_step:end_step]))
            if not return_intermediates:
                return x_end
            trajectory = Trajectory(x_t=jnp.concatenate([history, x_end[None]]),
                                    t=jnp.asarray(times[start_step : end_step + 1]))
            return x_end, trajectory

        def loss(
            params: Params,
            obs: Observation,
            actions: jax.Array,
            noise: jax.Array | None,
            time: jax.Array | None,
            rng: jax.Array | None,
        ) -> jax.Array:
            if noise is None or time is None:
                # Drawn inside the compiled function, as openpi does: jit and eager differ in the last ulp.
                _, noise_rng, time_rng = jax.random.split(rng, 3)
                if noise is None:
                    noise = jax.random.normal(noise_rng, actions.shape)
                if time is None:
                    time = jax.random.beta(time_rng, 1.5, 1, actions.shape[:-2]) * 0.999 + 0.001
            t = time[..., None, None]
            x_t = t * noise + (1 - t) * actions
            v_t = module.apply({"params": params}, obs, x_t, time, method=Pi05Module.joint_velocity)
            return jnp.mean(jnp.square(v_t - (noise - actions)), axis=-1)

        self._encode = jax.jit(encode)
        self._denoise = jax.jit(denoise, static_argnums=(3, 4, 5, 6))
        self._loss = jax.jit(loss)
        self._frozen_loss = jax.jit(lambda p, *a: loss(guard(p), *a))

    # -- inputs ---------------------------------------------------------------------------------------

    def prepare(self, obs: Observation) -> Observation:
        """Checks an observation against the config and fills default masks, as openpi's preprocessing.

        Images of another size are resized with padding to the model's resolution (openpi does the same).
        """
        missing = [k for k in IMAGE_KEYS if k not in obs.images]
        if missing:
            raise ValueError(f"observation.images lacks {missing}; π0.5 needs all of {list(IMAGE_KEYS)}")
        state = jnp.asarray(obs.state)
        if state.ndim != 2:
            raise ValueError(f"observation.state must be [batch, state_dim], got shape {tuple(state.shape)}")
        batch = state.shape[0]
        size = self.config.siglip.image_size
        images, masks = {}, {}
        for key in IMAGE_KEYS:
            image = jnp.asarray(obs.images[key])
            if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != 3:
                raise ValueError(f"observation.images[{key!r}] must be [{batch}, h, w, 3], got {tuple(image.shape)}")
            if image.dtype == jnp.uint8:
                raise ValueError(f"observation.images[{key!r}] is uint8; use Observation.from_dict or scale to [-1, 1]")
            if image.shape[1:3] != (size, size):
                image = resize_with_pad(image, size, size)
            images[key] = image.astype(jnp.float32)
            mask = obs.image_masks.get(key)
            masks[key] = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool).reshape(batch)
        tokens, token_mask = obs.tokenized_prompt, obs.tokenized_prompt_mask
        if tokens is not None:
            tokens = jnp.asarray(tokens, jnp.int32)
            token_mask = jnp.asarray(token_mask, bool)
            if tokens.ndim != 2 or tokens.shape[0] != batch or token_mask.shape != tokens.shape:
                raise ValueError(
                    f"tokenized_prompt {tuple(tokens.shape)} and its mask {tuple(token_mask.shape)} must both be "
                    f"[{batch}, max_token_len]"
                )
        return Observation(images=images, image_masks=masks, state=state, tokenized_prompt=tokens,
                           tokenized_prompt_mask=token_mask)

    def _check_noise(self, noise: jax.Array, leading: tuple[int, ...], name: str) -> jax.Array:
        expected = (*leading, self.config.action_horizon, self.config.action_dim)
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != expected:
            raise ValueError(f"{name} must have shape {expected} (…, horizon, action_dim), got {tuple(noise.shape)}")
        return noise

    # -- the adapter ----------------------------------------------------------------------------------

    def encode(self, obs: Observation) -> Prefix:
        """Runs the prefix (images + prompt) once; the result serves any number of `denoise` calls."""
        return self._encode(self.params, self.prepare(obs))

    def denoise(
        self,
        prefix: Prefix,
        noise: jax.Array,
        num_steps: int = 10,
        *,
        start_step: int = 0,
        return_intermediates: bool = False,
        end_step: int | None = None,
    ) -> jax.Array | tuple[jax.Array, Trajectory]:
        """Euler-integrates N candidates per observation from one shared prefix.

        noise: [b, n, horizon, action_dim], the state x_t at t = euler_times(num_steps)[start_step] (pure
        noise for start_step 0). Integrates to `end_step` (default num_steps: the action at t ≈ 0; earlier
        ends give the partially denoised x_t that filtering at intermediate steps scores). Returns
        [b, n, horizon, action_dim] and, with `return_intermediates`, the `Trajectory` of every x_t visited.
        """
        end_step = num_steps if end_step is None else end_step
        if not 0 <= start_step < end_step <= num_steps:
            raise ValueError(
                f"need 0 <= start_step < end_step <= num_steps={num_steps}, got start_step={start_step}, "
                f"end_step={end_step}"
            )
        batch = prefix.mask.shape[0]
        noise = jnp.asarray(noise)
        if noise.ndim != 4:
            raise ValueError(f"noise must be [batch, n, horizon, action_dim], got shape {tuple(noise.shape)}")
        noise = self._check_noise(noise, (batch, noise.shape[1]), "noise")
        return self._denoise(self.params, prefix, noise, num_steps, start_step, return_intermediates, end_step)

    # -- openpi's API ---------------------------------------------------------------------------------

    def sample_actions(
        self,
        obs: Observation,
        *,
        noise: jax.Array | None = None,
        rng: jax.Array | None = None,
        num_steps: int = 10,
    ) -> jax.Array:
        """openpi's sample_actions: actions [b, horizon, action_dim] from noise [b, horizon, action_dim].

        Without `noise`, it is drawn from `rng` exactly as openpi draws it.
        """
        obs = self.prepare(obs)
        batch = obs.state.shape[0]
        if noise is None:
            if rng is None:
                raise ValueError("sample_actions needs `noise` or `rng`")
            noise = jax.random.normal(rng, (batch, self.config.action_horizon, self.config.action_dim))
        noise = self._check_noise(noise, (batch,), "noise")
        prefix = self._encode(self.params, obs)
        return self._denoise(self.params, prefix, noise[:, None], num_steps, 0, False, num_steps)[:, 0]

    def compute_loss(
        self,
        obs: Observation,
        actions: jax.Array,
        *,
        noise: jax.Array | None = None,
        time: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """openpi's flow-matching loss [b, horizon] with the actor's (frozen) parameters; train=False.

        Give `noise` and `time` to fix them, or `rng` to draw them as openpi does (split into preprocess,
        noise and time keys; t ~ Beta(1.5, 1) * 0.999 + 0.001). No image augmentation is applied.
        """
        return self._call_loss(self._frozen_loss, self.params, obs, actions, noise, time, rng)

    def loss(
        self,
        params: Params,
        obs: Observation,
        actions: jax.Array,
        *,
        noise: jax.Array | None = None,
        time: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """`compute_loss` as a differentiable function of `params` (for fine-tuning the actor)."""
        return self._call_loss(self._loss, params, obs, actions, noise, time, rng)

    def _call_loss(self, fn, params, obs, actions, noise, time, rng) -> jax.Array:
        obs = self.prepare(obs)
        actions = self._check_noise(actions, (obs.state.shape[0],), "actions")
        if (noise is None or time is None) and rng is None:
            raise ValueError("the loss needs `noise` and `time`, or `rng` to draw what is missing")
        if noise is not None:
            noise = self._check_noise(noise, actions.shape[:-2], "noise")
        if time is not None:
            time = jnp.asarray(time, jnp.float32)
            if time.shape != actions.shape[:-2]:
                raise ValueError(f"time must have shape {actions.shape[:-2]} (one per example), got {time.shape}")
        return fn(params, obs, actions, noise, time, rng)


def load_openpi(config: Pi05Config, path: str | pathlib.Path, *, trainable: bool = False) -> Pi05Actor:
    """Loads an openpi π0.5 checkpoint (release or training layout, local or gs://) as an actor.

    The checkpoint is checked against `config` from its metadata before any weight is read; a mismatch
    raises one error listing every offending parameter.
    """
    params = restore_params(path, expected=param_shapes(config))
    return Pi05Actor(config, params, trainable=trainable)
