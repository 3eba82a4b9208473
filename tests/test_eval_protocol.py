"""Evaluation protocols (`faster-vla eval --protocol`, `select-tasks --eval.protocol`, `train --eval-protocol`):
the `openpi` protocol drives a real libero_90 env exactly as openpi's LIBERO client does.

The reference is openpi's client loop (openpi examples/libero/main.py), written out below from reading it: a
raw `OffScreenRenderEnv` at 256², `np.random.seed(7)` then `env.seed(7)`, per episode `env.reset()` (a hard
reset) and `set_init_state(init_states[episode_idx])`, 10 no-op wait steps, then at every step the flipped
images resized with pad to 224 by openpi_client's PIL resize, a new chunk whenever the action plan is
empty (its first `replan_steps` actions queued), and a stop on `done`. A scripted policy (a fixed function of
the observation: its state and both images) stands in for the server, so any difference in what the env
renders, resets or steps shows up as different chunks and then different states.

Costs on a 2-core CPU: the env test creates two envs of task 20 and runs three episodes in each (a hard
reset, then 22 steps rendered at 256²), ~50 s of CPU; the run test (a built-in-model run of one 10-step
training episode and one openpi evaluation cut to 5 steps) ~30 s of CPU, mostly compilation.
"""

from __future__ import annotations

import collections
import json
import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from faster_vla.acting.agent import Decision
from faster_vla.libero.config import PROTOCOLS, EvalProtocol, LiberoEnvConfig, get_protocol
from faster_vla.rl.flops import DecisionFlops
from faster_vla.runs.config import TrainConfig
from faster_vla.runs.evaluate import EvalConfig

TASK = 20  # libero_90 "turn on the stove", the built-in model's task
INIT_STATES = (0, 1, 2)
MAX_STEPS = 12  # 5 + 5 + 2: two whole plans and one cut by the end of the episode
WAIT = 10
DUMMY_ACTION = [0.0] * 6 + [-1.0]


# -- configuration (no simulator) ------------------------------------------------------------------------------


def test_protocols_and_their_envs() -> None:
    chunk, openpi = get_protocol("chunk"), get_protocol("openpi")
    assert chunk.replan_steps is None and openpi.replan_steps == 5
    train_env = LiberoEnvConfig(task=TASK, max_steps=200, image_size=112, num_wait_steps=3, resolution=128)
    env = openpi.env_config(train_env, model_image_size=112)
    assert (env.task, env.resolution, env.image_size, env.image_resize, env.render_mode) == \
        (TASK, 256, 224, "pil", "every_step")
    assert (env.num_wait_steps, env.max_steps, env.episode_max_steps(), env.hard_reset, env.reset_seeding) == \
        (10, None, 400, True, "stream")
    env = chunk.env_config(train_env, model_image_size=112)
    assert env == dataclasses.replace(train_env, image_size=112)  # as configured, at the model's input size
    chunk_of_10 = np.arange(10 * 7).reshape(10, 7)
    assert chunk.executed(chunk_of_10) is chunk_of_10
    np.testing.assert_array_equal(openpi.executed(chunk_of_10), chunk_of_10[:5])
    with pytest.raises(ValueError, match="replans every 5 steps, but the policy's chunks hold only 4 actions"):
        openpi.executed(chunk_of_10[:4])
    assert openpi.record()["name"] == "openpi" and openpi.record()["replan_steps"] == 5
    with pytest.raises(ValueError, match=r"unknown evaluation protocol 'paper'; choose one of \['chunk', 'openpi'\]"):
        get_protocol("paper")
    with pytest.raises(ValueError, match="protocol must be one of"):
        EvalProtocol("paper")


