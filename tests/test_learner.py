"""The learner: updates run on cached actor outputs, and the cache changes nothing but the cost."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faster_vla.rl.learner import Learner
from tests.toy_task import FlowActor, ToyRunConfig, ToyTaskConfig, toy_features, toy_learner_config

TASK = ToyTaskConfig()
B, N = 16, 8


def _batch(actor: FlowActor, seed: int = 0, utd: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    h, a = TASK.horizon, TASK.action_dim

    def leading(*shape):
        return (utd, *shape) if utd else shape

    obs = rng.uniform(-1, 1, leading(B, 4)).astype(np.float32)
    next_obs = rng.uniform(-1, 1, leading(B, 4)).astype(np.float32)
    noise = rng.normal(size=leading(B, N, h, a)).astype(np.float32)
    next_noise = rng.normal(size=leading(B, N, h, a)).astype(np.float32)
    flat = lambda x: x.reshape(-1, *x.shape[-3:]) if utd else x  # noqa: E731
    denoise = lambda o, e: np.asarray(actor.denoise(jnp.asarray(o.reshape(-1, 4)), jnp.asarray(flat(e)))).reshape(e.shape)  # noqa: E731
    return {
        "inputs": {"features": np.asarray(toy_features(obs)), "state": obs},
        "next_inputs": {"features": np.asarray(toy_features(next_obs)), "state": next_obs},
        "actions": rng.uniform(-1, 1, leading(B, h * a)).astype(np.float32),
        "returns": rng.normal(size=leading(B)).astype(np.float32),
        "discount": (0.99 ** h * (rng.uniform(size=leading(B)) > 0.2)).astype(np.float32),
        "cache": {"noise": noise, "denoised": denoise(obs, noise)},
        "next_cache": {"noise": next_noise, "denoised": denoise(next_obs, next_noise)},
    }


def _learner(rule: str, **overrides) -> Learner:
    config = toy_learner_config(TASK, ToyRunConfig(rule=rule, hidden=32, members=4, utd=2, batch_size=B))
    config = dataclasses.replace(config, **overrides)
    example = jnp.zeros((1, 4))
    return Learner.create(config, {"features": toy_features(example), "state": example}, seed=0)


@pytest.mark.parametrize("rule", ["faster", "best_of_n", "faster_idql", "base"])
def test_cached_and_recomputed_next_actions_give_the_same_targets(rule):
    actor = FlowActor(TASK)
    learner = _learner(rule)
    batch = jax.tree.map(jnp.asarray, _batch(actor))
    rng = jax.random.key(3)
    cached = learner.td_target(batch, rng)

    def run_actor(idx):  # what an update without the cache must do: run the actor on s_{t+h}
        noise = jnp.take_along_axis(batch["next_cache"]["noise"], idx[:, :, None, None], axis=1)
        return actor.denoise(batch["next_inputs"]["state"], noise)

    recomputed = learner.td_target(batch, rng, next_denoise=run_actor)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(recomputed), rtol=1e-6, atol=1e-6)
    # The discount really masks: a terminal window's target is its return.
    terminal = np.asarray(batch["discount"]) == 0
    np.testing.assert_allclose(np.asarray(cached)[terminal], np.asarray(batch["returns"])[terminal], rtol=1e-6)


@pytest.mark.parametrize("noise_target", ["kept", "all"])
def test_update_trains_both_critics_and_moves_targets_slowly(noise_target):
    learner = _learner("faster", noise_target=noise_target)
    batch = jax.tree.map(jnp.asarray, _batch(FlowActor(TASK), utd=2))
    new, info = learner.update(batch)
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in info.values())
    for online, target, before in ((new.chunk_critic.params, new.chunk_target, learner.chunk_target),
                                   (new.noise_critic.params, new.noise_target, learner.noise_target)):
        moved_online = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(online), jax.tree.leaves(before)))
        moved_target = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(before)))
        assert 0 < moved_target < moved_online  # Polyak: the target trails the online network
    assert float(jnp.abs(new.edit_policy.params["params"]["mean_head"]["kernel"]
                         - learner.edit_policy.params["params"]["mean_head"]["kernel"]).max()) > 0


def test_repeated_updates_fit_the_critic():
    learner = _learner("faster")
    batch = jax.tree.map(jnp.asarray, _batch(FlowActor(TASK), utd=2))
    losses = []
    for _ in range(30):
        learner, info = learner.update(batch)
        losses.append(float(info["critic_loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_mismatched_shapes_are_refused():
    config = toy_learner_config(TASK, ToyRunConfig())
    with pytest.raises(ValueError, match="same chunk shape"):
        dataclasses.replace(config, edit_policy=dataclasses.replace(config.edit_policy, chunk_shape=(3, 2)))


# -- the general filtering MDP (paper §4.1–4.2) wired into the learner ------------------------------------------

def _filter_learner(schedule) -> Learner:
    base = toy_learner_config(TASK, ToyRunConfig(rule="faster", hidden=32, members=4, utd=2, batch_size=B))
    config = dataclasses.replace(base, filter_schedule=schedule, filter_gamma=0.9, noise_target="kept",
                                 noise_critic=dataclasses.replace(base.noise_critic, time_conditioned=True))
    example = jnp.zeros((1, 4))
    return Learner.create(config, {"features": toy_features(example), "state": example}, seed=0)


def _with_intermediates(actor: FlowActor, batch: dict, schedule, utd: int | None = None) -> dict:
    """Adds the frozen-actor cache's x_t [.., K, S, H, A] at the schedule's filter steps to cache and next_cache."""
    from faster_vla.rl.filtering import cached_steps, flow_actor_advance

    steps = cached_steps(schedule)
    for cache_key, inputs_key in (("cache", "inputs"), ("next_cache", "next_inputs")):
        obs = np.asarray(batch[inputs_key]["state"]).reshape(-1, 4)
        noise = np.asarray(batch[cache_key]["noise"])
        flat = noise.reshape(-1, *noise.shape[-3:])
        advance = flow_actor_advance(actor, jnp.asarray(obs))
        x_t = np.stack([np.asarray(advance(jnp.asarray(flat), 0, k)) for k in steps], axis=2)
        batch[cache_key]["x_t"] = x_t.reshape(*noise.shape[:-2], len(steps), *noise.shape[-2:])
    return batch


@pytest.mark.parametrize("stages", [((0, 4), (1, 2), (2, 1)), ((3, 2), (7, 1))])
def test_filter_td_target_from_cache_equals_running_the_actor(stages):
    from faster_vla.critics.networks import min_of_random_pair
    from faster_vla.rl.filtering import FilterSchedule, flow_actor_advance

    schedule = FilterSchedule(N, TASK.num_steps, stages)
    actor = FlowActor(TASK)
    learner = _filter_learner(schedule)
    batch = jax.tree.map(jnp.asarray, _with_intermediates(actor, _batch(actor), schedule))
    rng = jax.random.key(3)
    cached = learner.td_target(batch, rng)

    # Without the cache: the acting rule at s' runs the actor segment by segment, continuing only survivors.
    k_sel, k_target = jax.random.split(rng)
    next_obs = batch["next_inputs"]["state"]
    live = learner.select(k_sel, batch["next_inputs"], batch["next_cache"]["noise"],
                          denoise=lambda idx: pytest.fail("the filter must not denoise whole seeds"),
                          advance=flow_actor_advance(actor, next_obs))
    q = learner.chunk_critic.apply_fn(learner.chunk_target, batch["next_inputs"], live.action)
    expected = batch["returns"] + batch["discount"] * min_of_random_pair(q, k_target)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_filter_update_trains_a_step_conditioned_noise_critic():
    from faster_vla.rl.filtering import successive_halving

    schedule = successive_halving(N, TASK.num_steps)  # ((0, 4), (1, 2), (2, 1))
    actor = FlowActor(TASK)
    learner = _filter_learner(schedule)
    batch = jax.tree.map(jnp.asarray, _with_intermediates(actor, _batch(actor, utd=2), schedule, utd=2))
    losses = []
    new = learner
    for _ in range(25):
        new, info = new.update(batch)
        losses.append(float(info["noise_critic_loss"]))
    assert all(np.isfinite(float(v)) for v in info.values())
    assert losses[-1] < 0.5 * losses[0]
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.noise_critic.params),
                                                          jax.tree.leaves(learner.noise_critic.params)))
    assert moved > 0
    # A cache without the filter steps' x_t is refused with the fix in the message.
    del batch["cache"]["x_t"]
    with pytest.raises(ValueError, match="intermediate_steps=cached_steps"):
        learner.update(batch)


def test_filter_config_errors():
    from faster_vla.rl.filtering import successive_halving

    base = dataclasses.replace(toy_learner_config(TASK, ToyRunConfig(rule="faster")), noise_target="kept")
    timed = dataclasses.replace(base.noise_critic, time_conditioned=True)
    with pytest.raises(ValueError, match="time_conditioned=True"):
        dataclasses.replace(base, filter_schedule=successive_halving(8))
    with pytest.raises(ValueError, match="uses none"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(8),
                            selection=dataclasses.replace(base.selection, rule="best_of_n"))
    with pytest.raises(ValueError, match="must equal"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(4))
    with pytest.raises(ValueError, match="noise_target"):
        dataclasses.replace(base, noise_critic=timed, filter_schedule=successive_halving(8), noise_target="all")
    learner = _filter_learner(successive_halving(N, TASK.num_steps))
    with pytest.raises(ValueError, match="pass `advance`"):
        learner.select(jax.random.key(0), {"features": toy_features(jnp.zeros((1, 4))), "state": jnp.zeros((1, 4))},
                       jnp.zeros((1, N, TASK.horizon, TASK.action_dim)), denoise=lambda idx: None)


class _ToyNextDenoiser:
    """Runs the toy actor at s_{t+h} inside the update (what the cache saves); hashable for jit."""

    def __init__(self, actor: FlowActor) -> None:
        self.actor = actor

    def __call__(self, minibatch: dict):
        def denoise(idx):
            seeds = jnp.take_along_axis(minibatch["next_cache"]["noise"], idx[:, :, None, None], axis=1)
            return self.actor._denoise_impl(minibatch["next_inputs"]["state"], seeds)
        return denoise


def test_update_flops_count_the_actor_only_without_the_cache():
    actor = FlowActor(TASK)
    learner = _learner("best_of_n")
    batch = jax.tree.map(jnp.asarray, _batch(actor, utd=2))
    cached = learner.update_flops(batch)
    recomputed = learner.update_flops(batch, _ToyNextDenoiser(actor))
    assert cached > 0
    assert recomputed > cached  # the same update plus the actor's denoising of N seeds at every s_{t+h}


# -- the FASTER authors' forms (issue 18 part 0): fresh seed draws, the split TD backup, α in edit space ----------

def _wide_cache(actor: FlowActor, batch: dict, k: int, seed: int = 1) -> dict:
    """`batch` with K = k seeds per row in cache and next_cache (noises drawn anew, their chunks by the actor)."""
    rng = np.random.default_rng(seed)
    out = dict(batch)
    for cache_key, inputs_key in (("cache", "inputs"), ("next_cache", "next_inputs")):
        lead = np.asarray(batch[cache_key]["noise"]).shape[:-3]  # [B] or [utd, B]
        noise = rng.normal(size=(*lead[:-1], lead[-1], k, TASK.horizon, TASK.action_dim)).astype(np.float32)
        obs = np.asarray(batch[inputs_key]["state"])
        denoised = actor.denoise(jnp.asarray(obs.reshape(-1, 4)), jnp.asarray(noise.reshape(-1, k, *noise.shape[-2:])))
        out[cache_key] = {"noise": noise, "denoised": np.asarray(denoised).reshape(noise.shape)}
    return out


def test_draw_pools_takes_n_distinct_seeds_per_row_with_their_chunks():
    from faster_vla.rl.learner import draw_pools

    b, k, n = 6, 12, 4
    noise = jnp.arange(b * k, dtype=jnp.float32).reshape(b, k, 1, 1) * jnp.ones((1, 1, 2, 3))
    cache = {"noise": noise, "denoised": -noise, "x_t": jnp.stack([noise, 2 * noise], axis=2)}  # x_t [b, k, 2, 2, 3]
    drawn = draw_pools(jax.random.key(0), cache, n)
    ids = np.asarray(drawn["noise"][:, :, 0, 0]).astype(int)  # [b, n] the seeds' global ids
    assert drawn["noise"].shape == (b, n, 2, 3) and drawn["x_t"].shape == (b, n, 2, 2, 3)
    for row in range(b):
        assert len(set(ids[row])) == n and all(row * k <= i < (row + 1) * k for i in ids[row])  # its own, distinct
    # Every field is gathered with the same indices: a seed keeps its chunk and its x_t.
    np.testing.assert_array_equal(np.asarray(drawn["denoised"]), -np.asarray(drawn["noise"]))
    np.testing.assert_array_equal(np.asarray(drawn["x_t"][:, :, 1]), 2 * np.asarray(drawn["noise"]))
    # Another key, another draw; the rows do not all draw the same positions.
    other = np.asarray(draw_pools(jax.random.key(1), cache, n)["noise"][:, :, 0, 0]).astype(int)
    assert not np.array_equal(np.sort(ids, axis=1), np.sort(other, axis=1))
    assert len({tuple(sorted(r % k)) for r in ids}) > 1
    # K = N: the frozen pool, untouched; K < N: refused, naming the flag.
    assert draw_pools(jax.random.key(0), cache, k) is cache
    with pytest.raises(ValueError, match=r"holds 12 seeds per row but selection.num_candidates is 13.*--cache-seeds"):
        draw_pools(jax.random.key(0), cache, k + 1)


def test_each_critic_step_draws_new_seeds_and_a_resumed_learner_draws_the_same(tmp_path, monkeypatch):
    import faster_vla.rl.learner as learner_module
    from faster_vla.rl.replay import ReplayBuffer
    from faster_vla.runs.checkpoint import RunCheckpointer

    actor = FlowActor(TASK)
    batch = _wide_cache(actor, _batch(actor, utd=2), k=16)
    # Both critic steps of an update see the same rows and the same 16 cached seeds, so any difference between
    # their pools is the draw.
    batch = jax.tree.map(lambda x: jnp.asarray(np.stack([x[0], x[0]])), batch)
    drawn: list[np.ndarray] = []
    real = learner_module.draw_pools

    def recording(rng, cache, n):
        out = real(rng, cache, n)
        drawn.append(np.asarray(out["noise"]))
        return out

    monkeypatch.setattr(learner_module, "draw_pools", recording)

    def update(learner: Learner) -> tuple[Learner, list[np.ndarray]]:
        drawn.clear()
        with jax.disable_jit():  # traced anew, so the recording draw_pools runs with concrete values
            new, _ = learner.update(batch)
        return new, list(drawn)  # per critic step: [cache pool, next_cache pool]

    first, draws_1 = update(_learner("faster"))
    assert len(draws_1) == 4 and all(d.shape == (B, N, TASK.horizon, TASK.action_dim) for d in draws_1)
    assert not np.array_equal(draws_1[0], draws_1[2])  # step 1 and step 2 draw other seeds for the same rows
    assert not np.array_equal(draws_1[1], draws_1[3])

    # A checkpoint round trip (as --resume does) carries the learner's key, so the next draws are the same.
    ckpt = RunCheckpointer(tmp_path / "ckpt")
    ckpt.save(1, first, ReplayBuffer(8), np.random.default_rng(0), {"episodes": 1})
    template = jax.eval_shape(lambda: _learner("faster"))
    restored = RunCheckpointer(tmp_path / "ckpt").restore_latest(template).learner
    continued, draws_2 = update(first)
    resumed, draws_2r = update(restored)
    for a, b in zip(draws_2, draws_2r, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(draws_2[0], draws_1[0])  # the next update draws anew
    for a, b in zip(jax.tree.leaves(continued.chunk_critic.params), jax.tree.leaves(resumed.chunk_critic.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_update_reads_the_seeds_beyond_the_first_n():
    actor = FlowActor(TASK)
    wide = jax.tree.map(jnp.asarray, _wide_cache(actor, _batch(actor, utd=2), k=3 * N))
    learner = _learner("faster")
    new, _ = learner.update(wide)
    # Change only seeds N.. of every row (noise and chunk): with K = N they would never be read.
    moved = {part: {k: v.at[:, :, N:].multiply(-1.0) for k, v in wide[part].items()} for part in ("cache", "next_cache")}
    other, _ = learner.update(wide | moved)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.noise_critic.params),
                                                          jax.tree.leaves(other.noise_critic.params)))
    assert diff > 0


class _TableCritic:
    """A stand-in target Q^a for hand-computed TD targets: member e values candidate c at T[e, c], where the
    candidate is read off the chunk's first entry (the test's cached chunks are constant c)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = jnp.asarray(table, jnp.float32)  # [E, C]

    def __call__(self, params, inputs, chunks):  # chunks [B, M, H, A] or [B, H, A] -> [E, B, M] or [E, B]
        return self.table[:, jnp.round(chunks[..., 0, 0]).astype(jnp.int32)]


