"""Critics, edit policy and their losses (faster_vla.critics): shapes, ensembles, sizes, math, trainability."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from faster_vla.critics import edit_policy as ep
from faster_vla.critics import encoders as enc
from faster_vla.critics import networks as nets

B, H, A, A_MODEL = 3, 4, 2, 3  # batch, horizon, LIBERO-like action dim, model action dim (noise)

TINY_BACKBONE = enc.EncoderConfig(kind="backbone", state_dim=5, state_embed_dim=6, feature_dim=12, feature_proj_dim=8)
TINY_IMAGE = enc.EncoderConfig(kind="image", state_dim=5, state_embed_dim=6, image_size=16,
                               resnet_stage_sizes=(1, 1), resnet_filters=4, resnet_groups=2)


def chunk_cfg(encoder=TINY_BACKBONE, **kw) -> nets.ChunkCriticConfig:
    return nets.ChunkCriticConfig(encoder=encoder, chunk_shape=(H, A), hidden_dims=(16, 16), num_members=4, **kw)


def noise_cfg(encoder=TINY_BACKBONE, **kw) -> nets.NoiseCriticConfig:
    return nets.NoiseCriticConfig(encoder=encoder, noise_shape=(H, A_MODEL), hidden_dims=(16, 16), num_members=4,
                                  **kw)


def edit_cfg(encoder=TINY_BACKBONE, **kw) -> ep.EditPolicyConfig:
    return ep.EditPolicyConfig(encoder=encoder, chunk_shape=(H, A), hidden_dims=(16, 16), **kw)


def random_inputs(config: enc.EncoderConfig, batch: int = B, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {"state": jnp.asarray(rng.standard_normal((batch, config.state_dim)), jnp.float32)}
    if config.kind == "backbone":
        inputs["features"] = jnp.asarray(rng.standard_normal((batch, config.feature_dim)) * 3.0, jnp.float32)
    else:
        shape = (batch, config.num_cameras, config.image_size, config.image_size, 3)
        inputs["images"] = jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)
    return inputs


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("config", [TINY_BACKBONE, TINY_IMAGE], ids=["backbone", "image"])
def test_encoder_embedding_shape_matches_config(config):
    module = enc.make_encoder(config)
    inputs = random_inputs(config)
    params = module.init(jax.random.PRNGKey(0), inputs)
    emb = module.apply(params, inputs)
    assert emb.shape == (B, config.embed_dim)
    assert emb.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(emb)))


def test_image_encoder_is_shared_over_cameras():
    """One ResNet for both cameras: swapping the cameras swaps the per-camera halves of the embedding."""
    module = enc.make_encoder(TINY_IMAGE)
    inputs = random_inputs(TINY_IMAGE)
    params = module.init(jax.random.PRNGKey(0), inputs)
    emb = np.asarray(module.apply(params, inputs))
    swapped = np.asarray(module.apply(params, dict(inputs, images=inputs["images"][:, ::-1])))
    w = 4 * 2  # filters · 2^(stages − 1)
    np.testing.assert_allclose(swapped[:, :w], emb[:, w:2 * w], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swapped[:, w:2 * w], emb[:, :w], rtol=1e-5, atol=1e-6)
    assert not np.allclose(emb[:, :w], emb[:, w:2 * w])  # the two random cameras do differ
    # GroupNorm, not BatchNorm: the only collection is params.
    assert set(params) == {"params"}


def test_encoders_reject_wrong_inputs():
    module = enc.make_encoder(TINY_BACKBONE)
    bad = dict(random_inputs(TINY_BACKBONE), features=jnp.zeros((B, 7)))
    with pytest.raises(ValueError, match="feature_dim"):
        module.init(jax.random.PRNGKey(0), bad)
    with pytest.raises(ValueError, match="kind"):
        enc.EncoderConfig(kind="pixels")


@pytest.mark.parametrize("encoder", [TINY_BACKBONE, TINY_IMAGE], ids=["backbone", "image"])
def test_chunk_critic_shapes(encoder):
    critic = nets.ChunkCritic(chunk_cfg(encoder))
    inputs = random_inputs(encoder)
    chunk = jnp.zeros((B, H, A))
    params = critic.init(jax.random.PRNGKey(0), inputs, chunk)
    assert critic.apply(params, inputs, chunk).shape == (4, B)
    cands = jax.random.normal(jax.random.PRNGKey(1), (B, 5, H, A))
    q = critic.apply(params, inputs, cands)
    assert q.shape == (4, B, 5)
    # Candidates broadcast over one encoding: candidate k alone gives the same values.
    np.testing.assert_allclose(q[:, :, 2], critic.apply(params, inputs, cands[:, 2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        critic.apply(params, inputs, jnp.zeros((B, H, A + 1)))


@pytest.mark.parametrize("encoder", [TINY_BACKBONE, TINY_IMAGE], ids=["backbone", "image"])
def test_noise_critic_shapes(encoder):
    critic = nets.NoiseCritic(noise_cfg(encoder))
    inputs = random_inputs(encoder)
    noise = jax.random.normal(jax.random.PRNGKey(1), (B, 8, H, A_MODEL))
    params = critic.init(jax.random.PRNGKey(0), inputs, noise)
    q = critic.apply(params, inputs, noise)
    assert q.shape == (4, B, 8)
    # Flattened noise [B, N, h·A] is the same input. Not bit-exact: another input shape is another XLA program,
    # free to pick other kernels (the float32 tolerance the broadcast check above uses).
    np.testing.assert_allclose(q, critic.apply(params, inputs, noise.reshape(B, 8, -1)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        critic.apply(params, inputs, noise[..., :2])
    with pytest.raises(ValueError, match="time_conditioned"):
        critic.apply(params, inputs, noise, 0.5)


def test_time_conditioned_noise_critic_uses_t():
    critic = nets.NoiseCritic(noise_cfg(time_conditioned=True, time_embed_dim=8))
    inputs = random_inputs(TINY_BACKBONE)
    x_t = jax.random.normal(jax.random.PRNGKey(1), (B, 6, H, A_MODEL))
    params = critic.init(jax.random.PRNGKey(0), inputs, x_t)
    q_default = critic.apply(params, inputs, x_t)
    assert q_default.shape == (4, B, 6)
    # Default t is 1.0 (openpi: x_1 is the initial noise); t as a scalar, [B] or [B, N] all broadcast. Each shape
    # of t is its own XLA program (the time embedding's sin/cos may run scalar or vectorised), so float32
    # rounding, not bits.
    for t in (1.0, jnp.ones((B,)), jnp.ones((B, 6))):
        np.testing.assert_allclose(q_default, critic.apply(params, inputs, x_t, t), rtol=1e-5, atol=1e-6)
    assert not np.allclose(q_default, critic.apply(params, inputs, x_t, 0.3))
    first_layer = params["params"]["ensemble"]["members"]["mlp"]["dense0"]["kernel"]
    assert first_layer.shape[1] == TINY_BACKBONE.embed_dim + H * A_MODEL + 8


def test_edit_policy_and_temperature_shapes():
    policy = ep.EditPolicy(edit_cfg())
    inputs = random_inputs(TINY_BACKBONE)
    base = jnp.zeros((B, H, A))
    params = policy.init(jax.random.PRNGKey(0), inputs, base)
    dist = policy.apply(params, inputs, base)
    assert dist.mean.shape == dist.log_std.shape == (B, H * A)
    y, log_prob = dist.sample(jax.random.PRNGKey(1))
    assert y.shape == (B, H * A) and log_prob.shape == (B,)
    edited, lp = policy.apply(params, inputs, base, jax.random.PRNGKey(1), method=ep.EditPolicy.sample_edit)
    assert edited.shape == (B, H, A) and lp.shape == (B,)

    temp = ep.Temperature()
    t_params = temp.init(jax.random.PRNGKey(0))
    assert float(temp.apply(t_params)) == pytest.approx(1.0)
    assert t_params["params"]["log_alpha"].shape == ()


def test_edit_policy_can_take_a_shared_embedding():
    """own_encoder=False: no encoder params; the embedding comes in through inputs["embedding"]."""
    policy = ep.EditPolicy(edit_cfg(own_encoder=False))
    inputs = dict(random_inputs(TINY_BACKBONE), embedding=jnp.ones((B, 10)))
    params = policy.init(jax.random.PRNGKey(0), inputs, jnp.zeros((B, H, A)))
    assert "encoder" not in params["params"]
    d1 = policy.apply(params, inputs, jnp.zeros((B, H, A)))
    d2 = policy.apply(params, dict(inputs, embedding=-jnp.ones((B, 10))), jnp.zeros((B, H, A)))
    assert not np.allclose(d1.mean, d2.mean)


def test_log_std_is_clipped():
    cfg = edit_cfg(log_std_min=-0.01, log_std_max=0.01)
    policy = ep.EditPolicy(cfg)
    inputs = random_inputs(TINY_BACKBONE)
    params = policy.init(jax.random.PRNGKey(0), inputs, jnp.zeros((B, H, A)))
    params = jax.tree_util.tree_map(lambda p: p * 50.0, params)  # huge raw log-stds
    log_std = np.asarray(policy.apply(params, inputs, jnp.ones((B, H, A))).log_std)
    assert log_std.min() >= -0.01 - 1e-7 and log_std.max() <= 0.01 + 1e-7
    assert log_std.min() < 0 < log_std.max()


# -------------------------------------------------------------------------------------------- ensembles


def test_ensemble_params_stacked_and_members_differ():
    critic = nets.ChunkCritic(chunk_cfg())
    inputs = random_inputs(TINY_BACKBONE)
    chunk = jax.random.normal(jax.random.PRNGKey(2), (B, H, A))
    params = critic.init(jax.random.PRNGKey(0), inputs, chunk)["params"]
    members = params["ensemble"]["members"]
    for leaf in jax.tree_util.tree_leaves(members):
        assert leaf.shape[0] == 4
    kernel = np.asarray(members["mlp"]["dense0"]["kernel"])
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(kernel[i], kernel[j])
    # The encoder is shared: its params carry no member axis.
    assert params["encoder"]["feature_proj"]["kernel"].shape == (12, 8)
    q = np.asarray(critic.apply({"params": params}, inputs, chunk))
    assert np.all(np.std(q, axis=0) > 1e-4)
    # Member 2 alone (params sliced on axis 0) reproduces row 2 of the ensemble's output.
    single = nets.ValueHead((16, 16))
    emb = critic.apply({"params": params}, inputs, method=nets.ChunkCritic.encode)
    x = jnp.concatenate([emb, chunk.reshape(B, -1)], axis=-1)
    member2 = jax.tree_util.tree_map(lambda p: p[2], members)
    np.testing.assert_allclose(single.apply({"params": member2}, x), q[2], rtol=1e-5, atol=1e-6)


def test_generic_ensemble_over_mlp():
    import functools

    ens = nets.Ensemble(functools.partial(nets.MLP, hidden_dims=(5, 3), activate_final=False), num=3)
    x = jnp.ones((2, 4))
    params = ens.init(jax.random.PRNGKey(0), x)
    out = ens.apply(params, x)
    assert out.shape == (3, 2, 3)
    assert not np.allclose(out[0], out[1])


# ------------------------------------------------------------------------------------------------ sizes


def pi05_libero_counts(kind: str) -> dict:
    encoder = enc.encoder_for_pi05(enc.pi05_config.PI05_LIBERO, kind)
    inputs = encoder.example_inputs(1, shapes_only=True)
    noise = nets.NoiseCritic(dataclasses.replace(nets.PI05_LIBERO_NOISE_CRITIC, encoder=encoder))
    chunk = nets.ChunkCritic(dataclasses.replace(nets.PI05_LIBERO_CHUNK_CRITIC, encoder=encoder))
    edit = ep.EditPolicy(dataclasses.replace(ep.PI05_LIBERO_EDIT_POLICY, encoder=encoder))
    return {
        "noise": nets.count_params(nets.param_shapes(noise, inputs, jax.ShapeDtypeStruct((1, 8, 10, 32), jnp.float32))),
        "chunk": nets.count_params(nets.param_shapes(chunk, inputs, jax.ShapeDtypeStruct((1, 10, 7), jnp.float32))),
        "edit": nets.count_params(nets.param_shapes(edit, inputs, jax.ShapeDtypeStruct((1, 10, 7), jnp.float32))),
    }


def test_default_pi05_libero_noise_critic_is_about_20m():
    assert enc.PI05_LIBERO_ENCODER.kind == "backbone"
    assert enc.PI05_LIBERO_ENCODER.feature_dim == 4096  # 2 · gemma_2b width
    assert nets.PI05_LIBERO_NOISE_CRITIC.encoder == enc.PI05_LIBERO_ENCODER
    counts = pi05_libero_counts("backbone")
    assert 15_000_000 <= counts["noise"] <= 25_000_000
    # The numbers the module docstrings state.
    assert counts == {"noise": 20_971_594, "chunk": 19_051_594, "edit": 4_607_692}


def test_image_kind_counts_and_resnet34_trunk():
    counts = pi05_libero_counts("image")
    assert counts == {"noise": 38_050_698, "chunk": 36_130_698, "edit": 21_686_796}
    resnet = enc.ResNet((3, 4, 6, 3), 64, 32)
    shapes = nets.param_shapes(resnet, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert nets.count_params(shapes) == 21_284_672  # torchvision's resnet34 minus its fc layer
    out = jax.eval_shape(lambda p, x: resnet.apply({"params": p}, x), shapes,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out.shape == (1, 512)


# ---------------------------------------------------------------------------------------------- scoring


def test_noise_critic_n_seed_scoring_equals_one_seed_at_a_time():
    critic = nets.NoiseCritic(noise_cfg())
    inputs = random_inputs(TINY_BACKBONE)
    noise = jax.random.normal(jax.random.PRNGKey(3), (B, 7, H, A_MODEL))
    params = critic.init(jax.random.PRNGKey(0), inputs, noise)
    apply = jax.jit(critic.apply)
    q = np.asarray(apply(params, inputs, noise))
    one_state = jax.tree_util.tree_map(lambda v: v[1:2], inputs)
    for i in range(7):
        qi = np.asarray(apply(params, inputs, noise[:, i:i + 1]))
        np.testing.assert_allclose(q[:, :, i:i + 1], qi, rtol=1e-5, atol=1e-6)
        # And one state at a time: no mixing across the batch.
        np.testing.assert_allclose(q[:, 1, i], apply(params, one_state, noise[1:2, i:i + 1])[:, 0, 0],
                                   rtol=1e-5, atol=1e-6)
    assert np.std(q[0, 0]) > 1e-4  # seeds score differently


def test_min_of_random_pair_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((10, 6, 5)).astype(np.float32)
    seen = set()
    for seed in range(200):
        key = jax.random.PRNGKey(seed)
        i, j = (int(v) for v in nets.random_member_pair(key, 10))
        assert i != j
        seen.update((i, j))
        np.testing.assert_array_equal(nets.min_of_random_pair(jnp.asarray(q), key), np.minimum(q[i], q[j]))
    assert seen == set(range(10))
    # With exactly two members the pair must be both of them.
    q2 = q[:2]
    for seed in range(20):
        np.testing.assert_array_equal(nets.min_of_random_pair(jnp.asarray(q2), jax.random.PRNGKey(seed)), q2.min(0))
    with pytest.raises(ValueError):
        nets.min_of_random_pair(jnp.asarray(q[:1]), jax.random.PRNGKey(0))


def test_polyak():
    target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    online = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    out = nets.polyak(target, online, 0.25)
    np.testing.assert_allclose(out["a"], [1.5, 1.0])
    np.testing.assert_allclose(out["b"]["c"], 3.0)
    np.testing.assert_array_equal(nets.polyak(target, online, 1.0)["a"], online["a"])
    np.testing.assert_array_equal(nets.polyak(target, online, 0.0)["a"], target["a"])


# --------------------------------------------------------------------------------------- tanh-Gaussian


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    mean = jnp.array([[0.3, -1.2, 1.5], [0.0, 0.8, -0.7]])
    log_std = jnp.array([[-0.5, 0.2, -2.0], [0.1, -1.0, 0.0]])
    dist = ep.TanhGaussian(mean, log_std)
    y, log_prob = dist.sample(jax.random.PRNGKey(0))
    # Reference in float64: u = atanh(y); log N(u; μ, σ) − log|d tanh/du|, with d tanh/du = 1 − y².
    y64 = np.asarray(y, np.float64)
    assert np.abs(y64).max() < 0.999  # away from saturation, so atanh of a float32 y is accurate
    u = np.arctanh(y64)
    ref = (stats.norm.logpdf(u, np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64)))
           - np.log1p(-y64**2)).sum(-1)
    np.testing.assert_allclose(log_prob, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dist.log_prob(y), ref, rtol=1e-5, atol=1e-4)


def test_tanh_jacobian_is_stable_when_saturated():
    u = np.linspace(-8.0, 8.0, 33)
    np.testing.assert_allclose(ep._log1m_tanh_sq(jnp.asarray(u, jnp.float32)), np.log1p(-np.tanh(u) ** 2),
                               rtol=1e-5, atol=1e-5)
    # tanh(±50) is 1.0 in floating point; the exact value is log 4 − 100.
    big = np.asarray(ep._log1m_tanh_sq(jnp.array([-50.0, 50.0])))
    np.testing.assert_allclose(big, np.log(4.0) - 100.0, rtol=1e-6)
    _, log_prob = ep.TanhGaussian(jnp.full((1, 4), 30.0), jnp.full((1, 4), -5.0)).sample(jax.random.PRNGKey(0))
    assert np.all(np.isfinite(np.asarray(log_prob)))


def test_tanh_gaussian_density_is_the_derivative_of_its_cdf_and_integrates_to_one():
    """1-D: P(Y ≤ y) = Φ((atanh y − μ)/σ); its finite difference is the density, whose integral is 1."""
    mu, log_sigma = 0.4, -0.3
    dist = ep.TanhGaussian(jnp.array([mu]), jnp.array([log_sigma]))
    ys = np.linspace(-0.995, 0.995, 4001)
    density = np.exp(np.asarray(jax.vmap(lambda v: dist.log_prob(v[None]))(jnp.asarray(ys, jnp.float32))))
    cdf = lambda v: stats.norm.cdf((np.arctanh(v) - mu) / np.exp(log_sigma))  # noqa: E731
    eps = 1e-5
    fd = (cdf(ys + eps) - cdf(ys - eps)) / (2 * eps)
    np.testing.assert_allclose(density, fd, rtol=2e-3, atol=1e-4)
    mass = integrate.trapezoid(density, ys)  # np.trapz is gone in NumPy 2, np.trapezoid absent in 1.26
    assert mass == pytest.approx(cdf(0.995) - cdf(-0.995), abs=1e-4)


def test_tanh_gaussian_sample_is_reparameterised():
    g = jax.grad(lambda m: ep.TanhGaussian(m, jnp.zeros(3)).sample(jax.random.PRNGKey(0))[0].sum())(jnp.zeros(3))
    assert np.all(np.asarray(g) > 0)


# ------------------------------------------------------------------------------------------------- edits


def test_edit_is_clipped_and_at_most_beta():
    rng = np.random.default_rng(0)
    base = np.clip(rng.uniform(-1.1, 1.1, (64, H, A)), -1.0, 1.0).astype(np.float32)  # many at ±1
    y = np.tanh(rng.standard_normal((64, H * A)) * 3).astype(np.float32)
    edited = np.asarray(ep.apply_edit(jnp.asarray(base), jnp.asarray(y), 0.2))
    assert edited.min() >= -1.0 and edited.max() <= 1.0
    assert np.abs(edited - base).max() <= 0.2 + 1e-6
    # Where clipping did not bite, the edit is exactly β·y.
    raw = base + 0.2 * y.reshape(base.shape)
    inside = np.abs(raw) < 1.0
    np.testing.assert_allclose(edited[inside], raw[inside], rtol=1e-6)
    assert np.any(~inside)
    # Per-dimension bounds broadcast over the last axis.
    edited = np.asarray(ep.apply_edit(jnp.asarray(base), jnp.asarray(y), 0.2, (-0.5, -1.0), (0.5, 1.0)))
    assert np.abs(edited[..., 0]).max() <= 0.5 and np.abs(edited[..., 0]).max() == pytest.approx(0.5)


def test_policy_edits_respect_beta_and_bounds():
    cfg = edit_cfg(beta=0.3)
    policy = ep.EditPolicy(cfg)
    inputs = random_inputs(TINY_BACKBONE)
    base = jax.random.uniform(jax.random.PRNGKey(5), (B, H, A), minval=-1.0, maxval=1.0)
    params = policy.init(jax.random.PRNGKey(0), inputs, base)
    params = jax.tree_util.tree_map(lambda p: p * 10.0, params)  # saturated tanh-means
    for seed in range(5):
        edited, _ = policy.apply(params, inputs, base, jax.random.PRNGKey(seed), method=ep.EditPolicy.sample_edit)
        edited = np.asarray(edited)
        assert edited.min() >= -1.0 and edited.max() <= 1.0
        assert np.abs(edited - np.asarray(base)).max() <= 0.3 + 1e-6


# ------------------------------------------------------------------------------------------------ losses


def toy_critic_fn(target: jax.Array):
    """Every member prefers chunks near `target`, members offset by a constant."""
    offsets = jnp.arange(4.0)[:, None]

    def critic_fn(inputs, chunk):
        return -jnp.sum((chunk - target) ** 2, axis=(-2, -1))[None] + offsets  # [E, B]

    return critic_fn


def test_edit_policy_loss_value_is_expo_formula():
    cfg = edit_cfg(beta=0.2)
    policy = ep.EditPolicy(cfg)
    inputs = random_inputs(TINY_BACKBONE)
    base = jax.random.uniform(jax.random.PRNGKey(5), (B, H, A), minval=-0.8, maxval=0.8)
    params = policy.init(jax.random.PRNGKey(0), inputs, base)
    critic_fn = toy_critic_fn(jnp.full((H, A), 0.5))
    loss, info = ep.edit_policy_loss(params, policy, critic_fn, inputs, base, jax.random.PRNGKey(9), 0.7)
    y, log_prob = policy.apply(params, inputs, base).sample(jax.random.PRNGKey(9))
    q = critic_fn(inputs, jnp.clip(base + 0.2 * y.reshape(B, H, A), -1, 1))
    expected = np.mean(0.7 * (np.asarray(log_prob) - H * A * np.log(0.2)) - np.asarray(q).mean(0))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(info["log_prob"], log_prob, rtol=1e-6)
    # α is not differentiated through.
    assert float(jax.grad(lambda a: ep.edit_policy_loss(params, policy, critic_fn, inputs, base,
                                                        jax.random.PRNGKey(9), a)[0])(0.7)) == 0.0


def test_edit_policy_loss_decreases_with_adam():
    cfg = edit_cfg(beta=0.2)
    policy = ep.EditPolicy(cfg)
    inputs = random_inputs(TINY_BACKBONE)
    base = jnp.zeros((B, H, A))
    params = policy.init(jax.random.PRNGKey(0), inputs, base)
    critic_fn = toy_critic_fn(jnp.full((H, A), 0.15))  # reachable within β
    alpha = 0.01
    eval_keys = jax.random.split(jax.random.PRNGKey(100), 16)

    @jax.jit
    def eval_loss(p):
        losses = jax.vmap(lambda k: ep.edit_policy_loss(p, policy, critic_fn, inputs, base, k, alpha)[0])(eval_keys)
        return jnp.mean(losses)

    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, key):
        grads = jax.grad(lambda q: ep.edit_policy_loss(q, policy, critic_fn, inputs, base, key, alpha)[0])(p)
        updates, s = opt.update(grads, s)
        return optax.apply_updates(p, updates), s

    before = float(eval_loss(params))
    for k in jax.random.split(jax.random.PRNGKey(1), 100):
        params, state = step(params, state, k)
    after = float(eval_loss(params))
    assert after < before - 0.05
    mode = policy.apply(params, inputs, base).mode()
    assert float(jnp.mean(mode)) > 0.3  # edit direction moved toward the critic's optimum (+0.15 = β·0.75)


def test_critic_regression_decreases_with_adam():
    """The noise critic can fit a toy target of (state, noise), as Q^dn regresses on sg[Q^a]."""
    critic = nets.NoiseCritic(noise_cfg())
    inputs = random_inputs(TINY_BACKBONE, batch=8)
    noise = jax.random.normal(jax.random.PRNGKey(3), (8, 4, H, A_MODEL))
    target = jnp.sum(noise[..., 0], axis=-1) + inputs["state"][:, :1]  # [B, N]
    params = critic.init(jax.random.PRNGKey(0), inputs, noise)

    @jax.jit
    def loss_fn(p):
        return jnp.mean((critic.apply(p, inputs, noise) - target[None]) ** 2)

    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(60):
        params, state, _ = step(params, state)
    assert float(loss_fn(params)) < 0.1 * first


@pytest.mark.parametrize("entropy, direction", [(5.0, "down"), (-50.0, "up")])
def test_temperature_loss_moves_alpha_toward_target(entropy, direction):
    """Entropy above target → α shrinks; below target → α grows (a few adam steps on log α)."""
    target = -(H * A) / 2.0
    log_prob = jnp.full((B,), -entropy)
    temp = ep.Temperature()
    params = temp.init(jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        return ep.temperature_loss(p["params"]["log_alpha"], log_prob, target)

    losses = []
    for _ in range(5):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        losses.append(float(loss))
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
    alpha = float(temp.apply(params))
    if direction == "down":
        assert alpha < 1.0
    else:
        assert alpha > 1.0
    assert losses[-1] < losses[0]
    assert ep.EditPolicyConfig(chunk_shape=(H, A)).target_entropy == target
