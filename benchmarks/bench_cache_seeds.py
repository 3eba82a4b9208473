"""What caching K > N seeds per replay row costs (issue 18: fresh seed draws), K = N beside K = 4N.

Not a test: a side-by-side measurement in one process, variants alternated, medians and their ratio reported.
Per stored row: the frozen-actor cache's denoising of K seeds from the prefix acting encoded (an acted row),
the same plus the prefix (a row no decision was made at: every-step windows), analytic FLOPs, and the bytes
replay keeps (`FrozenActorCacheSpec.nbytes_per_step`). Per update: the learner's update (UTD 10 × batch 32,
pi05_libero-size critics) in the old forms (K = N, min TD backup, α in tanh space) and in the authors' forms
(N of K drawn per critic step, split backup, α in edit space).

    .venv/bin/python benchmarks/bench_cache_seeds.py                          # pi05_libero_small actor, CPU
    .venv/bin/python benchmarks/bench_cache_seeds.py --preset pi05_libero     # a GPU machine (random weights)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import cpu_model, write_result
from bench_update import make_batch, pi05_libero_size_learner_config
from faster_vla.acting.frozen_cache import cache_from_prefix
from faster_vla.policies import flops as actor_flops
from faster_vla.policies import pi05
from faster_vla.policies.config import get_preset
from faster_vla.rl.learner import Learner
from faster_vla.rl.replay import FrozenActorCacheSpec


def observations(config: pi05.Pi05Config, b: int, seed: int = 0) -> pi05.Observation:
    """b random observations at the model's input sizes (timing does not depend on their content)."""
    rng = np.random.default_rng(seed)
    size = config.siglip.image_size
    return pi05.Observation(
        images={k: jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)), jnp.float32) for k in pi05.IMAGE_KEYS},
        image_masks={k: jnp.full((b,), k != "right_wrist_0_rgb") for k in pi05.IMAGE_KEYS},
        state=jnp.asarray(rng.uniform(-1, 1, (b, config.action_dim)), jnp.float32),
        tokenized_prompt=jnp.asarray(rng.integers(1, config.vocab_size, (b, config.max_token_len)), jnp.int32),
        tokenized_prompt_mask=jnp.arange(config.max_token_len)[None] < 12 * jnp.ones((b, 1), jnp.int32),
    )


def medians(variants: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(first call s, median s) per variant; the variants alternate within each repeat."""
    first, times = {}, {name: [] for name in variants}
    for name, fn in variants.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return first, {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi05_libero_small")
    parser.add_argument("--num-candidates", type=int, default=8, help="N, the seeds a rule scores")
    parser.add_argument("--cache-seeds", type=int, default=32, help="K of the new form")
    parser.add_argument("--rows", type=int, default=8, help="observations per cache call (cache_batch)")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--utd", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, k = args.num_candidates, args.cache_seeds

    config = get_preset(args.preset)
    actor = pi05.Pi05Actor(config, pi05.init_params(config, 0))
    obs = observations(config, args.rows)
    prefix = jax.block_until_ready(actor.encode(obs))
    noises = {K: jnp.asarray(np.random.default_rng(K).normal(size=(args.rows, K, config.action_horizon,
                                                                  config.action_dim)), jnp.float32) for K in (n, k)}
    cache_variants = {}
    for K in (n, k):
        cache_variants[f"denoise K={K}"] = lambda K=K: cache_from_prefix(actor, prefix, noises[K],
                                                                         num_steps=args.num_steps)["denoised"]
        cache_variants[f"encode+denoise K={K}"] = lambda K=K: cache_from_prefix(
            actor, actor.encode(obs), noises[K], num_steps=args.num_steps)["denoised"]
    cache_first, cache_med = medians(cache_variants, args.repeats)
    per_row_ms = {name: 1e3 * s / args.rows for name, s in cache_med.items()}
    prefix_flops = float(actor_flops.prefix_flops(config))
    seed_flops = float(actor_flops.denoise_flops(config, num_candidates=1, num_steps=args.num_steps))
    row_bytes = {K: FrozenActorCacheSpec.from_config(config, K).nbytes_per_step for K in (n, k)}

    lconfig = pi05_libero_size_learner_config(config, utd=args.utd, batch_size=args.batch_size)
    old = dataclasses.replace(lconfig, td_backup="min", alpha_entropy="tanh")
    new = dataclasses.replace(lconfig, td_backup="split", alpha_entropy="edit")
    encoder = lconfig.chunk_critic.encoder
    example = {"features": jnp.zeros((1, encoder.feature_dim)), "state": jnp.zeros((1, encoder.state_dim))}
    learners = {"old": Learner.create(old, example), "new": Learner.create(new, example)}
    batches = {}
    for K in (n, k):
        full = make_batch(config, args.utd, args.batch_size, K, encoder.feature_dim)
        batches[K] = jax.tree.map(jnp.asarray, {key: v for key, v in full.items() if key != "next_obs"})
    update_variants = {
        f"old forms, K={n}": lambda: learners["old"].update(batches[n]),
        f"new forms, K={n}": lambda: learners["new"].update(batches[n]),
        f"new forms, K={k} (draw {n})": lambda: learners["new"].update(batches[k]),
    }
    update_first, update_med = medians(update_variants, args.repeats)

    result = {
        "preset": args.preset, "device": jax.devices()[0].platform, "cpu": cpu_model(), "jax": jax.__version__,
        "num_candidates": n, "cache_seeds": k, "rows_per_call": args.rows, "num_steps": args.num_steps,
        "cache_ms_per_row": per_row_ms, "cache_first_call_s": cache_first,
        "cache_flops_per_row": {f"acted K={K}": K * seed_flops for K in (n, k)}
        | {f"not acted K={K}": prefix_flops + K * seed_flops for K in (n, k)},
        "cache_bytes_per_row": row_bytes, "update_median_s": update_med, "update_first_call_s": update_first,
    }
    ratios = {
        "acted row time": per_row_ms[f"denoise K={k}"] / per_row_ms[f"denoise K={n}"],
        "not-acted row time": per_row_ms[f"encode+denoise K={k}"] / per_row_ms[f"encode+denoise K={n}"],
        "acted row FLOPs": k / n,
        "not-acted row FLOPs": (prefix_flops + k * seed_flops) / (prefix_flops + n * seed_flops),
        "bytes per row": row_bytes[k] / row_bytes[n],
        "update time": update_med[f"new forms, K={k} (draw {n})"] / update_med[f"old forms, K={n}"],
    }
    result["ratios_new_over_old"] = ratios
    print(f"actor {args.preset}, N {n}, K {k}, {args.rows} rows per cache call, device {result['device']} "
          f"({result['cpu']}), jax {jax.__version__}")
    print("| cache per stored row | median ms | analytic FLOPs | bytes |\n|---|---:|---:|---:|")
    for K in (n, k):
        print(f"| acted (denoise K={K}) | {per_row_ms[f'denoise K={K}']:.1f} | {K * seed_flops:.3g} | {row_bytes[K]:,} |")
        print(f"| not acted (encode + denoise K={K}) | {per_row_ms[f'encode+denoise K={K}']:.1f} | "
              f"{prefix_flops + K * seed_flops:.3g} | {row_bytes[K]:,} |")
    print("| update | first call s (compile) | median s |\n|---|---:|---:|")
    for name in update_variants:
        print(f"| {name} | {update_first[name]:.2f} | {update_med[name]:.3f} |")
    print("new / old: " + ", ".join(f"{name} {r:.2f}x" for name, r in ratios.items()))
    if args.json:
        write_result(args.json, result, indent=1)


if __name__ == "__main__":
    main()