@pytest.mark.parametrize("backup", ["split", "min"])
def test_td_backup_split_picks_with_one_member_and_values_with_the_other(backup):
    # Two members, three candidates at s': T0 = [2, 1, 0], T1 = [2.5, 0, 3] (rule idql: Q^a picks among the N).
    table = np.array([[2.0, 1.0, 0.0], [2.5, 0.0, 3.0]])
    # split: member 0 picks candidate 0 and member 1 values it (2.5), or member 1 picks candidate 2 and member 0
    # values it (0.0). min: min(T0, T1) = [2, 0, 0] picks candidate 0 and values it at 2.0 (with 2 members both
    # random pairs are {0, 1}).
    expected = {"split": {2.5, 0.0}, "min": {2.0}}[backup]
    config = toy_learner_config(TASK, ToyRunConfig(rule="idql", num_candidates=3, members=2, hidden=8, utd=1,
                                                   batch_size=2))
    example = jnp.zeros((1, 4))
    learner = Learner.create(dataclasses.replace(config, td_backup=backup),
                             {"features": toy_features(example), "state": example}, seed=0)
    learner = learner.replace(chunk_critic=learner.chunk_critic.replace(apply_fn=_TableCritic(table)))
    chunks = jnp.broadcast_to(jnp.arange(3.0)[None, :, None, None], (2, 3, TASK.horizon, TASK.action_dim))
    state = jnp.zeros((2, 4))
    batch = {"next_inputs": {"features": toy_features(state), "state": state},
             "next_cache": {"noise": jnp.zeros_like(chunks), "denoised": chunks},
             "returns": jnp.zeros(2), "discount": jnp.ones(2)}
    seen = {float(v) for seed in range(16) for v in np.asarray(learner.td_target(batch, jax.random.key(seed)))}
    assert seen == expected  # over 16 keys the split backup drew both orders of the pair


