"""Does the noise critic pick the seed the chunk critic would? Q^dn against Q^a on trained runs (issue 18).

FASTER's premise is that Q^dn(s, ε) ranks one state's noises as Q^a ranks the chunks denoised from them, so
denoising only Q^dn's pick gets most of what best-of-N gets. The noise critic's training loss cannot show
that: values vary far more between states than between one state's noises, so a small loss can fit the state
and still rank its noises at random. This measures the ranking itself, where it costs no actor call: a
finished run's replay holds, per decision state, the K noises the frozen actor was given and the chunk it
denoised from each (the frozen-actor cache), so both critics score the same K candidates.

Not a test (it reads run folders, ~1 min a run). Per decision state (windows starting at chunk boundaries of
the last --episodes stored episodes), with the run's final target critics, pessimistic as acting uses them
(each state its own random pair of members, minimum of the two):

    agreement     Q^dn's argmax is Q^a's argmax (chance: 1/K)
    captured      Σ (Q^a of Q^dn's pick − mean Q^a) / Σ (max Q^a − mean Q^a): the share of best-of-K's gain
                  over a random seed, by Q^a's own account, that Q^dn's pick gets (0: a random seed; 1: Q^a's)
    held out      the same share with both picks valued by two other members of Q^a (critics of >= 4 members):
                  Q^a's own account favours its own argmax, which is partly the chosen pair's noise (the
                  winner's curse), so `captured` understates Q^dn's pick; the held-out pair does not know
                  which seed either critic chose
    spearman      rank correlation of the K scores, mean over states
    spread        Q^a's standard deviation over the K chunks (what choosing a seed can gain), against
    error         the standard deviation over K of Q^dn − Q^a (Q^dn's error within a state, its offset removed),
    between       and Q^a's standard deviation between states (what the regression loss mostly sees)

95 % intervals by a bootstrap over episodes (states of one episode are not independent). Each run's cell is
written atomically to `--out/cells/<run>.json` (per-episode sums: compact, and the run's checkpoints are not
committed); the report (`--out/report.md`, `report.json`) is built from the cells alone:

    .venv/bin/python benchmarks/critic_agreement.py                  # every finished FASTER-EXPO / EXPO run
    .venv/bin/python benchmarks/critic_agreement.py --report-only    # the report from the committed cells
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from bench_common import write_result
from faster_vla.rl.batches import to_learner_batch
from faster_vla.rl.learner import Learner
from faster_vla.rl.replay import ChunkBatch, ReplayBuffer
from faster_vla.runs.checkpoint import REPLAY_FILE, REPLAY_ITEM, RunCheckpointer
from faster_vla.runs.loading import load_run
from faster_vla.shared.files import atomic_write

SUMS = ("states", "agree", "gain_pick", "gain_best", "held_pick", "held_best", "spearman", "spread", "error",
        "q_mean", "q_mean_sq")
"""Per-episode sums a cell keeps: states, then each per-state quantity summed over the episode's states."""


