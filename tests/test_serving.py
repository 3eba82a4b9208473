"""openpi-compatible serving, driven by openpi's own client package (`openpi-client` from the package index)."""

from __future__ import annotations

import copy
import datetime
import errno
import gc
import http.client
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy as openpi_msgpack
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from faster_vla.serving import server as serving
from faster_vla.acting.actor_source import ActorSource
from faster_vla.launch import serve as serve_cli
from faster_vla.launch.demo import libero_observation
from faster_vla.launch.serve import ServeArgs, build_policy, check_args, warm_up
from faster_vla.policies.policy import batch_bucket, batch_buckets
from faster_vla.policies.validation import InvalidInputError
from faster_vla.serving.server import BackgroundServer, packb, unpackb

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 3
# openpi_client 0.1.2 opens its connection without a context manager, which recent websockets flag (it works).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


class EchoPolicy:
    """A policy without a noise parameter that echoes what it was sent (for protocol-level checks)."""

    metadata = {"kind": "echo"}

    def infer(self, obs: dict) -> dict:
        if "explode" in obs:
            raise KeyError("asked to explode")
        return {"actions": np.zeros((2, 7), np.float32), "echo": obs.get("blob")}


class GatedPolicy:
    """Delegates to a policy, each call held until `gate` opens: requests pile up meanwhile, so the server batches.

    `calls` records the batch size of every call, a failed one included.
    """

    def __init__(self, policy) -> None:
        self.policy = policy
        self.metadata = policy.metadata
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls: list[int] = []

    def _hold(self, n: int) -> None:
        self.calls.append(n)
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"

    def infer(self, obs, *, noise=None):
        self._hold(1)
        return self.policy.infer(obs, noise=noise)

    def infer_batch(self, observations, *, noise=None):
        self._hold(len(observations))
        return self.policy.infer_batch(observations, noise=noise)


class OptionsPolicy:
    """Echoes each row's id, option and noise, so tests see which requests shared a call (no model)."""

    metadata = {"kind": "options"}

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[str | None, list[int], tuple | None]] = []

    def infer(self, obs, *, noise=None, selection=None):
        return self.infer_batch([obs], noise=None if noise is None else np.asarray(noise)[None], selection=selection)[0]

    def infer_batch(self, observations, *, noise=None, selection=None):
        assert self.gate.wait(60), "the test never opened the gate"
        self.calls.append((selection, [int(o["i"]) for o in observations], None if noise is None else noise.shape))
        return [{"actions": np.zeros((2, 7), np.float32), "i": o["i"], "selection": selection,
                 "noise": None if noise is None else noise[row]} for row, o in enumerate(observations)]


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def policy():
    policy = build_policy(ServeArgs(num_steps=NUM_STEPS))
    warm_up(policy)
    return policy


@pytest.fixture(scope="module")
def server(policy):
    with BackgroundServer(policy) as server:
        yield server


@pytest.fixture(scope="module")
def echo_server():
    with BackgroundServer(EchoPolicy()) as server:
        yield server


def _noise(policy, seed: int) -> np.ndarray:
    shape = tuple(policy.metadata["noise_shape"])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- codec ---------------------------------------------------------------------------------------------------

ARRAYS = {
    "uint8_image": np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3),
    "float32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "float64_0d": np.array(3.25),
    "int64_empty": np.zeros((0, 3), np.int64),
    "bool": np.array([True, False, True]),
    "big_endian": np.arange(5, dtype=">f4"),
    "unicode": np.array(["pick", "place"]),
    "non_contiguous": np.arange(24, dtype=np.int16).reshape(4, 6)[:, ::2],
    "fortran_order": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_codec_round_trips_arrays(name):
    array = ARRAYS[name]
    out = unpackb(packb({"x": array, "nested": [array, {"y": array}]}))
    for got in (out["x"], out["nested"][0], out["nested"][1]["y"]):
        assert type(got) is np.ndarray
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert not got.flags.writeable  # views of the message, as openpi's decoder gives
    # Decoded (read-only) arrays encode again unchanged.
    np.testing.assert_array_equal(unpackb(packb(out["x"])), array)


