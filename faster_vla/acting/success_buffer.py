"""The chunks of successful training episodes: what EXPO's π0.5 recipe trains the action expert on.

Replay keeps states and the frozen-actor cache, not camera images, so the flow loss cannot read it. This
buffer keeps, for every decision of an episode that succeeded, the raw observation the actor saw (openpi's
LIBERO client format: two uint8 images, the 8-d state, the prompt) and the chunk it executed [H, 7] in robot
units. `sample` returns rows that `Policy.to_training_batch` turns into a flow-loss batch through the same
transforms acting uses, as pretraining's demonstration rows do.

Whole episodes are evicted, oldest first, when the chunk count passes `capacity`. `save`/`load` write one
.npz atomically, so a run checkpoint restores the buffer exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faster_vla.policies.transforms import LIBERO_IMAGE_KEY, LIBERO_STATE_KEY, LIBERO_WRIST_IMAGE_KEY
from faster_vla.shared.files import NPZ_META_KEY, atomic_write, read_npz_meta

FORMAT = "faster_vla.acting.success_buffer"
FORMAT_VERSION = 1
PROMPT_KEY = "prompt"
ARRAY_KEYS = (LIBERO_IMAGE_KEY, LIBERO_WRIST_IMAGE_KEY, LIBERO_STATE_KEY)


class SuccessBufferFormatError(ValueError):
    """A file is not a success buffer this version reads."""


class SuccessBuffer:
    """(observation, executed chunk) pairs of successful episodes, at most `capacity` chunks."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 chunk, got {capacity}")
        self.capacity = int(capacity)
        self._episodes: list[dict[str, np.ndarray]] = []  # each: ARRAY_KEYS [n, ...], "actions" [n, H, 7], prompt [n]
        self.episodes_added = 0

    def __len__(self) -> int:
        return sum(len(e["actions"]) for e in self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def add_episode(self, observations: Sequence[Mapping[str, Any]], chunks: np.ndarray) -> None:
        """One successful episode: its decision-time observations [n] and executed chunks [n, H, 7]."""
        chunks = np.asarray(chunks, np.float32)
        if chunks.ndim != 3 or len(observations) != len(chunks) or len(chunks) == 0:
            raise ValueError(f"need one observation per chunk [n, H, A] (n >= 1), got {len(observations)} "
                             f"observations and chunks of shape {list(chunks.shape)}")
        missing = [k for k in (*ARRAY_KEYS, PROMPT_KEY) if k not in observations[0]]
        if missing:
            raise ValueError(f"observations lack {missing}: the actor's flow loss needs the camera images, so "
                             "the env must render at every decision (render_mode chunk_boundary or every_step)")
        episode = {k: np.stack([np.asarray(o[k]) for o in observations]) for k in ARRAY_KEYS}
        episode[PROMPT_KEY] = np.asarray([str(o[PROMPT_KEY]) for o in observations])
        episode["actions"] = chunks
        if self._episodes:
            first = self._episodes[0]
            bad = [k for k in (*ARRAY_KEYS, "actions") if episode[k].shape[1:] != first[k].shape[1:]
                   or episode[k].dtype != first[k].dtype]
            if bad:
                raise ValueError(f"episode fields {bad} differ in shape or dtype from the buffer's")
        self._episodes.append(episode)
        self.episodes_added += 1
        while len(self) > self.capacity and len(self._episodes) > 1:
            self._episodes.pop(0)

    def sample(self, rng: np.random.Generator, batch_size: int) -> list[dict[str, Any]]:
        """`batch_size` rows drawn uniformly over chunks (with replacement), each an openpi LIBERO row with
        its "actions" [H, 7]: input for `Policy.to_training_batch`."""
        if not self._episodes:
            raise ValueError("the success buffer is empty: no training episode has succeeded yet")
        sizes = np.array([len(e["actions"]) for e in self._episodes])
        flat = rng.integers(0, sizes.sum(), batch_size)
        which = np.searchsorted(np.cumsum(sizes), flat, side="right")
        index = flat - np.concatenate([[0], np.cumsum(sizes)[:-1]])[which]
        rows = []
        for e, i in zip(which, index, strict=True):
            episode = self._episodes[e]
            row = {k: episode[k][i] for k in ARRAY_KEYS}
            row[PROMPT_KEY] = str(episode[PROMPT_KEY][i])
            row["actions"] = episode["actions"][i]
            rows.append(row)
        return rows

    # -- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the buffer to one .npz, atomically."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "capacity": self.capacity,
                "episodes_added": self.episodes_added, "lengths": [len(e["actions"]) for e in self._episodes]}
        arrays = {NPZ_META_KEY: np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)}
        if self._episodes:
            for key in (*ARRAY_KEYS, PROMPT_KEY, "actions"):
                arrays[key] = np.concatenate([e[key] for e in self._episodes])
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuccessBuffer:
        """Restores a buffer written by `save`, exactly; SuccessBufferFormatError for other files."""
        data, meta = read_npz_meta(path, fmt=FORMAT, version=FORMAT_VERSION, what="success buffer",
                                   error=SuccessBufferFormatError)
        with data:
            buf = cls(meta["capacity"])
            buf.episodes_added = int(meta["episodes_added"])
            if meta["lengths"]:
                arrays = {k: data[k] for k in (*ARRAY_KEYS, PROMPT_KEY, "actions")}
                starts = np.concatenate([[0], np.cumsum(meta["lengths"])])
                buf._episodes = [{k: v[a:b] for k, v in arrays.items()} for a, b in zip(starts[:-1], starts[1:])]
        return buf
