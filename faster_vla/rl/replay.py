"""Per-step replay with sliding-window chunk sampling, for FASTER-EXPO fine-tuning of a frozen VLA.

Storage
-------
One row per stored observation. An episode of T executed steps occupies T + 1 *contiguous* rows: row j
holds o_j (every observation field and every cache field) for j = 0..T, and the step fields a_j, r_j,
d_j for j < T (row T's step fields are unused: zero). Storing o_T is what lets a window that ends exactly at
a time-limit cut bootstrap from the true next state. `capacity` counts rows. Arrays are numpy, allocated
once on the first insert from that episode's shapes and dtypes (`np.zeros`, so untouched pages cost no
resident memory until written); `nbytes` is the fixed total, `row_nbytes` the cost of one row.

Ring over whole episodes: a new episode goes at the write cursor, or at row 0 when it does not fit before
the end (the tail rows stay unused for that lap). The oldest episodes are evicted, whole, until the rows it
needs are free (when wrapping, the episodes left in the tail are the oldest and go first), so what is
stored is always the most recent episodes, in order. An episode longer than the capacity is refused.

Episodes must end in exactly one way: by a terminal (success) at their last step, `terminal[-1]` True and
`truncated` False; or by the time limit, `truncated` True and no terminal. A terminal before the last step
is refused (the collector must cut the episode at its first terminal).

Windows (the rules of `faster_vla.rl.chunked_td`)
----------------------------------------------
A window of h steps may start at any step t of an episode, and never crosses into another episode.
- Terminal inside (steps t..t+h-1 reach the terminal step k): R counts rewards up to and including step k,
  the bootstrap mask is 0, `step_valid` is False after k, and the action slots after k are padded with the
  last executed action a_k (repeat-last, not zero: the padding stays in the range of real actions, so it
  never shows the critic an out-of-distribution input; zero would be a real action in a normalised space).
  next observation/cache: row min(t+h, T), a real stored row (o_T when the window runs past the end),
  whose value is multiplied by discount 0.
- No terminal, t + h <= T: a full window; bootstrap from s_{t+h} (for t + h = T: the stored final o_T).
- No terminal, t + h > T (only in a truncated episode): invalid — the state after the cut is unknown, so
  the target cannot be exact. Such windows are **never sampled** (hence no weight field: every sampled
  window has weight 1). A truncated episode has max(T - h + 1, 0) valid starts, a terminal one T.
Sampling is uniform over all valid (episode, start) pairs of the stored episodes.

Frozen-actor cache
------------------
The actor never changes, so what updates need from it is computed once, when a state is collected, and
stored per row like any other field: `features` [F] float32 (the backbone's critic features,
`Prefix.features`), `noise` [K, H, A] float32 (K initial noises, K = N = 8 by default) and `denoised`
[K, H, A] float32 (the actor's unedited chunk for each noise, in the model's normalised action space).
Every row (not only replanning steps) needs it, since windows start anywhere and s_{t+h} can be any step.
`ChunkBatch.cache` / `next_cache` give it at s_t and s_{t+h}, so the TD target's a' and the Q^dn
regression run on lookups, never on the VLA. Store `features` here, not a second time as an observation.
Store `action` in the space the critic sees the cache's chunks in (the model's normalised action space).

Memory per row for pi05_libero (F = 2·2048 = 4096, K = 8, H = 10, A = 32):
  features 4096·4 = 16,384 B; noise 8·10·32·4 = 10,240 B; denoised 10,240 B  -> cache 36,864 B
  + action 32·4 = 128 B (normalised, padded to 32; 28 B for LIBERO's raw 7-d) + reward 4 B + terminal 1 B
  + state 8·4 = 32 B                                                         -> 37,029 B ≈ 36.2 KiB
  + images only if configured: 2·224·224·3 uint8 = 301,056 B                 -> 338,085 B ≈ 330 KiB
i.e. ≈ 3.70 GB per 100k rows without images, ≈ 33.8 GB with. `FrozenActorCacheSpec.nbytes_per_step`
computes the cache part; `ReplayBuffer.row_nbytes` / `nbytes` report what is actually allocated.

Persistence
-----------
`save(path)` writes one uncompressed .npz (arrays trimmed to the rows ever written, plus a JSON
`__meta__` entry with every counter, the ring cursor and the episode table) to a temporary file in the
same folder, fsyncs it and `os.replace`s it onto `path`: a reader sees the old file or the new one, never
half of one. `ReplayBuffer.load(path)` restores it exactly (unwritten rows are zero in both) and refuses
other files or other format versions with `ReplayFormatError`.

Why one file of ~600 lines: the buffer's storage, eviction, window sampling and its .npz format share one
row layout and its invariants (episode table, valid window starts); split, each part would re-derive them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from faster_vla.rl import chunked_td
from faster_vla.shared.files import NPZ_META_KEY, atomic_write, read_npz_meta

FORMAT = "faster_vla.rl.replay"
FORMAT_VERSION = 1

_STEP_FIELDS = ("action", "reward", "terminal")


class ReplayFormatError(ValueError):
    """The file is not a faster_vla replay of the format version this code reads."""


# -- the frozen-actor cache -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrozenActorCacheSpec:
    """Shapes of the per-row cache of a frozen actor: K noises, their denoised chunks, backbone features.

    With `intermediate_steps` (the filtering MDP's filter steps, `filtering.cached_steps`), the cache also
    holds every seed's partially denoised x_t at those Euler steps ('x_t' [K, S, H, A]), so updates can
    replay a multi-stage filter without the actor.
    """

    num_seeds: int = 8  # K (= N, the candidates the selection rule scores)
    action_horizon: int = 10  # H of the model's chunks
    action_dim: int = 32  # A of the model's (normalised, padded) action space
    feature_dim: int = 4096  # F: Prefix.features width, 2 · PaliGemma width
    intermediate_steps: tuple[int, ...] = ()  # S Euler steps 0 < k < T whose x_t is cached

    def __post_init__(self) -> None:
        for name in ("num_seeds", "action_horizon", "action_dim", "feature_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        steps = tuple(int(k) for k in self.intermediate_steps)
        if any(k < 1 for k in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"intermediate_steps must be strictly increasing Euler steps >= 1, got {steps}")
        object.__setattr__(self, "intermediate_steps", steps)

    @classmethod
    def from_config(
        cls, config: Any, num_seeds: int = 8, intermediate_steps: tuple[int, ...] = ()
    ) -> FrozenActorCacheSpec:
        """From a `faster_vla.policies.config.Pi05Config` (features = pooled + last token of the prefix)."""
        return cls(num_seeds, config.action_horizon, config.action_dim, 2 * config.paligemma_config.width,
                   intermediate_steps)

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and dtype of each cache field."""
        chunk = (self.num_seeds, self.action_horizon, self.action_dim)
        f32 = np.dtype(np.float32)
        shapes = {"features": ((self.feature_dim,), f32), "noise": (chunk, f32), "denoised": (chunk, f32)}
        if self.intermediate_steps:
            k, h, a = chunk
            shapes["x_t"] = ((k, len(self.intermediate_steps), h, a), f32)
        return shapes

    @property
    def nbytes_per_step(self) -> int:
        """Bytes of cache per stored row (36,864 for pi05_libero with K = 8)."""
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.shapes.values())

    def validate(self, cache: Mapping[str, np.ndarray], num_rows: int) -> None:
        """Raises ValueError unless `cache` has exactly these fields, each [num_rows, *shape] of a float type."""
        if set(cache) != set(self.shapes):
            raise ValueError(f"cache fields {sorted(cache)} differ from the spec's {sorted(self.shapes)}")
        for name, (shape, _) in self.shapes.items():
            value = np.asarray(cache[name])
            if value.shape != (num_rows, *shape):
                raise ValueError(f"cache[{name!r}] must be [{num_rows}, {', '.join(map(str, shape))}], "
                                 f"got {list(value.shape)}")
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"cache[{name!r}] must be floating point, got {value.dtype}")


