"""When the learner updates: episode-wise (the paper's VLA setting) or per environment step.

- `episode`: after each finished episode, `updates_per_episode` updates (paper: 3, each with UTD 10 critic
  steps). Nothing happens mid-episode, so acting never waits on learning.
- `step`: one update per `every_steps` environment steps (RLPD-style online RL). Chunks execute whole, so
  updates due during a chunk are run after it; the count is exact over the run.
Both wait for `warmup_steps` stored steps before the first update.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    mode: Literal["episode", "step"] = "episode"
    updates_per_episode: int = 3
    every_steps: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("episode", "step"):
            raise ValueError(f"mode must be 'episode' or 'step', got {self.mode!r}")
        if self.updates_per_episode < 0 or self.every_steps < 1 or self.warmup_steps < 0:
            raise ValueError("updates_per_episode and warmup_steps must be >= 0, every_steps >= 1")

    def updates_due(self, *, steps_before: int, steps_after: int, episode_done: bool) -> int:
        """Updates to run now, after the env went from `steps_before` to `steps_after` total steps."""
        if steps_after < steps_before:
            raise ValueError("steps_after must be >= steps_before")
        if steps_after < self.warmup_steps:
            return 0
        if self.mode == "episode":
            return self.updates_per_episode if episode_done else 0
        # Updates whose step index (multiples of every_steps, at or after warm-up) fell in (before, after].
        first = max(steps_before, self.warmup_steps - 1)
        return steps_after // self.every_steps - first // self.every_steps
