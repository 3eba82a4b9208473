"""Serve a policy over openpi's websocket protocol, so openpi's own clients drive it unchanged.

openpi runs simulators and robots in a separate client process (`openpi-client` on the package index,
`WebsocketClientPolicy`) that talks to a policy server. This module is that server, wire-compatible with
it (facts: `shared/spec/serving.md` of the steering repository):

- numpy inside msgpack, as openpi encodes it (`packb`/`unpackb`): an array is a map
  `{b"__ndarray__": True, b"data": bytes, b"dtype": dtype.str, b"shape": [...]}`, a numpy scalar
  `{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}`; decoded arrays are read-only views of the
  message. bfloat16 (and other void), complex and object dtypes are refused; jax arrays are copied to numpy.
- On connect the server sends one binary frame: the msgpack'd metadata. Then, per request, the client sends
  a msgpack'd observation dict and gets back `policy.infer(obs)` (for a π0.5 policy: `"actions"`
  [horizon, action_dim] and `"policy_timing"`) plus `"server_timing"`: `"infer_ms"` (time inside the policy
  call that answered it), `"batch_size"` (how many requests that call served), `"queue_ms"` (from its arrival
  to that call starting) and, from the second request of a connection on, `"prev_total_ms"` (the previous
  request's time in the server, from its observation arriving to its reply being sent).
- A failing request gets its traceback as a TEXT frame and the connection is closed with code 1011
  (`WebsocketClientPolicy.infer` raises RuntimeError); the server goes on serving everyone else. The text
  starts with a line naming the request id and the error (`request <id> refused: InvalidInputError: <field>:
  expected ..., found ...`), and the server's log line about it carries the same id.
- Every request gets an id (`<connection id>-<n>`); a reply carries it as `"request_id"`, and log lines
  (ISO 8601 timestamps with `configure_logging`, as `faster-vla serve` sets up) name it.
- What a policy accepts is decided by `faster_vla.policies.validation`, before any compute; a reply's
  `"actions"` are checked finite here too, so not even a policy without that guard sends NaN to a robot.
- `GET /healthz` answers 200 "OK\\n" (no API key needed). No frame-size limit (images), no compression.
- Optional API key: clients must send `Authorization: Api-Key <key>` (`WebsocketClientPolicy(api_key=...)`);
  a missing key is answered 401, a wrong one 403, before the websocket opens.

Noise steering (an extension of openpi's protocol, as DSRL-style projects add it): an observation may carry
`"noise"`, the initial flow noise [horizon, model_action_dim] as float32. The server removes it from the
observation and calls `policy.infer(obs, noise=noise)`, so the caller chooses the seed the actions are
denoised from (a noise-space policy, or FASTER's selected seed, steers a frozen π0.5 this way). A policy whose
`infer` has no `noise` parameter refuses it, and when the metadata has `"noise_shape"` a noise of another shape
is refused, in both cases with an error to that client rather than a silent fallback. openpi's own clients
never send `"noise"`, so the field costs them nothing.

Requests are run on one worker thread (a policy holds a noise stream and is not thread-safe); the event loop
stays free meanwhile, so health checks, pings and new connections are answered during a long inference.
With `max_batch` > 1 (the policy then needs `infer_batch(observations, **options) -> list[dict]`), the
requests that arrived while the worker was busy are batched: the oldest waiting request and up to
`max_batch - 1` others with the same options (num_candidates, selection, return_scores, and noise present or
not with the same shape; each row's noise is stacked) go through ONE `infer_batch` call. Nothing waits for a
batch to fill: an idle server runs a lone request at once. If a batched call raises, its requests are retried
one at a time, so an invalid request fails alone and never takes its batch-mates with it.

Why one file of ~600 lines: the wire codec, request parsing, batching and the connection handler are one
protocol (openpi's); they change together and are tested together (tests/test_serving.py).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import errno
import hmac
import http.client
import inspect
import itertools
import logging
import signal
import socket
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

import jax
import msgpack
import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as _ws_serve
from websockets.http11 import Request, Response

from faster_vla.policies.validation import (
    REQUEST_OPTIONS,
    InvalidInputError,
    as_real_array,
    check_actions,
    check_noise,
)

logger = logging.getLogger(__name__)

NOISE_KEY = REQUEST_OPTIONS[0]
# REQUEST_OPTIONS: per-request options a client may put in the observation; each is passed to `policy.infer` as
# a keyword when its signature takes it (a FASTER bundle's `TunedPolicy` takes all four, the base `Policy` only
# noise).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HEALTH_PATH = "/healthz"
ERROR_CLOSE_CODE = 1011  # RFC 6455 "internal error"

# dtype kinds numpy cannot carry as raw bytes that another process decodes to the same values:
# void covers ml_dtypes' bfloat16 (whose dtype.str is '<V2') and structured dtypes.
_REFUSED_KINDS = {"V": "void/bfloat16", "O": "object", "c": "complex"}


# -- codec ---------------------------------------------------------------------------------------------------


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS:
        hint = "cast it first, e.g. x.astype(np.float32)" if dtype.kind != "O" else "send numeric arrays instead"
        raise ValueError(
            f"cannot encode numpy dtype {dtype} ({_REFUSED_KINDS[dtype.kind]}): openpi's msgpack-numpy format "
            f"carries raw bytes of numpy's built-in non-complex dtypes only; {hint}"
        )


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: numpy/jax values -> openpi's maps; other non-msgpack types -> their base type."""
    if isinstance(obj, jax.Array):
        obj = np.asarray(obj)  # device -> host copy; bfloat16 stays bfloat16 and is refused below
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    # The packer checks exact types (so np.float64, a float subclass, still reaches the branch above): the
    # remaining subclasses of msgpack's own types become their base type.
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    for base in (bool, int, float, str, bytes, list):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(
        f"cannot encode a {type(obj).__module__}.{type(obj).__qualname__}: messages may hold dicts, lists, str, "
        "bytes, numbers, bool, None, numpy arrays/scalars and jax arrays"
    )


