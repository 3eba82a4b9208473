"""The project's GPU check in one call: parity, actor latency, decisions, batching, learner update, serving.

Written for the H200 the project can sometimes borrow (Python 3.12, jax 0.11.2 + CUDA 13, numpy 2.5, flax,
orbax and optax preinstalled, no network, ~15 minutes in all): it needs nothing installed but two carried
wheels (not even this project: it puts the checkout on the path) and reads nothing outside the repository.
Prepare the carried folders first (`benchmarks/prepare_device_check.sh`: the tiny_a goldens
into `.device_check/fixtures/`, the websockets and openpi-client wheels into `.whl/`); docs/benchmarks.md
gives the exact device command. `--rehearse` runs every section on tiny configurations on the CPU
(tests/test_device_check.py does, in CI), so the device call cannot fail on a typo.

Sections, each timed with `jax.block_until_ready` (or on host results), median and p90 over `--repeats` calls
after one untimed warm-up call (which compiles); every figure is measured, none estimated. A section that
fails records its error and the next one runs; rows that would start after `--budget-s` are recorded as
skipped (with the time left), never filled in.

1. parity: tiny_a against openpi's goldens (sample_actions 10/3/1 steps, compute_loss), float32 under
   `jax.default_matmul_precision("highest")` and bfloat16, with the CPU tests' tolerances
   (tests/test_pi05_parity.py: relative error <= 1e-5 / 2e-2).
2. actor: pi05_libero (bf16 compute and weights, random weights built leaf by leaf on the device,
   benchmarks/bench_actor.py): `Pi05Actor.encode`, then `Pi05Actor.denoise` of N = 1 ... 64 noises against
   one shared prefix.
3. decisions: `Agent.act_batch` of one LIBERO observation with pi05_libero-size critics (untrained) by rule:
   base; FASTER-EXPO (Q^dn scores 8 noises, one denoise, edit, Q^a); EXPO with a shared prefix (8 denoises,
   edit each, Q^a); and EXPO without sharing (8 full samples, each its own prefix encode: the paper's and
   the FASTER chart's baseline) through the same `select` and critic calls.
4. batched: FASTER-EXPO decisions per second, `Agent.act_batch` of B = 1 ... 64 observations.
5. update: one `Learner.update` (UTD 10, batch 32, pi05_libero-size critics) with the frozen-actor cache, and
   the same update recomputing a' through the actor at every s_{t+h} (benchmarks/bench_update.py).
6. serving: openpi_client's `WebsocketClientPolicy` round trips on loopback to the server `faster-vla serve`
   runs (`faster_vla.serving`, here in a thread of this process: the weights are the random ones built
   above, which `faster-vla serve` refuses for pi05_libero), the policy being pi05_libero's LIBERO pipeline.

Peak device memory is `device.memory_stats()["peak_bytes_in_use"] after each section (n/a on the CPU).

    python3 benchmarks/device_check.py --out "$OUT"        # the device (docs/benchmarks.md)
    .venv/bin/python benchmarks/device_check.py --rehearse --out /tmp/rehearsal   # CPU, tiny configurations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
# Runs from a bare checkout, nothing installed but two wheels: the repository (faster_vla, tests.openpi_golden)
# and benchmarks/ (bench_*) go on the path.
for _path in (str(REPO), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
try:
    import faster_vla.policies  # noqa: F401 -- installed (pip install -e .): its own package mapping
except ImportError:
    import faster_vla  # the repository's folder

    # policies/, critics/, launch/ and checkpoints/ sit at the top of the repository and install under faster_vla.
    # (pyproject.toml's package-dir); a bare checkout gets the same names by searching the repository too.
    faster_vla.__path__.append(str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

FIXTURE_FILES = ("tiny_a_params.npz", "tiny_a_inputs.npz", "tiny_a_outputs_float32.npz",
                 "tiny_a_outputs_bfloat16.npz")
SECTIONS = ("parity", "actor", "decisions", "batched", "update", "serving")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the device run's sizes, or the rehearsal's tiny ones."""

    preset: str
    dtype: str
    param_dtype: str
    candidates: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    num_candidates: int  # N of the FASTER / EXPO decisions
    repeats: int
    utd: int
    batch_size: int
    critic_hidden: tuple[int, ...] | None  # None: pi05_libero's critic sizes
    serve_requests: int
    update_repeats: int  # a learner update is seconds, not milliseconds: fewer timed calls
    init: str  # bench_actor.build_params: leafwise (3.3B without two copies) or init_params (small presets)
    num_steps: int = 10
    parity_steps: tuple[int, ...] = (10, 3, 1)  # sample_actions goldens checked (each its own compile)


