"""Norm stats file format (openpi's norm_stats.json) and the (un)normalisation formulas."""

import json

import numpy as np
import pytest

from faster_vla.policies.normalize import (
    NormStats,
    load_norm_stats,
    normalize_quantile,
    normalize_zscore,
    save_norm_stats,
    unnormalize_quantile,
    unnormalize_zscore,
)


def _stats(dim: int = 4, seed: int = 0) -> NormStats:
    rng = np.random.default_rng(seed)
    q01 = rng.uniform(-2.0, -0.5, dim)
    return NormStats(
        mean=rng.normal(size=dim), std=rng.uniform(0.1, 2.0, dim), q01=q01, q99=q01 + rng.uniform(0.5, 3.0, dim)
    )


def test_quantile_formula_by_hand():
    stats = NormStats(mean=[0.0, 0.0], std=[1.0, 1.0], q01=[0.0, -2.0], q99=[1.0, 2.0])
    x = np.array([0.5, 2.0])
    expected = np.array([0.5 / (1.0 + 1e-6) * 2 - 1, 4.0 / (4.0 + 1e-6) * 2 - 1])
    np.testing.assert_array_equal(normalize_quantile(x, stats), expected)
    np.testing.assert_array_equal(unnormalize_quantile(np.array([-1.0, 1.0]), stats), [0.0, (4.0 + 1e-6) - 2.0])


def test_zscore_formula_by_hand():
    stats = NormStats(mean=[1.0], std=[2.0])
    np.testing.assert_array_equal(normalize_zscore(np.array([5.0]), stats), [4.0 / (2.0 + 1e-6)])
    np.testing.assert_array_equal(unnormalize_zscore(np.array([1.0]), stats), [2.0 + 1e-6 + 1.0])


@pytest.mark.parametrize(
    ("norm", "unnorm"), [(normalize_quantile, unnormalize_quantile), (normalize_zscore, unnormalize_zscore)]
)
def test_round_trip(norm, unnorm):
    stats = _stats()
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    np.testing.assert_allclose(unnorm(norm(x, stats), stats), x, rtol=0, atol=1e-6)


def test_float32_input_computes_in_float64_like_openpi():
    # openpi's stats are float64 (from JSON), so float32 data is normalised in float64.
    out = normalize_quantile(np.zeros(4, dtype=np.float32), _stats())
    assert out.dtype == np.float64


def test_normalize_cuts_longer_stats_and_rejects_shorter():
    stats = _stats(dim=8)
    x = np.random.default_rng(2).normal(size=(3, 5))
    np.testing.assert_array_equal(
        normalize_quantile(x, stats), (x - stats.q01[:5]) / (stats.q99[:5] - stats.q01[:5] + 1e-6) * 2.0 - 1.0
    )
    np.testing.assert_array_equal(normalize_zscore(x, stats), (x - stats.mean[:5]) / (stats.std[:5] + 1e-6))
    with pytest.raises(ValueError, match="cannot normalise 9 dims with 8-dim"):
        normalize_quantile(np.zeros(9), stats)
    with pytest.raises(ValueError, match="cannot normalise 9 dims with 8-dim"):
        normalize_zscore(np.zeros(9), stats)


def test_unnormalize_quantile_passes_extra_dims_through():
    stats = _stats(dim=7)
    x = np.random.default_rng(3).uniform(-1, 1, size=(10, 32))
    out = unnormalize_quantile(x, stats)
    assert out.shape == (10, 32)
    np.testing.assert_array_equal(out[:, :7], unnormalize_quantile(x[:, :7], stats))
    np.testing.assert_array_equal(out[:, 7:], x[:, 7:])
    with pytest.raises(ValueError, match="cannot unnormalise 6 dims"):
        unnormalize_quantile(x[:, :6], stats)


def test_unnormalize_zscore_pads_mean_zero_std_one():
    stats = _stats(dim=7)
    x = np.random.default_rng(4).normal(size=(10, 32))
    out = unnormalize_zscore(x, stats)
    np.testing.assert_array_equal(out[:, :7], x[:, :7] * (stats.std + 1e-6) + stats.mean)
    np.testing.assert_array_equal(out[:, 7:], x[:, 7:] * (1.0 + 1e-6))
    with pytest.raises(ValueError, match="cannot unnormalise 6 dims"):
        unnormalize_zscore(x[:, :6], stats)