def test_codec_keeps_numpy_scalars_and_plain_values():
    scalars = [np.float32(1.5), np.float64(2.5), np.int64(-3), np.uint8(7), np.bool_(True), np.int32(4)]
    out = unpackb(packb({"s": scalars, "plain": [1, 2.0, "a", b"b", None, True], "tuple": (1, 2)}))
    for sent, got in zip(scalars, out["s"], strict=True):
        assert type(got) is type(sent) and got == sent  # np.float64 stays np.float64, not a bare float
    assert out["plain"] == [1, 2.0, "a", b"b", None, True]
    assert [type(v) for v in out["plain"]] == [int, float, str, bytes, type(None), bool]
    assert out["tuple"] == [1, 2]  # msgpack has no tuples


def test_codec_converts_jax_arrays_to_numpy():
    out = unpackb(packb({"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}))["a"]
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.ones(3, jnp.bfloat16), "bfloat16"),
        (jnp.ones(3, jnp.bfloat16), "bfloat16"),
        (np.ones(2, np.complex64), "complex"),
        (np.complex128(1j), "complex"),
        (np.array([{"a": 1}], dtype=object), "object"),
    ],
)
def test_codec_refuses_dtypes_without_a_portable_byte_form(value, match):
    with pytest.raises(ValueError, match=match):
        packb({"x": value})


def test_codec_names_unencodable_types():
    with pytest.raises(TypeError, match="cannot encode a .*EchoPolicy"):
        packb({"x": EchoPolicy()})


def test_codec_rejects_malformed_arrays():
    bad = packb({b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]})
    with pytest.raises(ValueError, match="malformed __ndarray__"):
        unpackb(bad)


def test_codec_is_wire_compatible_with_openpi_client():
    message = {"image": ARRAYS["uint8_image"], "state": ARRAYS["float32"], "t": np.float32(0.5), "prompt": "go"}
    for encode, decode in ((packb, openpi_msgpack.unpackb), (openpi_msgpack.packb, unpackb)):
        out = decode(encode(message))
        np.testing.assert_array_equal(out["image"], message["image"])
        assert out["image"].dtype == np.uint8 and out["state"].dtype == np.float32
        assert out["t"] == np.float32(0.5) and type(out["t"]) is np.float32
        assert out["prompt"] == "go"


# -- the served π0.5 policy ----------------------------------------------------------------------------------


def test_metadata_is_sent_on_connect(server, policy):
    client = WebsocketClientPolicy(server.host, server.port)
    metadata = client.get_server_metadata()
    assert metadata == policy.metadata
    assert metadata["noise_shape"] == [10, 32] and metadata["action_dim"] == 7
    assert "pi05_small" in metadata["policy"]


def test_served_actions_equal_in_process_inference(server, policy):
    client = WebsocketClientPolicy(server.host, server.port)
    obs = libero_observation("put the bowl on the plate", seed=3)
    noise = _noise(policy, 0)
    first = client.infer({**obs, "noise": noise})
    expected = policy.infer(obs, noise=noise)["actions"]
    assert first["actions"].shape == (10, 7)
    np.testing.assert_array_equal(first["actions"], expected)
    assert set(first["policy_timing"]) == {"input_transform_ms", "encode_ms", "denoise_ms", "output_transform_ms",
                                           "infer_ms"}
    assert set(first["server_timing"]) == {"infer_ms", "batch_size", "queue_ms"}  # no prev_total_ms yet
    assert first["server_timing"]["infer_ms"] >= first["policy_timing"]["infer_ms"] > 0
    assert first["server_timing"]["batch_size"] == 1  # this server runs one request at a time

    # Noise steering: another noise gives other actions; the same noise the same actions.
    other = client.infer({**obs, "noise": _noise(policy, 1)})
    assert np.abs(other["actions"] - expected).max() > 1e-4
    assert set(other["server_timing"]) == {"infer_ms", "batch_size", "queue_ms", "prev_total_ms"}
    assert other["server_timing"]["prev_total_ms"] >= first["server_timing"]["infer_ms"]
    np.testing.assert_array_equal(client.infer({**obs, "noise": noise})["actions"], expected)
    # Without noise the policy draws from its own stream.
    unsteered = client.infer(obs)["actions"]
    assert unsteered.shape == (10, 7) and np.abs(unsteered - expected).max() > 1e-4


