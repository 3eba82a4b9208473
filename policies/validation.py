"""The one place that decides what a policy accepts and what it may answer.

Every entry point (`faster-vla serve`, `load_policy(...).infer`/`infer_batch`, `eval` and `train`, which all
reach π0.5 through `Policy.prepare`) runs these checks before any transform or model call, so a bad input
costs microseconds and fails with an `InvalidInputError` that names the field, what was expected and what was
found. The output guard (`check_actions`) stops a non-finite action from ever leaving a policy: a robot
client is answered with an error, never with NaN.

Accepted observations (openpi's LIBERO conventions, `LiberoInputs` / `parse_libero_image`):

- images `observation/image`, `observation/wrist_image`: rank 3 with 3 colour channels, [h, w, 3] or
  channels-first [3, h, w], each side 1..`MAX_IMAGE_SIDE` pixels (they are resized with padding to the model's
  size). dtype uint8 (any value), or a float dtype with every value in [0, 1]: openpi turns floats into uint8
  with `(255 * x).astype(uint8)` (LeRobot's storage format), which wraps silently outside [0, 1], so such
  values (and NaN/Inf) are refused. bool, other integer dtypes, strings and objects are refused.
- state `observation/state`: a real (int or float) 1-D array of exactly `state_dim` finite values (8 for
  LIBERO: eef position, axis-angle, two gripper joints). A bundle's critics read it, so a wrong length or a
  NaN would make a tuned policy act on garbage.
- `prompt`: a str (or a 0-d string array, as openpi's `TokenizePrompt` takes) that is not empty after
  openpi's cleaning. A prompt longer than the model's `max_token_len` tokens is truncated, as openpi's
  tokenizer does, and the policy returns a warning saying so (`warnings` in its result).
- other keys are ignored, as openpi ignores them, unless one looks like a typo of a known key (at most
  `TYPO_DISTANCE` edits apart, ignoring case and separators): then it is refused with the known key named.
  A request option (`noise`, `num_candidates`, ...) inside the observation is refused too: it is a keyword of
  `infer`, and the server takes it out of the message itself.
- `noise`: a real array of exactly the expected shape, every value finite.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from faster_vla.policies.tokenizer import clean_prompt
from faster_vla.policies.transforms import LIBERO_IMAGE_KEY, LIBERO_STATE_KEY, LIBERO_WRIST_IMAGE_KEY

PROMPT_KEY = "prompt"
ACTIONS_KEY = "actions"  # training rows carry their action chunk
LIBERO_STATE_DIM = 8
MAX_IMAGE_SIDE = 4096  # far above any camera π0.5 sees (224² after resize); bounds the resize's cost
TYPO_DISTANCE = 2
# Per-request options a caller gives `infer` as keywords (the server takes them out of the message); a FASTER
# bundle's `TunedPolicy` takes all four, the base `Policy` only noise.
REQUEST_OPTIONS: tuple[str, ...] = ("noise", "num_candidates", "selection", "return_scores")


class InvalidInputError(ValueError):
    """A policy input is malformed: `field`, what was `expected` and what was `found`, in that order."""

    def __init__(self, field: str, expected: str, found: str, hint: str = "") -> None:
        self.field, self.expected, self.found, self.hint = field, expected, found, hint
        super().__init__(f"{field}: expected {expected}, found {found}" + (f"; {hint}" if hint else ""))


class NonFiniteActionError(FloatingPointError):
    """A policy computed a NaN or Inf action; it answers with this error instead of sending it to a robot."""


@dataclasses.dataclass(frozen=True)
class ObservationSpec:
    """What one raw observation must hold: the LIBERO keys by default, with `state_dim` state values."""

    image_keys: tuple[str, ...] = (LIBERO_IMAGE_KEY, LIBERO_WRIST_IMAGE_KEY)
    state_key: str = LIBERO_STATE_KEY
    state_dim: int = LIBERO_STATE_DIM

    def __post_init__(self) -> None:
        if self.state_dim < 1:
            raise ValueError(f"state_dim must be >= 1, got {self.state_dim}")

    @property
    def known_keys(self) -> tuple[str, ...]:
        """Every key an observation may carry with a meaning: a near miss of one of these is a typo."""
        return (*self.image_keys, self.state_key, PROMPT_KEY, ACTIONS_KEY, *REQUEST_OPTIONS)


# -- describing what was found -------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A short description of a found value for an error message: type, dtype and shape, never the data."""
    if isinstance(value, np.ndarray | np.generic):
        return f"dtype {value.dtype} shape {list(np.shape(value))}"
    if isinstance(value, str):
        return f"str of {len(value)} characters {value[:40]!r}{'...' if len(value) > 40 else ''}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _non_finite(x: np.ndarray) -> str:
    """'2 NaN and 1 Inf of 8 values (first at index [3])'."""
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    first = [int(i) for i in np.argwhere(~np.isfinite(x))[0]]
    return f"{nan} NaN and {inf} Inf of {x.size} values (first at index {first})"


