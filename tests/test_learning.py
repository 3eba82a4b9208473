"""The CI learning check: on a chunked-control task with a fixed flow actor, FASTER recovers most of
best-of-N's gain over the base policy while the actor denoises one chunk per decision instead of N.

Same replay, chunked TD, critics, selection rules and learner as the VLA runs; only the actor is a toy.
Results are averaged over seeds; every rule is evaluated on the same start states and noise streams.
"""

from __future__ import annotations

import numpy as np

from tests.toy_task import ToyRunConfig, ToyTaskConfig, train_and_evaluate

SEEDS = (0, 1)


def test_faster_recovers_most_of_best_of_n_gain_at_a_fraction_of_actor_compute():
    task = ToyTaskConfig()
    results = {rule: [train_and_evaluate(task, ToyRunConfig(rule=rule, seed=seed)) for seed in SEEDS]
               for rule in ("base", "best_of_n", "faster")}
    mean = {rule: float(np.mean([r["return"] for r in runs])) for rule, runs in results.items()}
    gain_bon = mean["best_of_n"] - mean["base"]
    gain_faster = mean["faster"] - mean["base"]
    assert gain_bon > 0.2, f"best-of-N should clearly beat the base policy here: {mean}"
    assert gain_faster >= 0.8 * gain_bon, f"FASTER recovers {gain_faster / gain_bon:.0%} of best-of-N's gain: {mean}"
    compute = {rule: runs[0]["actor_steps_per_decision"] for rule, runs in results.items()}
    assert compute["faster"] < compute["best_of_n"] / 3, compute
