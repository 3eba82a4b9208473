"""`load_openpi`: openpi's checkpoints in both layouts give openpi's actions; mismatches fail before loading."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.policies import pi05
from faster_vla.policies.checkpoint import CheckpointError, CheckpointMismatchError, flatten_params, save_params
from tests.openpi_golden import load_golden, relative_error


@pytest.fixture(scope="module")
def golden(openpi_fixtures):
    return load_golden(openpi_fixtures, "tiny_a", "float32")


def test_release_checkpoint_gives_openpis_actions(golden, openpi_fixtures):
    actor = pi05.load_openpi(golden.config, openpi_fixtures / "ckpt_tiny_a")
    actions = actor.sample_actions(golden.observation, noise=golden.inputs["noise"], num_steps=10)
    assert relative_error(actions, golden.outputs["sample_actions/num_steps_10"]) < 1e-5


@pytest.mark.parametrize("layout", ["ckpt_tiny_a", "ckpt_tiny_a/params", "ckpt_tiny_a_trainstyle/0"])
def test_every_layout_loads_the_exact_parameters(golden, openpi_fixtures, layout):
    actor = pi05.load_openpi(golden.config, openpi_fixtures / layout)
    loaded, expected = flatten_params(actor.params), flatten_params(golden.params)
    assert set(loaded) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value), err_msg=path)


def test_config_mismatch_lists_every_offending_parameter(golden, openpi_fixtures):
    wrong = dataclasses.replace(golden.config, action_dim=golden.config.action_dim + 1)
    with pytest.raises(CheckpointMismatchError) as err:
        pi05.load_openpi(wrong, openpi_fixtures / "ckpt_tiny_a")
    message = str(err.value)
    for path in ("action_in_proj/kernel", "action_out_proj/kernel", "action_out_proj/bias"):
        assert path in message
    assert "expected (33, 64)" in message and "(32, 64)" in message


def test_missing_path_says_so(tmp_path, golden):
    with pytest.raises(CheckpointError, match="does-not-exist"):
        pi05.load_openpi(golden.config, tmp_path / "does-not-exist")


def test_bfloat16_checkpoint_stays_bfloat16_and_acts(golden, tmp_path):
    save_params(tmp_path / "bf16", jax.tree.map(lambda x: x.astype(jnp.bfloat16), golden.params))
    actor = pi05.load_openpi(golden.config, tmp_path / "bf16")
    assert actor.params["action_in_proj"]["kernel"].dtype == jnp.bfloat16
    actions = np.asarray(actor.sample_actions(golden.observation, noise=golden.inputs["noise"]))
    # bf16 weights in a float32 model: close to openpi's float32 actions, not equal.
    assert relative_error(actions, golden.outputs["sample_actions/num_steps_10"]) < 2e-2