def _decode(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's array/scalar maps -> numpy (arrays read-only, sharing the message)."""
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype)
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed __ndarray__ entry in a message: {exc}") from exc
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype)
            return dtype.type(obj[b"data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed __npgeneric__ entry in a message: {exc}") from exc
    return obj


def packb(obj: Any) -> bytes:
    """Encodes a message (nested dicts/lists of numpy, jax and plain values) in openpi's msgpack-numpy format."""
    return msgpack.packb(obj, default=_encode, strict_types=True)


def unpackb(data: bytes) -> Any:
    """Decodes a message in openpi's msgpack-numpy format; arrays come back read-only."""
    return msgpack.unpackb(data, object_hook=_decode)


# -- logs ----------------------------------------------------------------------------------------------------


class IsoFormatter(logging.Formatter):
    """Log timestamps in ISO 8601 with milliseconds and the UTC offset (2025-01-31T14:03:07.123+00:00), which
    sort as text and read unambiguously across machines, unlike logging's default '2025-01-31 14:03:07,123'."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 -- logging's
        return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def configure_logging(level: int = logging.INFO) -> None:
    """The server's log setup: ISO 8601 timestamps on stderr; faster_vla at `level`, libraries (jax, websockets'
    per-connection lines) from WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(IsoFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("faster_vla").setLevel(level)


# -- memory --------------------------------------------------------------------------------------------------

MMAP_THRESHOLD_BYTES = 128 * 2**10  # glibc's own starting value, kept fixed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_large_buffers_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold, so every buffer of `threshold` bytes or more goes back to the OS when freed.

    A server's big buffers (client frames, 2048² images, a resize's intermediates) are allocated and freed per
    request. glibc raises its mmap threshold after freeing a large mmap'd block (up to 32 MiB), after which such
    buffers come from the heap, and freed heap in the middle of an arena stays resident: the fuzz's 2048² image
    frames alone left the server +60 MiB this way (+1 MiB with the threshold fixed). This is what
    MALLOC_MMAP_THRESHOLD_=131072 does, set from inside so a deployed server gets it too. Costs an mmap/munmap
    per such buffer (microseconds next to an inference). Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


# -- server --------------------------------------------------------------------------------------------------


class PolicyLike(Protocol):
    """What the server needs: `infer(obs) -> dict` and a `metadata` dict sent to every client on connect.

    To batch requests (`max_batch` > 1) it also needs `infer_batch(observations, **options) -> list[dict]`,
    taking the same options as `infer` with `noise` stacked on a leading batch axis.
    """

    metadata: Mapping[str, Any]

    def infer(self, obs: dict) -> dict: ...