DEVICE = Plan(preset="pi05_libero", dtype="bfloat16", param_dtype="bfloat16",
              candidates=(1, 2, 4, 8, 16, 32, 64), batch_sizes=(1, 2, 4, 8, 16, 32, 64), num_candidates=8,
              repeats=20, utd=10, batch_size=32, critic_hidden=None, serve_requests=20, update_repeats=5,
              init="leafwise")
# The small LIBERO preset (pi05_libero_small: 112² images, the cheapest prefix; tiny_a's 224² prefix costs 15x
# more), 2 noises, 2 Euler steps, one-layer 16-wide critics: every code path of the device run in about two
# minutes of CPU time.
REHEARSAL = Plan(preset="pi05_libero_small", dtype="bfloat16", param_dtype="bfloat16", candidates=(1, 2),
                 batch_sizes=(1, 2), num_candidates=2, repeats=2, utd=2, batch_size=2, critic_hidden=(16,),
                 serve_requests=2, update_repeats=1, init="init_params", num_steps=2, parity_steps=(10,))


# -- measuring -------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """One untimed-for-steady-state warm-up call (compiles; its time is reported as first_call_s), then
    `repeats` calls, each ended by `jax.block_until_ready`; seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "n": len(times), "median_s": statistics.median(times),
            "p90_s": percentile(times, 90), "min_s": min(times), "times_s": times}


def peak_memory_bytes() -> int | None:
    """The device's peak bytes in use so far (None where the backend reports none, e.g. the CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


class Budget:
    """Wall-clock budget of the whole run: a row that would start after it is skipped, not estimated."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def skip(self, what: str) -> dict[str, Any] | None:
        """None when `what` may run; otherwise the row that records the skip."""
        left = self.left()
        if left > 0:
            return None
        log(f"SKIPPED {what}: time budget spent ({left:.0f} s left of {self.seconds:.0f} s)")
        return {"name": what, "skipped": f"time budget of {self.seconds:.0f} s spent before this row started"}


# -- sections ---------------------------------------------------------------------------------------------


def fixtures_dir(explicit: str | None) -> Path:
    """The tiny_a goldens: --fixtures, else .device_check/fixtures (prepared), else ../shared (a checkout)."""
    candidates = [Path(explicit)] if explicit else [REPO / ".device_check" / "fixtures",
                                                    REPO.parent / "shared" / "fixtures" / "openpi_pi05"]
    for path in candidates:
        if all((path / f).is_file() for f in FIXTURE_FILES):
            return path
    raise FileNotFoundError(
        f"tiny_a goldens not found: expected {', '.join(FIXTURE_FILES)} in "
        f"{' or '.join(str(p) for p in candidates)}; run benchmarks/prepare_device_check.sh first")


def section_parity(fixtures: Path, plan: Plan) -> dict[str, Any]:
    from faster_vla.policies import pi05
    from tests.openpi_golden import load_golden, relative_error
    from tests.test_pi05_parity import TOLERANCE

    rows = []
    for dtype in ("float32", "bfloat16"):
        golden = load_golden(fixtures, "tiny_a", dtype)
        precision = "highest" if dtype == "float32" else "default"
        with jax.default_matmul_precision(precision):
            actor = pi05.Pi05Actor(golden.config, jax.device_put(golden.params))
            checks = {f"sample_actions/num_steps_{n}": lambda n=n: actor.sample_actions(
                golden.observation, noise=golden.inputs["noise"], num_steps=n) for n in plan.parity_steps}
            checks["compute_loss"] = lambda: actor.compute_loss(
                golden.observation, golden.inputs["actions"], noise=golden.inputs["loss_noise"],
                time=golden.inputs["loss_time"])
            for name, fn in checks.items():
                out = jax.block_until_ready(fn())
                err = relative_error(out, golden.outputs[name])
                rows.append({"name": f"tiny_a {dtype} {name}", "dtype": dtype, "matmul_precision": precision,
                             "relative_error": err, "tolerance": TOLERANCE[dtype],
                             "passed": bool(err < TOLERANCE[dtype]),
                             "platform": str(list(out.devices())[0].platform)})
                log(f"parity {rows[-1]['name']}: rel err {err:.2e} (tol {TOLERANCE[dtype]:.0e})")
    return {"rows": rows, "passed": all(r["passed"] for r in rows)}


