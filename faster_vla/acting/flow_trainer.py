"""Fine-tuning the π0.5 action expert with the flow loss on successful episodes (EXPO on π0.5's base update).

The FASTER-EXPO default keeps the whole actor frozen, so replay can cache what it computes. This module is
the alternative EXPO's π0.5 recipe uses: the base policy keeps learning by behaviour cloning (openpi's flow
loss) on the chunks of episodes that succeeded, with the VLM frozen and only the action expert trained.
The prefix still comes from frozen weights, so replay's cached prefix features stay exact; the cached
chunks are those the actor produced when each row was stored (`--actor-update success_bc`, see
docs/finetune.md): updates keep never running the actor, and the targets lag the actor by the rows' age.
The same trainer pretrains the built-in model (`faster_vla.pretraining.pretrain`).

- `action_expert_mask(params)`: True on the action expert (every `*_1` Gemma leaf, the action and time
  projections); the SigLIP tower and the PaliGemma expert stay frozen. Frozen leaves are stop-gradient'ed
  inside the loss, so no backward pass runs through the VLM.
- `augment_images`: openpi's train-time augmentation (random 95 % crop + resize and ±5° rotation on the
  non-wrist cameras; brightness, contrast and saturation jitter on all), re-implemented in JAX.
- `ActorTrainer`: a pytree of params, their EMA (what acts, as EXPO's EMA base policy) and the optimiser
  state, with a jitted `update(actor, observation, actions)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from faster_vla.policies.pi05 import Observation, Pi05Actor

Params = Any
WRIST_CAMERAS = ("left_wrist_0_rgb", "right_wrist_0_rgb")
ACTION_EXPERT_ROOTS = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")


@dataclasses.dataclass(frozen=True)
class ActorFinetuneConfig:
    """The base policy's flow-loss update (defaults: openpi's fine-tuning optimiser, a smaller step)."""

    learning_rate: float = 1e-5
    """AdamW (peak) learning rate (openpi fine-tunes at 2.5e-5 peak; RL fine-tuning steps on far fewer samples)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to learning_rate (openpi: 1000); 0: constant from the start."""
    decay_steps: int | None = None
    """Cosine decay from the peak to 10 % of it over this many steps after the warm-up (openpi's schedule,
    used by pretraining); None: constant after the warm-up."""
    weight_decay: float = 1e-10
    """AdamW weight decay (openpi's default)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (openpi's default)."""
    ema_decay: float | None = 0.99
    """EMA of the trained params that acts (EXPO acts with an EMA base policy); None acts with the raw params."""
    trainable: Literal["action_expert", "all"] = "action_expert"
    """What learns: the action expert (VLM frozen, EXPO on π0.5) or every parameter."""
    augment: bool = True
    """openpi's train-time image augmentation."""
    batch_size: int = 32
    """Chunks per flow-loss step."""
    steps_per_update: int = 1
    """Flow-loss steps after each learner update."""

    def __post_init__(self) -> None:
        if self.trainable not in ("action_expert", "all"):
            raise ValueError(f"trainable must be 'action_expert' or 'all', got {self.trainable!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.steps_per_update < 1:
            raise ValueError("learning_rate must be > 0, batch_size and steps_per_update >= 1")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise ValueError(f"warmup_steps must be >= 0 and decay_steps >= 1 or None, got {self.warmup_steps}, "
                             f"{self.decay_steps}")

    def schedule(self) -> optax.Schedule:
        """The learning rate per optimiser step: warm-up, then constant or cosine decay to 10 %."""
        peak = self.learning_rate
        if self.decay_steps is not None:
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(self.warmup_steps, 1),
                                                      self.warmup_steps + self.decay_steps, end_value=0.1 * peak)
        if self.warmup_steps:
            return optax.join_schedules([optax.linear_schedule(0.0, peak, self.warmup_steps),
                                         optax.constant_schedule(peak)], [self.warmup_steps])
        return optax.constant_schedule(peak)


