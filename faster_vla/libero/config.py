"""What a LIBERO env is, as configuration: the task, rendering, episode length, the robot's state size, and
the parsing of task and worker arguments. Importing it loads no simulator (configs, bundles and serving read
it; `faster_vla.libero.env` runs the env)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Literal

RenderMode = Literal["every_step", "chunk_boundary", "none"]
RENDER_MODES: tuple[str, ...] = ("every_step", "chunk_boundary", "none")
ImageResize = Literal["jax", "pil"]
IMAGE_RESIZES: tuple[str, ...] = ("jax", "pil")
ResetSeeding = Literal["per_init_state", "stream"]
RESET_SEEDINGS: tuple[str, ...] = ("per_init_state", "stream")

# openpi's examples/libero/main.py: a little above each suite's longest training demonstration.
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
STATE_DIM = 8  # eef position 3 + axis-angle 3 + gripper qpos 2


@dataclasses.dataclass(frozen=True)
class LiberoEnvConfig:
    """One LIBERO task as an environment (defaults: openpi's LIBERO evaluation settings)."""

    suite: str = "libero_90"
    """Task suite: libero_spatial, libero_object, libero_goal, libero_10 or libero_90."""
    task: int | str = 0
    """Task within the suite: its id (0-based, the suite's order) or its name; see list_tasks(suite)."""
    resolution: int = 256
    """Camera render size in pixels (square); openpi renders 256."""
    image_size: int = 224
    """Size the images are resized-with-pad to for the policy (square)."""
    num_wait_steps: int = 10
    """No-op steps after each reset while the dropped objects settle (not counted in max_steps)."""
    max_steps: int | None = None
    """Policy steps per episode before truncation; None: the suite's default (spatial 220, object 280,
    goal 300, 10: 520, 90: 400)."""
    seed: int = 7
    """Seeds LIBERO's per-reset fixture placement (e.g. where the cabinet stands, ±1 cm), which the init
    states do not cover; each reset uses a seed derived from (seed, init_state_index), or with reset_seeding
    stream, one stream seeded with it when the env is created."""
    render_mode: RenderMode = "chunk_boundary"
    """every_step: render cameras after every control step of the episode (as openpi's client does; a reset
    renders only the observation it returns, in every mode: the same frames); chunk_boundary: render
    only the observation returned at the end of each step_chunk (same observations, far less CPU); none:
    observations carry state and prompt only (~10 ms a step), for scripted experts and recorders, which
    render the states they keep afterwards with `render_state`."""
    image_resize: ImageResize = "jax"
    """How renders are resized with pad to image_size: jax, openpi's model-side resize (what its input
    transforms apply; the built-in model's demonstrations were recorded so); pil, openpi_client's client-side
    resize (PIL bilinear), what openpi's LIBERO client sends its server (`faster-vla eval --protocol openpi`)."""
    hard_reset: bool = False
    """Rebuild the simulator at every reset, as openpi's client does (LIBERO's default; seconds per reset).
    False: a soft reset (~0.3 s) with the same physics (see the docstring of faster_vla.libero.env)."""
    reset_seeding: ResetSeeding = "per_init_state"
    """Where LIBERO's per-reset fixture placement draws from: per_init_state, numpy's global RNG seeded from
    (seed, init_state_index) at each reset (an episode is reproducible on its own; the caller's RNG is left
    as it was); stream, openpi's client: one stream seeded with `seed` when the env is created (its
    `env.seed(seed)`), drawn from by every reset in turn, so a placement depends on the episodes before it."""

    def __post_init__(self) -> None:
        if self.render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {self.render_mode!r}")
        if self.image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be one of {IMAGE_RESIZES}, got {self.image_resize!r}")
        if self.reset_seeding not in RESET_SEEDINGS:
            raise ValueError(f"reset_seeding must be one of {RESET_SEEDINGS}, got {self.reset_seeding!r}")
        for name in ("resolution", "image_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_wait_steps < 0:
            raise ValueError(f"num_wait_steps must be >= 0, got {self.num_wait_steps}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive or None (the suite's default), got {self.max_steps}")
        if isinstance(self.task, bool) or not isinstance(self.task, (int, str)):
            raise TypeError(f"task must be an int id or a str name, got {self.task!r}")

    def episode_max_steps(self) -> int:
        """max_steps, or the suite's default; errors for a suite with no default."""
        if self.max_steps is not None:
            return self.max_steps
        if self.suite not in SUITE_MAX_STEPS:
            raise ValueError(
                f"suite {self.suite!r} has no default max_steps (defaults exist for {sorted(SUITE_MAX_STEPS)}); "
                "set max_steps explicitly"
            )
        return SUITE_MAX_STEPS[self.suite]


ProtocolName = Literal["chunk", "openpi"]
PROTOCOL_NAMES: tuple[str, ...] = ("chunk", "openpi")


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How evaluation episodes are run: what the policy executes of each chunk, and the env it acts in.

    Two exist (`PROTOCOLS`; docs/finetune.md, "Evaluation protocols"): `chunk`, the default, executes every
    decided chunk whole, as FASTER trains and the paper evaluates, in the env as configured; `openpi` follows
    openpi's LIBERO client (examples/libero/main.py) exactly: the first `replan_steps` (5) actions of each
    chunk, then a new decision on the current observation; renders of 256² at every step, flipped and resized
    with pad to 224² with PIL (openpi_client's resize) before the policy's own input transforms; a hard reset
    per episode; fixture placements from one RNG stream per env seeded once (`env.seed(7)`) and drawn from
    by each reset in turn; the suite's max steps (libero_90: 400) after 10 no-op wait steps; init state =
    episode index. Only the policy's noise differs: openpi's server draws it from one stream per server,
    our episodes from their own keys.
    """

    name: ProtocolName = "chunk"
    """The protocol's name, as `--protocol` takes it and eval outputs record it."""
    replan_steps: int | None = None
    """Actions executed from each decided chunk before the policy decides again; None: the whole chunk."""
    render_mode: RenderMode | None = None
    """The render mode the protocol fixes (an eval's explicit other choice is an error); None: the caller's."""
    client_image_size: int | None = None
    """openpi's client: the env renders at `resolution` 256 and resizes with pad to this size with PIL,
    whatever the model's input size (the policy's input transforms resize again when they differ). None: the
    env resizes with the model's own (JAX) resize straight to the model's input size."""
    hard_reset: bool = False
    """LiberoEnvConfig.hard_reset for the episodes."""
    reset_seeding: ResetSeeding = "per_init_state"
    """LiberoEnvConfig.reset_seeding for the episodes."""
    suite_episode: bool = False
    """The episode's length is openpi's: the suite's max steps after 10 wait steps, rendered at 256² (an
    eval's explicit other --max-steps is an error; a training env's own length is replaced)."""

    def __post_init__(self) -> None:
        if self.name not in PROTOCOL_NAMES:
            raise ValueError(f"protocol must be one of {PROTOCOL_NAMES}, got {self.name!r}")
        if self.replan_steps is not None and self.replan_steps < 1:
            raise ValueError(f"replan_steps must be >= 1 or None (whole chunks), got {self.replan_steps}")

    def env_config(self, env: LiberoEnvConfig, model_image_size: int) -> LiberoEnvConfig:
        """The env the protocol's episodes run in, from a task's env config (suite, task, seed, render mode) and
        the policy's input size."""
        if self.client_image_size is None:
            changes: dict = {"image_size": model_image_size}
        else:
            changes = {"image_size": self.client_image_size, "image_resize": "pil"}
        if self.render_mode is not None:
            changes["render_mode"] = self.render_mode
        if self.suite_episode:
            changes.update(resolution=256, num_wait_steps=10, max_steps=None)
        return dataclasses.replace(env, hard_reset=self.hard_reset, reset_seeding=self.reset_seeding, **changes)

    def executed(self, chunk: Any) -> Any:
        """The part of a decided chunk [H, ...] the env executes before the next decision."""
        if self.replan_steps is None:
            return chunk
        if len(chunk) < self.replan_steps:  # openpi's client asserts the same
            raise ValueError(f"protocol {self.name!r} replans every {self.replan_steps} steps, but the policy's "
                             f"chunks hold only {len(chunk)} actions")
        return chunk[: self.replan_steps]

    def record(self) -> dict[str, Any]:
        """What eval outputs record of the protocol (its name and settings)."""
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, EvalProtocol] = {
    "chunk": EvalProtocol("chunk"),
    "openpi": EvalProtocol("openpi", replan_steps=5, render_mode="every_step", client_image_size=224,
                           hard_reset=True, reset_seeding="stream", suite_episode=True),
}


def get_protocol(name: str) -> EvalProtocol:
    """A named evaluation protocol (`chunk` or `openpi`); the error lists the names."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


EnvBackend = Literal["local", "ray"]
ENV_BACKENDS: tuple[str, ...] = ("local", "ray")
RAY_INSTALL_HINT = 'pip install -e ".[ray]"  (from the faster-vla checkout; or: pip install "faster-vla[ray]")'


@dataclasses.dataclass(frozen=True)
class EnvsConfig:
    """Where a run's env workers run (`--num-envs` of them); the policy and learner always stay in the run's
    process, acting once per round on all workers' observations (docs/finetune.md, "Many envs, many machines")."""

    backend: EnvBackend = "local"
    """local: worker processes on this machine (with --num-envs 1, the env runs in the run's process); ray: each
    worker a Ray actor on a Ray cluster (needs the ray extra: pip install -e ".[ray]")."""
    ray_address: str | None = None
    """With backend ray: the cluster to join ("auto": the one `ray start` runs on this machine, or its address,
    e.g. "10.0.0.1:6379"); None: start a local Ray sized to the workers (training and eval), stopped when the
    run ends."""
    cpus_per_worker: float = 1.0
    """With backend ray: CPUs Ray reserves for each env actor (rendering keeps about one core busy)."""
    max_worker_failures: int = 3
    """Env worker failures (a crash, a killed Ray actor, a lost node) a run survives: each loses only the
    episode in flight, which is run again from its start on a replacement worker; one more stops the run (its
    last checkpoint intact). Counted per process: a resumed run starts afresh. 0: the first failure stops it."""

    def __post_init__(self) -> None:
        if self.backend not in ENV_BACKENDS:
            raise ValueError(f"envs.backend must be one of {ENV_BACKENDS}, got {self.backend!r}")
        if self.ray_address is not None:
            if self.backend != "ray":
                raise ValueError(f"envs.ray_address ({self.ray_address!r}) is used only with envs.backend 'ray', "
                                 f"got envs.backend {self.backend!r}")
            if not isinstance(self.ray_address, str) or not self.ray_address.strip():
                raise ValueError(f"envs.ray_address must be 'auto', a cluster address (host:port) or None, got "
                                 f"{self.ray_address!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, (int, float)) \
                or not self.cpus_per_worker > 0:
            raise ValueError(f"envs.cpus_per_worker must be a number > 0, got {self.cpus_per_worker!r}")
        if isinstance(self.max_worker_failures, bool) or not isinstance(self.max_worker_failures, int) \
                or self.max_worker_failures < 0:
            raise ValueError(f"envs.max_worker_failures must be an integer >= 0 (0: the first failure stops the "
                             f"run), got {self.max_worker_failures!r}")

    def check_available(self) -> None:
        """Raises an ImportError saying how to install Ray when backend ray is asked for and Ray is missing
        (without importing it: configs are read where Ray is not needed)."""
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ImportError(f"envs.backend 'ray' needs Ray, which is not installed: {RAY_INSTALL_HINT}")


def check_num_workers(num_workers: int, flag: str = "num_workers") -> None:
    """Raises a ValueError naming `flag` unless num_workers is an int >= 1 (1: one env in this process)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"{flag} must be an integer >= 1 (1: one env in this process), got {num_workers!r}")


def parse_task(task: int | str) -> int | str:
    """A task as given on the command line: a task id ("20", as an int) or a task name (kept as text)."""
    if isinstance(task, int):
        return task
    text = str(task).strip()
    return int(text) if text.lstrip("-").isdigit() else text