@dataclasses.dataclass
class Model:
    """The actor, its LIBERO policy pipeline and inputs, built once and shared by the sections."""

    config: Any
    actor: Any
    policy: Any
    obs: Any  # the model's Observation, batch 1
    raw_obs: Callable[[int], dict]  # seed -> a raw LIBERO observation (what clients and envs send)
    params: dict[str, Any]


def build_model(plan: Plan) -> tuple[Model, dict[str, Any]]:
    from bench_actor import build_params, check_param_count, libero_observation
    from faster_vla import checkpoints
    from faster_vla.acting.actor_source import SHIPPED_TOKENIZER, unit_norm_stats
    from faster_vla.launch.demo import libero_observation as raw_libero_observation
    from faster_vla.policies import pi05
    from faster_vla.policies.config import get_preset
    from faster_vla.policies.policy import make_libero_policy
    from faster_vla.policies.tokenizer import PaligemmaTokenizer

    config = dataclasses.replace(get_preset(plan.preset), dtype=plan.dtype)
    start = time.perf_counter()
    params, method = build_params(config, plan.param_dtype, plan.init, seed=0)
    init_s = time.perf_counter() - start
    count = check_param_count(config, plan.preset, params)
    actor = pi05.Pi05Actor(config, params)
    # The small shipped tokenizer (no network on the device); its ids are valid for every preset's vocabulary.
    tokenizer = PaligemmaTokenizer(checkpoints.path(SHIPPED_TOKENIZER["pi05_small"]), max_len=config.max_token_len)
    policy = make_libero_policy(actor, tokenizer=tokenizer, norm_stats=unit_norm_stats(), num_steps=plan.num_steps,
                                seed=0, metadata={"server": "faster-vla", "policy": f"{plan.preset} random weights"})
    info = {"preset": plan.preset, "dtype": plan.dtype, "param_dtype": plan.param_dtype, "parameters": count,
            "init": method, "init_s": init_s, "peak_memory_bytes": peak_memory_bytes()}
    log(f"model {plan.preset}: {count:,} parameters, {method}, {init_s:.1f} s")
    model = Model(config, actor, policy, libero_observation(config, 20, seed=0),
                  lambda seed: raw_libero_observation("put the black bowl on the plate", seed=seed), params)
    return model, info


def section_actor(model: Model, plan: Plan, budget: Budget) -> dict[str, Any]:
    actor, config = model.actor, model.config
    rows = []
    enc = time_calls(lambda: actor.encode(model.obs), plan.repeats)
    rows.append({"name": "encode (prefix: SigLIP x3 + PaliGemma)", "candidates": 1, **enc})
    log(f"encode: median {enc['median_s'] * 1e3:.1f} ms, p90 {enc['p90_s'] * 1e3:.1f} ms")
    prefix = actor.encode(model.obs)
    for n in plan.candidates:
        what = f"denoise N={n} ({plan.num_steps} steps, shared prefix)"
        skipped = budget.skip(what)
        if skipped:
            rows.append(skipped)
            continue
        noise = jax.random.normal(jax.random.key(n), (1, n, config.action_horizon, config.action_dim))
        row = {"name": what, "candidates": n, **time_calls(lambda: actor.denoise(prefix, noise, plan.num_steps),
                                                             plan.repeats)}
        rows.append(row)
        log(f"{what}: median {row['median_s'] * 1e3:.1f} ms, p90 {row['p90_s'] * 1e3:.1f} ms")
    return {"rows": rows, "peak_memory_bytes": peak_memory_bytes()}


