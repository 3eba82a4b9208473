"""Pretraining a small π0.5 on scripted LIBERO demonstrations: behaviour cloning with openpi's flow loss.

Same model code as pi05_libero (a small preset), one language-conditioned multitask model over every task of
a demonstration folder (`faster_vla.pretraining.demos`). Training follows openpi's recipe at small scale: the LIBERO
input pipeline (`make_libero_policy`: quantile normalisation, resize, tokenisation, padding) on each sampled
frame with its next `action_horizon` actions (the episode's last action repeats past its end, as LeRobot's
clamped chunks do; `Policy.to_training_batch`), openpi's image augmentation, AdamW with warm-up and cosine
decay, gradient clipping and an EMA of the weights, which is what gets exported.

A run folder holds the resolved config, metrics (`faster_vla.runs.logger`), orbax checkpoints of the trainer
for `--resume` (a killed run loses at most `save_every` steps), and at the end `checkpoint/`, written
atomically in openpi's layout: `params/`, `assets/physical-intelligence/libero/norm_stats.json` (computed
from the demonstrations), the tokenizer, and `pretrain.json` (data, settings, size: the model card's facts).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from faster_vla import checkpoints
from faster_vla.acting.flow_trainer import ActorFinetuneConfig, ActorTrainer
from faster_vla.acting.actor_source import (
    RANDOM_WEIGHTS,
    SHIPPED_TOKENIZER,
    ActorSource,
    save_policy,
)
from faster_vla.pretraining.demos import Episode, iter_episodes, read_manifest
from faster_vla.policies import download
from faster_vla.policies.checkpoint import checkpoint_manager, quiet_orbax
from faster_vla.policies.config import get_preset
from faster_vla.policies.normalize import NormStats, save_norm_stats
from faster_vla.policies.pi05 import Pi05Actor
from faster_vla.policies.transforms import LIBERO_IMAGE_KEY, LIBERO_STATE_KEY, LIBERO_WRIST_IMAGE_KEY
from faster_vla.runs.logger import RunLogger
from faster_vla.shared.checks import raise_if_non_finite
from faster_vla.shared.files import atomic_write
from faster_vla.shared.jsonable import to_jsonable

CHECKPOINT_DIR = "checkpoint"  # the exported openpi checkpoint inside the run folder
TRAINER_DIR = "trainer"  # orbax checkpoints of the trainer, for --resume
SNAPSHOT_DIR = "snapshots"  # with --snapshots: snapshots/step_<N>, each laid out as checkpoint/
CARD_FILE = "pretrain.json"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Behaviour-clone a small π0.5 on scripted LIBERO demonstrations (see faster_vla.pretraining.pretrain)."""

    demos: Path = Path("demos/libero90_scripted")
    """Demonstration folder (`faster-vla record-demos`)."""
    run_dir: Path = Path("runs/pretrain_pi05_libero_small")
    """Run folder: config, metrics, trainer checkpoints, and the exported checkpoint/ at the end."""
    preset: str = "pi05_libero_small"
    """Architecture preset (same model code as pi05_libero)."""
    tokenizer: str | None = None
    """sentencepiece model; None: the shipped 512-piece LIBERO tokenizer."""
    steps: int = 1600
    """Optimiser steps (the run may stop earlier at --time-budget-s)."""
    time_budget_s: float | None = None
    """Stop (and export) after this much training wall time, whatever the step; None: run all steps."""
    optimizer: ActorFinetuneConfig = ActorFinetuneConfig(
        learning_rate=3e-4, weight_decay=1e-4, warmup_steps=100, decay_steps=1500, ema_decay=0.99,
        trainable="all", augment=True, batch_size=32)
    """Optimiser, schedule, EMA, augmentation and batch size (everything trains)."""
    seed: int = 0
    """Seeds the initial weights, the batch sampling and the trainer's RNG."""
    log_every: int = 50
    """Steps between metric records."""
    save_every: int = 200
    """Steps between trainer checkpoints (resume points)."""
    snapshots: bool = False
    """Also export each saved step's EMA weights as a loadable checkpoint in snapshots/step_<N>, so that the
    step to ship can be chosen by evaluating them (the built-in model is deliberately imperfect)."""
    resume: bool = False
    """Continue the run in run_dir from its last trainer checkpoint."""
    wandb_mode: str = "offline"
    """wandb: offline (default), online or disabled."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.log_every <= 0 or self.save_every <= 0:
            raise ValueError("steps, log_every and save_every must be positive")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive or None, got {self.time_budget_s}")


# -- data --------------------------------------------------------------------------------------------------


def compute_norm_stats(episodes: Sequence[Episode]) -> dict[str, NormStats]:
    """openpi's statistics (mean, std, 1st and 99th percentiles per dimension) of states and actions over all
    frames (exact quantiles; openpi approximates them with histograms)."""
    stats = {}
    for key in ("state", "actions"):
        values = np.concatenate([getattr(e, key) for e in episodes]).astype(np.float64)  # [frames, d]
        stats[key] = NormStats(mean=values.mean(0), std=values.std(0), q01=np.quantile(values, 0.01, axis=0),
                               q99=np.quantile(values, 0.99, axis=0))
    return stats


class DemoFrames:
    """All frames of a set of episodes in memory, sampled uniformly as (observation, action chunk) rows."""

    def __init__(self, episodes: Sequence[Episode], horizon: int) -> None:
        if not episodes:
            raise ValueError("no episodes to train on: the demonstration folder holds no successful episode")
        self.horizon = horizon
        self.image = np.concatenate([e.image for e in episodes])  # [N, S, S, 3] uint8
        self.wrist_image = np.concatenate([e.wrist_image for e in episodes])
        self.state = np.concatenate([e.state for e in episodes])  # [N, 8]
        self.actions = np.concatenate([e.actions for e in episodes])  # [N, 7]
        lengths = np.array([len(e) for e in episodes])
        ends = np.cumsum(lengths)
        self.last = np.repeat(ends - 1, lengths)  # [N] index of each frame's episode's last frame
        self.prompt = np.repeat(np.array([e.instruction for e in episodes], dtype=object), lengths)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def rows(self, index: np.ndarray) -> list[dict[str, Any]]:
        """openpi LIBERO rows for frames `index` [b], each with its next `horizon` actions [H, 7]."""
        chunk = np.minimum(index[:, None] + np.arange(self.horizon)[None], self.last[index][:, None])  # [b, H]
        return [{LIBERO_IMAGE_KEY: self.image[i], LIBERO_WRIST_IMAGE_KEY: self.wrist_image[i],
                 LIBERO_STATE_KEY: self.state[i], "prompt": self.prompt[i], "actions": self.actions[c]}
                for i, c in zip(index, chunk, strict=True)]


# -- the run -----------------------------------------------------------------------------------------------


def _trainer_manager(run_dir: Path) -> ocp.CheckpointManager:
    return checkpoint_manager(run_dir / TRAINER_DIR, ocp.CheckpointManagerOptions(max_to_keep=2),
                              item_names=("trainer", "state"))


def pretrain(config: PretrainConfig, *, log: Callable[[str], None] = print) -> Path:
    """Runs (or resumes) pretraining and exports the EMA weights; returns the exported checkpoint folder."""
    manifest = read_manifest(config.demos)  # a bad folder fails before anything is built
    model_config = get_preset(config.preset)
    if config.tokenizer is None and config.preset not in SHIPPED_TOKENIZER:
        raise ValueError(f"preset {config.preset!r} has no shipped tokenizer; pass --tokenizer")
    run_dir = Path(config.run_dir).expanduser().absolute()
    if (run_dir / CHECKPOINT_DIR).exists() and not config.resume:
        raise FileExistsError(f"{run_dir} already holds an exported checkpoint; choose another --run-dir")
    episodes = list(iter_episodes(config.demos))
    frames = DemoFrames(episodes, model_config.action_horizon)
    norm_stats = compute_norm_stats(episodes)
    assets = run_dir / "norm_stats"
    save_norm_stats(assets, norm_stats)
    tokenizer = config.tokenizer or str(checkpoints.path(SHIPPED_TOKENIZER[config.preset]))
    source = ActorSource(preset=config.preset, checkpoint=RANDOM_WEIGHTS, tokenizer=tokenizer, norm_stats=str(assets),
                         seed=config.seed)
    policy = source.build(trainable=True)  # the model is trained from scratch
    actor: Pi05Actor = policy.actor
    trainer = ActorTrainer.create(actor.params, config.optimizer, seed=config.seed)
    sampler = np.random.default_rng(config.seed)
    start_step = 0
    manager = _trainer_manager(run_dir)
    with RunLogger(run_dir, config, resume=config.resume, allow_config_change=config.resume,  # e.g. more steps
                   wandb_mode=config.wandb_mode,  # type: ignore[arg-type]
                   progress=False, plot_every=0) as logger:
        if config.resume and manager.latest_step() is not None:
            step = manager.latest_step()
            with quiet_orbax():
                restored = manager.restore(step, args=ocp.args.Composite(
                    trainer=ocp.args.StandardRestore(trainer), state=ocp.args.JsonRestore()))
            trainer = restored["trainer"]
            sampler.bit_generator.state = restored["state"]["sampler"]
            start_step = int(restored["state"]["step"])
            logger.rewind(start_step)
            log(f"resumed at step {start_step}")
        log(f"pretraining {config.preset} on {len(frames)} frames of {len(episodes)} episodes, "
            f"{len(manifest['tasks'])} tasks; steps {start_step}->{config.steps}")
        start, losses = time.perf_counter(), []

        def card(at_step: int) -> dict[str, Any]:  # the model card's facts (pretrain.json)
            return {
                "preset": config.preset, "steps": at_step, "frames": len(frames), "episodes": len(episodes),
                "tasks": [{k: t[k] for k in ("task_id", "name", "instruction", "successes")}
                          for t in manifest["tasks"]],
                "demos": str(config.demos), "demo_config": manifest["config"],
                "config": to_jsonable(config, strict=False),
                "parameters": int(sum(np.size(x) for x in jax.tree.leaves(trainer.params))),
                "train_seconds": time.perf_counter() - start}

        step = start_step
        for step in range(start_step + 1, config.steps + 1):
            observation, actions = policy.to_training_batch(frames.rows(
                sampler.integers(0, len(frames), config.optimizer.batch_size)))
            trainer, info = trainer.update(actor, observation, actions)
            losses.append(info["actor_flow_loss"])
            if step % config.log_every == 0:
                loss = float(np.mean(jax.device_get(losses)))
                raise_if_non_finite({"train/flow_loss": loss}, f"pretraining step {step}",
                                    "lower --optimizer.learning-rate and --resume from the last checkpoint")
                elapsed = time.perf_counter() - start
                logger.log({"train/flow_loss": loss, "train/grad_norm": float(info["actor_grad_norm"]),
                            "learning_rate": float(config.optimizer.schedule()(step)),
                            "seconds": elapsed, "steps_per_s": (step - start_step) / elapsed}, step=step)
                log(f"step {step}: flow loss {loss:.4f} ({(step - start_step) / elapsed:.2f} steps/s)")
                losses = []
            budget_over = config.time_budget_s is not None and time.perf_counter() - start > config.time_budget_s
            if step % config.save_every == 0 or step == config.steps or budget_over:
                with quiet_orbax():
                    manager.save(step, args=ocp.args.Composite(
                        trainer=ocp.args.StandardSave(trainer),
                        state=ocp.args.JsonSave({"step": step, "sampler": sampler.bit_generator.state})))
                    manager.wait_until_finished()
                if config.snapshots:
                    export_checkpoint(run_dir, trainer, norm_stats, tokenizer, card(step),
                                      target=run_dir / SNAPSHOT_DIR / f"step_{step}")
            if budget_over:
                log(f"time budget of {config.time_budget_s} s reached at step {step}")
                break
        manager.close()
        out = export_checkpoint(run_dir, trainer, norm_stats, tokenizer, card(step))
    log(f"exported {out}")
    return out


def export_checkpoint(run_dir: Path, trainer: ActorTrainer, norm_stats: dict[str, NormStats], tokenizer: str,
                      card: dict[str, Any], *, target: Path | None = None) -> Path:
    """Writes `target` (default <run_dir>/checkpoint; openpi layout + tokenizer + pretrain.json) in one step."""
    target = run_dir / CHECKPOINT_DIR if target is None else target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=run_dir))
    try:
        staged = save_policy(work / CHECKPOINT_DIR, jax.device_get(trainer.acting_params), norm_stats,
                             tokenizer=tokenizer)
        atomic_write(staged / CARD_FILE, (json.dumps(to_jsonable(card, strict=False), indent=1) + "\n").encode())
        download.move_into_place(staged, target, replace=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
