"""Policy-serving load test: K concurrent openpi clients against `faster-vla serve`, next to in-process infer.

Not a test: it answers "what does serving cost on top of the policy?". One run, in this order:
1. build the same policy the server serves in this process, and start the server (`faster-vla serve`, a
   separate process as openpi deploys it; `--server thread` keeps it in this process, e.g. on a GPU where two
   processes would each claim the memory); wait for /healthz. The policy is the base small π0.5 (same preset,
   seed, steps), or with `--bundle PATH` an exported FASTER bundle (`faster_vla.serving.bundle.load_policy`: Q^dn
   scores N seeds, one is denoised, the edit policy edits it), served by `faster-vla serve --bundle PATH`;
   `--make-bundle DIR` first builds a small bundle (DIR/run, DIR/bundle) from a fresh, untrained learner, as
   tests/test_bundle.py does, and serves that;
2. overhead: blocks of `--block` in-process `policy.infer` calls alternate with blocks of the same
   observation sent by one `openpi_client` `WebsocketClientPolicy` (alternating keeps load drift from other
   processes out of the ratio), for `--requests` calls of each or for `--duration` s; the ratio and difference
   of the medians are reported, and the served latency minus the server's own `infer_ms` (transport + codec),
   and the msgpack codec alone;
3. load, for each K in `--clients`: K threads, each its own client, send LIBERO-shaped observations (224² uint8
   cameras, as openpi's LIBERO client sends them) back to back, `--requests` requests each or for `--duration`
   s (exactly one of the two bounds applies; `--duration 20` when neither is given): requests/s, latency
   p50/p95/p99, errors, the server's `infer_ms` and the batch sizes it ran (latency - infer_ms = transport +
   codec + waiting for the others). Side by side, for each K: first against a server started with
   `--max-batch 1` (one request at a time), then against a second server started with `--max-batch N`
   (`--max-batch`, default 4: waiting requests with the same options share one batched call); the ratio of
   their requests/s and p50 latencies is reported. `--max-batch 1` runs the unbatched server only. Before the
   load phase, in this process: N single `infer` calls alternate with one `infer_batch` of the same N
   observations, the batching gain on the policy alone (ms per row).

A failed request (an error frame from the server, a dropped connection, no reply within `--request-timeout`)
is counted, not raised: each K reports its error count and the first error's message, the client reconnects
and goes on. Requests/s and latencies count successful requests only.

On a small CPU the clients, the codec and the server share the cores, which is part of what is measured.

    .venv/bin/python benchmarks/bench_serving.py --requests 20 --clients 1 2 4 --max-batch 4 \\
        --json benchmarks/results/serving_cpu.json
    rm -rf /tmp/bench_bundle && .venv/bin/python benchmarks/bench_serving.py --requests 20 --clients 1 2 4 \\
        --max-batch 4 --make-bundle /tmp/bench_bundle --json benchmarks/results/serving_bundle_cpu.json
    .venv/bin/python benchmarks/bench_serving.py --clients 1 4 16 --duration 30 --max-batch 16 \\
        --server thread   # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from openpi_client import msgpack_numpy as openpi_msgpack
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from bench_common import write_result
from faster_vla.serving import server as serving
from faster_vla.launch.serve import ServeArgs, build_policy, warm_up

REPO = Path(__file__).resolve().parents[1]
PROMPT = "put the black bowl on the plate"
DEFAULT_DURATION_S = 20.0
# openpi_client 0.1.2 opens its connection without a context manager, which recent websockets flag (it works).
warnings.filterwarnings("ignore", message=r"connect\(\) must be used as a context manager")


def observation(seed: int, image_size: int) -> dict[str, Any]:
    """What openpi's LIBERO client sends: resized-and-padded uint8 cameras, 8-D state, the prompt."""
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "observation/state": rng.uniform(-1, 1, 8).astype(np.float32),
        "prompt": PROMPT,
    }


