"""`faster-vla record-demos` and `faster-vla pretrain`: scripted LIBERO demonstrations and the small π0.5 they train."""

from __future__ import annotations

from pathlib import Path

from faster_vla.pretraining.demos import RecordConfig, record_demos
from faster_vla.pretraining.pretrain import PretrainConfig, pretrain


def run_record_demos(config: RecordConfig) -> dict:
    manifest = record_demos(config)
    print(f"wrote {config.output}" if config.render else f"scored the experts; manifest in {config.output}")
    return manifest


def run_pretrain(config: PretrainConfig) -> Path:
    return pretrain(config)
