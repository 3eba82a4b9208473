"""Selection rules: how one action chunk is chosen from N initial noises. One interface for all callers.

Acting, evaluation and the TD target's a' all call `select` with the same rule, so they can never drift
apart. A rule sees the world through four callables, which is what lets the TD target run on the
frozen-actor cache instead of the VLA:

- `denoise(idx [B, M]) -> chunks [B, M, H, A]`: the actor's chunk for seeds `idx` of the pool (the live
  actor, or a lookup in the cache of chunks denoised when the state was collected);
- `score_noise(noise [B, N, H, Ad]) -> [B, N]`: pessimistic Q^dn of each initial noise;
- `q_chunk(chunks [B, M, H, A]) -> [B, M]`: pessimistic Q^a of each chunk;
- `edit(rng, chunks [B, M, H, A]) -> [B, M, H, A]`: EXPO's edit (bounded, clipped) of each chunk;
- optionally `filter_denoise(rng, noise) -> (chunk [B, H, A], seed [B], scores [B, N])`: the general filtering
  MDP (`filtering.filter_and_denoise` with a survivor schedule and a step-conditioned Q^dn), which then
  replaces the `faster` rules' score-once-and-denoise-the-winner.

Rules (FASTER paper §4.3, EXPO):
- `base`: seed 0, denoised, executed.
- `best_of_n` (EXPO): denoise all N, edit each, argmax of Q^a over the 2N candidates.
- `idql`: denoise all N, argmax of Q^a (no edit).
- `faster` (FASTER-EXPO): Q^dn picks one seed (greedy, or softmax over z-scored scores at temperature > 0),
  only it is denoised, it is edited, and Q^a chooses base or edited.
- `faster_idql`: Q^dn picks one seed, only it is denoised and executed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

Rule = Literal["base", "best_of_n", "idql", "faster", "faster_idql"]
RULES: tuple[str, ...] = ("base", "best_of_n", "idql", "faster", "faster_idql")

DenoiseFn = Callable[[jax.Array], jax.Array]
ScoreNoiseFn = Callable[[jax.Array], jax.Array]
QChunkFn = Callable[[jax.Array], jax.Array]
EditFn = Callable[[jax.Array, jax.Array], jax.Array]
FilterDenoiseFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Which rule, over how many seeds, and how greedily Q^dn picks (0 = argmax)."""

    rule: Rule = "faster"
    num_candidates: int = 8
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; choose one of {list(RULES)}")
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")

    @property
    def uses_noise_critic(self) -> bool:
        return self.rule in ("faster", "faster_idql")

    @property
    def uses_chunk_critic(self) -> bool:
        return self.rule in ("best_of_n", "idql", "faster")

    @property
    def uses_edit(self) -> bool:
        return self.rule in ("best_of_n", "faster")

    @property
    def denoised_per_state(self) -> int:
        """Chunks the actor denoises per state: the quantity FASTER cuts from N to 1."""
        return self.num_candidates if self.rule in ("best_of_n", "idql") else 1


@flax.struct.dataclass
class Selection:
    """The chosen chunk and how it was chosen (for logging, Q^dn regression and compute accounting)."""

    action: jax.Array  # [B, H, A] the chunk to execute
    base_action: jax.Array  # [B, H, A] the unedited chunk of the chosen seed
    seed_index: jax.Array  # [B] int: which noise of the pool the chunk came from
    edited: jax.Array  # [B] bool: whether the edited chunk won
    noise_scores: jax.Array | None  # [B, N] pessimistic Q^dn of every seed (rules that score noises)


def pick_seed(rng: jax.Array, scores: jax.Array, temperature: float) -> jax.Array:
    """scores [B, N] -> index [B]: argmax at temperature 0; else a draw from softmax(z-score(scores) / T).

    z-scoring per state makes the temperature mean the same thing whatever the critic's scale; the draw uses
    the Gumbel-max trick (one argmax, no normalisation).
    """
    if temperature == 0.0:
        return jnp.argmax(scores, axis=-1)
    mean = jnp.mean(scores, axis=-1, keepdims=True)
    std = jnp.std(scores, axis=-1, keepdims=True)
    z = (scores - mean) / (std + 1e-6)
    gumbel = jax.random.gumbel(rng, scores.shape, scores.dtype)
    return jnp.argmax(z / temperature + gumbel, axis=-1)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...], idx [B] -> [B, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def select(
    config: SelectionConfig,
    rng: jax.Array,
    noise: jax.Array,  # [B, N, H, Ad] the pool of initial noises
    *,
    denoise: DenoiseFn,
    score_noise: ScoreNoiseFn | None = None,
    q_chunk: QChunkFn | None = None,
    edit: EditFn | None = None,
    filter_denoise: FilterDenoiseFn | None = None,
) -> Selection:
    """Chooses one chunk per state with `config.rule` (see the module docstring). jit-compatible."""
    batch, n = noise.shape[:2]
    if n != config.num_candidates:
        raise ValueError(f"noise pool has {n} seeds, the rule expects num_candidates={config.num_candidates}")
    if filter_denoise is not None and not config.uses_noise_critic:
        raise ValueError(f"a filter schedule replaces Q^dn's seed choice; rule {config.rule!r} does not make one "
                         "(use 'faster' or 'faster_idql')")
    for needed, fn, name in (
        (config.uses_noise_critic and filter_denoise is None, score_noise, "score_noise"),
        (config.uses_chunk_critic, q_chunk, "q_chunk"),
        (config.uses_edit, edit, "edit"),
    ):
        if needed and fn is None:
            raise ValueError(f"selection rule {config.rule!r} needs `{name}`")
    pick_rng, edit_rng = jax.random.split(rng)
    scores = None

    if config.rule == "base":
        idx = jnp.zeros((batch,), jnp.int32)
        base = denoise(idx[:, None])[:, 0]
        return Selection(base, base, idx, jnp.zeros((batch,), bool), None)

    if config.rule in ("faster", "faster_idql"):
        if filter_denoise is not None:  # multi-stage filter: the survivor comes out denoised
            base, idx, scores = filter_denoise(pick_rng, noise)
        else:
            scores = score_noise(noise)  # [B, N]
            idx = pick_seed(pick_rng, scores, config.temperature)
            base = denoise(idx[:, None])[:, 0]  # only the winner is denoised
        if config.rule == "faster_idql":
            return Selection(base, base, idx, jnp.zeros((batch,), bool), scores)
        edited = edit(edit_rng, base[:, None])[:, 0]
        q = q_chunk(jnp.stack([base, edited], axis=1))  # [B, 2]
        use_edit = q[:, 1] > q[:, 0]
        action = jnp.where(use_edit[:, None, None], edited, base)
        return Selection(action, base, idx, use_edit, scores)

    # best_of_n / idql: every seed is denoised.
    all_idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    chunks = denoise(all_idx)  # [B, N, H, A]
    if config.rule == "idql":
        best = jnp.argmax(q_chunk(chunks), axis=-1)
        base = _take(chunks, best)
        return Selection(base, base, best, jnp.zeros((batch,), bool), None)
    candidates = jnp.concatenate([chunks, edit(edit_rng, chunks)], axis=1)  # [B, 2N, H, A]
    best = jnp.argmax(q_chunk(candidates), axis=-1)  # over base and edited
    seed = best % n
    return Selection(_take(candidates, best), _take(chunks, seed), seed, best >= n, None)
