"""The general filtering MDP (paper §4.1–4.2): schedules, segment-wise denoising, actor-work accounting, eq. 1."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faster_vla.rl import filtering
from faster_vla.rl.filtering import FilterSchedule, filter_and_denoise, filter_critic_loss, filter_td_targets
from faster_vla.rl.selection import SelectionConfig, pick_seed, select

H, A = 3, 2


def _linear_score(seed: int = 0, h: int = H, a: int = A):
    """A fake step-conditioned critic: score(x, t) = <x, w> + t (distinct scores, no ties)."""
    w = jax.random.normal(jax.random.key(100 + seed), (h, a))
    return lambda x, t: jnp.einsum("bmha,ha->bm", x, w) + t


def _doubling_advance(num_steps: int):
    """A fake actor whose full denoise is chunk = 2·x: each step multiplies by 2^(1/T)."""
    return lambda x, s, e: x * (2.0 ** ((e - s) / num_steps))


# -- schedule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_candidates=0, num_steps=10, stages=((0, 1),)), "num_candidates"),
        (dict(num_candidates=4, num_steps=0, stages=((0, 1),)), "num_steps"),
        (dict(num_candidates=4, num_steps=10, stages=()), "at least one"),
        (dict(num_candidates=4, num_steps=10, stages=((10, 1),)), "out of range"),
        (dict(num_candidates=4, num_steps=10, stages=((-1, 1),)), "out of range"),
        (dict(num_candidates=4, num_steps=10, stages=((3, 2), (3, 1))), "strictly increasing"),
        (dict(num_candidates=4, num_steps=10, stages=((5, 2), (3, 1))), "strictly increasing"),
        (dict(num_candidates=4, num_steps=10, stages=((0, 2), (3, 2), (4, 1))), "strictly decreasing"),
        (dict(num_candidates=4, num_steps=10, stages=((0, 5), (3, 1))), "only num_candidates=4"),
        (dict(num_candidates=4, num_steps=10, stages=((0, 3), (3, 2))), "exactly 1"),
        (dict(num_candidates=4, num_steps=10, stages=((0, 0),)), "at least 1"),
        (dict(num_candidates=4, num_steps=10, stages=((0,),)), "pairs"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FilterSchedule(**kwargs)


def test_presets():
    assert filtering.initial_seed(8).stages == ((0, 1),)
    assert filtering.single_step(8, 4, 10).stages == ((4, 1),)
    assert filtering.successive_halving(8, 10).stages == ((0, 4), (1, 2), (2, 1))
    assert filtering.successive_halving(5, 10, every=3).stages == ((0, 3), (3, 2), (6, 1))
    with pytest.raises(ValueError, match="out of range"):
        filtering.single_step(8, 10, 10)
    with pytest.raises(ValueError, match="out of range"):
        filtering.successive_halving(64, 4, every=1)  # 6 stages do not fit in 4 steps
    s = FilterSchedule(8, 10, ((2, 4), (5, 2), (7, 1)))
    assert s.pool_sizes == (8, 4, 2)
    assert s.segments == ((8, 0, 2), (4, 2, 5), (2, 5, 7), (1, 7, 10))
    np.testing.assert_allclose(s.times, [0.8, 0.5, 0.3], atol=1e-6)
    hash(s)  # static jit argument


# -- actor-work accounting -------------------------------------------------------------------------------------


def _count_work(schedule: FilterSchedule, batch: int = 2) -> int:
    """Runs the filter with an advance that records its calls; returns Σ candidates × steps actually asked for."""
    calls = []

    def advance(x, s, e):
        assert 0 <= s < e <= schedule.num_steps
        calls.append((x.shape[1], s, e))
        return _doubling_advance(schedule.num_steps)(x, s, e)

    noise = jax.random.normal(jax.random.key(0), (batch, schedule.num_candidates, H, A))
    *_, visited = filter_and_denoise(schedule, jax.random.key(1), noise, advance=advance, score=_linear_score())
    assert tuple(calls) == schedule.segments
    assert visited["candidate_steps"] == schedule.candidate_steps
    return sum(m * (e - s) for m, s, e in calls)


@pytest.mark.parametrize("n, t", [(8, 10), (4, 7)])
def test_actor_work(n, t):
    assert _count_work(filtering.initial_seed(n, t)) == t
    for k in (0, 1, t // 2, t - 1):
        assert _count_work(filtering.single_step(n, k, t)) == n * k + (t - k)
    assert filtering.initial_seed(n, t).best_of_n_steps == n * t


def test_actor_work_multi_stage_by_hand():
    # 8 seeds for 2 steps, 4 for 3, 2 for 2, 1 for 3: 16 + 12 + 4 + 3.
    assert _count_work(FilterSchedule(8, 10, ((2, 4), (5, 2), (7, 1)))) == 35
    # halving 8 → 4 → 2 → 1 at steps 0, 1, 2: 4 + 2 + 8.
    assert _count_work(filtering.successive_halving(8, 10)) == 14


# -- agreement with selection.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_seed_reproduces_faster_idql(seed):
    n, t, b = 8, 10, 5
    noise = jax.random.normal(jax.random.key(seed), (b, n, H, A))
    score = _linear_score(seed)
    chunk, kept, visited = filter_and_denoise(filtering.initial_seed(n, t), jax.random.key(7), noise,
                                              advance=_doubling_advance(t), score=score)
    denoise = lambda idx: 2.0 * jnp.take_along_axis(noise, idx[:, :, None, None], axis=1)  # noqa: E731
    sel = select(SelectionConfig("faster_idql", n, 0.0), jax.random.key(7), noise, denoise=denoise,
                 score_noise=lambda x: score(x, 1.0))
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(sel.seed_index))
    # The chunk is 2·x on both paths (a power of two: exact). The scores are the same einsum traced inside two
    # different programs, whose reductions XLA may order differently: float32 rounding, not bits.
    np.testing.assert_array_equal(np.asarray(chunk), np.asarray(sel.action))
    np.testing.assert_allclose(np.asarray(visited["scores"][0]), np.asarray(sel.noise_scores), rtol=1e-6, atol=1e-6)
    assert float(visited["t"][0]) == 1.0


def test_temperature_sampling():
    scores = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0]])
    # m = 1 is exactly pick_seed's Gumbel-max draw with the same rng.
    for i in range(20):
        rng = jax.random.key(i)
        assert int(filtering.keep_top(rng, scores, 1, 0.7)[0, 0]) == int(pick_seed(rng, scores, 0.7)[0])
    # m > 1: distinct survivors; frequencies of the first pick follow softmax(z / T).
    draws = jax.vmap(lambda k: filtering.keep_top(k, scores, 3, 0.5)[0])(jax.random.split(jax.random.key(0), 4000))
    draws = np.asarray(draws)
    assert all(len(set(row)) == 3 for row in draws)
    z = (np.asarray(scores[0]) - np.mean(scores)) / (np.std(scores) + 1e-6)
    p = np.exp(z / 0.5) / np.sum(np.exp(z / 0.5))
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=5) / len(draws), p, atol=0.03)
    # Greedy: the top-m, best first.
    np.testing.assert_array_equal(np.asarray(filtering.keep_top(None, scores, 3, 0.0)), [[4, 3, 2]])
    with pytest.raises(ValueError, match="temperature"):
        filtering.keep_top(None, scores, 1, -1.0)


# -- the toy flow actor ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [filtering.initial_seed(6, 10), filtering.single_step(6, 4, 10), filtering.successive_halving(6, 10, 2),
     FilterSchedule(6, 10, ((3, 3), (8, 1)))],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_toy_segments_equal_full_denoise(schedule, temperature):
    from tests.toy_task import FlowActor, ToyTaskConfig

    task = ToyTaskConfig(horizon=H, num_steps=schedule.num_steps)
    actor = FlowActor(task)
    b = 4
    obs = jax.random.uniform(jax.random.key(3), (b, 4), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(4), (b, schedule.num_candidates, H, A))
    advance = filtering.flow_actor_advance(actor, obs)
    run = jax.jit(functools.partial(filter_and_denoise, schedule, advance=advance, score=_linear_score(),
                                    temperature=temperature))
    chunk, kept, visited = run(jax.random.key(5), noise)
    eager = filter_and_denoise(schedule, jax.random.key(5), noise, advance=advance, score=_linear_score(),
                               temperature=temperature)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(eager[1]))
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(eager[0]), atol=1e-6)

    seed = jnp.take_along_axis(noise, kept[:, None, None, None], axis=1)  # [B, 1, H, A]
    full = actor.denoise(obs, seed)[:, 0]
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(full), atol=1e-6)
    closed = actor.mean(obs) + (1 - 1 / schedule.num_steps) ** schedule.num_steps * (seed[:, 0] - actor.mean(obs))
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(closed), atol=1e-5)
    # Every stage's candidates are their own seeds advanced straight to that step.
    for x_t, k, idx in zip(visited["x_t"], visited["step"], visited["seed_index"]):
        direct = jnp.take_along_axis(noise, idx[:, :, None, None], axis=1)
        if int(k) > 0:
            direct = advance(direct, 0, int(k))
        np.testing.assert_allclose(np.asarray(x_t), np.asarray(direct), atol=1e-6)
    # Greedy survivors are the top-scored candidates of their stage.
    if temperature == 0.0:
        for scores, kept_pos in zip(visited["scores"], visited["kept"]):
            order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, : kept_pos.shape[1]]
            np.testing.assert_array_equal(np.asarray(kept_pos), order)


def test_filter_input_errors():
    s = filtering.initial_seed(4, 10)
    noise = jnp.zeros((2, 3, H, A))
    with pytest.raises(ValueError, match="num_candidates=4"):
        filter_and_denoise(s, jax.random.key(0), noise, advance=_doubling_advance(10), score=_linear_score())
    with pytest.raises(ValueError, match=r"\[B, N, H, A\]"):
        filter_and_denoise(s, jax.random.key(0), jnp.zeros((2, 4, H)), advance=_doubling_advance(10),
                           score=_linear_score())
    with pytest.raises(ValueError, match="score must return"):
        filter_and_denoise(s, jax.random.key(0), jnp.zeros((2, 4, H, A)), advance=_doubling_advance(10),
                           score=lambda x, t: jnp.zeros(x.shape[:1]))


# -- π0.5 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pi05_setup():
    from faster_vla.policies import pi05
    from tests.small_models import SMALL, perturbed_params, random_observation

    actor = pi05.Pi05Actor(SMALL, perturbed_params(SMALL))
    prefix = actor.encode(random_observation(SMALL, 2))
    return actor, prefix


@pytest.mark.parametrize("schedule", [filtering.single_step(3, 4, 10), FilterSchedule(3, 10, ((2, 2), (6, 1)))])
def test_pi05_segments_equal_full_denoise(pi05_setup, schedule):
    from tests.small_models import SMALL
    from tests.small_models import noise as small_noise

    actor, prefix = pi05_setup
    eps = small_noise(SMALL, 2, schedule.num_candidates, seed=3)
    score = _linear_score(1, SMALL.action_horizon, SMALL.action_dim)
    advance = filtering.pi05_advance(actor, prefix, schedule.num_steps)
    chunk, kept, visited = filter_and_denoise(schedule, jax.random.key(0), eps, advance=advance, score=score)
    seed = jnp.take_along_axis(eps, kept[:, None, None, None], axis=1)
    full, trajectory = actor.denoise(prefix, seed, schedule.num_steps, return_intermediates=True)
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(full[:, 0]), rtol=0, atol=1e-5)
    # The last stage's survivor is the kept seed's own trajectory at that step.
    k_last = int(visited["step"][-1])
    np.testing.assert_allclose(np.asarray(visited["kept_x_t"][-1]), np.asarray(trajectory.x_t[k_last]), atol=1e-5)
    with pytest.raises(ValueError, match="start_step < end_step"):
        advance(eps, 3, 3)


# -- eq. 1 -------------------------------------------------------------------------------------------------------


def test_td_targets_by_hand():
    # Stage 0 at step 0 keeps 2 of 3; stage 1 at step 3 keeps 1 of 2 (terminal). γ_dn = 0.9.
    visited = {
        "scores": (jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), jnp.asarray([[5.0, 4.0], [-1.0, -2.0]])),
        "step": (0, 3),
    }
    final_value = jnp.asarray([7.0, -3.0])
    y0, y1 = filter_td_targets(visited, final_value, 0.9)
    np.testing.assert_allclose(np.asarray(y1), [7.0, -3.0])  # r = Q^a(s, a_i*) at termination, no bootstrap
    np.testing.assert_allclose(np.asarray(y0), [0.9**3 * 5.0, 0.9**3 * -1.0], rtol=1e-6)  # 0 + γ^Δk · max Q̄^dn
    # Δk = 1: eq. 1 verbatim (one γ).
    y0, _ = filter_td_targets({**visited, "step": (4, 5)}, final_value, 0.9)
    np.testing.assert_allclose(np.asarray(y0), [4.5, -0.9], rtol=1e-6)
    # One stage at k = 0 (§4.3): the target is Q^a of the executed action (L_reg).
    (y,) = filter_td_targets({"scores": visited["scores"][:1], "step": (0,)}, final_value, 0.9)
    np.testing.assert_allclose(np.asarray(y), [7.0, -3.0])


def test_td_targets_from_a_run_use_next_stage_max():
    s = FilterSchedule(6, 10, ((1, 3), (4, 2), (6, 1)))
    noise = jax.random.normal(jax.random.key(0), (3, 6, H, A))
    _, _, visited = filter_and_denoise(s, jax.random.key(1), noise, advance=_doubling_advance(10),
                                       score=_linear_score())
    final_value = jnp.asarray([1.0, 2.0, 3.0])
    y = filter_td_targets(visited, final_value, 0.8)
    assert len(y) == 3
    np.testing.assert_allclose(np.asarray(y[2]), np.asarray(final_value))
    np.testing.assert_allclose(np.asarray(y[1]), 0.8**2 * np.max(np.asarray(visited["scores"][2]), -1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y[0]), 0.8**3 * np.max(np.asarray(visited["scores"][1]), -1), rtol=1e-6)


def test_loss_by_hand_and_stop_gradient():
    # Two members: q_e(x, t) = c_e · Σx + t.
    def apply_fn(params, inputs, x, t):
        total = jnp.sum(x, axis=(-2, -1))  # [B, m]
        return params["c"][:, None, None] * total[None] + t

    visited = {
        "kept_x_t": (jnp.ones((1, 2, H, A)) * jnp.asarray([1.0, 2.0])[None, :, None, None], jnp.ones((1, 1, H, A))),
        "t": (1.0, 0.5),
    }
    params = {"c": jnp.asarray([1.0, 2.0])}
    targets = (jnp.asarray([10.0]), jnp.asarray([4.0]))
    n = H * A  # Σx of a ones block
    # stage 0, max over survivors: member 1: 2n + 1, member 2: 4n + 1; stage 1: n + 0.5, 2n + 0.5.
    stage0 = np.mean([(2 * n + 1 - 10) ** 2, (4 * n + 1 - 10) ** 2])
    stage1 = np.mean([(n + 0.5 - 4) ** 2, (2 * n + 0.5 - 4) ** 2])
    loss = filter_critic_loss(params, apply_fn, {}, visited, targets)
    np.testing.assert_allclose(float(loss), (stage0 + stage1) / 2, rtol=1e-6)
    each0 = np.mean([(n + 1 - 10) ** 2, (2 * n + 1 - 10) ** 2, (2 * n + 1 - 10) ** 2, (4 * n + 1 - 10) ** 2])
    loss_each = filter_critic_loss(params, apply_fn, {}, visited, targets, reduce="each")
    np.testing.assert_allclose(float(loss_each), (each0 + stage1) / 2, rtol=1e-6)
    grad_targets = jax.grad(lambda y: filter_critic_loss(params, apply_fn, {}, visited, y))(targets)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grad_targets)
    assert float(jnp.abs(jax.grad(lambda p: filter_critic_loss(p, apply_fn, {}, visited, targets))(params)["c"]).sum()) > 0
    with pytest.raises(ValueError, match="targets for"):
        filter_critic_loss(params, apply_fn, {}, visited, targets[:1])


def test_noise_critic_learns_td_targets_on_toy():
    from faster_vla.critics.encoders import EncoderConfig
    from faster_vla.critics.networks import NoiseCritic, NoiseCriticConfig, min_of_random_pair
    from tests.toy_task import FlowActor, ToyTaskConfig, toy_features

    task = ToyTaskConfig(horizon=H, num_steps=10)
    actor = FlowActor(task)
    encoder = EncoderConfig(kind="backbone", state_dim=4, state_embed_dim=8, feature_dim=8, feature_proj_dim=16)
    critic = NoiseCritic(NoiseCriticConfig(encoder=encoder, noise_shape=(H, A), hidden_dims=(32, 32), num_members=4,
                                           time_conditioned=True, time_embed_dim=8))
    b = 16
    obs = jax.random.uniform(jax.random.key(0), (b, 4), minval=-1, maxval=1)
    inputs = {"features": toy_features(obs), "state": obs}
    noise = jax.random.normal(jax.random.key(1), (b, 6, H, A))
    params = critic.init(jax.random.key(2), inputs, noise, 1.0)
    target_params = params

    schedule = filtering.successive_halving(6, 10, every=2)
    score = lambda x, t: min_of_random_pair(critic.apply(target_params, inputs, x, t), jax.random.key(3))  # noqa: E731
    chunk, _, visited = filter_and_denoise(schedule, jax.random.key(4), noise,
                                           advance=filtering.flow_actor_advance(actor, obs), score=score)
    final_value = -jnp.sum(jnp.square(chunk - (obs[:, 2:] - obs[:, :2])[:, None]), axis=(-2, -1))  # a stand-in Q^a
    targets = filter_td_targets(visited, final_value, 0.99)
    assert len(targets) == len(schedule.stages) and all(y.shape == (b,) for y in targets)

    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s):  # returns the loss before the update
        loss, grads = jax.value_and_grad(lambda q: filter_critic_loss(q, critic.apply, inputs, visited, targets))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(61):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    first, last = losses[0], losses[-1]
    assert np.isfinite(first) and last < 0.2 * first, (first, last)


# -- the frozen-actor cache stands in for the actor -------------------------------------------------------------


@pytest.mark.parametrize("schedule", [filtering.successive_halving(4, 10, 2), FilterSchedule(4, 10, ((3, 2), (7, 1)))])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pi05_cache_lookup_equals_advancing_the_actor(pi05_setup, schedule, temperature):
    """A filter replayed from `frozen_actor_cache` (x_t of every seed at the filter steps) makes the same choices
    and the same x_t as one that runs π0.5 segment by segment: updates can train Q^dn without the actor."""
    from faster_vla.acting.frozen_cache import frozen_actor_cache
    from faster_vla.rl.replay import FrozenActorCacheSpec
    from tests.small_models import SMALL, random_observation
    from tests.small_models import noise as small_noise

    actor, prefix = pi05_setup
    obs = random_observation(SMALL, 2)
    eps = small_noise(SMALL, 2, schedule.num_candidates, seed=7)
    steps = filtering.cached_steps(schedule)
    cache = frozen_actor_cache(actor, obs, eps, num_steps=schedule.num_steps, intermediate_steps=steps)
    spec = FrozenActorCacheSpec.from_config(SMALL, schedule.num_candidates, steps)
    spec.validate(cache, 2)
    assert cache["x_t"].shape == (2, schedule.num_candidates, len(steps), SMALL.action_horizon, SMALL.action_dim)

    score = _linear_score(1, SMALL.action_horizon, SMALL.action_dim)
    live = filter_and_denoise(schedule, jax.random.key(1), eps, advance=filtering.pi05_advance(actor, prefix),
                              score=score, temperature=temperature)
    lookup = filtering.cache_lookup(*(jnp.asarray(cache[k]) for k in ("noise", "x_t", "denoised")), steps,
                                    schedule.num_steps)
    cached = filter_and_denoise(schedule, jax.random.key(1), eps, lookup=lookup, score=score, temperature=temperature)
    np.testing.assert_array_equal(np.asarray(live[1]), np.asarray(cached[1]))
    np.testing.assert_allclose(np.asarray(live[0]), np.asarray(cached[0]), atol=1e-5)
    for a, b in zip(live[2]["x_t"], cached[2]["x_t"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for a, b in zip(live[2]["kept"], cached[2]["kept"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lookup_errors():
    schedule = FilterSchedule(4, 10, ((3, 2), (7, 1)))
    noise = jnp.zeros((2, 4, H, A))
    with pytest.raises(ValueError, match="exactly one"):
        filter_and_denoise(schedule, jax.random.key(0), noise, score=_linear_score())
    lookup = filtering.cache_lookup(noise, jnp.zeros((2, 4, 1, H, A)), noise, (3,), 10)  # step 7 missing
    with pytest.raises(ValueError, match="step 7 is not cached"):
        filter_and_denoise(schedule, jax.random.key(0), noise, lookup=lookup, score=_linear_score())
    from faster_vla.rl.replay import FrozenActorCacheSpec

    with pytest.raises(ValueError, match="strictly increasing"):
        FrozenActorCacheSpec(intermediate_steps=(3, 3))
