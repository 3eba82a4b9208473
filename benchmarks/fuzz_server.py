"""Server fuzz: malformed and adversarial frames against `faster-vla serve` on loopback, with a good client
served throughout. Not a test: a bounded run (frame count, wall-clock cap, a per-frame size cap) whose figures
go in docs/benchmarks.md (Reliability, "Server fuzz").

One run:
1. starts `faster-vla serve` (a child process, as deployed; by default the built-in pretrained small π0.5,
   `--actor.preset pi05_libero_small`, with `--max-batch 4` so concurrent requests share batched calls),
   waits for /healthz, sends `--warmup` good requests and reads the server's RSS: the baseline;
2. a good client (openpi's own `WebsocketClientPolicy`, one connection for the whole run) sends good requests
   back to back until the fuzz ends; every one must be answered with finite actions;
3. `--workers` threads send `--frames` bad frames, each on a fresh connection (openpi's protocol closes a
   connection after an error), drawn round-robin from the cases below with a seeded RNG, and between them
   good frames on fresh connections (`--good-every`), so bad and good requests arrive together and land in the
   same batches ("concurrent clients mid-batch"). Every frame has an expected outcome fixed by its case:
   `error` (a TEXT frame "faster-vla policy server: request <id> refused|failed: ..." then close code 1011),
   `ok` (finite actions) or `either` (random bit flips, which may or may not leave a valid observation). A
   frame answered otherwise, or not answered within `--frame-timeout`, is counted as a violation;
4. after the fuzz: the server process must be alive and healthy (a crash is any exit); `--warmup` more good
   requests, then its RSS again (final; peak is sampled every 0.2 s during the run); each error frame's request
   id must appear on an ISO 8601-stamped line of the server's log.

Cases (bad unless marked ok): binary garbage; truncated msgpack; random bit flips (either); text frames;
non-map messages; wrong types (state as text, image as a map, prompt as a list, ...); NaN/Inf in the state,
the noise and float images; wrong shapes (state length 3 or 32, image rank 2 or 4, 4 channels, noise shape);
wrong keys (typos, missing keys, an option the base policy does not take); malformed array maps (bfloat16,
complex and object dtypes, a shape its data cannot fill, a negative shape); msgpack nested 100,000 deep; huge
arrays within `--max-frame-mb` (an image side of 5,000, a state of millions of values, a huge noise); and
huge but valid inputs (ok: a 100,000-character prompt, answered with a truncation warning; a 2048² image).

    .venv/bin/python benchmarks/fuzz_server.py --frames 1000 --json benchmarks/results/fuzz_server_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import websockets
import websockets.sync.client
from openpi_client.websocket_client_policy import WebsocketClientPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, write_result  # noqa: E402

from faster_vla.serving import server as serving  # noqa: E402
from faster_vla.serving.server import packb, unpackb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE, WRIST, STATE = "observation/image", "observation/wrist_image", "observation/state"
ERROR_TEXT = re.compile(r"faster-vla policy server: request ([0-9a-f]{8}-\d+) (refused|failed): ")
# A server log line about a request: ISO 8601 timestamp first, the request id after "request ".
LOGGED_REQUEST = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d .*?request ([0-9a-f]{8}-\d+) ",
                            re.MULTILINE)


def good_observation(rng: np.random.Generator, prompt: str = "turn on the stove") -> dict[str, Any]:
    """What openpi's LIBERO client sends: two 224² uint8 cameras, an 8-D float32 state, a prompt."""
    return {IMAGE: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            WRIST: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            STATE: rng.uniform(-1, 1, 8).astype(np.float32), "prompt": prompt}


def _raw_array(dtype: str, shape: list[int], data: bytes) -> dict:
    """An array map as openpi's msgpack-numpy writes it, with whatever fields the case wants."""
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # fixarray of 1, `depth` times, around nil


# -- the cases: (name, expected outcome, frame maker (rng, max_bytes) -> bytes | str) ---------------------------


