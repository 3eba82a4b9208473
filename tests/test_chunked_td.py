"""Chunked TD windows: hand-computed returns and masks, a brute-force cross-check, numpy and JAX alike."""

from __future__ import annotations

import numpy as np
import pytest

from faster_vla.rl import chunked_td
from faster_vla.rl.chunked_td import bootstrap_discount, td_target, window, window_returns, window_valid


def test_terminal_episode_windows_by_hand():
    # γ = 0.5, h = 3, rewards [0, 0, 1], success at step 2.
    rewards, terminal = np.array([0.0, 0.0, 1.0]), np.array([False, False, True])
    expected = {  # t0: (R, mask, step_valid)
        0: (0.25, 0.0, [True, True, True]),  # 0 + 0.5·0 + 0.25·1; the terminal is the window's last step
        1: (0.5, 0.0, [True, True, False]),  # 0 + 0.5·1; step 3 would be after the terminal
        2: (1.0, 0.0, [True, False, False]),
    }
    for t0, (r, m, valid) in expected.items():
        R, mask, step_valid = window_returns(rewards, terminal, t0, 3, 0.5)
        assert float(R) == r and float(mask) == m
        assert step_valid.tolist() == valid
        assert bool(window_valid(terminal, t0, 3))


def test_rewards_after_a_terminal_are_masked():
    rewards = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    terminal = np.array([False, False, True, False, False])
    R, mask, step_valid = window_returns(rewards, terminal, 1, 3, 0.5)
    assert float(R) == 2.0 + 0.5 * 4.0  # 8 (after the terminal) does not count
    assert float(mask) == 0.0 and step_valid.tolist() == [True, True, False]
    # A window ending just before the terminal bootstraps.
    R, mask, step_valid = window_returns(rewards, terminal, 0, 2, 0.5)
    assert (float(R), float(mask), step_valid.tolist()) == (1.0 + 0.5 * 2.0, 1.0, [True, True])


def test_truncated_episode_windows_by_hand():
    rewards, terminal = np.ones(4), np.zeros(4, bool)  # cut by the time limit after 4 steps
    for t0 in (0, 1):  # t0 = 1 ends exactly at the cut: bootstraps from the final observation
        R, mask, step_valid = window_returns(rewards, terminal, t0, 3, 0.5)
        assert (float(R), float(mask)) == (1.75, 1.0) and step_valid.all()
        assert bool(window_valid(terminal, t0, 3))
    for t0 in (2, 3):  # runs past the cut without a terminal: not a valid target
        w = window(rewards, terminal, t0, 3, 0.5)
        assert not bool(w.window_valid)
        assert float(w.bootstrap_mask) == 0.0
        assert w.step_valid.tolist() == [True] * (4 - t0) + [False] * (t0 - 1)


