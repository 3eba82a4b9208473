"""Actor latency benchmark: encode the prefix once, denoise N noise candidates against it.

Times `Pi05Actor.encode(obs)` and `Pi05Actor.denoise(prefix, noise[1, N, horizon, action_dim], num_steps)` for
each N in `--candidates`, next to the best-of-N baseline without prefix sharing (N independent
`sample_actions` calls, i.e. N prefix passes: what EXPO-style best-of-N costs). Compile time (AOT
`lower().compile()` of the very jitted function the public method calls, which fills its cache) is kept apart
from the steady state (median and min of `--repeats` calls, each ended by `jax.block_until_ready`). Every row
carries the analytic FLOPs of `faster_vla.policies.flops` and the achieved FLOP/s; the run reports the JAX
device and version, dtypes, parameter count (checked against the analytic count), and resident memory.

Weights are random (values do not matter for timing, only shapes and dtypes). For large models they are
built leaf by leaf from `pi05.param_shapes`, big leaves chunk by chunk into a donated buffer, directly in
`--param-dtype`, so two full copies never coexist; `--init` picks the method (the run prints which).

Run from the repository root.

CPU (what docs/benchmarks.md reports; pi05_libero: ~26 s per encode, ~4 min per run on a quiet 2-vCPU EPYC):

    .venv/bin/python benchmarks/bench_actor.py --preset tiny_a \\
        --json benchmarks/results/tiny_a_cpu.json > benchmarks/results/tiny_a_cpu.log 2>&1
    nohup .venv/bin/python benchmarks/bench_actor.py --preset pi05_libero --repeats 3 \\
        --json benchmarks/results/pi05_libero_cpu.json > benchmarks/results/pi05_libero_cpu.log 2>&1 &

    float32 weights need ~13.5 GiB peak RSS. `--param-dtype bfloat16` halves the weights (6.25 GiB) but on
    XLA:CPU (jax 0.7.1) encode's peak RSS was *higher* (15.8 GiB), so it does not help on CPU.

GPU (one CUDA 12 GPU; install the CUDA plugin first):

    pip install -e .[gpu]        # or: .venv/bin/pip install -e '.[gpu]'
    python benchmarks/bench_actor.py --preset pi05_libero --measure-baseline --repeats 20 \\
        --json benchmarks/results/pi05_libero_gpu.json

Flags: --preset {pi05_libero,tiny_a}, --dtype (compute dtype override), --param-dtype {float32,bfloat16},
--candidates N [N ...], --num-steps, --repeats, --measure-baseline / --no-measure-baseline, --init
{auto,init_params,leafwise}, --seed, --prompt-tokens, --json PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import cpu_model, write_result
from faster_vla.policies import flops as flops_lib
from faster_vla.policies import pi05
from faster_vla.policies.config import IMAGE_KEYS, Pi05Config, get_preset

PI05_LIBERO_PARAMS = 3_353_433_872
# Leaves larger than this are generated in chunks along axis 0 (keeps the generator's temporaries small).
CHUNK_BYTES = 256 * 2**20


# -- memory -------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


# -- weights ------------------------------------------------------------------------------------------


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    for d in range(limit, 0, -1):
        if n % d == 0:
            return d
    return 1


def _leaf_init(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, scale) for one leaf: 'normal' scaled like lecun (1/sqrt(fan_in)), 'ones' or 'zeros'."""
    names = [str(getattr(p, "key", p)) for p in path]
    if len(shape) >= 2:
        fan_in = shape[-2]
        if names[-1] == "input_embedding":
            return "normal", 0.01  # Gemma embedder: normal(stddev=1e-2)
        return "normal", 1.0 / math.sqrt(fan_in)
    # 1-D leaves: biases and norm scales. LayerNorm scales multiply (ones); Gemma's RMSNorm uses 1 + scale.
    if names[-1] == "scale" and any("LayerNorm" in n or n == "encoder_norm" for n in names):
        return "ones", 0.0
    return "zeros", 0.0


