"""An openpi-style policy: raw observation dict -> transforms -> π0.5 actor -> transforms -> action chunk.

`infer` takes ONE observation in the robot's own format (for LIBERO: `observation/image`,
`observation/wrist_image`, `observation/state`, `prompt`) and returns `actions` [horizon, 7] in the
robot's units plus `policy_timing` per part, as openpi's `Policy.infer` does; `infer_batch` runs several in
one batched encode and denoise (what a server batching concurrent clients calls). Serving and evaluation build
on this object; the actor underneath is the same one critics and training use.

Every raw observation passes `policies.validation` in `prepare` before any transform or model call (the one
place serving, bundles, eval and train all go through), and `infer_batch` refuses to return a non-finite action.
A prompt truncated to the model's token budget comes back as a note in the result's `warnings`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from faster_vla.policies.normalize import NormStats
from faster_vla.policies.pi05 import Observation, Pi05Actor
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from faster_vla.policies.transforms import (
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    PadStatesAndActions,
    ResizeImages,
    WARNINGS_KEY,
    TokenizePrompt,
    Transform,
    Unnormalize,
    compose,
)
from faster_vla.policies.validation import (
    LIBERO_STATE_DIM,
    ObservationSpec,
    check_actions,
    check_noise,
    check_observation,
)

T = TypeVar("T")


def batch_bucket(n: int) -> int:
    """The batch size `n` rows are padded to: the next power of two, so jit compiles log2(max) programs, not max."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    return 1 << (n - 1).bit_length()


def batch_buckets(max_batch: int) -> list[int]:
    """Every padded size a batch of 1..max_batch rows runs at (what to compile before serving)."""
    return sorted({batch_bucket(n) for n in range(1, max_batch + 1)})


