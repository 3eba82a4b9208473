"""One FASTER-EXPO update with the frozen-actor cache vs the same update recomputing a' through π0.5.

Not a test: a side-by-side timing in one process, variants alternated, medians and their ratio reported.
The update is the paper's VLA setting: UTD 10 critic steps on minibatches of 32 sliding-window chunks,
then one edit-policy and α step, with ~20M-parameter critics (pi05_libero's critic sizes on the small
actor's feature width). "recompute" runs the actor's prefix and denoising at every s_{t+h} of every
minibatch, as an update must when the actor is not frozen; "cache" looks the chunks up.

    .venv/bin/python benchmarks/bench_update.py                       # pi05_small actor (6.5M), CPU
    .venv/bin/python benchmarks/bench_update.py --preset pi05_libero  # a GPU machine (pip install -e .[gpu])
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import write_result
from faster_vla.critics.edit_policy import PI05_LIBERO_EDIT_POLICY
from faster_vla.critics.encoders import encoder_for_pi05
from faster_vla.critics.networks import PI05_LIBERO_CHUNK_CRITIC, PI05_LIBERO_NOISE_CRITIC, count_params
from faster_vla.rl.learner import Learner, LearnerConfig
from faster_vla.policies import pi05
from faster_vla.policies.config import get_preset
from faster_vla.rl.selection import SelectionConfig


class ActorNextDenoiser:
    """Runs the actor at s_{t+h}: encode the minibatch's next observations, denoise the chosen seeds."""

    def __init__(self, actor: pi05.Pi05Actor, num_steps: int = 10) -> None:
        self.actor = actor
        self.num_steps = num_steps

    def __call__(self, minibatch: dict):
        raw = minibatch["next_obs"]
        obs = pi05.Observation(
            images={k: raw["images"][k].astype(jnp.float32) / 127.5 - 1.0 for k in pi05.IMAGE_KEYS},
            image_masks=raw["image_masks"],
            state=raw["state"],
            tokenized_prompt=raw["tokenized_prompt"],
            tokenized_prompt_mask=raw["tokenized_prompt_mask"],
        )
        prefix = self.actor.encode(obs)
        pool = minibatch["next_cache"]["noise"]

        def denoise(idx: jax.Array) -> jax.Array:
            noise = jnp.take_along_axis(pool, idx[:, :, None, None], axis=1)
            return self.actor.denoise(prefix, noise, self.num_steps)

        return denoise


def make_batch(config: pi05.Pi05Config, utd: int, batch: int, k: int, feature_dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, a_model = config.action_horizon, config.action_dim
    size = config.siglip.image_size

    def cache():
        return {"noise": rng.normal(size=(utd, batch, k, h, a_model)).astype(np.float32),
                "denoised": rng.uniform(-1, 1, (utd, batch, k, h, a_model)).astype(np.float32)}

    def inputs():
        return {"features": rng.normal(size=(utd, batch, feature_dim)).astype(np.float32),
                "state": rng.uniform(-1, 1, (utd, batch, 8)).astype(np.float32)}

    tokens = rng.integers(1, config.vocab_size, (utd, batch, config.max_token_len)).astype(np.int32)
    return {
        "inputs": inputs(), "next_inputs": inputs(),
        "actions": rng.uniform(-1, 1, (utd, batch, h * 7)).astype(np.float32),
        "returns": rng.normal(size=(utd, batch)).astype(np.float32),
        "discount": np.full((utd, batch), 0.99**h, np.float32),
        "cache": cache(), "next_cache": cache(),
        "next_obs": {
            "images": {key: rng.integers(0, 256, (utd, batch, size, size, 3), dtype=np.uint8) for key in pi05.IMAGE_KEYS},
            "image_masks": {key: np.full((utd, batch), key != "right_wrist_0_rgb") for key in pi05.IMAGE_KEYS},
            "state": rng.uniform(-1, 1, (utd, batch, config.action_dim)).astype(np.float32),
            "tokenized_prompt": tokens,
            "tokenized_prompt_mask": np.arange(config.max_token_len) < 12 * np.ones((utd, batch, 1), bool),
        },
    }


def pi05_libero_size_learner_config(actor_config: pi05.Pi05Config, *, utd: int = 10, batch_size: int = 32,
                                    hidden_dims: tuple[int, ...] | None = None,
                                    selection: SelectionConfig | None = None) -> LearnerConfig:
    """pi05_libero's critic and edit-policy sizes (`hidden_dims` None), shaped for `actor_config`'s features,
    horizon and action dim; `hidden_dims` shrinks all three (the device check's CPU rehearsal)."""
    encoder = encoder_for_pi05(actor_config)
    h = actor_config.action_horizon
    sized = {} if hidden_dims is None else {"hidden_dims": hidden_dims}
    extra = {} if selection is None else {"selection": selection}
    return LearnerConfig(
        chunk_critic=dataclasses.replace(PI05_LIBERO_CHUNK_CRITIC, encoder=encoder, chunk_shape=(h, 7), **sized),
        noise_critic=dataclasses.replace(PI05_LIBERO_NOISE_CRITIC, encoder=encoder,
                                         noise_shape=(h, actor_config.action_dim), **sized),
        edit_policy=dataclasses.replace(PI05_LIBERO_EDIT_POLICY, encoder=encoder, chunk_shape=(h, 7), **sized),
        utd=utd,
        batch_size=batch_size,
        **extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi05_small")
    parser.add_argument("--utd", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    actor_config = get_preset(args.preset)
    actor = pi05.Pi05Actor(actor_config, pi05.init_params(actor_config, 0))
    config = pi05_libero_size_learner_config(actor_config, utd=args.utd, batch_size=args.batch_size)
    encoder = config.chunk_critic.encoder
    example = {"features": jnp.zeros((1, encoder.feature_dim)), "state": jnp.zeros((1, encoder.state_dim))}
    learner = Learner.create(config, example)
    batch = jax.tree.map(jnp.asarray, make_batch(actor_config, args.utd, args.batch_size, args.num_candidates,
                                                 encoder.feature_dim))
    cached_batch = {k: v for k, v in batch.items() if k != "next_obs"}
    denoiser = ActorNextDenoiser(actor)  # one object: jit caches on its identity
    variants = {
        "cache": lambda: learner.update(cached_batch),
        "recompute": lambda: learner.update(batch, denoiser),
    }
    compile_s = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - start
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    critic_params = {
        "noise_critic": count_params(learner.noise_critic.params),
        "chunk_critic": count_params(learner.chunk_critic.params),
        "edit_policy": count_params(learner.edit_policy.params),
    }
    result = {
        "preset": args.preset, "device": jax.devices()[0].platform, "jax": jax.__version__,
        "utd": args.utd, "batch_size": args.batch_size, "num_candidates": args.num_candidates,
        "selection": config.selection.rule, "critic_params": critic_params,
        "first_call_s": compile_s, "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
        "ratio_recompute_over_cache": med["recompute"] / med["cache"],
    }
    print(f"actor {args.preset} ({sum(x.size for x in jax.tree.leaves(actor.params)):,} params), critics "
          f"{critic_params}, UTD {args.utd}, batch {args.batch_size}, N {args.num_candidates}, "
          f"rule {config.selection.rule}, device {result['device']}, jax {jax.__version__}")
    print("| update | first call s (compile) | median s | min s |\n|---|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {compile_s[name]:.2f} | {med[name]:.3f} | {min(times[name]):.3f} |")
    print(f"recompute / cache (median): {result['ratio_recompute_over_cache']:.2f}x")
    if args.json:
        write_result(args.json, result, indent=1)


if __name__ == "__main__":
    main()
