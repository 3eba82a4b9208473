"""resize_with_pad / to_model_image against openpi's goldens, plus shape, padding and error checks."""

import collections
import gc

import jax
import numpy as np
import pytest

from faster_vla.policies import image_tools
from faster_vla.policies.image_tools import resize_with_pad, to_model_image


@pytest.fixture(scope="module")
def goldens(openpi_fixtures):
    with np.load(openpi_fixtures / "misc_goldens.npz") as data:
        return {k: data[k] for k in data.files if k.startswith("resize_with_pad/")}


def test_float_golden(goldens):
    out = resize_with_pad(goldens["resize_with_pad/in_f32"], 224, 224)
    expected = goldens["resize_with_pad/out_f32_224"]
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_uint8_golden(goldens):
    # The resize runs in float32 and rounds to uint8, so a value within float32 rounding of .5 may round either
    # way, and XLA:CPU's float32 rounding depends on the jaxlib release and on the processor (kernel choice).
    # openpi's golden (jaxlib 0.5.3) matched bit for bit here on jaxlib 0.7.1 and 0.11.2 (2-core EPYC), but a
    # probe with jaxlib 0.8.3+ on another machine had 6 of the 150,528 pixels 1 off. So: every pixel within 1
    # of the golden, and at most 1 in 10,000 pixels off at all (a real resize or padding error moves
    # thousands, and by more than 1).
    out = resize_with_pad(goldens["resize_with_pad/in_u8"], 224, 224)
    expected = goldens["resize_with_pad/out_u8_224"]
    assert out.dtype == np.uint8 and out.shape == expected.shape
    diff = np.abs(out.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (expected <= 1)"
    off = int(np.count_nonzero(diff))
    assert off <= expected.size // 10_000, f"{off} of {expected.size} pixels differ from openpi's (expected <= {expected.size // 10_000})"


def test_unbatched_and_extra_leading_dims_match_batched(goldens):
    images = goldens["resize_with_pad/in_f32"]
    batched = resize_with_pad(images, 224, 224)
    # One image is a batch of 1: another XLA program, whose kernels depend on the processor (on a 2-core EPYC
    # without AVX-512, 569 of 150,528 values differed by 6e-8), so float32 rounding of values in [-1, 1].
    np.testing.assert_allclose(resize_with_pad(images[1], 224, 224), batched[1], rtol=0, atol=1e-6)
    nested = resize_with_pad(images[:, None], 224, 224)
    assert nested.shape == (2, 1, 224, 224, 3)
    # Extra leading dims are reshaped away before the resize: the very same program and input, bit for bit.
    np.testing.assert_array_equal(nested[:, 0], batched)


def test_padding_is_centred_black():
    tall = np.full((200, 90, 3), 200, dtype=np.uint8)  # -> 224 x 100, 62 columns of padding left, 62 right
    out = resize_with_pad(tall, 224, 224)
    assert out.shape == (224, 224, 3)
    assert (out[:, :62] == 0).all() and (out[:, 162:] == 0).all()
    assert (out[:, 62:162] == 200).all()

    wide = np.zeros((120, 160, 3), dtype=np.float32)  # -> 168 x 224, 28 rows of padding top and bottom
    out = resize_with_pad(wide, 224, 224)
    assert (out[:28] == -1.0).all() and (out[196:] == -1.0).all()
    assert (out[28:196] == 0.0).all()


def test_odd_padding_puts_extra_row_at_bottom():
    out = resize_with_pad(np.full((1, 10, 3), 7, dtype=np.uint8), 4, 10)  # -> 1 x 10, pad 1 top, 2 bottom
    assert out.shape == (4, 10, 3)
    assert (out[0] == 0).all() and (out[1] == 7).all() and (out[2:] == 0).all()


def test_target_size_is_returned_unchanged():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_with_pad(image, 224, 224), image)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint16])
def test_rejects_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="uint8 or float32"):
        resize_with_pad(np.zeros((8, 8, 3), dtype=dtype), 4, 4)


def test_rejects_missing_channel_axis():
    with pytest.raises(ValueError, match=r"\[\.\.\., h, w, c\]"):
        resize_with_pad(np.zeros((8, 8), dtype=np.uint8), 4, 4)


def test_to_model_image_matches_openpi_float32_arithmetic(openpi_fixtures):
    # tiny_a's images are openpi's uint8 -> [-1, 1] conversion of uint8 pictures; recover the uint8 and redo it.
    with np.load(openpi_fixtures / "tiny_a_inputs.npz") as data:
        expected = data["images/base_0_rgb"]
    as_uint8 = np.round((expected.astype(np.float64) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    out = to_model_image(as_uint8)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_to_model_image_range_and_errors():
    out = to_model_image(np.array([0, 255], dtype=np.uint8))
    np.testing.assert_array_equal(out, np.array([-1.0, 1.0], dtype=np.float32))
    with pytest.raises(ValueError, match="expects uint8"):
        to_model_image(np.zeros(3, dtype=np.float32))


def test_compiled_programs_are_bounded_whatever_sizes_clients_send(monkeypatch):
    """Each input size needs its own compiled program (~2.5 MiB on XLA:CPU); a server resizes whatever sizes its
    clients send, so the programs live in an LRU cache and an evicted one is freed, not kept by jax's caches."""
    monkeypatch.setattr(image_tools, "MAX_CACHED_PROGRAMS", 2)
    monkeypatch.setattr(image_tools, "_programs", collections.OrderedDict())
    gc.collect()
    before = sum(isinstance(o, jax.stages.Compiled) for o in gc.get_objects())
    for side in range(20, 25):  # 5 sizes through a cache of 2
        out = resize_with_pad(np.full((side, side + 1, 3), 9, np.uint8), 16, 16)
        assert out.shape == (16, 16, 3)
    kept = image_tools._programs[((1, 24, 25, 3), "|u1", 16, 16)]
    resize_with_pad(np.zeros((24, 25, 3), np.uint8), 16, 16)  # a size in the cache is not compiled again
    assert image_tools._programs[((1, 24, 25, 3), "|u1", 16, 16)] is kept
    assert image_tools.cached_programs() == 2
    gc.collect()
    assert sum(isinstance(o, jax.stages.Compiled) for o in gc.get_objects()) == before + 2