def make_learner(model: Model, plan: Plan, rule: str = "faster"):
    from bench_update import pi05_libero_size_learner_config
    from faster_vla.rl.learner import Learner
    from faster_vla.rl.selection import SelectionConfig

    config = pi05_libero_size_learner_config(model.config, utd=plan.utd, batch_size=plan.batch_size,
                                             hidden_dims=plan.critic_hidden,
                                             selection=SelectionConfig(rule, num_candidates=plan.num_candidates))
    encoder = config.chunk_critic.encoder
    example = {"features": jnp.zeros((1, encoder.feature_dim)), "state": jnp.zeros((1, encoder.state_dim))}
    return config, Learner.create(config, example)


def expo_unshared(agent: Any, learner: Any, raw: dict, key: jax.Array, num_candidates: int) -> np.ndarray:
    """EXPO without prefix sharing: each of the N candidates is a full sample (its own prefix encode, then its
    denoise), then the same edit and Q^a choice as `Agent.act_batch` with rule best_of_n (`select`)."""
    from faster_vla.acting.agent import _edit, _q_chunk, critic_inputs
    from faster_vla.rl.selection import SelectionConfig, select

    cfg, actor = agent.config, agent.actor
    observation = agent.observations([raw])
    k_noise, k_sel, k_critic = jax.random.split(key, 3)
    h, a_model = actor.config.action_horizon, actor.config.action_dim
    pool = jax.random.normal(k_noise, (1, num_candidates, h, a_model))
    features: list[Any] = []

    def denoise(idx: jax.Array) -> jax.Array:
        chunks = []
        for m in range(idx.shape[1]):
            prefix = actor.encode(observation)  # no sharing: every sample encodes the observation again
            features.append(prefix.features)
            seeds = jnp.take_along_axis(pool, idx[:, m:m + 1, None, None], axis=1)
            chunks.append(actor.denoise(prefix, seeds, agent.num_steps)[..., : cfg.action_dim])
        return jnp.concatenate(chunks, axis=1)

    def inputs():
        return critic_inputs(cfg.chunk_critic.encoder, observation, features[0])

    keys = k_critic[None]
    edit_keys = jax.random.split(k_sel)[1][None]
    chosen = select(SelectionConfig("best_of_n", num_candidates), k_sel, pool, denoise=denoise,
                    q_chunk=lambda c: _q_chunk(learner, inputs(), c, keys),
                    edit=lambda _, c: _edit(learner, inputs(), c, keys, edit_keys))
    return np.asarray(chosen.action)


def section_decisions(model: Model, plan: Plan, budget: Budget) -> dict[str, Any]:
    from faster_vla.acting.agent import Agent
    from faster_vla.rl.selection import SelectionConfig

    config, learner = make_learner(model, plan)
    agent = Agent(model.policy, config, num_steps=plan.num_steps)
    raw = model.raw_obs(1)
    n = plan.num_candidates
    variants = {
        "base (encode + 1 denoise)": lambda: agent.act_batch(learner, [raw], selection=SelectionConfig("base", 1)),
        f"FASTER-EXPO (Q^dn over {n} noises, 1 denoise, edit, Q^a)":
            lambda: agent.act_batch(learner, [raw], selection=SelectionConfig("faster", n)),
        f"EXPO, shared prefix (encode, {n} denoises, edit each, Q^a)":
            lambda: agent.act_batch(learner, [raw], selection=SelectionConfig("best_of_n", n)),
        f"EXPO, no sharing ({n} full samples, edit each, Q^a)":
            lambda: expo_unshared(agent, learner, raw, jax.random.key(3), n),
    }
    rows = []
    for name, fn in variants.items():
        skipped = budget.skip(name)
        if skipped:
            rows.append(skipped)
            continue
        row = {"name": name, **time_calls(fn, plan.repeats)}
        rows.append(row)
        log(f"decision {name}: median {row['median_s'] * 1e3:.1f} ms, p90 {row['p90_s'] * 1e3:.1f} ms")
    return {"rows": rows, "critic_hidden_dims": list(config.chunk_critic.hidden_dims),
            "peak_memory_bytes": peak_memory_bytes()}


