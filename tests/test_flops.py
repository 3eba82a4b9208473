"""The analytic compute model reproduces openpi's reference FLOPs and parameter counts exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from faster_vla.policies.config import PI05_LIBERO, TINY_A, Pi05Config, SiglipConfig
from faster_vla.policies.flops import (
    actor_flops,
    compute_loss_flops,
    denoise_flops,
    param_count,
    prefix_flops,
    sample_actions_flops,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "openpi_pi05"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared not found: golden fixtures come from the steering repo's shared/ folder"
)

PARTS = ("paligemma_llm", "action_expert", "siglip", "projections")

# Configurations for properties that must hold whatever the sizes.
SCALING_CONFIGS = [
    PI05_LIBERO,
    TINY_A,
    Pi05Config(
        paligemma_variant="gemma_300m",
        action_expert_variant="gemma_300m",
        action_dim=7,
        action_horizon=4,
        max_token_len=48,
        siglip=SiglipConfig(width=64, depth=2, mlp_dim=96, num_heads=4, patch_size=16, image_size=64),
    ),
]


def _reference() -> dict:
    return json.loads((FIXTURES / "pi05_libero_flops.json").read_text())


@needs_shared
@pytest.mark.parametrize(("block", "depth_override"), [("analytic", None), ("analytic_depth1", 1)])
def test_matches_reference_flops_exactly(block: str, depth_override: int | None) -> None:
    reference = _reference()[block]
    assert reference["depth_override"] == depth_override
    got = actor_flops(PI05_LIBERO, depth_override=depth_override).as_dict()
    for key, expected in reference.items():
        assert got[key] == expected, key


@needs_shared
def test_helpers_match_reference() -> None:
    reference = _reference()["analytic"]
    assert prefix_flops(PI05_LIBERO) == reference["prefix_total"]
    assert denoise_flops(PI05_LIBERO, num_candidates=1, num_steps=1) == reference["denoise_step_total"]
    assert sample_actions_flops(PI05_LIBERO) == reference["sample_actions_10_steps_total"]
    assert sample_actions_flops(PI05_LIBERO, num_steps=10) == reference["sample_actions_10_steps_total"]
    assert compute_loss_flops(PI05_LIBERO) == reference["compute_loss_forward_total"]


def _part_of(path: str) -> str:
    """openpi's split: PaliGemma/img → SigLIP, PaliGemma/llm `*_1` leaves → action expert."""
    if path.startswith("PaliGemma/img/"):
        return "siglip"
    if path.startswith("PaliGemma/llm/"):
        return "action_expert" if any(part.endswith("_1") for part in path.split("/")) else "paligemma_llm"
    return "projections"


def _sum_by_part(leaves: dict[str, int]) -> dict[str, int]:
    sums = dict.fromkeys(PARTS, 0)
    for path, numel in leaves.items():
        sums[_part_of(path)] += numel
    sums["total"] = sum(sums[part] for part in PARTS)
    return sums


@needs_shared
def test_param_count_matches_pi05_libero_tree() -> None:
    leaves: dict[str, int] = {}
    summary: dict[str, int] = {}
    for line in (FIXTURES / "pi05_libero_param_tree.txt").read_text().splitlines():
        if line.startswith("#"):
            match = re.match(r"#\s+(.+?):\s+([\d,]+)$", line)
            if match:
                summary[match.group(1)] = int(match.group(2).replace(",", ""))
            continue
        if not line.strip():
            continue
        path, shape, _dtype, numel = line.split("  ")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        assert math.prod(dims) == int(numel), path
        leaves[path] = int(numel)

    expected = _sum_by_part(leaves)
    assert param_count(PI05_LIBERO) == expected
    # The leaf sums agree with the file's own per-part summary.
    assert expected["total"] == summary["TOTAL"]
    assert expected["paligemma_llm"] == next(v for k, v in summary.items() if k.startswith("PaliGemma/llm (PaliGemma"))
    assert expected["action_expert"] == next(v for k, v in summary.items() if k.startswith("PaliGemma/llm *_1"))
    assert expected["siglip"] == next(v for k, v in summary.items() if k.startswith("PaliGemma/img"))
    assert expected["projections"] == next(v for k, v in summary.items() if k.startswith("projections"))


