"""Training throughput: env steps/s and episodes/h of real fine-tuning runs for K = 1, 2, 4 env workers (local
processes) and K = 2 on Ray, side by side, each round's time split into its stages; the acting-pass cache
against the separate encode it replaced; and one pi05_libero-shaped round on whatever device is present.

Not a test. Part 1 runs `faster-vla train` (the README's main config, `cpu_small_faster_expo`: the built-in small
π0.5 on libero_90 task 20) once per variant, as subprocesses one after another in one invocation (`--repeats`
cycles through the variants again, for a noisy machine), and reads each run's metrics.jsonl: the cumulative
per-stage wall times the run logs (`time_s/*`: acting, physics, rendering, transport, reset, cache, update)
and its analytic FLOPs. Steady state excludes each run's first round (compilation).

Part 2 (`--pi05-libero`) builds pi05_libero (3.3B, random bf16 weights, leaf by leaf), its LIBERO pipeline
(256² render resized to 224²) and pi05_libero-size critics, then runs the episode loop itself
(`run_episodes`, FASTER-EXPO, the cache computed from the acting pass) for `--pi05-decisions` decisions on
task 20, and times the rest of a training episode's stages alone: the final observation's cache encode and
one learner update (UTD 10, batch 32). Peak host memory ~15 GB on the CPU.

    .venv/bin/python benchmarks/bench_throughput.py --json benchmarks/results/throughput_cpu.json
    .venv/bin/python benchmarks/bench_throughput.py --skip-runs --pi05-libero \
        --merge benchmarks/results/throughput_cpu.json --json benchmarks/results/throughput_pi05_libero_cpu.json

With part 2 present, a projection of episodes/h on a 16-core machine with one GPU follows from the measured
per-part costs (`projection`; the GPU's own times are not measured yet and enter as FLOPs over assumed rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import cpu_model, write_result

STAGES = ("acting", "physics", "rendering", "transport", "reset", "cache", "update")
"""A training round's stages on the driver's critical path (`faster_vla.libero.rollout.StageTimes`, then
`Run.store` and the learner's updates)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    num_envs: int
    backend: str = "local"
    cache_from_acting: bool = True

    def args(self) -> list[str]:
        out = ["--num-envs", str(self.num_envs), "--envs.backend", self.backend]
        return out + ([] if self.cache_from_acting else ["--no-cache-from-acting"])


VARIANTS = (Variant("local K=1", 1), Variant("local K=2", 2), Variant("local K=4", 4), Variant("ray K=2", 2, "ray"),
            Variant("local K=1, separate encode", 1, cache_from_acting=False))


def run_variant(variant: Variant, root: Path, episodes: int, extra: list[str]) -> dict[str, Any]:
    """One training run in a subprocess; returns its steady-state figures from metrics.jsonl."""
    run_dir = root / variant.name.replace(" ", "_").replace(",", "").replace("=", "")
    cmd = [sys.executable, "-m", "faster_vla.launch.cli", "train", "cpu_small_faster_expo", "--run-dir", str(run_dir),
           "--episodes", str(episodes), "--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every",
           str(10 * episodes), "--no-progress", "--wandb-mode", "disabled", *variant.args(), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{variant.name}: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"variant": dataclasses.asdict(variant), "command": cmd, "process_s": total_s,
            **summarise(records, variant.num_envs)}


def summarise(records: list[dict[str, Any]], num_envs: int) -> dict[str, Any]:
    """Steady state: from the end of the first round (which compiles) to the last episode."""
    if len(records) <= num_envs:
        raise ValueError(f"need more episodes than one round ({num_envs}) to measure a steady state, "
                         f"got {len(records)}")
    first, last = records[num_envs - 1], records[-1]
    delta = lambda key: last.get(key, 0.0) - first.get(key, 0.0)  # noqa: E731
    steps, wall = delta("env_steps"), delta("wall_s")
    stages = {s: delta(f"time_s/{s}") for s in STAGES}
    stages["other"] = max(wall - sum(stages.values()), 0.0)  # logging, replay sampling outside updates, ...
    return {
        "episodes": len(records), "steady_episodes": int(last["episodes"] - first["episodes"]),
        "env_steps": int(last["env_steps"]), "steady_env_steps": int(steps), "steady_wall_s": wall,
        "env_steps_per_s": steps / wall, "episodes_per_h": 3600 * delta("episodes") / wall,
        "wall_s_per_episode": wall / delta("episodes"),
        "ms_per_env_step": {s: 1e3 * v / steps for s, v in stages.items()},
        "share": {s: v / wall for s, v in stages.items()},
        "env_cpu_ms_per_env_step": {s: 1e3 * delta(f"time_s/{s}_cpu") / steps for s in ("physics", "rendering")},
        # Analytic FLOPs over the whole run (compilation does not change them).
        "flops_per_env_step": {k: last[f"flops/{k}"] / last["env_steps"] for k in ("acting", "cache", "update")}
        | {"total": last["flops"] / last["env_steps"]},
        "success_rate": float(sum(r["train/success"] for r in records) / len(records)),
    }


def pi05_libero_env(decisions: int, image_size: int = 224) -> dict[str, Any]:
    """The pi05_libero env's own cost per decision (a 10-step chunk: physics, then the boundary render at 256²
    and its resize to the model's input), measured with no model computing beside it.

    Inside the CPU episode loop the acting pass's cache (the 3.3B model's denoising, dispatched while the env
    steps) shares the cores and XLA's CPU queue with the env (the resize is a JAX program on the CPU), which
    inflates the env's measured time several-fold; on a machine with a GPU the cache runs there. A projection
    to such a machine takes the env's cost from here."""
    import numpy as np

    from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig
    from faster_vla.libero.rollout import StageTimes

    config = LiberoEnvConfig(suite="libero_90", task=20, resolution=256, image_size=image_size,
                             max_steps=(decisions + 1) * 10)
    times = StageTimes()
    with LiberoEnv(config) as env:
        env.reset(1)
        env.step_chunk(np.zeros((10, 7), np.float32))  # the first render and resize compile; not counted
        start = time.perf_counter()
        env.reset(1)
        reset_s = time.perf_counter() - start
        for _ in range(decisions):
            start = time.perf_counter()
            result = env.step_chunk(np.zeros((10, 7), np.float32))
            times.add_env(time.perf_counter() - start, [result])
    return {"decisions": decisions, "reset_s": reset_s,
            "per_decision_s": {"physics": times.physics / decisions, "rendering": times.rendering / decisions}}


def pi05_libero_round(decisions: int, rehearse: bool = False) -> dict[str, Any]:
    """pi05_libero-shaped: the episode loop's stages with the 3.3B actor and its critics on this device
    (`rehearse`: device_check's tiny rehearsal plan instead, to check the code path in a minute)."""
    import jax
    import numpy as np

    from device_check import DEVICE, REHEARSAL, build_model, make_learner
    from bench_update import make_batch
    from faster_vla.acting.agent import Agent
    from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig
    from faster_vla.libero.rollout import StageTimes, run_episodes
    from faster_vla.policies import flops as actor_flops

    plan = REHEARSAL if rehearse else DEVICE
    model, info = build_model(plan)
    learner_config, learner = make_learner(model, plan)
    agent = Agent(model.policy, learner_config, num_steps=plan.num_steps, seed=0)
    horizon = model.config.action_horizon
    env_config = LiberoEnvConfig(suite="libero_90", task=20, resolution=256,
                                 image_size=model.config.siglip.image_size)
    out: dict[str, Any] = {"model": info, "device": str(jax.devices()[0]), "decisions": decisions,
                           "env_alone": pi05_libero_env(decisions, model.config.siglip.image_size)}
    with LiberoEnv(dataclasses.replace(env_config, max_steps=horizon)) as warm:  # compiles (one decision)
        run_episodes(agent, learner, learner_config.selection, warm, [(0, jax.random.key(0))], record="chunk",
                     cache_seeds=plan.num_candidates)
    times = StageTimes()
    with LiberoEnv(dataclasses.replace(env_config, max_steps=decisions * horizon)) as env:
        start = time.perf_counter()
        [trajectory] = run_episodes(agent, learner, learner_config.selection, env, [(1, jax.random.key(1))],
                                    record="chunk", cache_seeds=plan.num_candidates, times=times)
        loop_s = time.perf_counter() - start
    # Storing: wait for the acting pass's cache rows, then encode the one row no decision saw (the final one).
    start = time.perf_counter()
    for decision in trajectory.cache.values():
        decision.cache_row()
    cache_wait_s = time.perf_counter() - start
    final = agent.observations([trajectory.observations[-1]])
    noise = np.zeros((1, plan.num_candidates, horizon, model.config.action_dim), np.float32)
    agent.cache(final, noise, batch_size=1)  # compiles
    start = time.perf_counter()
    agent.cache(final, noise, batch_size=1)
    final_encode_s = time.perf_counter() - start
    encoder = learner_config.chunk_critic.encoder
    batch = jax.tree.map(jax.numpy.asarray, make_batch(model.config, plan.utd, plan.batch_size, plan.num_candidates,
                                                       encoder.feature_dim))
    batch = {k: v for k, v in batch.items() if k != "next_obs"}
    update_flops = float(learner.update_flops(batch))  # compiles update
    jax.block_until_ready(learner.update(batch))
    start = time.perf_counter()
    jax.block_until_ready(learner.update(batch))
    update_s = time.perf_counter() - start
    rounds = max(times.rounds, 1)
    cfg = model.config
    cache_denoise = plan.num_candidates * plan.num_steps * actor_flops.denoise_flops(cfg, num_candidates=1, num_steps=1)
    out["flops"] = {"decision": float(agent.decision_flops(learner, learner_config.selection).total),
                    "cache_per_decision": float(cache_denoise),
                    "final_row_cache": float(actor_flops.prefix_flops(cfg) + cache_denoise),
                    "update": update_flops}
    out.update({
        "episode_steps": trajectory.steps, "loop_s": loop_s,
        "per_decision_s": {"acting": times.acting / rounds, "physics": times.physics / rounds,
                           "rendering": times.rendering / rounds, "transport": times.transport / rounds},
        "reset_s": times.reset, "cache_wait_s": cache_wait_s, "final_row_cache_s": final_encode_s,
        "update_s": update_s, "update": {"utd": plan.utd, "batch_size": plan.batch_size},
    })
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    """The machine a projection is for, and what is assumed where nothing was measured."""

    cores: int = 16
    driver_cores: int = 2  # the training process and the OS; the rest run one env worker each
    gpu_flops_per_s: tuple[float, ...] = (1e14, 2e14, 4e14)  # achieved bf16 rates assumed (H100 peak ~9.9e14)
    episode_steps: int = 400  # libero_90's limit: a failed episode, the longest (time per episode is an upper bound)
    updates_per_episode: int = 3  # the pi05_libero presets' (UTD 10, batch 32 each)
    chunk: int = 10


def projection(result: dict[str, Any], target: Target = Target()) -> list[dict[str, Any]]:
    """Episodes/h of pi05_libero FASTER-EXPO fine-tuning on `target`, from measured per-part costs.

    Measured here: the pi05_libero env's physics and rendering per chunk (256² render, one core) and its reset,
    alone (`pi05_libero_env`: inside the CPU loop the model's cache shares the cores; on the target it runs
    on the GPU), and the transport per round and worker (part 1's largest local K). Not measured (no GPU yet): the
    accelerator's time for a decision, the cache's denoising, the final row's encode and an update, taken as
    their analytic FLOPs over an assumed achieved rate (one row per rate). Lockstep rounds: a batched decision
    for K observations, then every worker's chunk in parallel (the cache's denoising overlaps it on the
    accelerator); each episode also resets, encodes its final row and takes its updates, serially.
    """
    p = result["pi05_libero"]
    env_cost = p.get("env_alone", p)  # results from before the env was timed alone: the loop's (contended) ones
    env_chunk = env_cost["per_decision_s"]["physics"] + env_cost["per_decision_s"]["rendering"]
    local = [r for r in result.get("runs", []) if r["variant"]["backend"] == "local" and r["variant"]["cache_from_acting"]]
    widest = max(local, key=lambda r: r["variant"]["num_envs"], default=None)
    # Transport per round per worker: ms per env step (all workers' steps) × the steps one worker's chunk takes.
    transport_per_worker = 0.0 if widest is None else widest["ms_per_env_step"]["transport"] * target.chunk / 1e3
    decisions = target.episode_steps // target.chunk
    reset_s = env_cost["reset_s"]
    f = p["flops"]
    rows = []
    for rate in target.gpu_flops_per_s:
        for k in (1, target.cores - target.driver_cores):
            acting = k * f["decision"] / rate
            env = max(env_chunk, k * f["cache_per_decision"] / rate) + k * transport_per_worker
            serial = k * (target.updates_per_episode * f["update"] + f["final_row_cache"]) / rate
            episode_s = decisions * (acting + env) + reset_s + serial
            rows.append({"gpu_flops_per_s": rate, "num_envs": k, "round_s": acting + env,
                         "acting_share": acting / (acting + env), "episodes_per_h": 3600 * k / episode_s,
                         "env_steps_per_s": k * target.episode_steps / episode_s})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = []
    runs = result.get("runs", [])
    if runs:
        base = next((r for r in runs if r["variant"]["name"] == "local K=1"), runs[0])
        lines += ["| variant | env steps/s | episodes/h | × K=1 | " + " | ".join(STAGES) + " | other |",
                  "|---|---:|---:|---:|" + "---:|" * (len(STAGES) + 1)]
        for r in runs:
            ms = r["ms_per_env_step"]
            lines.append(f"| {r['variant']['name']} | {r['env_steps_per_s']:.2f} | {r['episodes_per_h']:.0f} | "
                         f"{r['env_steps_per_s'] / base['env_steps_per_s']:.2f} | "
                         + " | ".join(f"{ms[s]:.1f}" for s in (*STAGES, "other")) + " |")
        lines += ["", "(stage columns: ms of wall time per env step, steady state)", "",
                  "| variant | FLOPs/env step: acting | cache | update | total | wall s/episode |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            f = r["flops_per_env_step"]
            lines.append(f"| {r['variant']['name']} | {f['acting']:.3g} | {f['cache']:.3g} | {f['update']:.3g} | "
                         f"{f['total']:.3g} | {r['wall_s_per_episode']:.1f} |")
    p = result.get("pi05_libero")
    if p:
        d = p["per_decision_s"]
        lines += ["", f"pi05_libero-shaped on {p['device']}: per decision (10 env steps) acting {d['acting']:.2f} s, "
                      f"physics {d['physics']:.3f} s, rendering {d['rendering']:.3f} s; final-row cache "
                      f"{p['final_row_cache_s']:.2f} s; one update {p['update_s']:.2f} s"]
        if "env_alone" in p:
            e = p["env_alone"]["per_decision_s"]
            lines += ["", f"the env alone (no model computing beside it): per decision physics {e['physics']:.3f} s, "
                          f"rendering {e['rendering']:.3f} s; reset {p['env_alone']['reset_s']:.2f} s"]
        if "projection" in result:
            lines += ["", "| assumed GPU rate | K | round s | acting share | episodes/h | env steps/s |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for r in result["projection"]:
                lines.append(f"| {r['gpu_flops_per_s'] / 1e12:.0f} TFLOP/s | {r['num_envs']} | {r['round_s']:.2f} | "
                             f"{r['acting_share']:.0%} | {r['episodes_per_h']:.0f} | {r['env_steps_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per run (the first round is excluded)")
    parser.add_argument("--variants", nargs="*", default=[v.name for v in VARIANTS], help="which variants, by name")
    parser.add_argument("--repeats", type=int, default=1, help="cycles through the variants (medians reported)")
    parser.add_argument("--skip-runs", action="store_true", help="part 2 only")
    parser.add_argument("--pi05-libero", action="store_true", help="also measure a pi05_libero-shaped round")
    parser.add_argument("--rehearse", action="store_true", help="part 2 on a tiny plan (checks the code path)")
    parser.add_argument("--pi05-decisions", type=int, default=3, help="decisions of the pi05_libero episode")
    parser.add_argument("--pi05-env-only", action="store_true", help="time only the pi05_libero env alone (no "
                        "model) and add it to the pi05_libero part taken from --merge")
    parser.add_argument("--train-args", default="", help="extra `faster-vla train` flags, one string")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--merge", nargs="*", default=[], help="result JSONs of earlier invocations to combine "
                        "(e.g. part 1 and part 2 run apart); their runs / pi05_libero fill what this one skipped")
    args = parser.parse_args()
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in args.variants if n not in known]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(known)}")
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "loadavg_start": os.getloadavg(),
    }
    if not args.skip_runs:
        per_variant: dict[str, list[dict[str, Any]]] = {n: [] for n in args.variants}
        root = Path(tempfile.mkdtemp(prefix="bench_throughput_"))
        try:
            for repeat in range(args.repeats):
                for name in args.variants:
                    out = run_variant(known[name], root / f"r{repeat}", args.episodes, args.train_args.split())
                    per_variant[name].append(out)
                    print(f"{name}: {out['env_steps_per_s']:.2f} env steps/s, {out['episodes_per_h']:.0f} episodes/h"
                          f" ({out['steady_episodes']} steady episodes)", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        # With repeats, the run whose throughput is the median stands for its variant (all are kept).
        result["runs"] = [sorted(v, key=lambda r: r["env_steps_per_s"])[len(v) // 2] for v in per_variant.values()]
        result["all_runs"] = per_variant
    if args.pi05_libero:
        result["pi05_libero"] = pi05_libero_round(args.pi05_decisions, args.rehearse)
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        for key in ("runs", "all_runs", "pi05_libero"):
            if key in earlier and key not in result:
                result[key] = earlier[key]
                result.setdefault("merged_from", {})[key] = {"file": path, "command": earlier.get("command")}
    if args.pi05_env_only:
        if "pi05_libero" not in result:
            parser.error("--pi05-env-only adds to a pi05_libero part: pass --pi05-libero or --merge a result with one")
        result["pi05_libero"]["env_alone"] = pi05_libero_env(args.pi05_decisions)
    if "pi05_libero" in result:
        result["projection_target"] = dataclasses.asdict(Target())
        result["projection"] = projection(result)
    result["loadavg_end"] = os.getloadavg()
    print(markdown(result))
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
