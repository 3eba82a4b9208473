"""Evaluation over env worker processes (faster_vla.libero.rollout) on libero_90 task 0 with a tiny π0.5: lockstep
episodes over a pool match one env's, a dead worker fails fast with a clear error, and a bad worker count
fails before anything starts. Needs the `libero` extra; skipped without it.

Costs on a 2-core CPU: a pool of two workers starts in ~10 s; episodes are cut at 10 steps, rendered at 64².
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pytest

from faster_vla.acting.actor_source import ActorSource
from faster_vla.acting.agent import Agent, Decision
from faster_vla.libero.env_pool import EnvWorkerError
from faster_vla.runs.evaluate import EvalConfig, evaluate
from faster_vla.runs.config import TrainConfig
from faster_vla.launch.cli import main as cli_main
from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig, make_libero_pool
from faster_vla.libero.rollout import init_state_keys, open_envs, run_episodes
from tests.test_agent import CONFIG, _config, _learner, _stats

# Horizon 4: an episode is chunks of 4, 4 and 2 steps.
ENV = LiberoEnvConfig(suite="libero_90", task=0, max_steps=10, resolution=64)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def acting(libero_installed: None) -> tuple[Agent, Any, Any]:
    """A tiny π0.5 with random critics acting by the greedy `faster` rule (noise critic, edit and chunk critic)."""
    from faster_vla import checkpoints
    from faster_vla.policies import pi05
    from faster_vla.policies.policy import make_libero_policy
    from faster_vla.policies.tokenizer import PaligemmaTokenizer
    from tests.small_models import perturbed_params

    actor = pi05.Pi05Actor(CONFIG, perturbed_params(CONFIG, seed=1, scale=0.1))
    tokenizer = PaligemmaTokenizer(checkpoints.path("pi05_small/tokenizer.model"), max_len=CONFIG.max_token_len)
    policy = make_libero_policy(actor, tokenizer=tokenizer, norm_stats={"state": _stats(8, 0), "actions": _stats(7, 1)})
    config = _config("faster")
    return Agent(policy, config), _learner(config), config.selection


class Recorder:
    """Wraps an agent; keeps each decision's chunk by its key (one key per episode and decision)."""

    def __init__(self, agent: Agent, on_batch: Any = None) -> None:
        self.agent, self.on_batch = agent, on_batch
        self.chunks: dict[bytes, np.ndarray] = {}

    def act(self, learner: Any, obs: Mapping[str, Any], *, selection: Any, rng: jax.Array) -> Decision:
        decision = self.agent.act(learner, obs, selection=selection, rng=rng)
        self.chunks[np.asarray(jax.random.key_data(rng)).tobytes()] = decision.actions
        return decision

    def act_batch(self, learner: Any, observations: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[Decision]:
        if self.on_batch is not None:
            self.on_batch()
        decisions = self.agent.act_batch(learner, observations, **kwargs)
        for rng, decision in zip(kwargs["rngs"], decisions):
            self.chunks[np.asarray(jax.random.key_data(rng)).tobytes()] = decision.actions
        return decisions


def test_pool_matches_one_env(acting):
    """3 init states on 2 workers (the third episode runs alone in a padded batch) = the same episodes in one env."""
    agent, learner, selection = acting
    one_env = Recorder(agent)
    with LiberoEnv(ENV) as env:
        expected = run_episodes(one_env, learner, selection, env, init_state_keys([0, 1, 2], KEY))
    pooled = Recorder(agent)
    with make_libero_pool(ENV, 2) as pool:
        got = run_episodes(pooled, learner, selection, pool, init_state_keys([0, 1, 2], KEY))
    expected = [e.summary() for e in expected]  # random weights: truncated at 10 steps
    assert expected == [{"init_state": i, "success": False, "steps": 10} for i in range(3)]
    assert [e.summary() for e in got] == expected
    # The same chunk at every decision of every episode: its own noise, critic pairs and edit draw whichever
    # worker and batch mates it has (a wrong key would differ by O(1)). Not bit for bit: XLA rounds a batch of
    # 1 (matrix-vector products) differently from a batch of 2 (~1e-7), and the simulator carries that
    # into later observations, so later chunks drift slightly apart.
    assert len(one_env.chunks) == 9 and pooled.chunks.keys() == one_env.chunks.keys()
    first = {np.asarray(jax.random.key_data(jax.random.split(jax.random.fold_in(KEY, i))[1])).tobytes()
             for i in range(3)}
    for key, chunk in one_env.chunks.items():
        np.testing.assert_allclose(pooled.chunks[key], chunk, rtol=0, atol=1e-5 if key in first else 1e-2)


def test_evaluate_with_workers_reports_the_same_episodes(libero_installed, tmp_path):
    """`faster-vla eval --num-workers 2` writes the report one env writes (base policy, tiny_a)."""
    from faster_vla import checkpoints

    actor = ActorSource("tiny_a", tokenizer=str(checkpoints.path("pi05_small/tokenizer.model")))
    config = EvalConfig(actor=actor, tasks=("0",), trials=2, max_steps=10, output=tmp_path / "one.json")
    one = evaluate(config, log=lambda *_: None)
    two = evaluate(dataclasses.replace(config, num_workers=2, output=tmp_path / "two.json"), log=lambda *_: None)
    assert (one.pop("num_workers"), two.pop("num_workers")) == (1, 2)  # the report says how it ran
    for report in (one, two):  # acting wall times differ from run to run; decisions and FLOPs may not
        assert report["tasks"]["0"]["acting"].pop("ms_per_decision")["total"] > 0
    assert two == one
    assert [e["init_state"] for e in two["tasks"]["0"]["episodes"]] == [0, 1]


def test_dead_worker_fails_fast_and_clearly(acting):
    agent, learner, selection = acting

    def kill_worker_1() -> None:
        for proc in mp.active_children():
            if proc.name == "env-worker-1":
                os.kill(proc.pid, signal.SIGKILL)

    with make_libero_pool(ENV, 2) as pool:
        start = time.monotonic()
        with pytest.raises(EnvWorkerError, match=r"env worker 1 failed in step_chunk\(\): worker exited") as err:
            run_episodes(Recorder(agent, on_batch=kill_worker_1), learner, selection, pool, init_state_keys([0, 1], KEY))
        assert time.monotonic() - start < 60
        assert pool.closed and not any(pool.workers_alive())
    notes = "\n".join(err.value.__notes__)
    assert "was running init state 1" in notes and "~2 GB" in notes


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_worker_counts_fail_before_anything_starts(bad, tmp_path, capsys):
    for build in (lambda: EvalConfig(num_workers=bad), lambda: TrainConfig(eval_num_workers=bad),
                  lambda: open_envs(ENV, bad)):
        with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
            build()
    for argv in (["eval", "--num-workers", str(bad)], ["select-tasks", "--eval.num-workers", str(bad)]):
        start = time.monotonic()
        with pytest.raises(SystemExit) as exit_info:  # tyro reports the config's ValueError and exits
            cli_main([*argv, "--output" if argv[0] == "eval" else "--eval.output", str(tmp_path / "e.json")])
        assert exit_info.value.code == 2 and time.monotonic() - start < 5
        message = " ".join(capsys.readouterr().err.replace("│", " ").split())  # unwrap tyro's error box
        assert "num_workers must be an integer >= 1" in message
    assert not (tmp_path / "e.json").exists()
