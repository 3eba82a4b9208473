"""`faster-vla demo`: a one-minute look at the pipeline on any CPU, with no LIBERO install.

It builds the project's small π0.5 (`pi05_small`: the same code as the 3.3B pi05_libero, smaller sizes),
writes it as an openpi checkpoint and loads it back through `load_openpi`, runs openpi's LIBERO policy
pipeline on a LIBERO-shaped observation, and prints the action chunk with the time of every part. It then
shows the seam FASTER uses: one prefix encode shared by N denoising candidates.

The weights are random, so the actions exercise the pipeline and its timing, not a skill. The built-in
pretrained model is `checkpoints/pi05_libero_small`, which `faster-vla train cpu_small_faster_expo` fine-tunes.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from faster_vla import checkpoints
from faster_vla.acting.actor_source import unit_norm_stats

from faster_vla.policies import flops
from faster_vla.policies.checkpoint import save_params
from faster_vla.policies.config import PI05_SMALL
from faster_vla.policies.pi05 import init_params, load_openpi
from faster_vla.policies.policy import make_libero_policy
from faster_vla.policies.tokenizer import PaligemmaTokenizer

SMALL_TOKENIZER = checkpoints.path("pi05_small/tokenizer.model")


@dataclasses.dataclass(frozen=True)
class DemoArgs:
    """Sample actions from the built-in small π0.5 on a LIBERO-shaped observation, with per-part timing."""

    prompt: str = "open the top drawer of the cabinet"
    """Task instruction (any LIBERO instruction tokenizes within the model's 32 tokens)."""
    num_candidates: int = 8
    """N for the shared-prefix view: N noises denoised against one encoded prefix."""
    num_steps: int = 10
    """Euler denoising steps."""
    repeats: int = 5
    """Timed repetitions after the first (compiling) call; medians are reported."""
    seed: int = 0
    """Seed for weights, observation and noise."""
    checkpoint_dir: Path | None = None
    """Where to write the small openpi checkpoint (default: a temporary directory, removed afterwards)."""


def libero_observation(prompt: str, seed: int = 0) -> dict:
    """An observation as LIBERO's openpi client sends it: 256×256 uint8 cameras, 8-D state, a prompt."""
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "observation/state": rng.uniform(-1, 1, 8).astype(np.float32),
        "prompt": prompt,
    }


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_demo(args: DemoArgs) -> dict:
    """Runs the demo, prints its report, and returns the figures (for tests and scripts)."""
    if args.num_candidates < 1 or args.num_steps < 1 or args.repeats < 1:
        raise ValueError("num_candidates, num_steps and repeats must all be >= 1")
    config = PI05_SMALL
    with tempfile.TemporaryDirectory(prefix="faster-vla-demo-") as tmp:
        ckpt = args.checkpoint_dir or Path(tmp) / "pi05_small"
        start = time.perf_counter()
        save_params(ckpt, init_params(config, args.seed), force=True)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        actor = load_openpi(config, ckpt)
        load_s = time.perf_counter() - start

    tokenizer = PaligemmaTokenizer(SMALL_TOKENIZER, max_len=config.max_token_len)
    policy = make_libero_policy(actor, tokenizer=tokenizer, norm_stats=unit_norm_stats(), num_steps=args.num_steps,
                                seed=args.seed)
    obs = libero_observation(args.prompt, args.seed)
    first = policy.infer(obs)["policy_timing"]
    runs = [policy.infer(obs) for _ in range(args.repeats)]
    actions = runs[-1]["actions"]
    timing = {k: statistics.median(r["policy_timing"][k] for r in runs) for k in first}

    # The FASTER seam: one prefix, N candidates.
    batched = policy.to_observation(obs)
    prefix = actor.encode(batched)
    n = args.num_candidates
    noise = jax.random.normal(jax.random.key(args.seed), (1, n, config.action_horizon, config.action_dim))
    jax.block_until_ready(actor.denoise(prefix, noise[:, :1], args.num_steps))
    jax.block_until_ready(actor.denoise(prefix, noise, args.num_steps))
    encode_ms = _median_ms(lambda: actor.encode(batched), args.repeats)
    denoise1_ms = _median_ms(lambda: actor.denoise(prefix, noise[:, :1], args.num_steps), args.repeats)
    denoisen_ms = _median_ms(lambda: actor.denoise(prefix, noise, args.num_steps), args.repeats)

    counts = flops.param_count(config)
    prefix_flops = flops.prefix_flops(config)
    step_flops = flops.denoise_flops(config, num_candidates=1, num_steps=1)

    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    print(f"π0.5 pi05_small: {counts['total']:,} parameters (pi05_libero code path, smaller sizes), dtype "
          f"{config.dtype}, device {jax.devices()[0].platform}; weights: random (seed {args.seed})")
    print(f"built + saved openpi checkpoint in {build_s:.1f} s, loaded with load_openpi in {load_s:.1f} s")
    print(f"prompt: {args.prompt!r}\n")
    print(f"actions [{actions.shape[0]} steps × {actions.shape[1]} dims] (LIBERO units: Δpos, Δaxis-angle, gripper):")
    print(actions)
    print("\npolicy.infer timing (ms)   first call (compiles)   steady state (median of", args.repeats, "runs)")
    for key in first:
        print(f"  {key:<24}{first[key]:>14.1f}{timing[key]:>24.1f}")
    print(f"\nShared prefix, {n} candidates ({args.num_steps} Euler steps each):")
    print(f"  encode once                 {encode_ms:8.1f} ms   {prefix_flops / 1e9:8.2f} GFLOP")
    print(f"  denoise 1 candidate         {denoise1_ms:8.1f} ms   {args.num_steps * step_flops / 1e9:8.2f} GFLOP")
    print(f"  denoise {n} candidates        {denoisen_ms:8.1f} ms   {n * args.num_steps * step_flops / 1e9:8.2f} GFLOP")
    unshared = n * (encode_ms + denoise1_ms)
    print(f"  best-of-{n} sharing the prefix: {encode_ms + denoisen_ms:.1f} ms vs ~{unshared:.1f} ms re-encoding "
          f"per candidate (estimated as {n} × (encode + denoise 1); ×{unshared / (encode_ms + denoisen_ms):.1f})")
    return {
        "actions": actions,
        "policy_timing": timing,
        "encode_ms": encode_ms,
        "denoise_1_ms": denoise1_ms,
        f"denoise_{n}_ms": denoisen_ms,
        "params": counts["total"],
    }