def pad_rows(tree: T, size: int) -> T:
    """Pads every leaf's leading (batch) axis to `size` by repeating its last row: valid inputs, never NaN."""

    def pad(x: Any) -> np.ndarray:
        x = np.asarray(x)
        return x if x.shape[0] == size else np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])

    return jax.tree.map(pad, tree)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Raw rows after the checks and input transforms: what the model reads, plus notes for the caller."""

    observation: Observation  # [b]
    actions: np.ndarray | None  # [b, H, action_dim] normalised and padded (training rows), else None
    warnings: list[list[str]]  # per row, e.g. a truncated prompt; empty lists when all went as asked


class Policy:
    """Transforms around a `Pi05Actor`, with its own noise stream (seeded, split per call)."""

    def __init__(
        self,
        actor: Pi05Actor,
        *,
        input_transform: Transform,
        output_transform: Transform,
        num_steps: int = 10,
        seed: int = 0,
        metadata: Mapping[str, Any] | None = None,
        spec: ObservationSpec | None = None,
    ) -> None:
        """`spec`: what a raw observation must hold (LIBERO's keys and 8-D state by default)."""
        self.actor = actor
        self.spec = ObservationSpec() if spec is None else spec
        self.input_transform = input_transform
        self.output_transform = output_transform
        self.num_steps = num_steps
        self.metadata = dict(metadata or {})
        self._rng = jax.random.key(seed)

    def to_observations(self, raw: Sequence[Mapping[str, Any]]) -> Observation:
        """Raw observations (one per row) -> one batched model `Observation` [b], through the input transforms."""
        return self.to_training_batch(raw)[0]

    def to_training_batch(self, raw: Sequence[Mapping[str, Any]]) -> tuple[Observation, np.ndarray | None]:
        """Raw rows, optionally each with "actions" [H, 7] -> (Observation [b], actions [b, H, action_dim]
        normalised and padded, or None): training rows go through exactly the transforms acting uses."""
        prepared = self.prepare(raw)
        return prepared.observation, prepared.actions

    def prepare(self, raw: Sequence[Mapping[str, Any]]) -> Prepared:
        """Checks every raw row (`validation.check_observation`: all of them before any transform, so a bad row
        costs no work), then runs the input transforms and stacks the rows."""
        if len(raw) == 0:
            raise ValueError("no observations: a batch needs at least one")
        for i, obs in enumerate(raw):
            check_observation(obs, self.spec, index=i if len(raw) > 1 else None)
        rows = [self.input_transform(dict(obs)) for obs in raw]
        warnings = [list(row.pop(WARNINGS_KEY, ())) for row in rows]
        with_actions = ["actions" in row for row in rows]
        if any(with_actions) and not all(with_actions):
            raise ValueError("either every row or none carries 'actions'")
        actions = np.stack([np.asarray(row.pop("actions"), np.float32) for row in rows]) if all(with_actions) else None
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows)
        return Prepared(Observation.from_dict(stacked), actions, warnings)

    def to_observation(self, obs: Mapping[str, Any]) -> Observation:
        """One raw observation -> the model's batched `Observation` (batch 1), through the input transforms."""
        return self.to_observations([obs])

    def infer(self, obs: Mapping[str, Any], *, noise: np.ndarray | None = None) -> dict[str, Any]:
        """One observation -> {'actions': [horizon, robot_action_dim], 'policy_timing': {part: ms}}, plus
        'warnings' (list[str]) when the policy changed the request, e.g. truncated the prompt.

        `noise` [horizon, action_dim] fixes the initial noise (the caller's seed); otherwise it is drawn from
        the policy's own stream. Bad input raises `validation.InvalidInputError` before any compute; a
        non-finite result raises `validation.NonFiniteActionError` instead of being returned.
        """
        if noise is not None:
            config = self.actor.config
            noise = check_noise(noise, (config.action_horizon, config.action_dim))[None]
        return self.infer_batch([obs], noise=noise)[0]

    def infer_batch(
        self, observations: Sequence[Mapping[str, Any]], *, noise: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """b observations through ONE encode and denoise -> b results, each what `infer` gives for its row.

        Rows are padded to `batch_bucket(b)` (repeating the last), so jit compiles one program per power of
        two. `noise` [b, horizon, action_dim] fixes each row's seed; otherwise row i draws the i-th key of the
        policy's stream, as the i-th of b `infer` calls would. `policy_timing` is the batch's, shared by its rows.
        """
        config = self.actor.config
        b = len(observations)
        size = batch_bucket(b)
        shape = (config.action_horizon, config.action_dim)
        if noise is not None:  # one seed per observation
            noise = check_noise(noise, (b, *shape))
        t0 = time.perf_counter()
        prepared = self.prepare(observations)  # a bad observation fails here, before any key is drawn
        observation = prepared.observation
        if noise is None:
            keys = []
            for _ in range(b):
                self._rng, key = jax.random.split(self._rng)
                keys.append(key)
            noise = np.concatenate([np.asarray(jax.random.normal(key, (1, *shape))) for key in keys])
        t1 = time.perf_counter()
        prefix = jax.block_until_ready(self.actor.encode(pad_rows(observation, size)))
        t2 = time.perf_counter()
        actions = jax.block_until_ready(self.actor.denoise(prefix, pad_rows(noise, size)[:, None], self.num_steps))
        t3 = time.perf_counter()
        actions, states = np.asarray(actions[:b, 0]), np.asarray(observation.state)  # [b, H, A], [b, S]
        # openpi hands the (normalised) state to the output transforms too; its Unnormalize expects it.
        outs = [self.output_transform({"state": states[i], "actions": actions[i]}) for i in range(b)]
        for i, out in enumerate(outs):
            check_actions(out["actions"], f"observation {i}" if b > 1 else "the observation")
            if prepared.warnings[i]:
                out["warnings"] = prepared.warnings[i]
        t4 = time.perf_counter()
        timing = {
            "input_transform_ms": 1e3 * (t1 - t0),
            "encode_ms": 1e3 * (t2 - t1),
            "denoise_ms": 1e3 * (t3 - t2),
            "output_transform_ms": 1e3 * (t4 - t3),
            "infer_ms": 1e3 * (t4 - t0),
        }
        for out in outs:
            out["policy_timing"] = dict(timing)
        return outs


def make_libero_policy(
    actor: Pi05Actor,
    *,
    tokenizer: PaligemmaTokenizer,
    norm_stats: Mapping[str, NormStats],
    num_steps: int = 10,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> Policy:
    """openpi's pi05_libero pipeline: LIBERO inputs, quantile norm, resize 224, tokenize, pad; and back."""
    config = actor.config
    if tokenizer.max_len != config.max_token_len:
        raise ValueError(
            f"tokenizer.max_len ({tokenizer.max_len}) must equal the model's max_token_len ({config.max_token_len})"
        )
    size = config.siglip.image_size
    inputs = compose(
        LiberoInputs(),
        Normalize(norm_stats, use_quantiles=True),
        ResizeImages(size, size),
        TokenizePrompt(tokenizer, discrete_state_input=config.discrete_state_input),
        PadStatesAndActions(config.action_dim),
    )
    outputs = compose(Unnormalize(norm_stats, use_quantiles=True), LiberoOutputs())
    # The state length the norm stats (and so the bundle's critics) were made for; LIBERO's 8 without stats.
    state_stats = norm_stats.get("state")
    state_dim = LIBERO_STATE_DIM if state_stats is None or np.ndim(state_stats.mean) == 0 else len(state_stats.mean)
    return Policy(actor, input_transform=inputs, output_transform=outputs, num_steps=num_steps, seed=seed,
                  metadata=metadata, spec=ObservationSpec(state_dim=state_dim))