def test_concurrent_clients_each_get_their_own_answer(server, policy):
    obs = libero_observation("open the top drawer", seed=5)
    noises = [_noise(policy, 10 + i) for i in range(3)]
    expected = [policy.infer(obs, noise=n)["actions"] for n in noises]
    results: dict[int, list[np.ndarray]] = {}

    def worker(i: int) -> None:
        client = WebsocketClientPolicy(server.host, server.port)
        results[i] = [client.infer({**obs, "noise": noises[i]})["actions"] for _ in range(2)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(3):
        for actions in results[i]:
            np.testing.assert_array_equal(actions, expected[i])


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 8] and batch_buckets(8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="at least one row"):
        batch_bucket(0)


def test_batched_inference_equals_one_at_a_time(policy):
    observations = [libero_observation(prompt, seed=s) for s, prompt in
                    enumerate(["put the bowl on the plate", "open the top drawer", "close the microwave"])]
    noises = np.stack([_noise(policy, 20 + i) for i in range(3)])  # [3, H, A]
    batched = policy.infer_batch(observations, noise=noises)  # 3 rows run padded to 4
    for obs, noise, out in zip(observations, noises, batched, strict=True):
        np.testing.assert_allclose(out["actions"], policy.infer(obs, noise=noise)["actions"], rtol=1e-5, atol=1e-5)
        assert out["policy_timing"]["infer_ms"] > 0
    # Without noise, row i draws what the i-th of three `infer` calls would draw from the same stream.
    twin = copy.copy(policy)  # shares the actor, starts from the same noise-stream key
    one_by_one = [twin.infer(obs)["actions"] for obs in observations]
    for out, expected in zip(policy.infer_batch(observations), one_by_one, strict=True):
        np.testing.assert_allclose(out["actions"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"noise: expected finite numbers of shape \[3, 10, 32\], found dtype float32 shape \[2, 10, 32\]"):
        policy.infer_batch(observations, noise=noises[:2])


def test_concurrent_requests_share_one_batched_call(policy):
    gated = GatedPolicy(policy)
    observations = [libero_observation("pick up the book", seed=30 + i) for i in range(5)]
    noises = [_noise(policy, 30 + i) for i in range(5)]
    expected = [policy.infer(obs, noise=noise)["actions"] for obs, noise in zip(observations, noises, strict=True)]
    with BackgroundServer(gated, max_batch=4) as server:
        clients = [WebsocketClientPolicy(server.host, server.port) for _ in range(6)]  # openpi's client, unchanged
        replies: dict[int, dict] = {}

        def send(i: int) -> None:
            obs, noise = (observations[0], noises[0]) if i == 5 else (observations[i], noises[i])
            replies[i] = clients[i].infer({**obs, "noise": noise})

        blocker = threading.Thread(target=send, args=(5,))
        blocker.start()
        assert gated.entered.wait(60)  # the worker is busy with the blocker ...
        threads = [threading.Thread(target=send, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        _wait_for(lambda: server.server.waiting == 5, "5 queued requests")  # ... while five more arrive
        gated.gate.set()
        for t in [blocker, *threads]:
            t.join(120)
    assert gated.calls == [1, 4, 1]  # the blocker, then the oldest four together, then the last
    assert sorted(replies[i]["server_timing"]["batch_size"] for i in range(5)) == [1, 4, 4, 4, 4]
    for i in range(5):
        np.testing.assert_allclose(replies[i]["actions"], expected[i], rtol=1e-5, atol=1e-5)
        timing = replies[i]["server_timing"]
        assert timing["queue_ms"] > 0 and timing["infer_ms"] > 0


def test_an_invalid_request_fails_alone_in_its_batch(policy):
    gated = GatedPolicy(policy)
    obs = libero_observation("put the bowl on the plate", seed=3)
    bad = {k: v for k, v in obs.items() if k != "observation/wrist_image"}  # fails inside the policy
    noises = [_noise(policy, 40 + i) for i in range(3)]
    with BackgroundServer(gated, max_batch=4) as server:
        clients = [WebsocketClientPolicy(server.host, server.port) for _ in range(6)]
        outcomes: dict[int, object] = {}

        def send(i: int, message: dict) -> None:
            try:
                outcomes[i] = clients[i].infer(message)
            except RuntimeError as exc:
                outcomes[i] = exc

        messages = {1: {**obs, "noise": noises[0]}, 2: {**bad, "noise": noises[1]}, 3: {**obs, "noise": noises[2]},
                    4: obs}  # 1-3 share a group (noise of one shape); 4 (no noise) is a group of its own
        blocker = threading.Thread(target=send, args=(0, obs))
        blocker.start()
        assert gated.entered.wait(60)
        threads = []
        for i, message in messages.items():
            threads.append(threading.Thread(target=send, args=(i, message)))
            threads[-1].start()
            _wait_for(lambda i=i: server.server.waiting == i, f"request {i} queued")  # keep arrival order
        # A request the server itself refuses is answered at once, without waiting for the busy worker.
        with pytest.raises(RuntimeError, match="noise_shape"):
            clients[5].infer({**obs, "noise": np.zeros((3, 3), np.float32)})
        assert server.server.waiting == 4
        gated.gate.set()
        for t in [blocker, *threads]:
            t.join(120)
        # The batch [1, 2, 3] failed on 2, was retried one by one; then 4 ran.
        assert gated.calls == [1, 3, 1, 1, 1, 1]
        assert isinstance(outcomes[2], RuntimeError) and "observation/wrist_image" in str(outcomes[2])
        for i, noise in ((1, noises[0]), (3, noises[2])):
            np.testing.assert_allclose(outcomes[i]["actions"], policy.infer(obs, noise=noise)["actions"],
                                       rtol=1e-5, atol=1e-5)
        assert outcomes[4]["actions"].shape == (10, 7) and outcomes[0]["actions"].shape == (10, 7)
        assert WebsocketClientPolicy(server.host, server.port).infer(obs)["actions"].shape == (10, 7)


def test_only_requests_with_the_same_options_share_a_call():
    options = OptionsPolicy()
    with BackgroundServer(options, max_batch=2) as server:
        connections = []
        sent = [{"i": 0}, {"i": 1, "selection": "a"}, {"i": 2, "selection": "b"}, {"i": 3, "selection": "a"},
                {"i": 4, "selection": "a", "noise": np.full(3, 4.0)}, {"i": 5, "selection": "b"},
                {"i": 6, "selection": "a"}, {"i": 7, "selection": "a", "noise": np.full(3, 7.0)}]
        for i, message in enumerate(sent):
            ws = websockets.sync.client.connect(server.url, compression=None)
            ws.recv()  # metadata
            ws.send(packb(message))
            connections.append(ws)
            # Request 0 occupies the worker (held at the gate); each later one is queued in order.
            _wait_for(lambda i=i: server.server.waiting == i, f"request {i} queued")
        options.gate.set()
        replies = [unpackb(ws.recv()) for ws in connections]
        for ws in connections:
            ws.close()
    # FIFO by the oldest waiting request; its group only; at most max_batch rows; noise stacked per row.
    assert options.calls == [(None, [0], None), ("a", [1, 3], None), ("b", [2, 5], None), ("a", [4, 7], (2, 3)),
                             ("a", [6], None)]
    for message, reply in zip(sent, replies, strict=True):
        assert reply["i"] == message["i"] and reply["selection"] == message.get("selection")
        if "noise" in message:
            np.testing.assert_array_equal(reply["noise"], message["noise"])
    assert [r["server_timing"]["batch_size"] for r in replies] == [1, 2, 2, 2, 2, 2, 1, 2]


def test_batching_needs_infer_batch_and_a_positive_size():
    with pytest.raises(TypeError, match="infer_batch"):
        serving.PolicyServer(EchoPolicy(), max_batch=2)
    with pytest.raises(ValueError, match="max_batch"):
        serving.PolicyServer(OptionsPolicy(), max_batch=0)
    serving.PolicyServer(EchoPolicy(), max_batch=1)  # one request at a time needs only infer


def test_bad_noise_shape_is_refused(server, policy):
    client = WebsocketClientPolicy(server.host, server.port)
    with pytest.raises(RuntimeError, match="noise_shape"):
        client.infer({**libero_observation("go"), "noise": np.zeros((10, 7), np.float32)})


def test_large_observations_pass(server):
    client = WebsocketClientPolicy(server.host, server.port)
    obs = libero_observation("pick up the book", seed=2)
    big = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MiB per camera
    obs["observation/image"] = big
    obs["observation/wrist_image"] = big
    assert client.infer(obs)["actions"].shape == (10, 7)


def test_failed_request_reports_and_the_server_keeps_serving(server, policy):
    bystander = WebsocketClientPolicy(server.host, server.port)  # connected before, during and after the failure
    obs = libero_observation("put the bowl on the plate", seed=3)
    bad = dict(obs)
    del bad["observation/wrist_image"]
    failing = WebsocketClientPolicy(server.host, server.port)
    with pytest.raises(RuntimeError, match="observation/wrist_image"):
        failing.infer(bad)

    # On the wire: the traceback is a text frame, then a close with code 1011.
    with websockets.sync.client.connect(f"ws://{server.host}:{server.port}", compression=None, max_size=None) as ws:
        assert unpackb(ws.recv()) == policy.metadata
        ws.send(packb(bad))
        text = ws.recv()
        assert isinstance(text, str) and "Traceback" in text and "observation/wrist_image" in text
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            ws.recv()
        assert closed.value.rcvd.code == 1011

    noise = _noise(policy, 7)
    expected = policy.infer(obs, noise=noise)["actions"]
    np.testing.assert_array_equal(bystander.infer({**obs, "noise": noise})["actions"], expected)
    newcomer = WebsocketClientPolicy(server.host, server.port)
    np.testing.assert_array_equal(newcomer.infer({**obs, "noise": noise})["actions"], expected)


def test_text_frames_are_refused(echo_server):
    with websockets.sync.client.connect(echo_server.url, compression=None) as ws:
        ws.recv()
        ws.send("not msgpack")
        assert "binary msgpack observation" in ws.recv()
        with pytest.raises(websockets.ConnectionClosedError):
            ws.recv()


def test_noise_is_refused_by_a_policy_that_cannot_take_it(echo_server):
    client = WebsocketClientPolicy(echo_server.host, echo_server.port)
    with pytest.raises(RuntimeError, match="takes no noise argument"):
        client.infer({"noise": np.zeros(3, np.float32)})
    assert serving.accepts_noise(EchoPolicy()) is False


def test_large_frames_both_ways(echo_server):
    client = WebsocketClientPolicy(echo_server.host, echo_server.port)
    blob = np.random.default_rng(1).normal(size=(512, 1024)).astype(np.float32)  # 2 MiB, beyond websockets' 1 MiB
    out = client.infer({"blob": blob})
    np.testing.assert_array_equal(out["echo"], blob)
    # openpi's client keeps working with a server error that is not a policy bug (a KeyError inside infer).
    with pytest.raises(RuntimeError, match="asked to explode"):
        WebsocketClientPolicy(echo_server.host, echo_server.port).infer({"explode": 1})


# -- bad input over the wire: refused with the request id, the server serving on --------------------------------

ISO_8601 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


class NaNPolicy:
    """A policy without an output guard of its own, answering NaN actions: the server must not send them."""

    metadata = {"kind": "nan"}

    def infer(self, obs: dict) -> dict:
        return {"actions": np.full((2, 7), np.nan if obs.get("nan") else 0.0, np.float32)}


def _refusal(url: str, frame: bytes | str) -> tuple[str, int]:
    """Sends one raw frame on a fresh connection -> (the error text frame, the close code)."""
    with websockets.sync.client.connect(url, compression=None, max_size=None) as ws:
        ws.recv()  # metadata
        ws.send(frame)
        text = ws.recv()
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            ws.recv()
    assert isinstance(text, str), "an error must come back as a text frame"
    return text, closed.value.rcvd.code


class RefusingPolicy:
    """Refuses every observation from the worker thread with an `InvalidInputError` (no model), batching too."""

    metadata = {"kind": "refusing"}

    def infer(self, obs: dict) -> dict:
        raise InvalidInputError("observation/state", "8 finite numbers", "a test's refusal")

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        raise InvalidInputError("observation/state", "8 finite numbers", "a test's refusal")


def _live(kind: type) -> int:
    """Live objects of exactly `kind` that the garbage collector tracks, without collecting anything first
    (`type` rather than isinstance, which a dead weakref proxy among them would answer with ReferenceError)."""
    return sum(type(o) is kind for o in gc.get_objects())


@pytest.mark.parametrize("max_batch", [1, 2])
def test_refused_requests_leave_nothing_for_the_garbage_collector(max_batch):
    """A refused request (undecodable, or refused by the policy on the worker thread) is freed by reference
    counting as soon as its connection is handled: no exception, traceback or request is left in a reference
    cycle. Such cycles once kept every refused frame (64 MiB ones included) until Python's rare full collection.
    Checked with the collector off, counting live `_Request`s and `InvalidInputError`s after 20 refusals."""
    gc.collect()
    gc.disable()
    try:
        with BackgroundServer(RefusingPolicy(), max_batch=max_batch) as server:
            before = (_live(serving._Request), _live(InvalidInputError))
            for i in range(10):
                blob = np.full(1 << 16, i, np.uint8)  # some data the message holds, as a real observation does
                assert "refused: InvalidInputError" in _refusal(server.url, packb({"blob": blob}))[0]
                assert "refused: ValueError" in _refusal(server.url, b"\xc1garbage")[0]
            # The server closes first and its handler returns right after: wait for it, not for memory.
            _wait_for(lambda: server.server.connections == 0, "the server's handlers to return")
            assert (_live(serving._Request), _live(InvalidInputError)) == before
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1\xff\x00garbage", r"refused: ValueError: the frame is no msgpack observation .*\(10 bytes\)"),
        (packb({"prompt": "go", "observation/state": np.zeros(8, np.float32)})[:-3],
         "refused: ValueError: the frame is no msgpack observation"),
        (b"\x91" * 100_000 + b"\xc0", "refused: ValueError: the frame is no msgpack observation .*StackError"),
        (packb([1, 2, 3]), "an observation must be a msgpack map"),
        ("a text frame", "expected a binary msgpack observation frame"),
    ],
    ids=["garbage", "truncated_msgpack", "nested_100k_deep", "not_a_map", "text_frame"],
)
def test_undecodable_frames_are_refused_with_a_request_id(echo_server, frame, message):
    text, code = _refusal(echo_server.url, frame)
    assert code == 1011
    assert re.match(r"faster-vla policy server: request [0-9a-f]{8}-1 refused: ", text), text
    assert re.search(message, text.splitlines()[0]), text
    assert "Traceback" in text  # openpi's protocol: the traceback follows


def test_bad_input_is_named_over_the_wire_and_logged_with_the_request_id(server, policy, caplog):
    """NaN/short state, an empty prompt, NaN noise and a typo'd option reach openpi's client as errors naming the
    field; the server's log line and the error frame share the request id; the server serves on."""
    obs = libero_observation("put the bowl on the plate", seed=4)
    cases = {
        "observation/state: expected a 1-D array of 8 finite numbers, found 1 NaN":
            {**obs, "observation/state": np.array([np.nan, 0, 0, 0, 0, 0, 0, 0], np.float32)},
        r"observation/state: expected a 1-D array of 8 finite numbers, found dtype float32 shape \[3\]":
            {**obs, "observation/state": np.zeros(3, np.float32)},
        "prompt: expected a non-empty str, found ''": {**obs, "prompt": ""},
        r"noise \(metadata 'noise_shape'\): expected finite numbers of shape \[10, 32\], found 320 NaN":
            {**obs, "noise": np.full((10, 32), np.nan, np.float32)},
        "num_candidate: .*did you mean 'num_candidates'": {**obs, "num_candidate": 4},
        r"observation/image: expected float pixels in \[0, 1\].*found values in \[0, 255\]":
            {**obs, "observation/image": obs["observation/image"].astype(np.float64)},
    }
    with caplog.at_level(logging.WARNING, logger="faster_vla.serving.server"):
        for message, bad in cases.items():
            with pytest.raises(RuntimeError, match=message):
                WebsocketClientPolicy(server.host, server.port).infer(bad)
            text, code = _refusal(server.url, packb(bad))
            request_id = re.match(r"faster-vla policy server: request ([0-9a-f]{8}-1) refused: InvalidInputError", text)
            assert request_id and code == 1011, text
            logged = [r.getMessage() for r in caplog.records if request_id.group(1) in r.getMessage()]
            assert len(logged) == 1 and re.search(message, logged[0]), (message, logged)
    reply = WebsocketClientPolicy(server.host, server.port).infer(obs)
    assert reply["actions"].shape == (10, 7) and np.isfinite(reply["actions"]).all()
    assert re.fullmatch(r"[0-9a-f]{8}-1", reply["request_id"])


def test_an_overlong_prompt_comes_back_with_a_warning(server):
    client = WebsocketClientPolicy(server.host, server.port)
    reply = client.infer(libero_observation("put the bowl on the plate " * 60, seed=1))
    assert reply["actions"].shape == (10, 7)
    assert len(reply["warnings"]) == 1 and "truncated to the first" in reply["warnings"][0]
    assert "warnings" not in client.infer(libero_observation("put the bowl on the plate", seed=1))


def test_the_server_never_sends_non_finite_actions():
    with BackgroundServer(NaNPolicy()) as server:
        client = WebsocketClientPolicy(server.host, server.port)
        assert client.infer({})["actions"].shape == (2, 7)
        with pytest.raises(RuntimeError, match=r"request [0-9a-f]{8}-1 failed: NonFiniteActionError: actions: expected "
                                               r"finite values, found 14 NaN"):
            WebsocketClientPolicy(server.host, server.port).infer({"nan": True})
        assert client.infer({})["actions"].shape == (2, 7)  # the first client, still served


def test_log_lines_carry_iso_8601_timestamps():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(serving.IsoFormatter(serving.LOG_FORMAT))
    record = logging.LogRecord("faster_vla.serving.server", logging.WARNING, __file__, 1, "request %s refused",
                               ("ab12cd34-3",), None)
    record.created = 1_700_000_000.25
    handler.emit(record)
    line = stream.getvalue()
    stamp = re.match(ISO_8601, line)
    assert stamp and line[stamp.end():] == " WARNING faster_vla.serving.server: request ab12cd34-3 refused\n"
    # The text is the record's instant, with its UTC offset.
    assert datetime.datetime.fromisoformat(stamp.group()).timestamp() == pytest.approx(1_700_000_000.25, abs=1e-3)


def test_healthz(server):
    assert _get(server.host, server.port, "/healthz") == (200, b"OK\n")
    serving.wait_until_healthy(server.host, server.port, timeout=5)


def test_wait_until_healthy_times_out_on_a_closed_port():
    with pytest.raises(TimeoutError, match="faster-vla serve"):
        serving.wait_until_healthy("127.0.0.1", _free_port(), timeout=0.3)


def test_api_key():
    with BackgroundServer(EchoPolicy(), api_key="s3cret") as server:
        client = WebsocketClientPolicy(server.host, server.port, api_key="s3cret")
        assert client.infer({})["actions"].shape == (2, 7)
        with pytest.raises(websockets.InvalidStatus) as missing:
            WebsocketClientPolicy(server.host, server.port)
        assert missing.value.response.status_code == 401
        assert b"Api-Key" in missing.value.response.body
        with pytest.raises(websockets.InvalidStatus) as wrong:
            WebsocketClientPolicy(server.host, server.port, api_key="guess")
        assert wrong.value.response.status_code == 403
        assert _get(server.host, server.port, "/healthz") == (200, b"OK\n")  # probes need no key


def test_port_in_use_is_named(echo_server):
    with pytest.raises(OSError, match="already in use") as info:
        serving.check_port_free("127.0.0.1", echo_server.port)
    assert info.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError, match="already in use"):
        BackgroundServer(EchoPolicy(), port=echo_server.port).start()
    serving.check_port_free("127.0.0.1", _free_port())  # a free port passes


