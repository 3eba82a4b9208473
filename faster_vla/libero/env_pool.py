"""Environment workers: one env per worker, driven in lockstep from the parent.

Simulators such as LIBERO (MuJoCo + robosuite + an offscreen renderer) are single-threaded Python and
CPU-bound, so the only way to use several cores is several processes. `EnvWorkers` is what the episode loop
(`faster_vla.libero.rollout`) drives: send a command to every worker at once, then gather the replies, so the
workers run in parallel. Two kinds exist: `EnvPool` here (spawned worker processes on this machine) and
`faster_vla.libero.ray_pool.RayEnvPool` (Ray actors, on this machine or across a Ray cluster).

A worker whose env raises, or whose process dies, is stopped; the call raises `EnvWorkerError` naming every
failed worker, with the worker's own traceback and the replies of the workers that did answer. The other
workers keep running: `restart(worker)` replaces a stopped one with a fresh env from the same factory (the
episode loop does, when a run recovers from failures), `close()` ends them all (the loop does otherwise).

The env objects only need the methods the pool calls (`reset`, `step_chunk`, anything passed to `call`)
and `close`. Factories, arguments and results must be picklable (e.g. `functools.partial(LiberoEnv, config)`).
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import multiprocessing.connection
import signal
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_POLL_S = 0.5  # how often a waiting parent checks that its workers are still alive
_CLOSE_TIMEOUT_S = 30.0


class EnvWorkerError(RuntimeError):
    """Env workers failed in one call: their env raised, or the worker died.

    `worker` is the first failed worker (`remote_traceback` its own traceback); `messages` holds every failed
    worker's message and `failed` their indices; `results` holds every worker's reply to the call (None for
    failed and skipped workers), so a caller that recovers keeps what the others did.
    """

    def __init__(self, worker: int, method: str, message: str, remote_traceback: str = "", *,
                 messages: Mapping[int, str] | None = None, results: Sequence[Any] | None = None) -> None:
        self.worker = worker
        self.method = method
        self.remote_traceback = remote_traceback
        self.messages: dict[int, str] = {worker: message, **(messages or {})}
        self.failed: tuple[int, ...] = tuple(sorted(self.messages))
        self.results: list[Any] = list(results) if results is not None else []
        text = f"env worker {worker} failed in {method}(): {message}"
        if remote_traceback:
            text += f"\n--- traceback in worker {worker} ---\n{remote_traceback.rstrip()}"
            text += "\n--- end of worker traceback ---"
        for other, other_message in self.messages.items():
            if other != worker:
                text += f"\nenv worker {other} failed in the same call: {other_message}"
        super().__init__(text)


class EnvWorkers(abc.ABC):
    """One env per worker; commands go to all workers at once and the results are gathered in worker order."""

    @property
    @abc.abstractmethod
    def num_workers(self) -> int: ...

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    @abc.abstractmethod
    def workers_alive(self) -> list[bool]:
        """Whether each worker is running (False for a stopped worker; all False once the pool is closed)."""

    @abc.abstractmethod
    def _call(self, method: str, args: Sequence[tuple[Any, ...] | None], active: list[int],
              timeout_s: float | None) -> list[Any]:
        """Runs the (checked) call on the active workers; returns every worker's result, None where skipped."""

    @abc.abstractmethod
    def restart(self, worker: int, *, timeout_s: float | None = 600.0) -> None:
        """Replaces `worker` (stopped after a failure, or running) with a fresh env from the same factory."""

    @abc.abstractmethod
    def close(self) -> None:
        """Closes every worker's env and ends the workers; safe to call twice."""

    def call(self, method: str, args: Sequence[tuple[Any, ...] | None], *, timeout_s: float | None = None) -> list[Any]:
        """Calls `env.method(*args[i])` in every worker i, in parallel; returns the results in worker order.

        A worker whose args are None is skipped and gets None as result (e.g. an env whose episode ended);
        `()` calls a method without arguments. Raises `EnvWorkerError` if any worker fails (see the module).
        """
        name = type(self).__name__
        if self.closed:
            raise RuntimeError(f"{name} is closed; create a new pool")
        if len(args) != self.num_workers:
            raise ValueError(f"{name}.{method}: got {len(args)} arguments for {self.num_workers} workers")
        active = [i for i, arg in enumerate(args) if arg is not None]
        for i in active:
            if not isinstance(args[i], tuple):
                raise TypeError(
                    f"{name}.call({method!r}): args[{i}] must be a tuple of arguments or None, "
                    f"got {type(args[i]).__name__}"
                )
        return self._call(method, args, active, timeout_s)

    def reset(self, init_state_indices: Sequence[int | None], *, timeout_s: float | None = None) -> list[Any]:
        """`env.reset(index)` in every worker (None: skip that worker); returns the observations in worker order."""
        return self.call("reset", [None if i is None else (i,) for i in init_state_indices], timeout_s=timeout_s)

    def step_chunk(self, actions: Sequence[Any], *, timeout_s: float | None = None) -> list[Any]:
        """`env.step_chunk(actions[i])` in every worker (None: skip that worker); returns the results in order.

        `actions` is a sequence of per-worker chunks ([h, action_dim] each, h may differ) or one array
        [num_workers, h, action_dim].
        """
        return self.call("step_chunk", [None if a is None else (a,) for a in actions], timeout_s=timeout_s)

    def __enter__(self) -> EnvWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raise_failures(method: str, results: list[Any], failures: dict[int, tuple[str, str]]) -> None:
    """Raises one `EnvWorkerError` for a call's failures {worker: (message, remote traceback)}, if any."""
    if failures:
        first = min(failures)
        message, remote_tb = failures[first]
        raise EnvWorkerError(first, method, message, remote_tb, results=results,
                             messages={w: m for w, (m, _) in failures.items()})


