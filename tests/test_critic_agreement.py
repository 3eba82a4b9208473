"""benchmarks/critic_agreement.py: the per-state measures on scores with a known answer, their pooling by
episode sums, and a run folder read end to end (its decision states, its final critics, its cell)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from critic_agreement import AgreementArgs, episode_sums, main, measure_run, per_state, summary  # noqa: E402
from faster_vla.acting.actor_source import ActorSource  # noqa: E402
from faster_vla.libero.env import LiberoEnvConfig  # noqa: E402
from faster_vla.policies.config import PI05_SMALL  # noqa: E402
from faster_vla.rl.learner import Learner  # noqa: E402
from faster_vla.rl.replay import ReplayBuffer  # noqa: E402
from faster_vla.rl.selection import SelectionConfig  # noqa: E402
from faster_vla.runs.checkpoint import RunCheckpointer  # noqa: E402
from faster_vla.runs.config import CriticConfig, TrainConfig, learner_config  # noqa: E402
from faster_vla.runs.logger import RunLogger  # noqa: E402


def test_a_noise_critic_that_ranks_as_the_chunk_critic_agrees_and_captures_everything():
    rng = np.random.default_rng(0)
    q_chunk = rng.normal(size=(50, 8))
    offset = rng.normal(size=(50, 1))  # Q^dn off by a per-state constant still ranks the same
    same = per_state(q_chunk + offset, q_chunk)
    assert same["agree"].mean() == 1.0
    assert same["gain_pick"].sum() / same["gain_best"].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(same["spearman"], 1.0, atol=1e-12)
    np.testing.assert_allclose(same["error"], 0.0, atol=1e-12)  # the offset is not an error within a state

    reverse = per_state(-q_chunk, q_chunk)  # picks Q^a's worst seed every time
    assert reverse["agree"].sum() == 0
    np.testing.assert_allclose(reverse["spearman"], -1.0, atol=1e-12)
    np.testing.assert_allclose(reverse["gain_pick"], q_chunk.min(axis=1) - q_chunk.mean(axis=1))

    unrelated = per_state(rng.normal(size=(20_000, 8)), rng.normal(size=(20_000, 8)))
    # Independent scores: agreement near 1/K and no gain; 20,000 states put both within a few percent.
    assert unrelated["agree"].mean() == pytest.approx(1 / 8, abs=0.02)
    assert abs(unrelated["gain_pick"].sum() / unrelated["gain_best"].sum()) < 0.03


def test_held_out_members_undo_the_winners_curse_of_the_choosing_pair():
    """Q^a's choosing pair and two held-out members see the same true values with their own noise: by the
    choosing pair, its own argmax looks better than it is, so `captured` understates a good Q^dn; valued by the
    held-out pair, a Q^dn as good as the choosing pair captures about all of its gain."""
    rng = np.random.default_rng(3)
    true = rng.normal(size=(20_000, 8))
    noisy = lambda: true + rng.normal(size=true.shape)  # noqa: E731  (noise as large as the spread)
    per = per_state(noisy(), noisy(), noisy())
    captured = per["gain_pick"].sum() / per["gain_best"].sum()
    held_out = per["held_pick"].sum() / per["held_best"].sum()
    # 20,000 states: both shares within a few hundredths of their expectations (about 0.5 and 1).
    assert captured < 0.6 and held_out == pytest.approx(1.0, abs=0.05)
    assert np.isnan(per_state(true, true)["held_pick"]).all()  # no held-out members: NaN, never a number


def test_bad_scores_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"\[states, K\].*\(4, 8\).*\(4, 7\)"):
        per_state(np.zeros((4, 8)), np.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"q_held must be \[states, K\] = \(4, 8\).*\(4, 6\)"):
        per_state(np.zeros((4, 8)), np.zeros((4, 8)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match="K >= 2"):
        per_state(np.zeros((4, 1)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="--episodes must be >= 1, got 0"):
        AgreementArgs(episodes=0)


def test_pooled_measures_weigh_every_state_once():
    """Episodes of different lengths pool by their sums: the pooled measure is the one over all states, not a
    mean of per-episode means; the bootstrap interval holds it."""
    rng = np.random.default_rng(1)
    q_chunk = rng.normal(size=(30, 4))
    q_noise = q_chunk + rng.normal(scale=0.5, size=(30, 4))
    q_held = q_chunk + rng.normal(scale=0.5, size=(30, 4))
    episode = np.repeat([0, 1, 2], [3, 7, 20])
    per = per_state(q_noise, q_chunk, q_held)
    out = summary(episode_sums(episode, per), 4, np.random.default_rng(0), resamples=200)
    assert out["states"] == 30 and out["episodes"] == 3 and out["chance"] == 0.25
    assert out["agreement"] == pytest.approx(per["agree"].mean())
    assert out["captured"] == pytest.approx(per["gain_pick"].sum() / per["gain_best"].sum())
    assert out["held_out"] == pytest.approx(per["held_pick"].sum() / per["held_best"].sum())
    assert out["between"] == pytest.approx(q_chunk.mean(axis=1).std())
    for m in ("agreement", "captured", "held_out", "spearman"):
        lo, hi = out["ci95"][m]
        assert lo <= out[m] <= hi


def _run_folder(root: Path) -> tuple[Path, Learner, ReplayBuffer]:
    """A run as `faster-vla train` leaves it: config.json and a checkpoint whose replay holds three episodes with
    the frozen-actor cache (K = 4 seeds per row), its critics with two members (one pessimistic pair)."""
    config = TrainConfig(run_dir=root, actor=ActorSource("pi05_small", seed=3), env=LiberoEnvConfig(max_steps=20),
                         selection=SelectionConfig("faster", num_candidates=4), cache_seeds=4,
                         critics=CriticConfig(hidden_dims=(16,), num_members=2, feature_proj_dim=8,
                                              state_embed_dim=4),
                         wandb_mode="disabled", progress=False)
    lconfig = learner_config(config, PI05_SMALL)
    learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=5)
    with RunLogger(root, config, wandb_mode="disabled", progress=False):
        pass
    h, a_model = PI05_SMALL.action_horizon, PI05_SMALL.action_dim
    f = lconfig.chunk_critic.encoder.feature_dim
    rng = np.random.default_rng(2)
    replay = ReplayBuffer(1000)
    for length, success in ((2 * h + 3, False), (3 * h, True), (2 * h, False)):
        replay.add_episode({"state": rng.normal(size=(length + 1, 8)).astype(np.float32)},
                           rng.normal(size=(length, 7)).astype(np.float32), np.zeros(length, np.float32),
                           np.arange(length) == length - 1 if success else np.zeros(length, bool), not success,
                           cache={"features": rng.normal(size=(length + 1, f)).astype(np.float32),
                                  "noise": rng.normal(size=(length + 1, 4, h, a_model)).astype(np.float32),
                                  "denoised": rng.normal(size=(length + 1, 4, h, a_model)).astype(np.float32)})
    with RunCheckpointer(root / "checkpoints") as checkpointer:
        checkpointer.save(3, learner, replay, np.random.default_rng(0), {"episodes": 3})
    return root, learner, replay


def test_a_run_folder_is_read_end_to_end(tmp_path):
    run, learner, replay = _run_folder(tmp_path / "faster_expo_every_window_task20_seed0")
    h = PI05_SMALL.action_horizon
    args = AgreementArgs(runs=(run,), episodes=2, batch_size=2, out=tmp_path / "out")
    cell = measure_run(run, args)
    # The last two episodes: 3h steps ending in success (starts 0, h, 2h) and 2h truncated (0, h).
    assert cell["checkpoint"] == 3 and cell["k"] == 4 and cell["rule"] == "faster"
    assert [(e["episode"], e["states"]) for e in cell["episodes"]] == [(1, 3), (2, 2)]

    # The same measure from the critics called directly (two members: the pessimistic pair is their min).
    windows = replay.all_windows(h, 0.99, stride=h)
    rows = windows.episode >= 1
    inputs = {"state": windows.observations["state"][rows], "features": windows.cache["features"][rows]}
    q_dn = learner.noise_critic.apply_fn(learner.noise_target, inputs, windows.cache["noise"][rows]).min(axis=0)
    q_a = learner.chunk_critic.apply_fn(learner.chunk_target, inputs,
                                        windows.cache["denoised"][rows][..., :7]).min(axis=0)
    direct = per_state(np.asarray(q_dn), np.asarray(q_a))
    # Batches of 2 states against one call over all 5: XLA may order the sums differently, so a tolerance; and
    # argmaxes compare exactly only where no state's two best scores lie within float noise of each other.
    for q in (np.asarray(q_dn), np.asarray(q_a)):
        top2 = np.sort(q, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-5), "the fixture's scores nearly tie; pick another seed"
    assert sum(e["agree"] for e in cell["episodes"]) == direct["agree"].sum()
    assert sum(e["gain_pick"] for e in cell["episodes"]) == pytest.approx(direct["gain_pick"].sum(), rel=1e-4,
                                                                          abs=1e-6)

    main(args)
    text = (tmp_path / "out" / "cells" / f"{run.name}.json").read_text()
    assert "NaN" not in text  # 2 members, no held-out pair: null, which strict JSON readers accept
    written = json.loads(text)
    assert written["episodes"] == json.loads(json.dumps(cell["episodes"]))
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| {run.name} | 5 |" in report
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["held_out"] is None  # 2 members
    assert "| 0, FASTER-EXPO, chunk windows (0) | 5 |" in report  # task 0, trained on chunk windows, seed 0


def test_the_committed_report_regenerates_from_its_cells(tmp_path):
    """docs/reproduction.md quotes benchmarks/results/reproduce/agreement/report.md: `--report-only` rebuilds it
    byte for byte from the committed cells (a fixed bootstrap seed; sums, not floats from XLA)."""
    committed = BENCHMARKS / "results" / "reproduce" / "agreement"
    if not (committed / "cells").is_dir():
        pytest.skip("no committed agreement cells")
    out = tmp_path / "agreement"
    (out / "cells").mkdir(parents=True)
    for cell in (committed / "cells").glob("*.json"):
        (out / "cells" / cell.name).write_bytes(cell.read_bytes())
    main(AgreementArgs(out=out, report_only=True))
    assert (out / "report.md").read_text() == (committed / "report.md").read_text()