def test_server_needs_infer_and_metadata():
    with pytest.raises(TypeError, match="infer"):
        serving.PolicyServer(object())

    class NoMetadata:
        def infer(self, obs):
            return {}

    with pytest.raises(TypeError, match="metadata"):
        serving.PolicyServer(NoMetadata())
    serving.PolicyServer(NoMetadata(), metadata={"ok": True})


# -- `faster-vla serve` --------------------------------------------------------------------------------------


def test_serve_args_are_checked_before_loading(tmp_path, echo_server):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_args(ServeArgs(actor=ActorSource(checkpoint=str(tmp_path / "missing"))))
    with pytest.raises(ValueError, match="not an orbax params checkpoint"):
        check_args(ServeArgs(actor=ActorSource(checkpoint=str(tmp_path))))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        check_args(ServeArgs(actor=ActorSource(tokenizer=str(tmp_path / "missing.model"))))
    with pytest.raises(ValueError, match="unknown actor preset"):
        check_args(ServeArgs(actor=ActorSource(preset="pi06")))
    with pytest.raises(ValueError, match="does not apply to --bundle"):
        check_args(ServeArgs(bundle=tmp_path, actor=ActorSource(checkpoint=str(tmp_path))))
    with pytest.raises(ValueError, match="num-steps"):
        check_args(ServeArgs(num_steps=0))
    with pytest.raises(ValueError, match="max-batch"):
        check_args(ServeArgs(max_batch=0))
    with pytest.raises(OSError, match="already in use"):
        check_args(ServeArgs(host="127.0.0.1", port=echo_server.port))
    check_args(ServeArgs(host="127.0.0.1", port=_free_port()))