def test_bad_combinations_fail_with_the_fix() -> None:
    with pytest.raises(ValueError, match="--protocol openpi renders every_step, as openpi's client does; drop "
                                         "--render-mode chunk_boundary"):
        EvalConfig(protocol="openpi", render_mode="chunk_boundary")
    with pytest.raises(ValueError, match=r"runs the suite's max steps, as openpi's client does \(libero_90: 400\); "
                                         "drop --max-steps 200, or use --protocol chunk"):
        EvalConfig(protocol="openpi", max_steps=200)
    EvalConfig(protocol="openpi", max_steps=400, render_mode="every_step")  # openpi's own values are fine
    EvalConfig(protocol="chunk", max_steps=200, render_mode="chunk_boundary")
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        EvalConfig(protocol="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        TrainConfig(eval_protocol="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_resize must be one of"):
        LiberoEnvConfig(image_resize="cv2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reset_seeding must be one of"):
        LiberoEnvConfig(reset_seeding="global")  # type: ignore[arg-type]


def test_cli_flags(tmp_path: Path) -> None:
    import tyro

    from faster_vla.runs.config import get_config
    from faster_vla.runs.evaluate import SelectTasksConfig

    config = tyro.cli(EvalConfig, args=["--protocol", "openpi", "--tasks", "20"])
    assert config.protocol == "openpi" and config.render_mode is None
    config = tyro.cli(SelectTasksConfig, args=["--eval.protocol", "openpi"])
    assert config.eval.protocol == "openpi"
    config = tyro.cli(TrainConfig, args=["--eval-protocol", "openpi"], default=get_config("cpu_small_faster_expo"))
    assert config.eval_protocol == "openpi"


# -- a real libero_90 env against openpi's client loop ----------------------------------------------------------


def scripted_chunk(state: np.ndarray, image: np.ndarray, wrist: np.ndarray) -> np.ndarray:
    """[10, 7]: a deterministic chunk that moves the arm and depends on every input bit that matters."""
    c = float(np.float32(np.sum(np.asarray(state, np.float32))))  # openpi's client sends float64; we send float32
    c += 1e-3 * float(image.astype(np.int64).sum() % 9973) + 1e-3 * float(wrist.astype(np.int64).sum() % 9973)
    k = np.arange(10)[:, None]
    chunk = 0.5 * np.sin(c * 7.0 + k * 0.7 + np.arange(7)[None, :])
    chunk[:, 6] = np.where(np.sin(c + k[:, 0]) > 0, 1.0, -1.0)
    return chunk


def _quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """openpi main.py's copy of robosuite's quat2axisangle."""
    quat = quat.copy()
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def openpi_client_episodes(bddl_file: Path, init_states: np.ndarray, replan_steps: int = 5) -> list[dict[str, list]]:
    """openpi's examples/libero/main.py loop for one task, with `scripted_chunk` as the server: per episode the
    actions sent to env.step, the sim state after each, and the images of each decision."""
    from libero.libero.envs import OffScreenRenderEnv
    from openpi_client import image_tools

    np.random.seed(7)
    env = OffScreenRenderEnv(bddl_file_name=str(bddl_file), camera_heights=256, camera_widths=256)
    env.seed(7)
    episodes = []
    try:
        for episode_idx in INIT_STATES:
            env.reset()
            action_plan: collections.deque = collections.deque()
            obs = env.set_init_state(init_states[episode_idx])
            record: dict[str, list] = {"actions": [], "states": [], "images": []}
            t = 0
            while t < MAX_STEPS + WAIT:
                if t < WAIT:
                    obs, reward, done, info = env.step(DUMMY_ACTION)
                    record["actions"].append(np.asarray(DUMMY_ACTION))
                    record["states"].append(np.asarray(env.get_sim_state()).copy())
                    t += 1
                    continue
                img = np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])
                wrist_img = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
                img = image_tools.convert_to_uint8(image_tools.resize_with_pad(img, 224, 224))
                wrist_img = image_tools.convert_to_uint8(image_tools.resize_with_pad(wrist_img, 224, 224))
                if not action_plan:
                    state = np.concatenate((obs["robot0_eef_pos"], _quat2axisangle(obs["robot0_eef_quat"]),
                                            obs["robot0_gripper_qpos"]))
                    record["images"].append((img, wrist_img))
                    action_chunk = scripted_chunk(state, img, wrist_img)
                    assert len(action_chunk) >= replan_steps
                    action_plan.extend(action_chunk[:replan_steps])
                action = action_plan.popleft()
                obs, reward, done, info = env.step(action.tolist())
                record["actions"].append(np.asarray(action))
                record["states"].append(np.asarray(env.get_sim_state()).copy())
                if done:
                    break
                t += 1
            episodes.append(record)
    finally:
        env.close()
    return episodes


