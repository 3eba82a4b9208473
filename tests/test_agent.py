"""Acting: one decision per raw LIBERO observation, per-part timing and FLOPs, and the frozen-actor cache."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from faster_vla import checkpoints
from faster_vla.acting.agent import Agent, critic_inputs
from faster_vla.critics.edit_policy import EditPolicyConfig
from faster_vla.critics.encoders import EncoderConfig
from faster_vla.critics.networks import ChunkCriticConfig, NoiseCriticConfig
from faster_vla.rl.filtering import successive_halving
from faster_vla.rl.learner import Learner, LearnerConfig
from faster_vla.launch.demo import libero_observation
from faster_vla.policies import pi05
from faster_vla.policies.config import GemmaConfig, SiglipConfig
from faster_vla.policies.normalize import NormStats
from faster_vla.policies.policy import make_libero_policy
from faster_vla.policies.tokenizer import PaligemmaTokenizer
from faster_vla.acting.frozen_cache import frozen_actor_cache
from faster_vla.rl.selection import SelectionConfig

# A π0.5 small enough for CI that still takes LIBERO inputs: the shipped tokenizer (vocab 512), 8-D state.
CONFIG = pi05.Pi05Config(
    paligemma_variant=GemmaConfig(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
    action_expert_variant=GemmaConfig(width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=16),
    action_dim=8, action_horizon=4, max_token_len=32, vocab_size=512,
    siglip=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=14, image_size=28),
    dtype="float32", discrete_state_input=False,
)
N = 4
ROBOT = 7


def _stats(dim: int, seed: int) -> NormStats:
    rng = np.random.default_rng(seed)
    lo = -rng.uniform(0.5, 2.0, dim)
    return NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=lo, q99=lo + rng.uniform(1.0, 3.0, dim))


@pytest.fixture(scope="module")
def policy():
    from tests.small_models import perturbed_params

    actor = pi05.Pi05Actor(CONFIG, perturbed_params(CONFIG, seed=1, scale=0.1))
    tokenizer = PaligemmaTokenizer(checkpoints.path("pi05_small/tokenizer.model"), max_len=CONFIG.max_token_len)
    return make_libero_policy(actor, tokenizer=tokenizer, norm_stats={"state": _stats(8, 0), "actions": _stats(7, 1)})


def _config(rule: str, *, image: bool = False, schedule=None) -> LearnerConfig:
    if image:
        encoder = EncoderConfig(kind="image", state_dim=8, state_embed_dim=8, image_size=28, resnet_stage_sizes=(1,),
                                resnet_filters=8, resnet_groups=4)
    else:
        encoder = EncoderConfig(state_dim=8, state_embed_dim=8, feature_dim=2 * 32, feature_proj_dim=16)
    chunk = (CONFIG.action_horizon, ROBOT)
    noise_critic = NoiseCriticConfig(encoder=encoder, noise_shape=(CONFIG.action_horizon, CONFIG.action_dim),
                                     hidden_dims=(16,), num_members=3, time_conditioned=schedule is not None)
    return LearnerConfig(
        chunk_critic=ChunkCriticConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=(16,), num_members=3),
        noise_critic=noise_critic,
        edit_policy=EditPolicyConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=(16,)),
        selection=SelectionConfig(rule, N, 0.0), filter_schedule=schedule,
    )


def _learner(config: LearnerConfig) -> Learner:
    return Learner.create(config, config.chunk_critic.encoder.example_inputs(1), seed=0)


@pytest.mark.parametrize("rule", ["base", "faster", "best_of_n", "idql", "faster_idql"])
def test_act_reports_parts_and_flops(policy, rule):
    config = _config(rule)
    agent, learner = Agent(policy, config), _learner(config)
    decision = agent.act(learner, libero_observation("open the top drawer of the cabinet", seed=2),
                         rng=jax.random.key(0))
    assert decision.actions.shape == (CONFIG.action_horizon, ROBOT)
    assert decision.normalized.shape == (CONFIG.action_horizon, ROBOT)
    assert np.all(np.isfinite(decision.actions))
    sel = config.selection
    expected_parts = {"input_transform", "encode", "denoise", "output_transform", "total"}
    expected_parts |= {"noise_critic"} if sel.uses_noise_critic else set()
    expected_parts |= {"chunk_critic"} if sel.uses_chunk_critic else set()
    expected_parts |= {"edit"} if sel.uses_edit else set()
    assert set(decision.timing_ms) == expected_parts
    assert all(v >= 0 for v in decision.timing_ms.values())
    units = agent.unit_flops(learner)
    assert units.noise_critic > 0 and units.chunk_critic > 0 and units.edit > 0
    assert decision.flops.denoise == sel.denoised_per_state * 10 * units.denoise_step
    assert decision.flops.prefix == units.prefix  # one prefix, however many candidates
    assert (decision.flops.noise_critic > 0) == sel.uses_noise_critic
    assert 0 <= decision.seed_index < N
    if not sel.uses_edit:
        assert not decision.edited


def test_base_rule_is_the_policy(policy):
    """The `base` rule with seed 0 of a fixed pool gives exactly the openpi-style policy's actions for that noise."""
    config = _config("base")
    agent, learner = Agent(policy, config), _learner(config)
    obs = libero_observation("put the bowl on the plate", seed=4)
    pool = np.random.default_rng(0).standard_normal((N, CONFIG.action_horizon, CONFIG.action_dim)).astype(np.float32)
    decision = agent.act(learner, obs, noise=pool)
    expected = policy.infer(obs, noise=pool[0])["actions"]
    np.testing.assert_allclose(decision.actions, expected, rtol=1e-5, atol=1e-5)


