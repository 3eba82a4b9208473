"""Policy-serving load test: K concurrent openpi clients against `faster-vla serve`, next to in-process infer.

Not a test: it answers "what does serving cost on top of the policy?". One run, in this order:
1. build the same policy the server serves (same preset, seed, steps) in this process, and start the server
   (`faster-vla serve`, a separate process as openpi deploys it; `--server thread` keeps it in this process,
   e.g. on a GPU where two processes would each claim the memory); wait for /healthz;
2. overhead, for `--duration` s: blocks of `--block` in-process `policy.infer` calls alternate with blocks of
   the same observation sent by one `openpi_client` `WebsocketClientPolicy` (alternating keeps load drift from
   other processes out of the ratio); the ratio and difference of the medians are reported, and the served
   latency minus the server's own `infer_ms` (transport + codec), and the msgpack codec alone;
3. load, for each K in `--clients`: K threads, each its own client, send LIBERO-shaped observations (224² uint8
   cameras, as openpi's LIBERO client sends them) back to back for `--duration` s: requests/s, latency
   p50/p95/p99, and the server's `infer_ms` (latency - infer_ms = transport + codec + waiting for the others:
   the server runs one request at a time).

On a small CPU the clients, the codec and the server share the cores, which is part of what is measured.

    .venv/bin/python benchmarks/bench_serving.py --json benchmarks/results/serving_cpu.json
    .venv/bin/python benchmarks/bench_serving.py --clients 1 4 16 --duration 30 --server thread   # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from faster_vla import serving
from faster_vla.launch.serve import ServeArgs, build_policy, warm_up

REPO = Path(__file__).resolve().parents[1]
PROMPT = "put the black bowl on the plate"
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


def summary_ms(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    return {"n": int(arr.size), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def time_alternating(policy: Any, client: WebsocketClientPolicy, obs: dict, duration: float,
                     block: int) -> dict[str, list[float]]:
    """Alternate blocks of in-process and served inference of `obs` for `duration` s; ms per call."""
    times: dict[str, list[float]] = {"in_process": [], "served": [], "server_infer": []}
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for _ in range(block):
            start = time.perf_counter()
            policy.infer(obs)
            times["in_process"].append(1e3 * (time.perf_counter() - start))
        for _ in range(block):
            start = time.perf_counter()
            reply = client.infer(obs)
            times["served"].append(1e3 * (time.perf_counter() - start))
            times["server_infer"].append(reply["server_timing"]["infer_ms"])
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


def load(host: str, port: int, clients: int, duration: float, image_size: int) -> dict[str, Any]:
    """`clients` threads sending back to back for `duration` s after one untimed request each."""
    connections = [WebsocketClientPolicy(host, port) for _ in range(clients)]
    observations = [observation(100 + i, image_size) for i in range(clients)]
    for conn, obs in zip(connections, observations, strict=True):
        conn.infer(obs)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    server_ms: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    window: dict[str, float] = {}

    def worker(i: int) -> None:
        barrier.wait()
        try:
            while time.perf_counter() < window["end"]:
                start = time.perf_counter()
                reply = connections[i].infer(observations[i])
                latencies[i].append(1e3 * (time.perf_counter() - start))
                server_ms[i].append(reply["server_timing"]["infer_ms"])
        except BaseException as exc:  # noqa: BLE001 -- reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + duration
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - window["start"]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    every = [x for per in latencies for x in per]
    return {
        "clients": clients,
        "requests": len(every),
        "elapsed_s": elapsed,
        "requests_per_s": len(every) / elapsed,
        "latency_ms": summary_ms(every),
        "server_infer_ms": summary_ms([x for per in server_ms for x in per]),
        "per_client_requests": [len(per) for per in latencies],
    }


class ServerProcess:
    """`faster-vla serve` in a child process, stopped with SIGTERM."""

    def __init__(self, port: int, num_steps: int, seed: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faster_vla.launch.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--num-steps", str(num_steps), "--seed", str(seed)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent client counts K")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per K (and per in-process pass)")
    parser.add_argument("--num-steps", type=int, default=10, help="Euler denoising steps per request")
    parser.add_argument("--block", type=int, default=3, help="calls per block in the alternating overhead phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="camera side sent by the clients")
    parser.add_argument("--server", choices=["process", "thread"], default="process",
                        help="serve from a child process (as deployed) or a thread of this process")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.duration <= 0 or args.block < 1:
        parser.error("--clients and --block must be >= 1 and --duration > 0")

    load_at_start = os.getloadavg()  # other processes on a shared machine show up in every figure
    serve_args = ServeArgs(num_steps=args.num_steps, seed=args.seed)
    port = free_port()
    # Start the server first: it builds and compiles while this process does the same.
    server: ServerProcess | serving.BackgroundServer | None = None
    if args.server == "process":
        server = ServerProcess(port, args.num_steps, args.seed)
    policy = build_policy(serve_args)
    warm_up(policy)
    if args.server == "thread":
        server = serving.BackgroundServer(policy, "127.0.0.1", port).start()
    try:
        serving.wait_until_healthy("127.0.0.1", port, timeout=600)
        obs = observation(0, args.image_size)
        policy.infer(obs)  # untimed
        client = WebsocketClientPolicy("127.0.0.1", port)
        client.infer(obs)
        paired = time_alternating(policy, client, obs, args.duration, args.block)
        codec = time_codec(obs, policy.infer(obs))
        served = []
        for k in args.clients:
            served.append(load("127.0.0.1", port, k, args.duration, args.image_size))
            row = served[-1]
            print(f"K={k:<3} {row['requests_per_s']:7.2f} req/s   latency p50 {row['latency_ms']['p50']:8.1f}  "
                  f"p95 {row['latency_ms']['p95']:8.1f}  p99 {row['latency_ms']['p99']:8.1f} ms   "
                  f"server infer p50 {row['server_infer_ms']['p50']:8.1f} ms", flush=True)
    finally:
        server_log = server.stop() if isinstance(server, ServerProcess) else (server.stop() if server else None)

    in_process, one = summary_ms(paired["in_process"]), summary_ms(paired["served"])
    server_infer = summary_ms(paired["server_infer"])
    overhead = {
        "in_process_ms": in_process,
        "served_ms": one,
        "server_infer_ms": server_infer,
        "ratio_p50": one["p50"] / in_process["p50"],
        # Per adjacent pair of blocks, then the median: robust to load drifting between blocks.
        "ratio_median_of_block_pairs": float(np.median([
            np.median(paired["served"][i:i + args.block]) / np.median(paired["in_process"][i:i + args.block])
            for i in range(0, min(len(paired["served"]), len(paired["in_process"])), args.block)
        ])),
        "difference_p50_ms": one["p50"] - in_process["p50"],
        "served_minus_server_infer_p50_ms": float(np.median(np.subtract(paired["served"], paired["server_infer"]))),
    }
    result = {
        "benchmark": "serving",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "policy": policy.metadata.get("policy"),
        "server": args.server,
        "num_steps": args.num_steps,
        "image_size": args.image_size,
        "duration_s": args.duration,
        "block": args.block,
        "device": jax.devices()[0].platform,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_1_5_15min": {"start": load_at_start, "end": os.getloadavg()},
        "overhead_k1_vs_in_process": overhead,
        "codec": codec,
        "served": served,
    }
    print(f"one client, alternating with in-process ({in_process['n']} + {one['n']} calls): in-process p50 "
          f"{in_process['p50']:.1f} ms, served p50 {one['p50']:.1f} ms: x{overhead['ratio_p50']:.3f} "
          f"({overhead['difference_p50_ms']:+.1f} ms; block pairs x{overhead['ratio_median_of_block_pairs']:.3f}); "
          f"served - server infer p50 "
          f"{overhead['served_minus_server_infer_p50_ms']:.2f} ms")
    print(f"codec: observation {codec['observation_bytes'] / 1024:.0f} KiB, {codec['observation_ms']:.3f} ms; reply "
          f"{codec['reply_bytes']} B, {codec['reply_ms']:.3f} ms")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if server_log and "Traceback" in server_log:
        print("server log:\n" + server_log, file=sys.stderr)


if __name__ == "__main__":
    main()
