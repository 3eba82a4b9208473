"""`faster-vla train <config>`: named fine-tuning configs, every field overridable on the command line.

    faster-vla train cpu_small_faster_expo                        # a few episodes of a small π0.5 on CPU
    faster-vla train pi05_libero_faster_expo --env.task 12 --run-dir runs/task12
    faster-vla train pi05_libero_faster_expo --run-dir runs/task12 --resume
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import tyro

from faster_vla.actor_source import ActorSource
from faster_vla.finetune import CriticConfig, TrainConfig, train
from faster_vla.libero_env import LiberoEnvConfig
from faster_vla.selection import SelectionConfig

_PI05_LIBERO = TrainConfig(actor=ActorSource("pi05_libero"))
# A small π0.5 and small critics: every part of a real run, minutes on a 2-core CPU. Episodes are cut at 40
# steps and windows start at chunk boundaries (observations rendered only there).
_CPU_SMALL = TrainConfig(
    actor=ActorSource("pi05_small"),
    env=LiberoEnvConfig(suite="libero_90", task=0, max_steps=40, resolution=128),
    selection=SelectionConfig("faster", num_candidates=4, temperature=0.0),
    critics=CriticConfig(hidden_dims=(128, 128), num_members=4, feature_proj_dim=64, state_embed_dim=16),
    episodes=4, updates_per_episode=2, utd=2, batch_size=16, replay_capacity=5_000, cache_batch=8,
    eval_every=2, eval_episodes=1, checkpoint_every=1,
)

TRAIN_CONFIGS: dict[str, tuple[str, TrainConfig]] = {
    "pi05_libero_faster_expo": (
        "FASTER-EXPO on openpi's pi05_libero (paper's VLA setting: N 8, greedy, 3 updates × UTD 10, batch 32)",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_faster_expo"))),
    "pi05_libero_expo": (
        "EXPO (best-of-N: denoise all 8, edit each, argmax Q) on pi05_libero",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_expo"),
                            selection=SelectionConfig("best_of_n", 8, 0.0))),
    "pi05_libero_base": (
        "The frozen pi05_libero policy alone (no learning): the baseline curve",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_base"), selection=SelectionConfig("base", 1))),
    "cpu_small_faster_expo": (
        "FASTER-EXPO with the small π0.5 on CPU (random weights until the pretrained small checkpoint ships)",
        dataclasses.replace(_CPU_SMALL, run_dir=Path("runs/cpu_small_faster_expo"))),
    "cpu_small_expo": (
        "EXPO with the small π0.5 on CPU",
        dataclasses.replace(_CPU_SMALL, run_dir=Path("runs/cpu_small_expo"),
                            selection=SelectionConfig("best_of_n", 4, 0.0))),
}

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
