"""Where a run's π0.5 policy comes from: one description shared by `train`, `eval`, `select-tasks` and `serve`.

An `ActorSource` names the architecture (a preset), the weights (an openpi checkpoint, local or gs://), the
tokenizer and the norm stats, with the defaults a user expects: `pi05_libero` resolves to openpi's released
checkpoint, its LIBERO norm stats and the PaliGemma tokenizer; `pi05_libero_small` to the small π0.5 that
ships in `checkpoints/pi05_libero_small` (pretrained on scripted LIBERO demonstrations, with its own norm
stats and tokenizer); `pi05_small` to random weights with unit norm stats (which exercise the whole
pipeline, not a skill). `checkpoint="random"` asks for seeded random weights for any small preset (e.g. to
pretrain from scratch). `check()` validates everything local before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from faster_vla import checkpoints
from faster_vla.policies import download
from faster_vla.policies.config import PRESETS, get_preset
from faster_vla.policies.checkpoint import save_params
from faster_vla.policies.normalize import NormStats, load_norm_stats, save_norm_stats
from faster_vla.policies.pi05 import Pi05Actor, init_params, load_openpi
from faster_vla.policies.policy import Policy, make_libero_policy
from faster_vla.policies.tokenizer import PaligemmaTokenizer

RELEASED = {"pi05_libero": "gs://openpi-assets/checkpoints/pi05_libero"}
LIBERO_ASSETS = "assets/physical-intelligence/libero"  # openpi's norm stats inside a checkpoint
TOKENIZER_FILE = "tokenizer.model"  # a checkpoint's own tokenizer, when it carries one
SHIPPED_TOKENIZER = {"pi05_small": "pi05_small/tokenizer.model", "pi05_libero_small": "pi05_small/tokenizer.model"}
SHIPPED_CHECKPOINT = {"pi05_libero_small": "pi05_libero_small"}  # inside faster_vla.checkpoints
RANDOM_WEIGHTS = "random"  # --actor.checkpoint random: seeded random weights, whatever the preset's default


@dataclasses.dataclass(frozen=True)
class ActorSource:
    """The π0.5 policy: architecture preset, weights, tokenizer and norm stats (None = the preset's default)."""

    preset: str = "pi05_small"
    """Architecture: pi05_libero (openpi's 3.3B), pi05_libero_small (the built-in pretrained 6.4M, 112² images),
    pi05_small (6.5M, CPU) or tiny_a."""
    checkpoint: str | None = None
    """openpi checkpoint (folder holding params/, or gs://...), or "random" (seeded random weights). None: openpi's
    release for pi05_libero, the shipped pretrained one for pi05_libero_small, random weights otherwise."""
    tokenizer: str | None = None
    """sentencepiece model path or gs:// URL. None: the shipped one for the small presets, else PaliGemma's (openpi
    cache)."""
    norm_stats: str | None = None
    """norm_stats.json or its folder. None: <checkpoint>/assets/physical-intelligence/libero when there is a
    checkpoint, else unit statistics (random weights)."""
    seed: int = 0
    """Seed of random weights (when no checkpoint is used)."""

    @property
    def checkpoint_path(self) -> str | None:
        """Where the weights come from; None for random weights."""
        if self.checkpoint == RANDOM_WEIGHTS:
            return None
        if self.checkpoint is not None:
            return self.checkpoint
        if self.preset in SHIPPED_CHECKPOINT:
            return str(checkpoints.path(SHIPPED_CHECKPOINT[self.preset]))
        return RELEASED.get(self.preset)

    def check(self) -> None:
        """Raises a clear error for a wrong preset or a missing local file, before any weight is read."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown actor preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        ckpt = self.checkpoint_path
        if ckpt is not None and not download.is_remote(ckpt) and not Path(ckpt).expanduser().exists():
            raise FileNotFoundError(f"actor checkpoint {ckpt} does not exist: pass --actor.checkpoint with an openpi "
                                    "checkpoint folder (holding params/) or a gs:// URL")
        for name, value in (("tokenizer", self.tokenizer), ("norm_stats", self.norm_stats)):
            if value is not None and not download.is_remote(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"--actor.{name} {value} does not exist")
        if ckpt is None and self.preset == "pi05_libero":
            raise ValueError("pi05_libero needs real weights (3.3B random ones are no use); pass --actor.checkpoint "
                             "with an openpi checkpoint or leave it unset for openpi's release")

    def build(self, *, num_steps: int = 10, policy_seed: int = 0, trainable: bool = False,
              strict_prompts: bool = False) -> Policy:
        """Loads the actor and wraps it in openpi's LIBERO policy pipeline (`strict_prompts`: a prompt over
        max_token_len raises instead of being truncated, for servers)."""
        self.check()
        config = get_preset(self.preset)
        ckpt = self.checkpoint_path
        if ckpt is None:
            actor = Pi05Actor(config, init_params(config, self.seed), trainable=trainable)
        else:
            actor = load_openpi(config, ckpt, trainable=trainable)
        tokenizer = self._tokenizer(config.max_token_len)
        tokenizer.strict = strict_prompts
        return make_libero_policy(actor, tokenizer=tokenizer, norm_stats=self._norm_stats(),
                                  num_steps=num_steps, seed=policy_seed, metadata={"actor": dataclasses.asdict(self)})

    def _tokenizer(self, max_len: int) -> PaligemmaTokenizer:
        if self.tokenizer is not None:
            return PaligemmaTokenizer(self.tokenizer, max_len=max_len)
        if self.preset in SHIPPED_TOKENIZER:
            return PaligemmaTokenizer(checkpoints.path(SHIPPED_TOKENIZER[self.preset]), max_len=max_len)
        return PaligemmaTokenizer(None, max_len=max_len)

    def _norm_stats(self) -> dict[str, NormStats]:
        if self.norm_stats is not None:
            path = download.maybe_download(self.norm_stats) if download.is_remote(self.norm_stats) else self.norm_stats
            return load_norm_stats(path)
        ckpt = self.checkpoint_path
        if ckpt is None:
            return unit_norm_stats()
        if download.is_remote(ckpt):
            return load_norm_stats(download.maybe_download(f"{ckpt.rstrip('/')}/{LIBERO_ASSETS}"))
        return load_norm_stats(Path(ckpt).expanduser() / LIBERO_ASSETS)


def unit_norm_stats() -> dict[str, NormStats]:
    """Quantiles [-1, 1] for LIBERO's 8-D state and 7-D actions: normalisation is (almost) the identity."""
    def unit(dim: int) -> NormStats:
        return NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))

    return {"state": unit(8), "actions": unit(7)}


def save_policy(directory: Path, params: Any, norm_stats: Mapping[str, NormStats], *,
                tokenizer: str | Path | None = None) -> Path:
    """The one writer of a policy checkpoint in openpi's layout, which openpi and `ActorSource(checkpoint=...)`
    read: `<directory>/params`, `<directory>/assets/physical-intelligence/libero/norm_stats.json` and, when
    given, a local tokenizer copied to `<directory>/tokenizer.model`. `directory` must not exist yet: callers
    write into a staging folder and move it into place whole (bundles, pretraining exports)."""
    directory = Path(directory)
    save_params(directory, params)
    save_norm_stats(directory / LIBERO_ASSETS, norm_stats)
    if tokenizer is not None:
        shutil.copyfile(Path(tokenizer).expanduser(), directory / TOKENIZER_FILE)
    return directory
