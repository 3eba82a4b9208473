"""Image resizing and scaling exactly as openpi feeds images to π0.5.

openpi resizes in two places, with two different functions:

- the model side: `resize_with_pad` reproduces `openpi.shared.image_tools.resize_with_pad` (the JAX one that
  openpi's input transforms and the model's `preprocess_observation` apply): an antialiased bilinear
  `jax.image.resize` to the largest size that fits, then centred padding (black: 0 for uint8, -1.0 for float
  images in [-1, 1]). The resize runs on the CPU so that results are bit-identical to openpi's CPU goldens
  whatever accelerator is attached.
- the client side: `resize_with_pad_pil` reproduces `openpi_client.image_tools.resize_with_pad`, which
  openpi's LIBERO client (examples/libero/main.py) applies to the 256² renders before sending them (to 224²):
  PIL's bilinear resize, pasted on black at PIL's offsets. Its pixels differ from the JAX resize's by a few
  levels (another filter support, 8-bit fixed-point arithmetic); `faster-vla eval --protocol openpi` uses it.

Both are checked against goldens of openpi's own functions (tests/test_image_tools.py, tests/test_resize_parity.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize_with_pad_bhwc(images: jax.Array, height: int, width: int) -> jax.Array:
    """images [b, h, w, c] uint8 or float32 -> [b, height, width, c] of the same dtype."""
    cur_height, cur_width = images.shape[1:3]
    ratio = max(cur_width / width, cur_height / height)
    resized_height = int(cur_height / ratio)
    resized_width = int(cur_width / ratio)
    resized = jax.image.resize(
        images, (images.shape[0], resized_height, resized_width, images.shape[3]), method="linear"
    )
    if images.dtype == jnp.uint8:
        resized = jnp.round(resized).clip(0, 255).astype(jnp.uint8)
        pad_value = 0
    else:
        resized = resized.clip(-1.0, 1.0)
        pad_value = -1.0
    pad_top, extra_h = divmod(height - resized_height, 2)
    pad_left, extra_w = divmod(width - resized_width, 2)
    return jnp.pad(
        resized,
        ((0, 0), (pad_top, pad_top + extra_h), (pad_left, pad_left + extra_w), (0, 0)),
        constant_values=pad_value,
    )


def resize_with_pad(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes images [..., h, w, c] to [..., height, width, c] without distortion, padding with black.

    Accepts uint8 images or float32 images in [-1, 1] (openpi supports exactly these two dtypes); any
    number of leading batch dimensions, including none. Images already at the target size are returned
    unchanged (the resize would be the identity anyway).
    """
    images = np.asarray(images)
    if images.dtype not in (np.uint8, np.float32):
        raise ValueError(f"resize_with_pad expects uint8 or float32 images, got dtype {images.dtype}")
    if images.ndim < 3:
        raise ValueError(f"resize_with_pad expects images shaped [..., h, w, c], got shape {images.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if images.shape[-3:-1] == (height, width):
        return images
    if 0 in images.shape[-3:-1]:
        raise ValueError(f"cannot resize an empty image of shape {images.shape}")

    lead_shape = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    with jax.default_device(jax.devices("cpu")[0]):
        out = np.asarray(_resize_with_pad_bhwc(jnp.asarray(flat), height, width))
    return out.reshape(*lead_shape, *out.shape[1:])


def to_model_image(images: np.ndarray) -> np.ndarray:
    """uint8 images in [0, 255] -> float32 in [-1, 1], computed as openpi does (x / 255 * 2 - 1 in float32)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"to_model_image expects uint8 images, got dtype {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def resize_with_pad_pil(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi's client-side resize (`openpi_client.image_tools.resize_with_pad`, PIL bilinear): uint8 images
    [..., h, w, c] -> [..., height, width, c], pixel for pixel what openpi's LIBERO client sends.

    Each image is resized with PIL to the largest size that fits (the same sizes as `resize_with_pad`), then
    pasted on a black image at (int((width - w) / 2), int((height - h) / 2)), as openpi_client does. Images
    already at the target size are returned unchanged. Needs Pillow (a faster-vla dependency).
    """
    from PIL import Image  # noqa: PLC0415 - only the client-side path needs PIL

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"resize_with_pad_pil expects uint8 images (what openpi's client sends), got dtype "
                         f"{images.dtype}")
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"resize_with_pad_pil expects RGB images shaped [..., h, w, 3], got shape {images.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if images.shape[-3:-1] == (height, width):
        return images
    if 0 in images.shape[-3:-1]:
        raise ValueError(f"cannot resize an empty image of shape {images.shape}")
    cur_height, cur_width = images.shape[-3:-1]
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    top, left = max(0, int((height - resized_height) / 2)), max(0, int((width - resized_width) / 2))
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.zeros((flat.shape[0], height, width, 3), dtype=np.uint8)
    for i, image in enumerate(flat):
        resized = Image.fromarray(image).resize((resized_width, resized_height), resample=Image.BILINEAR)
        out[i, top:top + resized_height, left:left + resized_width] = np.asarray(resized)
    return out.reshape(*images.shape[:-3], *out.shape[1:])
