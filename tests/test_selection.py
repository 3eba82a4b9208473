"""Selection rules with synthetic critics: who gets denoised, and which chunk wins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.rl.selection import SelectionConfig, pick_seed, select

B, N, H, A = 3, 6, 4, 2


def _pool(seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (B, N, H, A))


class Recorder:
    """A fake actor: chunk = 2·noise; remembers how many chunks each call denoised."""

    def __init__(self, noise):
        self.noise = noise
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, idx):
        self.calls.append(tuple(idx.shape))
        return 2.0 * jnp.take_along_axis(self.noise, idx[:, :, None, None], axis=1)


def score_noise(noise):  # prefers noise with a large first coordinate
    return noise[..., 0, 0]


def q_chunk(chunks):  # prefers chunks with a large sum
    return jnp.sum(chunks, axis=(-1, -2))


def edit(rng, chunks):  # a deterministic "improvement" for the tests
    return chunks + 0.5


def test_greedy_faster_denoises_only_the_best_seed_and_keeps_the_better_of_base_and_edit():
    pool = _pool()
    actor = Recorder(pool)
    out = select(SelectionConfig("faster", N), jax.random.key(1), pool, denoise=actor, score_noise=score_noise,
                 q_chunk=q_chunk, edit=edit)
    expected_idx = np.argmax(np.asarray(pool[..., 0, 0]), axis=1)
    np.testing.assert_array_equal(out.seed_index, expected_idx)
    assert actor.calls == [(B, 1)]  # one chunk per state, not N
    base = 2.0 * np.asarray(pool)[np.arange(B), expected_idx]
    np.testing.assert_allclose(out.base_action, base)
    np.testing.assert_allclose(out.action, base + 0.5)  # q_chunk prefers the +0.5 edit
    assert np.asarray(out.edited).all()


def test_best_of_n_denoises_everything_and_takes_the_best_of_2n():
    pool = _pool()
    actor = Recorder(pool)
    out = select(SelectionConfig("best_of_n", N), jax.random.key(1), pool, denoise=actor, q_chunk=q_chunk, edit=edit)
    assert actor.calls == [(B, N)]
    sums = np.asarray(2.0 * pool).sum(axis=(-1, -2))
    np.testing.assert_array_equal(out.seed_index, np.argmax(sums, axis=1))
    assert np.asarray(out.edited).all()


def test_idql_and_faster_idql_never_edit():
    pool = _pool()
    idql = select(SelectionConfig("idql", N), jax.random.key(1), pool, denoise=Recorder(pool), q_chunk=q_chunk)
    fidql = select(SelectionConfig("faster_idql", N), jax.random.key(1), pool, denoise=Recorder(pool),
                   score_noise=score_noise)
    for out in (idql, fidql):
        np.testing.assert_array_equal(out.action, out.base_action)
        assert not np.asarray(out.edited).any()


def test_base_rule_uses_seed_zero():
    pool = _pool()
    out = select(SelectionConfig("base", N), jax.random.key(1), pool, denoise=Recorder(pool))
    np.testing.assert_allclose(out.action, 2.0 * np.asarray(pool)[:, 0])


def test_softmax_selection_follows_the_z_scored_softmax():
    scores = jnp.asarray([[0.0, 1.0, 2.0, 4.0]])
    temperature = 0.7
    z = (np.asarray(scores[0]) - np.mean(scores[0])) / (np.std(scores[0]) + 1e-6)
    expected = np.exp(z / temperature) / np.exp(z / temperature).sum()
    draws = jax.vmap(lambda k: pick_seed(k, scores, temperature)[0])(jax.random.split(jax.random.key(0), 20000))
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert pick_seed(jax.random.key(0), scores, 0.0)[0] == 3


def test_selection_compiles():
    pool = _pool()
    denoise = lambda idx: 2.0 * jnp.take_along_axis(pool, idx[:, :, None, None], axis=1)  # noqa: E731
    fn = jax.jit(lambda rng: select(SelectionConfig("faster", N, 1.0), rng, pool, denoise=denoise,
                                    score_noise=score_noise, q_chunk=q_chunk, edit=edit).action)
    assert fn(jax.random.key(0)).shape == (B, H, A)


def test_bad_configurations_are_explained():
    with pytest.raises(ValueError, match="unknown selection rule"):
        SelectionConfig("greedy")
    with pytest.raises(ValueError, match="needs `score_noise`"):
        select(SelectionConfig("faster", N), jax.random.key(0), _pool(), denoise=Recorder(_pool()))
    with pytest.raises(ValueError, match="num_candidates=4"):
        select(SelectionConfig("base", 4), jax.random.key(0), _pool(), denoise=Recorder(_pool()))
