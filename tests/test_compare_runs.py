"""benchmarks/compare_runs.py: paired per-block counts, the exact McNemar p-value and the moving success rate,
on small run folders written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compare_runs import CompareArgs, compare, mcnemar_p, moving_rate  # noqa: E402


def _write_run(path: Path, successes: list[int], *, seed: int = 0, evals: dict[int, float] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"env": {"task": 20}, "seed": seed, "selection": {"rule": "faster"}}))
    lines = []
    for i, s in enumerate(successes, start=1):
        record = {"step": i, "episodes": i, "env_steps": 100 * i, "flops": 1e9 * i, "train/success": float(s)}
        if evals and i in evals:
            record["eval/success_rate"] = evals[i]
        lines.append(json.dumps(record))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_mcnemar_p_is_the_exact_binomial_test():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # all 5 discordant pairs one way: 2 · 0.5^5
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(2, 7) == mcnemar_p(7, 2)


def test_moving_rate_uses_the_window_before_each_episode():
    rate = moving_rate(np.array([1, 0, 0, 1, 1], float), window=2)
    np.testing.assert_allclose(rate, [1, 0.5, 0, 0.5, 1])


def test_compare_pairs_episodes_by_block_and_refuses_unpaired_runs(tmp_path):
    ref = _write_run(tmp_path / "base", [1, 0, 1, 0, 1, 0])
    other = _write_run(tmp_path / "faster", [1, 1, 0, 1, 1, 1, 1], evals={5: 0.7})  # one episode more
    result = compare(CompareArgs(runs=(ref, other), labels=("base", "faster"), block=4, out=tmp_path / "out"))
    assert result["paired_episodes"] == 6
    assert [b["episodes"] for b in result["blocks"]] == [[1, 4], [5, 6]]
    assert [b["successes"] for b in result["blocks"]] == [[2, 3], [1, 2]]
    # Episodes 1-4: base only in 3, faster only in 2 and 4.
    assert result["blocks"][0]["vs_reference"][0] == {"only_reference": 1, "only_this": 2,
                                                      "mcnemar_p": pytest.approx(1.0)}
    assert result["total_successes"] == [3, 5] and result["runs"]["faster"]["evals"] == [(5, 5e9, 0.7)]
    for name in ("results.json", "table.md", "success_vs_episodes.png", "success_vs_flops.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| all | 3/6 | 5/6 |" in (tmp_path / "out" / "table.md").read_text()

    unpaired = _write_run(tmp_path / "seed1", [1, 0], seed=1)
    with pytest.raises(ValueError, match="not paired"):
        compare(CompareArgs(runs=(ref, unpaired), out=tmp_path / "out2"))
    with pytest.raises(FileNotFoundError, match="not a fine-tuning run folder"):
        compare(CompareArgs(runs=(ref, tmp_path / "missing"), out=tmp_path / "out3"))
