"""Env workers as Ray actors (`--envs.backend ray`): the same lockstep interface as `EnvPool`, each worker a Ray
actor holding one env, on this machine or anywhere on a Ray cluster.

Only the envs move: the policy and the learner stay in the calling process, which acts once per round on all
workers' observations (central batched inference, as SEED RL does) and sends each worker its chunk. Ray is
imported here alone, and this module only when the ray backend is chosen (`rollout.open_envs`), so runs on
the default backend never import Ray.

A pool joins the Ray this process is already connected to, or the cluster at `address` ("auto": the one
`ray start` runs on this machine), or else starts a local Ray sized to its workers and stops it on `close`.
A worker whose env raises, or whose actor dies (killed, out of memory, its node lost), is reported as
`EnvWorkerError` like a local worker's failure, and `restart(worker)` starts a fresh actor in its place,
wherever the cluster has room.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.exceptions

from faster_vla.libero.env_pool import EnvWorkers, raise_failures

_CLOSE_TIMEOUT_S = 30.0
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor names in its error texts


class _EnvActor:
    """One env, built in the actor from its factory; answers the pool's calls."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.env = factory()

    def ready(self) -> None:
        """Answers once the env is built (the pool waits for it)."""

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        return getattr(self.env, method)(*args)

    def close(self) -> None:
        self.env.close()


def _failure(error: BaseException) -> tuple[str, str]:
    """(message, remote traceback) of a failed actor call."""
    text = _ANSI_COLOUR.sub("", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    if isinstance(error, ray.exceptions.RayTaskError):  # the env raised: the actor is fine, its env may not be
        cause = error.cause
        return f"{type(cause).__name__}: {cause}", text
    if isinstance(error, ray.exceptions.RayActorError):  # the actor died: its env failed to build, or killed,
        if getattr(error, "actor_init_failed", False):  # crashed, out of memory, its node lost
            return f"building the env failed: {lines[-1]}", text
        return f"the Ray actor died ({lines[0]} {lines[-1]})" if len(lines) > 1 else lines[0], text
    return f"{type(error).__name__}: {lines[0]}", ""


def _shutdown(actors: list[Any], owns_ray: bool) -> None:
    """Closes every live actor's env, ends the actors, and stops Ray if the pool started it."""
    if not ray.is_initialized():
        return
    live = [a for a in actors if a is not None]
    try:
        if live:
            ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=_CLOSE_TIMEOUT_S)
    finally:
        for actor in live:
            ray.kill(actor, no_restart=True)
        actors[:] = [None] * len(actors)
        if owns_ray:
            ray.shutdown()


class RayEnvPool(EnvWorkers):
    """One env per Ray actor; commands go to all actors at once and the results are gathered in worker order."""

    def __init__(self, env_factories: Sequence[Callable[[], Any]], *, address: str | None = None,
                 cpus_per_worker: float = 1.0, local_workers: int | None = None,
                 start_timeout_s: float | None = 600.0) -> None:
        """Starts one actor per factory and waits until every env is built (any failure closes them all).

        Args:
            env_factories: picklable zero-argument callables, each returning one env (built in its actor).
            address: the Ray cluster to join ("auto" or host:port); None: the Ray this process is connected to,
                or a local one with `cpus_per_worker` CPUs per worker, stopped on close.
            cpus_per_worker: CPUs Ray reserves for each actor.
            local_workers: the workers a local Ray started here is sized for (default: this pool's), so that
                pools opened later in this process (a run's eval workers) fit in it too.
            start_timeout_s: how long to wait for the envs to be built, queueing for room included (None: forever).
        """
        if len(env_factories) == 0:
            raise ValueError("RayEnvPool needs at least one env factory")
        self._factories = list(env_factories)
        self._owns_ray = False
        if not ray.is_initialized():
            quiet = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            with warnings.catch_warnings():
                # JAX warns at every fork; Ray's daemons are started by fork + exec, which runs none of our threads.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                if address is None:
                    workers = max(local_workers or 0, len(self._factories))
                    ray.init(num_cpus=math.ceil(cpus_per_worker * workers), **quiet)
                else:
                    ray.init(address=address, **quiet)
            self._owns_ray = True
        # No restarts by Ray itself: a restarted actor would rebuild its env mid-episode; `restart` is ours.
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=0, max_task_retries=0)(_EnvActor)
        self._name = f"faster-vla-env-{uuid.uuid4().hex[:8]}"
        self._started = 0  # actors started so far: each gets its own name, `{name}-w{worker}-{n}`
        # Entry i is None while worker i is stopped (after a failure, until `restart(i)`).
        self._actors: list[Any] = [None] * len(self._factories)
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._actors, self._owns_ray)
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

    @property
    def name(self) -> str:
        """The prefix of this pool's actor names (`ray list actors` shows them as `{name}-w{worker}-{n}`)."""
        return self._name

    def workers_alive(self) -> list[bool]:
        """Whether each worker has an actor (a Ray actor that died since the last call is found at the next)."""
        return [actor is not None for actor in self._actors]

    def restart(self, worker: int, *, timeout_s: float | None = 600.0) -> None:
        if self._closed:
            raise RuntimeError("RayEnvPool is closed; create a new pool")
        self._stop(worker)
        self._spawn(worker)
        self._await_start([worker], timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def _spawn(self, index: int) -> None:
        self._started += 1
        name = f"{self._name}-w{index}-{self._started}"
        self._actors[index] = self._actor_class.options(name=name).remote(self._factories[index])

    def _stop(self, index: int) -> None:
        actor, self._actors[index] = self._actors[index], None
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def _await_start(self, workers: Sequence[int], timeout_s: float | None) -> None:
        """Waits until the listed actors have built their envs; raises `EnvWorkerError` for those that failed."""
        refs = {i: self._actors[i].ready.remote() for i in workers}
        out: list[Any] = [None] * self.num_workers
        failures: dict[int, tuple[str, str]] = {}
        self._gather(refs, timeout_s, out, failures)
        raise_failures("__init__", out, failures)

    def _call(self, method: str, args: Sequence[tuple[Any, ...] | None], active: list[int],
              timeout_s: float | None) -> list[Any]:
        out: list[Any] = [None] * self.num_workers
        failures: dict[int, tuple[str, str]] = {}
        refs = {}
        for i in active:
            if self._actors[i] is None:
                failures[i] = (f"the worker was stopped after an earlier failure; restart({i}) replaces it", "")
            else:
                refs[i] = self._actors[i].call.remote(method, args[i])
        self._gather(refs, timeout_s, out, failures)
        raise_failures(method, out, failures)
        return out

    def _gather(self, refs: dict[int, Any], timeout_s: float | None, out: list[Any],
                failures: dict[int, tuple[str, str]]) -> None:
        """Puts each worker's reply in out[i], or its error in failures[i]; failed workers are stopped."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
                failures[i] = _failure(error)
        for i in refs:
            if i in failures:
                self._stop(i)
