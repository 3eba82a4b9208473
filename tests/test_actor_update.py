"""`--actor-update success_bc` (EXPO's π0.5 recipe): the success buffer, the actor's flow-loss steps inside a
run, their checkpoint and resume, and the tuned actor reaching the exported bundle."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from faster_vla.acting.flow_trainer import ActorFinetuneConfig
from faster_vla.launch.demo import libero_observation
from faster_vla.acting.success_buffer import SuccessBuffer, SuccessBufferFormatError

PROMPT = "turn on the stove"


def _episode(n: int, seed: int, horizon: int = 10) -> tuple[list[dict], np.ndarray]:
    observations = [libero_observation(PROMPT, seed=seed * 100 + i) for i in range(n)]
    chunks = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, horizon, 7)).astype(np.float32)
    return observations, chunks


def _host(x: jax.Array) -> np.ndarray:
    """A leaf as numpy; PRNG keys by their key data."""
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


# -- the buffer -----------------------------------------------------------------------------------------------


def test_success_buffer_samples_whole_rows_and_evicts_oldest_episodes(tmp_path):
    buf = SuccessBuffer(capacity=5)
    first = _episode(3, seed=1)
    buf.add_episode(*first)
    buf.add_episode(*_episode(2, seed=2))
    assert len(buf) == 5 and buf.num_episodes == 2
    rows = buf.sample(np.random.default_rng(0), 64)
    assert len(rows) == 64 and rows[0]["prompt"] == PROMPT and rows[0]["actions"].shape == (10, 7)
    # Every sampled row is one stored (observation, chunk) pair, not a mix.
    pairs = {chunk.tobytes(): obs["observation/image"].tobytes() for obs, chunk in zip(first[0], first[1])}
    for row in rows:
        if row["actions"].tobytes() in pairs:
            assert pairs[row["actions"].tobytes()] == row["observation/image"].tobytes()
    buf.add_episode(*_episode(2, seed=3))  # 7 > 5 chunks: the oldest episode goes
    assert len(buf) == 4 and buf.num_episodes == 2 and buf.episodes_added == 3
    assert not any(np.array_equal(r["actions"], first[1][0]) for r in buf.sample(np.random.default_rng(1), 200))

    buf.save(tmp_path / "s.npz")
    back = SuccessBuffer.load(tmp_path / "s.npz")
    assert (back.capacity, len(back), back.episodes_added) == (5, 4, 3)
    a, b = buf.sample(np.random.default_rng(7), 8), back.sample(np.random.default_rng(7), 8)
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"]
        for key in ("observation/image", "observation/wrist_image", "observation/state", "actions"):
            np.testing.assert_array_equal(x[key], y[key])


def test_success_buffer_rejects_bad_input(tmp_path):
    buf = SuccessBuffer(capacity=10)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(np.random.default_rng(0), 1)
    observations, chunks = _episode(2, seed=0)
    with pytest.raises(ValueError, match="one observation per chunk"):
        buf.add_episode(observations[:1], chunks)
    no_images = [{"observation/state": o["observation/state"], "prompt": PROMPT} for o in observations]
    with pytest.raises(ValueError, match="render_mode"):
        buf.add_episode(no_images, chunks)
    buf.add_episode(observations, chunks)
    with pytest.raises(ValueError, match="actions"):
        buf.add_episode(observations, chunks[:, :5])
    with pytest.raises(ValueError, match="capacity"):
        SuccessBuffer(0)
    (tmp_path / "x.npz").write_bytes(b"not an archive")
    with pytest.raises(SuccessBufferFormatError, match="not a faster_vla success buffer"):
        SuccessBuffer.load(tmp_path / "x.npz")
    empty = SuccessBuffer(3)
    empty.save(tmp_path / "e.npz")
    assert len(SuccessBuffer.load(tmp_path / "e.npz")) == 0


def test_config_rejects_a_trained_vlm_and_no_images():
    from faster_vla.runs.config import TRAIN_CONFIGS

    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    with pytest.raises(ValueError, match="trainable action_expert"):
        dataclasses.replace(base, actor_update="success_bc", actor_optimizer=ActorFinetuneConfig(trainable="all"))
    with pytest.raises(ValueError, match="render-mode chunk_boundary"):
        dataclasses.replace(base, actor_update="success_bc", env=dataclasses.replace(base.env, render_mode="none"))
    with pytest.raises(ValueError, match="actor_update"):
        dataclasses.replace(base, actor_update="ppo")


# -- inside a run (the built-in model; the LIBERO package, no simulation) ----------------------------------------


def test_run_trains_the_actor_checkpoints_resumes_and_exports_it(tmp_path):
    pytest.importorskip("libero.libero", reason="the LIBERO extra is not installed: pip install -e '.[libero]'")
    from faster_vla.serving.bundle import export_bundle
    from faster_vla.runs.loop import train
    from faster_vla.runs.run import Run
    from faster_vla.runs.config import TRAIN_CONFIGS
    from faster_vla.policies.checkpoint import restore_params
    from faster_vla.runs.checkpoint import RunCheckpointError
    from faster_vla.runs.logger import RunLogger

    base = TRAIN_CONFIGS["cpu_small_faster_expo"][1]
    config = dataclasses.replace(
        base, run_dir=tmp_path / "run", actor_update="success_bc", wandb_mode="disabled", progress=False,
        actor_optimizer=ActorFinetuneConfig(learning_rate=1e-3, ema_decay=0.5, augment=False, batch_size=2))
    run = Run(config, log=lambda *_: None)
    assert run.update_actor(3) == []  # nothing has succeeded yet: the actor stays as loaded
    before = jax.tree.map(np.asarray, run.policy.actor.params)
    run.successes.add_episode(*_episode(3, seed=4, horizon=run.horizon))
    infos = run.update_actor(2)
    assert len(infos) == 2 and all(np.isfinite(i["actor_flow_loss"]) for i in infos)
    assert run.counters.actor_updates == 2 and run.counters.actor_update_flops > 0
    assert run.counters.flops == run.counters.actor_update_flops  # nothing else ran
    # The actor now acts with the trainer's EMA: the action expert moved, the VLM (prefix) did not.
    acting = run.policy.actor.params
    assert acting is run.actor_trainer.acting_params
    moved = jax.tree_util.tree_map_with_path(lambda p, a, b: (jax.tree_util.keystr(p), not np.array_equal(a, b)),
                                             before, jax.tree.map(np.asarray, acting))
    moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
    assert any(v for k, v in moved.items() if "action_out_proj" in k)
    assert not any(v for k, v in moved.items() if "img" in k or "embedder" in k)

    with RunLogger(config.run_dir, config, wandb_mode="disabled", progress=False):
        pass
    run.counters.episodes = 1
    run.save(eval_success=0.5)

    # A resumed run continues from the same actor, optimiser state and buffer.
    resumed = Run(dataclasses.replace(config, resume=True), log=lambda *_: None)
    assert resumed.restore()
    for a, b in zip(jax.tree.leaves(run.actor_trainer), jax.tree.leaves(resumed.actor_trainer)):
        np.testing.assert_array_equal(_host(a), _host(b))
    assert resumed.policy.actor.params is resumed.actor_trainer.acting_params
    assert len(resumed.successes) == 3 and resumed.counters.actor_updates == 2
    # Resuming across a changed --actor-update is refused, not silently restarted.
    frozen = Run(dataclasses.replace(config, actor_update="frozen", resume=True), log=lambda *_: None)
    with pytest.raises(RunCheckpointError, match="trained actor"):
        frozen.restore()

    # The bundle carries the tuned actor (the EMA that acted), not the built-in one.
    bundle = export_bundle(config.run_dir, tmp_path / "bundle")
    exported = restore_params(bundle / "params")
    for a, b in zip(jax.tree.leaves(acting), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config, log=lambda *_: None)
