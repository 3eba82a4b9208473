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

Every input shape needs its own compiled XLA program for the JAX resize (about 2.5 MiB each on XLA:CPU). A
server resizes whatever image sizes its clients send, so a plain `jax.jit` cache would grow with every new
size a client chooses; here the compiled programs live in an LRU cache of `MAX_CACHED_PROGRAMS` entries
instead, and an evicted program's memory is freed (each is compiled from its own function object, so jax's
function-keyed tracing and lowering caches let go of it too, and the jnp/jax.image jits inside are traced
inline). A size outside the cache costs one compilation.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Compiled resize programs kept: LIBERO's two cameras and a few client sizes fit; an adversarial stream of new
# sizes costs compilations, never unbounded memory.
MAX_CACHED_PROGRAMS = 16
_ProgramKey = tuple[tuple[int, ...], str, int, int]  # input shape [b, h, w, c], dtype, target height, width
_programs: collections.OrderedDict[_ProgramKey, Callable[[jax.Array], jax.Array]] = collections.OrderedDict()
_programs_lock = threading.Lock()  # the serving worker and eval threads may resize concurrently


def cached_programs() -> int:
    """How many compiled resize programs are alive in the cache (at most `MAX_CACHED_PROGRAMS`)."""
    with _programs_lock:
        return len(_programs)


def _program(shape: tuple[int, ...], dtype: np.dtype, height: int, width: int) -> Callable[[jax.Array], jax.Array]:
    """The compiled CPU resize for `shape`/`dtype` -> (height, width), from the LRU cache or compiled now."""
    key = (shape, np.dtype(dtype).str, height, width)
    with _programs_lock:
        program = _programs.get(key)
        if program is not None:
            _programs.move_to_end(key)
            return program

    def resize(images: jax.Array) -> jax.Array:  # a fresh function per program: jax's caches keyed on it go with it
        # jax.image.resize, jnp.pad, jnp.round, ... are jits of their own with shapes static: traced from here they
        # would each keep a jaxpr per input shape in caches keyed on those (module-level, immortal) functions.
        # disable_jit traces their bodies inline instead: the same operations (XLA inlines nested calls anyway),
        # so all that a shape leaves behind is this evictable program.
        with jax.disable_jit():
            return _resize_with_pad_bhwc(images, height, width)

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        program = jax.jit(resize).lower(jax.ShapeDtypeStruct(shape, dtype)).compile()
    with _programs_lock:
        _programs[key] = program
        _programs.move_to_end(key)
        while len(_programs) > MAX_CACHED_PROGRAMS:
            _programs.popitem(last=False)
    return program


def _resize_with_pad_bhwc(images: jax.Array, height: int, width: int) -> jax.Array:
    """images [b, h, w, c] uint8 or float32 -> [b, height, width, c] of the same dtype (traced by `_program`)."""
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


def _needs_resize(images: np.ndarray, height: int, width: int) -> bool:
    """The checks both resizes share: a positive target, non-empty images; False when already at the target."""
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if images.shape[-3:-1] == (height, width):
        return False
    if 0 in images.shape[-3:-1]:
        raise ValueError(f"cannot resize an empty image of shape {images.shape}")
    return True


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
    if not _needs_resize(images, height, width):
        return images

    lead_shape = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    program = _program(flat.shape, flat.dtype, height, width)
    out = np.asarray(program(jax.device_put(flat, jax.devices("cpu")[0])))
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
    if not _needs_resize(images, height, width):
        return images
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
