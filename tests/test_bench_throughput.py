"""The throughput benchmark's arithmetic: steady state from a run's cumulative records, and the projection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_throughput as bt  # noqa: E402


def _record(episodes: int, steps: int, wall: float, acting: float) -> dict:
    stages = {f"time_s/{s}": 0.0 for s in bt.STAGES} | {"time_s/acting": acting, "time_s/physics_cpu": 0.0,
                                                         "time_s/rendering_cpu": 0.0}
    return {"episodes": episodes, "env_steps": steps, "wall_s": wall, "train/success": 0.0, "flops": 6.0 * steps,
            "flops/acting": 1.0 * steps, "flops/cache": 2.0 * steps, "flops/update": 3.0 * steps, **stages}


def test_steady_state_skips_the_first_round():
    # K=2: the first round (episodes 1-2) compiles and is left out; episodes 3-4 took 30 s for 200 steps.
    records = [_record(1, 100, 50.0, 10.0), _record(2, 200, 50.0, 10.0), _record(3, 300, 65.0, 13.0),
               _record(4, 400, 80.0, 16.0)]
    out = bt.summarise(records, num_envs=2)
    assert out["steady_episodes"] == 2 and out["steady_env_steps"] == 200
    assert out["env_steps_per_s"] == pytest.approx(200 / 30) and out["episodes_per_h"] == pytest.approx(240)
    assert out["ms_per_env_step"]["acting"] == pytest.approx(30.0)  # 6 s over 200 steps
    assert out["ms_per_env_step"]["other"] == pytest.approx(120.0)  # the 24 s no stage claimed
    assert out["flops_per_env_step"]["total"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="more episodes than one round"):
        bt.summarise(records[:2], num_envs=2)


def test_projection_grows_with_envs_until_acting_dominates():
    part2 = {"per_decision_s": {"acting": 30.0, "physics": 0.2, "rendering": 0.8, "transport": 0.0}, "reset_s": 1.0,
             "flops": {"decision": 5e12, "cache_per_decision": 5e11, "final_row_cache": 5e12, "update": 1e12}}
    rows = bt.projection({"pi05_libero": part2}, bt.Target(gpu_flops_per_s=(1e14,)))
    one, many = rows
    assert (one["num_envs"], many["num_envs"]) == (1, 14)
    assert one["round_s"] == pytest.approx(5e12 / 1e14 + 1.0)  # acting + the env chunk (cache hidden under it)
    assert many["episodes_per_h"] > 5 * one["episodes_per_h"]
    assert many["acting_share"] > one["acting_share"]


def test_projection_takes_the_env_alone_over_the_contended_loop():
    # In the CPU loop the model's cache shares the cores (rendering 6 s per chunk); alone, the env takes 1 s.
    part2 = {"per_decision_s": {"acting": 30.0, "physics": 0.2, "rendering": 6.0, "transport": 0.0}, "reset_s": 3.0,
             "flops": {"decision": 5e12, "cache_per_decision": 5e11, "final_row_cache": 5e12, "update": 1e12},
             "env_alone": {"per_decision_s": {"physics": 0.2, "rendering": 0.8}, "reset_s": 1.0, "decisions": 3}}
    target = bt.Target(gpu_flops_per_s=(1e14,))
    one, _ = bt.projection({"pi05_libero": part2}, target)
    assert one["round_s"] == pytest.approx(5e12 / 1e14 + 1.0)
    decisions = target.episode_steps // target.chunk
    serial = (target.updates_per_episode * 1e12 + 5e12) / 1e14
    assert 3600 / one["episodes_per_h"] == pytest.approx(decisions * one["round_s"] + 1.0 + serial)  # reset alone
    contended, _ = bt.projection({"pi05_libero": {k: v for k, v in part2.items() if k != "env_alone"}}, target)
    assert contended["round_s"] == pytest.approx(5e12 / 1e14 + 6.2)  # older results: the loop's figures
