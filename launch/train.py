"""`faster-vla train <config>`: named fine-tuning configs, every field overridable on the command line.

    faster-vla train cpu_small_faster_expo                        # the built-in small π0.5 on CPU
    faster-vla train pi05_libero_faster_expo --env.task 12 --run-dir runs/task12
    faster-vla train pi05_libero_faster_expo --run-dir runs/task12 --resume
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import tyro

from faster_vla.runs.config import TRAIN_CONFIGS
from faster_vla.runs.loop import train

NamedTrainConfig = tyro.extras.subcommand_type_from_defaults(
    {name: config for name, (_, config) in TRAIN_CONFIGS.items()},
    descriptions={name: text for name, (text, _) in TRAIN_CONFIGS.items()},
)


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Fine-tune π0.5 on a LIBERO task from a named config (FASTER-EXPO, EXPO, base); any field is a flag."""

    config: Annotated[NamedTrainConfig, tyro.conf.OmitSubcommandPrefixes]


def run_train(args: TrainArgs) -> dict:
    config = args.config
    result = train(config)
    print(f"done: {result['counters']['episodes']} episodes, {result['counters']['env_steps']} env steps, "
          f"eval success {result['eval_success']}; run folder {config.run_dir}")
    return result
