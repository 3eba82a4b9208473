"""`faster-vla eval` and `faster-vla select-tasks`: score policies on LIBERO tasks, pick tasks to fine-tune on."""

from __future__ import annotations

from faster_vla.runs.evaluate import Acting, EvalConfig, SelectTasksConfig, acting_for, evaluate, select_tasks
from faster_vla.serving.bundle import TunedPolicy, load_policy


def bundle_acting(config: EvalConfig) -> Acting:
    """An exported bundle's agent, learner and rule (greedy, as exported)."""
    tuned = load_policy(config.bundle, seed=config.seed)
    if not isinstance(tuned, TunedPolicy):
        raise ValueError(f"{config.bundle} is an openpi checkpoint, not a bundle: evaluate it with --actor.checkpoint")
    return Acting(tuned.agent, tuned.learner, tuned.selection, f"bundle {config.bundle} ({tuned.selection.rule})")


def run_eval(config: EvalConfig) -> dict:
    report = evaluate(config, make_acting=acting_for if config.bundle is None else bundle_acting)
    print(f"mean success {report['mean_success']:.1%} over {len(report['tasks'])} task(s); written to {config.output}")
    return report


def run_select_tasks(config: SelectTasksConfig) -> dict:
    return select_tasks(config)