def as_real_array(value: Any, field: str, expected: str) -> np.ndarray:
    """`value` as a numeric (bool excluded) numpy array, or InvalidInputError naming `field`."""
    try:
        x = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise InvalidInputError(field, expected, f"{describe(value)} that is no array ({exc})") from exc
    if x.dtype.kind not in "fiu":
        raise InvalidInputError(field, expected, describe(x))
    return x


# -- typos ---------------------------------------------------------------------------------------------------


def _normalise_key(key: str) -> str:
    return re.sub(r"[\s_\-/.]+", "_", key.lower())


def edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment): insertions, deletions, substitutions, swaps."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def likely_typo(key: str, known: Iterable[str]) -> str | None:
    """The known key `key` is probably a misspelling of (within `TYPO_DISTANCE` edits, ignoring case and
    separators), or None. A distinct name (an extra camera, a client's own field) is not a typo."""
    norm = _normalise_key(key)
    best: tuple[int, str] | None = None
    for candidate in known:
        if candidate == key:
            return None
        limit = TYPO_DISTANCE if len(candidate) > 4 else 1  # short names: one edit, or 'seed' ~ 'noise'
        d = edit_distance(norm, _normalise_key(candidate))
        if d <= limit and (best is None or d < best[0]):
            best = (d, candidate)
    return None if best is None else best[1]


def check_keys(obs: Mapping[str, Any], known: Sequence[str], *, options: Sequence[str] = REQUEST_OPTIONS) -> None:
    """Refuses non-str keys, request options inside the observation and near misses of `known` keys."""
    for key in obs:
        if not isinstance(key, str):
            raise InvalidInputError("observation keys", "str keys", f"key {key!r} of type {type(key).__name__}")
        if key in options:
            raise InvalidInputError(key, f"{key!r} as a keyword of infer(obs, {key}=...), not a key of the "
                                    "observation", "it inside the observation")
        if key in known:
            continue
        typo = likely_typo(key, known)
        if typo is not None:
            raise InvalidInputError(key, f"a known key such as {typo!r}", f"unknown key {key!r}",
                                    f"did you mean {typo!r}? (keys unlike any known one are ignored)")


# -- the fields ----------------------------------------------------------------------------------------------


def check_image(value: Any, field: str) -> None:
    """An image is rank 3 with 3 channels (HWC or CHW), sides 1..MAX_IMAGE_SIDE, uint8 or float in [0, 1]."""
    expected = "uint8 [h, w, 3] (or [3, h, w]), or float in [0, 1]"
    if value is None or isinstance(value, str | bytes | Mapping):
        raise InvalidInputError(field, expected, describe(value))
    try:
        x = np.asarray(value)  # numpy, jax or nested lists
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(field, expected, f"{describe(value)} that is no array ({exc})") from exc
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise InvalidInputError(field, expected, describe(x), "other dtypes are not converted: cast to uint8")
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise InvalidInputError(field, "an image of rank 3 with 3 colour channels, [h, w, 3] or [3, h, w]",
                                describe(x))
    sides = x.shape[1:] if x.shape[0] == 3 else x.shape[:2]  # channels-first when the first axis is 3, as openpi
    if min(sides) < 1 or max(sides) > MAX_IMAGE_SIDE:
        raise InvalidInputError(field, f"image sides of 1..{MAX_IMAGE_SIDE} pixels", describe(x))
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)):
            raise InvalidInputError(field, "finite float pixels in [0, 1]", _non_finite(x))
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInputError(field, "float pixels in [0, 1] (openpi converts them with 255 * x)",
                                    f"values in [{low:g}, {high:g}]", "send uint8 for 0..255 pixels")


