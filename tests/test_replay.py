"""Per-step replay: exact chunked-TD windows, ring eviction of whole episodes, sampling, save/load, the cache."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from faster_vla.acting.frozen_cache import frozen_actor_cache
from faster_vla.rl.replay import (
    FORMAT_VERSION,
    ChunkBatch,
    FrozenActorCacheSpec,
    ReplayBuffer,
    ReplayFormatError,
    num_valid_starts,
)

SPEC = FrozenActorCacheSpec(num_seeds=2, action_horizon=3, action_dim=2, feature_dim=4)


def draw_cache_noise(rng: np.random.Generator, num_rows: int, spec: FrozenActorCacheSpec) -> np.ndarray:
    """float32 [num_rows, K, H, A] standard-normal initial noises, K per row."""
    return rng.standard_normal((num_rows, spec.num_seeds, spec.action_horizon, spec.action_dim), np.float32)


def make_episode(code: int, length: int, rewards=None, *, terminal: bool, cache: bool = False, images: bool = False):
    """An episode whose every value encodes (code, step): o_j.x = [code, j], a_j = [code, j]."""
    steps = np.arange(length + 1, dtype=np.float32)
    obs = {"x": np.stack([np.full_like(steps, code), steps], -1), "state": steps[:, None] * 0.5}
    if images:
        obs["images"] = np.full((length + 1, 2, 4, 4, 3), code, np.uint8)
    actions = np.stack([np.full(length, code, np.float32), steps[:-1]], -1)
    rewards = np.zeros(length) if rewards is None else np.asarray(rewards, np.float64)
    term = np.zeros(length, bool)
    term[-1] = terminal
    out = dict(observations=obs, actions=actions, rewards=rewards, terminal=term, truncated=not terminal)
    if cache:
        rows = length + 1
        out["cache"] = {
            "features": np.stack([np.full(rows, code), steps, steps, steps], -1).astype(np.float32),
            "noise": np.broadcast_to(steps[:, None, None, None] + 0.25, (rows, 2, 3, 2)).copy(),
            "denoised": np.broadcast_to(steps[:, None, None, None] - 0.25, (rows, 2, 3, 2)).copy(),
        }
    return out


def batch_fields(batch: ChunkBatch) -> dict[str, np.ndarray]:
    out = {}
    for field in ("actions", "step_valid", "returns", "bootstrap_mask", "discount", "episode", "t"):
        out[field] = getattr(batch, field)
    for group in ("observations", "next_observations", "cache", "next_cache"):
        out.update({f"{group}.{k}": v for k, v in getattr(batch, group).items()})
    return out


# -- exact windows ----------------------------------------------------------------------------------------


def test_terminal_episode_by_hand():
    buf = ReplayBuffer(16)
    buf.add_episode(**make_episode(7, 3, [0, 0, 1], terminal=True))
    b = buf.all_windows(3, 0.5)
    assert b.t.tolist() == [0, 1, 2]  # every start of a terminal episode is valid
    np.testing.assert_array_equal(b.returns, [0.25, 0.5, 1.0])
    np.testing.assert_array_equal(b.bootstrap_mask, [0, 0, 0])
    np.testing.assert_array_equal(b.discount, [0, 0, 0])
    assert b.step_valid.tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    # Padding repeats the last executed action (a_2): chunks [a0 a1 a2], [a1 a2 a2], [a2 a2 a2].
    steps = b.actions.reshape(3, 3, 2)[..., 1]
    assert steps.tolist() == [[0, 1, 2], [1, 2, 2], [2, 2, 2]]
    assert (b.actions.reshape(3, 3, 2)[..., 0] == 7).all()
    # s_t, and the next state min(t + 3, T) = the stored final observation o_3.
    assert b.observations["x"][:, 1].tolist() == [0, 1, 2]
    assert b.next_observations["x"][:, 1].tolist() == [3, 3, 3]
    assert b.returns.dtype == np.float32 and b.discount.dtype == np.float32 and b.actions.shape == (3, 6)


def test_truncated_episode_by_hand():
    buf = ReplayBuffer(16)
    buf.add_episode(**make_episode(1, 5, [1, 2, 3, 4, 5], terminal=False))
    assert buf.num_windows(3) == 3  # starts 0, 1, 2; 3 and 4 would run past the cut
    b = buf.all_windows(3, 0.5)
    assert b.t.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(b.returns, [1 + 1 + 0.75, 2 + 1.5 + 1, 3 + 2 + 1.25])
    np.testing.assert_array_equal(b.discount, [0.125] * 3)
    assert b.step_valid.all()
    # The window ending exactly at the cut (t = 2) bootstraps from the final observation o_5.
    assert b.next_observations["x"][:, 1].tolist() == [3, 4, 5]
    assert b.actions.reshape(3, 3, 2)[..., 1].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    # Windows at the very start and end with h = 1 and h = 5.
    b1 = buf.all_windows(1, 0.5)
    np.testing.assert_array_equal(b1.returns, [1, 2, 3, 4, 5])
    assert b1.next_observations["x"][:, 1].tolist() == [1, 2, 3, 4, 5]
    b5 = buf.all_windows(5, 0.5)
    assert b5.t.tolist() == [0] and float(b5.returns[0]) == 1 + 1 + 0.75 + 0.5 + 0.3125
    assert float(b5.discount[0]) == 0.5**5


def test_truncated_episode_shorter_than_h_has_no_windows():
    buf = ReplayBuffer(16)
    buf.add_episode(**make_episode(0, 2, [1, 1], terminal=False))
    assert buf.num_windows(3) == 0 and buf.num_windows(2) == 1
    with pytest.raises(ValueError, match="no valid 3-step window"):
        buf.sample_windows(np.random.default_rng(0), 4, 3, 0.9)
    # A terminal episode shorter than h still has a window per step.
    assert num_valid_starts(2, True, 3) == 2


def test_back_to_back_episodes_never_share_a_window():
    buf = ReplayBuffer(32)
    buf.add_episode(**make_episode(1, 4, [1, 1, 1, 1], terminal=False))  # rows 0..4
    buf.add_episode(**make_episode(2, 3, [0, 0, 1], terminal=True))  # rows 5..8
    buf.add_episode(**make_episode(3, 4, [5, 5, 5, 5], terminal=False))
    b = buf.all_windows(3, 0.5)
    starts = list(zip(b.episode.tolist(), b.t.tolist(), strict=True))
    assert starts == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]  # A's t = 2 would cross into B
    np.testing.assert_array_equal(b.returns, [1.75, 1.75, 0.25, 0.5, 1.0, 8.75, 8.75])
    np.testing.assert_array_equal(b.discount, [0.125, 0.125, 0, 0, 0, 0.125, 0.125])
    codes = np.array([1, 1, 2, 2, 2, 3, 3])
    chunk = b.actions.reshape(-1, 3, 2)
    assert (chunk[..., 0] == codes[:, None]).all()  # every action of a window from its own episode
    assert (b.observations["x"][:, 0] == codes).all() and (b.next_observations["x"][:, 0] == codes).all()
    assert b.next_observations["x"][:, 1].tolist() == [3, 4, 3, 3, 3, 3, 4]


# -- ring -------------------------------------------------------------------------------------------------


def test_ring_evicts_oldest_whole_episodes():
    buf = ReplayBuffer(10)
    for code in range(2):
        buf.add_episode(**make_episode(code, 3, terminal=True))  # 4 rows each: rows 0..3, 4..7
    assert [(e.id, e.start) for e in buf.episodes] == [(0, 0), (1, 4)]
    buf.add_episode(**make_episode(2, 3, terminal=True))  # does not fit in rows 8..9: wraps, evicts episode 0
    assert [(e.id, e.start) for e in buf.episodes] == [(1, 4), (2, 0)]
    buf.add_episode(**make_episode(3, 1, terminal=True))  # rows 4..5 overlap episode 1 only
    assert [(e.id, e.start) for e in buf.episodes] == [(2, 0), (3, 4)]
    buf.add_episode(**make_episode(4, 1, terminal=True))  # rows 6..7: free
    buf.add_episode(**make_episode(5, 1, terminal=True))  # rows 8..9: free
    assert [e.id for e in buf.episodes] == [2, 3, 4, 5] and buf.num_rows == 10
    # Ring order from the cursor (10 -> wrap to 0) is age order: episode 2 goes first.
    buf.add_episode(**make_episode(6, 2, terminal=True))  # rows 0..2
    assert [e.id for e in buf.episodes] == [3, 4, 5, 6] and buf.episodes_evicted == 3
    # Wrapping with older episodes left in the tail evicts them first (they are the oldest).
    buf.add_episode(**make_episode(7, 8, terminal=True))  # 9 rows: 3 + 9 > 10 -> rows 0..8
    assert [e.id for e in buf.episodes] == [7] and buf.cursor == 9
    b = buf.all_windows(2, 0.9)
    assert (b.observations["x"][:, 0] == 7).all()
    with pytest.raises(ValueError, match="capacity"):
        buf.add_episode(**make_episode(8, 10, terminal=True))  # 11 rows > 10


def test_ring_keeps_the_most_recent_episodes_intact():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(40)
    added = []
    for code in range(300):
        length = int(rng.integers(1, 15))
        ep = make_episode(code, length, rng.normal(size=length), terminal=bool(rng.random() < 0.5))
        assert buf.add_episode(**ep) == code
        added.append(ep)
        ids = [e.id for e in buf.episodes]
        assert ids == list(range(ids[0], code + 1))  # a contiguous run ending at the newest
        spans = sorted((e.start, e.start + e.length + 1) for e in buf.episodes)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 40
        assert buf.num_rows <= 40
        # Every stored episode reads back exactly as added.
        for e in buf.episodes:
            ref = added[e.id]
            rows = slice(e.start, e.start + e.length + 1)
            np.testing.assert_array_equal(buf._obs["x"][rows], ref["observations"]["x"])
            np.testing.assert_array_equal(buf._action[e.start:e.start + e.length], ref["actions"])
            np.testing.assert_array_equal(buf._reward[e.start:e.start + e.length], ref["rewards"].astype(np.float32))
            np.testing.assert_array_equal(buf._terminal[e.start:e.start + e.length], ref["terminal"])
    assert buf.episodes_added == 300 and buf.episodes_evicted == 300 - buf.num_episodes
    assert buf.steps_added == sum(len(ep["actions"]) for ep in added)


def test_memory_is_fixed_at_the_first_insert():
    buf = ReplayBuffer(50, observation_keys=("x", "state"))
    assert buf.nbytes == 0
    buf.add_episode(**make_episode(0, 3, terminal=True, images=True))
    assert buf.field_names == (("x", "state"), ())  # images are not configured: not stored
    # x: 2 float32, state: 1 float32, action: 2 float32, reward: float32, terminal: bool.
    assert buf.row_nbytes == 8 + 4 + 8 + 4 + 1
    assert buf.nbytes == 50 * buf.row_nbytes
    for code in range(1, 40):
        buf.add_episode(**make_episode(code, 6, terminal=False, images=True))
    assert buf.nbytes == 50 * 25


# -- sampling ---------------------------------------------------------------------------------------------


def test_sampling_is_uniform_over_valid_windows_only():
    buf = ReplayBuffer(64, cache_spec=SPEC)
    buf.add_episode(**make_episode(0, 4, [0, 1, 0, 1], terminal=True, cache=True))  # starts 0..3
    buf.add_episode(**make_episode(1, 5, [1, 0, 0, 2, 0], terminal=False, cache=True))  # starts 0..2
    buf.add_episode(**make_episode(2, 2, [1, 1], terminal=False, cache=True))  # none (2 < h)
    h, gamma = 3, 0.9
    expected = {(0, t) for t in range(4)} | {(1, t) for t in range(3)}
    assert buf.num_windows(h) == len(expected)
    b = buf.sample_windows(np.random.default_rng(123), 70_000, h, gamma)
    counts = Counter(zip(b.episode.tolist(), b.t.tolist(), strict=True))
    assert set(counts) == expected
    for key in expected:  # 10,000 expected each; 5 % is about 5 standard deviations
        assert abs(counts[key] / 10_000 - 1) < 0.05, (key, counts[key])
    # Each sampled window is exactly the deterministic window for its (episode, start).
    ref = buf.all_windows(h, gamma)
    index = {k: i for i, k in enumerate(zip(ref.episode.tolist(), ref.t.tolist(), strict=True))}
    pick = np.array([index[k] for k in zip(b.episode.tolist(), b.t.tolist(), strict=True)])
    for name, value in batch_fields(b).items():
        np.testing.assert_array_equal(value, batch_fields(ref)[name][pick], err_msg=name)


def test_cache_at_s_t_and_s_t_plus_h():
    buf = ReplayBuffer(64, cache_spec=SPEC)
    buf.add_episode(**make_episode(4, 5, terminal=False, cache=True))
    buf.add_episode(**make_episode(5, 3, [0, 0, 1], terminal=True, cache=True))
    b = buf.all_windows(2, 0.9)
    next_step = np.minimum(b.t + 2, np.where(b.episode == 0, 5, 3))
    assert (b.cache["features"][:, 0] == np.where(b.episode == 0, 4, 5)).all()
    np.testing.assert_array_equal(b.cache["features"][:, 1], b.t)
    np.testing.assert_array_equal(b.next_cache["features"][:, 1], next_step)
    np.testing.assert_array_equal(b.cache["noise"][:, 0, 0, 0], b.t + 0.25)
    np.testing.assert_array_equal(b.next_cache["denoised"][:, 1, 2, 1], next_step - 0.25)
    assert b.cache["noise"].shape == (len(b.t), 2, 3, 2) and b.cache["noise"].dtype == np.float32
    np.testing.assert_array_equal(b.next_observations["x"][:, 1], next_step)


# -- persistence ------------------------------------------------------------------------------------------


def _filled_buffer() -> ReplayBuffer:
    rng = np.random.default_rng(5)
    buf = ReplayBuffer(30, cache_spec=SPEC)
    for code in range(9):  # enough to wrap and evict
        length = int(rng.integers(2, 8))
        buf.add_episode(**make_episode(code, length, rng.normal(size=length), terminal=code % 3 == 0, cache=True))
    assert buf.episodes_evicted > 0
    return buf


def test_save_load_round_trip_is_exact(tmp_path):
    buf = _filled_buffer()
    path = tmp_path / "replay.npz"
    buf.save(path)
    buf.save(path)  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]  # no temporary file left behind
    loaded = ReplayBuffer.load(path)
    for attr in ("capacity", "observation_keys", "cache_spec", "episodes", "cursor", "num_steps", "num_rows",
                 "steps_added", "episodes_added", "episodes_evicted", "field_names", "nbytes", "row_nbytes"):
        assert getattr(loaded, attr) == getattr(buf, attr), attr
    a, b = buf._arrays(), loaded._arrays()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Same rng -> same samples; and the ring continues from the same position.
    for _ in range(2):
        x = buf.sample_windows(np.random.default_rng(9), 64, 3, 0.97)
        y = loaded.sample_windows(np.random.default_rng(9), 64, 3, 0.97)
        for name, value in batch_fields(x).items():
            np.testing.assert_array_equal(value, batch_fields(y)[name], err_msg=name)
        ep = make_episode(99, 6, np.arange(6), terminal=False, cache=True)
        buf.add_episode(**ep)
        loaded.add_episode(**ep)
        assert buf.episodes == loaded.episodes and buf.cursor == loaded.cursor


def test_empty_buffer_round_trip(tmp_path):
    ReplayBuffer(12, observation_keys=["x"]).save(tmp_path / "empty.npz")
    loaded = ReplayBuffer.load(tmp_path / "empty.npz")
    assert loaded.capacity == 12 and loaded.num_episodes == 0 and loaded.nbytes == 0
    loaded.add_episode(**make_episode(0, 3, terminal=True))
    assert loaded.num_windows(2) == 3


def test_load_refuses_other_versions_and_other_files(tmp_path):
    path = tmp_path / "replay.npz"
    _filled_buffer().save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["version"] = FORMAT_VERSION + 1
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ReplayFormatError, match=f"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        ReplayBuffer.load(tmp_path / "future.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ReplayFormatError, match="not a faster_vla replay"):
        ReplayBuffer.load(tmp_path / "other.npz")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    with pytest.raises(ReplayFormatError, match="not a faster_vla replay"):
        ReplayBuffer.load(tmp_path / "bare.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReplayFormatError):
        ReplayBuffer.load(tmp_path / "junk.npz")


# -- validation -------------------------------------------------------------------------------------------


def test_bad_episodes_are_refused():
    buf = ReplayBuffer(32)
    ep = make_episode(0, 4, terminal=True)
    with pytest.raises(ValueError, match="first terminal"):
        buf.add_episode(**{**ep, "terminal": np.array([False, True, False, True])})
    with pytest.raises(ValueError, match="either with a terminal"):
        buf.add_episode(**{**ep, "truncated": True})
    with pytest.raises(ValueError, match="either with a terminal"):
        buf.add_episode(**{**ep, "terminal": np.zeros(4, bool), "truncated": False})
    with pytest.raises(ValueError, match="T \\+ 1"):
        buf.add_episode(**{**ep, "observations": {"x": ep["observations"]["x"][:4]}})
    with pytest.raises(ValueError, match="finite"):
        buf.add_episode(**{**ep, "rewards": np.array([0, np.nan, 0, 0])})
    buf.add_episode(**ep)
    with pytest.raises(ValueError, match="differ"):
        buf.add_episode(**{**ep, "observations": {"x": ep["observations"]["x"]}})
    with pytest.raises(ValueError, match="per-step shape"):
        buf.add_episode(**{**ep, "actions": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="cannot be stored"):
        buf.add_episode(**{**ep, "observations": {**ep["observations"], "x": ep["observations"]["x"] + 0j}})
    with pytest.raises(ValueError, match="no cache"):
        buf.add_episode(**make_episode(1, 2, terminal=True, cache=True))
    assert buf.num_episodes == 1  # nothing half-added
    with_spec = ReplayBuffer(32, cache_spec=SPEC)
    with pytest.raises(ValueError, match="needs its cache"):
        with_spec.add_episode(**ep)
    bad = make_episode(1, 2, terminal=True, cache=True)
    bad["cache"]["noise"] = bad["cache"]["noise"][:, :1]
    with pytest.raises(ValueError, match="noise"):
        with_spec.add_episode(**bad)


# -- the frozen-actor cache -------------------------------------------------------------------------------


def test_cache_bytes_per_step_for_pi05_libero():
    from faster_vla.policies.config import PI05_LIBERO

    spec = FrozenActorCacheSpec.from_config(PI05_LIBERO)
    assert (spec.num_seeds, spec.action_horizon, spec.action_dim, spec.feature_dim) == (8, 10, 32, 4096)
    assert spec.nbytes_per_step == 4096 * 4 + 2 * 8 * 10 * 32 * 4 == 36_864
    # What the buffer actually allocates per row for it: the cache, an 8-d state, a 32-d action, reward, terminal.
    buf = ReplayBuffer(4, cache_spec=spec)
    rng = np.random.default_rng(0)
    noise = draw_cache_noise(rng, 2, spec)
    assert noise.shape == (2, 8, 10, 32) and noise.dtype == np.float32
    buf.add_episode({"state": np.zeros((2, 8), np.float32)}, np.zeros((1, 32), np.float32), np.zeros(1),
                    np.ones(1, bool), False,
                    {"features": np.zeros((2, 4096)), "noise": noise, "denoised": noise})
    assert buf._cache["features"].dtype == np.float32  # stored at the spec's precision
    assert buf.row_nbytes == 36_864 + 32 + 128 + 4 + 1 == 37_029
    assert buf.nbytes == 4 * 37_029


class _FakePrefix:
    def __init__(self, features):
        self.features = features


class _FakeActor:
    """encode: features = obs sum; denoise: chunk = 2·noise + features[0] (a per-observation, per-seed map)."""

    def encode(self, obs):
        return _FakePrefix(np.stack([obs.sum(-1), -obs.sum(-1)], -1))

    def denoise(self, prefix, noise, num_steps=10):
        assert num_steps == 5
        return 2 * noise + prefix.features[:, :1, None, None]


def test_frozen_actor_cache_maps_each_seed_through_its_observation():
    obs = np.arange(6, dtype=np.float32).reshape(3, 2)
    noise = draw_cache_noise(np.random.default_rng(1), 3, SPEC)
    cache = frozen_actor_cache(_FakeActor(), obs, noise, num_steps=5)
    SPEC.validate({**cache, "features": np.zeros((3, 4))}, 3)
    np.testing.assert_array_equal(cache["noise"], noise)
    np.testing.assert_array_equal(cache["features"], [[1, -1], [5, -5], [9, -9]])
    np.testing.assert_allclose(cache["denoised"], 2 * noise + np.array([1, 5, 9])[:, None, None, None])
    with pytest.raises(ValueError, match="noise must be"):
        frozen_actor_cache(_FakeActor(), obs, noise[0], num_steps=5)


def test_strided_windows_start_and_bootstrap_at_chunk_boundaries():
    """With observations only at chunk boundaries (stride = h), windows start at 0, h, 2h, … and bootstrap at
    t + h or at the episode's end; every other rule (returns, masks) is the unstrided one's."""
    buf = ReplayBuffer(64)
    buf.add_episode(**make_episode(0, 7, [0, 0, 0, 0, 0, 0, 1], terminal=True))  # done inside the 3rd chunk
    buf.add_episode(**make_episode(1, 9, [1] * 9, terminal=False))  # cut at 9: starts 0, 3, 6
    assert buf.num_windows(3, stride=3) == 3 + 3
    b = buf.all_windows(3, 0.5, stride=3)
    assert b.t.tolist() == [0, 3, 6, 0, 3, 6]
    assert b.next_observations["x"][:, 1].tolist() == [3, 6, 7, 3, 6, 9]
    full = buf.all_windows(3, 0.5)
    for i, (ep, t) in enumerate(zip(b.episode, b.t)):
        j = int(np.flatnonzero((full.episode == ep) & (full.t == t))[0])
        assert b.returns[i] == full.returns[j] and b.discount[i] == full.discount[j]
    sampled = buf.sample_windows(np.random.default_rng(0), 200, 3, 0.5, stride=3)
    assert set(sampled.t.tolist()) == {0, 3, 6}
    with pytest.raises(ValueError, match="stride"):
        buf.num_windows(3, stride=0)
