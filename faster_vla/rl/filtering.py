"""The general filtering option of FASTER (paper §4.1–4.2): prune N noise candidates while they are denoised.

`selection.py` implements the practical form of §4.3 (one filter at the initial noise, t = T in the paper's
count, step 0 here). This module implements the filtering MDP in general, for any actor that can resume a
denoise from an intermediate step:

- a `FilterSchedule` says at which Euler steps k (0 = pure noise, T = the action) a filter runs and how many
  candidates survive it (m_k, the last m = 1);
- `filter_and_denoise` runs the actor in segments between filter steps, scoring the current candidates with
  a step-conditioned Q^dn(s, x_t, t) at each filter step and continuing only the survivors;
- `filter_td_targets` / `filter_critic_loss` train Q^dn by the TD objective of eq. 1.

The actor is seen only through `advance(x [B, M, H, A], start_step, end_step) -> x at end_step`, and the critic
only through `score(x_t [B, M, H, A], t) -> [B, M]` (pessimistic, e.g. min of a random pair of target
members), as in `selection.py`. Adapters: `pi05_advance` (π0.5) and `flow_actor_advance` (the toy FlowActor).

Step/time convention: Euler step k of T has openpi time t_k = `euler_times(T)[k]` (t_0 = 1 is the noise,
t_T ≈ 0 the action); the paper's timestep index runs the other way (its t = T is our k = 0).

Actor work. A schedule with filter steps k_1 < … < k_J keeping m_1 > … > m_J = 1 of N costs
    N·k_1 + Σ_{j<J} m_j·(k_{j+1} − k_j) + 1·(T − k_J)
candidate-steps per state (`FilterSchedule.candidate_steps`): T for the initial-seed filter, N·k + (T − k)
for a single filter at step k (Fig. 9's ablation), N·T for best-of-N (no filter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from faster_vla.policies.pi05 import euler_times

AdvanceFn = Callable[[jax.Array, int, int], jax.Array]
# (seed_index [B, M] into the initial pool, Euler step k) -> x of those seeds at step k [B, M, H, A]
LookupFn = Callable[[jax.Array, int], jax.Array]
ScoreFn = Callable[[jax.Array, float], jax.Array]
Visited = dict[str, Any]


# -- the schedule -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FilterSchedule:
    """When to filter and how many candidates survive each filter.

    num_candidates: N, the initial noise pool per state.
    num_steps: T, the actor's Euler steps.
    stages: ((k_1, m_1), …, (k_J, m_J)): at step k_j (x_t at time euler_times(T)[k_j]) keep m_j of the current
      candidates. 0 ≤ k_1 < … < k_J < T; N ≥ m_1 > … > m_J = 1.

    Hashable, so it can be a static argument of `jax.jit`.
    """

    num_candidates: int
    num_steps: int
    stages: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        n, t = self.num_candidates, self.num_steps
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {n!r}")
        if not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {t!r}")
        try:
            stages = tuple((int(k), int(m)) for k, m in self.stages)
        except (TypeError, ValueError) as e:
            raise ValueError(f"stages must be a sequence of (step, survivors) int pairs, got {self.stages!r}") from e
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("stages must hold at least one (step, survivors) pair; the last must keep 1")
        steps = [k for k, _ in stages]
        keeps = [m for _, m in stages]
        for k in steps:
            if not 0 <= k < t:
                raise ValueError(f"filter step {k} out of range: need 0 <= step < num_steps={t} (stages {stages})")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"filter steps must be strictly increasing, got {steps}")
        if keeps[0] > n:
            raise ValueError(f"first stage keeps {keeps[0]} but only num_candidates={n} seeds exist")
        if any(m < 1 for m in keeps):
            raise ValueError(f"every stage must keep at least 1 candidate, got {keeps}")
        if any(b >= a for a, b in zip(keeps, keeps[1:])):
            raise ValueError(f"survivor counts must be strictly decreasing, got {keeps}")
        if keeps[-1] != 1:
            raise ValueError(f"the last stage must keep exactly 1 candidate (the executed one), got {keeps[-1]}")

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.stages)

    @property
    def survivors(self) -> tuple[int, ...]:
        return tuple(m for _, m in self.stages)

    @property
    def pool_sizes(self) -> tuple[int, ...]:
        """Candidates scored at each stage: N, then m_1, …, m_{J−1}."""
        return (self.num_candidates, *self.survivors[:-1])

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(candidates, start_step, end_step) of every `advance` call, in order (empty segments dropped)."""
        segs = []
        if self.steps[0] > 0:
            segs.append((self.num_candidates, 0, self.steps[0]))
        ends = (*self.steps[1:], self.num_steps)
        for (k, m), end in zip(self.stages, ends):
            segs.append((m, k, end))
        return tuple(segs)

    @property
    def candidate_steps(self) -> int:
        """Actor work per state: Σ over segments of candidates × Euler steps."""
        return int(sum(m * (end - start) for m, start, end in self.segments))

    @property
    def best_of_n_steps(self) -> int:
        """N·T: what denoising every candidate costs (best-of-N)."""
        return self.num_candidates * self.num_steps

    @property
    def times(self) -> tuple[float, ...]:
        """openpi time t of each filter stage (1.0 = pure noise)."""
        ts = euler_times(self.num_steps)
        return tuple(float(ts[k]) for k in self.steps)


