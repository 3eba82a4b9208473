"""The two training options the README documents beyond the default run, end to end on a real LIBERO task:

- the filtering MDP (`--filter-steps 0 3 --filter-keep 4 1`): acting filters at several denoising steps, the
  acting pass caches every seed's x_t at the filter steps, the learner replays the filter from that cache with
  a time-conditioned Q^dn, and evaluation, checkpoints and --resume carry it;
- the critics' own image encoder (`--critics.encoder resnet`, with a tiny ResNet): replay stores the two
  cameras as uint8, updates read them, and checkpoints and --resume carry them.

Each run is the CLI's CPU config cut to two 10-step episodes at 64² renders (test_finetune's `_config`) with
fewer, smaller updates: a run is mostly compilation. A resume restarts from the checkpoint of episode 1 as if
the process had died before saving episode 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tyro

from faster_vla.launch.train import TrainArgs
from faster_vla.policies.config import get_preset
from faster_vla.rl.selection import SelectionConfig
from faster_vla.runs.config import TRAIN_CONFIGS, CriticConfig, TrainConfig, learner_config

# Fewer, smaller updates than the CPU config (10 × UTD 10 × 32): these tests check the path, not learning.
SMALL = dict(updates_per_episode=2, utd=2, batch_size=8, wandb_mode="disabled")
QUIET = dict(log=lambda *_: None)
GAMMA = 0.99


def _run_config(run_dir: Path, **overrides) -> TrainConfig:
    pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")
    from tests.test_finetune import _config

    return _config(run_dir, **{**SMALL, **overrides})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_trained(config: TrainConfig, result: dict) -> list[dict]:
    """Two episodes ran, each followed by its updates with finite losses, and the run ended on an evaluation."""
    counters = result["counters"]
    assert counters["episodes"] == 2 and counters["env_steps"] == 20
    assert counters["updates"] == 2 * config.updates_per_episode and counters["update_flops"] > 0
    records = _records(config.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        losses = {k: v for k, v in record.items() if k.startswith("update/")}
        assert {"update/critic_loss", "update/noise_critic_loss", "update/edit_loss"} <= losses.keys()
        assert all(math.isfinite(v) for v in losses.values()), losses
    assert 0.0 <= records[-1]["eval/success_rate"] <= 1.0
    return records


def _resume_from_episode_1(config: TrainConfig) -> dict:
    """Drops the checkpoint of episode 2 (as if killed before writing it) and resumes: episode 2 runs again."""
    from faster_vla.runs.checkpoint import RunCheckpointer
    from faster_vla.runs.loop import train

    shutil.rmtree(config.run_dir / "checkpoints" / "2")
    assert RunCheckpointer(config.run_dir / "checkpoints").latest_episode == 1
    result = train(dataclasses.replace(config, resume=True), **QUIET)
    counters = result["counters"]
    assert counters["episodes"] == 2 and counters["env_steps"] == 20
    assert counters["updates"] == 2 * config.updates_per_episode
    assert [r["step"] for r in _records(config.run_dir)] == [1, 2]  # episode 2 logged once
    return result


def _restored(config: TrainConfig):
    from faster_vla.runs.run import Run

    run = Run(dataclasses.replace(config, resume=True), **QUIET)
    assert run.restore()
    return run


def _evaluate_checkpoint(config: TrainConfig, output: Path) -> dict:
    """`faster-vla eval --run-dir` on the run's checkpoint: its learner, rule and denoising steps."""
    from faster_vla.runs.evaluate import EvalConfig, evaluate

    report = evaluate(EvalConfig(run_dir=config.run_dir, suite=config.env.suite, tasks=(str(config.env.task),),
                                 trials=1, max_steps=10, output=output), **QUIET)
    assert report["tasks"][str(config.env.task)]["trials"] == 1
    return report


