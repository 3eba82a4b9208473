"""Chunked TD (Q-chunking): h-step windows of one episode, their discounted returns, masks and TD targets.

Pure functions over numpy or JAX arrays (the namespace follows the inputs: any `jax.Array`, tracers
included, selects `jax.numpy`; otherwise numpy). Every function is jit-compatible with `h` static; `t0`,
`end` and `gamma` may be traced.

The rules, for a window of h steps starting at step t0 of an episode whose steps are t = 0..end-1
(reward r_t, terminal flag d_t = "the task ended successfully at step t, nothing follows"):

- step i of the window (i = 0..h-1) is *valid* iff t0+i < end and no terminal occurs strictly before
  it in the window (d_{t0+j} = 0 for all j < i). The terminal step itself is valid (its action was executed
  and its reward is earned); everything after it is padding;
- R = Σ_{i<h} γ^i · r_{t0+i} · valid_i (rewards after a terminal, or past the episode's end, count 0);
- bootstrap_mask = 1 iff the window holds no terminal and ends inside the episode (t0 + h ≤ end), so that
  s_{t0+h} exists; then y = R + γ^h · Q̄(s_{t0+h}, a'). With a terminal inside, y = R (mask 0);
- a window that runs past `end` without a terminal (a time-limit-truncated episode: its next state after
  the cut is unknown) is *invalid* (`window_valid` False): it cannot be bootstrapped exactly, and its
  R/mask (R of the steps that exist, mask 0) are not a correct target. Such windows must be weighted out;
  `faster_vla.rl.replay.ReplayBuffer` never samples them. A window ending exactly at a truncation
  (t0 + h = end) is valid and bootstraps from the episode's final observation s_end.

A window never crosses episodes: `end` is the episode's end; steps at or after it are never read as
rewards or terminals, whatever the array holds there.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

Array = Any  # numpy.ndarray or jax.Array


def _xp(*arrays: Any) -> Any:
    """jax.numpy if any argument is a JAX array (or tracer), else numpy. JAX is never imported here."""
    if "jax" in sys.modules:
        import jax

        if any(isinstance(a, jax.Array) for a in arrays):
            import jax.numpy as jnp

            return jnp
    return np


class Window(NamedTuple):
    """Everything about h-step windows starting at t0 (leading dims `...` = those of t0 and end)."""

    returns: Array  # [...] float: R = Σ_{i<h} γ^i r_{t0+i} valid_i
    bootstrap_mask: Array  # [...] float 0/1: 1 iff no terminal in the window and t0 + h <= end
    step_valid: Array  # [..., h] bool: step i executed (in the episode, not after a terminal)
    window_valid: Array  # [...] bool: a terminal inside, or t0 + h <= end (else: truncated, weight it out)


def window(rewards: Array, terminal: Array, t0: Array, h: int, gamma: Array, *, end: Array | None = None) -> Window:
    """The h-step windows starting at t0 (see the module docstring for the rules).

    rewards [n] float, terminal [n] bool (one episode, or a flat buffer of several with `end` marking the
    window's episode end); t0 [...] int start index; end [...] int exclusive end of t0's episode in the same
    indexing (default n); h static positive int; gamma scalar. Requires 0 <= t0 < end <= n (checked for
    numpy inputs).
    """
    if not isinstance(h, (int, np.integer)) or h < 1:
        raise ValueError(f"h must be a positive int, got {h!r}")
    xp = _xp(rewards, terminal, t0, end, gamma)
    rewards = xp.asarray(rewards)
    terminal = xp.asarray(terminal).astype(bool)
    if rewards.ndim != 1 or terminal.shape != rewards.shape:
        raise ValueError(f"rewards and terminal must be 1-D of equal length, got {rewards.shape}, {terminal.shape}")
    n = rewards.shape[0]
    t0 = xp.asarray(t0)
    end = xp.asarray(n if end is None else end)
    if xp is np:
        bad = (t0 < 0) | (t0 >= end) | (end > n)
        if np.any(bad):
            raise ValueError(f"need 0 <= t0 < end <= n = {n}; got t0 in [{t0.min()}, {t0.max()}], "
                             f"end in [{end.min()}, {end.max()}]")
    dtype = xp.result_type(rewards.dtype, xp.float32)
    offsets = xp.arange(h)  # [h]
    idx = t0[..., None] + offsets  # [..., h]
    in_range = idx < end[..., None]  # [..., h]
    safe = xp.clip(idx, 0, n - 1)
    r = rewards[safe].astype(dtype)  # [..., h]
    d = terminal[safe] & in_range  # [..., h] terminals the window can see
    d_count = d.astype(xp.int32)
    before = xp.cumsum(d_count, axis=-1) - d_count  # terminals strictly before step i
    step_valid = in_range & (before == 0)
    hit = xp.any(d, axis=-1)  # the first terminal is always a valid step
    powers = xp.asarray(gamma, dtype) ** offsets.astype(dtype)  # [h] γ^i
    returns = xp.sum(xp.where(step_valid, r * powers, xp.zeros((), dtype)), axis=-1)
    fits = t0 + h <= end
    bootstrap_mask = (~hit & fits).astype(dtype)
    return Window(returns, bootstrap_mask, step_valid, hit | fits)


def window_returns(
    rewards: Array, terminal: Array, t0: Array, h: int, gamma: Array, *, end: Array | None = None
) -> tuple[Array, Array, Array]:
    """(R [...], bootstrap_mask [...], step_valid [..., h]) of the h-step windows starting at t0.

    R = Σ_{i=0}^{h-1} γ^i · r_{t0+i} · valid_i, valid_i = (t0+i < end) ∧ (d_{t0+j} = 0 ∀ j < i);
    bootstrap_mask = [no terminal in the window] · [t0 + h <= end]. The window must be valid
    (`window_valid`); for an invalid one (truncated episode, no terminal, t0 + h > end) these values are
    not a correct target. See `window` for argument shapes.
    """
    w = window(rewards, terminal, t0, h, gamma, end=end)
    return w.returns, w.bootstrap_mask, w.step_valid


def window_valid(terminal: Array, t0: Array, h: int, *, end: Array | None = None) -> Array:
    """bool [...]: the window holds a terminal (d_{t0+i} = 1 for some t0+i < end, i < h) or t0 + h <= end."""
    xp = _xp(terminal, t0, end)
    terminal = xp.asarray(terminal)
    return window(xp.zeros(terminal.shape, xp.float32), terminal, t0, h, 1.0, end=end).window_valid


def bootstrap_discount(bootstrap_mask: Array, h: int, gamma: Array) -> Array:
    """[B]: γ^h · bootstrap_mask, the factor on Q̄(s_{t+h}, a') in the target."""
    return (gamma**h) * bootstrap_mask


def td_target(returns: Array, discount: Array, next_q: Array) -> Array:
    """y = R + discount · next_q, discount = γ^h · bootstrap_mask.

    returns [B], discount [B], next_q [..., B] (e.g. [B], or [E, B] per ensemble member; broadcast over the
    leading dims) -> y [..., B]. Apply stop_gradient to next_q (a target network's value) at the call site.
    """
    xp = _xp(returns, discount, next_q)
    return xp.asarray(returns) + xp.asarray(discount) * xp.asarray(next_q)
