"""Env workers as Ray actors (`--envs.backend ray`) on a local Ray of 2 CPUs: a pool's failures read as a local
pool's and `restart` replaces an actor; a short K = 2 run on libero_90 runs the episodes local workers run, and
an env actor killed mid-run costs only its episode, which runs again, the failure logged and counted.

Needs the `ray` extra (pip install -e ".[ray]") and, for the run, the `libero` extra; skipped without them.
Costs on a 2-core CPU: Ray starts in ~3 s; the runs are those of tests/test_many_envs.py (10-step episodes,
64² renders), each env actor building its LIBERO env in ~10 s.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from faster_vla.libero.env_pool import EnvWorkerError  # noqa: E402
from faster_vla.libero.ray_pool import RayEnvPool  # noqa: E402
from tests.test_env_recovery import CHUNKS_PER_EPISODE, ChunkEnv  # noqa: E402


def _kill(actor_name: str) -> None:
    """Kills a Ray actor by name and waits until Ray reports it dead."""
    actor = ray.get_actor(actor_name)
    ray.kill(actor, no_restart=True)
    while True:
        try:
            ray.get(actor.ready.remote())
        except ray.exceptions.RayActorError:
            return


def _actor_of(pool: RayEnvPool, worker: int) -> str:
    names = [n for n in ray.util.list_named_actors() if n.startswith(f"{pool.name}-w{worker}-")]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")  # ray.init: fork + exec
def test_ray_pool_reports_failures_and_restarts_actors(tmp_path):
    (tmp_path / "5-0").write_text("")  # the env at init state 5 kills its actor's process at the first chunk
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayEnvPool([functools.partial(ChunkEnv, str(tmp_path))] * 2) as pool:
            assert [o["init_state"] for o in pool.reset([5, 6])] == [5, 6]
            with pytest.raises(EnvWorkerError, match=r"env worker 0 failed in step_chunk\(\): the Ray actor died") as err:
                pool.step_chunk([np.zeros((2, 7)), np.zeros((2, 7))])
            assert err.value.failed == (0,) and err.value.results[1].obs == {"init_state": 6, "chunk": 1}
            assert pool.workers_alive() == [False, True]
            with pytest.raises(EnvWorkerError, match=r"(?s)env worker 1 failed in nap\(\): AttributeError: 'ChunkEnv' "
                               r"object has no attribute 'nap'.*traceback in worker 1"):
                pool.call("nap", [None, ()])  # the env raised: its actor is stopped too
            pool.restart(0)
            pool.restart(1)
            _kill(_actor_of(pool, 1))  # as a lost node would
            with pytest.raises(EnvWorkerError, match=r"env worker 1 failed in reset\(\): the Ray actor died .*ray.kill"):
                pool.reset([7, 8])
            pool.restart(1)
            assert [o["init_state"] for o in pool.reset([7, 8])] == [7, 8]
            assert pool.step_chunk([np.zeros((2, 7)), None])[0].obs["chunk"] == 1 < CHUNKS_PER_EPISODE
        assert pool.closed and ray.is_initialized()  # a Ray the pool did not start stays up
        assert not [n for n in ray.util.list_named_actors() if n.startswith(pool.name)]
    finally:
        ray.shutdown()


def test_a_pool_starts_a_local_ray_sized_for_the_workers_asked_and_stops_it(tmp_path):
    assert not ray.is_initialized()
    with RayEnvPool([functools.partial(ChunkEnv, str(tmp_path))], local_workers=3) as pool:
        assert ray.cluster_resources()["CPU"] == 3  # room for a later pool of 2 (a run's eval workers)
        with RayEnvPool([functools.partial(ChunkEnv, str(tmp_path))] * 2) as later:
            assert [o["init_state"] for o in later.reset([1, 2])] == [1, 2]
        assert pool.reset([4]) == [{"init_state": 4, "chunk": 0}]
    assert not ray.is_initialized()


def test_a_run_on_ray_actors_matches_local_workers_and_survives_a_killed_actor(tmp_path, monkeypatch):
    pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")
    from faster_vla.libero.config import EnvsConfig
    from faster_vla.runs.loop import train
    from tests.test_many_envs import _config, _records

    local = train(_config(tmp_path / "local", num_envs=2), log=lambda *_: None)["counters"]

    killed: list[str] = []
    step_chunk = RayEnvPool.step_chunk

    def kill_worker_1_in_round_2(pool: RayEnvPool, actions, **kwargs):
        # 10-step episodes of one 10-step chunk: round 1 (episodes 1-2) is the first call, round 2 the second.
        killed.append("call")
        if len(killed) == 2:
            _kill(_actor_of(pool, 1))
        return step_chunk(pool, actions, **kwargs)

    monkeypatch.setattr(RayEnvPool, "step_chunk", kill_worker_1_in_round_2)
    logged: list[str] = []
    config = _config(tmp_path / "ray", num_envs=2, envs=EnvsConfig(backend="ray", max_worker_failures=1))
    on_ray = train(config, log=logged.append)["counters"]
    assert not ray.is_initialized()  # the run started its own local Ray (2 actors of 1 CPU) and stopped it

    # Every episode ran, from the init state (seed, i) picks, to its end: the re-run one too.
    local_records, ray_records = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert [r["step"] for r in ray_records] == [1, 2, 3, 4]
    for key in ("train/init_state", "train/episode_steps", "train/success", "env_steps", "updates"):
        assert [r[key] for r in ray_records] == [r[key] for r in local_records], key
    assert on_ray["episodes"] == local["episodes"] == 4 and on_ray["env_steps"] == local["env_steps"]

    # The kill cost the episode worker 1 was running in round 2 (episode 4): logged, counted, run again.
    failures = [line for line in logged if "failed" in line]
    episode_4 = ray_records[3]["train/init_state"]
    assert len(failures) == 1, logged
    assert failures[0].startswith(f"env worker 1 failed in step_chunk() (running init state {episode_4}): the Ray "
                                  "actor died")
    assert "killed by `ray.kill`" in failures[0] and "running the episode again from its start" in failures[0]
    assert on_ray["worker_failures"] == 1 and local["worker_failures"] == 0
    assert [r["envs/worker_failures"] for r in ray_records] == [0, 0, 1, 1]  # counted after round 2
    # Round 2 stepped twice (into the dead actor, then the re-run episode), the final evaluation once.
    assert len(killed) == 4


@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")  # ray.init: fork + exec
def test_eval_on_ray_actors_reports_the_episodes_local_workers_do(tmp_path):
    """`faster-vla eval --num-workers 2 --envs.backend ray` (a local Ray it starts and stops) writes the report
    local workers write: the same init states, steps and outcomes (base policy, tiny_a, 10-step episodes)."""
    import dataclasses

    pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")
    import tyro

    from faster_vla import checkpoints
    from faster_vla.acting.actor_source import ActorSource
    from faster_vla.libero.config import EnvsConfig
    from faster_vla.runs.evaluate import EvalConfig, evaluate

    parsed = tyro.cli(EvalConfig, args=["--envs.backend", "ray", "--num-workers", "2"])
    assert parsed.envs == EnvsConfig(backend="ray") and parsed.num_workers == 2  # the flags reach the config
    actor = ActorSource("tiny_a", tokenizer=str(checkpoints.path("pi05_small/tokenizer.model")))
    config = EvalConfig(actor=actor, tasks=("0",), trials=2, max_steps=10, num_workers=2, output=tmp_path / "l.json")
    local = evaluate(config, log=lambda *_: None)
    on_ray = evaluate(dataclasses.replace(config, envs=parsed.envs, output=tmp_path / "r.json"), log=lambda *_: None)
    assert not ray.is_initialized()  # the evaluation's own local Ray is stopped with its pool
    assert (local.pop("envs_backend"), on_ray.pop("envs_backend")) == ("local", "ray")  # the report says where
    assert on_ray["worker_failures"] == local["worker_failures"] == 0
    for episode_local, episode_ray in zip(local["tasks"]["0"]["episodes"], on_ray["tasks"]["0"]["episodes"]):
        # Actions agree up to float rounding (another process), so outcomes and lengths are compared, not floats.
        assert {k: episode_ray[k] for k in ("init_state", "success", "steps")} == \
            {k: episode_local[k] for k in ("init_state", "success", "steps")}
    assert [e["init_state"] for e in on_ray["tasks"]["0"]["episodes"]] == [0, 1]