def test_faster_denoises_only_the_winner(policy):
    """FASTER's decision is the kept seed's chunk (or its edit): re-denoising that seed alone reproduces the base."""
    config = _config("faster_idql")
    agent, learner = Agent(policy, config), _learner(config)
    obs = libero_observation("turn on the stove", seed=5)
    pool = np.random.default_rng(1).standard_normal((N, CONFIG.action_horizon, CONFIG.action_dim)).astype(np.float32)
    decision = agent.act(learner, obs, noise=pool, rng=jax.random.key(2))
    expected = policy.infer(obs, noise=pool[decision.seed_index])["actions"]
    np.testing.assert_allclose(decision.actions, expected, rtol=1e-5, atol=1e-5)


def test_multi_stage_filter_acts_with_its_cost(policy):
    schedule = successive_halving(N, 10)  # ((0, 2), (1, 1)): 2·1 + 1·9 = 11 candidate-steps
    config = _config("faster", schedule=schedule)
    agent, learner = Agent(policy, config), _learner(config)
    decision = agent.act(learner, libero_observation("open the microwave", seed=6), rng=jax.random.key(3))
    units = agent.unit_flops(learner)
    assert decision.flops.denoise == schedule.candidate_steps * units.denoise_step
    assert decision.flops.noise_critic == sum(schedule.pool_sizes) * units.noise_critic
    assert decision.actions.shape == (CONFIG.action_horizon, ROBOT)


def test_image_encoder_inputs(policy):
    config = _config("faster", image=True)
    agent, learner = Agent(policy, config), _learner(config)
    decision = agent.act(learner, libero_observation("open the microwave", seed=6), rng=jax.random.key(3))
    assert np.all(np.isfinite(decision.actions))
    obs = agent.observations([libero_observation("open the microwave", seed=s) for s in range(2)])
    inputs = critic_inputs(config.chunk_critic.encoder, obs, None)
    assert inputs["images"].shape == (2, 2, 28, 28, 3) and inputs["images"].dtype == np.uint8
    with pytest.raises(ValueError, match="prefix features"):
        critic_inputs(_config("faster").chunk_critic.encoder, obs, None)


def test_cache_in_padded_batches_equals_one_call(policy):
    config = _config("faster", schedule=successive_halving(N, 10, every=2))  # caches x_t at step 2
    agent = Agent(policy, config)
    raw = [libero_observation("open the microwave", seed=s) for s in range(5)]
    observation = agent.observations(raw)
    noise = np.random.default_rng(3).standard_normal((5, N, CONFIG.action_horizon, CONFIG.action_dim)).astype(np.float32)
    cache = agent.cache(observation, noise, batch_size=3)  # batches of 3 and 2 (+1 padding row)
    direct = frozen_actor_cache(policy.actor, observation, noise, num_steps=10, intermediate_steps=(2,))
    assert set(cache) == {"features", "noise", "denoised", "x_t"}
    for key in cache:
        np.testing.assert_allclose(cache[key], direct[key], rtol=1e-5, atol=1e-5)


