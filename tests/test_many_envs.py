"""Training over many envs (`--num-envs K`): episodes step in lockstep over env worker processes, yet a run's
episodes are those of one env (same init states and keys per episode index), and a checkpoint resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")

from faster_vla.runs.checkpoint import RunCheckpointer  # noqa: E402
from faster_vla.runs.config import TRAIN_CONFIGS, TrainConfig  # noqa: E402
from faster_vla.runs.loop import train  # noqa: E402
from faster_vla.runs.run import Run  # noqa: E402


def _config(run_dir: Path, **overrides) -> TrainConfig:
    """The CPU config cut to 10-step episodes at 64² renders: a run is mostly compilation."""
    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    env = dataclasses.replace(base.env, max_steps=10, resolution=64)
    fields = dict(run_dir=run_dir, env=env, episodes=4, eval_every=0, eval_episodes=1, checkpoint_every=2,
                  updates_per_episode=2, progress=False, wandb_mode="disabled")
    return dataclasses.replace(base, **{**fields, **overrides})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_envs_run_the_episodes_of_one_and_resume_exactly(tmp_path):
    quiet = dict(log=lambda *_: None)
    two = train(_config(tmp_path / "two", num_envs=2), **quiet)["counters"]
    one = train(_config(tmp_path / "one", num_envs=1), **quiet)["counters"]
    two_records, one_records = _records(tmp_path / "two"), _records(tmp_path / "one")
    # Episode i starts from the init state (seed, i) picks, whatever K.
    assert [r["train/init_state"] for r in two_records] == [r["train/init_state"] for r in one_records]
    assert [r["step"] for r in two_records] == [1, 2, 3, 4]
    assert two["episodes"] == one["episodes"] == 4 and two["updates"] == one["updates"] == 8
    assert two["cache_flops"] > 0 and two["acting_flops"] > 0

    # Resume from the checkpoint at episode 2 (rounds never straddle one): episodes 3-4 come out as they did.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert RunCheckpointer(resumed / "checkpoints").latest_episode == 2
    stored = json.loads((resumed / "config.json").read_text())
    assert stored["num_envs"] == 2
    stored["run_dir"] = str(resumed)  # the copy is its own run folder
    (resumed / "config.json").write_text(json.dumps(stored))
    again = train(_config(resumed, num_envs=2, resume=True), **quiet)["counters"]
    assert again["episodes"] == 4 and again["env_steps"] == two["env_steps"] and again["updates"] == two["updates"]
    redo = _records(resumed)
    assert [r["step"] for r in redo] == [1, 2, 3, 4]
    for before, after in zip(two_records[2:], redo[2:]):
        for key in ("train/init_state", "train/success", "train/episode_steps", "env_steps", "flops/cache"):
            assert after[key] == before[key], key
        # Same programs on the same inputs in a fresh process: equal up to XLA's thread scheduling of reductions.
        for key in ("update/critic_loss", "update/noise_critic_loss"):
            np.testing.assert_allclose(after[key], before[key], rtol=1e-5)

    # Replay after the resume holds what the uninterrupted run's did.
    a = Run(_config(tmp_path / "two", num_envs=2, resume=True), **quiet)
    b = Run(_config(resumed, num_envs=2, resume=True), **quiet)
    assert a.restore() and b.restore()
    assert a.replay.steps_added == b.replay.steps_added == two["env_steps"]
    wa, wb = a.replay.all_windows(a.horizon, 0.99, a.stride), b.replay.all_windows(b.horizon, 0.99, b.stride)
    np.testing.assert_array_equal(wa.actions, wb.actions)  # stored values, copied: bit for bit
    np.testing.assert_allclose(wa.cache["denoised"], wb.cache["denoised"], rtol=1e-5, atol=1e-6)


def test_num_envs_is_checked_before_anything_expensive(tmp_path):
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_envs must be an integer >= 1"):
            _config(tmp_path / "bad", num_envs=bad)
