"""Scripted experts for libero_90 tasks: privileged-state controllers that produce LIBERO's 7-D actions.

They exist to make demonstrations for pretraining the project's small π0.5 (issue 6), not to be good
robots: each reads object poses and joint angles straight from the simulator (nothing a policy could see),
moves the gripper through a few task-specific waypoints with a proportional controller, and emits exactly
the actions a policy would (OSC_POSE deltas in [-1, 1] + gripper, -1 open / +1 closed), so a recorded
demonstration replays through `LiberoEnv.step` unchanged.

Controller: position action = clip(gain * (target - eef) / 0.05 m), 0.05 m being OSC_POSE's full-scale
step, capped at `max_speed`; orientation action = the world-frame axis-angle that takes the grip site to a
fixed top-down orientation, / 0.5 rad (OSC_POSE's full-scale rotation). Optional per-episode jitter of the
waypoints and Gaussian action noise (both from the episode's own RNG) make demonstrations diverse and
deterministic per seed.

Tasks (one expert each; `EXPERTS` maps the libero_90 task name to it):
- KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet: push the drawer's handle until the drawer is shut;
- KITCHEN_SCENE3_turn_on_the_stove: push the knob's fin around its axis past the "on" angle;
- KITCHEN_SCENE6_close_the_microwave: sweep the open door shut along its arc;
- KITCHEN_SCENE1_put_the_black_bowl_on_the_plate: grasp the bowl's rim, carry it over the plate, release.

Why one file of ~400 lines: the scene queries, the phase machine and the four scripted tasks are read
together when a new expert is written.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from faster_vla.libero.env import LIBERO_ACTION_DIM, LiberoEnv

POS_FULL_SCALE_M = 0.05  # OSC_POSE output_max for position: an action of 1 asks for 5 cm this step
ROT_FULL_SCALE_RAD = 0.5  # OSC_POSE output_max for rotation
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
# The grip site's axes in the world when the gripper points straight down with LIBERO's default yaw
# (columns: site x -> world y, site y -> world x, site z -> world -z); read off a reset Panda.
TOP_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
GRIP_SITE = "gripper0_grip_site"


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """How an expert moves, and how much demonstrations vary between episodes."""

    gain: float = 1.5
    """Proportional gain of the position controller (per 5 cm of error)."""
    max_speed: float = 0.7
    """Largest |position action| (fraction of OSC_POSE's 5 cm full scale per step)."""
    rot_gain: float = 1.0
    """Proportional gain of the orientation controller (keeps the gripper top-down)."""
    jitter_m: float = 0.0
    """Std (m) of a per-episode horizontal offset added to each waypoint: different but still successful
    approaches (never vertical: a centimetre too high or low turns a rim grasp into a miss)."""
    action_noise: float = 0.0
    """Std of Gaussian noise added to the position action at every step."""

    def __post_init__(self) -> None:
        for name in ("gain", "max_speed", "rot_gain"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ExpertConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("jitter_m", "action_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"ExpertConfig.{name} must be >= 0, got {getattr(self, name)}")


class Scene:
    """Read-only privileged view of a LiberoEnv's simulator, by MuJoCo name."""

    def __init__(self, env: LiberoEnv) -> None:
        self._sim = env.sim

    def eef_pos(self) -> np.ndarray:  # [3]
        return np.array(self._sim.data.get_site_xpos(GRIP_SITE))

    def eef_rot(self) -> np.ndarray:  # [3, 3] columns = site axes in the world
        return np.array(self._sim.data.get_site_xmat(GRIP_SITE)).reshape(3, 3)

    def body_pos(self, name: str) -> np.ndarray:  # [3]
        return np.array(self._sim.data.get_body_xpos(name))

    def geom_pos(self, name: str) -> np.ndarray:  # [3]
        return np.array(self._sim.data.get_geom_xpos(name))

    def joint_qpos(self, name: str) -> float:
        return float(np.asarray(self._sim.data.get_joint_qpos(name)).reshape(-1)[0])

    def joint_anchor(self, name: str) -> np.ndarray:  # [3]
        return np.array(self._sim.data.xanchor[self._sim.model.joint_name2id(name)])


def rotation_to_axis_angle(rot: np.ndarray) -> np.ndarray:
    """Axis-angle [3] of a rotation matrix [3, 3] (angle in [0, π])."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-8:  # angle ≈ π: the axis is the dominant column of (R + I) / 2
        sym = (rot + np.eye(3)) / 2.0
        axis = sym[:, int(np.argmax(np.diag(sym)))]
        return angle * axis / np.linalg.norm(axis)
    return angle * axis / norm


@dataclasses.dataclass
class Phase:
    """One leg of a script: drive the grip site to `target(scene)` with the gripper at `gripper`.

    The phase ends when `done(scene)` holds (default: within `tolerance_m` of the target), after `hold`
    more steps, or at `max_steps` (so a stuck expert moves on instead of stalling the episode).
    """

    name: str
    target: Callable[[Scene], np.ndarray]
    gripper: float
    tolerance_m: float = 0.01
    done: Callable[[Scene], bool] | None = None
    hold: int = 0
    max_steps: int = 80
    speed: float | None = None  # overrides ExpertConfig.max_speed (slow pushes, gentle placing)
    latch: bool = False
    """Evaluate `target` once, on entering the phase, and hold it (e.g. lift from where the grasp ended)."""
    yaw: float | Callable[[Scene], float] = 0.0
    """Gripper yaw (rad) about the world z axis from LIBERO's default; at 0 the hand's long side (and the
    fingers' closing direction) lies along world y, at ±π/2 along x: pushes turn it parallel to the face."""


class Expert(abc.ABC):
    """A waypoint script: `reset(env, rng)` at each episode start, then `act()` before each control step."""

    task_name: str = ""

    def __init__(self, config: ExpertConfig | None = None) -> None:
        self.config = config or ExpertConfig()
        self._phases: list[Phase] = []
        self._index = 0
        self._steps_in_phase = 0
        self._held = 0
        self._jitter = np.zeros(3)
        self._latched: np.ndarray | None = None
        self._rng = np.random.default_rng(0)
        self.scene: Scene | None = None
        self.retries = 0  # times the script ran out without the episode ending and started over

    @abc.abstractmethod
    def phases(self, scene: Scene, rng: np.random.Generator) -> list[Phase]:
        """The script for this episode; may read the initial scene and draw from rng."""

    def reset(self, env: LiberoEnv, rng: np.random.Generator) -> None:
        if self.task_name and env.task.name != self.task_name:
            raise ValueError(f"{type(self).__name__} scripts {self.task_name!r}, not {env.task.name!r}")
        self.scene = Scene(env)
        self._rng = rng
        self._jitter = np.zeros(3)
        if self.config.jitter_m:
            self._jitter[:2] = rng.normal(0.0, self.config.jitter_m, size=2)
        self._phases = self.phases(self.scene, rng)
        self._index, self._steps_in_phase, self._held = 0, 0, 0
        self.retries = 0

    @property
    def phase(self) -> str:
        """The current phase's name ("finished" after the last one)."""
        return self._phases[self._index].name if self._index < len(self._phases) else "finished"

    def act(self) -> np.ndarray:
        """The next action [7] from the current scene."""
        if self.scene is None:
            raise RuntimeError("call reset(env, rng) before act()")
        scene = self.scene
        while self._index < len(self._phases):
            phase = self._phases[self._index]
            if self._steps_in_phase == 0 and self._held == 0:
                self._latched = phase.target(scene) if phase.latch else None
            reached = (
                phase.done(scene)
                if phase.done is not None
                else np.linalg.norm(self._target(phase) - scene.eef_pos()) < phase.tolerance_m
            )
            if reached:
                self._held += 1
            if (reached and self._held > phase.hold) or self._steps_in_phase >= phase.max_steps:
                self._index += 1
                self._steps_in_phase, self._held = 0, 0
                continue
            break
        if self._index >= len(self._phases):  # script over and the task not done: start again from the top
            self.retries += 1
            self._phases = self.phases(scene, self._rng)
            self._index, self._steps_in_phase, self._held = 0, 0, 0
        phase = self._phases[self._index]
        self._steps_in_phase += 1
        yaw = phase.yaw(scene) if callable(phase.yaw) else phase.yaw
        return self._action(self._target(phase), phase.gripper, phase.speed, yaw)

    def _target(self, phase: Phase) -> np.ndarray:  # [3]
        assert self.scene is not None
        target = self._latched if phase.latch and self._latched is not None else phase.target(self.scene)
        return target + self._jitter

    def _action(self, target: np.ndarray, gripper: float, speed: float | None, yaw: float) -> np.ndarray:
        scene = self.scene
        assert scene is not None
        cfg = self.config
        move = cfg.gain * (target - scene.eef_pos()) / POS_FULL_SCALE_M
        cap = cfg.max_speed if speed is None else speed
        norm = np.linalg.norm(move)
        if norm > cap:
            move *= cap / norm
        if cfg.action_noise:
            move = move + self._rng.normal(0.0, cfg.action_noise, size=3)
        goal = _rot_z(yaw) @ TOP_DOWN
        turn = cfg.rot_gain * rotation_to_axis_angle(goal @ scene.eef_rot().T) / ROT_FULL_SCALE_RAD
        action = np.concatenate([np.clip(move, -1, 1), np.clip(turn, -1, 1), [gripper]])
        assert action.shape == (LIBERO_ACTION_DIM,)
        return action


def _rot_z(angle: float) -> np.ndarray:  # [3, 3]
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def hand_along(angle: float) -> float:
    """The yaw that lays the hand's long side along the world direction `angle` (rad from +x), in [-π/2, π/2)
    (the hand is symmetric under a half turn, so the smaller turn is taken)."""
    yaw = angle - math.pi / 2
    return (yaw + math.pi / 2) % math.pi - math.pi / 2


def _rotate_z(vec: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * vec[0] - s * vec[1], s * vec[0] + c * vec[1], vec[2]])


class CloseTopDrawer(Expert):
    """Push the open top drawer shut by its handle (closed: the slide joint > 0, LIBERO's WoodenCabinet)."""

    task_name = "KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet"
    joint = "wooden_cabinet_1_top_level"
    handle = "wooden_cabinet_1_g18"  # the handle bar, on the drawer's +y face

    def phases(self, scene: Scene, rng: np.random.Generator) -> list[Phase]:
        def front(dy: float, dz: float = 0.0) -> Callable[[Scene], np.ndarray]:
            return lambda s: s.geom_pos(self.handle) + np.array([0.0, dy, dz])

        closed = lambda s: s.joint_qpos(self.joint) > 0.002  # noqa: E731
        yaw = hand_along(0.0)  # the hand's long side along the drawer's face, clear of the cabinet's frame
        return [
            Phase("approach", front(0.06, 0.05), GRIPPER_CLOSED, tolerance_m=0.02, yaw=yaw),
            Phase("align", front(0.05), GRIPPER_CLOSED, tolerance_m=0.01, yaw=yaw),
            # The drawer travels 0.16 m along -y; aim past the handle so the push keeps pressing.
            Phase("push", front(-0.06), GRIPPER_CLOSED, done=closed, hold=3, max_steps=120, speed=0.6, yaw=yaw),
            Phase("retreat", front(0.08, 0.05), GRIPPER_CLOSED, tolerance_m=0.02, max_steps=30, yaw=yaw),
        ]


class TurnOnStove(Expert):
    """Push the stove knob's fin around the knob's vertical axis past 0.5 rad (LIBERO's FlatStove "on")."""

    task_name = "KITCHEN_SCENE3_turn_on_the_stove"
    joint = "flat_stove_1_button"
    fin = "flat_stove_1_g19"  # the knob's fin, 3.4 cm from the axis on the -x side
    push_radius = 0.04  # m from the knob's axis: near the fin's tip, for leverage
    height = 0.94  # grip-site height while pushing: the fin spans z 0.90-0.97

    def phases(self, scene: Scene, rng: np.random.Generator) -> list[Phase]:
        def around(angle_ahead: float, side: float) -> Callable[[Scene], np.ndarray]:
            # A point on the fin's arc `angle_ahead` rad ahead of the fin, `side` m behind its pushing face.
            def target(s: Scene) -> np.ndarray:
                axis = s.joint_anchor(self.joint)
                radius = s.geom_pos(self.fin) - axis
                radius[2] = 0.0
                unit = radius / max(np.linalg.norm(radius), 1e-6)
                point = axis + _rotate_z(unit * self.push_radius, angle_ahead)
                tangent = _rotate_z(unit, angle_ahead + math.pi / 2)  # direction the fin moves when turning on
                out = point - side * tangent
                out[2] = self.height
                return out

            return target

        # The hand's long side along the fin, clear of the stove's top; it turns with the knob, which keeps
        # the finger square on the fin's face (a fixed hand slides off the turning fin and stalls near 0.5).
        radius = scene.geom_pos(self.fin) - scene.joint_anchor(self.joint)
        start_yaw = hand_along(math.atan2(radius[1], radius[0]))
        start_q = scene.joint_qpos(self.joint)
        with_knob = lambda s: start_yaw + (s.joint_qpos(self.joint) - start_q)  # noqa: E731

        on = lambda s: s.joint_qpos(self.joint) > 0.65  # noqa: E731
        above = lambda f: (lambda s: f(s) + np.array([0.0, 0.0, 0.08]))  # noqa: E731
        return [
            Phase("approach", above(around(0.0, 0.05)), GRIPPER_CLOSED, tolerance_m=0.02, yaw=start_yaw),
            Phase("descend", around(0.0, 0.05), GRIPPER_CLOSED, tolerance_m=0.01, yaw=start_yaw),
            Phase("turn", around(1.0, 0.0), GRIPPER_CLOSED, done=on, hold=2, max_steps=60, speed=1.0,
                  yaw=with_knob),
            Phase("retreat", above(around(0.0, 0.06)), GRIPPER_CLOSED, tolerance_m=0.02, max_steps=30,
                  yaw=with_knob),
        ]


class CloseMicrowave(Expert):
    """Sweep the microwave's open door shut along its arc (closed: the hinge > -0.005 rad)."""

    task_name = "KITCHEN_SCENE6_close_the_microwave"
    joint = "microwave_1_microjoint"

    def phases(self, scene: Scene, rng: np.random.Generator) -> list[Phase]:
        radius, height = 0.17, 1.0

        def on_arc(angle_ahead: float, side: float) -> Callable[[Scene], np.ndarray]:
            # The door points along (cos q, sin q) from its hinge and closes as q rises to 0, moving along
            # (-sin q, cos q): stand `side` m behind that face, `angle_ahead` rad further round.
            def target(s: Scene) -> np.ndarray:
                hinge = s.joint_anchor(self.joint)
                q = min(s.joint_qpos(self.joint) + angle_ahead, 0.15)
                point = hinge + radius * np.array([math.cos(q), math.sin(q), 0.0])
                point -= side * np.array([-math.sin(q), math.cos(q), 0.0])
                point[2] = height
                return point

            return target

        # The hand's long side along the door, turning with it (continuous: no half-turn wrap mid-sweep).
        start_q = scene.joint_qpos(self.joint)
        start_yaw = hand_along(start_q)
        with_door = lambda s: start_yaw + (s.joint_qpos(self.joint) - start_q)  # noqa: E731
        closed = lambda s: s.joint_qpos(self.joint) > -0.003  # noqa: E731
        return [
            Phase("approach", lambda s: on_arc(0.0, 0.07)(s) + np.array([0, 0, 0.1]), GRIPPER_CLOSED,
                  tolerance_m=0.02, yaw=with_door),
            Phase("descend", on_arc(0.0, 0.07), GRIPPER_CLOSED, tolerance_m=0.015, yaw=with_door),
            Phase("sweep", on_arc(0.35, 0.0), GRIPPER_CLOSED, done=closed, hold=2, max_steps=100, speed=0.8,
                  yaw=with_door),
            Phase("retreat", lambda s: on_arc(0.0, 0.08)(s) + np.array([0, 0, 0.1]), GRIPPER_CLOSED,
                  tolerance_m=0.02, max_steps=30, yaw=with_door),
        ]


class BowlOnPlate(Expert):
    """Grasp the black bowl's rim, carry it above the plate, lower and release it."""

    task_name = "KITCHEN_SCENE1_put_the_black_bowl_on_the_plate"
    bowl = "akita_black_bowl_1_main"
    plate = "plate_1_main"
    rim_radius = 0.048

    def phases(self, scene: Scene, rng: np.random.Generator) -> list[Phase]:
        grasp = np.array([0.0, self.rim_radius, 0.0])  # fingers close along world x... across the rim wall
        rim_z = 0.035

        def at_bowl(dz: float) -> Callable[[Scene], np.ndarray]:
            return lambda s: s.body_pos(self.bowl) + grasp + np.array([0.0, 0.0, rim_z + dz])

        def at_plate(dz: float) -> Callable[[Scene], np.ndarray]:
            return lambda s: s.body_pos(self.plate) + grasp + np.array([0.0, 0.0, rim_z + dz])

        here = lambda s: s.eef_pos()  # noqa: E731
        up = lambda dz: (lambda s: s.eef_pos() + np.array([0.0, 0.0, dz]))  # noqa: E731
        return [
            Phase("approach", at_bowl(0.10), GRIPPER_OPEN, tolerance_m=0.015),
            Phase("descend", at_bowl(0.0), GRIPPER_OPEN, tolerance_m=0.008, speed=0.5),
            Phase("grasp", here, GRIPPER_CLOSED, latch=True, done=lambda s: False, max_steps=12),
            Phase("lift", up(0.15), GRIPPER_CLOSED, latch=True, tolerance_m=0.02),
            Phase("carry", at_plate(0.15), GRIPPER_CLOSED, tolerance_m=0.015),
            Phase("lower", at_plate(0.03), GRIPPER_CLOSED, tolerance_m=0.01, speed=0.4),
            Phase("release", here, GRIPPER_OPEN, latch=True, done=lambda s: False, max_steps=10),
            Phase("retreat", up(0.12), GRIPPER_OPEN, latch=True, tolerance_m=0.02, max_steps=30),
        ]


EXPERTS: dict[str, type[Expert]] = {
    cls.task_name: cls for cls in (CloseTopDrawer, TurnOnStove, CloseMicrowave, BowlOnPlate)
}


def expert_for(task_name: str, config: ExpertConfig | None = None) -> Expert:
    """The scripted expert of a libero_90 task; unknown tasks fail with the list of scripted ones."""
    try:
        return EXPERTS[task_name](config)
    except KeyError:
        raise ValueError(
            f"no scripted expert for task {task_name!r}; scripted libero_90 tasks: {sorted(EXPERTS)}"
        ) from None


def run_expert(env: LiberoEnv, expert: Expert, init_state_index: int, rng: np.random.Generator,
               on_step: Callable[[np.ndarray, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One episode of `expert` from an init state, one control step at a time; returns its summary.

    `on_step(action, info)` is called after each step (recorders use it to snapshot the sim state).
    """
    env.reset(init_state_index)
    expert.reset(env, rng)
    steps, success, truncated = 0, False, False
    while True:
        action = expert.act()
        result = env.step_chunk(action[None])
        steps += 1
        if on_step is not None:
            on_step(action, result.info)
        if result.done or result.truncated:
            success, truncated = bool(result.done), bool(result.truncated)
            break
    return {"success": success, "steps": steps, "truncated": truncated, "final_phase": expert.phase,
            "retries": expert.retries}