@needs_shared
def test_param_count_matches_tiny_a_params() -> None:
    with np.load(FIXTURES / "tiny_a_params.npz") as params:
        leaves = {key: int(params[key].size) for key in params.files}
    assert param_count(TINY_A) == _sum_by_part(leaves)


@pytest.mark.parametrize("config", SCALING_CONFIGS)
def test_denoise_linear_in_candidates_and_steps(config: Pi05Config) -> None:
    step = denoise_flops(config, num_candidates=1, num_steps=1)
    assert step == actor_flops(config).denoise_step_total > 0
    for n in (1, 2, 8):
        for steps in (1, 3, 10):
            assert denoise_flops(config, num_candidates=n, num_steps=steps) == n * steps * step


@pytest.mark.parametrize("config", SCALING_CONFIGS)
def test_shared_prefix_and_totals_compose(config: Pi05Config) -> None:
    flops = actor_flops(config)
    # The prefix is paid once: best-of-N adds only suffix work on top of it.
    best_of_8 = prefix_flops(config) + denoise_flops(config, num_candidates=8, num_steps=10)
    assert best_of_8 - sample_actions_flops(config, num_steps=10) == 7 * 10 * flops.denoise_step_total
    assert flops.prefix_total == flops.siglip_all_images + flops.paligemma_llm_prefix
    assert flops.siglip_all_images == 3 * flops.siglip_per_image
    assert flops.denoise_step_total == sum(dataclasses.asdict(flops.denoise_step_breakdown).values())
    assert flops.sample_actions_10_steps_total == sample_actions_flops(config, num_steps=10)
    assert compute_loss_flops(config) == flops.prefix_total + flops.denoise_step_total
    assert flops.prefix_tokens == config.num_prefix_tokens
    assert flops.suffix_tokens == config.action_horizon


@pytest.mark.parametrize("config", SCALING_CONFIGS)
def test_linear_in_batch(config: Pi05Config) -> None:
    one = actor_flops(config).as_dict()
    for batch in (2, 5):
        scaled = actor_flops(config, batch=batch).as_dict()
        for key in ("siglip_per_image", "siglip_all_images", "paligemma_llm_prefix", "prefix_total",
                    "denoise_step_total", "sample_actions_10_steps_total", "compute_loss_forward_total"):
            assert scaled[key] == batch * one[key], key
        for key, value in one["denoise_step_breakdown"].items():
            assert scaled["denoise_step_breakdown"][key] == batch * value, key
        assert prefix_flops(config, batch=batch) == batch * prefix_flops(config)
        assert compute_loss_flops(config, batch=batch) == batch * compute_loss_flops(config)
        assert sample_actions_flops(config, 4, batch=batch) == batch * sample_actions_flops(config, 4)
        assert denoise_flops(config, num_candidates=3, num_steps=2, batch=batch) == batch * denoise_flops(
            config, num_candidates=3, num_steps=2
        )


@pytest.mark.parametrize("config", SCALING_CONFIGS)
def test_affine_in_depth(config: Pi05Config) -> None:
    totals = [actor_flops(config, depth_override=d) for d in (1, 2, 3)]
    for key in ("prefix_total", "denoise_step_total"):
        a, b, c = (getattr(t, key) for t in totals)
        assert b - a == c - b > 0, key


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        denoise_flops(TINY_A, num_candidates=0, num_steps=10)
    with pytest.raises(ValueError):
        denoise_flops(TINY_A, num_candidates=2, num_steps=0)
    with pytest.raises(ValueError):
        actor_flops(TINY_A, batch=0)
    with pytest.raises(ValueError):
        actor_flops(TINY_A, depth_override=0)
