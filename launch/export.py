"""`faster-vla export`: a fine-tuning run's checkpoint -> a self-contained policy bundle (see faster_vla.serving.bundle)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from faster_vla.serving.bundle import export_bundle


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Write a run's tuned policy as a bundle: openpi-layout actor params, critics, edit policy, norm stats,
    tokenizer, selection rule and provenance. Serve it with `faster-vla serve --bundle <out>`."""

    run_dir: Path
    """The fine-tuning run folder (what `faster-vla train --run-dir` wrote)."""
    out: Path
    """The bundle folder to write (atomically)."""
    checkpoint: Literal["best", "latest"] = "best"
    """Which checkpoint: best by eval success (falls back to latest), or latest."""
    force: bool = False
    """Replace an existing bundle at --out."""


def run_export(args: ExportArgs) -> Path:
    out = export_bundle(args.run_dir, args.out, checkpoint=args.checkpoint, force=args.force)
    print(f"exported {args.run_dir} ({args.checkpoint} checkpoint) to {out}")
    return out