# -- batches and episodes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkBatch:
    """B windows of h steps. Every window is valid (weight 1): invalid ones are never sampled."""

    observations: dict[str, np.ndarray]  # name -> [B, ...] at s_t
    actions: np.ndarray  # [B, h*A] float: a_t..a_{t+h-1} flattened, padded with the last executed action
    step_valid: np.ndarray  # [B, h] bool: step executed (False after a terminal)
    returns: np.ndarray  # [B] float32: R = Σ_{i<h} γ^i r_{t+i} valid_i
    bootstrap_mask: np.ndarray  # [B] float32: 1 iff no terminal in the window
    discount: np.ndarray  # [B] float32: γ^h · bootstrap_mask (y = returns + discount · Q̄(next, a'))
    next_observations: dict[str, np.ndarray]  # name -> [B, ...] at s_{min(t+h, T)}
    cache: dict[str, np.ndarray]  # name -> [B, ...] at s_t ({} without a cache)
    next_cache: dict[str, np.ndarray]  # name -> [B, ...] at s_{min(t+h, T)}
    episode: np.ndarray  # [B] int64: episode id (ids count up from 0 over the buffer's lifetime)
    t: np.ndarray  # [B] int64: window start step within its episode

    @property
    def size(self) -> int:
        return int(self.returns.shape[0])