def summary_ms(samples: list[float]) -> dict[str, float] | None:
    """n, mean, p50/p95/p99, max of a list of ms; None when it is empty (every request failed)."""
    if not samples:
        return None
    arr = np.asarray(samples)
    return {"n": int(arr.size), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


class CountingClient:
    """An openpi `WebsocketClientPolicy` that counts failed requests instead of raising them.

    After a failure the connection is dropped (the server closes it after an error frame anyway) and the next
    request opens a new one; a failed connect counts as that request's failure.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn: WebsocketClientPolicy | None = None
        self.errors = 0
        self.first_error: str | None = None
        self.inflight_since: float | None = None  # perf_counter at the start of the running request
        self.timed_out = False

    def infer(self, obs: dict) -> tuple[float, dict] | None:
        """(latency ms, reply), or None when the request failed (counted)."""
        try:
            if self.conn is None:
                self.conn = WebsocketClientPolicy(self.host, self.port)
            self.inflight_since = start = time.perf_counter()
            reply = self.conn.infer(obs)
            return 1e3 * (time.perf_counter() - start), reply
        except Exception as exc:  # noqa: BLE001 -- counted and reported with the results
            self.errors += 1
            if self.first_error is None:
                reason = "no reply within --request-timeout; " if self.timed_out else ""
                self.first_error = f"{reason}{type(exc).__name__}: {exc}"[:2000]
            self.timed_out = False
            self.close()
            time.sleep(0.05)  # a server that is down refuses at once: do not spin
            return None
        finally:
            self.inflight_since = None

    def abort(self) -> None:
        """Called from another thread on a request that ran past the timeout: closing unblocks its recv."""
        self.timed_out = True
        self.close()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn._ws.close()  # openpi_client 0.1.2 has no public close
            except Exception:  # noqa: BLE001
                pass


def time_alternating(policy: Any, client: CountingClient, obs: dict, block: int, *,
                     requests: int | None, duration: float | None) -> dict[str, Any]:
    """Alternate blocks of in-process and served inference of `obs`, for `requests` calls of each (rounded up
    to whole blocks) or for `duration` s; ms per call, and the ratio of medians per pair of blocks."""
    times: dict[str, Any] = {"in_process": [], "served": [], "server_infer": [], "block_ratios": []}
    deadline = None if duration is None else time.perf_counter() + duration
    errors_before = client.errors
    while (len(times["in_process"]) < requests) if requests is not None else (time.perf_counter() < deadline):
        in_process, served = [], []
        for _ in range(block):
            start = time.perf_counter()
            policy.infer(obs)
            in_process.append(1e3 * (time.perf_counter() - start))
        for _ in range(block):
            result = client.infer(obs)
            if result is not None:
                served.append(result[0])
                times["server_infer"].append(result[1]["server_timing"]["infer_ms"])
        times["in_process"] += in_process
        times["served"] += served
        if served:
            times["block_ratios"].append(float(np.median(served) / np.median(in_process)))
    times["errors"] = client.errors - errors_before
    return times


def time_codec(obs: dict, reply: dict, repeats: int = 200) -> dict[str, float]:
    """Median ms to encode+decode one observation (client packer, server decoder) and one reply (the reverse)."""
    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return float(np.median(times))

    packed_obs, packed_reply = openpi_msgpack.packb(obs), serving.packb(reply)
    return {
        "observation_bytes": len(packed_obs),
        "reply_bytes": len(packed_reply),
        "observation_ms": median_ms(lambda: serving.unpackb(openpi_msgpack.packb(obs))),
        "reply_ms": median_ms(lambda: openpi_msgpack.unpackb(serving.packb(reply))),
    }


def time_batch_in_process(policy: Any, observations: list[dict], rounds: int) -> dict[str, Any]:
    """In process, no server: `rounds` alternations of b single `infer` calls and one `infer_batch` of the same b
    observations (b = len(observations)); ms per row of each, and the ratio of their medians per round.

    What batching saves on the policy alone, without the queueing and client timing of the load phase."""
    single, batched, ratios = [], [], []
    b = len(observations)
    for _ in range(rounds):
        start = time.perf_counter()
        for obs in observations:
            policy.infer(obs)
        single.append(1e3 * (time.perf_counter() - start) / b)
        start = time.perf_counter()
        policy.infer_batch(observations)
        batched.append(1e3 * (time.perf_counter() - start) / b)
        ratios.append(single[-1] / batched[-1])
    return {"batch": b, "rounds": rounds, "single_ms_per_row": summary_ms(single),
            "batched_ms_per_row": summary_ms(batched),
            # > 1: a row is cheaper in a batch. Per round (adjacent), then the median: robust to load drift.
            "speedup_median_of_rounds": float(np.median(ratios))}


def load(host: str, port: int, clients: int, image_size: int, *, requests: int | None, duration: float | None,
         request_timeout: float) -> dict[str, Any]:
    """`clients` threads, each sending back to back `requests` requests or for `duration` s, after one untimed
    request each (a failure there is counted apart, as `warmup_errors`; `first_error` is the first of either)."""
    connections = [CountingClient(host, port) for _ in range(clients)]
    observations = [observation(100 + i, image_size) for i in range(clients)]
    for conn, obs in zip(connections, observations, strict=True):
        conn.infer(obs)
    warmup_errors = [conn.errors for conn in connections]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    server_ms: list[list[float]] = [[] for _ in range(clients)]
    batch_sizes: list[list[int]] = [[] for _ in range(clients)]
    attempts = [0] * clients
    barrier = threading.Barrier(clients + 1)
    window: dict[str, float] = {}

    def worker(i: int) -> None:
        barrier.wait()
        while (attempts[i] < requests) if requests is not None else (time.perf_counter() < window["end"]):
            attempts[i] += 1
            result = connections[i].infer(observations[i])
            if result is not None:
                latencies[i].append(result[0])
                server_ms[i].append(result[1]["server_timing"]["infer_ms"])
                batch_sizes[i].append(result[1]["server_timing"].get("batch_size", 1))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + (duration or 0.0)
    barrier.wait()
    while any(t.is_alive() for t in threads):  # watchdog: a request past the timeout is aborted (and counted)
        for t in threads:
            t.join(0.2)
        now = time.perf_counter()
        for conn in connections:
            since = conn.inflight_since
            if since is not None and now - since > request_timeout:
                conn.abort()
    elapsed = time.perf_counter() - window["start"]
    for conn in connections:
        conn.close()
    every = [x for per in latencies for x in per]
    errors = [conn.errors - before for conn, before in zip(connections, warmup_errors, strict=True)]
    return {
        "clients": clients,
        "requests_attempted": sum(attempts),
        "requests": len(every),
        "errors": sum(errors),  # of the attempted (timed) requests
        "first_error": next((c.first_error for c in connections if c.first_error is not None), None),
        "per_client_errors": errors,
        "warmup_errors": sum(warmup_errors),  # the untimed first request of each client
        "elapsed_s": elapsed,
        "requests_per_s": len(every) / elapsed,
        "latency_ms": summary_ms(every),
        "server_infer_ms": summary_ms([x for per in server_ms for x in per]),
        # The batch each successful request ran in, as the server reports it: mean and count per size.
        "mean_batch_size": float(np.mean([x for per in batch_sizes for x in per])) if every else None,
        "batch_size_counts": {str(int(size)): int(n) for size, n in
                              zip(*np.unique([x for per in batch_sizes for x in per], return_counts=True))},
        "per_client_requests": [len(per) for per in latencies],
    }


def make_bundle(directory: Path, *, num_steps: int, num_candidates: int, seed: int) -> Path:
    """A small FASTER bundle from a fresh (untrained) learner, made as tests/test_bundle.py makes its fixture:
    a run folder (config.json by RunLogger, one RunCheckpointer checkpoint) at DIR/run, exported to DIR/bundle.

    The actor is the base small policy's (`pi05_small`, random weights, seed 0); the critics are small and at
    their init, so the selected seeds are arbitrary, but every step of FASTER's acting path runs."""
    from faster_vla.acting.actor_source import ActorSource
    from faster_vla.serving.bundle import export_bundle
    from faster_vla.runs.config import CriticConfig, TrainConfig, learner_config
    from faster_vla.rl.learner import Learner
    from faster_vla.policies.config import get_preset
    from faster_vla.rl.replay import ReplayBuffer
    from faster_vla.runs.checkpoint import RunCheckpointer
    from faster_vla.runs.logger import RunLogger
    from faster_vla.rl.selection import SelectionConfig

    run_dir, bundle = directory / "run", directory / "bundle"
    for path in (run_dir, bundle):
        if path.exists():
            raise SystemExit(f"{path} already exists: serve an existing bundle with --bundle {bundle}, or pass "
                             "another --make-bundle folder")
    config = TrainConfig(
        run_dir=run_dir, actor=ActorSource(), num_steps=num_steps, seed=seed,
        selection=SelectionConfig("faster", num_candidates=num_candidates),
        critics=CriticConfig(hidden_dims=(32,), num_members=3, feature_proj_dim=16, state_embed_dim=8),
        wandb_mode="disabled", progress=False,
    )
    lconfig = learner_config(config, get_preset(config.actor.preset))
    learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=seed)
    with RunLogger(run_dir, config, wandb_mode="disabled", progress=False):
        pass
    with RunCheckpointer(run_dir / "checkpoints") as checkpointer:
        checkpointer.save(0, learner, ReplayBuffer(100), np.random.default_rng(seed), {"episodes": 0})
    return export_bundle(run_dir, bundle)