@dataclasses.dataclass(frozen=True)
class AgreementArgs:
    """Score each run's replayed decision states with both trained critics and compare their choices."""

    runs: tuple[Path, ...] = ()
    """Run folders. Empty: every folder in --runs-root whose rule is faster or best_of_n, with a checkpoint and a
    grid record in --records (a finished run)."""
    runs_root: Path = Path("runs/reproduce")
    """Where the reproduction grid's run folders are (benchmarks/reproduce.py --out)."""
    records: Path = Path("benchmarks/results/reproduce/runs")
    """The grid's records: a run counts as finished when its <name>.json is here."""
    episodes: int = 50
    """The last this many stored episodes of each run's final replay give the decision states."""
    batch_size: int = 256
    """States per critic call."""
    seed: int = 0
    """Key of the states' member pairs and of the bootstrap."""
    out: Path = Path("benchmarks/results/reproduce/agreement")
    """Cells (out/cells/) and the report."""
    report_only: bool = False
    """Write the report from the cells already there; read no run."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


# -- the measure, per state ------------------------------------------------------------------------------------


def per_state(q_noise: np.ndarray, q_chunk: np.ndarray, q_held: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """q_noise, q_chunk [S, K]: each state's pessimistic Q^dn of its K noises and Q^a of their chunks; q_held [S, K]
    Q^a by two other members (None: NaN held-out sums) -> per-state quantities [S] (see the module docstring),
    summed per episode by `episode_sums`."""
    if q_noise.shape != q_chunk.shape or q_noise.ndim != 2:
        raise ValueError(f"q_noise and q_chunk must both be [states, K]; got {q_noise.shape} and {q_chunk.shape}")
    if q_held is not None and q_held.shape != q_chunk.shape:
        raise ValueError(f"q_held must be [states, K] = {q_chunk.shape} like q_chunk; got {q_held.shape}")
    if q_noise.shape[1] < 2:
        raise ValueError(f"a state needs K >= 2 candidates to rank; the cache holds {q_noise.shape[1]}")
    q_noise, q_chunk = q_noise.astype(np.float64), q_chunk.astype(np.float64)
    pick = np.argmax(q_noise, axis=1)  # [S] the seed FASTER denoises
    best = np.argmax(q_chunk, axis=1)  # [S] the seed best-of-K keeps
    mean = q_chunk.mean(axis=1)
    held = np.full_like(q_chunk, np.nan) if q_held is None else q_held.astype(np.float64)
    held_value = lambda idx: np.take_along_axis(held, idx[:, None], axis=1)[:, 0] - held.mean(axis=1)  # noqa: E731
    ranks = lambda q: np.argsort(np.argsort(q, axis=1), axis=1).astype(np.float64)  # noqa: E731
    rn, ra = ranks(q_noise), ranks(q_chunk)
    rn, ra = rn - rn.mean(axis=1, keepdims=True), ra - ra.mean(axis=1, keepdims=True)
    return {"agree": (pick == best).astype(np.float64),
            "gain_pick": np.take_along_axis(q_chunk, pick[:, None], axis=1)[:, 0] - mean,
            "gain_best": q_chunk.max(axis=1) - mean,
            "held_pick": held_value(pick), "held_best": held_value(best),
            "spearman": (rn * ra).sum(axis=1) / np.sqrt((rn ** 2).sum(axis=1) * (ra ** 2).sum(axis=1)),
            "spread": q_chunk.std(axis=1),
            "error": (q_noise - q_chunk).std(axis=1),
            "q_mean": mean, "q_mean_sq": mean ** 2}


def episode_sums(episode: np.ndarray, states: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """episode [S] ids, `per_state`'s quantities [S] -> one dict of `SUMS` per episode, ids ascending."""
    out = []
    for e in np.unique(episode):
        mine = episode == e
        sums = {k: float(states[k][mine].sum()) for k in SUMS if k != "states"}
        # NaN (no held-out members) as None: strict JSON has no NaN.
        out.append({"episode": int(e), "states": int(mine.sum())}
                   | {k: None if np.isnan(v) else v for k, v in sums.items()})
    return out


def summary(episodes: list[dict[str, float]], k: int, rng: np.random.Generator, resamples: int = 2000) -> dict:
    """A run's (or a pool's) measures from per-episode sums, with 95 % bootstrap intervals over episodes."""
    table = np.array([[np.nan if e[s] is None else e[s] for s in SUMS] for e in episodes])  # [E, len(SUMS)]

    def measures(t: np.ndarray) -> dict[str, float]:
        tot = dict(zip(SUMS, t.sum(axis=0)))
        n = tot["states"]
        between = max(tot["q_mean_sq"] / n - (tot["q_mean"] / n) ** 2, 0.0)
        ratio = lambda num, den: num / den if den > 0 else np.nan  # noqa: E731  (NaN: no gain to share)
        return {"agreement": tot["agree"] / n, "captured": ratio(tot["gain_pick"], tot["gain_best"]),
                "held_out": ratio(tot["held_pick"], tot["held_best"]), "held_pick": tot["held_pick"] / n,
                "held_best": tot["held_best"] / n, "spearman": tot["spearman"] / n, "spread": tot["spread"] / n,
                "error": tot["error"] / n, "between": float(np.sqrt(between))}

    point = measures(table)
    boot = [measures(table[rng.integers(0, len(table), len(table))]) for _ in range(resamples)]
    ci = {m: [float(np.percentile([b[m] for b in boot], 2.5)), float(np.percentile([b[m] for b in boot], 97.5))]
          for m in ("agreement", "captured", "held_out", "spearman")}
    # NaN (no held-out members, or no gain to share) is written as None: JSON has no NaN.
    clean = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {"episodes": len(episodes), "states": int(table[:, 0].sum()), "k": k, "chance": 1.0 / k,
            **{m: clean(v) for m, v in point.items()},
            "ci95": {m: None if np.isnan(v).any() else v for m, v in ci.items()}}


# -- reading a run ---------------------------------------------------------------------------------------------


