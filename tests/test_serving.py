"""openpi-compatible serving, driven by openpi's own client package (`openpi-client` from the package index)."""

from __future__ import annotations

import errno
import http.client
import os
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

from faster_vla import serving
from faster_vla.actor_source import ActorSource
from faster_vla.launch import serve as serve_cli
from faster_vla.launch.demo import libero_observation
from faster_vla.launch.serve import ServeArgs, build_policy, check_args, warm_up
from faster_vla.serving import BackgroundServer, packb, unpackb

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
    assert set(first["server_timing"]) == {"infer_ms"}  # nothing before the first request
    assert first["server_timing"]["infer_ms"] >= first["policy_timing"]["infer_ms"] > 0

    # Noise steering: another noise gives other actions; the same noise the same actions.
    other = client.infer({**obs, "noise": _noise(policy, 1)})
    assert np.abs(other["actions"] - expected).max() > 1e-4
    assert set(other["server_timing"]) == {"infer_ms", "prev_total_ms"}
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
    with pytest.raises(OSError, match="already in use"):
        check_args(ServeArgs(host="127.0.0.1", port=echo_server.port))
    check_args(ServeArgs(host="127.0.0.1", port=_free_port()))


def test_a_folder_that_is_no_bundle_is_refused_before_loading(tmp_path):
    from faster_vla.bundle import BundleError

    with pytest.raises(BundleError, match="not a faster-vla bundle"):
        check_args(ServeArgs(bundle=tmp_path, port=0))


def test_cli_serves_until_stopped():
    port = _free_port()
    env = {**os.environ, serve_cli.API_KEY_ENV: "k3y"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "faster_vla.launch.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--num-steps", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        serving.wait_until_healthy("127.0.0.1", port, timeout=180)
        client = WebsocketClientPolicy("127.0.0.1", port, api_key="k3y")
        assert client.get_server_metadata()["num_steps"] == 2
        assert client.infer(libero_observation("close the microwave"))["actions"].shape == (10, 7)
        proc.send_signal(signal.SIGTERM)  # docker stop / systemd; Ctrl-C's SIGINT takes the same path
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log
    assert f"listening on ws://127.0.0.1:{port}" in log and "policy server stopped" in log
