"""Env worker failures: a local `EnvPool` stops only the failed worker and `restart` replaces it; the episode loop
(`run_episodes` with a `WorkerRecovery`) loses only the episode in flight, runs it again from its start with its
own key (it comes out as an undisturbed run's), logs the failure, and stops with a clear error once failures
exceed the budget; without a recovery it still fails fast. Plus the env backend config's checks. No simulator:
toy envs in spawned worker processes (~2-3 s each to start on a 2-core CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from faster_vla.acting.agent import Decision
from faster_vla.libero.config import EnvsConfig
from faster_vla.libero.env import ChunkResult
from faster_vla.libero.env_pool import EnvPool, EnvWorkerError
from faster_vla.libero.rollout import WorkerFailuresExceededError, WorkerRecovery, open_envs, run_episodes
from faster_vla.rl.flops import DecisionFlops

CHUNKS_PER_EPISODE = 3


class ChunkEnv:
    """Episodes of 3 chunks. A file `{init state}-{chunk}` in `die_dir` kills the worker at that chunk (with the
    text "once" the file is removed first, so the episode's next attempt gets through)."""

    def __init__(self, die_dir: str) -> None:
        self.die_dir = Path(die_dir)
        self.init_state, self.chunk = -1, 0

    def reset(self, init_state: int) -> dict[str, Any]:
        self.init_state, self.chunk = init_state, 0
        return {"init_state": init_state, "chunk": 0}

    def step_chunk(self, actions: np.ndarray) -> ChunkResult:
        marker = self.die_dir / f"{self.init_state}-{self.chunk}"
        if marker.exists():
            if marker.read_text() == "once":
                marker.unlink()
            os._exit(9)
        self.chunk += 1
        obs = {"init_state": self.init_state, "chunk": self.chunk}
        return ChunkResult(obs, np.zeros(len(actions), np.float32), len(actions), False,
                           self.chunk >= CHUNKS_PER_EPISODE, {})

    def close(self) -> None:
        pass


class KeyAgent:
    """Acts with chunks made of its decision keys' bits: an episode's chunks show which keys it used."""

    def act_batch(self, learner: Any, observations: list[dict[str, Any]], *, rngs: list[jax.Array],
                  **_: Any) -> list[Decision]:
        out = []
        for rng in rngs:
            bits = np.asarray(jax.random.key_data(rng), np.float64).ravel()
            chunk = np.resize(bits, (2, 7))
            out.append(Decision(chunk, chunk, 0, False, None, {}, DecisionFlops(1, 0, 0, 0, 0)))
        return out


def _factory(die_dir: Path) -> functools.partial[ChunkEnv]:
    return functools.partial(ChunkEnv, str(die_dir))  # picklable, for the spawned workers


def _episodes() -> list[tuple[int, jax.Array]]:
    key = jax.random.key(3)
    return [(s, jax.random.fold_in(key, s)) for s in (10, 11, 12)]


def _run(env: Any, **kwargs: Any) -> list[Any]:
    return run_episodes(KeyAgent(), None, None, env, _episodes(), record="chunk", **kwargs)


def test_a_pool_stops_only_the_failed_worker_and_restarts_it(tmp_path):
    (tmp_path / "5-0").write_text("")
    with EnvPool([_factory(tmp_path)] * 2) as pool:
        assert [o["init_state"] for o in pool.reset([5, 6])] == [5, 6]
        with pytest.raises(EnvWorkerError, match=r"env worker 0 failed in step_chunk\(\): worker exited \(exit code 9\)") as err:
            pool.step_chunk([np.zeros((2, 7)), np.zeros((2, 7))])
        assert err.value.failed == (0,) and err.value.results[0] is None
        assert err.value.results[1].obs == {"init_state": 6, "chunk": 1}  # the other worker's answer is kept
        assert not pool.closed and pool.workers_alive() == [False, True]
        with pytest.raises(EnvWorkerError, match=r"worker 0 failed in reset\(\): the worker was stopped .*restart\(0\)"):
            pool.reset([1, None])
        pool.restart(0)
        assert pool.workers_alive() == [True, True]
        assert [o["init_state"] for o in pool.reset([7, 8])] == [7, 8]
    assert pool.closed and pool.workers_alive() == [False, False]


def test_a_failed_worker_costs_only_its_episode_which_runs_again(tmp_path):
    reference = _run(ChunkEnv(str(tmp_path)))  # one env in this process, nothing fails
    (tmp_path / "11-1").write_text("once")  # init state 11's worker dies at its second chunk, once
    logged: list[str] = []
    recovery = WorkerRecovery(max_failures=1, log=logged.append)
    with EnvPool([_factory(tmp_path)] * 2) as pool:
        recovered = _run(pool, recovery=recovery)
        assert not pool.closed and pool.workers_alive() == [True, True]
    assert recovery.failures == 1 and len(logged) == 1
    assert "env worker 1 failed in step_chunk() (running init state 11): worker exited (exit code 9)" in logged[0]
    assert "running the episode again from its start (failure 1; 1 are recovered from)" in logged[0]
    assert [t.init_state for t in recovered] == [10, 11, 12]
    for want, got in zip(reference, recovered):  # the re-run episode too: same keys from its start, same chunks
        assert got.steps == want.steps == 2 * CHUNKS_PER_EPISODE and got.rows == want.rows
        np.testing.assert_array_equal(np.stack(got.chunks), np.stack(want.chunks))


def test_failures_beyond_the_budget_stop_with_a_clear_error(tmp_path):
    (tmp_path / "12-0").write_text("always")  # init state 12 kills its worker every time
    logged: list[str] = []
    with EnvPool([_factory(tmp_path)] * 2) as pool:
        with pytest.raises(WorkerFailuresExceededError, match=r"env workers failed 2 times, more than the 1 recovered "
                           r"from; stopping. The last: worker 0 \(running init state 12\) failed in step_chunk\(\)"):
            _run(pool, recovery=WorkerRecovery(max_failures=1, log=logged.append))
        assert pool.closed
    assert len(logged) == 1 and "init state 12" in logged[0]
    # Without a recovery (evaluation), the first failure closes the pool and raises.
    with EnvPool([_factory(tmp_path)] * 2) as pool:
        with pytest.raises(EnvWorkerError, match=r"env worker 0 failed in step_chunk\(\)") as err:
            _run(pool)
        assert pool.closed
    assert "was running init state 12" in "\n".join(err.value.__notes__)


def test_envs_config_is_checked(monkeypatch):
    for bad, match in [(dict(backend="slurm"), r"envs.backend must be one of \('local', 'ray'\), got 'slurm'"),
                       (dict(ray_address="auto"), r"envs.ray_address \('auto'\) is used only with envs.backend 'ray'"),
                       (dict(backend="ray", ray_address=" "), "envs.ray_address must be 'auto', a cluster address"),
                       (dict(backend="ray", cpus_per_worker=0), "envs.cpus_per_worker must be a number > 0, got 0"),
                       (dict(max_worker_failures=-1), "envs.max_worker_failures must be an integer >= 0.*got -1")]:
        with pytest.raises(ValueError, match=match):
            EnvsConfig(**bad)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    EnvsConfig().check_available()  # the local backend needs no Ray
    with pytest.raises(ImportError, match=r"envs.backend 'ray' needs Ray, which is not installed: pip install -e \"\.\[ray\]\""):
        open_envs(None, 2, EnvsConfig(backend="ray"))  # type: ignore[arg-type]  (fails before the env config is read)


def test_the_local_backend_never_imports_ray():
    code = ("import sys; import faster_vla.runs.loop, faster_vla.launch.cli; "
            "from faster_vla.libero.rollout import open_envs; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'faster_vla.libero.ray_pool'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
