"""Run checkpoints: exact round trip, retention, clear refusals, and SIGKILL at any moment never corrupts."""

from __future__ import annotations

import dataclasses
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.rl.learner import Learner
from faster_vla.rl.replay import ReplayBuffer
from faster_vla.runs.checkpoint import RunCheckpointer, RunCheckpointError
from tests.toy_task import ToyRunConfig, ToyTaskConfig, toy_features, toy_learner_config

REPO = Path(__file__).resolve().parents[1]
TASK = ToyTaskConfig()
K = 2  # cached seeds per row
CAPACITY = 48  # rows: small enough that the replay evicts during the SIGKILL run


# -- a tiny run, shared by the in-process tests and the child process of the SIGKILL test -------------------


def _config(hidden: int = 8, **overrides):
    config = toy_learner_config(TASK, ToyRunConfig(hidden=hidden, members=2, utd=1, batch_size=4, num_candidates=K))
    return dataclasses.replace(config, **overrides)


def _example() -> dict:
    x = jnp.zeros((1, TASK.obs_dim))
    return {"features": toy_features(x), "state": x}


_CREATE = jax.jit(Learner.create, static_argnums=(0, 2))  # one jit object: same config, one compilation


def _create(config) -> Learner:
    return _CREATE(config, _example(), 0)


def _abstract(config) -> Learner:
    """A template without computing anything: shapes, dtypes and the static parts (apply fns, optimisers)."""
    return jax.eval_shape(lambda: Learner.create(config, _example(), 0))


def _add_episode(replay: ReplayBuffer, rng: np.random.Generator) -> tuple[int, bool]:
    t = int(rng.integers(3, 8))
    success = bool(rng.uniform() < 0.5)
    terminal = np.zeros(t, bool)
    terminal[-1] = success
    chunk = (t + 1, K, TASK.horizon, TASK.action_dim)
    replay.add_episode(
        {"obs": rng.uniform(-1, 1, (t + 1, TASK.obs_dim)).astype(np.float32)},
        rng.uniform(-1, 1, (t, TASK.action_dim)).astype(np.float32),
        rng.normal(size=t).astype(np.float32),
        terminal,
        truncated=not success,
        cache={"noise": rng.normal(size=chunk).astype(np.float32),
               "denoised": rng.normal(size=chunk).astype(np.float32)},
    )
    return t, success


def _batch(replay: ReplayBuffer, rng: np.random.Generator, config) -> dict:
    w = replay.sample_windows(rng, config.utd * config.batch_size, config.horizon, config.gamma)
    obs, nxt = w.observations["obs"], w.next_observations["obs"]
    batch = {"inputs": {"features": toy_features(obs), "state": obs},
             "next_inputs": {"features": toy_features(nxt), "state": nxt},
             "actions": w.actions, "returns": w.returns, "discount": w.discount,
             "cache": w.cache, "next_cache": w.next_cache}
    return jax.tree.map(lambda x: jnp.asarray(x).reshape(config.utd, -1, *x.shape[1:]), batch)


def _episode_step(learner: Learner, replay: ReplayBuffer, rng: np.random.Generator, counters: dict) -> Learner:
    """What the training loop does per episode: collect (here: draw) an episode, store it, update."""
    t, success = _add_episode(replay, rng)
    learner, _ = learner.update(_batch(replay, rng, learner.config))
    counters["episodes"] += 1
    counters["env_steps"] += t
    counters["successes"] += int(success)
    counters["updates"] += 1
    counters["flops"] += 3 * 10**18  # beyond float64's exact integers: must come back exactly
    return learner


def _fresh_counters() -> dict:
    return {"episodes": 0, "env_steps": 0, "successes": 0, "updates": 0, "flops": 0, "wall_time": 0.0,
            "history": {"eval": [0.25, None]}}


def _child_main(run_dir: str, total: int, slow_save_at: int) -> None:
    """The SIGKILL test's child: resume if possible, then loop episode -> update -> save, printing
    'saving N' / 'saved N'. With slow_save_at = N, the replay write of checkpoint N prints 'in-save N' and
    then hangs, so that the parent kills it in the middle of that save."""
    ckpt = RunCheckpointer(run_dir, keep_last=2, keep_best=1)
    config = _config()
    resumed = ckpt.restore_latest(_abstract(config))
    if resumed is None:
        learner, replay, counters, episode = _create(config), ReplayBuffer(CAPACITY), _fresh_counters(), 0
        rng = np.random.default_rng(7)
    else:
        learner, replay, rng_state, counters, episode = resumed
        rng = np.random.default_rng()
        rng.bit_generator.state = rng_state
    start = time.monotonic()
    while episode < total:
        learner = _episode_step(learner, replay, rng, counters)
        episode += 1
        counters["wall_time"] += time.monotonic() - start
        start = time.monotonic()
        if episode == slow_save_at:
            save = replay.save

            def hanging_save(path, _save=save, _episode=episode):
                _save(path)
                print(f"in-save {_episode}", flush=True)
                time.sleep(60)

            replay.save = hanging_save
        print(f"saving {episode}", flush=True)
        ckpt.save(episode, learner, replay, rng, counters, eval_success=float(counters["successes"]) / episode)
        print(f"saved {episode}", flush=True)
    print("done", flush=True)