def test_filtering_mdp_acts_stores_updates_evaluates_and_resumes(tmp_path):
    from faster_vla.rl.filtering import FilterSchedule
    from faster_vla.runs.loop import train

    # 6 Euler steps: filter the 8 seeds at the noise down to 4, denoise those to step 3, keep 1. Not the default
    # 10 steps, so evaluation from the checkpoint must use the run's own.
    config = _run_config(tmp_path / "run", num_steps=6, filter_steps=(0, 3), filter_keep=(4, 1))
    records = _check_trained(config, train(config, **QUIET))
    # --resume from episode 1 re-runs episode 2 with the filter, updates the restored learner, saves again.
    _resume_from_episode_1(config)

    run = _restored(config)
    schedule = run.learner.config.filter_schedule
    assert schedule == FilterSchedule(8, 6, ((0, 4), (3, 1)))
    assert run.learner.config.noise_critic.time_conditioned
    assert int(run.learner.step) == run.counters.updates == 2 * config.updates_per_episode
    # Acting ran the filter: each decision's FLOPs are the schedule's (4·3 + 1·3 candidate-steps of the actor
    # instead of the initial-seed filter's 6), and the run's acting FLOPs are those decisions'.
    flops = run.agent.decision_flops(run.learner)
    units = run.agent.unit_flops(run.learner)
    assert flops.denoise == schedule.candidate_steps * units.denoise_step == 15 * units.denoise_step
    decisions = sum(math.ceil(r["train/episode_steps"] / run.horizon) for r in records)
    assert records[-1]["flops/acting"] == pytest.approx(decisions * flops.total, rel=1e-9)

    # Replay holds every seed's x_t at the filter step (3) for each observed row, from the acting pass, and
    # kept it through two saves and loads (checkpoint 1, the resume's checkpoint 2).
    assert run.replay.episodes_added == 2 and "x_t" in run.replay.field_names[1]
    windows = run.replay.all_windows(run.horizon, GAMMA, run.stride)
    x_t, noise, denoised = (windows.cache[k] for k in ("x_t", "noise", "denoised"))
    assert x_t.shape == (windows.size, 8, 1, *noise.shape[2:]) and x_t.dtype == np.float32
    assert np.all(np.isfinite(x_t)) and np.all(np.abs(x_t).sum(axis=(1, 2, 3, 4)) > 0)
    # Halfway along its Euler path, x_t is neither the noise nor the chunk it becomes.
    assert np.abs(x_t[:, :, 0] - noise).mean() > 1e-3 and np.abs(x_t[:, :, 0] - denoised).mean() > 1e-3
    # The learner's filter update reads those x_t (and fails without them), as the run's updates did.
    from faster_vla.rl.batches import to_learner_batch

    sample = run.replay.sample_windows(np.random.default_rng(0), config.utd * config.batch_size, run.horizon, GAMMA,
                                       run.stride)
    batch = to_learner_batch(sample, config.utd)
    for part in ("cache", "next_cache"):
        batch[part] = {k: v for k, v in batch[part].items() if k != "x_t"}
    with pytest.raises(ValueError, match="x_t"):
        run.learner.update(batch)
    info = run.update()
    assert np.isfinite(info["noise_critic_loss"]) and int(run.learner.step) == run.counters.updates

    _evaluate_checkpoint(config, tmp_path / "eval.json")