def section_batched(model: Model, plan: Plan, budget: Budget) -> dict[str, Any]:
    from faster_vla.acting.agent import Agent
    from faster_vla.rl.selection import SelectionConfig

    config, learner = make_learner(model, plan)
    agent = Agent(model.policy, config, num_steps=plan.num_steps)
    selection = SelectionConfig("faster", plan.num_candidates)
    rows = []
    for b in plan.batch_sizes:
        what = f"FASTER-EXPO decisions, batch {b}"
        skipped = budget.skip(what)
        if skipped:
            rows.append(skipped)
            continue
        raws = [model.raw_obs(100 + i) for i in range(b)]
        row = {"name": what, "batch": b, **time_calls(lambda raws=raws: agent.act_batch(learner, raws,
                                                                                     selection=selection),
                                                      plan.repeats)}
        row["decisions_per_s"] = b / row["median_s"]
        rows.append(row)
        log(f"{what}: {row['decisions_per_s']:.1f} decisions/s (median call {row['median_s'] * 1e3:.1f} ms)")
    return {"rows": rows, "peak_memory_bytes": peak_memory_bytes()}


def section_update(model: Model, plan: Plan, budget: Budget) -> dict[str, Any]:
    from bench_update import ActorNextDenoiser, make_batch
    from faster_vla.critics.networks import count_params

    config, learner = make_learner(model, plan)
    encoder = config.chunk_critic.encoder
    batch = jax.tree.map(jnp.asarray, make_batch(model.config, plan.utd, plan.batch_size, plan.num_candidates,
                                                 encoder.feature_dim))
    cached = {k: v for k, v in batch.items() if k != "next_obs"}
    denoiser = ActorNextDenoiser(model.actor, plan.num_steps)  # one object: jit caches on its identity
    variants = {
        f"update, frozen-actor cache (UTD {plan.utd}, batch {plan.batch_size})": lambda: learner.update(cached),
        f"update, a' recomputed through {plan.preset} (UTD {plan.utd}, batch {plan.batch_size})":
            lambda: learner.update(batch, denoiser),
    }
    rows = []
    for name, fn in variants.items():
        skipped = budget.skip(name)
        if skipped:
            rows.append(skipped)
            continue
        row = {"name": name, **time_calls(fn, plan.update_repeats)}
        rows.append(row)
        log(f"{name}: median {row['median_s']:.3f} s, p90 {row['p90_s']:.3f} s")
    params = {"noise_critic": count_params(learner.noise_critic.params),
              "chunk_critic": count_params(learner.chunk_critic.params),
              "edit_policy": count_params(learner.edit_policy.params)}
    return {"rows": rows, "critic_params": params, "peak_memory_bytes": peak_memory_bytes()}


def section_serving(model: Model, plan: Plan, budget: Budget) -> dict[str, Any]:
    import warnings

    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from faster_vla.serving import server as serving
    from faster_vla.launch.serve import warm_up

    warnings.filterwarnings("ignore", message=r"connect\(\) must be used as a context manager")
    warm_up(model.policy, 1)  # what `faster-vla serve` does before it listens
    rows = []
    with serving.BackgroundServer(model.policy, "127.0.0.1", 0, max_batch=1) as server:
        client = WebsocketClientPolicy(server.host, server.port)
        obs = model.raw_obs(7)
        latencies, infer_ms = [], []
        client.infer(obs)  # untimed first request
        for _ in range(plan.serve_requests):
            start = time.perf_counter()
            reply = client.infer(obs)
            latencies.append(time.perf_counter() - start)
            infer_ms.append(float(reply["server_timing"]["infer_ms"]))
        client._ws.close()  # openpi_client 0.1.2 has no public close
    rows.append({"name": f"serve round trip, 1 client, {plan.preset} (openpi_client on loopback)",
                 "n": len(latencies), "median_s": statistics.median(latencies),
                 "p90_s": percentile(latencies, 90), "min_s": min(latencies),
                 "server_infer_median_s": statistics.median(infer_ms) / 1e3, "times_s": latencies})
    log(f"serving: median {rows[-1]['median_s'] * 1e3:.1f} ms round trip, server infer "
        f"{rows[-1]['server_infer_median_s'] * 1e3:.1f} ms")
    return {"rows": rows, "peak_memory_bytes": peak_memory_bytes()}