# -- helpers ----------------------------------------------------------------------------------------------------


def _leaves(learner: Learner) -> list[np.ndarray]:
    def host(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [host(x) for x in jax.tree.leaves(learner)]


def _assert_same_learner(a: Learner, b: Learner) -> None:
    # Tree structures compare static parts by identity (apply fns, optimisers), so compare the leaf paths.
    def paths(learner: Learner) -> list[str]:
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(learner)[0]]

    assert paths(a) == paths(b)
    assert a.config == b.config
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _assert_same_replay(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert a.episodes == b.episodes
    assert (a.steps_added, a.episodes_added, a.episodes_evicted, a.cursor) == (
        b.steps_added, b.episodes_added, b.episodes_evicted, b.cursor)
    wa, wb = a.all_windows(TASK.horizon, 0.99), b.all_windows(TASK.horizon, 0.99)
    for x, y in zip(jax.tree.leaves(dataclasses.asdict(wa)), jax.tree.leaves(dataclasses.asdict(wb)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    """A learner after a few updates, its replay, rng and counters."""
    config = _config()
    learner, replay, counters = _create(config), ReplayBuffer(CAPACITY), _fresh_counters()
    rng = np.random.default_rng(0)
    for _ in range(3):
        learner = _episode_step(learner, replay, rng, counters)
    return learner, replay, rng, counters


# -- in-process tests -------------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_the_run_continues_identically(tmp_path, trained):
    learner, replay, fixture_rng, counters = trained
    rng = np.random.default_rng()
    rng.bit_generator.state = fixture_rng.bit_generator.state  # a private copy: other tests use the fixture's
    ckpt = RunCheckpointer(tmp_path / "ckpt")
    assert ckpt.restore_latest(_abstract(learner.config)) is None  # a fresh run
    ckpt.save(3, learner, replay, rng, counters, eval_success=0.5)

    # A template costs nothing to build (jax.eval_shape); a concrete learner works the same.
    for template in (_abstract(learner.config), _create(learner.config)):
        restored = RunCheckpointer(tmp_path / "ckpt").restore_latest(template)  # opened anew, as by a new process
        assert restored is not None
        r_learner, r_replay, r_rng_state, r_counters, episode = restored
        assert episode == 3
        _assert_same_learner(r_learner, learner)  # critics, targets, edit policy, α, optimiser states, key, step
        assert int(r_learner.step) == 3
        _assert_same_replay(r_replay, replay)
        assert r_counters == counters and r_counters["flops"] == 9 * 10**18
        assert r_counters["history"] == {"eval": [0.25, None]}

    # The run continues identically: the same windows are sampled, the same numbers drawn. (Equal learner
    # leaves, key included, make the next update equal; the SIGKILL test checks whole resumed runs.)
    r_rng = np.random.default_rng()
    r_rng.bit_generator.state = r_rng_state
    a = replay.sample_windows(rng, 8, TASK.horizon, 0.99)
    b = r_replay.sample_windows(r_rng, 8, TASK.horizon, 0.99)
    for x, y in zip(jax.tree.leaves(dataclasses.asdict(a)), jax.tree.leaves(dataclasses.asdict(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(rng.integers(0, 2**62, 8), r_rng.integers(0, 2**62, 8))


def test_named_rng_states_round_trip(tmp_path, trained):
    learner, replay, _, counters = trained
    env, sampler = np.random.default_rng(1), np.random.default_rng(2)
    env.normal(size=3)
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(1, learner, replay, {"env": env, "sampler": sampler.bit_generator.state}, counters)
    state = ckpt.restore_latest(_abstract(learner.config)).rng_state
    assert state == {"env": env.bit_generator.state, "sampler": sampler.bit_generator.state}


def test_keep_last_k_plus_best_by_eval_success(tmp_path, trained):
    learner, replay, rng, counters = trained
    ckpt = RunCheckpointer(tmp_path, keep_last=2, keep_best=1)
    evals = {1: None, 2: 0.9, 3: None, 4: 0.5, 5: None, 6: None}
    for episode, success in evals.items():
        ckpt.save(episode, learner, replay, rng, counters, eval_success=success)
    assert ckpt.episodes == [2, 5, 6]  # last two, plus the best eval (un-evaluated ones never rank)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "5", "6"]
    assert ckpt.best_episode == 2 and ckpt.eval_success(2) == 0.9 and ckpt.eval_success(6) is None

    reopened = RunCheckpointer(tmp_path, keep_last=2, keep_best=1)  # retention state comes from disk
    assert reopened.episodes == [2, 5, 6] and reopened.best_episode == 2
    reopened.save(7, learner, replay, rng, counters, eval_success=0.95)  # a new best replaces the old one
    assert reopened.episodes == [6, 7] and reopened.best_episode == 7

    only_last = RunCheckpointer(tmp_path / "last", keep_last=1, keep_best=0)
    for episode in (1, 2, 3):
        only_last.save(episode, learner, replay, rng, counters, eval_success=1.0 / episode)
    assert only_last.episodes == [3]


def test_episodes_must_go_forward(tmp_path, trained):
    learner, replay, rng, counters = trained
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(5, learner, replay, rng, counters)
    for episode in (5, 4):
        with pytest.raises(ValueError, match="not after the latest checkpoint"):
            ckpt.save(episode, learner, replay, rng, counters)
    with pytest.raises(ValueError, match="eval_success must be finite"):
        ckpt.save(6, learner, replay, rng, counters, eval_success=float("nan"))
    assert ckpt.episodes == [5]


def test_bad_counters_are_refused_before_anything_is_written(tmp_path, trained):
    learner, replay, rng, _ = trained
    ckpt = RunCheckpointer(tmp_path)
    with pytest.raises(TypeError, match=r"counters\.bad"):
        ckpt.save(1, learner, replay, rng, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_learner_is_refused_saying_what_differs(tmp_path, trained):
    learner, replay, rng, counters = trained
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(1, learner, replay, rng, counters)

    with pytest.raises(RunCheckpointError) as info:
        ckpt.restore_latest(_abstract(_config(hidden=16)))
    message = str(info.value)
    assert "chunk_critic.hidden_dims: [8, 8] -> [16, 16]" in message  # the cause, first
    assert "wrong shape (102)" in message and "expected (2, 16, 16) found (2, 8, 8)" in message
    assert len(message.splitlines()) < 40  # hundreds of leaves differ in a real learner: the list is capped

    with pytest.raises(RunCheckpointError, match=r"tau: 0\.005 -> 0\.01[\s\S]*allow_config_change=True"):
        ckpt.restore_latest(_abstract(_config(tau=0.01)))
    resumed = ckpt.restore_latest(_abstract(_config(tau=0.01)), allow_config_change=True)
    assert resumed.learner.config.tau == 0.01
    np.testing.assert_array_equal(_leaves(resumed.learner)[0], _leaves(learner)[0])


def test_unwritable_folder_fails_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="cannot write the checkpoint folder"):
        RunCheckpointer(blocker / "ckpt")
    with pytest.raises(ValueError, match="keep_last"):
        RunCheckpointer(tmp_path / "x", keep_last=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_up_front(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write the checkpoint folder"):
            RunCheckpointer(folder)
    finally:
        folder.chmod(0o700)


# -- SIGKILL at random moments ----------------------------------------------------------------------------------


class _Child:
    """The child training loop, whose stdout lines the test waits on."""

    def __init__(self, run_dir: Path, total: int, slow_save_at: int, tmp: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                   # Restarts are cheap when compilations are shared through a persistent cache.
                   JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        code = (f"from tests.test_run_checkpoint import _child_main; "
                f"_child_main({str(run_dir)!r}, {total}, {slow_save_at})")
        self.stderr_path = tmp / f"child-{time.monotonic_ns()}.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self.stderr)
        self._buffer = b""
        self.lines: list[str] = []

    def wait_for(self, line: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(remaining, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.kill()
                raise AssertionError(f"child never printed {line!r} (got {self.lines}); stderr:\n"
                                     + self.stderr_path.read_text()[-3000:])
            self._buffer += chunk
            *done, self._buffer = self._buffer.split(b"\n")
            self.lines += [d.decode() for d in done]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def _check_consistent(run_dir: Path, template: Learner) -> int:
    """restore_latest must return a whole checkpoint whose parts agree with each other."""
    restored = RunCheckpointer(run_dir, keep_last=2, keep_best=1).restore_latest(template)
    assert restored is not None
    learner, replay, rng_state, counters, episode = restored
    assert counters["episodes"] == episode == replay.episodes_added
    assert counters["env_steps"] == replay.steps_added
    assert counters["updates"] == int(learner.step) == episode
    assert counters["flops"] == 3 * 10**18 * episode
    np.random.default_rng().bit_generator.state = rng_state  # a valid generator state
    assert not [p for p in run_dir.iterdir() if "tmp" in p.name]  # leftovers of the kill were cleaned
    return episode


def _start(run_dir: Path) -> None:
    """Checkpoint 0, as a run would write before its first episode. Every child then starts by restoring,
    so all of them run one compiled update (restored arrays are committed and strongly typed, a fresh
    learner's are not: the first restore in a process compiles the update once more)."""
    with RunCheckpointer(run_dir, keep_last=2, keep_best=1) as ckpt:
        ckpt.save(0, _create(_config()), ReplayBuffer(CAPACITY), np.random.default_rng(7), _fresh_counters())


def test_sigkill_at_random_moments_never_leaves_a_corrupt_checkpoint(tmp_path):
    total = 10
    run_dir = tmp_path / "run"
    template = _abstract(_config())
    _start(run_dir)

    # 1. Killed in the middle of saving checkpoint 2: its replay is written, the step is not final yet.
    child = _Child(run_dir, total, slow_save_at=2, tmp=tmp_path)
    child.wait_for("in-save 2")
    child.kill()
    assert any(p.name.startswith("2.") and "tmp" in p.name for p in run_dir.iterdir())  # the half-written step
    assert _check_consistent(run_dir, template) == 1

    # 2. Killed at random moments around saves (before, during or after one), resuming each time.
    chooser = random.Random(0)
    latest = 1
    for _ in range(3):
        target = min(latest + chooser.randint(1, 3), total)
        child = _Child(run_dir, total, slow_save_at=-1, tmp=tmp_path)
        child.wait_for(f"saving {target}")
        time.sleep(chooser.uniform(0.0, 0.4))  # a save takes a few hundred ms here
        child.kill()
        episode = _check_consistent(run_dir, template)
        assert target - 1 <= episode <= total
        latest = episode

    # 3. Finished after the kills, the run equals one that was never interrupted.
    child = _Child(run_dir, total, slow_save_at=-1, tmp=tmp_path)
    child.wait_for("done")
    child.kill()
    reference_dir = tmp_path / "reference"
    _start(reference_dir)
    child = _Child(reference_dir, total, slow_save_at=-1, tmp=tmp_path)
    child.wait_for("done")
    child.kill()
    resumed = RunCheckpointer(run_dir).restore_latest(template)
    reference = RunCheckpointer(reference_dir).restore_latest(template)
    assert resumed.episode == reference.episode == total
    _assert_same_learner(resumed.learner, reference.learner)
    _assert_same_replay(resumed.replay, reference.replay)
    assert resumed.rng_state == reference.rng_state
    assert {k: v for k, v in resumed.counters.items() if k != "wall_time"} == {
        k: v for k, v in reference.counters.items() if k != "wall_time"}


_DELETION_CHILD = """
import os, signal, sys
from pathlib import Path
import numpy as np
from faster_vla.rl.replay import ReplayBuffer
from faster_vla.runs.checkpoint import RunCheckpointer
from tests.test_run_checkpoint import CAPACITY, _config, _create, _fresh_counters

directory = Path(sys.argv[1]).resolve()
ckpt = RunCheckpointer(directory, keep_last=1, keep_best=0)
learner, replay, rng, counters = _create(_config()), ReplayBuffer(CAPACITY), np.random.default_rng(7), _fresh_counters()
ckpt.save(0, learner, replay, rng, counters)
real = {"unlink": os.unlink, "rmdir": os.rmdir}

def dies_after(name):
    def remove(path, *args, dir_fd=None, **kwargs):
        full = Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / path if dir_fd is not None else Path(path)
        real[name](path, *args, dir_fd=dir_fd, **kwargs)
        if full.resolve().is_relative_to(directory) and "replay" in full.parts:  # a part a restore reads
            print(full.resolve().relative_to(directory), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return remove

os.unlink, os.rmdir = dies_after("unlink"), dies_after("rmdir")
counters["episodes"] = 1
ckpt.save(1, learner, replay, rng, counters)  # keep_last=1: deletes checkpoint 0
print("saved", flush=True)
"""


def test_sigkill_while_retention_deletes_an_old_checkpoint_leaves_no_corrupt_one(tmp_path):
    # The soak (benchmarks/soak_kill.py) found it: a kill while a save's retention deleted an old checkpoint,
    # file by file, left that folder half deleted and still listed as a checkpoint, which no longer restored.
    # Deletion now first moves the folder out of the listing in one rename.
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _DELETION_CHILD, str(directory)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    removed = Path(proc.stdout.split()[0])
    assert "0" in removed.parts  # it died deleting checkpoint 0's replay (not in the save of checkpoint 1)
    with RunCheckpointer(directory, keep_last=1, keep_best=0) as ckpt:
        template = _abstract(_config())
        for episode in ckpt.episodes:  # every listed checkpoint restores
            assert ckpt.restore(episode, template).episode == episode
        assert ckpt.latest_episode == 1
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("_")) == ["1"]  # trash emptied