def test_image_encoder_stores_uint8_images_updates_and_resumes(tmp_path):
    from faster_vla.rl.batches import to_learner_batch
    from faster_vla.runs.checkpoint import RunCheckpointer
    from faster_vla.runs.loop import train

    critics = dataclasses.replace(TRAIN_CONFIGS["cpu_small_faster_expo"][1].critics, encoder="resnet",
                                  resnet_stage_sizes=(1, 1), resnet_filters=8)
    config = _run_config(tmp_path / "run", critics=critics)
    _check_trained(config, train(config, **QUIET))
    _resume_from_episode_1(config)

    run = _restored(config)
    encoder = run.learner.config.chunk_critic.encoder
    assert encoder.kind == "image" and encoder.resnet_stage_sizes == (1, 1) and encoder.resnet_filters == 8
    assert run.learner.config.noise_critic.encoder == encoder == run.learner.config.edit_policy.encoder
    size = get_preset(config.actor.preset).siglip.image_size  # the model's input size, not the 64² render
    assert encoder.image_size == size
    # The critics' parameters are the small ResNet's: 2 stages, 8 then 16 channels.
    resnet = run.learner.chunk_critic.params["params"]["encoder"]["resnet"]
    assert sorted(resnet) == ["stage0_block0", "stage1_block0", "stem_conv", "stem_norm"]
    assert resnet["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 16, 16)

    # Replay stores the state and both cameras (uint8 at the model's size) as observation fields.
    obs_fields, cache_fields = run.replay.field_names
    assert set(obs_fields) == {"state", "images"} and "features" in cache_fields
    assert run.replay.episodes_added == 2
    windows = run.replay.all_windows(run.horizon, GAMMA, run.stride)
    images = windows.observations["images"]
    assert images.dtype == np.uint8 and images.shape == (windows.size, 2, size, size, 3)
    for camera in range(2):  # rendered scenes, not blank rows: every observed row has contrast
        frames = images[:, camera].reshape(windows.size, -1).astype(np.int16)
        assert np.all(frames.max(axis=1) - frames.min(axis=1) > 50)
    assert np.abs(images[:, 0].astype(np.int16) - images[:, 1]).mean() > 5  # two different cameras
    # Episode 1's rows went through save and load twice (checkpoint 1, then the resume's checkpoint 2).
    first = RunCheckpointer(config.run_dir / "checkpoints").restore(1, run.learner).replay
    first_windows = first.all_windows(run.horizon, GAMMA, run.stride)
    mine = windows.episode == first_windows.episode[0]
    assert 0 < mine.sum() < windows.size
    np.testing.assert_array_equal(images[mine], first_windows.observations["images"])
    np.testing.assert_array_equal(windows.observations["state"][mine], first_windows.observations["state"])

    # The learner batch passes them on (no features: the image encoder reads none), and updates read them.
    batch = to_learner_batch(run.replay.sample_windows(np.random.default_rng(0), 4, run.horizon, GAMMA, run.stride),
                             2, features=False)
    assert set(batch["inputs"]) == {"state", "images"} and batch["inputs"]["images"].dtype == np.uint8
    assert batch["inputs"]["images"].shape == (2, 2, 2, size, size, 3)
    info = run.update()
    assert np.isfinite(info["critic_loss"]) and int(run.learner.step) == run.counters.updates


def test_option_flags_reach_the_learner_and_bad_values_fail_first(tmp_path):
    args = tyro.cli(TrainArgs, args=["cpu_small_faster_expo", "--filter-steps", "0", "5", "--filter-keep", "4", "1",
                                     "--critics.encoder", "resnet", "--critics.resnet-stage-sizes", "1", "1",
                                     "--critics.resnet-filters", "8"])
    config = args.config
    assert config.filter_steps == (0, 5) and config.filter_keep == (4, 1)
    lconfig = learner_config(config, get_preset(config.actor.preset))
    assert lconfig.filter_schedule.stages == ((0, 4), (5, 1)) and lconfig.noise_critic.time_conditioned
    encoder = lconfig.chunk_critic.encoder
    assert (encoder.kind, encoder.resnet_stage_sizes, encoder.resnet_filters) == ("image", (1, 1), 8)
    # Defaults: no filter schedule, the backbone features; the ResNet (when chosen) is EXPO's ResNet-34.
    default = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    plain = learner_config(default, get_preset(default.actor.preset))
    assert plain.filter_schedule is None and not plain.noise_critic.time_conditioned
    assert plain.chunk_critic.encoder.kind == "backbone"
    assert CriticConfig().resnet_stage_sizes == (3, 4, 6, 3) and CriticConfig().resnet_filters == 64

    # Bad values raise when the config is built (the CLI builds it first), naming the field.
    bad_filters = [
        (dict(filter_steps=(0, 5), filter_keep=(4,)), r"filter_steps \[0, 5\] and filter_keep \[4\]"),
        (dict(filter_steps=(0, 5), filter_keep=(4, 1), selection=SelectionConfig("best_of_n", 8, 0.0)),
         "filter_steps.*best_of_n"),
        (dict(filter_steps=(0, 5), filter_keep=(1, 1)), "filter_keep.*strictly decreasing"),
        (dict(filter_steps=(5, 2), filter_keep=(4, 1)), "filter_steps.*strictly increasing"),
        (dict(filter_steps=(0, 10), filter_keep=(4, 1)), "filter_steps.*out of range"),
        (dict(filter_steps=(0, 5), filter_keep=(9, 1)), "filter_keep.*num_candidates"),
        (dict(filter_steps=(0, 5), filter_keep=(4, 2)), "filter_keep.*exactly 1"),
    ]
    for overrides, match in bad_filters:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(default, run_dir=tmp_path / "never", **overrides)
    for overrides, match in [(dict(encoder="vit"), "critics.encoder"),
                             (dict(resnet_stage_sizes=()), "critics.resnet_stage_sizes"),
                             (dict(resnet_stage_sizes=(2, 0)), "critics.resnet_stage_sizes"),
                             (dict(resnet_filters=0), "critics.resnet_filters")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(default.critics, **overrides)
    assert not (tmp_path / "never").exists()  # nothing was created


def test_authors_forms_act_store_update_and_resume(tmp_path):
    """The pi05_libero presets' forms on the CPU config: every-step windows, K = 16 cached seeds per row of which
    each critic step draws 8, the split TD backup and α in edit space. Replay holds K seeds at every step's row,
    the cache FLOPs count K denoisings, and a resume from episode 1 ends where the uninterrupted run did."""
    from faster_vla.policies.flops import denoise_flops
    from faster_vla.runs.loop import train

    env = dataclasses.replace(TRAIN_CONFIGS["cpu_small_faster_expo"][1].env, max_steps=10, resolution=64,
                              render_mode="every_step")
    config = _run_config(tmp_path / "run", env=env, cache_seeds=16, td_backup="split", alpha_entropy="edit",
                         window_starts="step")
    records = _check_trained(config, train(config, **QUIET))
    run = _restored(config)
    assert run.stride == 1 and run.cache_spec.num_seeds == 16
    assert (run.learner.config.td_backup, run.learner.config.alpha_entropy) == ("split", "edit")
    windows = run.replay.all_windows(run.horizon, GAMMA, run.stride)
    assert windows.cache["noise"].shape[1] == 16 and windows.cache["denoised"].shape[1] == 16
    # Every step of the two 10-step episodes is a stored row (11 with the final observation), each caching
    # K = 16 denoisings; the 10 rows per episode no decision was made at also cost a prefix. (With chunk windows
    # only rows 0 and 10 would be stored.)
    per_seed = config.num_steps * denoise_flops(run.policy.actor.config, num_candidates=1, num_steps=1)
    assert records[-1]["flops/cache"] == pytest.approx(2 * (11 * 16 * per_seed + 10 * run._prefix_flops), rel=1e-9)
    end = _leaves(run.learner)
    _check_every_step_run_evaluates_in_chunk_boundary_envs(run)

    _resume_from_episode_1(config)
    resumed = _restored(config)
    for a, b in zip(end, _leaves(resumed.learner), strict=True):
        np.testing.assert_array_equal(a, b)


def _check_every_step_run_evaluates_in_chunk_boundary_envs(run) -> None:
    """Greedy evaluation reads chunk ends only: an every_step run evaluates in a chunk_boundary env of its own,
    leaving its training env unrendered, with the same episodes the training env gives."""
    import jax

    from faster_vla.libero.env import LiberoEnv
    from faster_vla.libero.rollout import init_state_keys, run_episodes
    from faster_vla.runs.run import EVAL_KEY_OFFSET

    with LiberoEnv(run.config.env) as train_env:
        run.evaluate(train_env)
        assert train_env.num_camera_renders == 0
        assert run._eval_envs.config == dataclasses.replace(run.config.env, render_mode="chunk_boundary")
        episodes = init_state_keys(range(run.config.eval_episodes), jax.random.key(run.config.seed + EVAL_KEY_OFFSET))
        in_train_env = run_episodes(run.agent, run.learner, run.eval_selection, train_env, episodes)
    assert run.last_eval == [t.summary() for t in in_train_env]
    run.close()
    assert run._eval_envs is None


def _leaves(learner) -> list[np.ndarray]:
    import jax

    def host(x):
        if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [host(x) for x in jax.tree.leaves(learner)]