def _worker_main(conn: multiprocessing.connection.Connection, factory: Callable[[], Any]) -> None:
    """Worker loop: build the env, then answer (method, arg) commands until "close" or the parent goes away."""
    # Ctrl-C reaches the whole process group; the parent handles it and closes the pool in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = None
    try:
        env = factory()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ok", None, ""))
    try:
        while True:
            try:
                method, args = conn.recv()
            except (EOFError, OSError):  # parent exited or closed its end: shut down quietly
                break
            if method == "close":
                break
            try:
                result = getattr(env, method)(*args)
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            else:
                conn.send(("ok", result, ""))
    finally:
        try:
            env.close()
        finally:
            conn.close()


def _died(proc: mp.process.BaseProcess) -> tuple[str, str, str]:
    """The error reply for a worker whose pipe closed without an answer (crash, kill, out of memory)."""
    proc.join(5.0)  # reap it, so its exit code (negative: killed by that signal) can be reported
    return ("error", f"worker exited (exit code {proc.exitcode}) before replying", "")


def _shutdown(processes: list[mp.process.BaseProcess | None],
              conns: list[multiprocessing.connection.Connection | None]) -> None:
    """Asks every worker to close its env, then joins it (terminating stragglers); None entries are skipped."""
    for conn in conns:
        if conn is None:
            continue
        try:
            conn.send(("close", None))
        except (OSError, ValueError):  # worker already gone or pipe already closed
            pass
    deadline = time.monotonic() + _CLOSE_TIMEOUT_S
    for proc in processes:
        if proc is None:
            continue
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
    for conn in conns:
        if conn is not None:
            conn.close()