def _make_normal_fill(chunk_shape: tuple[int, ...], dtype: Any) -> Callable:
    def fill(buf: jax.Array, key: jax.Array, start: jax.Array, scale: float) -> jax.Array:
        chunk = (jax.random.normal(key, chunk_shape, jnp.float32) * scale).astype(dtype)
        return jax.lax.dynamic_update_slice_in_dim(buf, chunk, start, axis=0)

    return jax.jit(fill, donate_argnums=0)


def init_leafwise(config: Pi05Config, param_dtype: Any, seed: int) -> dict[str, Any]:
    """Random weights of `param_shapes(config)`, one leaf at a time, big leaves in donated chunks."""
    shapes = pi05.param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    root = jax.random.key(seed)
    itemsize = jnp.dtype(param_dtype).itemsize
    fills: dict[tuple[tuple[int, ...], str], Callable] = {}
    leaves = []
    for index, (path, sds) in enumerate(flat):
        shape = tuple(sds.shape)
        kind, scale = _leaf_init(path, shape)
        if kind == "zeros":
            leaves.append(jnp.zeros(shape, param_dtype))
            continue
        if kind == "ones":
            leaves.append(jnp.ones(shape, param_dtype))
            continue
        key = jax.random.fold_in(root, index)
        row_bytes = math.prod(shape[1:]) * itemsize
        rows = _largest_divisor_at_most(shape[0], CHUNK_BYTES // max(row_bytes, 1))
        chunk_shape = (rows, *shape[1:])
        fill_key = (chunk_shape, jnp.dtype(param_dtype).name)
        if fill_key not in fills:
            fills[fill_key] = _make_normal_fill(chunk_shape, param_dtype)
        fill = fills[fill_key]
        buf = jnp.zeros(shape, param_dtype)
        for chunk_index, start in enumerate(range(0, shape[0], rows)):
            buf = fill(buf, jax.random.fold_in(key, chunk_index), jnp.int32(start), scale)
        leaves.append(jax.block_until_ready(buf))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def build_params(config: Pi05Config, param_dtype: str, init: str, seed: int) -> tuple[dict[str, Any], str]:
    """-> (params, method actually used)."""
    if init == "auto":
        f32_bytes = 4 * flops_lib.param_count(config)["total"]
        init = "init_params" if (param_dtype == "float32" and f32_bytes < 2 * 2**30) else "leafwise"
    if init == "init_params":
        params = jax.block_until_ready(pi05.init_params(config, seed))
        if param_dtype != "float32":
            params = jax.tree.map(lambda x: x.astype(param_dtype), params)
            jax.block_until_ready(params)
            return params, f"init_params (openpi initialisers, float32) then cast to {param_dtype}"
        return params, "init_params (openpi initialisers, jitted, float32)"
    params = init_leafwise(config, jnp.dtype(param_dtype), seed)
    return params, (
        f"leafwise (jax.random.normal per leaf from param_shapes, lecun-scaled, directly in {param_dtype}, "
        f"leaves > {CHUNK_BYTES // 2**20} MiB filled chunk by chunk into a donated buffer)"
    )


def check_param_count(config: Pi05Config, preset: str, params: dict[str, Any]) -> int:
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    expected = flops_lib.param_count(config)["total"]
    if total != expected:
        raise SystemExit(f"PARAMETER COUNT MISMATCH: built {total:,} leaves' elements, flops.param_count says {expected:,}")
    if preset == "pi05_libero" and total != PI05_LIBERO_PARAMS:
        raise SystemExit(f"PARAMETER COUNT MISMATCH: pi05_libero has {total:,} parameters, expected {PI05_LIBERO_PARAMS:,}")
    return total


# -- inputs -------------------------------------------------------------------------------------------


def libero_observation(config: Pi05Config, prompt_tokens: int, seed: int) -> pi05.Observation:
    """Batch 1, LIBERO-shaped: base and left-wrist images, right wrist a zero image with mask False (as openpi's
    LiberoInputs for π0.5), 8-d LIBERO state zero-padded to action_dim, `prompt_tokens` valid tokens."""
    rng = np.random.default_rng(seed)
    size = config.siglip.image_size
    images, masks = {}, {}
    for key in IMAGE_KEYS:
        if key == "right_wrist_0_rgb":
            images[key] = np.zeros((1, size, size, 3), np.float32)
            masks[key] = np.zeros((1,), bool)
        else:
            images[key] = rng.uniform(-1.0, 1.0, (1, size, size, 3)).astype(np.float32)
            masks[key] = np.ones((1,), bool)
    state = np.zeros((1, config.action_dim), np.float32)
    state[0, :8] = rng.normal(size=8)
    valid = min(prompt_tokens, config.max_token_len)
    tokens = np.zeros((1, config.max_token_len), np.int32)
    tokens[0, :valid] = rng.integers(1, config.vocab_size, size=valid)
    token_mask = np.zeros((1, config.max_token_len), bool)
    token_mask[0, :valid] = True
    return pi05.Observation(
        images={k: jnp.asarray(v) for k, v in images.items()},
        image_masks={k: jnp.asarray(v) for k, v in masks.items()},
        state=jnp.asarray(state),
        tokenized_prompt=jnp.asarray(tokens),
        tokenized_prompt_mask=jnp.asarray(token_mask),
    )


# -- timing -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    candidates: int
    flops: int
    source: str  # "measured" or "estimated: ..."
    compile_s: float | None = None
    first_call_s: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None

    def finish(self) -> Row:
        if self.times_s:
            self.median_s = statistics.median(self.times_s)
            self.min_s = min(self.times_s)
        return self

    @property
    def flops_per_s(self) -> float | None:
        return None if not self.median_s else self.flops / self.median_s

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["achieved_flops_per_s"] = self.flops_per_s
        return d


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(row: Row, fn: Callable[[], Any], repeats: int, compile_fn: Callable[[], Any] | None) -> Any:
    """Compile (if given), one first call, then `repeats` steady-state calls. Returns the last output."""
    if compile_fn is not None:
        row.compile_s, _ = timed(compile_fn)
        log(f"{row.name}: compile {row.compile_s:.2f}s")
    row.first_call_s, out = timed(fn)
    log(f"{row.name}: first call {row.first_call_s:.3f}s")
    for i in range(repeats):
        dt, out = timed(fn)
        row.times_s.append(dt)
        log(f"{row.name}: repeat {i + 1}/{repeats} {dt:.3f}s")
    row.finish()
    return out


# -- report -------------------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def fmt_flops(x: float | None) -> str:
    return "–" if x is None else f"{x:.3e}"


def markdown_table(rows: list[Row]) -> str:
    head = (
        "| variant | N | analytic FLOPs | compile s | first call s | median s | min s | achieved GFLOP/s | source |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        gflops = "–" if r.flops_per_s is None else f"{r.flops_per_s / 1e9:.1f}"
        lines.append(
            f"| {r.name} | {r.candidates} | {fmt_flops(r.flops)} | {fmt_s(r.compile_s)} | {fmt_s(r.first_call_s)} "
            f"| {fmt_s(r.median_s)} | {fmt_s(r.min_s)} | {gflops} | {r.source} |"
        )
    return "\n".join(lines)


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    lines = ["| ratio | median-based | min-based | analytic FLOPs |", "|---|---:|---:|---:|"]
    for r in ratios:
        lines.append(
            f"| {r['name']} | {r['median']:.3f} | {r['min']:.3f} | {r['flops']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi05_libero", choices=["pi05_libero", "tiny_a"])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="compute dtype (default: preset's)")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 for pi05_libero, 20 for tiny_a")
    parser.add_argument(
        "--measure-baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time N sample_actions calls (default: yes, except pi05_libero on CPU where it is estimated)",
    )
    parser.add_argument("--init", default="auto", choices=["auto", "init_params", "leafwise"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    config = get_preset(args.preset)
    if args.dtype is not None:
        config = dataclasses.replace(config, dtype=args.dtype)
    repeats = args.repeats if args.repeats is not None else (3 if args.preset == "pi05_libero" else 20)
    candidates = sorted(set(args.candidates))
    if any(n < 1 for n in candidates) or repeats < 1:
        raise SystemExit("--candidates and --repeats must be positive")
    device = jax.devices()[0]
    backend = jax.default_backend()
    measure_baseline = args.measure_baseline
    if measure_baseline is None:
        measure_baseline = not (args.preset == "pi05_libero" and backend == "cpu")

    env = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else argv,
        "jax_version": jax.__version__,
        "jaxlib_version": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "backend": backend,
        "device": str(device),
        "device_kind": getattr(device, "device_kind", None),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import jaxlib

        env["jaxlib_version"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    log(f"preset={args.preset} compute dtype={config.dtype} param dtype={args.param_dtype} repeats={repeats} "
        f"candidates={candidates} num_steps={args.num_steps}")
    log(f"jax {env['jax_version']} (jaxlib {env['jaxlib_version']}), backend={backend}, device={device} "
        f"[{env['device_kind']}], cpu={env['cpu_model']} x{env['cpu_count']}")

    # 1. Weights.
    rss_before = current_rss_bytes()
    t0 = time.perf_counter()
    params, init_method = build_params(config, args.param_dtype, args.init, args.seed)
    init_s = time.perf_counter() - t0
    n_params = check_param_count(config, args.preset, params)
    rss_after_weights = current_rss_bytes()
    peak_after_weights = peak_rss_bytes()
    param_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    log(f"weights: {init_method}; {init_s:.1f}s")
    log(f"parameters: {n_params:,} (matches flops.param_count), {gib(param_bytes)} in {args.param_dtype}; "
        f"RSS after weights {gib(rss_after_weights)} (before {gib(rss_before)}), peak so far {gib(peak_after_weights)}")

    actor = pi05.Pi05Actor(config, params)
    del params

    # 2. Inputs.
    obs = libero_observation(config, args.prompt_tokens, args.seed)
    prepared = actor.prepare(obs)
    noise_key = jax.random.key(args.seed + 1)
    noises = {
        n: jax.random.normal(jax.random.fold_in(noise_key, n), (1, n, config.action_horizon, config.action_dim))
        for n in candidates
    }

    # 3. Timings.
    steps = args.num_steps
    rows: list[Row] = []
    enc = Row("encode (prefix: SigLIP x3 + PaliGemma)", 1, flops_lib.prefix_flops(config), "measured")
    prefix = measure(
        enc,
        lambda: actor.encode(obs),
        repeats,
        lambda: actor._encode.lower(actor.params, prepared).compile(),  # fills the cache actor.encode hits
    )
    rows.append(enc)
    log(f"peak RSS after encode: {gib(peak_rss_bytes())}")

    den: dict[int, Row] = {}
    for n in candidates:
        row = Row(f"denoise N={n} ({steps} steps, shared prefix)", n,
                  flops_lib.denoise_flops(config, num_candidates=n, num_steps=steps), "measured")
        noise = noises[n]
        measure(
            row,
            lambda noise=noise: actor.denoise(prefix, noise, steps),
            repeats,
            lambda noise=noise: actor._denoise.lower(actor.params, prefix, noise, steps, 0, False).compile(),
        )
        rows.append(row)
        den[n] = row

    def combined(name: str, n: int, parts: list[Row], flops: int, source: str) -> Row:
        r = Row(name, n, flops, source)
        r.median_s = sum(p.median_s for p in parts)  # type: ignore[misc]
        r.min_s = sum(p.min_s for p in parts)  # type: ignore[misc]
        return r

    sample_flops = flops_lib.sample_actions_flops(config, num_steps=steps)
    faster = None
    if 1 in den:
        faster = combined("FASTER: encode + denoise N=1", 1, [enc, den[1]], sample_flops, "sum of measured rows")
        rows.append(faster)
    shared: dict[int, Row] = {}
    for n in candidates:
        if n == 1:
            continue
        shared[n] = combined(f"best-of-{n}, shared prefix: encode + denoise N={n}", n, [enc, den[n]],
                             flops_lib.prefix_flops(config) + flops_lib.denoise_flops(config, num_candidates=n, num_steps=steps),
                             "sum of measured rows")
        rows.append(shared[n])

    unshared: dict[int, Row] = {}
    if measure_baseline:
        single = Row(f"sample_actions ({steps} steps)", 1, sample_flops, "measured")
        measure(single, lambda: actor.sample_actions(obs, noise=noises[min(candidates)][:, 0], num_steps=steps),
                repeats, None)
        rows.append(single)
        for n in candidates:
            if n == 1:
                continue
            noise = noises[n]
            row = Row(f"best-of-{n}, no sharing: {n} x sample_actions", n, n * sample_flops, "measured")

            def run_n(noise=noise, n=n):
                return [actor.sample_actions(obs, noise=noise[:, i], num_steps=steps) for i in range(n)]

            measure(row, run_n, repeats, None)
            rows.append(row)
            unshared[n] = row
    elif 1 in den:
        for n in candidates:
            if n == 1:
                continue
            row = Row(f"best-of-{n}, no sharing: {n} x sample_actions", n, n * sample_flops,
                      f"ESTIMATED = {n} x (encode + denoise N=1), not measured")
            row.median_s = n * (enc.median_s + den[1].median_s)  # type: ignore[operator]
            row.min_s = n * (enc.min_s + den[1].min_s)  # type: ignore[operator]
            rows.append(row)
            unshared[n] = row

    ratios: list[dict[str, Any]] = []

    def add_ratio(name: str, a: Row, b: Row) -> None:
        ratios.append({"name": name, "median": a.median_s / b.median_s, "min": a.min_s / b.min_s,
                       "flops": a.flops / b.flops})

    if 1 in den:
        add_ratio("encode / (encode + denoise N=1)  [prefix share of one sample]", enc, faster)
        if measure_baseline:
            add_ratio("sample_actions / (encode + denoise N=1)  [consistency]", single, faster)
        for n in candidates:
            if n == 1:
                continue
            add_ratio(f"denoise N={n} / denoise N=1", den[n], den[1])
            add_ratio(f"best-of-{n} shared (encode + denoise {n}) / FASTER (encode + denoise 1)", shared[n], faster)
            if n in unshared:
                tag = "" if measure_baseline else " [baseline estimated]"
                add_ratio(f"best-of-{n} no sharing / best-of-{n} shared{tag}", unshared[n], shared[n])
                add_ratio(f"best-of-{n} no sharing / FASTER{tag}", unshared[n], faster)

    peak = peak_rss_bytes()
    print()
    print(f"### {args.preset}: compute dtype {config.dtype}, weights {args.param_dtype}, batch 1, "
          f"{steps} Euler steps, repeats {repeats}")
    print()
    print(f"- device: {device} ({backend}, {env['device_kind']}); CPU: {env['cpu_model']}, {env['cpu_count']} cores")
    print(f"- jax {env['jax_version']}, jaxlib {env['jaxlib_version']}")
    print(f"- parameters: {n_params:,} ({gib(param_bytes)} in {args.param_dtype}); weights: {init_method}, {init_s:.1f}s")
    print(f"- RSS right after weights: {gib(rss_after_weights)}; peak RSS (ru_maxrss): {gib(peak)}")
    if measure_baseline:
        baseline_note = "measured"
    elif 1 in den:
        baseline_note = "estimated as N x (encode + denoise N=1), not measured"
    else:
        baseline_note = "not run (estimating it needs N=1 in --candidates; or pass --measure-baseline)"
    print(f"- no-sharing baseline: {baseline_note}")
    print()
    print(markdown_table(rows))
    print()
    if ratios:
        print(ratio_table(ratios))
        print()

    if args.json:
        result = {
            "preset": args.preset,
            "config": {"dtype": config.dtype, "param_dtype": args.param_dtype, "action_horizon": config.action_horizon,
                       "action_dim": config.action_dim, "max_token_len": config.max_token_len,
                       "num_prefix_tokens": config.num_prefix_tokens, "prompt_tokens": args.prompt_tokens},
            "num_steps": steps,
            "repeats": repeats,
            "candidates": candidates,
            "baseline_measured": measure_baseline,
            "env": env,
            "params": {"count": n_params, "bytes": param_bytes, "init_method": init_method, "init_s": init_s},
            "memory": {"rss_before_weights_bytes": rss_before, "rss_after_weights_bytes": rss_after_weights,
                       "peak_rss_after_weights_bytes": peak_after_weights, "peak_rss_bytes": peak},
            "rows": [r.as_dict() for r in rows],
            "ratios": ratios,
            "analytic_flops": flops_lib.actor_flops(config).as_dict(),
        }
        write_result(args.json, result)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
