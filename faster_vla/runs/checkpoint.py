"""Resumable run checkpoints: learner, replay, numpy RNG state and counters, saved together or not at all.

One checkpoint per saved episode, `<directory>/<episode>/`, written by an orbax `CheckpointManager` with three
items:

- `learner/`: the whole `Learner` pytree (critics, targets, edit policy, α, every optimiser state, the JAX
  rng key, the update step), orbax's standard PyTree format;
- `replay/replay.npz`: the replay buffer, through its own exact `ReplayBuffer.save`;
- `actor/` and `successes/successes.npz` (runs that train the actor, `--actor-update success_bc`): the
  `ActorTrainer` pytree (params, EMA, optimiser state) and the success buffer it samples, restored by
  `restore_actor`;
- `state/`: JSON with the counters (env steps, episodes, successes, FLOPs, wall time... whatever the caller
  counts), the numpy RNG state(s), the eval success, and what the learner looked like (its config and
  every leaf's shape and dtype), so that a restore into a different learner fails before reading any
  array, saying what differs.

Atomicity: orbax writes a step into `<episode>.orbax-checkpoint-tmp/` and renames it to `<episode>/` only
after every item is complete; unfinished folders are never listed as steps and are deleted when the next
`RunCheckpointer` opens the folder. Retention deletes an old checkpoint by first renaming it into
`<directory>/.deleted/` (one rename takes it out of the listing) and only then removing its files, so a kill in
the middle of a deletion never leaves a half-deleted folder listed as a checkpoint; the trash is emptied after
each save and when a checkpointer opens the folder. So a run killed at any moment (tested with SIGKILL,
including in the middle of a save and of a deletion) restores the last complete checkpoint. That covers a killed process; orbax's commit is a
rename with no fsync of its own (only the replay file is fsynced), so a power cut right after a save may
lose what the OS had not flushed yet.

Retention: the last `keep_last` checkpoints, plus the `keep_best` checkpoints with the highest eval success
(checkpoints saved without an eval only count as recent ones). Saving is synchronous: `save` returns when
the checkpoint is final, so the caller may mutate the replay right after (an async save would have to copy
a multi-GB replay first).

Why one file of ~400 lines: the orbax items, the keep-last/best policy and the restore checks describe
one on-disk format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from faster_vla.acting.flow_trainer import ActorTrainer
from faster_vla.rl.learner import Learner
from faster_vla.policies.checkpoint import CheckpointMismatchError, checkpoint_manager, compare_shapes, quiet_orbax
from faster_vla.rl.replay import ReplayBuffer
from faster_vla.shared.files import ensure_writable_dir
from faster_vla.shared.jsonable import json_diff, to_jsonable
from faster_vla.acting.success_buffer import SuccessBuffer

FORMAT = "faster_vla.runs.checkpoint"
FORMAT_VERSION = 1

LEARNER_ITEM = "learner"
REPLAY_ITEM = "replay"
STATE_ITEM = "state"
ACTOR_ITEM = "actor"
SUCCESS_ITEM = "successes"
REPLAY_FILE = "replay.npz"
TRASH_DIR = ".deleted"  # where retention moves a checkpoint before removing its files (not a step name)
SUCCESS_FILE = "successes.npz"
EVAL_METRIC = "eval_success"


class RunCheckpointError(ValueError):
    """A run checkpoint cannot be used as asked: unreadable, another format, or for another learner."""


class RestoredRun(NamedTuple):
    """What `restore_latest` returns; unpacks as (learner, replay, rng_state, counters, episode)."""

    learner: Learner
    replay: ReplayBuffer
    rng_state: dict[str, Any]
    counters: dict[str, Any]
    episode: int


# -- buffers as orbax items ----------------------------------------------------------------------------------


class FileItemHandler(ocp.CheckpointHandler):
    """Saves a buffer with its own exact, atomic `save(path)` (the replay, the success buffer) as one file in
    the item folder orbax hands out (inside the step's temporary folder), so it is committed by the same
    rename as the rest of the checkpoint; restores it with the `load` the restore args name."""

    def save(self, directory: Any, args: FileSave) -> None:
        path = Path(os.fspath(directory))
        path.mkdir(parents=True, exist_ok=True)
        args.item.save(path / args.filename)

    def restore(self, directory: Any, args: FileRestore | None = None) -> Any:
        if args is None:
            raise ValueError("restoring a file item needs FileRestore(load, filename)")
        return args.load(Path(os.fspath(directory)) / args.filename)


@ocp.args.register_with_handler(FileItemHandler, for_save=True)
@dataclasses.dataclass
class FileSave(ocp.args.CheckpointArgs):
    item: ReplayBuffer | SuccessBuffer
    filename: str


@ocp.args.register_with_handler(FileItemHandler, for_restore=True)
@dataclasses.dataclass
class FileRestore(ocp.args.CheckpointArgs):
    load: Callable[[Path], Any]
    filename: str


# -- retention ----------------------------------------------------------------------------------------------


class _KeepLatestAndBest:
    """Orbax preservation policy: the newest `keep_last`, plus the `keep_best` highest eval successes (ties:
    the newer wins). Orbax's own LatestN/BestN cannot leave un-evaluated checkpoints out of the ranking."""

    def __init__(self, keep_last: int, keep_best: int) -> None:
        self.keep_last = keep_last
        self.keep_best = keep_best

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        n = len(checkpoints)  # oldest first
        keep = [i >= n - self.keep_last for i in range(n)]
        scored = sorted((c.metrics[EVAL_METRIC], c.step, i) for i, c in enumerate(checkpoints)
                        if c.metrics and EVAL_METRIC in c.metrics)
        for _, _, i in scored[len(scored) - self.keep_best:] if self.keep_best else ():
            keep[i] = True
        return keep


def _rank(metrics: Mapping[str, Any]) -> float:
    """orbax's best_fn (its presence makes orbax write the per-step metrics the policy reads)."""
    return float(metrics.get(EVAL_METRIC, -math.inf))


# -- the checkpointer -----------------------------------------------------------------------------------------


class RunCheckpointer:
    """Saves and restores whole-run checkpoints in `directory` (see the module docstring).

    Example::

        ckpt = RunCheckpointer(run_dir / "checkpoints", keep_last=3, keep_best=1)
        resumed = ckpt.restore_latest(Learner.create(config, example_inputs))
        if resumed is not None:
            learner, replay, rng_state, counters, episode = resumed
            rng.bit_generator.state = rng_state
        ...
        ckpt.save(episode, learner, replay, rng, counters, eval_success=0.62)
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int = 3, keep_best: int = 1) -> None:
        """keep_last >= 1 (the newest is what a resume needs), keep_best >= 0. The folder is created and
        checked writable here, before the run spends anything."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (a resume needs the newest checkpoint), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        self.directory = ensure_writable_dir(directory, "checkpoint folder")
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # removes the unfinished step folders of a killed run
            todelete_subdir=TRASH_DIR,  # retention renames a step out of the listing; _empty_trash removes it
            best_fn=_rank,
            best_mode="max",
            preservation_policy=_KeepLatestAndBest(keep_last, keep_best),
            create=True,
        )
        handlers = {LEARNER_ITEM: ocp.StandardCheckpointHandler(), REPLAY_ITEM: FileItemHandler(),
                    STATE_ITEM: ocp.JsonCheckpointHandler(), ACTOR_ITEM: ocp.StandardCheckpointHandler(),
                    SUCCESS_ITEM: FileItemHandler()}
        self._empty_trash()  # what a killed run was deleting
        self._manager = checkpoint_manager(self.directory, options, item_handlers=handlers)

    # -- introspection --------------------------------------------------------------------------------------

    @property
    def episodes(self) -> list[int]:
        """Episodes with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    @property
    def latest_episode(self) -> int | None:
        return self._manager.latest_step()

    @property
    def best_episode(self) -> int | None:
        """The kept checkpoint with the highest eval success (the newer on ties); None if none was evaluated."""
        best = None
        for step in self.episodes:
            value = self.eval_success(step)
            if value is not None and (best is None or value >= best[0]):
                best = (value, step)
        return None if best is None else best[1]

    def eval_success(self, episode: int) -> float | None:
        """The eval success saved with that checkpoint, None if it was saved without one."""
        with quiet_orbax():
            metrics = self._manager.metrics(episode)
        return None if not metrics or EVAL_METRIC not in metrics else float(metrics[EVAL_METRIC])

    def path(self, episode: int) -> Path:
        return self.directory / str(int(episode))

    # -- save -----------------------------------------------------------------------------------------------

    def save(
        self,
        episode: int,
        learner: Learner,
        replay: ReplayBuffer,
        rng_state: np.random.Generator | Mapping[str, Any],
        counters: Mapping[str, Any],
        eval_success: float | None = None,
        *,
        actor: ActorTrainer | None = None,
        successes: SuccessBuffer | None = None,
    ) -> Path:
        """Writes the checkpoint of `episode` (episodes completed; must exceed the latest saved) and applies
        retention; returns its folder once it is final.

        rng_state: a numpy Generator (its bit_generator state is saved) or any JSON mapping of such states,
        e.g. {"env": ..., "replay": ...}. counters: a JSON mapping (numbers, strings, lists, dicts; numpy
        scalars are converted), restored exactly. eval_success: ranks the checkpoint for keep-best.
        actor, successes: the trained actor and its success buffer (both or neither)."""
        episode = int(episode)
        if episode < 0:
            raise ValueError(f"episode must be >= 0, got {episode}")
        latest = self.latest_episode
        if latest is not None and episode <= latest:
            raise ValueError(f"episode {episode} is not after the latest checkpoint ({latest}) in {self.directory}: "
                             "checkpoints go forward; restore the latest first, or use a new folder")
        if eval_success is not None and not math.isfinite(float(eval_success)):
            raise ValueError(f"eval_success must be finite or None, got {eval_success}")
        if not isinstance(learner, Learner):
            raise TypeError(f"learner must be a faster_vla.rl.learner.Learner, got {type(learner).__name__}")
        if not isinstance(replay, ReplayBuffer):
            raise TypeError(f"replay must be a faster_vla.rl.replay.ReplayBuffer, got {type(replay).__name__}")
        if (actor is None) != (successes is None):
            raise ValueError("save the trained actor and its success buffer together (both or neither)")
        state = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "episode": episode,
            "counters": to_jsonable(dict(counters), _where="counters"),
            "rng_state": _rng_json(rng_state),
            EVAL_METRIC: None if eval_success is None else float(eval_success),
            "learner_config": to_jsonable(learner.config, strict=False),
            "learner_leaves": _leaf_specs(learner),
            "actor_trained": actor is not None,
        }
        json.dumps(state)  # fail here, before orbax creates anything, on a non-JSON value
        args = ocp.args.Composite(**{
            LEARNER_ITEM: ocp.args.StandardSave(learner),
            REPLAY_ITEM: FileSave(replay, REPLAY_FILE),
            STATE_ITEM: ocp.args.JsonSave(state),
            **({} if actor is None else {ACTOR_ITEM: ocp.args.StandardSave(actor),
                                         SUCCESS_ITEM: FileSave(successes, SUCCESS_FILE)}),
        })
        metrics = {} if eval_success is None else {EVAL_METRIC: float(eval_success)}
        with quiet_orbax():
            self._manager.save(episode, args=args, metrics=metrics, force=True)
            self._manager.wait_until_finished()
        self._empty_trash()
        return self.path(episode)

    def _empty_trash(self) -> None:
        """Removes the checkpoints retention moved out of the listing (a kill may leave some half removed)."""
        shutil.rmtree(self.directory / TRASH_DIR, ignore_errors=True)

    # -- restore --------------------------------------------------------------------------------------------

    def restore_latest(self, learner_template: Learner, *, allow_config_change: bool = False) -> RestoredRun | None:
        """The newest complete checkpoint, or None when there is none (a fresh run). See `restore`."""
        latest = self.latest_episode
        if latest is None:
            return None
        return self.restore(latest, learner_template, allow_config_change=allow_config_change)

    def restore(self, episode: int, learner_template: Learner, *, allow_config_change: bool = False) -> RestoredRun:
        """Restores one checkpoint into the structure of `learner_template` (a Learner of the run's config,
        e.g. a fresh `Learner.create(...)`; it also supplies the static parts: apply functions, optimisers).

        Raises RunCheckpointError before reading any array if the template's leaves (paths, shapes, dtypes)
        differ from the saved learner's, listing the differences and the config fields behind them; a config
        that differs without changing any shape (e.g. a learning rate) also raises unless
        `allow_config_change`, since the template's config is what the resumed run would use."""
        episode = int(episode)
        if episode not in self._manager.all_steps():
            raise RunCheckpointError(f"no complete checkpoint for episode {episode} in {self.directory} "
                                     f"(have {self.episodes})")
        state = self._restore_items(episode, {STATE_ITEM: ocp.args.JsonRestore()})[STATE_ITEM]
        where = str(self.path(episode))
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise RunCheckpointError(f"{where} is not a faster_vla run checkpoint")
        if state.get("version") != FORMAT_VERSION:
            raise RunCheckpointError(f"{where}: run checkpoint format version {state.get('version')!r}; this "
                                     f"faster_vla reads version {FORMAT_VERSION} only")
        _check_template(state, learner_template, where, allow_config_change)
        items = self._restore_items(episode, {LEARNER_ITEM: ocp.args.StandardRestore(learner_template),
                                              REPLAY_ITEM: FileRestore(ReplayBuffer.load, REPLAY_FILE)})
        return RestoredRun(items[LEARNER_ITEM], items[REPLAY_ITEM], state["rng_state"], state["counters"], episode)

    def restore_actor(self, episode: int, trainer_template: ActorTrainer | None, *, successes: bool = True
                      ) -> tuple[ActorTrainer, SuccessBuffer | None] | None:
        """The trained actor and success buffer of a checkpoint (None for a frozen-actor run's checkpoint).

        `trainer_template` (e.g. a fresh `ActorTrainer.create(...)` for the run's actor and optimiser) gives
        the structure; None says the caller's run keeps the actor frozen. A checkpoint and a run that disagree
        on whether the actor trains raise RunCheckpointError, since resuming across that would silently
        restart or drop the actor's training. `successes=False` skips reading the buffer (export, eval)."""
        state = self._restore_items(int(episode), {STATE_ITEM: ocp.args.JsonRestore()})[STATE_ITEM]
        trained = bool(state.get("actor_trained", False))
        where = str(self.path(episode))
        if trained and trainer_template is None:
            raise RunCheckpointError(f"{where} holds a trained actor (--actor-update success_bc) but this run keeps "
                                     "the actor frozen; resume with the run's own config")
        if not trained and trainer_template is not None:
            raise RunCheckpointError(f"{where} is from a frozen-actor run; it has no actor to resume training "
                                     "(start a new run for --actor-update success_bc)")
        if not trained:
            return None
        args = {ACTOR_ITEM: ocp.args.StandardRestore(trainer_template)}
        if successes:
            args[SUCCESS_ITEM] = FileRestore(SuccessBuffer.load, SUCCESS_FILE)
        items = self._restore_items(int(episode), args)
        return items[ACTOR_ITEM], items[SUCCESS_ITEM] if successes else None

    def _restore_items(self, episode: int, args: dict[str, Any]) -> Any:
        try:
            with quiet_orbax():
                return self._manager.restore(episode, args=ocp.args.Composite(**args))
        except RunCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise RunCheckpointError(f"cannot restore {sorted(args)} of {self.path(episode)}: "
                                     f"{type(exc).__name__}: {exc}") from exc

    # -- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- helpers --------------------------------------------------------------------------------------------------


