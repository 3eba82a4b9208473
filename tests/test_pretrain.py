"""Demonstrations (faster_vla.pretraining.demos) and small-π0.5 pretraining (faster_vla.pretraining.pretrain).

The recorder test records one real LIBERO episode (needs the `libero` extra; skipped without it); the
pretraining tests train the tiny_a preset for a few steps on it, export, resume and act.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from faster_vla.libero import env as libero_env
from faster_vla.acting.flow_trainer import ActorFinetuneConfig
from faster_vla.acting.actor_source import ActorSource
from faster_vla.pretraining.demos import (
    FORMAT_VERSION,
    DemoFormatError,
    Episode,
    RecordConfig,
    iter_episodes,
    read_manifest,
    record_demos,
)
from faster_vla.libero.experts import expert_for, run_expert
from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig
from faster_vla.policies import checkpoint as ckpt_lib
from faster_vla.pretraining.pretrain import (CARD_FILE, CHECKPOINT_DIR, SNAPSHOT_DIR, DemoFrames, PretrainConfig, compute_norm_stats,
                                 pretrain)

STOVE = "KITCHEN_SCENE3_turn_on_the_stove"  # the shortest scripted task (~60 steps)


def _episode(length: int, value: float) -> Episode:
    return Episode(task="t", instruction="do it", image=np.zeros((length, 4, 4, 3), np.uint8),
                   wrist_image=np.zeros((length, 4, 4, 3), np.uint8), state=np.full((length, 8), value, np.float32),
                   actions=np.arange(length * 7, dtype=np.float32).reshape(length, 7) + value, init_state_index=0)


def test_chunks_repeat_the_last_action_past_an_episode_end() -> None:
    frames = DemoFrames([_episode(3, 0.0), _episode(2, 1000.0)], horizon=4)
    rows = frames.rows(np.array([0, 2, 3, 4]))
    first, second = frames.actions[:3], frames.actions[3:]
    np.testing.assert_array_equal(rows[0]["actions"], first[[0, 1, 2, 2]])
    np.testing.assert_array_equal(rows[1]["actions"], first[[2, 2, 2, 2]])
    np.testing.assert_array_equal(rows[2]["actions"], second[[0, 1, 1, 1]])  # never crosses into another episode
    np.testing.assert_array_equal(rows[3]["actions"], second[[1, 1, 1, 1]])
    assert [r["prompt"] for r in rows] == ["do it"] * 4
    with pytest.raises(ValueError, match="no episodes"):
        DemoFrames([], horizon=4)


def test_norm_stats_are_per_dimension_over_frames() -> None:
    episodes = [_episode(50, 0.0), _episode(50, 1.0)]
    stats = compute_norm_stats(episodes)
    states = np.concatenate([e.state for e in episodes])
    np.testing.assert_allclose(stats["state"].mean, states.mean(0))
    np.testing.assert_allclose(stats["state"].q99, np.quantile(states, 0.99, axis=0))
    assert stats["actions"].q01.shape == (7,)


def test_bad_demo_folders_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DemoFormatError, match="not a demonstration folder"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DemoFormatError, match="format 99"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="episodes must be positive"):
        RecordConfig(episodes=0)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        libero_env.check_libero_installed()
    except ImportError as exc:
        pytest.skip(f"LIBERO extra not usable here: {exc}")
    out = tmp_path_factory.mktemp("demos") / "stove"
    record_demos(RecordConfig(output=out, tasks=(STOVE,), episodes=1, image_size=112), log=lambda _: None)
    return out


def test_recorded_demonstrations(demos: Path) -> None:
    manifest = read_manifest(demos)
    assert manifest["format_version"] == FORMAT_VERSION
    (task,) = manifest["tasks"]
    assert task["name"] == STOVE and task["attempted"] == 1 and task["successes"] == 1
    assert not list(demos.parent.glob(".*partial"))  # the staging folder was renamed, nothing left behind
    (episode,) = list(iter_episodes(demos))
    steps = len(episode)
    assert steps == task["episodes"][0]["steps"]
    assert episode.image.shape == episode.wrist_image.shape == (steps, 112, 112, 3)
    assert episode.image.dtype == np.uint8 and episode.state.shape == (steps, 8)
    # The stored actions are the expert's, replayable: the same episode RNG gives the same actions.
    config = RecordConfig()
    with LiberoEnv(LiberoEnvConfig(task=STOVE, render_mode="none", seed=config.seed)) as env:
        actions: list[np.ndarray] = []
        summary = run_expert(env, expert_for(STOVE, config.expert), 0,
                             np.random.default_rng([config.seed, env.task.task_id, 0]),
                             on_step=lambda a, info: actions.append(a))
    assert summary["success"]
    np.testing.assert_allclose(np.stack(actions), episode.actions, atol=1e-6)
    with pytest.raises(FileExistsError, match="--force"):
        record_demos(RecordConfig(output=demos, tasks=(STOVE,), episodes=1), log=lambda _: None)
    with pytest.raises(DemoFormatError, match="no task"):
        next(iter_episodes(demos, tasks=["other"]))


def _tiny_config(demos: Path, run_dir: Path, steps: int, **kw) -> PretrainConfig:
    from faster_vla import checkpoints

    return PretrainConfig(
        demos=demos, run_dir=run_dir, preset="tiny_a", tokenizer=str(checkpoints.path("pi05_small/tokenizer.model")),
        steps=steps, save_every=2, log_every=1, wandb_mode="disabled",
        optimizer=ActorFinetuneConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=3, ema_decay=0.5,
                                      trainable="all", augment=True, batch_size=4), **kw)


def test_pretrain_exports_an_openpi_checkpoint_that_acts_and_resumes_exactly(demos: Path, tmp_path: Path) -> None:
    """4 steps in one go export a complete openpi checkpoint that acts; 2 steps then --resume to 4 give the
    same weights (trainer, its RNG and the batch sampler restored) and one metric record per step."""
    out = pretrain(_tiny_config(demos, tmp_path / "straight", steps=4, snapshots=True), log=lambda _: None)
    assert out == (tmp_path / "straight" / CHECKPOINT_DIR).absolute()
    # --snapshots: every saved step is a loadable checkpoint too; the last one is the export itself.
    snapshots = tmp_path / "straight" / SNAPSHOT_DIR
    assert sorted(p.name for p in snapshots.iterdir()) == ["step_2", "step_4"]
    assert json.loads((snapshots / "step_2" / CARD_FILE).read_text())["steps"] == 2
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.restore_params(snapshots / "step_4" / "params"),
                 ckpt_lib.restore_params(out / "params"))
    assert ckpt_lib.checkpoint_layout(out) == "release"
    card = json.loads((out / CARD_FILE).read_text())
    assert card["steps"] == 4 and card["episodes"] == 1 and card["tasks"][0]["name"] == STOVE
    # The exported folder is a complete openpi checkpoint: params, LIBERO norm stats, tokenizer.
    policy = ActorSource(preset="tiny_a", checkpoint=str(out), tokenizer=str(out / "tokenizer.model")).build()
    (episode,) = list(iter_episodes(demos))
    result = policy.infer({"observation/image": episode.image[0], "observation/wrist_image": episode.wrist_image[0],
                           "observation/state": episode.state[0], "prompt": episode.instruction})
    assert result["actions"].shape == (10, 7) and np.all(np.isfinite(result["actions"]))
    with pytest.raises(FileExistsError, match="exported checkpoint"):
        pretrain(_tiny_config(demos, tmp_path / "straight", steps=4), log=lambda _: None)

    pretrain(_tiny_config(demos, tmp_path / "split", steps=2), log=lambda _: None)
    resumed = pretrain(_tiny_config(demos, tmp_path / "split", steps=4, resume=True), log=lambda _: None)
    a = ckpt_lib.restore_params(out / "params")
    b = ckpt_lib.restore_params(resumed / "params")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), a, b)
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["train/flow_loss"]) for m in metrics)


def test_training_batches_use_the_acting_pipeline() -> None:
    """Policy.to_training_batch: the same Observation as acting, plus quantile-normalised, padded actions."""
    from faster_vla import checkpoints
    from faster_vla.policies.normalize import normalize_quantile

    policy = ActorSource(preset="tiny_a", tokenizer=str(checkpoints.path("pi05_small/tokenizer.model"))).build()
    frames = DemoFrames([_episode(12, 0.25)], horizon=10)
    rows = frames.rows(np.array([0, 5]))
    for row in rows:
        row["observation/image"] = np.full((16, 16, 3), 7, np.uint8)
        row["observation/wrist_image"] = np.full((16, 16, 3), 9, np.uint8)
    observation, actions = policy.to_training_batch(rows)
    acting = policy.to_observations([{k: v for k, v in row.items() if k != "actions"} for row in rows])
    jax.tree.map(np.testing.assert_array_equal, observation, acting)
    assert actions.shape == (2, 10, policy.actor.config.action_dim)
    stats = policy.input_transform.transforms[1].norm_stats["actions"]
    np.testing.assert_allclose(actions[1, :, :7], normalize_quantile(rows[1]["actions"], stats), rtol=1e-6)
    assert np.all(actions[..., 7:] == 0)
    with pytest.raises(ValueError, match="every row or none"):
        policy.to_training_batch([rows[0], {k: v for k, v in rows[1].items() if k != "actions"}])