@jax.jit
def _scores(learner: Learner, inputs: dict, noise: jax.Array, chunks: jax.Array, keys: jax.Array) -> tuple:
    """Target Q^dn of noise [B, K, H, Ad] and Q^a of chunks [B, K, H, A] -> [B, K] each: Q^dn by the min of a
    random pair of its members, Q^a by the min of a random pair and (held out) by the min of two other members
    (NaN with fewer than 4); each state its own draws (keys [B, 2])."""
    q_dn = learner.noise_critic.apply_fn(learner.noise_target, inputs, noise)  # [E, B, K]
    q_a = learner.chunk_critic.apply_fn(learner.chunk_target, inputs, chunks)  # [E, B, K]

    def pairs(q: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:  # one state: [E, K] -> [K], [K]
        order = jax.random.permutation(key, q.shape[0])  # a uniform ordered pair first, then two others
        held = jnp.minimum(q[order[2]], q[order[3]]) if q.shape[0] >= 4 else jnp.full(q.shape[1:], jnp.nan)
        return jnp.minimum(q[order[0]], q[order[1]]), held

    (dn, _), (a, held) = (jax.vmap(pairs, in_axes=(1, 0))(q, k) for q, k in ((q_dn, keys[:, 0]), (q_a, keys[:, 1])))
    return dn, a, held


def decision_states(replay: ReplayBuffer, horizon: int, gamma: float, episodes: int) -> ChunkBatch:
    """Windows starting at chunk boundaries (where the agent decided) of the last `episodes` stored episodes."""
    windows = replay.all_windows(horizon, gamma, stride=horizon)
    keep = np.isin(windows.episode, [e.id for e in replay.episodes[-episodes:]])
    return ChunkBatch(**{f.name: (jax.tree.map(lambda x: x[keep], getattr(windows, f.name)))
                         for f in dataclasses.fields(ChunkBatch)})


def measure_run(run_dir: Path, args: AgreementArgs) -> dict[str, Any]:
    """One run's cell: its final critics on the decision states of its last --episodes episodes."""
    config, learner, episode = load_run(run_dir, "latest")
    with RunCheckpointer(Path(run_dir) / "checkpoints", keep_last=config.keep_last,
                         keep_best=config.keep_best) as checkpointer:
        replay = ReplayBuffer.load(checkpointer.path(episode) / REPLAY_ITEM / REPLAY_FILE)
    lconfig = learner.config
    states = decision_states(replay, lconfig.horizon, config.gamma, args.episodes)
    k = states.cache["noise"].shape[1]
    if k < 2:
        raise ValueError(f"{run_dir}: its replay caches {k} seed per state; ranking needs K >= 2")
    batch = to_learner_batch(states, 1, features=lconfig.chunk_critic.encoder.kind == "backbone")
    keys = jax.random.split(jax.random.key(args.seed), 2 * states.size).reshape(states.size, 2)
    scores: list[tuple[np.ndarray, ...]] = []
    for lo in range(0, states.size, args.batch_size):
        part = slice(lo, lo + args.batch_size)
        inputs = jax.tree.map(lambda x: x[0, part], batch["inputs"])
        noise = batch["cache"]["noise"][0, part]
        chunks = batch["cache"]["denoised"][0, part, ..., : lconfig.action_dim]  # the robot dims critics see
        scores.append(tuple(np.asarray(x) for x in _scores(learner, inputs, noise, chunks, keys[part])))
    q_noise, q_chunk, q_held = (np.concatenate(x) for x in zip(*scores))
    per = per_state(q_noise, q_chunk, None if np.isnan(q_held).all() else q_held)
    return {"run": Path(run_dir).name, "task": config.env.task, "rule": config.selection.rule,
            "window_starts": config.window_starts, "seed": config.seed, "checkpoint": episode, "k": k,
            "episodes": episode_sums(states.episode, per)}


def finished_runs(args: AgreementArgs) -> list[Path]:
    """The grid's runs whose rule selects with both critics' kind (faster, best_of_n), finished and with a
    checkpoint left, in name order."""
    if not args.runs_root.is_dir():
        return []
    out = []
    for d in sorted(args.runs_root.iterdir()):
        config = d / "config.json"
        if not (config.is_file() and (args.records / f"{d.name}.json").is_file()):
            continue
        if json.loads(config.read_text())["selection"]["rule"] not in ("faster", "best_of_n"):
            continue
        with RunCheckpointer(d / "checkpoints") as checkpointer:  # closes its checkpoint manager again
            if checkpointer.latest_episode is not None:
                out.append(d)
    return out


# -- the report ------------------------------------------------------------------------------------------------


def _label(cell: dict[str, Any]) -> str:
    method = {"faster": "FASTER-EXPO", "best_of_n": "EXPO"}.get(cell["rule"], cell["rule"])
    windows = "every window" if cell["window_starts"] == "step" else "chunk windows"
    return f"{method}, {windows}"


def report(args: AgreementArgs) -> dict[str, Any]:
    """report.md / report.json from the cells in --out/cells: one row per run, then each (task, method) pooled."""
    cells = [json.loads(p.read_text()) for p in sorted((args.out / "cells").glob("*.json"))]
    rng = np.random.default_rng(args.seed)
    runs = [{"run": c["run"], "task": c["task"], "method": _label(c), "seed": c["seed"],
             **summary(c["episodes"], c["k"], rng)} for c in cells]
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["task"], _label(c)), []).append(c)
    pooled = []
    for (task, method), members in sorted(groups.items()):
        ks = {c["k"] for c in members}
        if len(ks) != 1:
            raise ValueError(f"task {task}, {method}: runs cache different K {sorted(ks)}; pool equal K only")
        pooled.append({"task": task, "method": method, "seeds": sorted(c["seed"] for c in members),
                       **summary([e for c in members for e in c["episodes"]], ks.pop(), rng)})

    def with_ci(r: dict[str, Any], m: str, fmt: str, scale: float = 1.0) -> str:
        if r[m] is None:
            return "–"
        ci = r["ci95"][m]
        interval = "" if ci is None else f" [{format(scale * ci[0], fmt)}, {format(scale * ci[1], fmt)}]"
        return format(scale * r[m], fmt) + interval

    def row(r: dict[str, Any], first: str) -> str:
        return (f"| {first} | {r['states']} | {with_ci(r, 'agreement', '.0f', 100)} (chance {100 * r['chance']:.1f}) | "
                f"{with_ci(r, 'captured', '+.2f')} | {with_ci(r, 'held_out', '+.2f')} | "
                f"{with_ci(r, 'spearman', '+.2f')} | {r['spread']:.4f} | {r['error']:.4f} | {r['between']:.4f} |")

    head = ("| {} | states | Q^dn's pick is Q^a's, % (95 %) | captured (95 %) | held out (95 %) | Spearman (95 %) | "
            "Q^a spread | Q^dn error | Q^a between states |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    lines = ["# Does the noise critic pick the seed the chunk critic would?", "",
             "Generated by `benchmarks/critic_agreement.py --report-only` from the cells in `cells/` (each run's "
             f"final target critics, pessimistic as acting uses them; the decision states of the last {args.episodes} "
             "stored episodes; the K noises and chunks of the frozen-actor cache). Captured: the share of "
             "best-of-K's Q^a gain over a random seed that Q^dn's pick gets (0 random, 1 Q^a's own choice), by the "
             "Q^a members that chose; held out: the same share with both picks valued by two other members, which "
             "do not share the choosing pair's noise. Spread, error and between: standard deviations of Q^a over "
             "a state's K chunks, of Q^dn − Q^a within a state, and of Q^a's state mean between states. "
             "Intervals: bootstrap over episodes.", "",
             "## Pooled over seeds", "", head.format("task, method (seeds)"), rule]
    lines += [row(p, f"{p['task']}, {p['method']} ({', '.join(map(str, p['seeds']))})") for p in pooled]
    lines += ["", "## Per run", "", head.format("run"), rule]
    lines += [row(r, r["run"]) for r in runs]
    atomic_write(args.out / "report.md", ("\n".join(lines) + "\n").encode())
    result = {"episodes": args.episodes, "seed": args.seed, "pooled": pooled, "runs": runs}
    write_result(args.out / "report.json", result)
    return result


def main(args: AgreementArgs) -> None:
    if not args.report_only:
        runs = list(args.runs) or finished_runs(args)
        for i, run in enumerate(runs):
            path = args.out / "cells" / f"{Path(run).name}.json"
            if path.is_file():
                continue
            print(f"[{i + 1}/{len(runs)}] {Path(run).name}", flush=True)
            write_result(path, measure_run(Path(run), args))  # the cell exists only once complete
    result = report(args)
    print(f"report: {args.out / 'report.md'} ({len(result['runs'])} runs)")


if __name__ == "__main__":
    main(tyro.cli(AgreementArgs))