class ServerProcess:
    """`faster-vla serve` in a child process, stopped with SIGTERM."""

    def __init__(self, port: int, num_steps: int, seed: int, bundle: Path | None, max_batch: int) -> None:
        self.port = port
        policy = ["--bundle", str(bundle)] if bundle is not None else ["--num-steps", str(num_steps)]
        self.argv = [sys.executable, "-m", "faster_vla.launch.cli", "serve", "--host", "127.0.0.1", "--port",
                     str(port), *policy, "--seed", str(seed), "--max-batch", str(max_batch)]
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before serving:\n{self.stop()}")
            try:
                serving.wait_until_healthy("127.0.0.1", self.port, timeout=5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            log, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            log, _ = self.proc.communicate()
        return log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_line() -> str:
    """This run's command as typed from the repository root (the interpreter relative to it when inside)."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(exe), *sys.argv])


def short(message: str | None) -> str | None:
    """An error message's first line, and its last when they differ (a server traceback ends in the cause)."""
    if message is None:
        return None
    lines = message.strip().splitlines() or [""]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def fmt(summary: dict[str, float] | None, key: str) -> str:
    return "-" if summary is None else f"{summary[key]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent client counts K")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--requests", type=int,
                       help="requests per client for each K, and in-process + served calls in the overhead phase")
    bound.add_argument("--duration", type=float,
                       help=f"seconds per K and for the overhead phase (default {DEFAULT_DURATION_S:g} when "
                            "--requests is not given)")
    parser.add_argument("--num-steps", type=int, default=10,
                        help="Euler denoising steps per request (with --make-bundle: the bundle's; a --bundle "
                             "keeps its own)")
    parser.add_argument("--block", type=int, default=3, help="calls per block in the alternating overhead phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="camera side sent by the clients")
    parser.add_argument("--server", choices=["process", "thread"], default="process",
                        help="serve from a child process (as deployed) or a thread of this process")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="serve this exported bundle instead of the base small policy")
    source.add_argument("--make-bundle", type=Path, metavar="DIR",
                        help="build a small FASTER bundle at DIR/bundle (run folder DIR/run) and serve it")
    parser.add_argument("--bundle-candidates", type=int, default=8,
                        help="N, the seeds Q^dn scores per request, in the bundle --make-bundle builds")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="the batched server's --max-batch; each K also runs against a --max-batch 1 server "
                             "(1: only that one)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="a request without a reply after this many s is aborted and counted as an error")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        duration = DEFAULT_DURATION_S
    if min(args.clients) < 1 or args.block < 1 or (requests is not None and requests < 1) or (
            duration is not None and duration <= 0) or args.bundle_candidates < 1 or args.request_timeout <= 0 or (
            args.max_batch < 1):
        parser.error("--clients, --block, --requests, --bundle-candidates and --max-batch must be >= 1; --duration "
                     "and --request-timeout > 0")
    if args.bundle is not None and not args.bundle.is_dir():
        parser.error(f"--bundle {args.bundle}: no such folder")

    command = command_line()
    load_at_start = os.getloadavg()  # other processes on a shared machine show up in every figure
    bundle = args.bundle
    made_bundle_s = None
    if args.make_bundle is not None:
        start = time.perf_counter()
        bundle = make_bundle(args.make_bundle, num_steps=args.num_steps, num_candidates=args.bundle_candidates,
                             seed=args.seed)
        made_bundle_s = time.perf_counter() - start
        print(f"built bundle {bundle} in {made_bundle_s:.1f} s", flush=True)
    serve_args = ServeArgs(num_steps=args.num_steps, seed=args.seed, bundle=bundle)
    max_batches = sorted({1, args.max_batch})  # the unbatched server first: the overhead phase runs against it
    ports = {mb: free_port() for mb in max_batches}
    # Start the servers first: they build and compile while this process does the same.
    servers: dict[int, ServerProcess | serving.BackgroundServer] = {}
    server_logs: dict[int, str | None] = {}
    try:
        if args.server == "process":
            for mb in max_batches:
                servers[mb] = ServerProcess(ports[mb], args.num_steps, args.seed, bundle, mb)
        policy = build_policy(serve_args)
        warm_up(policy, max(max_batches))  # in thread mode the batched server calls infer_batch on this policy
        for mb in max_batches:
            if args.server == "thread":
                servers[mb] = serving.BackgroundServer(policy, "127.0.0.1", ports[mb], max_batch=mb).start()
                serving.wait_until_healthy("127.0.0.1", ports[mb], timeout=600)
            else:
                servers[mb].wait_until_healthy(timeout=900)
        port = ports[1]
        obs = observation(0, args.image_size)
        policy.infer(obs)  # untimed
        client = CountingClient("127.0.0.1", port)
        client.infer(obs)  # untimed; a failure counts in the overhead phase's errors
        paired = time_alternating(policy, client, obs, args.block, requests=requests, duration=duration)
        client.close()
        codec = time_codec(obs, policy.infer(obs))
        batch_in_process = None
        if args.max_batch > 1:
            rounds = max(3, (requests or 0) // args.max_batch)  # about as many rows as one client's requests
            batch_in_process = time_batch_in_process(
                policy, [observation(200 + i, args.image_size) for i in range(args.max_batch)], rounds)
        served = []
        print(f"{'K':>3} {'max batch':>9} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
              f"{'mean batch':>10} {'server infer p50 ms':>20}", flush=True)
        for k in args.clients:
            for mb in max_batches:  # side by side per K, so load drift hits both alike
                row = load("127.0.0.1", ports[mb], k, args.image_size, requests=requests, duration=duration,
                           request_timeout=args.request_timeout)
                row["max_batch"] = mb
                served.append(row)
                mean_batch = "-" if row["mean_batch_size"] is None else f"{row['mean_batch_size']:.2f}"
                print(f"{k:>3} {mb:>9} {row['requests_per_s']:>8.2f} {fmt(row['latency_ms'], 'p50'):>9} "
                      f"{fmt(row['latency_ms'], 'p99'):>9} {row['errors']:>7} {mean_batch:>10} "
                      f"{fmt(row['server_infer_ms'], 'p50'):>20}", flush=True)
                if row["errors"] or row["warmup_errors"]:
                    print(f"    {row['warmup_errors']} failed untimed first requests; first error: "
                          f"{short(row['first_error'])}", flush=True)
    finally:
        for mb, server in servers.items():
            server_logs[mb] = server.stop()

    in_process, one = summary_ms(paired["in_process"]), summary_ms(paired["served"])
    server_infer = summary_ms(paired["server_infer"])
    overhead = {
        "in_process_ms": in_process,
        "served_ms": one,
        "server_infer_ms": server_infer,
        "errors": paired["errors"],
        "first_error": client.first_error,
        "ratio_p50": None if one is None else one["p50"] / in_process["p50"],
        # Per adjacent pair of blocks, then the median: robust to load drifting between blocks.
        "ratio_median_of_block_pairs": float(np.median(paired["block_ratios"])) if paired["block_ratios"] else None,
        "difference_p50_ms": None if one is None else one["p50"] - in_process["p50"],
        "served_minus_server_infer_p50_ms": (
            float(np.median(np.subtract(paired["served"], paired["server_infer"]))) if one is not None else None),
    }
    # Per K: the batched server's requests/s and p50 latency over the unbatched server's (measured back to back).
    batching = []
    if args.max_batch > 1:
        for k in args.clients:
            one_at_a_time, batched = (next(r for r in served if r["clients"] == k and r["max_batch"] == mb)
                                      for mb in max_batches)
            ok = one_at_a_time["requests"] and batched["requests"]
            batching.append({
                "clients": k,
                "requests_per_s_ratio": batched["requests_per_s"] / one_at_a_time["requests_per_s"] if ok else None,
                "latency_p50_ratio": (batched["latency_ms"]["p50"] / one_at_a_time["latency_ms"]["p50"]
                                      if ok else None),
                "mean_batch_size": batched["mean_batch_size"],
            })
    metadata = policy.metadata
    result = {
        "benchmark": "serving",
        "command": command,
        "argv": sys.argv,
        "cwd": str(Path.cwd()),
        "server_commands": {str(mb): shlex.join(server.argv) for mb, server in servers.items()
                            if isinstance(server, ServerProcess)} or None,
        "policy": metadata.get("policy"),
        "bundle": None if bundle is None else str(bundle),
        "bundle_built_s": made_bundle_s,
        "selection": metadata.get("selection"),
        "server": args.server,
        "num_steps": (json.loads((bundle / "faster_vla_bundle.json").read_text())["actor"]["num_steps"]
                      if bundle is not None else args.num_steps),
        "image_size": args.image_size,
        "requests_per_client": requests,
        "duration_s": duration,
        "block": args.block,
        "request_timeout_s": args.request_timeout,
        "device": jax.devices()[0].platform,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_1_5_15min": {"start": load_at_start, "end": os.getloadavg()},
        "overhead_k1_vs_in_process": overhead,
        "codec": codec,
        "max_batch": args.max_batch,
        "batch_in_process": batch_in_process,
        "served": served,
        "batched_vs_unbatched": batching,
    }
    if one is not None:
        print(f"one client, alternating with in-process ({in_process['n']} + {one['n']} calls): in-process p50 "
              f"{in_process['p50']:.1f} ms, served p50 {one['p50']:.1f} ms: x{overhead['ratio_p50']:.3f} "
              f"({overhead['difference_p50_ms']:+.1f} ms; block pairs x{overhead['ratio_median_of_block_pairs']:.3f}); "
              f"served - server infer p50 {overhead['served_minus_server_infer_p50_ms']:.2f} ms; "
              f"{overhead['errors']} errors")
    else:
        print(f"one client, alternating with in-process: every served call failed ({overhead['errors']} errors; "
              f"first: {short(overhead['first_error'])})")
    print(f"codec: observation {codec['observation_bytes'] / 1024:.0f} KiB, {codec['observation_ms']:.3f} ms; reply "
          f"{codec['reply_bytes']} B, {codec['reply_ms']:.3f} ms")
    if batch_in_process is not None:
        print(f"in process, batch of {args.max_batch} vs {args.max_batch} single calls ({batch_in_process['rounds']} "
              f"rounds): {batch_in_process['batched_ms_per_row']['p50']:.1f} vs "
              f"{batch_in_process['single_ms_per_row']['p50']:.1f} ms per row (p50); per-round speedup "
              f"x{batch_in_process['speedup_median_of_rounds']:.3f}")
    for row in batching:
        if row["requests_per_s_ratio"] is not None:
            print(f"K={row['clients']}: --max-batch {args.max_batch} vs 1: requests/s x{row['requests_per_s_ratio']:.3f}, "
                  f"p50 latency x{row['latency_p50_ratio']:.3f} (mean batch {row['mean_batch_size']:.2f})")
    if args.json is not None:
        write_result(args.json, result, indent=1)
    for mb, log in server_logs.items():
        if log and "Traceback" in log:
            print(f"server log (--max-batch {mb}):\n" + log, file=sys.stderr)


if __name__ == "__main__":
    main()