@dataclasses.dataclass(frozen=True)
class _Failure:
    """A failed request, as text: what the client and the log get, with no exception object left to free.

    An exception's traceback holds the frames it passed through, and they hold the request (its message, the
    arrays viewing it, its future, which held the exception): a reference cycle that kept every refused frame,
    64 MiB ones included, alive until Python's rare full collection. Formatting the failure where it is caught
    and handing on only this text leaves nothing to collect: the exception dies with its `except` block.
    """

    bad_input: bool  # refused (an undecodable frame, an InvalidInputError) rather than failed in the server
    headline: str  # "<ExceptionType>: <message>"
    traceback: str  # the formatted traceback, chained exceptions included

    @classmethod
    def of(cls, exc: BaseException, *, bad_input: bool) -> _Failure:
        """Formats `exc` (call from its `except` block, then let it go)."""
        return cls(bad_input or isinstance(exc, InvalidInputError), f"{type(exc).__name__}: {exc}",
                   "".join(traceback.format_exception(exc)))


@dataclasses.dataclass(eq=False)
class _Request:
    """One decoded request waiting for the inference worker."""

    obs: dict
    options: dict  # per-request options for `infer`, without noise
    noise: np.ndarray | None  # the caller's seed(s), one row of a batch's stacked noise
    future: asyncio.Future  # -> (policy result, server_timing) or _Failure; never an exception
    arrived: float  # perf_counter when it was queued

    @property
    def group(self) -> tuple:
        """Requests with equal groups can share one `infer_batch` call."""
        options = tuple(sorted((name, repr(value)) for name, value in self.options.items()))
        return options, None if self.noise is None else self.noise.shape


def accepts_option(policy: Any, name: str) -> bool:
    """Whether `policy.infer` takes the keyword `name` (or **kwargs)."""
    try:
        params = inspect.signature(policy.infer).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind is p.VAR_KEYWORD
        for p in params
    )


def accepts_noise(policy: Any) -> bool:
    """Whether `policy.infer` takes a `noise=` keyword (or **kwargs), i.e. whether it can be noise-steered."""
    return accepts_option(policy, NOISE_KEY)