class EnvPool(EnvWorkers):
    """One env per spawned worker process on this machine."""

    def __init__(self, env_factories: Sequence[Callable[[], Any]], *, start_timeout_s: float | None = 600.0) -> None:
        """Starts one worker per factory and waits until every env is built (any failure closes them all).

        Args:
            env_factories: picklable zero-argument callables, each returning one env (built in its worker).
            start_timeout_s: how long to wait for all envs to be built (None: forever).
        """
        if len(env_factories) == 0:
            raise ValueError("EnvPool needs at least one env factory")
        self._ctx = mp.get_context("spawn")
        self._factories = list(env_factories)
        # Entry i is None while worker i is stopped (after a failure, until `restart(i)`).
        self._processes: list[mp.process.BaseProcess | None] = [None] * len(self._factories)
        self._conns: list[multiprocessing.connection.Connection | None] = [None] * len(self._factories)
        self._closed = False
        # Closes the workers even if the pool is never closed explicitly (e.g. at interpreter exit).
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)
        try:
            for index in range(self.num_workers):
                self._spawn(index)
            self._await_start(range(self.num_workers), start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return len(self._factories)

    @property
    def closed(self) -> bool:
        return self._closed

    def workers_alive(self) -> list[bool]:
        return [proc is not None and proc.is_alive() for proc in self._processes]

    def restart(self, worker: int, *, timeout_s: float | None = 600.0) -> None:
        if self._closed:
            raise RuntimeError("EnvPool is closed; create a new pool")
        self._stop(worker)
        self._spawn(worker)
        self._await_start([worker], timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def _spawn(self, index: int) -> None:
        parent_end, child_end = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child_end, self._factories[index]),
                                 name=f"env-worker-{index}", daemon=True)
        proc.start()
        child_end.close()  # so the worker sees EOF if this process dies
        self._processes[index], self._conns[index] = proc, parent_end

    def _await_start(self, workers: Sequence[int], timeout_s: float | None) -> None:
        """Waits until the listed workers have built their envs; raises `EnvWorkerError` for those that failed."""
        out: list[Any] = [None] * self.num_workers
        failures: dict[int, tuple[str, str]] = {}
        self._gather(workers, timeout_s, out, failures)
        raise_failures("__init__", out, failures)

    def _stop(self, index: int) -> None:
        """Ends worker `index` (its env is closed if it still answers) and marks it stopped."""
        proc, conn = self._processes[index], self._conns[index]
        self._processes[index] = self._conns[index] = None
        _shutdown([proc], [conn])

    def _call(self, method: str, args: Sequence[tuple[Any, ...] | None], active: list[int],
              timeout_s: float | None) -> list[Any]:
        out: list[Any] = [None] * self.num_workers
        failures: dict[int, tuple[str, str]] = {}
        sent = []
        for i in active:
            conn = self._conns[i]
            if conn is None:
                failures[i] = (f"the worker was stopped after an earlier failure; restart({i}) replaces it", "")
                continue
            try:
                conn.send((method, args[i]))
            except (OSError, ValueError) as exc:
                proc = self._processes[i]
                proc.join(1.0)
                failures[i] = (_died(proc)[1] if not proc.is_alive() else
                               f"could not send the command ({exc}); the worker is gone", "")
                self._stop(i)
                continue
            sent.append(i)
        self._gather(sent, timeout_s, out, failures)
        raise_failures(method, out, failures)
        return out

    def _gather(self, workers: Sequence[int], timeout_s: float | None, out: list[Any],
                failures: dict[int, tuple[str, str]]) -> None:
        """Puts each listed worker's reply in out[i], or its error in failures[i]; failed workers are stopped."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for i in workers:
            conn, proc = self._conns[i], self._processes[i]
            reply = None
            while reply is None:
                if conn.poll(_POLL_S):
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):
                        reply = _died(proc)
                elif not proc.is_alive():
                    reply = _died(proc)
                elif deadline is not None and time.monotonic() > deadline:
                    reply = ("error", f"no reply within {timeout_s} s", "")
            status, payload, remote_tb = reply
            if status == "ok":
                out[i] = payload
            else:
                failures[i] = (payload, remote_tb)
        for i in failures:
            if self._processes[i] is not None:
                self._stop(i)
