"""Where a run's time goes: the round split (acting, physics, rendering, transport, resets) and the per-stage
cumulative times a run logs; and `--no-cache-from-acting`, the separate encode the acting-pass cache replaced."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from faster_vla.libero.rollout import StageTimes


def _result(physics: float, rendering: float) -> SimpleNamespace:
    return SimpleNamespace(info={"timing_s": {"physics": physics, "rendering": rendering}})


def test_env_call_splits_along_the_slowest_worker():
    times = StageTimes()
    # Two workers in parallel: the call waited for the slower one (0.3 s of work); the rest was transport.
    times.add_env(0.5, [_result(0.1, 0.2), None, _result(0.05, 0.1)])
    assert times.physics == pytest.approx(0.1) and times.rendering == pytest.approx(0.2)
    assert times.transport == pytest.approx(0.2)
    assert times.physics_cpu == pytest.approx(0.15) and times.rendering_cpu == pytest.approx(0.3)
    # A call faster than its slowest worker's own clock (clocks of different processes) has no negative transport.
    times.add_env(0.1, [_result(0.1, 0.1)])
    assert times.transport == pytest.approx(0.2)


pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")

from faster_vla.runs.config import TRAIN_CONFIGS, TrainConfig  # noqa: E402
from faster_vla.runs.loop import train  # noqa: E402
from faster_vla.runs.run import Run  # noqa: E402


def _config(run_dir: Path, **overrides) -> TrainConfig:
    """The CLI's CPU config cut to one 10-step chunk per episode (one decision each), 2 episodes."""
    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    env = dataclasses.replace(base.env, max_steps=10, resolution=64)
    fields = dict(run_dir=run_dir, env=env, episodes=2, eval_every=0, eval_episodes=1, checkpoint_every=2,
                  progress=False)
    return dataclasses.replace(base, **{**fields, **overrides})


def test_run_logs_its_time_split_and_the_separate_encode_costs_one_prefix_per_decision(tmp_path):
    quiet = dict(log=lambda *_: None)
    shared = train(_config(tmp_path / "shared", num_envs=2), **quiet)["counters"]
    separate = train(_config(tmp_path / "separate", num_envs=2, cache_from_acting=False), **quiet)["counters"]

    records = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for stage in ("acting", "physics", "rendering", "transport", "reset", "cache", "update", "eval"):
        assert last[f"time_s/{stage}"] > 0, stage
    # Cumulative: never decreasing from one record to the next.
    assert all(b["time_s/acting"] >= a["time_s/acting"] for a, b in zip(records, records[1:]))
    # The workers' own env time, summed, is at least the critical path's.
    assert last["time_s/physics_cpu"] >= last["time_s/physics"]
    assert last["time_s/rendering_cpu"] >= last["time_s/rendering"]
    assert shared["time_s"]["checkpoint"] >= 0  # the last save's own time is not in the counters it saved

    # Each episode is one decision (one 10-step chunk): encoding its observation again after the episode costs
    # exactly one prefix more per episode (FLOPs are analytic).
    run = Run(_config(tmp_path / "shared", num_envs=2, resume=True), **quiet)
    assert separate["episodes"] == shared["episodes"] == 2
    assert separate["acting_flops"] == shared["acting_flops"]
    np.testing.assert_allclose(separate["cache_flops"] - shared["cache_flops"], 2 * run._prefix_flops, rtol=1e-12)

    # Both ways act alike and store the same cache (the same noises per row), up to float rounding: the cache's
    # batches of 2 (the acting pass) and of `cache_batch` (the separate encode) round matmuls differently.
    other = Run(_config(tmp_path / "separate", num_envs=2, resume=True), **quiet)
    assert run.restore() and other.restore()
    a, b = run.replay.all_windows(run.horizon, 0.99, run.stride), other.replay.all_windows(other.horizon, 0.99,
                                                                                          other.stride)
    np.testing.assert_allclose(a.actions, b.actions, rtol=1e-4, atol=1e-5)  # the same acting, in another process
    np.testing.assert_allclose(a.cache["denoised"], b.cache["denoised"], rtol=1e-4, atol=1e-5)
