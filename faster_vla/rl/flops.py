"""Compute accounting per decision: what each selection rule costs in actor and critic FLOPs.

The paper's arithmetic (§4.4): best-of-N = N·(prefix + T·step) + N·F_critic when every candidate re-runs the
whole VLA (its EXPO did), FASTER = prefix + T·step + N·F_noise_critic. With the adapter, candidates share
one prefix, so best-of-N here costs prefix + N·T·step: `prefix_shared` makes that explicit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from faster_vla.rl.filtering import FilterSchedule
from faster_vla.policies import flops as actor_flops
from faster_vla.policies.config import Pi05Config
from faster_vla.rl.selection import SelectionConfig


@dataclasses.dataclass(frozen=True)
class DecisionFlops:
    """FLOPs of one decision (one state, one chunk chosen), by part."""

    prefix: int
    denoise: int
    noise_critic: int
    chunk_critic: int
    edit: int

    @property
    def actor(self) -> int:
        return self.prefix + self.denoise

    @property
    def total(self) -> int:
        return self.actor + self.noise_critic + self.chunk_critic + self.edit


@dataclasses.dataclass(frozen=True)
class UnitFlops:
    """The per-call costs the rules are built from (one state, one candidate)."""

    prefix: int  # the VLM prefix of one observation
    denoise_step: int  # one Euler step of one candidate
    noise_critic: int  # Q^dn on one seed (whole ensemble)
    chunk_critic: int  # Q^a on one chunk (whole ensemble)
    edit: int  # the edit policy on one chunk

    @classmethod
    def for_pi05(cls, config: Pi05Config, *, noise_critic: int = 0, chunk_critic: int = 0, edit: int = 0) -> UnitFlops:
        return cls(actor_flops.prefix_flops(config), actor_flops.denoise_flops(config, num_candidates=1, num_steps=1),
                   noise_critic, chunk_critic, edit)


def decision_flops(selection: SelectionConfig, units: UnitFlops, *, num_steps: int = 10,
                   prefix_shared: bool = True, filter_schedule: FilterSchedule | None = None) -> DecisionFlops:
    """FLOPs of one decision under `selection`; `prefix_shared=False` re-runs the prefix per denoised chunk.

    With a multi-stage `filter_schedule` (the `faster` rules only), the actor runs the schedule's
    candidate-steps and Q^dn scores every stage's pool.
    """
    n = selection.num_candidates
    denoised = selection.denoised_per_state
    prefix = units.prefix * (1 if prefix_shared else denoised)
    noise = n * units.noise_critic if selection.uses_noise_critic else 0
    steps = denoised * num_steps
    if filter_schedule is not None:
        if not selection.uses_noise_critic:
            raise ValueError(f"a filter schedule applies to the 'faster' rules, not {selection.rule!r}")
        steps = filter_schedule.candidate_steps
        noise = sum(filter_schedule.pool_sizes) * units.noise_critic
    if selection.rule == "best_of_n":
        edits, scored = n, 2 * n
    elif selection.rule == "idql":
        edits, scored = 0, n
    elif selection.rule == "faster":
        edits, scored = 1, 2
    else:
        edits, scored = 0, 0
    return DecisionFlops(
        prefix=prefix,
        denoise=steps * units.denoise_step,
        noise_critic=noise,
        chunk_critic=scored * units.chunk_critic,
        edit=edits * units.edit,
    )


def xla_flops(fn: Callable, *args) -> int:
    """FLOPs XLA counts for `fn(*args)` once compiled (for critics and edit policies of any architecture)."""
    return compiled_flops(jax.jit(fn).lower(*args))


def compiled_flops(lowered: Any) -> int:
    """FLOPs XLA counts for a lowered computation (`jitted.lower(*args)`) once compiled. Lowering a jitted
    function itself (not a wrapper) compiles the executable its next call with those args runs."""
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return int(cost.get("flops", 0))
