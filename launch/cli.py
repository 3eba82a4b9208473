"""The `faster-vla` command: one tyro subcommand per job (demo, train, eval, select-tasks, export, serve,
record-demos, pretrain).

Each subcommand is a frozen dataclass of arguments (its docstring is the help text) mapped to the
function that runs it, so every field is a `--flag` and every default is visible in `--help`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tyro

from faster_vla.pretraining.demos import RecordConfig
from faster_vla.runs.evaluate import EvalConfig, SelectTasksConfig
from faster_vla.launch.demo import DemoArgs, run_demo
from faster_vla.launch.evaluate import run_eval, run_select_tasks
from faster_vla.launch.export import ExportArgs, run_export
from faster_vla.launch.pretrain import run_pretrain, run_record_demos
from faster_vla.launch.serve import ServeArgs, run_serve
from faster_vla.launch.train import TrainArgs, run_train
from faster_vla.pretraining.pretrain import PretrainConfig

COMMANDS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "demo": (DemoArgs, run_demo),
    "train": (TrainArgs, run_train),
    "eval": (EvalConfig, run_eval),
    "select-tasks": (SelectTasksConfig, run_select_tasks),
    "export": (ExportArgs, run_export),
    "serve": (ServeArgs, run_serve),
    "record-demos": (RecordConfig, run_record_demos),
    "pretrain": (PretrainConfig, run_pretrain),
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `faster-vla` console script."""
    args = tyro.extras.subcommand_cli_from_dict(
        {name: arg_type for name, (arg_type, _) in COMMANDS.items()},
        description="faster-vla: fine-tune openpi's π0.5 with FASTER (value-guided noise selection).",
        args=argv,
    )
    runner = next(run for arg_type, run in COMMANDS.values() if isinstance(args, arg_type))
    runner(args)


if __name__ == "__main__":
    main()
