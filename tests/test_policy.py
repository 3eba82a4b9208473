"""The openpi-style LIBERO policy around the actor, and the `faster-vla demo` job."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from faster_vla.launch.cli import main
from faster_vla.launch.demo import SMALL_TOKENIZER, libero_observation
from faster_vla.policies import pi05
from faster_vla.policies.normalize import NormStats, unnormalize_quantile
from faster_vla.policies.policy import make_libero_policy
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from tests.small_models import SMALL, perturbed_params

CONFIG = dataclasses.replace(SMALL, vocab_size=512, max_token_len=32, action_dim=32)  # LIBERO tokenizer, 8-D state


def _stats(dim: int, low: float, high: float) -> NormStats:
    return NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=np.full(dim, low), q99=np.full(dim, high))


@pytest.fixture(scope="module")
def policy():
    actor = pi05.Pi05Actor(CONFIG, perturbed_params(CONFIG))
    tokenizer = PaligemmaTokenizer(SMALL_TOKENIZER, max_len=CONFIG.max_token_len)
    stats = {"state": _stats(8, -2.0, 2.0), "actions": _stats(7, -0.5, 1.5)}
    return make_libero_policy(actor, tokenizer=tokenizer, norm_stats=stats)


def test_infer_returns_unnormalised_libero_actions(policy):
    obs = libero_observation("put the bowl on the plate", seed=1)
    noise = np.random.default_rng(0).normal(size=(CONFIG.action_horizon, CONFIG.action_dim)).astype(np.float32)
    out = policy.infer(obs, noise=noise)
    assert out["actions"].shape == (CONFIG.action_horizon, 7)
    assert set(out["policy_timing"]) == {"input_transform_ms", "encode_ms", "denoise_ms", "output_transform_ms",
                                         "infer_ms"}
    # The same chain by hand: transforms -> sample_actions -> quantile un-normalisation of the first 7 dims.
    model_actions = policy.actor.sample_actions(policy.to_observation(obs), noise=noise[None])[0]
    expected = unnormalize_quantile(np.asarray(model_actions)[:, :7], policy.output_transform.transforms[0].norm_stats["actions"])
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-5, atol=1e-5)
    # Caller-chosen noise makes inference reproducible; the policy's own stream does not repeat itself.
    np.testing.assert_array_equal(policy.infer(obs, noise=noise)["actions"], out["actions"])
    assert not np.allclose(policy.infer(obs)["actions"], policy.infer(obs)["actions"])


def test_prompt_and_images_reach_the_model(policy):
    noise = np.zeros((CONFIG.action_horizon, CONFIG.action_dim), np.float32)
    base = policy.infer(libero_observation("put the bowl on the plate", seed=1), noise=noise)["actions"]
    other_prompt = policy.infer(libero_observation("open the top drawer", seed=1), noise=noise)["actions"]
    other_images = policy.infer(libero_observation("put the bowl on the plate", seed=2), noise=noise)["actions"]
    assert np.abs(base - other_prompt).max() > 1e-4
    assert np.abs(base - other_images).max() > 1e-4


def test_bad_observations_are_named(policy):
    obs = libero_observation("put the bowl on the plate")
    del obs["observation/wrist_image"]
    with pytest.raises(ValueError, match="observation/wrist_image"):
        policy.infer(obs)


def test_tokenizer_length_must_match_the_model():
    actor = pi05.Pi05Actor(CONFIG, {})  # the check needs only the config
    with pytest.raises(ValueError, match="max_token_len"):
        make_libero_policy(actor, tokenizer=PaligemmaTokenizer(SMALL_TOKENIZER, max_len=8), norm_stats={})


def test_demo_runs_the_built_in_default(capsys):
    main(["demo", "--repeats", "1", "--num-candidates", "2", "--num-steps", "2"])
    printed = capsys.readouterr().out
    assert "actions [10 steps × 7 dims]" in printed
    assert "loaded with load_openpi" in printed
    assert "best-of-2 sharing the prefix" in printed


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "faster_vla.launch.cli", "demo", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--num-candidates" in out
