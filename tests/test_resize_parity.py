"""Resize parity on the paths LIBERO images take, against openpi's own functions.

Goldens (tests/goldens/openpi_resize.npz, written by benchmarks/make_resize_goldens.py from openpi's code at
commit 15a9616 and openpi_client 0.1.2): openpi's client-side resize (openpi_client.image_tools, PIL) of 256²
renders to 224², what its LIBERO client sends; openpi's model-side resize (openpi.shared.image_tools, JAX) from
256² to 224² and 112², and from the client's 224² to 112² (the built-in 112² model behind openpi's client).

Our client-side path (`resize_with_pad_pil`, `faster-vla eval --protocol openpi`) must equal openpi_client's
bit for bit: it calls the same PIL resize. Our model-side path (`resize_with_pad`, the input transforms and the
env's default resize) runs openpi's float32 XLA program, whose rounding to uint8 can differ by 1 at a value
within float32 rounding of .5 on another jaxlib or processor: every pixel within 1 of openpi's, and every
pixel that differs a tie (its float value within 1e-4 of .5).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from faster_vla.policies.image_tools import resize_with_pad, resize_with_pad_pil
from faster_vla.policies.transforms import LiberoInputs, ResizeImages

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens" / "openpi_resize.npz"


def _generator():
    spec = importlib.util.spec_from_file_location("make_resize_goldens", ROOT / "benchmarks" / "make_resize_goldens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def goldens() -> dict[str, np.ndarray]:
    with np.load(GOLDENS) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def renders() -> np.ndarray:
    """[2, 256, 256, 3] uint8: the goldens' inputs, rebuilt from fixed RandomState streams."""
    return _generator().inputs()


TIE = 1e-4  # |value - .5| of a float32 resize of 0..255 pixels that rounding may send either way (~255 × 2e-7)


def _unrounded(images: np.ndarray, size: int) -> np.ndarray:
    """The float32 values a square uint8 -> size² resize rounds (no padding for square images)."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32)
    return np.asarray(jax.image.resize(x, (*x.shape[:-3], size, size, x.shape[-1]), method="linear"))


def _assert_close_uint8(out: np.ndarray, expected: np.ndarray, source: np.ndarray) -> None:
    """Equal to openpi's, except pixels whose float value is a tie (within float32 rounding of .5): another
    jaxlib may round those either way (jax 0.11.2 rounds 318 of 75,264 pixels of these noise renders at 256² ->
    112² the other way from the 0.7.1 the goldens were made with, each within 5e-5 of .5)."""
    assert out.dtype == np.uint8 and out.shape == expected.shape
    diff = np.abs(out.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (expected <= 1)"
    values = _unrounded(source, out.shape[-2])
    off_ties = np.abs(values - np.floor(values) - 0.5)[diff > 0]
    assert np.all(off_ties < TIE), f"{int(np.sum(off_ties >= TIE))} pixels differ from openpi's without a tie " \
                                   f"(float value {off_ties.max():.2e} from .5)"


def test_goldens_are_openpis(goldens: dict[str, np.ndarray], renders: np.ndarray) -> None:
    provenance = json.loads(str(goldens["provenance"]))
    assert provenance["openpi_commit"].startswith("15a9616") and provenance["openpi_client"] == "0.1.2"
    assert goldens["client_pil/256_to_224"].shape == (2, 224, 224, 3)
    assert goldens["model_jax/client224_to_112"].shape == (2, 112, 112, 3)
    assert renders.shape == (2, 256, 256, 3) and renders.dtype == np.uint8


def test_client_side_256_to_224_is_openpi_clients(goldens: dict[str, np.ndarray], renders: np.ndarray) -> None:
    np.testing.assert_array_equal(resize_with_pad_pil(renders, 224, 224), goldens["client_pil/256_to_224"])
    np.testing.assert_array_equal(resize_with_pad_pil(renders[1], 224, 224), goldens["client_pil/256_to_224"][1])


def test_model_side_paths_are_openpis(goldens: dict[str, np.ndarray], renders: np.ndarray) -> None:
    _assert_close_uint8(resize_with_pad(renders, 224, 224), goldens["model_jax/256_to_224"], renders)
    _assert_close_uint8(resize_with_pad(renders, 112, 112), goldens["model_jax/256_to_112"], renders)
    _assert_close_uint8(resize_with_pad(goldens["client_pil/256_to_224"], 112, 112),
                        goldens["model_jax/client224_to_112"], goldens["client_pil/256_to_224"])


def test_openpi_client_path_through_the_policy_inputs(goldens: dict[str, np.ndarray]) -> None:
    """What a served 112² model (or `eval --protocol openpi`) feeds its encoder: the client's 224² images through
    the policy's LIBERO input transforms, as openpi's server applies them."""
    client = goldens["client_pil/256_to_224"]
    data = LiberoInputs()({"observation/image": client[0], "observation/wrist_image": client[1],
                           "observation/state": np.zeros(8, np.float32), "prompt": "turn on the stove"})
    images = ResizeImages(112, 112)(data)["image"]
    _assert_close_uint8(np.stack([images["base_0_rgb"], images["left_wrist_0_rgb"]]),
                        goldens["model_jax/client224_to_112"], client)


def test_the_two_resizes_differ(goldens: dict[str, np.ndarray]) -> None:
    """Why the openpi protocol resizes with PIL: openpi's client and model resizes are different functions."""
    diff = np.abs(goldens["client_pil/256_to_224"].astype(np.int16) - goldens["model_jax/256_to_224"])
    assert np.count_nonzero(diff) > 1000


@pytest.mark.parametrize("shape,size", [((256, 256, 3), (224, 224)), ((3, 224, 224, 3), (112, 112)),
                                        ((200, 90, 3), (224, 224)), ((1, 2, 120, 161, 3), (224, 224)),
                                        ((7, 13, 3), (5, 9)), ((224, 224, 3), (224, 224))])
def test_client_side_matches_openpi_client_live(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    image_tools = pytest.importorskip(
        "openpi_client.image_tools", reason="openpi's client is the reference: pip install --no-deps openpi-client==0.1.2")
    images = np.random.RandomState(sum(shape)).randint(0, 256, size=shape).astype(np.uint8)
    out = resize_with_pad_pil(images, *size)
    expected = image_tools.resize_with_pad(images, *size)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_client_side_errors() -> None:
    with pytest.raises(ValueError, match="expects uint8 images"):
        resize_with_pad_pil(np.zeros((8, 8, 3), np.float32), 4, 4)
    with pytest.raises(ValueError, match=r"RGB images shaped \[\.\.\., h, w, 3\]"):
        resize_with_pad_pil(np.zeros((8, 8), np.uint8), 4, 4)
    with pytest.raises(ValueError, match="must be positive"):
        resize_with_pad_pil(np.zeros((8, 8, 3), np.uint8), 0, 4)
