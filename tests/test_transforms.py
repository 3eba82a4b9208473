"""pi05_libero data transforms: openpi goldens for TokenizePrompt / PadStatesAndActions, and the LIBERO mapping."""

import copy

import numpy as np
import pytest

from faster_vla.policies.config import IMAGE_KEYS
from faster_vla.policies.normalize import NormStats, normalize_quantile, unnormalize_quantile
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from faster_vla.policies.transforms import (
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    PadStatesAndActions,
    ResizeImages,
    TokenizePrompt,
    Unnormalize,
    compose,
)
from tests.openpi_golden import GOLDEN_PROMPT


@pytest.fixture(scope="module")
def tokenizer(openpi_fixtures):
    return PaligemmaTokenizer(openpi_fixtures / "tiny_spm_tokenizer.model", max_len=64)


def _libero_obs(seed: int = 0, size: int = 224) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": "put the bowl on the plate",
    }


def _norm_stats() -> dict[str, NormStats]:
    rng = np.random.default_rng(7)

    def one(dim):
        q01 = rng.uniform(-2.0, -0.5, dim)
        return NormStats(mean=rng.normal(size=dim), std=rng.uniform(0.5, 1.5, dim), q01=q01, q99=q01 + 2.5)

    return {"state": one(8), "actions": one(7)}


def _assert_tree_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_tokenize_prompt_golden(goldens, tokenizer):
    # The golden was made with the 7-D head of tokenizer/state (its text shows 7 bins).
    data = {"prompt": GOLDEN_PROMPT, "state": goldens["tokenizer/state"][:7]}
    out = TokenizePrompt(tokenizer, discrete_state_input=True)(data)
    np.testing.assert_array_equal(out["tokenized_prompt"], goldens["transforms/tokenized_prompt"])
    np.testing.assert_array_equal(out["tokenized_prompt_mask"], goldens["transforms/tokenized_prompt_mask"])
    assert "prompt" not in out and "prompt" in data
    np.testing.assert_array_equal(out["state"], data["state"])


def test_tokenize_prompt_without_state(goldens, tokenizer):
    out = TokenizePrompt(tokenizer)({"prompt": np.asarray(GOLDEN_PROMPT), "state": np.zeros(8)})
    np.testing.assert_array_equal(out["tokenized_prompt"], goldens["tokenizer/no_state_tokens"])


def test_tokenize_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="missing key 'prompt'"):
        TokenizePrompt(tokenizer)({"state": np.zeros(8)})
    with pytest.raises(ValueError, match="needs key 'state'"):
        TokenizePrompt(tokenizer, discrete_state_input=True)({"prompt": "pick"})
    with pytest.raises(ValueError, match="str or 0-d string array"):
        TokenizePrompt(tokenizer)({"prompt": np.array(["a", "b"])})


def test_pad_states_and_actions_golden(goldens):
    data = {"state": goldens["tokenizer/state"], "actions": np.ones((4, 7), dtype=np.float32)}
    out = PadStatesAndActions(32)(data)
    np.testing.assert_array_equal(out["state"], goldens["transforms/state_padded"])
    np.testing.assert_array_equal(out["actions"], goldens["transforms/actions_padded"])
    assert out["state"].dtype == np.float32 and data["state"].shape == (8,)


def test_pad_states_without_actions_and_errors():
    out = PadStatesAndActions(32)({"state": np.ones(32)})
    assert out["state"].shape == (32,) and "actions" not in out
    with pytest.raises(ValueError, match="exceeds the model action dim 32"):
        PadStatesAndActions(32)({"state": np.ones(33)})
    with pytest.raises(ValueError, match="missing key 'state'"):
        PadStatesAndActions(32)({"actions": np.ones((4, 7))})


def test_libero_inputs_mapping():
    obs = _libero_obs()
    out = LiberoInputs()(obs)
    assert set(out) == {"state", "image", "image_mask", "prompt"}
    assert tuple(out["image"]) == IMAGE_KEYS == tuple(out["image_mask"])
    np.testing.assert_array_equal(out["image"]["base_0_rgb"], obs["observation/image"])
    np.testing.assert_array_equal(out["image"]["left_wrist_0_rgb"], obs["observation/wrist_image"])
    right = out["image"]["right_wrist_0_rgb"]
    assert right.dtype == np.uint8 and right.shape == (224, 224, 3) and not right.any()
    assert [bool(out["image_mask"][k]) for k in IMAGE_KEYS] == [True, True, False]
    np.testing.assert_array_equal(out["state"], obs["observation/state"])
    assert out["prompt"] == obs["prompt"]
    with_actions = LiberoInputs()({**obs, "actions": np.zeros((10, 7))})
    assert with_actions["actions"].shape == (10, 7)


def test_libero_inputs_converts_lerobot_float_chw_like_openpi():
    chw = np.zeros((3, 4, 5), dtype=np.float32)
    chw[0] = 0.999  # 255 * 0.999 = 254.745 -> 254 (truncation, not rounding)
    chw[2] = 1.0
    obs = {**_libero_obs(), "observation/image": chw}
    image = LiberoInputs()(obs)["image"]["base_0_rgb"]
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    np.testing.assert_array_equal(image[0, 0], [254, 0, 255])


def test_libero_inputs_errors():
    obs = _libero_obs()
    del obs["observation/wrist_image"]
    with pytest.raises(ValueError, match="missing key 'observation/wrist_image'; expected keys") as info:
        LiberoInputs()(obs)
    assert "observation/state" in str(info.value)
    with pytest.raises(ValueError, match=r"expected one uint8 \[h, w, 3\] image"):
        LiberoInputs()({**_libero_obs(), "observation/image": np.zeros((224, 224, 3), dtype=np.int32)})
    with pytest.raises(ValueError, match=r"expected one uint8 \[h, w, 3\] image"):
        LiberoInputs()({**_libero_obs(), "observation/image": np.zeros((2, 224, 224, 3), dtype=np.uint8)})
    with pytest.raises(ValueError, match="must be 1-D"):
        LiberoInputs()({**_libero_obs(), "observation/state": np.zeros((1, 8))})


