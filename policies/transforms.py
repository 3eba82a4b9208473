"""openpi's data transforms for pi05_libero, as small composable functions on one observation (no batch dim).

openpi's policy applies, in order:
    inputs:  LiberoInputs -> Normalize(quantile) -> ResizeImages(224, 224) -> TokenizePrompt -> PadStatesAndActions
    outputs: Unnormalize(quantile) -> LiberoOutputs
Each transform is a frozen dataclass mapping a dict of numpy arrays to a new dict; unlike openpi's, none of
them modifies its input. Nested keys of the norm stats use '/' paths, as openpi's flattened dicts do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from faster_vla.policies.config import IMAGE_KEYS
from faster_vla.policies.image_tools import resize_with_pad
from faster_vla.policies.normalize import (
    NormStats,
    normalize_quantile,
    normalize_zscore,
    unnormalize_quantile,
    unnormalize_zscore,
)
from faster_vla.policies.tokenizer import PaligemmaTokenizer

LIBERO_IMAGE_KEY = "observation/image"
LIBERO_WRIST_IMAGE_KEY = "observation/wrist_image"
LIBERO_STATE_KEY = "observation/state"
LIBERO_INPUT_KEYS: tuple[str, ...] = (LIBERO_IMAGE_KEY, LIBERO_WRIST_IMAGE_KEY, LIBERO_STATE_KEY)
LIBERO_ACTION_DIM = 7  # xyz delta, axis-angle delta, gripper

DataDict = dict[str, Any]
WARNINGS_KEY = "warnings"  # a transform's notes for the caller (a truncated prompt), list[str]


class Transform(Protocol):
    def __call__(self, data: DataDict) -> DataDict: ...


def _require(data: Mapping[str, Any], key: str, expected: tuple[str, ...], where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where}: missing key {key!r}; expected keys {list(expected)}, got {sorted(data)}")
    return data[key]


@dataclasses.dataclass(frozen=True)
class Compose:
    """Applies transforms left to right."""

    transforms: tuple[Transform, ...]

    def __call__(self, data: DataDict) -> DataDict:
        for transform in self.transforms:
            data = transform(data)
        return data


def compose(*transforms: Transform) -> Compose:
    """compose(a, b, c)(x) == c(b(a(x)))."""
    return Compose(tuple(transforms))


def parse_libero_image(image: np.ndarray, key: str) -> np.ndarray:
    """LIBERO image -> uint8 [h, w, 3], converting as openpi's LIBERO policy does.

    LeRobot stores float32 [3, h, w] in [0, 1]: floats become uint8 via (255 * x).astype(uint8) (truncation,
    no clipping, as openpi), and a leading axis of size 3 is taken as channels-first.
    """
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = (255 * image).astype(np.uint8)
    if image.ndim == 3 and image.shape[0] == 3:
        image = np.transpose(image, (1, 2, 0))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"{key}: expected one uint8 [h, w, 3] image (or float [3, h, w] in [0, 1]), "
            f"got dtype {image.dtype} shape {image.shape}"
        )
    return image


@dataclasses.dataclass(frozen=True)
class LiberoInputs:
    """openpi LIBERO observation -> π0.5 model dict (agentview -> base, wrist -> left wrist, right wrist empty)."""

    def __call__(self, data: DataDict) -> DataDict:
        where = "LiberoInputs"
        base = parse_libero_image(_require(data, LIBERO_IMAGE_KEY, LIBERO_INPUT_KEYS, where), LIBERO_IMAGE_KEY)
        wrist = parse_libero_image(
            _require(data, LIBERO_WRIST_IMAGE_KEY, LIBERO_INPUT_KEYS, where), LIBERO_WRIST_IMAGE_KEY
        )
        state = np.asarray(_require(data, LIBERO_STATE_KEY, LIBERO_INPUT_KEYS, where))
        if state.ndim != 1:
            raise ValueError(f"{where}: {LIBERO_STATE_KEY} must be 1-D (one observation), got shape {state.shape}")
        base_key, left_key, right_key = IMAGE_KEYS
        out: DataDict = {
            "state": state,
            "image": {base_key: base, left_key: wrist, right_key: np.zeros_like(base)},
            # π0.5 masks padding cameras (only π0-FAST keeps them visible).
            "image_mask": {base_key: np.True_, left_key: np.True_, right_key: np.False_},
        }
        if "actions" in data:
            out["actions"] = np.asarray(data["actions"])
        if "prompt" in data:
            out["prompt"] = data["prompt"]
        return out


@dataclasses.dataclass(frozen=True)
class LiberoOutputs:
    """Model outputs -> LIBERO actions: the first 7 of the padded action dims (all other keys are dropped)."""

    def __call__(self, data: DataDict) -> DataDict:
        actions = np.asarray(_require(data, "actions", ("actions",), "LiberoOutputs"))
        return {"actions": np.asarray(actions[..., :LIBERO_ACTION_DIM])}


def _get_path(data: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = data
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_path(data: DataDict, path: str, value: Any) -> DataDict:
    """Copy of data with data[path] = value, copying only the dicts along the '/' path."""
    head, _, rest = path.partition("/")
    out = dict(data)
    out[head] = _set_path(data[head], rest, value) if rest else value
    return out


def _check_quantiles(norm_stats: Mapping[str, NormStats] | None) -> None:
    for key, stats in (norm_stats or {}).items():
        if not stats.has_quantiles:
            raise ValueError(f"quantile normalisation needs q01 and q99, but norm stats {key!r} has none")


def _apply_stats(
    data: DataDict,
    norm_stats: Mapping[str, NormStats],
    fn: Callable[[np.ndarray, NormStats], np.ndarray],
    strict: bool,
    where: str,
) -> DataDict:
    out = data
    for key, stats in norm_stats.items():
        found, value = _get_path(data, key)
        if not found:
            if strict:
                raise ValueError(
                    f"{where}: missing key {key!r} (norm stats cover {list(norm_stats)}); got {sorted(data)}"
                )
            continue
        try:
            out = _set_path(out, key, fn(np.asarray(value), stats))
        except ValueError as exc:
            raise ValueError(f"{where}: {key!r}: {exc}") from exc
    return out


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Normalises the keys that have stats (quantile for π0.5); strict=True makes every stats key required."""

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        if self.use_quantiles:
            _check_quantiles(self.norm_stats)

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        fn = normalize_quantile if self.use_quantiles else normalize_zscore
        return _apply_stats(data, self.norm_stats, fn, self.strict, "Normalize")


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverse of Normalize; as in openpi every stats key must be present in the data."""

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = True

    def __post_init__(self) -> None:
        if self.use_quantiles:
            _check_quantiles(self.norm_stats)

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        fn = unnormalize_quantile if self.use_quantiles else unnormalize_zscore
        return _apply_stats(data, self.norm_stats, fn, True, "Unnormalize")


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resizes every camera image [h, w, c] to [height, width, c] with padding (no-op if already that size)."""

    height: int = 224
    width: int = 224

    def __call__(self, data: DataDict) -> DataDict:
        images = _require(data, "image", ("image",), "ResizeImages")
        if not isinstance(images, Mapping):
            raise ValueError(f"ResizeImages: 'image' must map camera names to images, got {type(images).__name__}")
        resized = {}
        for name, image in images.items():
            try:
                resized[name] = resize_with_pad(image, self.height, self.width)
            except ValueError as exc:
                raise ValueError(f"ResizeImages: image {name!r}: {exc}") from exc
        return {**data, "image": resized}


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    """Replaces 'prompt' with tokenized_prompt int32[max_len] and tokenized_prompt_mask bool[max_len].

    With discrete_state_input the (already normalised) state is written into the prompt as 256-way bins. A
    prompt over max_len tokens is truncated (openpi's behaviour) and noted under 'warnings'.
    """

    tokenizer: PaligemmaTokenizer
    discrete_state_input: bool = False

    def __call__(self, data: DataDict) -> DataDict:
        prompt = data.get("prompt")
        if prompt is None:
            raise ValueError(f"TokenizePrompt: missing key 'prompt'; got {sorted(data)}")
        if not isinstance(prompt, str):
            arr = np.asarray(prompt)
            if arr.ndim != 0 or arr.dtype.kind not in "US":
                raise ValueError(f"TokenizePrompt: 'prompt' must be a str or 0-d string array, got {prompt!r}")
            prompt = arr.item()
            if isinstance(prompt, bytes):
                prompt = prompt.decode()
        state = None
        if self.discrete_state_input:
            state = data.get("state")
            if state is None:
                raise ValueError(f"TokenizePrompt: discrete_state_input needs key 'state'; got {sorted(data)}")
        warnings: list[str] = []
        tokens, mask = self.tokenizer.tokenize(prompt, state, warnings=warnings)
        out = {k: v for k, v in data.items() if k != "prompt"}
        if warnings:  # handed back to the caller by `Policy.prepare`, never to the model
            out[WARNINGS_KEY] = [*data.get(WARNINGS_KEY, ()), *warnings]
        out["tokenized_prompt"] = tokens
        out["tokenized_prompt_mask"] = mask
        return out


def pad_to_dim(x: np.ndarray, target_dim: int) -> np.ndarray:
    """x[..., d] -> x[..., target_dim], zero-padded; d > target_dim is an error (the model could not take it)."""
    x = np.asarray(x)
    dim = x.shape[-1]
    if dim > target_dim:
        raise ValueError(f"last dimension {dim} exceeds the model action dim {target_dim}")
    if dim == target_dim:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, target_dim - dim)]
    return np.pad(x, pad, constant_values=0)


@dataclasses.dataclass(frozen=True)
class PadStatesAndActions:
    """Zero-pads state[d] and, when present, actions[h, d] to the model's action dim (32 for π0.5)."""

    model_action_dim: int = 32

    def __call__(self, data: DataDict) -> DataDict:
        state = _require(data, "state", ("state", "actions (optional)"), "PadStatesAndActions")
        out = dict(data)
        try:
            out["state"] = pad_to_dim(state, self.model_action_dim)
            if "actions" in data:
                out["actions"] = pad_to_dim(data["actions"], self.model_action_dim)
        except ValueError as exc:
            raise ValueError(f"PadStatesAndActions: {exc}") from exc
        return out