def test_end_keeps_windows_inside_their_episode():
    # Two episodes back to back in one flat array: A = steps 0..2 (truncated), B = steps 3..4 (terminal at 4).
    rewards = np.array([1.0, 1.0, 1.0, 10.0, 10.0])
    terminal = np.array([False, False, False, False, True])
    t0, end = np.array([0, 1, 2, 3, 4]), np.array([3, 3, 3, 5, 5])
    w = window(rewards, terminal, t0, 2, 0.5, end=end)
    np.testing.assert_array_equal(w.returns, [1.5, 1.5, 1.0, 15.0, 10.0])  # A's windows never read B's 10s
    np.testing.assert_array_equal(w.bootstrap_mask, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(w.window_valid, [True, True, False, True, True])
    np.testing.assert_array_equal(w.step_valid, [[1, 1], [1, 1], [1, 0], [1, 1], [1, 0]])
    # A terminal just past `end` belongs to the next episode and is not seen.
    terminal2 = np.array([False, False, False, True, False])
    assert not bool(window_valid(terminal2, 2, 2, end=3))


def _reference(rewards, terminal, t0, end, h, gamma):
    """The rules read literally, one step at a time."""
    R, valid, hit = 0.0, [], False
    for i in range(h):
        ok = t0 + i < end and not hit
        valid.append(ok)
        if ok:
            R += gamma**i * rewards[t0 + i]
            hit = hit or bool(terminal[t0 + i])
    fits = t0 + h <= end
    return R, float(fits and not hit), valid, hit or fits


def test_matches_brute_force_on_random_episodes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        rewards = rng.normal(size=n)
        terminal = rng.random(n) < 0.2
        h = int(rng.integers(1, 6))
        gamma = float(rng.uniform(0.5, 1.0))
        end = int(rng.integers(1, n + 1))
        t0 = np.arange(end)
        w = window(rewards, terminal, t0, h, gamma, end=end)
        for i, t in enumerate(t0):
            R, mask, valid, ok = _reference(rewards, terminal, int(t), end, h, gamma)
            np.testing.assert_allclose(w.returns[i], R, rtol=1e-12, atol=1e-12)
            assert w.bootstrap_mask[i] == mask and w.step_valid[i].tolist() == valid and w.window_valid[i] == ok


def test_dtypes_follow_rewards():
    w = window(np.ones(4, np.float32), np.zeros(4, bool), np.arange(2), 3, 0.9)
    assert w.returns.dtype == np.float32 and w.bootstrap_mask.dtype == np.float32 and w.step_valid.dtype == bool
    assert window(np.ones(4), np.zeros(4, bool), 0, 3, 0.9).returns.dtype == np.float64


def test_td_target_and_discount():
    R = np.array([1.0, 2.0, 0.5])
    mask = np.array([1.0, 0.0, 1.0])
    discount = bootstrap_discount(mask, 3, 0.5)
    np.testing.assert_array_equal(discount, [0.125, 0.0, 0.125])
    np.testing.assert_array_equal(td_target(R, discount, np.array([8.0, 100.0, -8.0])), [2.0, 2.0, -0.5])
    # Per-member targets broadcast over leading ensemble dims.
    next_q = np.array([[8.0, 100.0, -8.0], [0.0, 1.0, 8.0]])
    np.testing.assert_array_equal(td_target(R, discount, next_q), [[2.0, 2.0, -0.5], [1.0, 2.0, 1.5]])


def test_jax_jit_matches_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=9).astype(np.float32)
    terminal = np.zeros(9, bool)
    terminal[6] = True
    t0, end = np.array([0, 2, 5, 6, 7, 8]), np.array([7, 7, 7, 7, 9, 9])

    @jax.jit
    def f(rewards, terminal, t0, end, gamma):
        w = chunked_td.window(rewards, terminal, t0, 4, gamma, end=end)
        y = td_target(w.returns, bootstrap_discount(w.bootstrap_mask, 4, gamma), jnp.ones_like(w.returns))
        return w, y

    w_j, y_j = f(jnp.asarray(rewards), jnp.asarray(terminal), jnp.asarray(t0), jnp.asarray(end), 0.9)
    assert isinstance(w_j.returns, jax.Array)
    w_n = window(rewards, terminal, t0, 4, 0.9, end=end)
    for a, b in zip(w_j, w_n, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y_j), w_n.returns + 0.9**4 * w_n.bootstrap_mask, rtol=1e-6)


def test_bad_arguments():
    rewards, terminal = np.zeros(4), np.zeros(4, bool)
    with pytest.raises(ValueError, match="t0"):
        window_returns(rewards, terminal, 4, 2, 0.9)
    with pytest.raises(ValueError, match="t0"):
        window_returns(rewards, terminal, np.array([0, 2]), 2, 0.9, end=2)
    with pytest.raises(ValueError, match="h must be"):
        window_returns(rewards, terminal, 0, 0, 0.9)
    with pytest.raises(ValueError, match="1-D"):
        window_returns(rewards, terminal[:3], 0, 2, 0.9)