def _with(rng: np.random.Generator, **changes: Any) -> bytes:
    obs = good_observation(rng)
    obs.update({k.replace("__", "/"): v for k, v in changes.items()})
    return packb(obs)


def _without(rng: np.random.Generator, key: str) -> bytes:
    obs = good_observation(rng)
    del obs[key]
    return packb(obs)


def _renamed(rng: np.random.Generator, key: str, new: str) -> bytes:
    obs = good_observation(rng)
    obs[new] = obs.pop(key)
    return packb(obs)


def _bit_flips(rng: np.random.Generator) -> bytes:
    frame = bytearray(packb(good_observation(rng)))
    for i in rng.integers(0, len(frame), int(rng.integers(1, 9))):
        frame[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(frame)


def _huge_image(rng: np.random.Generator, max_bytes: int) -> bytes:
    side = 5000  # beyond validation.MAX_IMAGE_SIDE (4096)
    width = max(1, min(side, max_bytes // (3 * side)))
    return _with(rng, observation__image=np.zeros((side, width, 3), np.uint8))


def _huge_state(rng: np.random.Generator, max_bytes: int) -> bytes:
    return _with(rng, observation__state=np.zeros(max(9, max_bytes // 4 - 4096), np.float32))


def _huge_noise(rng: np.random.Generator, max_bytes: int) -> bytes:
    return _with(rng, noise=np.zeros((max(1, max_bytes // (4 * 320) - 16), 10, 32), np.float32))


CASES: list[tuple[str, str, Any]] = [
    ("garbage", "error", lambda rng, m: rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()),
    ("truncated_msgpack", "error", lambda rng, m: (lambda f: f[: int(rng.integers(1, len(f)))])(packb(good_observation(rng)))),
    ("bit_flips", "either", lambda rng, m: _bit_flips(rng)),
    ("text_frame", "error", lambda rng, m: "{\"prompt\": \"turn on the stove\"}"),
    ("not_a_map", "error", lambda rng, m: packb([rng.integers(0, 9, 3), "go"])),
    ("nil", "error", lambda rng, m: msgpack.packb(None)),
    ("state_as_text", "error", lambda rng, m: _with(rng, observation__state="0 0 0 0 0 0 0 0")),
    ("image_as_map", "error", lambda rng, m: _with(rng, observation__image={"pixels": 1})),
    ("prompt_as_list", "error", lambda rng, m: _with(rng, prompt=["turn", "on"])),
    ("empty_prompt", "error", lambda rng, m: _with(rng, prompt="  ")),
    ("nan_state", "error", lambda rng, m: _with(rng, observation__state=np.full(8, np.nan, np.float32))),
    ("inf_state", "error", lambda rng, m: _with(rng, observation__state=np.array([np.inf] + [0.0] * 7))),
    ("nan_noise", "error", lambda rng, m: _with(rng, noise=np.full((10, 32), np.nan, np.float32))),
    ("nan_float_image", "error", lambda rng, m: _with(rng, observation__wrist_image=np.full((224, 224, 3), np.nan))),
    ("float_image_0_255", "error", lambda rng, m: _with(rng, observation__image=np.full((224, 224, 3), 128.0))),
    ("short_state", "error", lambda rng, m: _with(rng, observation__state=np.zeros(3, np.float32))),
    ("long_state", "error", lambda rng, m: _with(rng, observation__state=np.zeros(32, np.float32))),
    ("image_rank_2", "error", lambda rng, m: _with(rng, observation__image=np.zeros((224, 224), np.uint8))),
    ("image_rank_4", "error", lambda rng, m: _with(rng, observation__image=np.zeros((1, 224, 224, 3), np.uint8))),
    ("image_4_channels", "error", lambda rng, m: _with(rng, observation__wrist_image=np.zeros((224, 224, 4), np.uint8))),
    ("int64_image", "error", lambda rng, m: _with(rng, observation__image=np.zeros((224, 224, 3), np.int64))),
    ("noise_wrong_shape", "error", lambda rng, m: _with(rng, noise=np.zeros((10, 7), np.float32))),
    ("typo_prompt", "error", lambda rng, m: _renamed(rng, "prompt", "promt")),
    ("typo_state", "error", lambda rng, m: _renamed(rng, STATE, "observation/states")),
    ("typo_option", "error", lambda rng, m: _with(rng, nosie=np.zeros((10, 32), np.float32))),
    ("missing_wrist", "error", lambda rng, m: _without(rng, WRIST)),
    ("option_not_taken", "error", lambda rng, m: _with(rng, num_candidates=4)),
    ("bfloat16_array", "error", lambda rng, m: _with(rng, observation__state=_raw_array("<V2", [8], b"\0" * 16))),
    ("complex_array", "error", lambda rng, m: _with(rng, observation__state=_raw_array("<c8", [8], b"\0" * 64))),
    ("object_array", "error", lambda rng, m: _with(rng, observation__state=_raw_array("|O", [8], b"\0" * 64))),
    ("shape_beyond_data", "error", lambda rng, m: _with(rng, observation__image=_raw_array("|u1", [100_000, 100_000, 3], b"\0" * 16))),
    ("negative_shape", "error", lambda rng, m: _with(rng, observation__state=_raw_array("<f4", [-8], b"\0" * 32))),
    ("nested_100k_deep", "error", lambda rng, m: _nested(100_000)),
    ("huge_image_side", "error", _huge_image),
    ("huge_state", "error", _huge_state),
    ("huge_noise", "error", _huge_noise),
    ("prompt_100k_chars", "ok", lambda rng, m: _with(rng, prompt="turn on the stove " * 5556)),
    ("image_2048", "ok", lambda rng, m: _with(rng, observation__image=rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8))),
]


# -- sending -------------------------------------------------------------------------------------------------


def send_frame(url: str, frame: bytes | str, timeout: float) -> dict[str, Any]:
    """One frame on a fresh connection -> {'outcome': 'error'|'ok'|'violation', ...} with what came back."""
    try:
        with websockets.sync.client.connect(url, compression=None, max_size=None, open_timeout=timeout) as ws:
            ws.recv(timeout)  # metadata
            ws.send(frame)
            answer = ws.recv(timeout)
            if isinstance(answer, str):
                match = ERROR_TEXT.match(answer)
                try:
                    ws.recv(timeout)
                    code = None  # the server kept the connection open after an error
                except websockets.ConnectionClosed as closed:
                    code = None if closed.rcvd is None else closed.rcvd.code
                if match and code == serving.ERROR_CLOSE_CODE:
                    return {"outcome": "error", "request_id": match.group(1), "kind": match.group(2),
                            "first_line": answer.splitlines()[0][:300]}
                return {"outcome": "violation", "why": f"text frame without the error header or close 1011 "
                                                       f"(code {code}): {answer[:200]!r}"}
            reply = unpackb(answer)
            actions = np.asarray(reply.get("actions"))
            if actions.dtype.kind != "f" or not np.isfinite(actions).all():
                return {"outcome": "violation", "why": f"a reply without finite actions: {reply.keys()}"}
            return {"outcome": "ok", "batch_size": reply["server_timing"]["batch_size"],
                    "warnings": reply.get("warnings", [])}
    except (TimeoutError, OSError, websockets.ConnectionClosed, websockets.InvalidHandshake) as exc:
        return {"outcome": "violation", "why": f"no answer: {type(exc).__name__}: {exc}"}


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000, help="bad frames to send (good ones come on top)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent fuzzing clients")
    parser.add_argument("--good-every", type=int, default=10, help="a fuzzing client sends a good frame every N frames")
    parser.add_argument("--max-frame-mb", type=float, default=64.0, help="size cap of the huge-array frames (MiB)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="wall-clock cap of the fuzz phase")
    parser.add_argument("--frame-timeout", type=float, default=120.0, help="seconds a frame may wait for its answer")
    parser.add_argument("--warmup", type=int, default=10, help="good requests before the baseline RSS and after the fuzz")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--rss-tolerance-mb", type=float, default=64.0, help="final RSS this close to the baseline passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-args", default="--actor.preset pi05_libero_small",
                        help="the policy's flags for `faster-vla serve`")
    parser.add_argument("--cases", default=".", help="regex: only the cases whose name matches (default all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.frames < 1 or args.workers < 1 or args.good_every < 1:
        parser.error("--frames, --workers and --good-every must be >= 1")
    max_bytes = int(args.max_frame_mb * 2**20)

    port = _free_port()
    argv = [sys.executable, "-m", "faster_vla.launch.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--max-batch", str(args.max_batch), *shlex.split(args.serve_args)]
    log_dir = Path(tempfile.mkdtemp(prefix="fuzz_server."))
    log_path = log_dir / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        result = run(args, proc, port, max_bytes)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    log = log_path.read_text()
    ids = result.pop("_error_ids")
    logged = set(LOGGED_REQUEST.findall(log))
    unlogged = [rid for rid in ids if rid not in logged]
    result["error_ids_on_iso_8601_log_lines"] = f"{len(ids) - len(unlogged)} of {len(ids)}"
    result["server_log"] = str(log_path)
    result["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result["server_command"] = " ".join(shlex.quote(a) for a in argv[1:])
    result["machine"] = {"cpu": cpu_model(), "cores": len(__import__("os").sched_getaffinity(0)),
                         "python": platform.python_version()}
    result["passed"] = (result["server_crashes"] == 0 and result["violations"] == 0 and not unlogged
                        and result["good_client"]["failed"] == 0 and result["rss_mb"]["back_near_baseline"])
    print(__import__("json").dumps({k: v for k, v in result.items() if k != "by_case"}, indent=2, default=str))
    if args.json is not None:
        print(f"wrote {write_result(args.json, result)}")


def run(args: argparse.Namespace, proc: subprocess.Popen, port: int, max_bytes: int) -> dict[str, Any]:
    """The fuzz against a started server process; see the module docstring."""
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before serving")
        try:
            serving.wait_until_healthy("127.0.0.1", port, timeout=5)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    url = f"ws://127.0.0.1:{port}"
    rng = np.random.default_rng(args.seed)
    client = WebsocketClientPolicy("127.0.0.1", port)
    for _ in range(args.warmup):
        client.infer(good_observation(rng))
    baseline = rss_mb(proc.pid)

    stop = threading.Event()
    peak = [baseline]
    good = {"ok": 0, "failed": 0, "latency_ms": [], "first_failure": None}

    def sample_rss() -> None:
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], rss_mb(proc.pid))
            except (OSError, RuntimeError):
                return

    def good_client() -> None:
        local = np.random.default_rng(args.seed + 1)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                out = client.infer(good_observation(local))
                assert np.isfinite(out["actions"]).all(), "non-finite actions"
                good["ok"] += 1
                good["latency_ms"].append(1e3 * (time.perf_counter() - start))
            except Exception as exc:  # noqa: BLE001 -- counted, the run goes on
                good["failed"] += 1
                good["first_failure"] = good["first_failure"] or f"{type(exc).__name__}: {exc}"[:300]
                time.sleep(0.5)

    cases = [case for case in CASES if re.search(args.cases, case[0])]
    if not cases:
        raise ValueError(f"--cases {args.cases!r} matches none of {[c[0] for c in CASES]}")
    lock = threading.Lock()
    counter = iter(range(args.frames))
    by_case: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    first_violation: dict[str, str] = {}
    error_ids: list[str] = []
    good_frames = collections.Counter()
    examples: dict[str, str] = {}
    fuzz_deadline = time.monotonic() + args.max_seconds

    def fuzzer(worker: int) -> None:
        local = np.random.default_rng([args.seed, worker])
        sent = 0
        while time.monotonic() < fuzz_deadline and proc.poll() is None:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            sent += 1
            if sent % args.good_every == 0:  # a good request among the bad, on its own connection
                answer = send_frame(url, packb(good_observation(local)), args.frame_timeout)
                with lock:
                    good_frames[answer["outcome"]] += 1
                    if answer["outcome"] == "ok" and answer["batch_size"] > 1:
                        good_frames["in_a_batch_of_several"] += 1
                    if answer["outcome"] != "ok":
                        first_violation.setdefault("good_frame", answer.get("why") or answer.get("first_line"))
            name, expected, make = cases[index % len(cases)]
            answer = send_frame(url, make(local, max_bytes), args.frame_timeout)
            outcome = answer["outcome"]
            with lock:
                by_case[name][outcome] += 1
                if outcome == "error":
                    error_ids.append(answer["request_id"])
                    examples.setdefault(name, answer["first_line"])
                if outcome == "violation" or (expected != "either" and outcome != expected):
                    by_case[name]["unexpected"] += 1
                    first_violation.setdefault(name, answer.get("why") or answer.get("first_line") or outcome)
                if outcome == "ok" and answer["warnings"]:
                    examples.setdefault(name, f"ok with warnings {answer['warnings']}")

    threads = [threading.Thread(target=sample_rss, daemon=True), threading.Thread(target=good_client, daemon=True)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    workers = [threading.Thread(target=fuzzer, args=(w,)) for w in range(args.workers)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    fuzz_seconds = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join(args.frame_timeout)

    crashed = proc.poll() is not None
    healthy = False
    if not crashed:
        try:
            serving.wait_until_healthy("127.0.0.1", port, timeout=10)
            healthy = True
            after = WebsocketClientPolicy("127.0.0.1", port)
            for _ in range(args.warmup):
                after.infer(good_observation(rng))
        except Exception:  # noqa: BLE001 -- reported as unhealthy
            healthy = False
    final = rss_mb(proc.pid) if not crashed else float("nan")
    sent = sum(sum(v for k, v in c.items() if k != "unexpected") for c in by_case.values())
    latency = np.asarray(good["latency_ms"]) if good["latency_ms"] else np.asarray([np.nan])
    return {
        "bad_frames_sent": sent,
        "frames_requested": args.frames,
        "fuzz_seconds": round(fuzz_seconds, 1),
        "server_crashes": int(crashed),
        "server_healthy_after": healthy,
        "answered": {k: sum(c[k] for c in by_case.values()) for k in ("error", "ok", "violation")},
        "violations": sum(c["unexpected"] for c in by_case.values()) + good_frames["error"] + good_frames["violation"],
        "first_violation_by_case": first_violation,
        "good_client": {"ok": good["ok"], "failed": good["failed"], "first_failure": good["first_failure"],
                        "latency_ms_p50": round(float(np.median(latency)), 1),
                        "latency_ms_max": round(float(np.max(latency)), 1)},
        "good_frames_among_the_bad": dict(good_frames),
        "rss_mb": {"baseline": round(baseline, 1), "peak": round(peak[0], 1), "final": round(final, 1),
                   "tolerance": args.rss_tolerance_mb,
                   "back_near_baseline": bool(final - baseline <= args.rss_tolerance_mb)},
        "settings": {"workers": args.workers, "good_every": args.good_every, "max_frame_mb": args.max_frame_mb,
                     "max_batch": args.max_batch, "seed": args.seed, "cases": [c[0] for c in cases]},
        "by_case": {name: dict(c) for name, c in sorted(by_case.items())},
        "example_answers": examples,
        "_error_ids": error_ids,
    }


if __name__ == "__main__":
    main()