def test_a_folder_that_is_no_bundle_is_refused_before_loading(tmp_path):
    from faster_vla.serving.bundle import BundleError

    with pytest.raises(BundleError, match="not a faster-vla bundle"):
        check_args(ServeArgs(bundle=tmp_path, port=0))


def test_cli_serves_until_stopped():
    port = _free_port()
    env = {**os.environ, serve_cli.API_KEY_ENV: "k3y"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "faster_vla.launch.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--num-steps", "2", "--max-batch", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        serving.wait_until_healthy("127.0.0.1", port, timeout=180)
        client = WebsocketClientPolicy("127.0.0.1", port, api_key="k3y")
        assert client.get_server_metadata()["num_steps"] == 2
        assert client.infer(libero_observation("close the microwave"))["actions"].shape == (10, 7)
        others = [WebsocketClientPolicy("127.0.0.1", port, api_key="k3y") for _ in range(3)]
        shapes: list[tuple] = []
        threads = [threading.Thread(target=lambda c=c: shapes.append(c.infer(libero_observation("go"))["actions"].shape))
                   for c in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert shapes == [(10, 7)] * 3
        proc.send_signal(signal.SIGTERM)  # docker stop / systemd; Ctrl-C's SIGINT takes the same path
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log
    assert f"listening on ws://127.0.0.1:{port}" in log and "policy server stopped" in log
    assert "batch sizes [1, 2]" in log and "max batch 2" in log and "Traceback" not in log
    listening = next(line for line in log.splitlines() if "listening on" in line)
    assert re.match(ISO_8601 + " INFO faster_vla.serving.server: ", listening), listening
