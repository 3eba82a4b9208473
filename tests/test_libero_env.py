"""LIBERO envs (faster_vla.libero.env) and the env worker pool, on libero_90 task 0 ("close the top drawer
of the cabinet"), headless. Needs the `libero` extra (pip install -e ".[libero]"); skipped without it.

Costs on a 2-core CPU: an env is ~2 s to create, ~0.3 s to reset, ~0.25 s per 10-step chunk when only the
chunk end is rendered (~1.4 s when every step is); the pool test starts two worker processes (~10 s).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import numpy as np
import pytest

from faster_vla.libero import env as libero_env
from faster_vla.libero.env_pool import EnvPool, EnvWorkerError
from faster_vla.libero.env import (
    NOOP_ACTION,
    ChunkResult,
    LiberoEnv,
    LiberoEnvConfig,
    LiberoUnavailableError,
    list_tasks,
    make_libero_pool,
    resolve_task,
)
from faster_vla.policies.transforms import LiberoInputs

OBS_KEYS = {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
TASK0 = "KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet"
DRAWER_JOINT = "wooden_cabinet_1_top_level"  # task 0's goal: this slide joint in its closed range [0, 0.005]
CHUNK = 10


@pytest.fixture(scope="module")
def env(libero_installed: None):
    with LiberoEnv(LiberoEnvConfig(suite="libero_90", task=0, render_mode="chunk_boundary")) as env:
        yield env


@pytest.fixture(scope="module")
def actions() -> np.ndarray:
    """[CHUNK + 2, 7] random actions in [-1, 1] (two spare steps for chunks longer than the horizon)."""
    return np.random.default_rng(0).uniform(-1.0, 1.0, size=(CHUNK + 2, 7))


def _assert_obs(obs: dict, instruction: str) -> None:
    assert set(obs) == OBS_KEYS
    for key in ("observation/image", "observation/wrist_image"):
        assert obs[key].shape == (224, 224, 3) and obs[key].dtype == np.uint8, key
        assert obs[key].std() > 5, f"{key} looks blank"
    assert obs["observation/state"].shape == (8,) and obs["observation/state"].dtype == np.float32
    assert np.all(np.isfinite(obs["observation/state"]))
    assert obs["prompt"] == instruction


def _assert_same_obs(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key == "prompt":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _force_drawer_closed(env: LiberoEnv) -> None:
    sim = env.sim
    sim.data.qpos[sim.model.get_joint_qpos_addr(DRAWER_JOINT)] = 0.005
    sim.data.qvel[sim.model.get_joint_qvel_addr(DRAWER_JOINT)] = 0.0
    sim.forward()


def test_missing_extra_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(libero_env.importlib.metadata, "version", not_installed)
    with pytest.raises(LiberoUnavailableError, match=r'pip install -e "\.\[libero\]"'):
        libero_env._libero.__wrapped__()


def test_stale_libero_config_is_named(
    libero_installed: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.yaml").write_text(f"init_states: {tmp_path}\n")  # e.g. one written for `libero`
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path))
    with pytest.raises(LiberoUnavailableError, match=f"no .npz init states.*remove {tmp_path}/config.yaml"):
        libero_env._check_paths(libero_env._libero())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="render_mode"):
        LiberoEnvConfig(render_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_steps"):
        LiberoEnvConfig(max_steps=0)
    assert LiberoEnvConfig(suite="libero_10").episode_max_steps() == 520
    assert LiberoEnvConfig(suite="libero_spatial", max_steps=7).episode_max_steps() == 7


def test_task_resolution_and_errors(libero_installed: None) -> None:
    tasks = list_tasks("libero_90")
    assert len(tasks) == 90 and tasks[0].name == TASK0 and tasks[0].bddl_file.is_file()
    assert resolve_task("libero_90", TASK0).task_id == 0
    assert resolve_task("libero_90", tasks[1].instruction).task_id == 1
    with pytest.raises(ValueError, match="matches several libero_90 tasks"):  # also KITCHEN_SCENE5's
        resolve_task("libero_90", "close the top drawer of the cabinet")
    assert len(list_tasks("libero_10")) == 10
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_91'.*libero_90"):
        resolve_task("libero_91", 0)
    with pytest.raises(ValueError, match=r"out of range for libero_90 \(90 tasks.*list_tasks\('libero_90'\)"):
        resolve_task("libero_90", 90)
    with pytest.raises(ValueError, match=f"unknown task.*did you mean.*{TASK0}"):
        resolve_task("libero_90", "KITCHEN_SCENE10_close_the_top_drawer")


def test_reset_and_step_chunk_observations(env: LiberoEnv, actions: np.ndarray) -> None:
    obs = env.reset(0)
    _assert_obs(obs, "close the top drawer of the cabinet")
    result = env.step_chunk(actions[:CHUNK])
    assert isinstance(result, ChunkResult)
    assert result.num_steps == CHUNK and env.steps == CHUNK
    assert result.rewards.shape == (CHUNK,) and result.rewards.dtype == np.float32
    assert not result.rewards.any() and not result.done and not result.truncated
    timing = result.info.pop("timing_s")  # where the chunk's time went (the run's stage split)
    assert set(timing) == {"physics", "rendering"} and timing["physics"] > 0 and timing["rendering"] > 0
    assert result.info == {"success": False, "truncated": False, "step": CHUNK}
    _assert_obs(result.obs, env.instruction)
    assert not np.array_equal(result.obs["observation/state"], obs["observation/state"]), "the robot did not move"
    model_input = LiberoInputs()(result.obs)  # the policy's input transform accepts the observation as is
    assert model_input["state"].shape == (8,)
    with pytest.raises(ValueError, match=r"init_state_index 50 out of range.*50 init states"):
        env.reset(50)
    with pytest.raises(ValueError, match=r"actions must be shaped \[h >= 1, 7\]"):
        env.step_chunk(np.zeros((CHUNK, 6)))


def test_forced_goal_gives_reward_and_done(env: LiberoEnv) -> None:
    env.reset(0)
    assert not env.check_success()
    _force_drawer_closed(env)
    _, reward, done, info = env.step(NOOP_ACTION)
    assert (reward, done, info["success"], info["truncated"]) == (1.0, True, True, False)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(NOOP_ACTION)
    # Inside a chunk: stops at the success step, with the terminal observation rendered.
    env.reset(0)
    _force_drawer_closed(env)
    renders = env.num_camera_renders
    result = env.step_chunk(np.tile(NOOP_ACTION, (CHUNK, 1)))
    assert result.num_steps == 1 and result.done and not result.truncated
    np.testing.assert_array_equal(result.rewards, [1.0])
    assert env.num_camera_renders - renders == 2
    _assert_obs(result.obs, env.instruction)


def test_same_init_state_and_actions_give_same_episode(env: LiberoEnv, actions: np.ndarray) -> None:
    first_obs = env.reset(3)
    first = env.step_chunk(actions[:CHUNK])
    first_state = env.get_sim_state()
    env.reset(7)  # an episode in between must leave no trace (fixture placement, gripper command, ...)
    env.step_chunk(actions[::-1][:5])
    again_obs = env.reset(3)
    again = env.step_chunk(actions[:CHUNK])
    np.testing.assert_array_equal(env.get_sim_state(), first_state)
    _assert_same_obs(again_obs, first_obs)
    _assert_same_obs(again.obs, first.obs)


def test_chunk_boundary_renders_only_chunk_ends_and_matches_every_step(
    env: LiberoEnv, actions: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = env.num_camera_renders
    lazy_reset_obs = env.reset(2)
    assert env.num_camera_renders - n == 2  # two cameras, once, after the last wait step
    lazy = env.step_chunk(actions[:CHUNK])
    assert env.num_camera_renders - n == 4  # and once at the end of the chunk
    lazy_state = env.get_sim_state()

    # The reference: stock robosuite, which renders at every step of the reset, the init state and the wait.
    gate = LiberoEnv._set_render
    with monkeypatch.context() as patch:
        patch.setattr(LiberoEnv, "_set_render", lambda self, on: gate(self, True))
        with LiberoEnv(LiberoEnvConfig(suite="libero_90", task=0, render_mode="every_step")) as stock:
            stock_reset_obs = stock.reset(2)
            assert stock.num_camera_renders == 2 * (2 + stock.config.num_wait_steps)
            stock_obs = stock.step_chunk(actions[:CHUNK]).obs

    config = LiberoEnvConfig(suite="libero_90", task=0, render_mode="every_step", max_steps=CHUNK + 2)
    with LiberoEnv(config) as eager:
        eager_reset_obs = eager.reset(2)
        assert eager.num_camera_renders == 2  # a reset renders only the observation it returns, in every mode
        eager_result = eager.step_chunk(actions[:CHUNK])
        assert eager.num_camera_renders == 2 * (1 + CHUNK)
        np.testing.assert_array_equal(eager.get_sim_state(), lazy_state)
        for reset_obs in (eager_reset_obs, lazy_reset_obs):  # skipped renders change no frame
            _assert_same_obs(reset_obs, stock_reset_obs)
        for obs in (eager_result.obs, lazy.obs):
            _assert_same_obs(obs, stock_obs)
        # Every step's observation comes back (what windows starting at any step need), the last one is `obs`.
        assert len(eager_result.info["observations"]) == CHUNK and "observations" not in lazy.info
        assert eager_result.info["observations"][-1] is eager_result.obs
        states = [o["observation/state"] for o in eager_result.info["observations"]]
        assert all(not np.array_equal(a, b) for a, b in zip(states, states[1:]))
        # Truncation at max_steps: the chunk is cut short and done stays False.
        cut = eager.step_chunk(actions[:CHUNK])
        assert (cut.num_steps, cut.done, cut.truncated, cut.info["truncated"]) == (2, False, True, True)
        with pytest.raises(RuntimeError, match="episode is over"):
            eager.step_chunk(actions[:1])


def test_pool_matches_single_env_and_reraises_worker_errors(env: LiberoEnv, actions: np.ndarray) -> None:
    config = env.config
    chunks = [actions[:CHUNK], actions[2:]]  # [2, CHUNK, 7]: a different chunk per worker
    expected = []
    for index, chunk in zip((4, 1), chunks):
        reset_obs = env.reset(index)
        expected.append((reset_obs, env.step_chunk(chunk), env.get_sim_state()))

    with make_libero_pool(config, num_workers=2) as pool:
        reset_obs = pool.reset([4, 1])
        results = pool.step_chunk(chunks)
        states = pool.call("get_sim_state", [(), ()])
        for (want_obs, want, want_state), got_obs, got, got_state in zip(expected, reset_obs, results, states):
            _assert_same_obs(got_obs, want_obs)
            _assert_same_obs(got.obs, want.obs)
            np.testing.assert_array_equal(got.rewards, want.rewards)
            assert (got.num_steps, got.done, got.truncated) == (want.num_steps, want.done, want.truncated)
            np.testing.assert_array_equal(got_state, want_state)
        assert pool.step_chunk([None, chunks[0][:1]])[0] is None  # None skips a worker

        assert pool.workers_alive() == [True, True]
        with pytest.raises(EnvWorkerError, match=r"(?s)env worker 1 failed in reset\(\).*out of range.*traceback") as err:
            pool.reset([0, 999])
        # Only the failed worker is stopped; the other's answer comes with the error.
        assert err.value.failed == (1,) and set(err.value.results[0]) == OBS_KEYS
        assert not pool.closed and pool.workers_alive() == [True, False]
    assert pool.closed and pool.workers_alive() == [False, False]
    with pytest.raises(RuntimeError, match="closed"):
        pool.reset([0, 0])


class _ToyEnv:
    """A stand-in env for the pool's failure paths (no simulator needed): reset(-1) kills its process."""

    def __init__(self, fail_on_create: bool = False) -> None:
        if fail_on_create:
            raise FileNotFoundError("no such scene")

    def reset(self, index: int) -> int:
        if index < 0:
            os._exit(3)
        return index

    def close(self) -> None:
        pass


def test_pool_reports_dead_workers_and_failed_starts() -> None:
    with EnvPool([_ToyEnv, _ToyEnv]) as pool:
        assert pool.reset([5, 6]) == [5, 6]
        with pytest.raises(EnvWorkerError, match=r"env worker 0 failed in reset\(\): worker exited \(exit code 3\)") as err:
            pool.reset([-1, 0])
        assert err.value.results == [None, 0] and pool.workers_alive() == [False, True]
    assert pool.workers_alive() == [False, False]
    started = r"(?s)env worker 1 failed in __init__\(\): FileNotFoundError: no such scene.*test_libero_env.py"
    with pytest.raises(EnvWorkerError, match=started):
        EnvPool([_ToyEnv, functools.partial(_ToyEnv, fail_on_create=True)])
