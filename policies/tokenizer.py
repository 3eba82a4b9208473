"""PaliGemma prompt tokenisation exactly as openpi's `PaligemmaTokenizer` formats π0.5 prompts.

Two formats, chosen by whether a state is given:
- with state (π0.5 `discrete_state_input=True`): BOS + "Task: {prompt}, State: {bins};\\nAction: ", where the
  state (already normalised to [-1, 1]) is discretised into 256 bins;
- without state (pi05_libero): BOS + prompt, then "\\n" encoded separately as the start-of-answer token.
Tokens are right-padded with 0 (and mask False) or truncated to `max_len`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import sentencepiece

from faster_vla.policies import download

logger = logging.getLogger(__name__)

TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
_NUM_STATE_BINS = 256
# Left edges of the 256 bins on [-1, 1] (the right edge 1.0 itself is not an edge, as in openpi).
_STATE_BIN_EDGES = np.linspace(-1.0, 1.0, _NUM_STATE_BINS + 1)[:-1]


def default_tokenizer_path() -> Path:
    """Where openpi caches the PaliGemma tokenizer: $OPENPI_DATA_HOME/big_vision/paligemma_tokenizer.model."""
    return download.cache_path(TOKENIZER_URL)


def discretize_state(state: np.ndarray) -> np.ndarray:
    """state float[d] in [-1, 1] -> int64[d] bins in [0, 255]; values below -1 give -1, like openpi."""
    return np.digitize(np.asarray(state), bins=_STATE_BIN_EDGES) - 1


def clean_prompt(prompt: str) -> str:
    """openpi's prompt cleaning: strip, then '_' and newlines become spaces (case is kept)."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


class PaligemmaTokenizer:
    """Sentencepiece PaliGemma tokenizer producing fixed-length (tokens, mask) pairs for π0.5."""

    def __init__(self, path: str | Path | None = None, max_len: int = 200, *, strict: bool = False) -> None:
        """`path`: a local sentencepiece model, a gs:// URL (downloaded into openpi's cache), or None for the
        cached PaliGemma tokenizer. `strict`: a prompt longer than max_len raises instead of being truncated
        with a warning (openpi's behaviour); servers use it so a client learns its prompt was cut."""
        self.strict = strict
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if path is not None and download.is_remote(path):
            path = download.maybe_download(str(path))  # e.g. gs://big_vision/paligemma_tokenizer.model
        model_path = Path(path).expanduser() if path is not None else default_tokenizer_path()
        if not model_path.is_file():
            raise FileNotFoundError(
                f"PaliGemma tokenizer model not found at {model_path}. It is {TOKENIZER_URL}, which openpi "
                f"downloads into {default_tokenizer_path()} ($OPENPI_DATA_HOME, default ~/.cache/openpi); "
                "copy it there or pass an explicit path."
            )
        self._path = model_path
        self._max_len = max_len
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_path.read_bytes())

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def path(self) -> Path:
        return self._path

    def tokenize(self, prompt: str, state: np.ndarray | None = None, *,
                 warnings: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """prompt (+ optional normalised state float[d]) -> (tokens int32[max_len], mask bool[max_len]).

        A truncation is logged, as openpi does, and also appended to `warnings` when given, so a policy can
        hand it back to its caller (a server's client sees no server log)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt)
        if state is not None:
            state = np.asarray(state)
            if state.ndim != 1:
                raise ValueError(f"state must be 1-D (one observation), got shape {state.shape}")
            bins = " ".join(str(int(b)) for b in discretize_state(state))
            tokens = self._sp.encode(f"Task: {text}, State: {bins};\nAction: ", add_bos=True)
        else:
            tokens = self._sp.encode(text, add_bos=True) + self._sp.encode("\n")

        n = len(tokens)
        if n > self._max_len and self.strict:
            raise ValueError(f"the prompt is {n} tokens, more than the model's max_token_len {self._max_len}: "
                             f"shorten it (prompt: {prompt[:80]!r})")
        if n > self._max_len:
            logger.warning(
                "Token length (%d) exceeds max length (%d), truncating; consider a larger max_token_len.",
                n,
                self._max_len,
            )
            if warnings is not None:
                warnings.append(f"prompt: {n} tokens, more than the model's max_token_len {self._max_len}; "
                                f"truncated to the first {self._max_len} tokens, as openpi does")
            tokens = tokens[: self._max_len]
            n = self._max_len
        out_tokens = np.zeros(self._max_len, dtype=np.int32)
        out_tokens[:n] = tokens
        mask = np.zeros(self._max_len, dtype=bool)
        mask[:n] = True
        return out_tokens, mask


def train_tokenizer(sentences: list[str], output: str | Path, *, vocab_size: int = 512) -> Path:
    """Trains a small BPE sentencepiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3).

    For small π0.5 configurations (the PaliGemma tokenizer has 257,152 pieces and needs the 2B embedder).
    Sentences are cleaned as prompts are, so training and inference see the same text. Deterministic for
    a given input; the model is written to a temporary file and moved into place.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(sorted({clean_prompt(s) for s in sentences}))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        character_coverage=1.0,
        normalization_rule_name="identity",  # Gemma applies no Unicode normalisation; keeps the file small
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output)
    return output
