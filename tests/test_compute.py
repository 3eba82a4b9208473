"""Per-decision compute: the paper's C_BoN vs C_FASTER, and what sharing the prefix changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from faster_vla.rl.flops import UnitFlops, decision_flops, xla_flops
from faster_vla.critics.networks import MLP
from faster_vla.policies.config import PI05_LIBERO
from faster_vla.rl.selection import SelectionConfig

UNITS = UnitFlops.for_pi05(PI05_LIBERO, noise_critic=int(4e7), chunk_critic=int(4e7), edit=int(1e7))


def test_reproduces_the_papers_inference_flops_for_pi05_libero():
    # Paper (VLA, N = 8): EXPO 3.75e13 per step (every candidate re-runs the VLA), FASTER-EXPO 4.70e12.
    expo = decision_flops(SelectionConfig("best_of_n", 8), UNITS, prefix_shared=False)
    faster = decision_flops(SelectionConfig("faster", 8), UNITS)
    assert expo.total == pytest.approx(3.75e13, rel=0.01)
    assert faster.total == pytest.approx(4.70e12, rel=0.01)


def test_prefix_sharing_makes_best_of_n_cost_close_to_one_sample():
    shared = decision_flops(SelectionConfig("best_of_n", 8), UNITS)
    base = decision_flops(SelectionConfig("base", 8), UNITS)
    assert shared.prefix == base.prefix
    assert shared.denoise == 8 * base.denoise
    assert shared.actor / base.actor == pytest.approx(1.117, abs=0.01)  # 5.268e12 / 4.715e12


@pytest.mark.parametrize("rule,denoised,noise_evals,chunk_evals,edits", [
    ("base", 1, 0, 0, 0), ("best_of_n", 8, 0, 16, 8), ("idql", 8, 0, 8, 0), ("faster", 1, 8, 2, 1),
    ("faster_idql", 1, 8, 0, 0),
])
def test_each_rule_counts_what_it_runs(rule, denoised, noise_evals, chunk_evals, edits):
    cost = decision_flops(SelectionConfig(rule, 8), UNITS, num_steps=10)
    assert cost.denoise == denoised * 10 * UNITS.denoise_step
    assert cost.noise_critic == noise_evals * UNITS.noise_critic
    assert cost.chunk_critic == chunk_evals * UNITS.chunk_critic
    assert cost.edit == edits * UNITS.edit


def test_xla_flops_counts_a_dense_layer():
    mlp = MLP((64,), activate_final=False, use_layer_norm=False)
    x = jnp.zeros((1, 32))
    params = mlp.init(jax.random.key(0), x)
    flops = xla_flops(lambda p, x: mlp.apply(p, x), params, x)
    assert 2 * 32 * 64 <= flops <= 2 * 32 * 64 + 4 * 64  # the matmul, plus bias/activation work


def test_filter_schedule_flops():
    from faster_vla.rl.filtering import single_step, successive_halving

    units = UnitFlops(prefix=1000, denoise_step=10, noise_critic=3, chunk_critic=5, edit=7)
    faster = SelectionConfig("faster", num_candidates=8)
    halving = successive_halving(8, 10)  # pools 8, 4, 2; candidate-steps 4 + 2 + 8 = 14
    f = decision_flops(faster, units, filter_schedule=halving)
    assert f.denoise == 14 * 10 and f.noise_critic == (8 + 4 + 2) * 3 and f.prefix == 1000
    f = decision_flops(faster, units, filter_schedule=single_step(8, 4))  # 8·4 + 6 = 38
    assert f.denoise == 38 * 10 and f.noise_critic == 8 * 3
    with pytest.raises(ValueError, match="faster"):
        decision_flops(SelectionConfig("best_of_n", 8), units, filter_schedule=halving)
