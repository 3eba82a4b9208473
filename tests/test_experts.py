"""Scripted experts (faster_vla.libero.experts) and the unrendered env mode they run in. Needs the `libero` extra."""

from __future__ import annotations

import math

import numpy as np
import pytest

from faster_vla.libero.experts import (
    EXPERTS,
    ExpertConfig,
    expert_for,
    hand_along,
    rotation_to_axis_angle,
    run_expert,
)
from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig
from faster_vla.policies.transforms import LIBERO_STATE_KEY, LIBERO_WRIST_IMAGE_KEY


def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.7, math.pi - 1e-3, math.pi])
def test_rotation_to_axis_angle_inverts_rodrigues(angle: float) -> None:
    axis = np.array([0.3, -0.5, 0.8])
    got = rotation_to_axis_angle(_rot(axis, angle))
    if angle == 0.0:
        np.testing.assert_allclose(got, 0.0, atol=1e-9)
        return
    np.testing.assert_allclose(_rot(got, np.linalg.norm(got)), _rot(axis, angle), atol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(angle, abs=1e-6)


def test_hand_along_takes_the_smaller_half_turn() -> None:
    assert hand_along(math.pi / 2) == pytest.approx(0.0)  # long side along y: LIBERO's default yaw
    assert abs(hand_along(0.0)) == pytest.approx(math.pi / 2)
    for angle in np.linspace(-4, 4, 17):
        yaw = hand_along(float(angle))
        assert -math.pi / 2 <= yaw < math.pi / 2
        assert math.isclose(math.cos(2 * (yaw + math.pi / 2 - angle)), 1.0, abs_tol=1e-9)  # same line


def test_unknown_task_and_bad_config_are_explained() -> None:
    with pytest.raises(ValueError, match="no scripted expert for task 'nope'.*KITCHEN_SCENE3_turn_on_the_stove"):
        expert_for("nope")
    with pytest.raises(ValueError, match="max_speed must be > 0"):
        ExpertConfig(max_speed=0.0)
    with pytest.raises(ValueError, match="action_noise must be >= 0"):
        ExpertConfig(action_noise=-0.1)


@pytest.mark.parametrize("task_name", sorted(EXPERTS))
def test_expert_solves_its_task_unrendered(libero_installed: None, task_name: str) -> None:
    """Each expert, with the recording defaults' noise, succeeds from an init state, acting in [-1, 1] (the
    success rate over all 50 init states is measured by `faster-vla record-demos`, docs/pretraining.md)."""
    with LiberoEnv(LiberoEnvConfig(task=task_name, render_mode="none")) as env:
        expert = expert_for(task_name, ExpertConfig(jitter_m=0.01, action_noise=0.1))
        actions: list[np.ndarray] = []
        for init in (7,):
            summary = run_expert(env, expert, init, np.random.default_rng(init),
                                 on_step=lambda action, info: actions.append(action))
            assert summary["success"], f"{task_name} init {init}: {summary}"
            assert env.check_success()
        assert env.num_camera_renders <= 2  # none mode: at most the gate's one-time first frame per camera
        actions_arr = np.stack(actions)
        assert actions_arr.shape[1] == 7 and np.all(np.abs(actions_arr) <= 1.0)
        with pytest.raises(ValueError, match="scripts"):
            other = next(name for name in EXPERTS if name != task_name)
            expert_for(other).reset(env, np.random.default_rng(0))


def test_expert_episodes_are_deterministic_per_rng(libero_installed: None) -> None:
    name = "KITCHEN_SCENE3_turn_on_the_stove"
    with LiberoEnv(LiberoEnvConfig(task=name, render_mode="none")) as env:
        runs = []
        for _ in range(2):
            actions: list[np.ndarray] = []
            run_expert(env, expert_for(name, ExpertConfig(jitter_m=0.01, action_noise=0.1)), 2,
                       np.random.default_rng(3), on_step=lambda a, info: actions.append(a))
            runs.append(np.stack(actions))
        np.testing.assert_array_equal(runs[0], runs[1])
        expert = expert_for(name, ExpertConfig(jitter_m=0.01, action_noise=0.1))
        env.reset(2)
        expert.reset(env, np.random.default_rng(4))  # another seed: another approach and other noise
        assert not np.array_equal(expert.act(), runs[0][0])


def test_render_state_reproduces_the_live_observation(libero_installed: None) -> None:
    """An unrendered episode's kept sim states render to what every_step mode returned there, up to timing.

    Not bit for bit: robosuite samples a step's observation at a physics sub-step inside the step (its
    sampling clock), while render_state renders the state at the step's end: a few millimetres of motion and
    some edge pixels, far less than between consecutive steps (checked, so the comparison can fail)."""
    name = "KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet"
    rng_actions = np.random.default_rng(0).uniform(-0.3, 0.3, size=(6, 7))
    with LiberoEnv(LiberoEnvConfig(task=name, render_mode="every_step", image_size=112)) as live:
        live.reset(3)
        live_obs = [live.step(a)[0] for a in rng_actions]
    with LiberoEnv(LiberoEnvConfig(task=name, render_mode="none", image_size=112)) as blind:
        obs = blind.reset(3)
        assert set(obs) == {LIBERO_STATE_KEY, "prompt"}
        states = []
        for a in rng_actions:
            blind.step(a)
            states.append(blind.get_sim_state())
        current = blind.get_sim_state()
        rendered = [blind.render_state(s) for s in states]
        np.testing.assert_array_equal(blind.get_sim_state(), current)  # render_state restores the physics
        with pytest.raises(ValueError, match="sim_state must be shaped"):
            blind.render_state(np.zeros(3))
    def gap(a: dict, b: dict) -> float:  # mean absolute wrist-image difference
        return float(np.abs(a[LIBERO_WRIST_IMAGE_KEY].astype(np.int16) - b[LIBERO_WRIST_IMAGE_KEY]).mean())

    for t, (got, want) in enumerate(zip(rendered, live_obs, strict=True)):
        np.testing.assert_allclose(got[LIBERO_STATE_KEY], want[LIBERO_STATE_KEY], atol=1e-2)
        if t >= 2:
            assert gap(got, want) < 0.5 * gap(got, live_obs[t - 2]), (t, gap(got, want), gap(got, live_obs[t - 2]))
