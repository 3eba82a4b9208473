"""PaligemmaTokenizer formatting against openpi's goldens (tiny sentencepiece model), plus error handling."""

import logging
import shutil

import numpy as np
import pytest

from faster_vla.policies.tokenizer import (
    PaligemmaTokenizer,
    clean_prompt,
    default_tokenizer_path,
    discretize_state,
)
from tests.openpi_golden import GOLDEN_PROMPT


@pytest.fixture(scope="module")
def tiny_model(openpi_fixtures):
    return openpi_fixtures / "tiny_spm_tokenizer.model"


def test_discretize_state_golden(goldens):
    bins = discretize_state(goldens["discretize_state/state"])
    np.testing.assert_array_equal(bins, goldens["discretize_state/bins"])


def test_discretize_state_edges():
    # Bin edges are linspace(-1, 1, 257)[:-1]: below -1 gives -1, 1 and above give 255.
    np.testing.assert_array_equal(discretize_state(np.array([-1.01, -1.0, 0.0, 1.0, 7.0])), [-1, 0, 128, 255, 255])


def test_pi05_discrete_state_golden(goldens, tiny_model):
    tokenizer = PaligemmaTokenizer(tiny_model, max_len=64)
    tokens, mask = tokenizer.tokenize(GOLDEN_PROMPT, goldens["tokenizer/state"])
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    assert tokens.shape == mask.shape == (64,)
    np.testing.assert_array_equal(tokens, goldens["tokenizer/pi05_discrete_state_tokens"])
    np.testing.assert_array_equal(mask, goldens["tokenizer/pi05_discrete_state_mask"])


def test_no_state_golden(goldens, tiny_model):
    tokens, mask = PaligemmaTokenizer(tiny_model, max_len=64).tokenize(GOLDEN_PROMPT, None)
    np.testing.assert_array_equal(tokens, goldens["tokenizer/no_state_tokens"])
    np.testing.assert_array_equal(mask, goldens["tokenizer/no_state_mask"])


def test_truncation_golden_and_warning(goldens, tiny_model, caplog):
    tokenizer = PaligemmaTokenizer(tiny_model, max_len=8)
    with caplog.at_level(logging.WARNING, logger="faster_vla.policies.tokenizer"):
        tokens, mask = tokenizer.tokenize(GOLDEN_PROMPT, goldens["tokenizer/state"])
    np.testing.assert_array_equal(tokens, goldens["tokenizer/truncated_max8_tokens"])
    np.testing.assert_array_equal(mask, goldens["tokenizer/truncated_max8_mask"])
    assert any("exceeds max length (8)" in r.getMessage() for r in caplog.records)


def test_exact_fit_does_not_warn(goldens, tiny_model, caplog):
    n = int(goldens["tokenizer/no_state_mask"].sum())
    with caplog.at_level(logging.WARNING, logger="faster_vla.policies.tokenizer"):
        tokens, mask = PaligemmaTokenizer(tiny_model, max_len=n).tokenize(GOLDEN_PROMPT)
    assert mask.all() and not caplog.records
    np.testing.assert_array_equal(tokens, goldens["tokenizer/no_state_tokens"][:n])


def test_clean_prompt_keeps_case():
    assert clean_prompt("  Put_the BOWL\non the plate \n") == "Put the BOWL on the plate"


def test_state_text_changes_tokens(tiny_model):
    tokenizer = PaligemmaTokenizer(tiny_model, max_len=64)
    a, _ = tokenizer.tokenize("pick", np.array([0.0, 0.5]))
    b, _ = tokenizer.tokenize("pick", np.array([0.0, -0.5]))
    assert not np.array_equal(a, b)


def test_default_path_uses_openpi_data_home(tiny_model, tmp_path, monkeypatch, goldens):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    expected = tmp_path.resolve() / "big_vision" / "paligemma_tokenizer.model"
    assert default_tokenizer_path() == expected
    expected.parent.mkdir(parents=True)
    shutil.copy(tiny_model, expected)
    tokens, _ = PaligemmaTokenizer(max_len=64).tokenize(GOLDEN_PROMPT)
    np.testing.assert_array_equal(tokens, goldens["tokenizer/no_state_tokens"])


def test_default_path_falls_back_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENPI_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_tokenizer_path() == tmp_path.resolve() / ".cache/openpi/big_vision/paligemma_tokenizer.model"


def test_missing_default_file_says_where_it_looked_and_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        PaligemmaTokenizer()
    message = str(info.value)
    assert str(tmp_path.resolve() / "big_vision" / "paligemma_tokenizer.model") in message
    assert "gs://big_vision/paligemma_tokenizer.model" in message
    assert "explicit path" in message


def test_missing_explicit_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        PaligemmaTokenizer(missing)


def test_bad_inputs(tiny_model):
    tokenizer = PaligemmaTokenizer(tiny_model, max_len=16)
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.tokenize("pick", np.zeros((2, 8)))
    with pytest.raises(ValueError, match="must be a str"):
        tokenizer.tokenize(b"pick")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len"):
        PaligemmaTokenizer(tiny_model, max_len=0)
