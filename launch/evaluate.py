"""`faster-vla eval` and `faster-vla select-tasks`: score policies on LIBERO tasks, pick tasks to fine-tune on."""

from __future__ import annotations

from faster_vla.evaluate import EvalConfig, SelectTasksConfig, evaluate, select_tasks


def run_eval(config: EvalConfig) -> dict:
    report = evaluate(config)
    print(f"mean success {report['mean_success']:.1%} over {len(report['tasks'])} task(s); written to {config.output}")
    return report


def run_select_tasks(config: SelectTasksConfig) -> dict:
    return select_tasks(config)