# -- report -------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "device": str(device), "device_kind": getattr(device, "device_kind", None),
            "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def fmt_bytes(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [f"Device check ({'rehearsal, tiny configurations' if result['rehearse'] else 'full'}): "
             f"{env['device_kind'] or env['device']} ({env['backend']}), jax {env['jax']}, numpy {env['numpy']}, "
             f"Python {env['python']}; {result['wall_s']:.0f} s in all.", "",
             "| section | what was measured | median ms | p90 ms | other | peak device memory |",
             "|---|---|---:|---:|---|---|"]
    for name in SECTIONS:
        sec = result["sections"].get(name, {})
        if "error" in sec:
            lines.append(f"| {name} | FAILED: {sec['error'].splitlines()[-1][:150]} | – | – | – | – |")
            continue
        peak = fmt_bytes(sec.get("peak_memory_bytes"))
        for row in sec.get("rows", []):
            if "skipped" in row:
                lines.append(f"| {name} | {row['name']} | – | – | {row['skipped']} | – |")
                continue
            other = []
            if "relative_error" in row:
                other.append(f"rel err {row['relative_error']:.2e} (tol {row['tolerance']:.0e}, "
                             f"{'pass' if row['passed'] else 'FAIL'})")
            if "decisions_per_s" in row:
                other.append(f"{row['decisions_per_s']:.1f} decisions/s")
            if "server_infer_median_s" in row:
                other.append(f"server infer {fmt_ms(row['server_infer_median_s'])} ms")
            if "first_call_s" in row:
                other.append(f"first call {row['first_call_s']:.1f} s, n={row['n']}")
            lines.append(f"| {name} | {row['name']} | {fmt_ms(row.get('median_s'))} | {fmt_ms(row.get('p90_s'))} "
                         f"| {'; '.join(other)} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rehearse", action="store_true", help="every section on tiny configurations (CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for device_check.json and "
                        "device_check.md (default: $OUT)")
    parser.add_argument("--fixtures", default=None, help="folder with the tiny_a goldens (default: "
                        ".device_check/fixtures, else ../shared/fixtures/openpi_pi05)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20; rehearsal 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="rows that would start after this many seconds are skipped (default 420 on the "
                             "device, none in a rehearsal)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    plan = REHEARSAL if args.rehearse else DEVICE
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        plan = dataclasses.replace(plan, repeats=args.repeats)
    budget = Budget(args.budget_s if args.budget_s is not None else (None if args.rehearse else 420.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment()
    log(f"device check ({'rehearsal' if args.rehearse else 'full'}): {env}")
    result: dict[str, Any] = {"rehearse": args.rehearse, "plan": dataclasses.asdict(plan), "env": env,
                              "sections": {}}

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in args.sections:
            return
        t0 = time.perf_counter()
        try:
            result["sections"][name] = fn()
        except Exception:  # noqa: BLE001 -- recorded; the other sections still run
            result["sections"][name] = {"error": traceback.format_exc()}
            log(f"section {name} FAILED:\n{result['sections'][name]['error']}")
        result["sections"][name]["section_s"] = time.perf_counter() - t0

    run("parity", lambda: section_parity(fixtures_dir(args.fixtures), plan))
    model = None
    if set(args.sections) - {"parity"}:
        try:
            model, result["model"] = build_model(plan)
        except Exception:  # noqa: BLE001
            result["model"] = {"error": traceback.format_exc()}
            log(f"building the model FAILED:\n{result['model']['error']}")
    if model is not None:
        run("actor", lambda: section_actor(model, plan, budget))
        run("decisions", lambda: section_decisions(model, plan, budget))
        run("update", lambda: section_update(model, plan, budget))
        run("serving", lambda: section_serving(model, plan, budget))
        run("batched", lambda: section_batched(model, plan, budget))  # most compiles: last
    result["wall_s"] = time.perf_counter() - start
    (out / "device_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / "device_check.md").write_text(table)
    print()
    print(table, flush=True)
    failed = [n for n, s in result["sections"].items() if "error" in s] + (["model"] if model is None and
                                                                            "error" in result.get("model", {}) else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
