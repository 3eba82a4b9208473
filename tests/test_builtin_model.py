"""The built-in small π0.5 (checkpoints/pi05_libero_small): it loads by default, acts on a real LIBERO
observation, and reproduces its stated base success on a handful of fixed init states."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from faster_vla import checkpoints
from faster_vla.acting.actor_source import RANDOM_WEIGHTS, ActorSource
from faster_vla.runs.evaluate import wilson_interval
from faster_vla.policies.checkpoint import checkpoint_layout, restore_params

SHIPPED = checkpoints.path("pi05_libero_small")
CARD = SHIPPED / "base_success.json"  # `faster-vla eval` of the shipped weights (see MODEL_CARD.md)
CI_TASK = "20"  # the stove: the fine-tuning task, and the cheapest (successes end in ~70-100 steps)
CI_TRIALS = 6  # init states 0..5


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_shipped_checkpoint_is_an_openpi_checkpoint_that_fits_in_git() -> None:
    assert checkpoint_layout(SHIPPED) == "release"
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 50 * 2**20, f"the shipped checkpoint is {size / 2**20:.1f} MiB; the budget is 50 MiB"
    card = json.loads(CARD.read_text())
    assert card["policy"] == "base policy pi05_libero_small"
    for task in card["tasks"].values():  # the fine-tuning tasks: imperfect, so RL has room, but not hopeless
        assert 0.0 < task["success_rate"] < 1.0 and task["ci95"][0] < task["success_rate"] < task["ci95"][1]
    source = ActorSource("pi05_libero_small")
    assert source.checkpoint_path == str(SHIPPED)  # the default for the preset
    assert ActorSource("pi05_libero_small", checkpoint=RANDOM_WEIGHTS).checkpoint_path is None
    params = restore_params(SHIPPED)
    assert sum(np.size(x) for x in jax.tree.leaves(params)) > 1e6


def test_shipped_model_acts_on_a_real_libero_observation_and_reproduces_its_base_success(tmp_path: Path) -> None:
    pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")
    from faster_vla.runs.evaluate import EvalConfig, evaluate
    from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig

    policy = ActorSource("pi05_libero_small").build()
    with LiberoEnv(LiberoEnvConfig(task=int(CI_TASK), image_size=112, max_steps=20)) as env:
        obs = env.reset(0)
    actions = policy.infer(obs)["actions"]
    assert actions.shape == (10, 7) and np.all(np.isfinite(actions))

    card = json.loads(CARD.read_text())
    stated = card["tasks"][CI_TASK]
    report = evaluate(EvalConfig(actor=ActorSource("pi05_libero_small"), tasks=(CI_TASK,), trials=CI_TRIALS,
                                 max_steps=card["max_steps"], seed=card["seed"], output=tmp_path / "eval.json"), log=lambda *_: None)
    got = report["tasks"][CI_TASK]
    lo, hi = wilson_interval(got["successes"], got["trials"])
    assert lo <= stated["success_rate"] <= hi, (
        f"{got['successes']}/{got['trials']} on init states 0..{CI_TRIALS - 1} is not consistent with the stated "
        f"{stated['success_rate']:.0%} (95 % interval of this sample: {lo:.0%}-{hi:.0%})")
