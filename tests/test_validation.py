"""What a policy accepts (`policies/validation.py`): every bad input refused before compute with the field, the
expected and the found value named; no non-finite action returned; an over-long prompt truncated with a warning.

The served path (frames, request ids, the server's own guard) is in tests/test_serving.py; the bundle's options
in tests/test_bundle.py.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest

from faster_vla import checkpoints
from faster_vla.acting.agent import Agent
from faster_vla.launch.demo import libero_observation
from faster_vla.policies import pi05
from faster_vla.policies.config import GemmaConfig, SiglipConfig
from faster_vla.policies.normalize import NormStats
from faster_vla.policies.policy import Policy, make_libero_policy
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from faster_vla.policies.validation import (
    MAX_IMAGE_SIDE,
    InvalidInputError,
    NonFiniteActionError,
    ObservationSpec,
    check_observation,
    edit_distance,
    likely_typo,
)
from tests.small_models import perturbed_params

# The smallest π0.5 that takes LIBERO inputs (the shipped tokenizer, 8-D state): its real pipeline in seconds.
CONFIG = pi05.Pi05Config(
    paligemma_variant=GemmaConfig(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
    action_expert_variant=GemmaConfig(width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=16),
    action_dim=8, action_horizon=4, max_token_len=16, vocab_size=512,
    siglip=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=14, image_size=28),
    dtype="float32", discrete_state_input=False,
)
NOISE_SHAPE = (CONFIG.action_horizon, CONFIG.action_dim)


def _unit_stats(dim: int) -> NormStats:
    return NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))


@pytest.fixture(scope="module")
def policy() -> Policy:
    actor = pi05.Pi05Actor(CONFIG, perturbed_params(CONFIG, seed=2, scale=0.1))
    tokenizer = PaligemmaTokenizer(checkpoints.path("pi05_small/tokenizer.model"), max_len=CONFIG.max_token_len)
    return make_libero_policy(actor, tokenizer=tokenizer, norm_stats={"state": _unit_stats(8), "actions": _unit_stats(7)},
                              num_steps=2)


class _NoCompute:
    """Stands in for the actor and the transforms: a call means a bad input got past the checks."""

    config = CONFIG

    def __getattr__(self, name: str):
        raise AssertionError(f"{name} was reached: the input should have been refused before any compute")

    def __call__(self, data):
        raise AssertionError("an input transform ran: the input should have been refused before any transform")


@pytest.fixture(scope="module")
def guarded() -> Policy:
    """A Policy whose actor and transforms fail the test when reached: what it refuses, it refuses first."""
    stub = _NoCompute()
    return Policy(stub, input_transform=stub, output_transform=stub, spec=ObservationSpec(state_dim=8))


def _obs(changes: dict | None = None, **named) -> dict:
    obs = libero_observation("put the bowl on the plate", seed=1)
    obs.update(changes or {}, **named)
    return {k: v for k, v in obs.items() if v is not _DROP}


_DROP = object()
IMAGE, WRIST, STATE = "observation/image", "observation/wrist_image", "observation/state"

# (case id, observation changes, the message's field, expected and found parts)
BAD_OBSERVATIONS = [
    ("nan_state", {STATE: np.array([0, np.nan, 0, 0, 0, 0, 0, np.nan], np.float32)},
     r"observation/state: expected a 1-D array of 8 finite numbers, found 2 NaN and 0 Inf of 8 values \(first at index \[1\]\)"),
    ("inf_state", {STATE: np.array([0, 0, 0, np.inf, 0, 0, 0, 0])},
     r"observation/state: expected a 1-D array of 8 finite numbers, found 0 NaN and 1 Inf"),
    ("short_state", {STATE: np.zeros(3, np.float32)},
     r"observation/state: expected a 1-D array of 8 finite numbers, found dtype float32 shape \[3\]"),
    ("long_state", {STATE: np.zeros(32, np.float32)}, r"observation/state: .* found dtype float32 shape \[32\]"),
    ("batched_state", {STATE: np.zeros((1, 8), np.float32)}, r"observation/state: .* found dtype float32 shape \[1, 8\]"),
    ("string_state", {STATE: "0 0 0 0 0 0 0 0"}, r"observation/state: expected a 1-D array .* found dtype <U15"),
    ("bool_state", {STATE: np.ones(8, bool)}, r"observation/state: .* found dtype bool shape \[8\]"),
    ("missing_state", {STATE: _DROP}, r"observation/state: expected the keys .* without \['observation/state'\]"),
    ("gray_image", {IMAGE: np.zeros((224, 224), np.uint8)},
     r"observation/image: expected an image of rank 3 with 3 colour channels, .* found dtype uint8 shape \[224, 224\]"),
    ("rgba_image", {IMAGE: np.zeros((224, 224, 4), np.uint8)}, r"observation/image: .*found dtype uint8 shape \[224, 224, 4\]"),
    ("video_image", {WRIST: np.zeros((2, 224, 224, 3), np.uint8)},
     r"observation/wrist_image: .*found dtype uint8 shape \[2, 224, 224, 3\]"),
    ("int64_image", {IMAGE: np.zeros((224, 224, 3), np.int64)},
     r"observation/image: expected uint8 \[h, w, 3\] \(or \[3, h, w\]\), or float in \[0, 1\], found dtype int64"),
    ("float_0_255_image", {IMAGE: np.full((224, 224, 3), 200.0)},
     r"observation/image: expected float pixels in \[0, 1\] .* found values in \[200, 200\]; send uint8"),
    ("nan_image", {WRIST: np.full((3, 64, 64), np.nan, np.float32)},
     r"observation/wrist_image: expected finite float pixels in \[0, 1\], found 12288 NaN"),
    ("empty_image", {IMAGE: np.zeros((0, 224, 3), np.uint8)}, rf"observation/image: expected image sides of 1..{MAX_IMAGE_SIDE}"),
    ("huge_image", {IMAGE: np.zeros((MAX_IMAGE_SIDE + 1, 2, 3), np.uint8)}, r"observation/image: expected image sides"),
    ("string_image", {IMAGE: "a picture"}, r"observation/image: .* found str of 9 characters"),
    ("empty_prompt", {"prompt": ""}, r"prompt: expected a non-empty str, found '', empty after openpi's cleaning"),
    ("blank_prompt", {"prompt": " _\n "}, r"prompt: expected a non-empty str, found ' _\\n ', empty"),
    ("number_prompt", {"prompt": 3}, r"prompt: expected a non-empty str, found a int"),
    ("typo_key", {"promt": "put the bowl on the plate", "prompt": _DROP},
     r"promt: expected a known key such as 'prompt', found unknown key 'promt'; did you mean 'prompt'\?"),
    ("case_typo_key", {"Observation/State": np.zeros(8, np.float32)},
     r"Observation/State: .*did you mean 'observation/state'\?"),
    ("option_typo_key", {"num_candidate": 4}, r"num_candidate: .*did you mean 'num_candidates'\?"),
    ("option_in_observation", {"noise": np.zeros(NOISE_SHAPE, np.float32)},
     r"noise: expected 'noise' as a keyword of infer\(obs, noise=...\)"),
    ("bytes_key", {b"prompt": "x"}, r"observation keys: expected str keys, found key b'prompt'"),
]


@pytest.mark.parametrize(("changes", "message"), [c[1:] for c in BAD_OBSERVATIONS], ids=[c[0] for c in BAD_OBSERVATIONS])
def test_each_bad_observation_is_refused_before_compute(guarded, changes, message):
    with pytest.raises(InvalidInputError, match=message):
        guarded.infer(_obs(changes))
    with pytest.raises(InvalidInputError, match=message):  # also inside a batch, named by its row
        guarded.infer_batch([_obs(), _obs(changes)])


def test_a_bad_row_of_a_batch_is_named_by_its_index(guarded):
    with pytest.raises(InvalidInputError, match=r"^observation 1: observation/state: expected"):
        guarded.infer_batch([_obs(), _obs(**{STATE: np.zeros(3)})])
    with pytest.raises(InvalidInputError, match=r"^observation: expected a dict, found a list"):
        guarded.infer([1, 2])


BAD_NOISE = [
    ("wrong_shape", np.zeros((10, 32), np.float32), r"noise: expected finite numbers of shape \[4, 8\], found dtype float32 shape \[10, 32\]"),
    ("nan", np.full(NOISE_SHAPE, np.nan, np.float32), r"noise: expected finite numbers of shape \[4, 8\], found 32 NaN and 0 Inf"),
    ("inf", np.where(np.eye(4, 8) > 0, np.inf, 0.0), r"noise: .* found 0 NaN and 4 Inf"),
    ("beyond_float32", np.full(NOISE_SHAPE, 1e300), r"noise: .* found 0 NaN and 32 Inf"),  # Inf once cast to float32
    ("strings", np.full(NOISE_SHAPE, "x"), r"noise: expected finite numbers of shape \[4, 8\], found dtype <U1"),
]


@pytest.mark.parametrize(("noise", "message"), [c[1:] for c in BAD_NOISE], ids=[c[0] for c in BAD_NOISE])
def test_bad_noise_is_refused_before_compute(guarded, noise, message):
    with pytest.raises(InvalidInputError, match=message):
        guarded.infer(_obs(), noise=noise)


def test_accepted_formats_reach_the_model(policy):
    """openpi's accepted forms: uint8 HWC, channels-first, float in [0, 1], jax arrays, any extra key that is no
    typo; an int state is fine too (numbers, not bools)."""
    noise = np.zeros(NOISE_SHAPE, np.float32)
    base = _obs()
    reference = policy.infer(base, noise=noise)["actions"]
    variants = {
        "channels_first": _obs(**{IMAGE: np.transpose(base[IMAGE], (2, 0, 1))}),
        "jax_arrays": _obs(**{IMAGE: jax.numpy.asarray(base[IMAGE]), STATE: jax.numpy.asarray(base[STATE])}),
        "extra_keys": _obs(**{"observation/left_image": base[IMAGE], "episode_id": 7}),
    }
    for name, obs in variants.items():
        np.testing.assert_array_equal(policy.infer(obs, noise=noise)["actions"], reference, err_msg=name)
    floats = _obs(**{IMAGE: base[IMAGE] / 255.0, WRIST: base[WRIST].astype(np.float32) / 255.0})
    assert np.isfinite(policy.infer(floats, noise=noise)["actions"]).all()
    assert np.isfinite(policy.infer(_obs(**{STATE: np.arange(8)}), noise=noise)["actions"]).all()


def test_an_overlong_prompt_is_truncated_with_a_warning(policy):
    noise = np.zeros(NOISE_SHAPE, np.float32)
    prompt = "put the bowl on the plate and then " * 20
    out = policy.infer(_obs(prompt=prompt), noise=noise)
    assert len(out["warnings"]) == 1
    assert "max_token_len 16; truncated to the first 16 tokens" in out["warnings"][0]
    # What was acted on is openpi's truncation: the first 16 tokens, the same as any prompt sharing them.
    same_start = policy.infer(_obs(prompt=prompt + "then stop"), noise=noise)
    np.testing.assert_array_equal(same_start["actions"], out["actions"])
    assert "warnings" not in policy.infer(_obs(), noise=noise)
    rows = policy.infer_batch([_obs(), _obs(prompt=prompt)], noise=np.zeros((2, *NOISE_SHAPE), np.float32))
    assert "warnings" not in rows[0] and len(rows[1]["warnings"]) == 1


def test_no_non_finite_action_is_returned(policy):
    """NaN parameters make NaN actions: infer, infer_batch and the agent (eval, train) raise instead of returning."""
    broken = copy.copy(policy)
    broken.actor = pi05.Pi05Actor(CONFIG, jax.tree.map(lambda x: x * np.nan, policy.actor.params))
    with pytest.raises(NonFiniteActionError, match=r"actions: expected finite values, found 28 NaN and 0 Inf of 28"):
        broken.infer(_obs())
    with pytest.raises(NonFiniteActionError, match=r"observation 0's \[4, 7\] chunk"):
        broken.infer_batch([_obs(), _obs()])
    with pytest.raises(NonFiniteActionError, match="actions: expected finite values"):
        Agent(broken, num_steps=2).act(None, _obs())


def test_eval_and_train_observations_pass_the_same_checks(policy):
    """The agent (what eval and train act through) reaches the model via `Policy.prepare`: the same refusals."""
    agent = Agent(policy, num_steps=2)
    with pytest.raises(InvalidInputError, match="observation/state: expected a 1-D array of 8 finite numbers"):
        agent.act(None, _obs(**{STATE: np.zeros(7, np.float32)}))
    with pytest.raises(InvalidInputError, match=r"noise: expected finite numbers of shape \[1, 1, 4, 8\], found 32 NaN"):
        agent.act(None, _obs(), noise=np.full((1, *NOISE_SHAPE), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match=r"^observation 1: prompt"):
        agent.act_batch(None, [_obs(), _obs(prompt="")])
    decision = agent.act(None, _obs(prompt="go " * 40))
    assert np.isfinite(decision.actions).all() and "truncated" in decision.warnings[0]
    # Training rows carry their action chunk: checked too.
    with pytest.raises(InvalidInputError, match="actions: expected a finite"):
        policy.to_training_batch([_obs(actions=np.full((4, 7), np.nan))])


def test_the_state_length_follows_the_norm_stats(policy):
    actor = policy.actor
    tokenizer = PaligemmaTokenizer(checkpoints.path("pi05_small/tokenizer.model"), max_len=CONFIG.max_token_len)
    six = make_libero_policy(actor, tokenizer=tokenizer, norm_stats={"state": _unit_stats(6), "actions": _unit_stats(7)})
    assert six.spec.state_dim == 6
    with pytest.raises(InvalidInputError, match=r"expected a 1-D array of 6 finite numbers, found dtype float32 shape \[8\]"):
        six.infer(_obs())


def test_typos_are_near_misses_not_other_names():
    assert edit_distance("promt", "prompt") == 1 and edit_distance("ab", "ba") == 1 and edit_distance("", "abc") == 3
    known = ObservationSpec().known_keys
    assert likely_typo("observation/imag", known) == "observation/image"
    assert likely_typo("observation-wrist-image", known) == "observation/wrist_image"
    assert likely_typo("return_score", known) == "return_scores"
    for other in ("observation/left_image", "episode_id", "seed", "task", "observation/joint_state", "prompt_id"):
        assert likely_typo(other, known) is None, other


def test_a_spec_refuses_a_zero_state_dim():
    with pytest.raises(ValueError, match="state_dim must be >= 1"):
        ObservationSpec(state_dim=0)
    check_observation(_obs(), dataclasses.replace(ObservationSpec(), state_dim=8))