def test_quantile_functions_need_quantiles():
    stats = NormStats(mean=[0.0], std=[1.0])
    assert not stats.has_quantiles
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize_quantile(np.zeros(1), stats)
    with pytest.raises(ValueError, match="q01 and q99"):
        unnormalize_quantile(np.zeros(1), stats)


def test_norm_stats_is_immutable_and_validated():
    source = np.zeros(3)
    stats = NormStats(mean=source, std=np.ones(3))
    source[0] = 5.0
    assert stats.mean[0] == 0.0  # copied
    with pytest.raises(ValueError):
        stats.mean[0] = 1.0  # read-only
    with pytest.raises(ValueError, match="differ in shape"):
        NormStats(mean=np.zeros(3), std=np.ones(2))
    with pytest.raises(ValueError, match="both q01 and q99"):
        NormStats(mean=np.zeros(3), std=np.ones(3), q01=np.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        NormStats(mean=np.zeros((2, 3)), std=np.ones((2, 3)))


def test_save_load_round_trip(tmp_path):
    stats = {"state": _stats(8, seed=5), "actions": NormStats(mean=np.arange(7.0), std=np.ones(7))}
    path = save_norm_stats(tmp_path / "assets" / "libero", stats)
    assert path == tmp_path / "assets" / "libero" / "norm_stats.json"
    assert [p.name for p in path.parent.iterdir()] == ["norm_stats.json"]  # no temp file left behind
    for source in (path, path.parent):
        loaded = load_norm_stats(source)
        assert set(loaded) == {"state", "actions"}
        for key in stats:
            for field in ("mean", "std", "q01", "q99"):
                a, b = getattr(stats[key], field), getattr(loaded[key], field)
                if a is None:
                    assert b is None
                else:
                    np.testing.assert_array_equal(a, b)
                    assert b.dtype == np.float64


def test_saved_layout_is_openpis(tmp_path):
    path = save_norm_stats(tmp_path, {"actions": NormStats(mean=[0.5], std=[2.0])})
    text = path.read_text()
    assert json.loads(text) == {"norm_stats": {"actions": {"mean": [0.5], "std": [2.0], "q01": None, "q99": None}}}
    assert text.startswith('{\n  "norm_stats": {\n    "actions": {\n      "mean": [\n        0.5\n')


def test_save_overwrites(tmp_path):
    save_norm_stats(tmp_path, {"a": NormStats(mean=[0.0], std=[1.0])})
    save_norm_stats(tmp_path, {"b": NormStats(mean=[0.0], std=[1.0])})
    assert set(load_norm_stats(tmp_path)) == {"b"}


def test_loads_openpi_written_file(tmp_path):
    # Shape of a file written by openpi (pydantic, indent 2), q01/q99 present for one key and absent for another.
    (tmp_path / "norm_stats.json").write_text(
        '{\n  "norm_stats": {\n    "state": {\n      "mean": [\n        -0.04,\n        0.03\n      ],\n'
        '      "std": [\n        0.1,\n        0.2\n      ],\n'
        '      "q01": [\n        -0.5,\n        -0.4\n      ],\n'
        '      "q99": [\n        0.5,\n        0.6\n      ]\n    },\n'
        '    "actions": {"mean": [0.0], "std": [1.0]}\n  }\n}'
    )
    stats = load_norm_stats(tmp_path)
    np.testing.assert_array_equal(stats["state"].q99, [0.5, 0.6])
    assert stats["actions"].q01 is None


def test_load_errors_name_file_and_key(tmp_path):
    path = tmp_path / "norm_stats.json"
    with pytest.raises(FileNotFoundError, match="norm_stats.json"):
        load_norm_stats(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"norm_stats\.json is not valid JSON"):
        load_norm_stats(path)
    path.write_text('{"stats": {}}')
    with pytest.raises(ValueError, match=r"norm_stats\.json is missing the top-level key 'norm_stats'"):
        load_norm_stats(path)
    path.write_text('{"norm_stats": {"state": {"mean": [0.0]}}}')
    with pytest.raises(ValueError, match=r"norm_stats\.json: norm_stats\['state'\] is missing the key 'std'"):
        load_norm_stats(path)
    path.write_text('{"norm_stats": {"state": {"mean": [0.0], "std": [1.0, 2.0]}}}')
    with pytest.raises(ValueError, match=r"norm_stats\['state'\] is invalid: .*differ in shape"):
        load_norm_stats(path)
    path.write_text('{"norm_stats": {"state": {"mean": ["a"], "std": [1.0]}}}')
    with pytest.raises(ValueError, match=r"norm_stats\['state'\] is invalid"):
        load_norm_stats(path)
