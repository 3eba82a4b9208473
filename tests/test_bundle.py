"""Export and load: a run's checkpoint becomes a bundle whose actor openpi's loader reads back unchanged, which
`load_policy` turns into a FASTER policy, and which `faster-vla serve --bundle` serves to openpi's own client."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from faster_vla.acting.actor_source import ActorSource
from faster_vla.serving.bundle import BUNDLE_FILE, BundleError, TunedPolicy, export_bundle, load_policy
from faster_vla.runs.config import CriticConfig, TrainConfig, learner_config
from faster_vla.runs.loading import load_run
from faster_vla.launch.demo import libero_observation
from faster_vla.rl.learner import Learner
from faster_vla.libero.env import LiberoEnvConfig
from faster_vla.policies.config import PI05_SMALL
from faster_vla.policies.pi05 import load_openpi
from faster_vla.rl.replay import ReplayBuffer
from faster_vla.runs.checkpoint import RunCheckpointer
from faster_vla.runs.logger import RunLogger
from faster_vla.rl.selection import SelectionConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(
    actor=ActorSource("pi05_small", seed=3),
    env=LiberoEnvConfig(max_steps=20),
    selection=SelectionConfig("faster", num_candidates=4),
    critics=CriticConfig(hidden_dims=(32,), num_members=3, feature_proj_dim=16, state_embed_dim=8),
    wandb_mode="disabled", progress=False,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as `faster-vla train` leaves it: config.json and a checkpoint with an eval score."""
    run_dir = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(CONFIG, run_dir=run_dir)
    lconfig = learner_config(config, PI05_SMALL)
    learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=5)
    # Move the critics off their init, so a bundle that dropped them would be caught.
    learner = learner.replace(noise_target=jax.tree.map(lambda x: x + 0.01, learner.noise_target))
    with RunLogger(run_dir, config, wandb_mode="disabled", progress=False):
        pass
    RunCheckpointer(run_dir / "checkpoints").save(7, learner, ReplayBuffer(100), np.random.default_rng(0),
                                                  {"episodes": 7}, eval_success=0.5)
    return run_dir


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    return export_bundle(run_dir, tmp_path_factory.mktemp("out") / "bundle")


