"""Demonstrations from the scripted experts: recording, the on-disk format, and reading it back.

Recording runs each episode unrendered (~10 ms a step), keeping the simulator state before every action,
and renders the kept states only if the expert succeeded (`LiberoEnv.render_state`, before the next reset,
so fixtures are where they were): failed attempts cost no rendering. A stored observation is the state at
the control step's boundary; the live env's is sampled by robosuite at a physics sub-step inside the step,
so the two differ by part of one step's motion (millimetres), a timing offset a chunked policy absorbs.
Episode k of a task starts from the suite's init state k mod (number of init states), with its own RNG
seeded by (seed, task id, k): a dataset is a function of its config, whatever the worker count.

On-disk format (version 1), a folder:

    manifest.json                     format version, the recording config, per task: name, instruction,
                                      episodes (file, init state, steps, success), expert success rate
    <task name>/episode_00000.npz     one successful episode of T steps (numpy .npz, compressed):
        image        uint8   [T, S, S, 3]  base camera, openpi's convention (flipped, resized-with-pad to S)
        wrist_image  uint8   [T, S, S, 3]  wrist camera, same
        state        float32 [T, 8]        eef position, eef axis-angle, gripper qpos (openpi's LIBERO state)
        actions      float32 [T, 7]        the expert's action at each step (OSC_POSE deltas + gripper)
        sim_state    float64 [T, D]        MuJoCo state (time, qpos, qvel) before each action, for replays
        init_state_index int, seed int    where and how the episode started

The folder is written under a temporary name and renamed when complete: a folder named like the output
is always a whole dataset. Only successful episodes are stored (behaviour cloning imitates successes);
the manifest counts the failures, which is the expert's success rate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faster_vla.libero.experts import EXPERTS, ExpertConfig, expert_for
from faster_vla.libero.env import LiberoEnv, LiberoEnvConfig, check_libero_installed, parse_task, resolve_task
from faster_vla.policies.transforms import LIBERO_IMAGE_KEY, LIBERO_STATE_KEY, LIBERO_WRIST_IMAGE_KEY
from faster_vla.shared.files import atomic_write
from faster_vla.shared.jsonable import to_jsonable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EPISODE_KEYS = ("image", "wrist_image", "state", "actions", "sim_state")


class DemoFormatError(ValueError):
    """A demonstration folder is missing, incomplete or of another format version; the message says which."""


@dataclasses.dataclass(frozen=True)
class RecordConfig:
    """Record scripted-expert demonstrations of libero_90 tasks (see faster_vla.pretraining.demos for the format)."""

    output: Path = Path("demos/libero90_scripted")
    """Folder to create; refused if it exists, unless --force."""
    tasks: tuple[str, ...] = tuple(sorted(EXPERTS))
    """Tasks (ids or names in the suite) with a scripted expert; default: all scripted tasks."""
    suite: str = "libero_90"
    """Task suite."""
    episodes: int = 50
    """Episodes attempted per task; episode k starts from init state k mod (the suite's 50)."""
    seed: int = 0
    """Seeds each episode's RNG (with the task id and episode index) and the env's fixture placement."""
    image_size: int = 112
    """Stored image size (square, resized-with-pad from the 256² render, as openpi does to 224)."""
    resolution: int = 256
    """Camera render size (openpi renders 256)."""
    expert: ExpertConfig = ExpertConfig(jitter_m=0.01, action_noise=0.1)
    """How the experts move; jitter and action noise (seeded per episode) make demonstrations diverse."""
    render: bool = True
    """Render and store successful episodes; --no-render only scores the experts (writes the manifest)."""
    num_workers: int = 1
    """Processes recording tasks side by side (one task at a time each; ~2 GB and one core each)."""
    force: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive, got {self.episodes}")
        if self.num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")
        if not self.tasks:
            raise ValueError("tasks is empty; name at least one scripted task")


def _episode_rng(seed: int, task_id: int, episode: int) -> np.random.Generator:
    return np.random.default_rng([seed, task_id, episode])


def record_task(config: RecordConfig, task: str, folder: Path,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Records `config.episodes` expert episodes of one task into `folder`/<task name>/; its manifest entry."""
    env = LiberoEnv(LiberoEnvConfig(suite=config.suite, task=parse_task(task), resolution=config.resolution,
                                    image_size=config.image_size, seed=config.seed, render_mode="none"))
    try:
        expert = expert_for(env.task.name, config.expert)
        task_dir = folder / env.task.name
        task_dir.mkdir(parents=True, exist_ok=True)
        episodes, start = [], time.perf_counter()
        for k in range(config.episodes):
            init = k % env.num_init_states
            sim_states: list[np.ndarray] = []
            actions: list[np.ndarray] = []
            env.reset(init)
            expert.reset(env, _episode_rng(config.seed, env.task.task_id, k))
            while True:
                sim_states.append(env.get_sim_state())
                action = expert.act()
                actions.append(action)
                result = env.step_chunk(action[None])
                if result.done or result.truncated:
                    break
            entry: dict[str, Any] = {"episode": k, "init_state_index": init, "steps": len(actions),
                                     "success": bool(result.done), "retries": expert.retries}
            if result.done and config.render:
                observations = [env.render_state(state) for state in sim_states]
                arrays = {
                    "image": np.stack([o[LIBERO_IMAGE_KEY] for o in observations]),
                    "wrist_image": np.stack([o[LIBERO_WRIST_IMAGE_KEY] for o in observations]),
                    "state": np.stack([o[LIBERO_STATE_KEY] for o in observations]).astype(np.float32),
                    "actions": np.stack(actions).astype(np.float32),
                    "sim_state": np.stack(sim_states),
                    "init_state_index": np.int64(init),
                    "seed": np.int64(config.seed),
                }
                buffer = io.BytesIO()
                np.savez_compressed(buffer, **arrays)
                entry["file"] = f"{env.task.name}/episode_{k:05d}.npz"
                atomic_write(folder / entry["file"], buffer.getvalue())
            episodes.append(entry)
            log(f"{env.task.name} episode {k}: init {init}, {'success' if result.done else 'FAILED'} in "
                f"{len(actions)} steps ({time.perf_counter() - start:.0f} s so far)")
        successes = sum(e["success"] for e in episodes)
        return {"task_id": env.task.task_id, "name": env.task.name, "instruction": env.instruction,
                "attempted": len(episodes), "successes": successes,
                "expert_success_rate": successes / len(episodes), "episodes": episodes}
    finally:
        env.close()


def _record_task_quiet(config: RecordConfig, task: str, folder: Path) -> dict[str, Any]:
    return record_task(config, task, folder, log=lambda _: None)


def record_demos(config: RecordConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Records every task of `config` and writes the dataset folder atomically; returns the manifest."""
    check_libero_installed()
    output = Path(config.output).expanduser().absolute()
    for task in config.tasks:  # unknown tasks or tasks without an expert fail here, before any episode
        expert_for(resolve_task(config.suite, parse_task(task)).name)
    if output.exists() and not config.force:
        raise FileExistsError(f"{output} exists; choose another --output or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a dataset is an ordinary folder
    try:
        start = time.perf_counter()
        if config.num_workers == 1:
            entries = [record_task(config, task, staging, log) for task in config.tasks]
        else:
            context = mp.get_context("spawn")  # never fork a process that holds JAX or a GL context
            with concurrent.futures.ProcessPoolExecutor(config.num_workers, mp_context=context) as pool:
                futures = [pool.submit(_record_task_quiet, config, task, staging) for task in config.tasks]
                entries = []
                for future in futures:
                    entries.append(future.result())
                    log(f"{entries[-1]['name']}: {entries[-1]['successes']}/{entries[-1]['attempted']} successful")
        manifest = {
            "format_version": FORMAT_VERSION,
            "config": to_jsonable(config, strict=False),
            "suite": config.suite,
            "image_size": config.image_size,
            "rendered": config.render,
            "tasks": entries,
            "seconds": time.perf_counter() - start,
        }
        atomic_write(staging / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for entry in entries:
        log(f"{entry['name']}: expert success {entry['successes']}/{entry['attempted']}")
    return manifest


# -- reading -----------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a demonstration folder, checked for completeness and format version."""
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DemoFormatError(f"{path} is not a demonstration folder (no {MANIFEST}); record one with "
                              "`faster-vla record-demos --output PATH`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DemoFormatError(f"{path} has demonstration format {manifest.get('format_version')!r}; this version "
                              f"of faster-vla reads format {FORMAT_VERSION}: record it again")
    return manifest


@dataclasses.dataclass(frozen=True)
class Episode:
    """One stored demonstration (arrays as in the format above)."""

    task: str
    instruction: str
    image: np.ndarray  # [T, S, S, 3] uint8
    wrist_image: np.ndarray  # [T, S, S, 3] uint8
    state: np.ndarray  # [T, 8] float32
    actions: np.ndarray  # [T, 7] float32
    init_state_index: int

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def iter_episodes(path: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> Iterator[Episode]:
    """The stored successful episodes of a demonstration folder (optionally only the named tasks)."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if not manifest["rendered"]:
        raise DemoFormatError(f"{path} was recorded with --no-render (expert scores only): it has no episodes")
    known = {t["name"] for t in manifest["tasks"]}
    if tasks is not None:
        missing = sorted(set(tasks) - known)
        if missing:
            raise DemoFormatError(f"{path} has no task(s) {missing}; it holds {sorted(known)}")
    for entry in manifest["tasks"]:
        if tasks is not None and entry["name"] not in tasks:
            continue
        for episode in entry["episodes"]:
            if "file" not in episode:
                continue
            file = path / episode["file"]
            if not file.is_file():
                raise DemoFormatError(f"{file} is listed in the manifest but missing: the folder is incomplete")
            with np.load(file) as data:
                missing = [k for k in EPISODE_KEYS if k not in data]
                if missing:
                    raise DemoFormatError(f"{file} lacks {missing}; it is not a format-{FORMAT_VERSION} episode")
                yield Episode(task=entry["name"], instruction=entry["instruction"], image=data["image"],
                              wrist_image=data["wrist_image"], state=data["state"], actions=data["actions"],
                              init_state_index=int(data["init_state_index"]))