def _connect_host(host: str) -> str:
    """A host a client on this machine can connect to when the server listens on every interface."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _port_in_use_message(host: str, port: int) -> str:
    return (f"port {port} on {host!r} is already in use (another policy server?): pick another with --port, "
            "or stop the process listening there")


def check_port_free(host: str, port: int) -> None:
    """Raises OSError(EADDRINUSE) now if the server could not listen on host:port (checked before a slow load).

    Binds with SO_REUSEADDR, as asyncio's server does, so only a live listener counts, not TIME_WAIT leftovers.
    Port 0 (any free port) always passes.
    """
    if port == 0:
        return
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535 (or 0 for any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on host {host!r}: {exc}; use e.g. 0.0.0.0 (all interfaces) or 127.0.0.1") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, _port_in_use_message(host, port)) from exc
                raise


def wait_until_healthy(host: str, port: int, timeout: float = 60.0) -> None:
    """Blocks until `GET /healthz` on host:port answers 200; openpi_client does not retry a refused connect."""
    deadline = time.monotonic() + timeout
    host = _connect_host(host)
    last: object = "no answer"
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", HEALTH_PATH)
            response = conn.getresponse()
            if response.status == HTTPStatus.OK:
                return
            last = f"HTTP {response.status}"
        except OSError as exc:
            last = exc
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no policy server answered GET {HEALTH_PATH} at http://{host}:{port} within {timeout:.0f} s "
                f"(last: {last}); is it running (`faster-vla serve`) on that port?"
            )
        time.sleep(0.1)


class PolicyServer:
    """openpi's websocket policy protocol around any object with `infer(obs) -> dict` and `metadata`."""

    def __init__(
        self,
        policy: PolicyLike,
        host: str = "0.0.0.0",
        port: int = 8000,
        *,
        api_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_batch: int = 1,
    ) -> None:
        """`metadata` overrides `policy.metadata`; `api_key` (non-empty) makes clients send it; up to `max_batch`
        waiting requests run in one `policy.infer_batch` call (1: one request at a time, `infer` only)."""
        if not callable(getattr(policy, "infer", None)):
            raise TypeError(f"a policy to serve needs an infer(obs) -> dict method; {type(policy).__name__} has none")
        if metadata is None:
            metadata = getattr(policy, "metadata", None)
            if not isinstance(metadata, Mapping):
                raise TypeError(
                    f"{type(policy).__name__}.metadata must be a dict (sent to clients on connect), got "
                    f"{type(metadata).__name__}; give the policy one or pass metadata="
                )
        if api_key is not None and not api_key:
            raise ValueError("api_key must be non-empty (or None for no key check)")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if max_batch > 1 and not callable(getattr(policy, "infer_batch", None)):
            raise TypeError(f"max_batch={max_batch} needs policy.infer_batch(observations, **options) -> list[dict]; "
                            f"{type(policy).__name__} has none: serve it with max_batch=1")
        self.policy = policy
        self.host = host
        self.port = port
        self.metadata = dict(metadata)
        self._metadata_frame = packb(self.metadata)  # an unencodable metadata fails here, not per client
        self._expected_auth = None if api_key is None else f"Api-Key {api_key}".encode()
        self._accepts_noise = accepts_noise(policy)
        self._options = {name for name in REQUEST_OPTIONS if accepts_option(policy, name)}
        noise_shape = self.metadata.get("noise_shape")
        self._noise_shape = None if noise_shape is None else tuple(int(d) for d in noise_shape)
        self.max_batch = max_batch
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._connections = 0  # connections whose handler has not returned yet
        self._wakeup: asyncio.Event | None = None
        self.address: tuple[str, int] | None = None  # where it listens, once running

    @property
    def connections(self) -> int:
        """Connections being handled now (a closed one counts until its handler has returned)."""
        return self._connections

    @property
    def waiting(self) -> int:
        """Requests queued for the inference worker (not counting the ones it is running)."""
        return len(self._queue)

    # HTTP, before the websocket handshake: health checks and the API key.
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urllib.parse.urlsplit(request.path).path == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self._expected_auth is None:
            return None
        given = request.headers.get("Authorization")
        if given is None:
            return connection.respond(
                HTTPStatus.UNAUTHORIZED,
                "Missing API key: this policy server needs the header 'Authorization: Api-Key <key>' "
                "(openpi_client: WebsocketClientPolicy(host, port, api_key=<key>)).\n",
            )
        if not hmac.compare_digest(given.encode(), self._expected_auth):
            return connection.respond(
                HTTPStatus.FORBIDDEN, "Wrong API key: the 'Authorization: Api-Key <key>' header does not match "
                "the server's --api-key.\n"
            )
        return None

    def _split_observation(self, message: str | bytes) -> tuple[dict, dict, np.ndarray | None]:
        """-> (observation, per-request options for `policy.infer` other than noise, noise or None)."""
        if isinstance(message, str):
            raise ValueError("expected a binary msgpack observation frame, got a text frame")
        try:
            obs = unpackb(message)
        except Exception as exc:  # noqa: BLE001 -- msgpack raises many types (ExtraData, StackError, FormatError, ...)
            raise ValueError(f"the frame is no msgpack observation in openpi's msgpack-numpy format "
                             f"({len(message)} bytes): {type(exc).__name__}: {exc}") from exc
        if not isinstance(obs, dict):
            raise ValueError(f"an observation must be a msgpack map (dict), got {type(obs).__name__}")
        options = {}
        for name in REQUEST_OPTIONS[1:]:
            value = obs.pop(name, None)
            if value is None:
                continue
            if name not in self._options:
                raise ValueError(f"the observation has {name!r}, but this policy's infer() takes no such option "
                                 f"(it takes {sorted(self._options) or 'none'})")
            options[name] = value.item() if isinstance(value, np.generic) else value
        noise = obs.pop(NOISE_KEY, None)
        if noise is None:
            return obs, options, None
        if not self._accepts_noise:
            raise ValueError(
                f"the observation has {NOISE_KEY!r}, but this policy's infer() takes no noise argument: "
                "remove it, or serve a policy with infer(obs, noise=...)"
            )
        # The policy checks the noise fully (`validation.check_noise`); checked here when the metadata gives its
        # shape, so a bad noise is refused before it is queued (and never joins a batch).
        if self._noise_shape is not None:
            return obs, options, check_noise(noise, self._noise_shape, field=f"{NOISE_KEY} (metadata 'noise_shape')")
        return obs, options, as_real_array(noise, NOISE_KEY, "a numeric array")

    def _call(self, batch: list[_Request]) -> list[tuple[Mapping, dict]]:
        """One policy call for `batch` (on the worker thread): `infer` for one request, else `infer_batch`."""
        options = batch[0].options
        start = time.perf_counter()
        if len(batch) == 1:
            noise = {} if batch[0].noise is None else {NOISE_KEY: batch[0].noise}
            results = [self.policy.infer(batch[0].obs, **options, **noise)]
        else:
            noise = {} if batch[0].noise is None else {NOISE_KEY: np.stack([r.noise for r in batch])}  # [b, ...]
            results = self.policy.infer_batch([r.obs for r in batch], **options, **noise)
        infer_ms = 1e3 * (time.perf_counter() - start)
        if not isinstance(results, list) or len(results) != len(batch):
            raise TypeError(f"policy.infer_batch must return a list of {len(batch)} dicts, one per observation, "
                            f"got {type(results).__name__}")
        for result in results:
            if not isinstance(result, Mapping):
                raise TypeError(f"policy.infer must return a dict, got {type(result).__name__}")
        return [(result, {"infer_ms": infer_ms, "batch_size": len(batch), "queue_ms": 1e3 * (start - r.arrived)})
                for r, result in zip(batch, results, strict=True)]

    def _run_batch(self, batch: list[_Request]) -> list[tuple[Mapping, dict] | _Failure]:
        """`_call`, and when a batch of several fails, each request again alone: a bad one fails by itself.

        A failure comes back formatted (`_Failure`), so no exception, traceback or frame outlives this call.
        """
        try:
            return self._call(batch)
        except Exception as exc:  # noqa: BLE001 -- handed to the request's client
            if len(batch) == 1:
                return [_Failure.of(exc, bad_input=False)]
            logger.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(batch),
                           type(exc).__name__, exc)
        outcomes: list[tuple[Mapping, dict] | _Failure] = []
        for request in batch:
            try:
                outcomes += self._call([request])
            except Exception as exc:  # noqa: BLE001
                outcomes.append(_Failure.of(exc, bad_input=False))
        return outcomes

    async def _worker(self) -> None:
        """Takes the oldest waiting request and up to max_batch - 1 others of its group, runs them, answers."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            group = self._queue[0].group
            batch = [r for r in self._queue if r.group == group][: self.max_batch]
            self._queue = collections.deque(r for r in self._queue if all(r is not b for b in batch))
            batch = [r for r in batch if not r.future.done()]  # a client that left while waiting
            if not batch:
                continue
            outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if not request.future.done():
                    request.future.set_result(outcome)
            # This frame lives as long as the server: the last batch (its messages) must not wait here for the next.
            del batch, outcomes, request, outcome

    async def _infer(self, obs: dict, options: dict, noise: np.ndarray | None) -> tuple[Mapping, dict] | _Failure:
        """Queues one request for the worker -> (policy result, server_timing), or its `_Failure`."""
        request = _Request(obs, options, noise, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    async def _answer(self, message: str | bytes, request_id: str, peer: Any,
                      prev_total_ms: float | None) -> bytes | _Failure:
        """One request -> its reply frame, or its `_Failure` (formatted in the `except` block, so neither the
        exception nor the frames it holds survive into the error reply's awaits)."""
        try:
            parts = self._split_observation(message)
        except Exception as exc:  # noqa: BLE001 -- an undecodable or malformed frame is the client's
            return _Failure.of(exc, bad_input=True)
        try:
            outcome = await self._infer(*parts)
            if isinstance(outcome, _Failure):
                return outcome
            result, timing = outcome
            reply = dict(result)
            if "actions" in reply:  # the output guard, also for policies without their own
                check_actions(reply["actions"], "the reply")
            reply["server_timing"] = timing
            reply["request_id"] = request_id
            if prev_total_ms is not None:
                reply["server_timing"]["prev_total_ms"] = prev_total_ms
            for warning in reply.get("warnings", ()):
                logger.info("request %s from %s: %s", request_id, peer, warning)
            logger.debug("request %s from %s: policy %.1f ms, batch %d", request_id, peer, timing["infer_ms"],
                         timing["batch_size"])
            return packb(reply)
        except Exception as exc:  # noqa: BLE001 -- any failure goes back to this client, never down the server
            return _Failure.of(exc, bad_input=False)

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        connection = uuid.uuid4().hex[:8]  # request ids are <connection>-<n>: one grep finds a client's requests
        logger.info("connection %s: client %s connected", connection, peer)
        self._connections += 1
        try:
            await ws.send(self._metadata_frame)
            prev_total_ms: float | None = None
            for n in itertools.count(1):
                message = await ws.recv()
                start = time.perf_counter()
                request_id = f"{connection}-{n}"
                answer = await self._answer(message, request_id, peer, prev_total_ms)
                del message  # a refused 64 MiB frame is freed now, not when the client's close completes
                if isinstance(answer, _Failure):
                    await self._send_error(ws, request_id, peer, answer)
                    return
                await ws.send(answer)
                prev_total_ms = 1e3 * (time.perf_counter() - start)
                logger.debug("request %s from %s served in %.1f ms", request_id, peer, prev_total_ms)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._connections -= 1
            logger.info("connection %s: client %s disconnected", connection, peer)

    @staticmethod
    async def _send_error(ws: ServerConnection, request_id: str, peer: Any, failure: _Failure) -> None:
        """openpi's error reply: the traceback as a TEXT frame, headed by the request id, then close 1011.

        A refused input (an undecodable frame, an `InvalidInputError`) is logged on one line; any other failure
        with its traceback, as a server-side fault.
        """
        verb = "refused" if failure.bad_input else "failed"
        if failure.bad_input:
            logger.warning("request %s from %s %s: %s", request_id, peer, verb, failure.headline)
        else:
            logger.error("request %s from %s %s\n%s", request_id, peer, verb, failure.traceback.rstrip())
        await ws.send(f"faster-vla policy server: request {request_id} {verb}: {failure.headline}\n{failure.traceback}")
        await ws.close(ERROR_CLOSE_CODE, f"request {request_id} {verb}; traceback in the previous text frame")

    async def run(
        self, stop: Awaitable[Any] | None = None, on_ready: Callable[[tuple[str, int]], None] | None = None
    ) -> None:
        """Serves until `stop` completes (forever if None), then closes every connection (code 1001).

        `on_ready((host, port))` is called once the socket listens (port 0 picks a free port).
        """
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy-infer")
        self._wakeup = asyncio.Event()
        worker = asyncio.create_task(self._worker(), name="policy-batcher")
        try:
            async with _ws_serve(
                self._handle, self.host, self.port, compression=None, max_size=None,
                process_request=self._process_request,
            ) as server:
                self.address = tuple(server.sockets[0].getsockname()[:2])
                logger.info("policy server listening on ws://%s:%d (%s, max batch %d)", *self.address,
                            "API key required" if self._expected_auth else "no API key", self.max_batch)
                if on_ready is not None:
                    on_ready(self.address)
                await (asyncio.get_running_loop().create_future() if stop is None else stop)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, _port_in_use_message(self.host, self.port)) from exc
            raise
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            self._executor.shutdown(wait=True, cancel_futures=True)