def _rng_json(rng_state: np.random.Generator | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(rng_state, np.random.Generator):
        rng_state = rng_state.bit_generator.state
    if not isinstance(rng_state, Mapping):
        raise TypeError("rng_state must be a numpy Generator or a mapping (a bit_generator.state, or several "
                        f"under names), got {type(rng_state).__name__}")
    return to_jsonable({k: v.bit_generator.state if isinstance(v, np.random.Generator) else v
                        for k, v in rng_state.items()}, _where="rng_state")


def _leaf_specs(learner: Learner) -> dict[str, list]:
    """{jax key path: [shape, dtype]} of every learner leaf (the static config excluded)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(learner)[0]:
        shape = tuple(int(d) for d in np.shape(leaf))
        dtype = str(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype.name
        out[jax.tree_util.keystr(path)] = [list(shape), dtype]
    return out


def _check_template(state: Mapping[str, Any], template: Learner, where: str, allow_config_change: bool) -> None:
    if not isinstance(template, Learner):
        raise TypeError(f"learner_template must be a faster_vla.rl.learner.Learner, got {type(template).__name__}")
    config_diff = json_diff(state["learner_config"], to_jsonable(template.config, strict=False))
    saved = state["learner_leaves"]
    wanted = _leaf_specs(template)
    problems = []
    try:
        compare_shapes({p: tuple(s) for p, (s, _) in saved.items()}, {p: tuple(s) for p, (s, _) in wanted.items()},
                       source=f"learner in {where}")
    except CheckpointMismatchError as exc:
        problems.append(str(exc))
    # Integer scalars may come back as Python ints or int32 arrays (e.g. TrainState.step); other dtypes must match.
    dtypes = [f"    {p}: saved {saved[p][1]}, template {wanted[p][1]}" for p in sorted(saved.keys() & wanted.keys())
              if saved[p][1] != wanted[p][1] and not (_is_int(saved[p][1]) and _is_int(wanted[p][1]))]
    if dtypes:
        problems.append(f"learner in {where}: {len(dtypes)} leaves have another dtype:\n" + "\n".join(dtypes))
    if problems or (config_diff and not allow_config_change):
        because = ("learner config fields that differ (saved -> template):\n    " + "\n    ".join(config_diff)
                   if config_diff else "the learner configs are equal")
        lines = "\n".join(problems).splitlines()
        if len(lines) > _MAX_LINES:  # a real learner has hundreds of leaves; the config diff says why
            lines = lines[:_MAX_LINES] + [f"    ... ({len(lines) - _MAX_LINES} more lines)"]
        fix = ("build the template from the run's own config (its config.json), or start a new run folder"
               + ("" if problems else "; pass allow_config_change=True to resume with the new config on purpose"))
        raise RunCheckpointError(f"the checkpoint {where} was written by another learner than the template; "
                                 + "\n".join([because, *lines, fix]))


_MAX_LINES = 24


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))
