"""π0.5 parity with openpi's own code, on the golden fixtures in ../shared (configuration tiny_a).

Tolerances are the issue's: relative error ‖Δ‖/‖ref‖ ≤ 1e-5 in float32 and ≤ 2e-2 in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from faster_vla.policies import pi05
from faster_vla.policies.pi05 import Pi05Module
from tests.openpi_golden import load_golden, relative_error

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module", params=DTYPES)
def golden(request, openpi_fixtures):
    return load_golden(openpi_fixtures, "tiny_a", request.param)


@pytest.fixture(scope="module")
def actor(golden):
    return pi05.Pi05Actor(golden.config, golden.params)


def _tol(golden) -> float:
    return TOLERANCE[golden.config.dtype]


def test_parameter_tree_is_openpis(golden):
    expected = traverse_util.flatten_dict(pi05.param_shapes(golden.config))
    found = traverse_util.flatten_dict(golden.params)
    assert set(expected) == set(found)
    for path, shape in expected.items():
        assert shape.shape == found[path].shape, path


@pytest.mark.parametrize("num_steps", [10, 3, 1])
def test_sample_actions_with_fixed_noise(golden, actor, num_steps):
    actions = actor.sample_actions(golden.observation, noise=golden.inputs["noise"], num_steps=num_steps)
    expected = golden.outputs[f"sample_actions/num_steps_{num_steps}"]
    assert relative_error(actions, expected) < _tol(golden)


def test_sample_actions_draws_noise_like_openpi(golden, actor):
    rng = jnp.asarray(golden.inputs["sample_rng_key_data"])
    batch = golden.inputs["state"].shape[0]
    noise = jax.random.normal(rng, (batch, golden.config.action_horizon, golden.config.action_dim))
    # Same key, same sampler; JAX releases differ by an ulp in erfinv, so not bitwise.
    np.testing.assert_allclose(np.asarray(noise), golden.outputs["sample_actions/rng_noise"], rtol=1e-6, atol=1e-6)
    actions = actor.sample_actions(golden.observation, rng=rng)
    assert relative_error(actions, golden.outputs["sample_actions/num_steps_10_rng_noise"]) < _tol(golden)


def test_compute_loss_with_captured_noise_and_time(golden, actor):
    loss = actor.compute_loss(
        golden.observation, golden.inputs["actions"], noise=golden.inputs["loss_noise"], time=golden.inputs["loss_time"]
    )
    assert loss.shape == golden.outputs["compute_loss"].shape
    assert relative_error(loss, golden.outputs["compute_loss"]) < _tol(golden)


def test_compute_loss_draws_noise_and_time_like_openpi(golden, actor):
    rng = jnp.asarray(golden.inputs["loss_rng_key_data"])
    loss = actor.compute_loss(golden.observation, golden.inputs["actions"], rng=rng)
    assert relative_error(loss, golden.outputs["compute_loss"]) < _tol(golden)


def _apply(golden, method, *args):
    return Pi05Module(golden.config).apply({"params": golden.params}, *args, method=method)


def test_siglip_tokens(golden):
    for key in pi05.IMAGE_KEYS:
        tokens = _apply(golden, lambda m, x: m.PaliGemma.img(x), jnp.asarray(golden.inputs[f"images/{key}"]))
        assert relative_error(tokens, golden.outputs[f"intermediate/siglip_tokens/{key}"]) < _tol(golden), key


def test_prefix_tokens_mask_and_positions(golden):
    tokens, mask = _apply(golden, Pi05Module.embed_prefix, golden.observation)
    out = golden.outputs
    assert relative_error(tokens, out["intermediate/prefix_tokens"]) < _tol(golden)
    np.testing.assert_array_equal(np.asarray(mask), out["intermediate/prefix_mask"])
    np.testing.assert_array_equal(np.asarray(jnp.cumsum(mask, axis=1) - 1), out["intermediate/prefix_positions"])
    assert not out["intermediate/prefix_ar_mask"].any()  # the prefix is fully bidirectional, as we build it


def test_prefix_output_and_kv_cache_on_valid_rows(golden):
    # Rows of padded query tokens attend to nothing and are uniform averages: only valid rows are defined.
    hidden, (k, v), mask = _apply(golden, Pi05Module.encode, golden.observation)
    valid = np.asarray(golden.outputs["intermediate/prefix_mask"])
    assert relative_error(np.asarray(hidden)[valid], golden.outputs["intermediate/prefix_llm_out"][valid]) < _tol(golden)
    for name, cache in (("k", k), ("v", v)):
        expected = golden.outputs[f"intermediate/prefix_kv_cache_{name}"]
        assert cache.shape == expected.shape
        assert relative_error(np.asarray(cache)[:, valid], expected[:, valid]) < _tol(golden), name


@pytest.mark.parametrize("t", ["1.0", "0.5"])
def test_suffix_tokens_and_adarms_conditioning(golden, t):
    batch = golden.inputs["state"].shape[0]
    time = jnp.full((batch,), float(t), jnp.float32)
    # openpi's fixture embeds the sample noise at this time (x_t = noise for the t = 1 step).
    tokens, cond = _apply(golden, Pi05Module.embed_suffix, jnp.asarray(golden.inputs["noise"]), time)
    out = golden.outputs
    assert relative_error(cond, out[f"intermediate/suffix_t{t}/adarms_cond"]) < _tol(golden)
    assert relative_error(tokens, out[f"intermediate/suffix_t{t}/tokens"]) < _tol(golden)
    assert out[f"intermediate/suffix_t{t}/mask"].all()
    np.testing.assert_array_equal(out[f"intermediate/suffix_t{t}/ar_mask"], np.arange(tokens.shape[1]) == 0)


def test_training_attention_mask(golden):
    prefix_mask = golden.outputs["intermediate/prefix_mask"]
    horizon = golden.config.action_horizon
    mask = np.concatenate([prefix_mask, np.ones((prefix_mask.shape[0], horizon), bool)], axis=1)
    ar = np.concatenate([np.zeros(prefix_mask.shape[1], bool), np.arange(horizon) == 0])
    attn = pi05.make_attn_mask(jnp.asarray(mask), jnp.asarray(ar))
    np.testing.assert_array_equal(np.asarray(attn), golden.outputs["intermediate/loss_full_attn_mask"])


def test_gradients_of_mean_loss(openpi_fixtures):
    golden = load_golden(openpi_fixtures, "tiny_a", "float32")
    with np.load(openpi_fixtures / "tiny_a_grads_float32.npz") as f:
        expected = {k: f[k] for k in f.files}
    actor = pi05.Pi05Actor(golden.config, golden.params, trainable=True)
    # openpi's reference differentiates its jitted compute_loss, which draws noise and time inside jit.
    rng = jnp.asarray(golden.inputs["loss_rng_key_data"])
    loss_fn = lambda p: jnp.mean(actor.loss(p, golden.observation, golden.inputs["actions"], rng=rng))  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(golden.params)
    assert relative_error(loss, expected.pop("__mean_loss__")) < TOLERANCE["float32"]
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}
    assert set(flat) == set(expected)
    total = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in expected.values()))
    for path, ref in expected.items():
        if np.linalg.norm(ref) < 1e-8 * total:
            # Analytically zero (e.g. SigLIP's key bias: softmax ignores a per-row constant): both sides are
            # float noise, so require ours to be noise of the same size rather than a relative match.
            assert np.linalg.norm(flat[path]) < 1e-8 * total, path
        else:
            assert relative_error(flat[path], ref) < TOLERANCE["float32"], path