class EpisodeInfo(NamedTuple):
    id: int  # counts up from 0 in insertion order, never reused
    start: int  # first row
    length: int  # T executed steps (rows start .. start + T, o_T included)
    terminal: bool  # ended by a terminal at step T - 1
    truncated: bool  # ended by the time limit


def num_valid_starts(length: int, terminal: bool, h: int) -> int:
    """Valid window starts of an episode: T if it ends with a terminal, else max(T - h + 1, 0)."""
    return int(length) if terminal else max(int(length) - h + 1, 0)


# -- the buffer -------------------------------------------------------------------------------------------


class ReplayBuffer:
    """Fixed-capacity per-step replay over whole episodes (see the module docstring)."""

    def __init__(
        self,
        capacity: int,
        *,
        observation_keys: Sequence[str] | None = None,
        cache_spec: FrozenActorCacheSpec | None = None,
    ) -> None:
        """capacity: rows (an episode of T steps takes T + 1). observation_keys: the observation fields to
        store (others are ignored; e.g. leave out 'images' unless the critic needs them); None stores every
        field of the first episode. cache_spec: if given, every episode's cache must match it."""
        capacity = int(capacity)
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 rows, got {capacity}")
        self.capacity = capacity
        self.observation_keys = None if observation_keys is None else tuple(observation_keys)
        if self.observation_keys is not None:
            _check_names(self.observation_keys, "observation")
        self.cache_spec = cache_spec
        self._obs: dict[str, np.ndarray] | None = None  # None until the first insert
        self._cache: dict[str, np.ndarray] | None = None  # None: no cache (or not yet allocated)
        self._has_cache: bool | None = None
        self._action: np.ndarray | None = None
        self._reward: np.ndarray | None = None
        self._terminal: np.ndarray | None = None
        self._episodes: list[EpisodeInfo] = []  # oldest first
        self._table_cache: np.ndarray | None = None  # int64 [E, 4]: id, start, length, terminal
        self._cursor = 0  # next write row
        self._high_water = 0  # rows [0, high_water) have been written at least once
        self._next_id = 0
        self._steps_added = 0  # lifetime counters
        self._episodes_evicted = 0

    # -- introspection ------------------------------------------------------------------------------------

    @property
    def episodes(self) -> tuple[EpisodeInfo, ...]:
        """Stored episodes, oldest first."""
        return tuple(self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_steps(self) -> int:
        """Executed steps stored (Σ T)."""
        return sum(e.length for e in self._episodes)

    @property
    def num_rows(self) -> int:
        """Rows in use (Σ (T + 1))."""
        return sum(e.length + 1 for e in self._episodes)

    @property
    def steps_added(self) -> int:
        """Executed steps ever added (evicted ones included)."""
        return self._steps_added

    @property
    def episodes_added(self) -> int:
        return self._next_id

    @property
    def episodes_evicted(self) -> int:
        return self._episodes_evicted

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def field_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(observation fields, cache fields) stored; empty before the first insert."""
        return tuple(self._obs or ()), tuple(self._cache or ())

    def _arrays(self) -> dict[str, np.ndarray]:
        """Every per-row array under its save key."""
        if self._obs is None:
            return {}
        out = {f"obs.{k}": v for k, v in self._obs.items()}
        out.update({f"cache.{k}": v for k, v in (self._cache or {}).items()})
        out.update({"action": self._action, "reward": self._reward, "terminal": self._terminal})
        return out

    @property
    def row_nbytes(self) -> int:
        """Bytes per row over every field (0 before the first insert)."""
        return sum(v[0].nbytes for v in self._arrays().values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated: capacity · row_nbytes (fixed after the first insert; the episode table is tiny)."""
        return sum(v.nbytes for v in self._arrays().values())

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity} rows, {self.num_episodes} episodes, {self.num_steps} steps, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    # -- adding ---------------------------------------------------------------------------------------------

    def add_episode(
        self,
        observations: Mapping[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        terminal: np.ndarray,
        truncated: bool,
        cache: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Stores one episode of T steps and returns its id.

        observations: name -> [T + 1, ...] (o_0..o_T, the final observation included); actions [T, A];
        rewards [T]; terminal [T] bool, True at most at the last step; truncated: ended by the time limit
        (exactly one of terminal[-1] and truncated); cache: name -> [T + 1, ...] or None (as for the first
        episode). Values are cast to the stored dtypes (same-kind casts only).
        """
        actions = np.asarray(actions)
        rewards = np.asarray(rewards)
        terminal = np.asarray(terminal)
        if actions.ndim != 2 or actions.shape[0] < 1:
            raise ValueError(f"actions must be [T, A] with T >= 1, got shape {list(actions.shape)}")
        length = actions.shape[0]
        if rewards.shape != (length,) or terminal.shape != (length,):
            raise ValueError(f"rewards and terminal must be [T] = [{length}], got {list(rewards.shape)} and "
                             f"{list(terminal.shape)}")
        if terminal.dtype != np.bool_:
            if not np.all((terminal == 0) | (terminal == 1)):
                raise ValueError("terminal must be boolean (or 0/1)")
            terminal = terminal.astype(bool)
        if not np.all(np.isfinite(rewards)):
            raise ValueError("rewards must be finite")
        if np.any(terminal[:-1]):
            first = int(np.argmax(terminal))
            raise ValueError(f"terminal at step {first} of {length}: an episode ends at its first terminal "
                             f"(cut it there; nothing after a terminal is stored)")
        if bool(truncated) == bool(terminal[-1]):
            raise ValueError("an episode ends either with a terminal at its last step (truncated=False) or by the "
                             f"time limit (truncated=True); got terminal[-1]={bool(terminal[-1])}, "
                             f"truncated={bool(truncated)}")
        rows = length + 1
        if rows > self.capacity:
            raise ValueError(f"episode of {length} steps needs {rows} rows, capacity is {self.capacity}")

        obs = self._select_observations(observations, rows)
        cache = self._check_cache(cache, rows)
        first = self._obs is None
        if first:
            self._allocate(obs, actions, cache)
        try:
            obs = _cast_like(obs, self._obs, "observation")
            if cache is not None:
                cache = _cast_like(cache, self._cache, "cache")
            actions = _cast_like({"action": actions}, {"action": self._action}, "step")["action"]
            rewards = _cast_like({"reward": rewards}, {"reward": self._reward}, "step")["reward"]
        except ValueError:
            if first:  # nothing stored yet: let the next first episode choose the layout
                self._obs = self._cache = self._has_cache = None
                self._action = self._reward = self._terminal = None
            raise

        start = self._make_room(rows)
        sl = slice(start, start + rows)
        for k, v in obs.items():
            self._obs[k][sl] = v
        if cache is not None:
            for k, v in cache.items():
                self._cache[k][sl] = v
        self._action[start:start + length] = actions
        self._action[start + length] = 0
        self._reward[start:start + length] = rewards
        self._reward[start + length] = 0
        self._terminal[start:start + length] = terminal
        self._terminal[start + length] = False
        info = EpisodeInfo(self._next_id, start, length, bool(terminal[-1]), bool(truncated))
        self._episodes.append(info)
        self._table_cache = None
        self._next_id += 1
        self._steps_added += length
        self._cursor = start + rows
        self._high_water = max(self._high_water, self._cursor)
        return info.id

    def _select_observations(self, observations: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        keys = self.observation_keys if self.observation_keys is not None else tuple(observations)
        missing = [k for k in keys if k not in observations]
        if missing:
            raise ValueError(f"observations lack the configured fields {missing}")
        if not keys:
            raise ValueError("no observation fields to store")
        _check_names(keys, "observation")
        if self._obs is not None and set(keys) != set(self._obs):
            raise ValueError(f"observation fields {sorted(keys)} differ from the stored {sorted(self._obs)}")
        out = {}
        for k in keys:
            v = np.asarray(observations[k])
            if v.ndim < 1 or v.shape[0] != rows:
                raise ValueError(f"observations[{k!r}] must have leading dim T + 1 = {rows}, got {list(v.shape)}")
            out[k] = v
        return out

    def _check_cache(self, cache: Mapping[str, np.ndarray] | None, rows: int) -> dict[str, np.ndarray] | None:
        if self._has_cache is not None and (cache is not None) != self._has_cache:
            raise ValueError(f"this buffer stores {'a' if self._has_cache else 'no'} cache; got "
                             f"{'none' if cache is None else 'one'}")
        if cache is None:
            if self.cache_spec is not None:
                raise ValueError("this buffer has a cache_spec: every episode needs its cache")
            return None
        if not cache:
            raise ValueError("cache must have at least one field, or be None")
        _check_names(tuple(cache), "cache")
        if self.cache_spec is not None:
            self.cache_spec.validate(cache, rows)
        if self._cache is not None and set(cache) != set(self._cache):
            raise ValueError(f"cache fields {sorted(cache)} differ from the stored {sorted(self._cache)}")
        out = {}
        for k, v in cache.items():
            v = np.asarray(v)
            if v.ndim < 1 or v.shape[0] != rows:
                raise ValueError(f"cache[{k!r}] must have leading dim T + 1 = {rows}, got {list(v.shape)}")
            out[k] = v
        return out

    def _allocate(self, obs: dict[str, np.ndarray], actions: np.ndarray, cache: dict[str, np.ndarray] | None) -> None:
        def zeros(example: np.ndarray, dtype: Any = None) -> np.ndarray:
            return np.zeros((self.capacity, *example.shape[1:]), dtype or example.dtype)

        for name, v in {**obs, **(cache or {})}.items():
            if v.dtype == object or v.dtype.kind in "USV":
                raise ValueError(f"field {name!r} has dtype {v.dtype}; only numeric and bool arrays are stored")
        self._obs = {k: zeros(v) for k, v in obs.items()}
        if cache is None:
            self._cache = None
        elif self.cache_spec is not None:  # the spec's dtypes (float32), whatever precision the example has
            self._cache = {k: zeros(cache[k], dtype) for k, (_, dtype) in self.cache_spec.shapes.items()}
        else:
            self._cache = {k: zeros(v) for k, v in cache.items()}
        self._has_cache = cache is not None
        action_dtype = actions.dtype if np.issubdtype(actions.dtype, np.floating) else np.float32
        self._action = zeros(actions, action_dtype)
        self._reward = np.zeros((self.capacity,), np.float32)
        self._terminal = np.zeros((self.capacity,), bool)

    def _make_room(self, rows: int) -> int:
        """Chooses the rows of a new episode and evicts, oldest first, the episodes in the way."""
        start = self._cursor
        if start + rows > self.capacity:
            # Wrap: the episodes still in the tail are the oldest ones (ring order from the cursor is age order).
            while self._episodes and self._episodes[0].start >= self._cursor:
                self._evict_oldest()
            start = 0
        end = start + rows
        while any(e.start < end and start < e.start + e.length + 1 for e in self._episodes):
            self._evict_oldest()
        return start

    def _evict_oldest(self) -> None:
        self._episodes.pop(0)
        self._table_cache = None
        self._episodes_evicted += 1

    # -- windows ----------------------------------------------------------------------------------------------

    def _table(self) -> np.ndarray:
        """int64 [E, 4] (id, start, length, terminal) of the stored episodes, rebuilt after each change."""
        if self._table_cache is None:
            rows = [(e.id, e.start, e.length, e.terminal) for e in self._episodes]
            self._table_cache = np.array(rows, np.int64).reshape(len(rows), 4)
        return self._table_cache

    def _valid_counts(self, h: int, stride: int = 1) -> np.ndarray:
        """int64 [E]: valid starts per stored episode (`num_valid_starts`, vectorised), every `stride`-th step."""
        table = self._table()
        length, terminal = table[:, 2], table[:, 3].astype(bool)
        counts = np.where(terminal, length, np.maximum(length - h + 1, 0))
        return (counts + stride - 1) // stride  # starts 0, stride, 2·stride, … below counts

    def num_windows(self, h: int, stride: int = 1) -> int:
        """Valid window starts over all stored episodes (starts at multiples of `stride` only)."""
        _check_h(h)
        _check_stride(stride)
        return int(self._valid_counts(h, stride).sum())

    def sample_windows(
        self, rng: np.random.Generator, batch_size: int, h: int, gamma: float, stride: int = 1
    ) -> ChunkBatch:
        """batch_size windows, i.i.d. uniform (with replacement) over every valid (episode, start).

        `stride` > 1 starts windows only at steps 0, stride, 2·stride, … of each episode: when observations
        exist only at chunk boundaries (`stride` = h, LIBERO's chunk_boundary rendering), every window then
        starts and bootstraps at a step that was observed.
        """
        _check_h(h)
        _check_stride(stride)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        counts = self._valid_counts(h, stride)
        total = int(counts.sum())
        if total == 0:
            raise ValueError(f"no valid {h}-step window in the buffer ({self.num_episodes} episodes)")
        cum = np.cumsum(counts)
        u = rng.integers(0, total, size=batch_size)
        ep = np.searchsorted(cum, u, side="right")
        t = (u - (cum[ep] - counts[ep])) * stride
        return self._gather(ep, t, h, gamma)

    def all_windows(self, h: int, gamma: float, stride: int = 1) -> ChunkBatch:
        """Every valid window, episodes oldest first, starts ascending (deterministic; for tests and eval)."""
        _check_h(h)
        _check_stride(stride)
        counts = self._valid_counts(h, stride)
        ep = np.repeat(np.arange(len(counts)), counts)
        t = np.concatenate([np.arange(c) * stride for c in counts]) if len(counts) else np.zeros(0, np.int64)
        return self._gather(ep, t.astype(np.int64), h, gamma)

    def _gather(self, ep: np.ndarray, t: np.ndarray, h: int, gamma: float) -> ChunkBatch:
        if len(ep) == 0 or self._obs is None:
            raise ValueError("no windows to gather")
        table = self._table()[ep]
        ids, starts, lengths = table[:, 0], table[:, 1], table[:, 2]
        rows = starts + t
        w = chunked_td.window(self._reward, self._terminal, rows, h, gamma, end=starts + lengths)
        if not np.all(w.window_valid):  # guaranteed by num_valid_starts; a failure is a bug here
            raise AssertionError("sampled an invalid window")
        last = w.step_valid.sum(axis=-1) - 1  # index of the last executed step in each window
        act_rows = rows[:, None] + np.minimum(np.arange(h)[None, :], last[:, None])
        actions = self._action[act_rows].reshape(len(ep), -1)
        next_rows = starts + np.minimum(t + h, lengths)
        mask = w.bootstrap_mask.astype(np.float32)
        return ChunkBatch(
            observations={k: v[rows] for k, v in self._obs.items()},
            actions=actions,
            step_valid=w.step_valid,
            returns=w.returns.astype(np.float32),
            bootstrap_mask=mask,
            discount=chunked_td.bootstrap_discount(mask, h, np.float32(gamma)).astype(np.float32),
            next_observations={k: v[next_rows] for k, v in self._obs.items()},
            cache={k: v[rows] for k, v in (self._cache or {}).items()},
            next_cache={k: v[next_rows] for k, v in (self._cache or {}).items()},
            episode=ids,
            t=t.astype(np.int64),
        )

    # -- persistence ------------------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "capacity": self.capacity,
            "observation_keys": None if self.observation_keys is None else list(self.observation_keys),
            "cache_spec": None if self.cache_spec is None else dataclasses.asdict(self.cache_spec),
            "allocated": self._obs is not None,
            "has_cache": self._has_cache,
            "obs_fields": list(self._obs or ()),
            "cache_fields": list(self._cache or ()),
            "cursor": self._cursor,
            "high_water": self._high_water,
            "next_id": self._next_id,
            "steps_added": self._steps_added,
            "episodes_evicted": self._episodes_evicted,
            "episodes": [list(e[:3]) + [bool(e.terminal), bool(e.truncated)] for e in self._episodes],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the whole buffer to `path` (one .npz) atomically (`run_log.atomic_write`, streamed)."""
        path = Path(path)
        meta = np.frombuffer(json.dumps(self._meta()).encode("utf-8"), np.uint8)
        arrays = {k: v[: self._high_water] for k, v in self._arrays().items()}
        atomic_write(path, lambda f: np.savez(f, **{NPZ_META_KEY: meta}, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Restores a buffer written by `save`, exactly; ReplayFormatError for other files or versions."""
        data, meta = read_npz_meta(path, fmt=FORMAT, version=FORMAT_VERSION, what="replay", error=ReplayFormatError)
        with data:
            spec = meta["cache_spec"]
            buf = cls(meta["capacity"], observation_keys=meta["observation_keys"],
                      cache_spec=None if spec is None else FrozenActorCacheSpec(**spec))
            if meta["allocated"]:
                hw = meta["high_water"]

                def restore(key: str) -> np.ndarray:
                    stored = data[key]
                    full = np.zeros((buf.capacity, *stored.shape[1:]), stored.dtype)
                    full[:hw] = stored
                    return full

                buf._obs = {k: restore(f"obs.{k}") for k in meta["obs_fields"]}
                buf._cache = {k: restore(f"cache.{k}") for k in meta["cache_fields"]} if meta["has_cache"] else None
                buf._action, buf._reward, buf._terminal = (restore(k) for k in _STEP_FIELDS)
            buf._has_cache = meta["has_cache"]
            buf._cursor = meta["cursor"]
            buf._high_water = meta["high_water"]
            buf._next_id = meta["next_id"]
            buf._steps_added = meta["steps_added"]
            buf._episodes_evicted = meta["episodes_evicted"]
            buf._episodes = [EpisodeInfo(int(i), int(s), int(n), bool(d), bool(tr))
                             for i, s, n, d, tr in meta["episodes"]]
        return buf


# -- helpers ----------------------------------------------------------------------------------------------


def _check_stride(stride: int) -> None:
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")


def _check_h(h: int) -> None:
    if not isinstance(h, (int, np.integer)) or h < 1:
        raise ValueError(f"h must be a positive int, got {h!r}")


def _check_names(names: Sequence[str], kind: str) -> None:
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{kind} field name {name!r} must be a non-empty string without '/' or a leading '.'")


def _cast_like(new: dict[str, np.ndarray], stored: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """Checks trailing shapes against the storage and casts (same-kind only) to its dtypes."""
    out = {}
    for k, v in new.items():
        target = stored[k]
        if v.shape[1:] != target.shape[1:]:
            raise ValueError(f"{kind} field {k!r} has per-step shape {list(v.shape[1:])}, the buffer stores "
                             f"{list(target.shape[1:])}")
        if not np.can_cast(v.dtype, target.dtype, casting="same_kind"):
            raise ValueError(f"{kind} field {k!r} of dtype {v.dtype} cannot be stored as {target.dtype}")
        out[k] = v.astype(target.dtype, copy=False)
    return out