def test_bundle_layout_and_manifest(bundle, run_dir):
    assert (bundle / "params").is_dir() and (bundle / "critics" / "params").is_dir()
    assert (bundle / "assets/physical-intelligence/libero/norm_stats.json").is_file()
    assert (bundle / "tokenizer.model").is_file()
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert manifest["selection"]["rule"] == "faster"
    assert manifest["provenance"]["episode"] == 7 and manifest["provenance"]["eval_success"] == 0.5
    assert manifest["provenance"]["run_dir"] == str(run_dir.resolve())
    assert not [p for p in bundle.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left


def test_actor_params_read_back_by_the_openpi_loader_with_identical_actions(bundle):
    """`load_openpi` (the loader that reads openpi's own ckpt_tiny_a fixture) reads the bundle's params/."""
    original = CONFIG.actor.build()
    reloaded = load_openpi(PI05_SMALL, bundle)
    for a, b in zip(jax.tree.leaves(original.actor.params), jax.tree.leaves(reloaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    obs = original.to_observation(libero_observation("open the top drawer of the cabinet", seed=1))
    noise = jax.random.normal(jax.random.key(0), (1, PI05_SMALL.action_horizon, PI05_SMALL.action_dim))
    np.testing.assert_array_equal(np.asarray(original.actor.sample_actions(obs, noise=noise)),
                                  np.asarray(reloaded.sample_actions(obs, noise=noise)))


def test_load_policy_acts_with_the_runs_rule(bundle, run_dir):
    import faster_vla

    assert faster_vla.load_policy is load_policy  # the package-level entry point
    policy = load_policy(bundle)
    assert isinstance(policy, TunedPolicy) and policy.selection.rule == "faster"
    obs = libero_observation("open the top drawer of the cabinet", seed=2)
    out = policy.infer(obs, return_scores=True)
    assert out["actions"].shape == (PI05_SMALL.action_horizon, 7)
    assert out["noise_scores"].shape == (4,) and 0 <= out["seed_index"] < 4
    # The critics are the run's: scores come from the exported (shifted) target noise critic.
    _, learner, _ = load_run(run_dir)
    for a, b in zip(jax.tree.leaves(learner.noise_target), jax.tree.leaves(policy.learner.noise_target)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Caller-chosen seeds and per-request overrides.
    noise = np.random.default_rng(0).standard_normal((2, PI05_SMALL.action_horizon, PI05_SMALL.action_dim))
    a = policy.infer(obs, noise=noise, return_scores=True)
    b = policy.infer(obs, noise=noise, return_scores=True)
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert a["noise_scores"].shape == (2,)
    base = policy.infer(obs, noise=noise[:1], selection="base")
    assert base["actions"].shape == (PI05_SMALL.action_horizon, 7)
    bad = dict(obs, **{"observation/state": np.full(8, np.nan, np.float32)})
    with pytest.raises(ValueError, match="observation/state: expected a 1-D array of 8 finite numbers, found 8 NaN"):
        policy.infer(bad)
    # An over-long prompt is truncated as openpi does, and the result says so.
    long = policy.infer(dict(obs, prompt="open the drawer " * 40))
    assert long["actions"].shape == (PI05_SMALL.action_horizon, 7)
    assert len(long["warnings"]) == 1 and "truncated" in long["warnings"][0]
    assert "warnings" not in out
    with pytest.raises(ValueError, match="selection: expected one of"):
        policy.infer(obs, selection="best_of_everything")
    # The bundle's own options: refused before any compute, naming the field, the expected and the found value.
    with pytest.raises(ValueError, match=r"num_candidates: expected an int in \[1, 1024\], found True"):
        policy.infer(obs, num_candidates=True)
    with pytest.raises(ValueError, match="return_scores: expected a bool, found str"):
        policy.infer(obs, return_scores="yes")
    with pytest.raises(ValueError, match=r"noise: expected finite numbers of shape \[1, 2, .* found 1 NaN"):
        policy.infer(obs, noise=np.where(np.arange(noise.size).reshape(noise.shape) == 5, np.nan, noise))
    with pytest.raises(ValueError, match=r"observation/image: expected an image of rank 3"):
        policy.infer(dict(obs, **{"observation/image": np.zeros((224, 224), np.uint8)}))


def test_batched_inference_equals_one_at_a_time(bundle):
    observations = [libero_observation(prompt, seed=s) for s, prompt in
                    enumerate(["open the top drawer of the cabinet", "put the bowl on the plate", "close the door"])]
    one, batched = load_policy(bundle, seed=4), load_policy(bundle, seed=4)  # the same acting stream
    # Row i draws the i-th key of the stream (seed pool, critic pair, edit sample), as the i-th `infer` would.
    expected = [one.infer(obs, return_scores=True) for obs in observations]
    got = batched.infer_batch(observations, return_scores=True)  # 3 rows, encoded padded to 4
    noise = np.random.default_rng(1).standard_normal((3, 2, PI05_SMALL.action_horizon, PI05_SMALL.action_dim))
    expected += [one.infer(obs, noise=n, selection="best_of_n", return_scores=True) for obs, n in zip(observations, noise)]
    got += batched.infer_batch(observations, noise=noise, selection="best_of_n", return_scores=True)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g["actions"], e["actions"], rtol=1e-5, atol=1e-5)
        assert (g["seed_index"], g["edited"]) == (e["seed_index"], e["edited"])
        if "noise_scores" in e:
            np.testing.assert_allclose(g["noise_scores"], e["noise_scores"], rtol=1e-5, atol=1e-5)
    assert got[0]["noise_scores"].shape == (4,)
    with pytest.raises(ValueError, match=r"noise: expected finite numbers of shape \[3, 2, "):
        batched.infer_batch(observations, noise=noise[:2])


def test_a_plain_openpi_checkpoint_loads_as_the_base_policy(tmp_path):
    from faster_vla.acting.actor_source import LIBERO_ASSETS, unit_norm_stats
    from faster_vla.policies.checkpoint import save_params
    from faster_vla.policies.normalize import save_norm_stats
    from faster_vla.policies.policy import Policy

    original = CONFIG.actor.build()
    save_params(tmp_path / "plain", original.actor.params)
    save_norm_stats(tmp_path / "plain" / LIBERO_ASSETS, unit_norm_stats())
    policy = load_policy(tmp_path / "plain", preset="pi05_small")
    assert isinstance(policy, Policy)
    obs = libero_observation("open the top drawer of the cabinet", seed=4)
    noise = np.zeros((PI05_SMALL.action_horizon, PI05_SMALL.action_dim), np.float32)
    np.testing.assert_array_equal(policy.infer(obs, noise=noise)["actions"], original.infer(obs, noise=noise)["actions"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "missing")


def test_export_refuses_to_overwrite_and_old_versions_are_refused(bundle, run_dir, tmp_path):
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(run_dir, bundle)
    copy = tmp_path / "copy"
    export_bundle(run_dir, copy)
    export_bundle(run_dir, copy, force=True)  # replaced in one step
    manifest = json.loads((copy / BUNDLE_FILE).read_text())
    (copy / BUNDLE_FILE).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(BundleError, match="re-export"):
        load_policy(copy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_bundle_to_openpi_client(bundle):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from faster_vla.serving import server as serving

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "faster_vla.launch.cli", "serve", "--bundle", str(bundle),
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        serving.wait_until_healthy("127.0.0.1", port, timeout=300)
        client = WebsocketClientPolicy("127.0.0.1", port)
        metadata = client.get_server_metadata()
        assert metadata["selection"]["rule"] == "faster" and metadata["episode"] == 7
        obs = libero_observation("open the top drawer of the cabinet", seed=3)
        out = client.infer({**obs, "return_scores": True})
        assert out["actions"].shape == (PI05_SMALL.action_horizon, 7) and out["noise_scores"].shape == (4,)
        assert "infer_ms" in out["server_timing"]
        broken = WebsocketClientPolicy("127.0.0.1", port)
        with pytest.raises(RuntimeError, match="observation/wrist_image"):
            broken.infer({k: v for k, v in obs.items() if k != "observation/wrist_image"})
        again = WebsocketClientPolicy("127.0.0.1", port)  # the server still serves the next client
        assert again.infer(obs)["actions"].shape == (PI05_SMALL.action_horizon, 7)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