def serve(
    policy: PolicyLike,
    host: str = "0.0.0.0",
    port: int = 8000,
    *,
    api_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_batch: int = 1,
) -> None:
    """Serves `policy` until SIGINT (Ctrl-C) or SIGTERM (`docker stop`, `kill`), blocking, then closes cleanly.

    See the module docstring for the protocol and batching. From a thread other than the main one, use
    `BackgroundServer`.
    """
    server = PolicyServer(policy, host, port, api_key=api_key, metadata=metadata, max_batch=max_batch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        await server.run(stop)

    asyncio.run(main())
    logger.info("policy server stopped")


class BackgroundServer:
    """A `PolicyServer` on its own thread and event loop, for tests, benchmarks and notebooks.

    `with BackgroundServer(policy) as server: WebsocketClientPolicy(server.host, server.port)`; leaving the
    block closes connections and the socket and joins the thread. The default port 0 picks a free port.
    """

    def __init__(
        self,
        policy: PolicyLike,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_batch: int = 1,
    ) -> None:
        self.server = PolicyServer(policy, host, port, api_key=api_key, metadata=metadata, max_batch=max_batch)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """A host clients on this machine can connect to."""
        return _connect_host(self.server.host)

    @property
    def port(self) -> int:
        if self.server.address is None:
            raise RuntimeError("the server is not running: call start() (or use it as a context manager) first")
        return self.server.address[1]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        await self.server.run(self._stop, on_ready=lambda _: self._ready.set())

    def _target(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 -- handed to the thread that called start()
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Starts serving and returns once the socket listens; a failure to listen is raised here."""
        if self._thread is not None:
            raise RuntimeError("this BackgroundServer was already started; make a new one")
        self._thread = threading.Thread(target=self._target, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the policy server did not start listening within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Closes every connection and the socket, waits for the running inference, joins the thread."""
        if self._thread is None or not self._thread.is_alive():
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the policy server thread did not stop within {timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
