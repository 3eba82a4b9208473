"""Environment worker processes: one env per process, driven in lockstep from the parent.

Simulators such as LIBERO (MuJoCo + robosuite + an offscreen renderer) are single-threaded Python and
CPU-bound, so the only way to use several cores is several processes. `EnvPool` starts one `spawn`ed
worker per env factory (spawn, not fork: a forked child would inherit the parent's JAX/XLA threads and
GL state, which is unsafe), sends a command to every worker at once and then gathers the replies, so the
workers run in parallel. Any worker failure closes the whole pool and re-raises in the parent as
`EnvWorkerError` carrying the worker's own traceback.

The env objects only need the methods the pool calls (`reset`, `step_chunk`, anything passed to `call`)
and `close`. Factories, arguments and results must be picklable (e.g. `functools.partial(LiberoEnv, config)`).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import signal
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

_POLL_S = 0.5  # how often a waiting parent checks that its workers are still alive
_CLOSE_TIMEOUT_S = 30.0


class EnvWorkerError(RuntimeError):
    """A worker's env raised (or the worker died); `remote_traceback` is the worker's own traceback."""

    def __init__(self, worker: int, method: str, message: str, remote_traceback: str = "") -> None:
        self.worker = worker
        self.method = method
        self.remote_traceback = remote_traceback
        text = f"env worker {worker} failed in {method}(): {message}"
        if remote_traceback:
            text += f"\n--- traceback in worker {worker} ---\n{remote_traceback.rstrip()}"
            text += "\n--- end of worker traceback ---"
        text += "\n(the pool has been closed; create a new one to continue)"
        super().__init__(text)


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


def _shutdown(processes: list[mp.process.BaseProcess], conns: list[multiprocessing.connection.Connection]) -> None:
    """Asks every worker to close its env, then joins it (terminating stragglers)."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, ValueError):  # worker already gone or pipe already closed
            pass
    deadline = time.monotonic() + _CLOSE_TIMEOUT_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
    for conn in conns:
        conn.close()


class EnvPool:
    """One env per spawned worker process; commands go to all workers at once and results are gathered."""

    def __init__(self, env_factories: Sequence[Callable[[], Any]], *, start_timeout_s: float | None = 600.0) -> None:
        """Starts one worker per factory and waits until every env is built.

        Args:
            env_factories: picklable zero-argument callables, each returning one env (built in its worker).
            start_timeout_s: how long to wait for all envs to be built (None: forever).
        """
        if len(env_factories) == 0:
            raise ValueError("EnvPool needs at least one env factory")
        ctx = mp.get_context("spawn")
        self._processes: list[mp.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._closed = False
        try:
            for index, factory in enumerate(env_factories):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(child_end, factory), name=f"env-worker-{index}", daemon=True
                )
                proc.start()
                child_end.close()  # so the worker sees EOF if this process dies
                self._processes.append(proc)
                self._conns.append(parent_end)
        except BaseException:
            _shutdown(self._processes, self._conns)
            raise
        # Closes the workers even if the pool is never closed explicitly (e.g. at interpreter exit).
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)
        self._gather(list(range(len(self._conns))), "__init__", start_timeout_s)

    @property
    def num_workers(self) -> int:
        return len(self._conns)

    @property
    def closed(self) -> bool:
        return self._closed

    def workers_alive(self) -> list[bool]:
        """Whether each worker process is still running (all False once the pool is closed)."""
        return [proc.is_alive() for proc in self._processes]

    def call(self, method: str, args: Sequence[tuple[Any, ...] | None], *, timeout_s: float | None = None) -> list[Any]:
        """Calls `env.method(*args[i])` in every worker i, in parallel; returns the results in worker order.

        A worker whose args are None is skipped and gets None as result (e.g. an env whose episode ended);
        `()` calls a method without arguments.
        """
        if self._closed:
            raise RuntimeError("EnvPool is closed; create a new pool")
        if len(args) != self.num_workers:
            raise ValueError(f"EnvPool.{method}: got {len(args)} arguments for {self.num_workers} workers")
        active = [i for i, arg in enumerate(args) if arg is not None]
        for i in active:
            if not isinstance(args[i], tuple):
                raise TypeError(
                    f"EnvPool.call({method!r}): args[{i}] must be a tuple of arguments or None, "
                    f"got {type(args[i]).__name__}"
                )
        for i in active:
            try:
                self._conns[i].send((method, args[i]))
            except (OSError, ValueError) as exc:
                self._fail(EnvWorkerError(i, method, f"could not send the command ({exc}); the worker is gone"))
        results = self._gather(active, method, timeout_s)
        out: list[Any] = [None] * self.num_workers
        for i, result in zip(active, results):
            out[i] = result
        return out

    def reset(self, init_state_indices: Sequence[int | None], *, timeout_s: float | None = None) -> list[Any]:
        """`env.reset(index)` in every worker (None: skip that worker); returns the observations in worker order."""
        return self.call("reset", [None if i is None else (i,) for i in init_state_indices], timeout_s=timeout_s)

    def step_chunk(self, actions: Sequence[Any], *, timeout_s: float | None = None) -> list[Any]:
        """`env.step_chunk(actions[i])` in every worker (None: skip that worker); returns the results in order.

        `actions` is a sequence of per-worker chunks ([h, action_dim] each, h may differ) or one array
        [num_workers, h, action_dim].
        """
        return self.call("step_chunk", [None if a is None else (a,) for a in actions], timeout_s=timeout_s)

    def _gather(self, workers: list[int], method: str, timeout_s: float | None) -> list[Any]:
        """Receives one reply from each listed worker; the first failure (after all replies) closes the pool."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: list[Any] = []
        first_error: EnvWorkerError | None = None
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
                results.append(payload)
            else:
                results.append(None)
                if first_error is None:
                    first_error = EnvWorkerError(i, method, payload, remote_tb)
        if first_error is not None:
            self._fail(first_error)
        return results

    def _fail(self, error: EnvWorkerError) -> None:
        self.close()
        raise error

    def close(self) -> None:
        """Closes every worker's env and joins the workers; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