def check_state(value: Any, field: str, dim: int) -> None:
    """A state is `dim` finite real values, 1-D."""
    expected = f"a 1-D array of {dim} finite numbers"
    x = as_real_array(value, field, expected)
    if x.shape != (dim,):
        raise InvalidInputError(field, expected, describe(x))
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(field, expected, _non_finite(x))


def check_prompt(value: Any, field: str = PROMPT_KEY) -> None:
    """A prompt is a str (or 0-d str/bytes array) that openpi's cleaning leaves non-empty."""
    expected = "a non-empty str"
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "US":
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise InvalidInputError(field, "a UTF-8 str", f"bytes that are not UTF-8 ({exc.reason})") from exc
    if not isinstance(value, str):
        raise InvalidInputError(field, expected, describe(value))
    if not clean_prompt(value).strip():
        raise InvalidInputError(field, expected, f"{value!r}, empty after openpi's cleaning")


def check_observation(obs: Any, spec: ObservationSpec, *, index: int | None = None) -> None:
    """Every check of one raw observation, cheapest first; raises InvalidInputError (prefixed with the row
    `index` of a batch when given)."""
    try:
        if not isinstance(obs, Mapping):
            raise InvalidInputError("observation", "a dict", describe(obs))
        check_keys(obs, spec.known_keys)
        missing = [k for k in (*spec.image_keys, spec.state_key, PROMPT_KEY) if k not in obs]
        if missing:
            raise InvalidInputError(missing[0], f"the keys {[*spec.image_keys, spec.state_key, PROMPT_KEY]}",
                                    f"keys {sorted(map(str, obs))} without {missing}")
        check_prompt(obs[PROMPT_KEY])
        check_state(obs[spec.state_key], spec.state_key, spec.state_dim)
        for key in spec.image_keys:
            check_image(obs[key], key)
        if ACTIONS_KEY in obs:  # a training row
            actions = as_real_array(obs[ACTIONS_KEY], ACTIONS_KEY, "a finite [horizon, action_dim] array")
            if actions.ndim != 2 or not np.all(np.isfinite(actions)):
                raise InvalidInputError(ACTIONS_KEY, "a finite [horizon, action_dim] array",
                                        describe(actions) if actions.ndim != 2 else _non_finite(actions))
    except InvalidInputError as exc:
        if index is None:
            raise
        raise InvalidInputError(f"observation {index}: {exc.field}", exc.expected, exc.found, exc.hint) from exc


def check_noise(noise: Any, shape: Sequence[int], field: str = "noise") -> np.ndarray:
    """The caller's noise as float32 of exactly `shape`, every value finite; else InvalidInputError."""
    expected = f"finite numbers of shape {list(shape)}"
    x = as_real_array(noise, field, expected)
    if x.shape != tuple(shape):
        raise InvalidInputError(field, expected, describe(x))
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf, refused just below
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(field, expected, _non_finite(x))
    return x


def check_actions(actions: Any, where: str) -> None:
    """The output guard: raises NonFiniteActionError when the action chunk a policy computed holds NaN or Inf."""
    x = np.asarray(actions)
    if x.dtype.kind in "fc" and not np.all(np.isfinite(x)):
        raise NonFiniteActionError(
            f"actions: expected finite values, found {_non_finite(x)} in {where}'s {list(x.shape)} chunk; the "
            "policy answers with this error rather than send them (are its parameters or noise non-finite?)"
        )
