"""End to end on a real LIBERO task: a small π0.5 fine-tuning run writes metrics, plots and checkpoints,
survives kill -9, resumes with counters and replay intact, and its checkpoint can be evaluated."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")

from faster_vla.runs.evaluate import EvalConfig, evaluate  # noqa: E402
from faster_vla.runs.config import TrainConfig  # noqa: E402
from faster_vla.runs.loop import train
from faster_vla.runs.config import TRAIN_CONFIGS  # noqa: E402
from faster_vla.runs.checkpoint import RunCheckpointer  # noqa: E402
from faster_vla.shared.jsonable import from_jsonable  # noqa: E402

# The CLI's CPU config, cut to one 10-step chunk per episode so a CI run is mostly compilation; the env-step
# budget (20) ends it after 2 of its 3 episodes.
ARGS = ["--episodes", "3", "--env-step-budget", "20", "--env.max-steps", "10", "--env.resolution", "64",
        "--eval-every", "2", "--eval-episodes", "1", "--checkpoint-every", "1", "--no-progress", "--wandb-mode", "offline"]


def _config(run_dir: Path, **overrides) -> TrainConfig:
    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    env = dataclasses.replace(base.env, max_steps=10, resolution=64)
    fields = dict(run_dir=run_dir, env=env, episodes=3, env_step_budget=20, eval_every=2, eval_episodes=1,
                  checkpoint_every=1, progress=False)
    return dataclasses.replace(base, **{**fields, **overrides})


def base_updates() -> int:
    return TRAIN_CONFIGS["cpu_small_faster_expo"][1].updates_per_episode


def test_kill_9_then_resume_continues_the_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "faster_vla.launch.cli", "train", "cpu_small_faster_expo", "--run-dir", str(run_dir),
           *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = run_dir / "checkpoints" / "1" / "commit_success.txt"
    try:
        deadline = time.monotonic() + 600
        while not first.exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 600 s")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9, whatever it was doing
        proc.wait()
    checkpointer = RunCheckpointer(run_dir / "checkpoints")
    saved = checkpointer.latest_episode
    assert saved in (1, 2)

    # The CLI's resolved config round-trips through config.json, and is what this resume passes.
    stored = from_jsonable(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    assert stored == _config(run_dir)
    result = train(dataclasses.replace(stored, resume=True), log=lambda *_: None)
    counters = result["counters"]
    assert counters["episodes"] == 2 and counters["env_steps"] == 20
    assert counters["updates"] == 2 * base_updates() and counters["acting_flops"] > 0 and counters["update_flops"] > 0
    # The final evaluation (run by this process) comes back per episode: eval_episodes 1, init state 0.
    assert [e["init_state"] for e in result["eval_episodes"]] == [0]
    assert float(result["eval_episodes"][0]["success"]) == result["eval_success"]

    # The final checkpoint holds the whole run: replay rows of both episodes, counters matching them.
    from faster_vla.runs.run import Run

    run = Run(dataclasses.replace(_config(run_dir), resume=True), log=lambda *_: None)
    assert run.restore()
    assert run.counters.episodes == 2 and run.replay.episodes_added == 2 and run.replay.steps_added == 20
    assert int(run.learner.step) == run.counters.updates
    # One history: each episode logged once, in order, despite the kill.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # The moving success rate reads the episodes before it from the log, across the resume.
    outcomes = [r["train/success"] for r in records]
    assert [r["train/recent_success_rate"] for r in records] == pytest.approx([outcomes[0], sum(outcomes) / 2])
    assert "eval/success_rate" in records[-1]
    assert any(p.suffix == ".png" for p in (run_dir / "plots").iterdir())
    assert (run_dir / "wandb").is_dir()

    # The run's checkpoint evaluates with its own rule.
    report = evaluate(EvalConfig(run_dir=run_dir, tasks=("0",), trials=1, max_steps=10, output=tmp_path / "e.json"),
                      log=lambda *_: None)
    assert report["policy"].startswith(f"run {run_dir}") and "faster" in report["policy"]
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["0"]["trials"] == 1
    assert report["selection"]["rule"] == "faster" and report["selection"]["temperature"] == 0.0
    acting = report["tasks"]["0"]["acting"]
    assert acting["decisions"] == 1 and acting["flops"] == report["flops_per_decision"]  # one 10-step chunk
    assert acting["ms_per_decision"]["total"] > 0
    # Selection in isolation: the same checkpoint's critics, another rule and N (EXPO's best-of-2).
    other = evaluate(EvalConfig(run_dir=run_dir, tasks=("0",), trials=1, max_steps=10, rule="best_of_n",
                                num_candidates=2, output=tmp_path / "e2.json"), log=lambda *_: None)
    assert other["selection"]["rule"] == "best_of_n" and other["selection"]["num_candidates"] == 2
    assert "acting by best_of_n over N = 2" in other["policy"]
    by_part, faster_part = other["flops_per_decision_by_part"], report["flops_per_decision_by_part"]
    assert by_part["prefix"] == faster_part["prefix"]  # one prefix, shared by the candidates
    assert by_part["denoise"] == 2 * faster_part["denoise"] and by_part["noise_critic"] == 0
    # ... and so does its exported bundle, with the same rule.
    from faster_vla.launch.evaluate import bundle_acting
    from faster_vla.serving.bundle import export_bundle

    bundle = export_bundle(run_dir, tmp_path / "bundle")
    report = evaluate(EvalConfig(bundle=bundle, tasks=("0",), trials=1, max_steps=10, output=tmp_path / "b.json"),
                      log=lambda *_: None, make_acting=bundle_acting)
    assert report["policy"] == f"bundle {bundle} (faster)" and report["tasks"]["0"]["trials"] == 1
    with pytest.raises(ValueError, match="pass one"):
        EvalConfig(bundle=bundle, run_dir=run_dir)


class _Killed(BaseException):
    """Stands in for a SIGKILL: raised where the process would die, caught by nothing in the loop."""


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path, monkeypatch):
    # kill -9 in episode 2, after episode 1 was logged and before the first checkpoint (episode 2) was saved:
    # --resume used to refuse ("no checkpoint"), and a start without it too ("already holds a run"), so the
    # folder could only be deleted. It now starts the run again from episode 0 and logs one history.
    from faster_vla.runs.run import Run

    run_dir = tmp_path / "run"
    config = _config(run_dir, episodes=2, env_step_budget=None, checkpoint_every=2, eval_every=0)
    rollout = Run.rollout
    calls = []

    def dies_in_episode_2(self, *args, **kwargs):
        calls.append(self.counters.episodes)
        if self.counters.episodes == 1:
            raise _Killed
        return rollout(self, *args, **kwargs)

    monkeypatch.setattr(Run, "rollout", dies_in_episode_2)
    with pytest.raises(_Killed):
        train(config, log=lambda *_: None)
    monkeypatch.setattr(Run, "rollout", rollout)
    killed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in killed] == [1] and RunCheckpointer(run_dir / "checkpoints").latest_episode is None

    messages = []
    result = train(dataclasses.replace(config, resume=True), log=messages.append)
    assert any("starting it again from episode 0" in m for m in messages)
    assert result["counters"]["episodes"] == 2 and result["counters"]["updates"] == 2 * base_updates()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # Episode 1 ran again from the same start: init state, keys and learner, so the same outcome and losses.
    same = ("train/success", "train/init_state", "train/episode_steps", "env_steps", "updates", "flops")
    assert {k: records[0][k] for k in same} == {k: killed[0][k] for k in same}
    assert records[0]["update/critic_loss"] == pytest.approx(killed[0]["update/critic_loss"], rel=1e-6)


def test_bad_inputs_fail_before_anything_expensive(tmp_path):
    from faster_vla.rl.selection import SelectionConfig

    with pytest.raises(ValueError, match="suite"):
        train(_config(tmp_path / "a", env=dataclasses.replace(_config(tmp_path).env, suite="libero_x")))
    with pytest.raises(ValueError, match="task"):
        train(_config(tmp_path / "b", env=dataclasses.replace(_config(tmp_path).env, task="no such task")))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(_config(tmp_path / "c", actor=dataclasses.replace(_config(tmp_path).actor, checkpoint=str(tmp_path / "x"))))
    with pytest.raises(ValueError, match="render-mode every_step"):
        _config(tmp_path / "d", window_starts="step")
    with pytest.raises(ValueError, match="rule"):
        SelectionConfig("fastest")
    with pytest.raises(ValueError, match="--rule faster .* needs --run-dir or --bundle"):
        EvalConfig(rule="faster")
    with pytest.raises(ValueError, match="--num-candidates must be >= 1, got 0"):
        EvalConfig(run_dir=tmp_path, num_candidates=0)
    with pytest.raises(ValueError, match="--rule must be one of"):
        EvalConfig(run_dir=tmp_path, rule="fastest")
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(_config(tmp_path / "e", resume=True))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises((NotADirectoryError, FileExistsError, OSError), match="file"):
        train(_config(not_a_dir / "run"))