def test_alpha_entropy_edit_space_is_the_tanh_entropy_shifted_and_alpha_moves_the_other_way():
    batch = jax.tree.map(jnp.asarray, _batch(FlowActor(TASK), utd=2))
    # Broad edits (σ >= 1 before the tanh), so that the two spaces disagree on which side of the target they are.
    policy = dataclasses.replace(_learner("faster").config.edit_policy, log_std_min=0.0)
    infos = {space: _learner("faster", alpha_entropy=space, edit_policy=policy).update(batch)
             for space in ("edit", "tanh")}
    (edit, info_edit), (tanh, info_tanh) = infos["edit"], infos["tanh"]
    cfg = edit.config.edit_policy
    # The same edit sample (same keys, same α before the step): only the space α measures it in differs.
    shift = cfg.flat_dim * np.log(cfg.beta)  # |A|·log β: −6.4 nats here (|A| = 2·2, β = 0.2)
    assert float(info_edit["alpha_entropy"]) == pytest.approx(float(info_tanh["alpha_entropy"]) + shift, abs=1e-3)
    # The edit's entropy is at most |A|·log 2β < −|A|/2 (β < 0.303): α rises. The broad edits' tanh entropy is
    # above −|A|/2: α falls.
    assert float(info_edit["alpha_entropy"]) <= cfg.flat_dim * np.log(2 * cfg.beta) < cfg.target_entropy
    assert float(info_tanh["alpha_entropy"]) > cfg.target_entropy
    alpha = lambda learner: float(jnp.exp(learner.temperature.params["params"]["log_alpha"]))  # noqa: E731
    assert alpha(edit) > 1.0 > alpha(tanh)


def test_learner_config_refuses_unknown_forms():
    config = toy_learner_config(TASK, ToyRunConfig())
    with pytest.raises(ValueError, match="td_backup must be 'split' or 'min', got 'max'"):
        dataclasses.replace(config, td_backup="max")
    with pytest.raises(ValueError, match="alpha_entropy must be 'edit' or 'tanh', got 'raw'"):
        dataclasses.replace(config, alpha_entropy="raw")