def test_normalize_and_unnormalize():
    stats = _norm_stats()
    data = {"state": np.arange(8, dtype=np.float32) / 8, "actions": np.ones((10, 7)), "other": np.zeros(3)}
    out = Normalize(stats)(data)
    np.testing.assert_array_equal(out["state"], normalize_quantile(data["state"], stats["state"]))
    np.testing.assert_array_equal(out["actions"], normalize_quantile(data["actions"], stats["actions"]))
    assert out["other"] is data["other"]
    back = Unnormalize(stats)(out)
    np.testing.assert_allclose(back["state"], data["state"], atol=1e-6)
    np.testing.assert_allclose(back["actions"], data["actions"], atol=1e-6)
    z = Normalize(stats, use_quantiles=False)(data)
    np.testing.assert_array_equal(z["state"], (data["state"] - stats["state"].mean) / (stats["state"].std + 1e-6))


def test_normalize_missing_keys():
    stats = _norm_stats()
    out = Normalize(stats)({"state": np.zeros(8)})  # not strict: absent actions are skipped
    assert set(out) == {"state"}
    with pytest.raises(ValueError, match="Normalize: missing key 'actions'"):
        Normalize(stats, strict=True)({"state": np.zeros(8)})
    with pytest.raises(ValueError, match="Unnormalize: missing key 'state'"):
        Unnormalize(stats)({"actions": np.zeros((10, 32))})
    with pytest.raises(ValueError, match="'actions' has none"):
        Normalize({"actions": NormStats(mean=[0.0], std=[1.0])})
    with pytest.raises(ValueError, match="Normalize: 'state': cannot normalise 9 dims"):
        Normalize(stats)({"state": np.zeros(9)})


def test_normalize_nested_path():
    stats = {"image/base_0_rgb": NormStats(mean=[1.0], std=[1.0], q01=[0.0], q99=[2.0])}
    data = {"image": {"base_0_rgb": np.array([1.0]), "left_wrist_0_rgb": np.array([5.0])}}
    out = Normalize(stats)(data)
    np.testing.assert_allclose(out["image"]["base_0_rgb"], [0.0], atol=1e-6)
    np.testing.assert_array_equal(data["image"]["base_0_rgb"], [1.0])
    assert out["image"]["left_wrist_0_rgb"] is data["image"]["left_wrist_0_rgb"]


def test_resize_images():
    data = {"image": {"base_0_rgb": np.zeros((256, 128, 3), dtype=np.uint8), "x": np.ones((224, 224, 3), np.uint8)}}
    out = ResizeImages(224, 224)(data)
    assert out["image"]["base_0_rgb"].shape == (224, 224, 3)
    assert out["image"]["x"] is data["image"]["x"]
    assert data["image"]["base_0_rgb"].shape == (256, 128, 3)
    with pytest.raises(ValueError, match="ResizeImages: image 'base_0_rgb': .*uint8 or float32"):
        ResizeImages()({"image": {"base_0_rgb": np.zeros((8, 8, 3), dtype=np.float64)}})
    with pytest.raises(ValueError, match="missing key 'image'"):
        ResizeImages()({})


def test_libero_outputs():
    actions = np.random.default_rng(0).normal(size=(10, 32))
    out = LiberoOutputs()({"actions": actions, "state": np.zeros(32)})
    assert set(out) == {"actions"}
    np.testing.assert_array_equal(out["actions"], actions[:, :7])
    with pytest.raises(ValueError, match="missing key 'actions'"):
        LiberoOutputs()({"state": np.zeros(32)})


def test_pi05_libero_pipeline_end_to_end(tokenizer):
    stats = _norm_stats()
    inputs = compose(
        LiberoInputs(),
        Normalize(stats),
        ResizeImages(224, 224),
        TokenizePrompt(tokenizer, discrete_state_input=False),
        PadStatesAndActions(32),
    )
    obs = _libero_obs(size=256)
    snapshot = copy.deepcopy(obs)
    model_in = inputs(obs)
    _assert_tree_equal(obs, snapshot)  # no transform touched its input

    assert set(model_in) == {"state", "image", "image_mask", "tokenized_prompt", "tokenized_prompt_mask"}
    for key in IMAGE_KEYS:
        assert model_in["image"][key].shape == (224, 224, 3) and model_in["image"][key].dtype == np.uint8
    expected_state = normalize_quantile(obs["observation/state"], stats["state"])
    np.testing.assert_array_equal(model_in["state"][:8], expected_state)
    assert model_in["state"].shape == (32,) and not model_in["state"][8:].any()
    expected_tokens, _ = tokenizer.tokenize(obs["prompt"])
    np.testing.assert_array_equal(model_in["tokenized_prompt"], expected_tokens)

    outputs = compose(Unnormalize(stats), LiberoOutputs())
    model_out = {"state": model_in["state"], "actions": np.random.default_rng(1).uniform(-1, 1, (10, 32))}
    snapshot = copy.deepcopy(model_out)
    result = outputs(model_out)
    _assert_tree_equal(model_out, snapshot)
    assert result["actions"].shape == (10, 7)
    expected_actions = unnormalize_quantile(model_out["actions"][:, :7], stats["actions"])
    np.testing.assert_array_equal(result["actions"], expected_actions)
