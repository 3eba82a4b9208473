"""Loading a finished (or running) fine-tuning run: its config and learner at a checkpoint, and the tuned actor
of a `--actor-update success_bc` run. What evaluation and export need, without the training loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from faster_vla.acting.flow_trainer import ActorTrainer
from faster_vla.policies.config import get_preset
from faster_vla.policies.policy import Policy
from faster_vla.rl.learner import Learner
from faster_vla.runs.checkpoint import RunCheckpointer
from faster_vla.runs.config import TrainConfig, learner_config
from faster_vla.shared.jsonable import from_jsonable


def load_run(run_dir: Path, which: Literal["best", "latest"] = "best") -> tuple[TrainConfig, Learner, int]:
    """A run's config and the learner of its best (or latest) checkpoint, and that checkpoint's episode."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fine-tuning run folder (no config.json); pass the --run-dir "
                                "given to `faster-vla train`")
    config = from_jsonable(TrainConfig, json.loads(config_path.read_text()))
    checkpointer = RunCheckpointer(Path(run_dir) / "checkpoints", keep_last=config.keep_last, keep_best=config.keep_best)
    episode = checkpointer.best_episode if which == "best" else None
    episode = checkpointer.latest_episode if episode is None else episode
    if episode is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    lconfig = learner_config(config, get_preset(config.actor.preset))
    template = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=config.seed)
    return config, checkpointer.restore(episode, template).learner, episode


def load_trained_actor(run_dir: Path, config: TrainConfig, episode: int, policy: Policy) -> bool:
    """Puts the acting params (EMA) of a `--actor-update success_bc` run's checkpoint into `policy`, built
    from the run's `config.actor`; False, leaving it untouched, for a frozen-actor run."""
    if config.actor_update == "frozen":
        return False
    template = ActorTrainer.create(policy.actor.params, config.actor_optimizer, seed=config.seed)
    checkpointer = RunCheckpointer(Path(run_dir) / "checkpoints", keep_last=config.keep_last,
                                   keep_best=config.keep_best)
    # A checkpoint without an actor raises here (RunCheckpointError), since the template asks for one.
    trainer, _ = checkpointer.restore_actor(episode, template, successes=False)
    policy.actor.params = trainer.acting_params
    return True