def test_mismatched_critics_are_refused(policy):
    config = _config("faster")
    wrong = dataclasses.replace(config, noise_critic=dataclasses.replace(config.noise_critic, noise_shape=(4, 32)))
    with pytest.raises(ValueError, match="build the learner config for this actor"):
        Agent(policy, wrong)


@pytest.mark.parametrize("rule", ["faster", "best_of_n"])
def test_act_batch_rows_act_as_alone(policy, rule):
    """Each row of a (padded) batch gets its own noise, ensemble pairs and edit draw: the decision `act` makes
    for that observation and key alone, up to the float rounding of batched matmuls."""
    config = _config(rule)
    agent, learner = Agent(policy, config), _learner(config)
    raw = [libero_observation("open the microwave", seed=s) for s in range(3)]
    keys = [jax.random.key(10 + i) for i in range(3)]
    batch = agent.act_batch(learner, raw, rngs=keys, batch_size=4)  # one padding row
    assert len(batch) == 3
    for obs, key, decision in zip(raw, keys, batch):
        alone = agent.act(learner, obs, rng=key)
        assert (decision.seed_index, decision.edited) == (alone.seed_index, alone.edited)
        np.testing.assert_allclose(decision.actions, alone.actions, rtol=1e-5, atol=1e-5)
        if alone.noise_scores is not None:
            np.testing.assert_allclose(decision.noise_scores, alone.noise_scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        agent.act_batch(learner, raw, rngs=keys, batch_size=2)


@pytest.mark.parametrize("schedule", [None, successive_halving(N, 10, every=2)])
def test_cache_from_the_acting_pass_equals_a_separate_encode(policy, schedule):
    """The cache a decision computes from the prefix it encoded to act (no second encode) is the cache a
    separate encode of the same observations gives for the same noises. Within tolerance, not bit for bit:
    the acting batch (3, padded to 4) and the cache batch (3) are compiled as different XLA programs."""
    config = _config("faster", schedule=schedule)
    agent, learner = Agent(policy, config), _learner(config)
    raw = [libero_observation("open the microwave", seed=s) for s in range(3)]
    noise = np.random.default_rng(5).standard_normal((3, 6, CONFIG.action_horizon, CONFIG.action_dim)).astype(np.float32)
    decisions = agent.act_batch(learner, raw, rngs=[jax.random.key(i) for i in range(3)], batch_size=4,
                                cache_noise=noise)
    separate = agent.cache(agent.observations(raw), noise, batch_size=3)
    expected = {"features", "noise", "denoised"} | ({"x_t"} if schedule else set())
    for i, decision in enumerate(decisions):
        row = decision.cache_row()
        assert set(row) == expected
        for key in expected:
            np.testing.assert_allclose(row[key], separate[key][i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache_noise must be"):
        agent.act_batch(learner, raw, rngs=[jax.random.key(i) for i in range(3)], cache_noise=noise[:2])


def test_base_rule_acts_without_a_learner(policy):
    """An agent built without critics acts with the base rule (what evaluating a base policy needs) and makes
    the base rule's decision of an agent that has them; any other rule is refused, naming the fix."""
    obs = libero_observation("open the top drawer of the cabinet", seed=4)
    alone = Agent(policy).act(None, obs, rng=jax.random.key(3))
    config = _config("faster")
    with_critics = Agent(policy, config).act(_learner(config), obs, selection=SelectionConfig("base", 1),
                                             rng=jax.random.key(3))
    assert alone.actions.shape == (CONFIG.action_horizon, ROBOT)
    np.testing.assert_allclose(alone.actions, with_critics.actions, rtol=1e-6, atol=1e-6)  # same program shapes
    assert alone.flops.noise_critic == 0 and alone.flops.total == with_critics.flops.total
    with pytest.raises(ValueError, match="needs critics"):
        Agent(policy).act(None, obs, selection=SelectionConfig("faster", N), rng=jax.random.key(3))