def initial_seed(n: int, num_steps: int = 10) -> FilterSchedule:
    """Filter once at the initial noise down to 1: the `faster` / `faster_idql` rule (paper §4.3). Cost T."""
    return FilterSchedule(n, num_steps, ((0, 1),))


def single_step(n: int, k: int, num_steps: int = 10) -> FilterSchedule:
    """Denoise all N to step k, keep 1 (the filtering-step ablation, paper Fig. 9). Cost N·k + (T − k)."""
    return FilterSchedule(n, num_steps, ((k, 1),))


def successive_halving(n: int, num_steps: int = 10, every: int = 1) -> FilterSchedule:
    """A multi-stage example: at steps 0, every, 2·every, … keep ceil(half) of the candidates until one is left.

    N = 8, T = 10, every = 1: ((0, 4), (1, 2), (2, 1)), cost 4·1 + 2·1 + 1·8 = 14 candidate-steps.
    """
    if n < 2:
        raise ValueError(f"successive halving needs n >= 2, got {n}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    stages, m, k = [], n, 0
    while m > 1:
        m = (m + 1) // 2
        stages.append((k, m))
        k += every
    return FilterSchedule(n, num_steps, tuple(stages))


# -- running the filter -------------------------------------------------------------------------------------


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...], idx [B, m] -> [B, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def keep_top(rng: jax.Array, scores: jax.Array, m: int, temperature: float) -> jax.Array:
    """scores [B, M] -> positions [B, m] of the survivors, best first.

    Temperature 0: the top-m by score (ties to the lower index, like argmax). Temperature > 0: m draws without
    replacement from softmax(z-score(scores) / temperature) by Gumbel-top-k (z-scored per state, as
    `selection.pick_seed`; for m = 1 it is exactly `pick_seed`'s Gumbel-max draw with the same rng).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return jax.lax.top_k(scores, m)[1]
    mean = jnp.mean(scores, axis=-1, keepdims=True)
    std = jnp.std(scores, axis=-1, keepdims=True)
    z = (scores - mean) / (std + 1e-6)
    gumbel = jax.random.gumbel(rng, scores.shape, scores.dtype)
    return jax.lax.top_k(z / temperature + gumbel, m)[1]


def filter_and_denoise(
    schedule: FilterSchedule,
    rng: jax.Array,
    noise: jax.Array,  # [B, N, H, A]
    *,
    advance: AdvanceFn | None = None,
    lookup: LookupFn | None = None,
    score: ScoreFn,
    temperature: float = 0.0,
) -> tuple[jax.Array, jax.Array, Visited]:
    """Runs the filtering MDP of paper §4.1 with a fixed schedule. jit-compatible (schedule and temperature static).

    The actor is reached through exactly one of `advance` (run it: acting) or `lookup` (read what it computed
    when the state was collected: updates). A frozen actor's x_t for seed i at step k depends only on (s, ε_i,
    k), so a lookup by seed index gives the same candidates as advancing them (`cache_lookup`).

    Returns
    - final_chunk [B, H, A]: the survivor denoised to step T (the executed action a_i*);
    - kept_index [B] int32: which of the N seeds survived;
    - visited: per stage j (tuples, one entry per stage):
        "x_t"        [B, M_j, H, A]  every candidate scored at the stage (the previous stage's survivors at t_j),
        "t"          float           openpi time of the stage (1.0 = pure noise),
        "step"       int             Euler step k_j,
        "scores"     [B, M_j]        score(x_t, t) of every candidate,
        "kept"       [B, m_j]        positions (into the stage's candidates) of its survivors, best first,
        "kept_x_t"   [B, m_j, H, A]  the survivors' x_t (what Q^dn(s_t, m_t) is evaluated on),
        "seed_index" [B, M_j]        original seed index of each candidate;
      and "candidate_steps": actor work per state (Σ survivors × steps; compare N·T and T).
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must be [B, N, H, A], got shape {noise.shape}")
    if (advance is None) == (lookup is None):
        raise ValueError("pass exactly one of `advance` (run the actor) or `lookup` (read its cached x_t)")
    batch, n = noise.shape[:2]
    if n != schedule.num_candidates:
        raise ValueError(f"noise pool has {n} seeds, the schedule expects num_candidates={schedule.num_candidates}")
    times = euler_times(schedule.num_steps)
    stage_rngs = jax.random.split(rng, len(schedule.stages))

    x = noise
    seed_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    if schedule.steps[0] > 0:
        x = advance(x, 0, schedule.steps[0]) if advance else lookup(seed_index, schedule.steps[0])
    ends = (*schedule.steps[1:], schedule.num_steps)
    fields: dict[str, list] = {k: [] for k in ("x_t", "t", "step", "scores", "kept", "kept_x_t", "seed_index")}
    for j, ((k, m), end) in enumerate(zip(schedule.stages, ends)):
        t = float(times[k])
        scores = score(x, t)
        if scores.shape != x.shape[:2]:
            raise ValueError(f"score must return [B, M] = {x.shape[:2]}, got {scores.shape}")
        kept = keep_top(stage_rngs[j], scores, m, temperature)  # [B, m]
        survivors = _take(x, kept)
        for name, value in (("x_t", x), ("t", t), ("step", k), ("scores", scores), ("kept", kept),
                            ("kept_x_t", survivors), ("seed_index", seed_index)):
            fields[name].append(value)
        seed_index = jnp.take_along_axis(seed_index, kept, axis=1)
        x = advance(survivors, k, end) if advance else lookup(seed_index, end)
    visited: Visited = {name: tuple(values) for name, values in fields.items()}
    visited["candidate_steps"] = schedule.candidate_steps
    return x[:, 0], seed_index[:, 0], visited


# -- actor adapters -----------------------------------------------------------------------------------------


def cached_steps(schedule: FilterSchedule) -> tuple[int, ...]:
    """The intermediate Euler steps (0 < k < T) whose x_t a frozen-actor cache must hold for `schedule`.

    Step 0 is the noise itself and step T the denoised chunk, both cached anyway.
    """
    return tuple(k for k in schedule.steps if k > 0)


def cache_lookup(
    noise: jax.Array,  # [B, K, H, A] the initial pool (step 0)
    x_t: jax.Array | None,  # [B, K, S, H, A] the pool at each of `steps` (S may be 0: None)
    denoised: jax.Array,  # [B, K, H, A] the pool at step T
    steps: Sequence[int],
    num_steps: int,
) -> LookupFn:
    """`lookup` over a frozen-actor cache: seeds' x at step 0, at any cached intermediate step, or at T."""
    steps = tuple(int(k) for k in steps)

    def lookup(seed_index: jax.Array, step: int) -> jax.Array:
        if step == 0:
            pool = noise
        elif step == num_steps:
            pool = denoised
        elif step in steps:
            pool = x_t[:, :, steps.index(step)]
        else:
            raise ValueError(f"step {step} is not cached (cached intermediate steps: {steps}, plus 0 and "
                             f"{num_steps}); build the cache with the filter schedule's `cached_steps`")
        return _take(pool, seed_index)

    return lookup


def pi05_advance(actor, prefix, num_steps: int = 10) -> AdvanceFn:
    """`advance` for a `Pi05Actor`: Euler steps start_step..end_step of a num_steps schedule, no more."""

    def advance(x: jax.Array, start_step: int, end_step: int) -> jax.Array:
        if not 0 <= start_step < end_step <= num_steps:
            raise ValueError(f"need 0 <= start_step < end_step <= {num_steps}, got {start_step}, {end_step}")
        return actor.denoise(prefix, x, num_steps, start_step=start_step, end_step=end_step)

    return advance


def flow_actor_advance(actor, obs: jax.Array) -> AdvanceFn:
    """`advance` for the toy `FlowActor`: its Euler steps x ← x + dt·(x − m(s)), dt = −1/T, from start to end."""
    num_steps = actor.config.num_steps
    dt = -1.0 / num_steps
    mean = actor.mean(obs)[:, None]  # [B, 1, H, A]

    def advance(x: jax.Array, start_step: int, end_step: int) -> jax.Array:
        if not 0 <= start_step < end_step <= num_steps:
            raise ValueError(f"need 0 <= start_step < end_step <= {num_steps}, got {start_step}, {end_step}")

        def step(x, _):
            return x + dt * (x - mean), None

        x, _ = jax.lax.scan(step, x, None, length=end_step - start_step)
        return x

    return advance


# -- learning Q^dn (eq. 1) ----------------------------------------------------------------------------------


def filter_td_targets(visited: Visited, final_value: jax.Array, gamma_dn: float) -> tuple[jax.Array, ...]:
    """TD targets [B] of eq. 1, one per filter stage, for Q^dn(s_{k_j}, m_{k_j}) of the executed filtering episode.

    Paper eq. 1:  L_TD = E[(Q^dn(s_t, m_t) − [r_t + γ·max_{m_{t−1}} Q̄^dn(s_{t−1}, m_{t−1})])²],
    r_t = 0 on non-terminal transitions, r_t = Q^a(s, a_i*) at termination (one candidate left), no bootstrap
    after termination. Here a stage's filtering action m_t is its kept set; its value is parameterised by the
    per-candidate critic as Q^dn(s_t, m_t) = max_{i kept} Q^dn(s, x_t^i, t) (so max over masks of the next stage
    = max over its candidates, the greedy filter's choice; with one stage at k = 0 this is §4.3's L_reg).

    With stages k_1 < … < k_J (m_J = 1, the terminal filter):
        y_J = Q^a(s, a_i*)                                                  (= final_value; r at termination)
        y_j = 0 + γ_dn^(k_{j+1} − k_j) · max_{i ∈ C_{j+1}} Q̄^dn(s, x^i_{k_{j+1}}, t_{k_{j+1}})     for j < J
    where C_{j+1} are the candidates scored at stage j+1 (stage j's survivors advanced to k_{j+1}) and Q̄^dn is
    the pessimistic target critic whose values `filter_and_denoise` stored as `visited["scores"]`. Each Euler step
    is one transition of eq. 1; between filter stages the schedule keeps all candidates with reward 0 and
    deterministic transitions, so the one-step targets compose into γ_dn^(Δk) (Δk = 1 is eq. 1 verbatim).
    Targets are stop-gradient.
    """
    scores, steps = visited["scores"], visited["step"]
    final_value = jnp.asarray(final_value)
    targets = [final_value]
    for j in range(len(scores) - 2, -1, -1):
        delta = jnp.asarray(steps[j + 1]) - jnp.asarray(steps[j])
        bootstrap = jnp.max(scores[j + 1], axis=-1)
        targets.append(jnp.power(jnp.asarray(gamma_dn, final_value.dtype), delta) * bootstrap)
    return tuple(jax.lax.stop_gradient(y) for y in reversed(targets))


def filter_critic_loss(
    params: Any,
    apply_fn: Callable[..., jax.Array],
    inputs: dict,
    visited: Visited,
    targets: Sequence[jax.Array],
    reduce: Literal["max", "each"] = "max",
) -> jax.Array:
    """Eq. 1's squared TD error, averaged over stages, states and ensemble members.

    `apply_fn(params, inputs, x_t [B, m, H, A], t) -> q [E, B, m]` is a time-conditioned `NoiseCritic`'s apply.
    The prediction for stage j is Q^dn(s_t, m_t) = max over its survivors of each member's q (`reduce="max"`,
    the parameterisation of `filter_td_targets`); `reduce="each"` instead regresses every survivor's q onto
    the stage's target. Targets are stop-gradient.
    """
    if reduce not in ("max", "each"):
        raise ValueError(f"reduce must be 'max' or 'each', got {reduce!r}")
    if len(targets) != len(visited["kept_x_t"]):
        raise ValueError(f"{len(targets)} targets for {len(visited['kept_x_t'])} stages")
    losses = []
    for x_t, t, y in zip(visited["kept_x_t"], visited["t"], targets):
        q = apply_fn(params, inputs, jax.lax.stop_gradient(x_t), t)  # [E, B, m]
        y = jax.lax.stop_gradient(y)
        if reduce == "max":
            losses.append(jnp.mean(jnp.square(jnp.max(q, axis=-1) - y[None])))
        else:
            losses.append(jnp.mean(jnp.square(q - y[None, :, None])))
    return jnp.mean(jnp.stack(losses))