class ScriptedAgent:
    """`Agent.act_batch`'s interface over `scripted_chunk` (no model): what the episode loop calls."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def act_batch(self, learner: Any, observations: list[dict[str, Any]], **kwargs: Any) -> list[Decision]:
        decisions = []
        for obs in observations:
            self.seen.append(obs)
            chunk = scripted_chunk(obs["observation/state"], obs["observation/image"], obs["observation/wrist_image"])
            decisions.append(Decision(actions=chunk, normalized=chunk, seed_index=0, edited=False, noise_scores=None,
                                      timing_ms={}, flops=DecisionFlops(0, 0, 0, 0, 0)))
        return decisions


def test_openpi_protocol_steps_the_env_as_openpis_client(libero_installed: None) -> None:
    pytest.importorskip("openpi_client", reason="openpi's client is the reference: pip install --no-deps "
                                                "openpi-client==0.1.2")
    from faster_vla.libero.env import LiberoEnv, _suite
    from faster_vla.libero.rollout import init_state_keys, run_episodes
    from faster_vla.rl.selection import SelectionConfig

    protocol = PROTOCOLS["openpi"]
    # The protocol's env for the built-in model (112² inputs), cut to MAX_STEPS to keep the test short.
    config = dataclasses.replace(protocol.env_config(LiberoEnvConfig(suite="libero_90", task=TASK), 112),
                                 max_steps=MAX_STEPS)
    with LiberoEnv(config) as env:
        sent: list[tuple[np.ndarray, np.ndarray]] = []
        raw_step = env._env.step  # every env.step of our env (wait steps included), and the state after it

        def recording_step(action: Any) -> Any:
            out = raw_step(action)
            sent.append((np.asarray(action, np.float64).copy(), env.get_sim_state()))
            return out

        env._env.step = recording_step
        agent = ScriptedAgent()
        rng_before = np.random.get_state()
        trajectories = run_episodes(agent, None, SelectionConfig("base", 1), env,  # type: ignore[arg-type]
                                    init_state_keys(INIT_STATES, jax.random.key(0)), protocol=protocol)
        assert np.array_equal(np.random.get_state()[1], rng_before[1])  # the caller's RNG is left as it was
        task = env.task
        init_states = np.asarray(_suite("libero_90").get_task_init_states(task.task_id))
    reference = openpi_client_episodes(task.bddl_file, init_states)

    assert [t.init_state for t in trajectories] == list(INIT_STATES)
    start = 0
    for i, (trajectory, expected) in enumerate(zip(trajectories, reference)):
        steps = len(expected["actions"])
        assert steps == WAIT + trajectory.steps, f"episode {i}: {steps} env steps in openpi's loop"
        mine = sent[start:start + steps]
        start += steps
        for s, ((action, state), want_action, want_state) in enumerate(zip(mine, expected["actions"],
                                                                           expected["states"])):
            np.testing.assert_array_equal(action, want_action, err_msg=f"episode {i}, env step {s}: action")
            np.testing.assert_array_equal(state, want_state, err_msg=f"episode {i}, env step {s}: sim state")
    assert start == len(sent)
    # Replanning every 5 steps: decisions at policy steps 0, 5 and 10 of each 12-step episode.
    assert len(agent.seen) == sum(len(e["images"]) for e in reference) == 3 * len(INIT_STATES)
    for obs, (image, wrist) in zip(agent.seen, [im for e in reference for im in e["images"]]):
        np.testing.assert_array_equal(obs["observation/image"], image)  # openpi_client's PIL resize, bit for bit
        np.testing.assert_array_equal(obs["observation/wrist_image"], wrist)
    assert all(t.steps == MAX_STEPS and not t.success for t in trajectories)


def test_training_run_evaluates_under_the_openpi_protocol(libero_installed: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """train --eval-protocol openpi: the evaluation runs in openpi's env (cut here to 5 steps), apart from the
    training env, and its metrics record says which protocol scored it."""
    from faster_vla.runs import run as run_module
    from faster_vla.runs.config import TRAIN_CONFIGS
    from faster_vla.runs.logger import read_metrics
    from faster_vla.runs.loop import train

    opened: list[LiberoEnvConfig] = []
    open_envs = run_module.open_envs

    def short_open_envs(config: LiberoEnvConfig, num_workers: int, *args: Any, **kwargs: Any) -> Any:
        opened.append(config)
        return open_envs(dataclasses.replace(config, max_steps=5), num_workers, *args, **kwargs)

    monkeypatch.setattr(run_module, "open_envs", short_open_envs)
    base = TRAIN_CONFIGS["cpu_small_base"][1]
    config = dataclasses.replace(base, run_dir=tmp_path / "run", env=dataclasses.replace(base.env, max_steps=10,
                                 resolution=64), episodes=1, eval_every=1, eval_episodes=1, checkpoint_every=1,
                                 progress=False, wandb_mode="disabled", eval_protocol="openpi")
    train(config, log=lambda *_: None)
    assert opened == [dataclasses.replace(base.env, resolution=256, image_size=224, image_resize="pil",
                                          render_mode="every_step", max_steps=None, hard_reset=True,
                                          reset_seeding="stream")]
    (record,) = [r for r in read_metrics(config.run_dir / "metrics.jsonl") if "eval/success_rate" in r]
    assert record["eval/protocol"] == "openpi" and record["eval/success_rate"] in (0.0, 1.0)
    assert json.loads((config.run_dir / "config.json").read_text())["eval_protocol"] == "openpi"
