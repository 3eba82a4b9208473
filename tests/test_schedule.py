"""Update schedules: episode-wise and per env step, with warm-up."""

from __future__ import annotations

import pytest

from faster_vla.schedule import UpdateSchedule


def test_episode_mode_updates_only_at_episode_ends():
    s = UpdateSchedule("episode", updates_per_episode=3)
    assert s.updates_due(steps_before=0, steps_after=10, episode_done=False) == 0
    assert s.updates_due(steps_before=10, steps_after=17, episode_done=True) == 3


def test_step_mode_counts_exactly_over_whole_chunks():
    s = UpdateSchedule("step", every_steps=2)
    total, steps = 0, 0
    for chunk in (10, 10, 3, 7, 1):  # chunks, the last of an episode cut short
        total += s.updates_due(steps_before=steps, steps_after=steps + chunk, episode_done=False)
        steps += chunk
    assert total == steps // 2 == 15


def test_warmup_delays_the_first_update():
    s = UpdateSchedule("step", every_steps=1, warmup_steps=25)
    assert s.updates_due(steps_before=0, steps_after=20, episode_done=False) == 0
    assert s.updates_due(steps_before=20, steps_after=30, episode_done=False) == 30 - 24  # steps 25..30
    e = UpdateSchedule("episode", warmup_steps=25)
    assert e.updates_due(steps_before=0, steps_after=20, episode_done=True) == 0
    assert e.updates_due(steps_before=20, steps_after=40, episode_done=True) == 3


def test_bad_schedules_are_explained():
    with pytest.raises(ValueError, match="mode"):
        UpdateSchedule("chunk")
    with pytest.raises(ValueError, match="every_steps"):
        UpdateSchedule("step", every_steps=0)