def action_expert_mask(params: Params) -> Params:
    """A bool pytree like `params`: True on the action expert's leaves (openpi's param names)."""

    def is_expert(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        if names and names[0] == "params":
            names = names[1:]
        if names[0] in ACTION_EXPERT_ROOTS:
            return True
        return names[:2] == ["PaliGemma", "llm"] and any(n.endswith("_1") for n in names[2:])

    return jax.tree_util.tree_map_with_path(is_expert, params)


# -- openpi's train-time image augmentation ------------------------------------------------------------------


def _crop_resize_rotate(rng: jax.Array, image: jax.Array, crop: float, max_degrees: float) -> jax.Array:
    """image [H, W, 3] in [-1, 1]: a random crop of `crop`·side, resized back, rotated by ±max_degrees."""
    h, w = image.shape[:2]
    k_y, k_x, k_a = jax.random.split(rng, 3)
    ch, cw = crop * h, crop * w
    y0 = jax.random.uniform(k_y, (), minval=0.0, maxval=h - ch)
    x0 = jax.random.uniform(k_x, (), minval=0.0, maxval=w - cw)
    angle = jnp.deg2rad(jax.random.uniform(k_a, (), minval=-max_degrees, maxval=max_degrees))
    # Output pixel (i, j) -> rotate about the centre -> position inside the crop -> source coordinates.
    ii, jj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    ry = cos * (ii - cy) - sin * (jj - cx) + cy
    rx = sin * (ii - cy) + cos * (jj - cx) + cx
    sy = y0 + ry * (ch / h)
    sx = x0 + rx * (cw / w)
    channels = [jax.scipy.ndimage.map_coordinates(image[..., c], [sy, sx], order=1, mode="nearest")
                for c in range(image.shape[-1])]
    return jnp.stack(channels, axis=-1)


def _color_jitter(rng: jax.Array, image: jax.Array, brightness: float, contrast: float, saturation: float) -> jax.Array:
    """image [H, W, 3] in [-1, 1]: multiplicative brightness, contrast about the mean grey, saturation."""
    k_b, k_c, k_s = jax.random.split(rng, 3)
    x = (image + 1.0) / 2.0
    x = x * jax.random.uniform(k_b, (), minval=1 - brightness, maxval=1 + brightness)
    grey = x @ jnp.asarray([0.299, 0.587, 0.114])
    x = (x - grey.mean()) * jax.random.uniform(k_c, (), minval=1 - contrast, maxval=1 + contrast) + grey.mean()
    grey = (x @ jnp.asarray([0.299, 0.587, 0.114]))[..., None]
    x = (x - grey) * jax.random.uniform(k_s, (), minval=1 - saturation, maxval=1 + saturation) + grey
    return jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0


def augment_images(rng: jax.Array, observation: Observation) -> Observation:
    """openpi's training augmentation of every image [b, H, W, 3] (independent draws per example and camera)."""
    images = {}
    for i, (key, batch) in enumerate(sorted(observation.images.items())):
        keys = jax.random.split(jax.random.fold_in(rng, i), (batch.shape[0], 2))
        image = batch
        if key not in WRIST_CAMERAS:
            image = jax.vmap(lambda k, x: _crop_resize_rotate(k, x, 0.95, 5.0))(keys[:, 0], image)
        image = jax.vmap(lambda k, x: _color_jitter(k, x, 0.3, 0.4, 0.5))(keys[:, 1], image)
        images[key] = image.astype(batch.dtype)
    return dataclasses.replace(observation, images=images)


# -- the trainer -----------------------------------------------------------------------------------------------


class ActorTrainer(flax.struct.PyTreeNode):
    params: Params
    ema_params: Params | None
    opt_state: optax.OptState
    rng: jax.Array
    step: jax.Array
    config: ActorFinetuneConfig = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Params, config: ActorFinetuneConfig, seed: int = 0) -> ActorTrainer:
        """Starts from the actor's current params; only the trainable part gets optimiser state that moves."""
        mask = action_expert_mask(params) if config.trainable == "action_expert" else jax.tree.map(lambda _: True,
                                                                                                    params)
        tx = optax.chain(
            optax.clip_by_global_norm(config.grad_clip),
            optax.masked(optax.adamw(config.schedule(), weight_decay=config.weight_decay), mask),
            optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)),
        )
        return cls(params=params, ema_params=params if config.ema_decay is not None else None,
                   opt_state=tx.init(params), rng=jax.random.key(seed), step=jnp.zeros((), jnp.int32),
                   config=config, tx=tx)

    @property
    def acting_params(self) -> Params:
        """What the actor should act with: the EMA when enabled (EXPO), else the trained params."""
        return self.params if self.ema_params is None else self.ema_params

    def trainable_mask(self) -> Params:
        if self.config.trainable == "all":
            return jax.tree.map(lambda _: True, self.params)
        return action_expert_mask(self.params)

    @functools.partial(jax.jit, static_argnames="actor")
    def update(self, actor: Pi05Actor, observation: Observation, actions: jax.Array) -> tuple[ActorTrainer, dict]:
        """One flow-loss step on chunks `actions` [b, H, A_model] (normalised, padded) taken at `observation`.

        `actor` (static: its compiled functions are reused) must be built with `trainable=True`; its own
        params are not read, only its module.
        """
        if not actor.trainable:
            raise ValueError("build the actor with trainable=True to fine-tune it (Pi05Actor(..., trainable=True))")
        rng, k_aug, k_loss = jax.random.split(self.rng, 3)
        if self.config.augment:
            observation = augment_images(k_aug, observation)
        mask = self.trainable_mask()

        def loss_fn(params: Params) -> jax.Array:
            # Frozen leaves are constants: no backward pass through them (the VLM, for the action expert).
            params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
            return jnp.mean(actor.loss(params, observation, actions, rng=k_loss))

        loss, grads = jax.value_and_grad(loss_fn)(self.params)
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = None
        if self.ema_params is not None:
            d = self.config.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, self.ema_params, params)
        info = {"actor_flow_loss": loss, "actor_grad_norm": optax.tree.norm(grads)}
        return self.replace(params=params, ema_params=ema, opt_state=opt_state, rng=rng, step=self.step + 1), info
