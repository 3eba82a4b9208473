"""Tuned policies leave the run as bundles; `load_policy` turns a bundle or an openpi checkpoint into a policy.

A bundle is an openpi checkpoint plus what FASTER acts with, so openpi's tools still read its actor:

    <bundle>/params/                                     the π0.5 actor, openpi's release layout
    <bundle>/assets/physical-intelligence/libero/        norm_stats.json, where openpi keeps LIBERO's
    <bundle>/critics/params/                             target Q^dn, target Q^a and the edit policy (orbax)
    <bundle>/tokenizer.model                             when the run's tokenizer is a local file (else referenced)
    <bundle>/faster_vla_bundle.json                      format version, actor preset, the run's config,
                                                         selection rule, provenance (run, episode, eval success)

`export_bundle` writes all of it into a temporary sibling and moves it into place in one step; an existing
bundle is replaced only with `force`. `load_policy(path)` returns a `TunedPolicy` for a bundle (acting with
the run's selection rule, greedily) or the base `Policy` for a plain openpi checkpoint; both have openpi's
`infer(obs) -> {"actions": [H, 7], ...}`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from faster_vla.acting.actor_source import TOKENIZER_FILE, ActorSource, save_policy
from faster_vla.acting.agent import Agent
from faster_vla.runs.config import TrainConfig, learner_config
from faster_vla.runs.loading import load_run, load_trained_actor
from faster_vla.rl.learner import Learner
from faster_vla.policies import download
from faster_vla.policies.checkpoint import restore_params, save_params
from faster_vla.policies.config import get_preset
from faster_vla.policies.policy import Policy, batch_bucket
from faster_vla.policies.validation import InvalidInputError, describe
from faster_vla.shared.jsonable import from_jsonable, to_jsonable
from faster_vla.rl.selection import RULES, SelectionConfig

BUNDLE_FILE = "faster_vla_bundle.json"
BUNDLE_FORMAT = "faster_vla.serving.bundle"
BUNDLE_VERSION = 1
MAX_CANDIDATES = 1024  # noise seeds per request: bounds a request's compute (N chunks' worth for best-of-N)


class BundleError(ValueError):
    """The folder is not a bundle this version reads, or a request does not fit it."""


def _version() -> str:
    try:
        return importlib.metadata.version("faster-vla")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_bundle(run_dir: str | Path, out: str | Path, *, checkpoint: Literal["best", "latest"] = "best",
                  force: bool = False) -> Path:
    """Writes the bundle of a fine-tuning run's best (or latest) checkpoint to `out`; returns `out`."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    config, learner, episode = load_run(Path(run_dir), checkpoint)
    eval_success = _eval_success(Path(run_dir), episode)
    policy = config.actor.build(num_steps=config.num_steps)
    load_trained_actor(Path(run_dir), config, episode, policy)  # a success_bc run exports its tuned actor
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.rmtree(tmp)  # save_params creates the folder itself and refuses an existing one
        local_tokenizer, tokenizer = _tokenizer(config.actor)
        save_policy(tmp, policy.actor.params, _norm_stats(policy), tokenizer=local_tokenizer)  # openpi's layout
        save_params(tmp / "critics", _acting_params(learner))
        manifest = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "actor": {"preset": config.actor.preset, "tokenizer": tokenizer, "num_steps": config.num_steps},
            "train_config": to_jsonable(dataclasses.replace(config, resume=False), strict=False),
            "selection": dataclasses.asdict(config.selection),
            "provenance": {"run_dir": str(Path(run_dir).resolve()), "episode": episode, "eval_success": eval_success,
                           "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "faster_vla": _version(), "jax": jax.__version__},
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        download.move_into_place(tmp, out, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _acting_params(learner: Learner) -> dict:
    """What acting reads: the target critics (pessimistic pairs) and the online edit policy."""
    return {"noise_critic": learner.noise_target, "chunk_critic": learner.chunk_target,
            "edit_policy": learner.edit_policy.params}


def _eval_success(run_dir: Path, episode: int) -> float | None:
    from faster_vla.runs.checkpoint import RunCheckpointer

    return RunCheckpointer(run_dir / "checkpoints").eval_success(episode)


def _norm_stats(policy: Policy) -> dict:
    """The norm stats the policy's transforms use (Normalize inside its input transform)."""
    for transform in getattr(policy.input_transform, "transforms", ()):
        if hasattr(transform, "norm_stats"):
            return dict(transform.norm_stats)
    raise BundleError("the policy has no Normalize transform to take norm stats from")


def _tokenizer(source: ActorSource) -> tuple[str | None, str | None]:
    """(a local tokenizer file the bundle carries, or None; the manifest's reference to the tokenizer): a local
    one is copied in as tokenizer.model, a remote or default one stays a reference (None: PaliGemma's
    tokenizer from openpi's cache)."""
    from faster_vla import checkpoints
    from faster_vla.acting.actor_source import SHIPPED_TOKENIZER

    path = source.tokenizer
    if path is None and source.preset in SHIPPED_TOKENIZER:
        path = str(checkpoints.path(SHIPPED_TOKENIZER[source.preset]))
    if path is None or download.is_remote(path):
        return None, path
    return path, TOKENIZER_FILE


# -- loading --------------------------------------------------------------------------------------------------


class TunedPolicy:
    """A bundle's π0.5 with its critics and edit policy, acting by the run's selection rule (greedy).

    `infer(obs, noise=None, num_candidates=None, selection=None, return_scores=False)`: openpi's LIBERO
    observation in, `actions` [H, 7] (un-normalised) and `policy_timing` out; `noise` [N, H, A_model] fixes the
    seed pool (caller-chosen seeds); `num_candidates` / `selection` (a rule name) override the bundle's per
    request; `return_scores` adds `seed_index`, `edited` and `noise_scores` [N]; `warnings` (list[str]) appears
    when the policy changed the request (a truncated prompt). Bad input raises `InvalidInputError` before any
    compute, a non-finite action `NonFiniteActionError` (`faster_vla.policies.validation`). `infer_batch` takes b
    observations with the same options through one encode and one denoise (`Agent.act_batch`).
    """

    def __init__(self, agent: Agent, learner: Learner, selection: SelectionConfig, metadata: Mapping[str, Any]) -> None:
        self.agent = agent
        self.learner = learner
        self.selection = selection
        self.metadata = dict(metadata)

    def infer(self, obs: Mapping[str, Any], *, noise: np.ndarray | None = None, num_candidates: int | None = None,
              selection: str | None = None, return_scores: bool = False) -> dict[str, Any]:
        return self.infer_batch([obs], noise=None if noise is None else np.asarray(noise)[None],
                                num_candidates=num_candidates, selection=selection, return_scores=return_scores)[0]

    def infer_batch(self, observations: Sequence[Mapping[str, Any]], *, noise: np.ndarray | None = None,
                    num_candidates: int | None = None, selection: str | None = None,
                    return_scores: bool = False) -> list[dict[str, Any]]:
        """b observations sharing one set of options -> b results, each what `infer` gives for its row.

        `noise` [b, N, H, A_model] (or [b, H, A_model] for N = 1) fixes each row's seed pool; without it row i
        draws the i-th key of the agent's stream, as the i-th of b `infer` calls would (acting is greedy, so only
        a filter schedule's random keep is shared by the batch; see `Agent.act_batch`). Rows are padded to
        `batch_bucket(b)`, so jit compiles one program per power of two.
        """
        # Options first (cheap); the observations and the noise's values are checked by `Agent.act_batch`
        # (`policies.validation`, the checks every entry point shares) before anything is computed.
        config = self.selection
        if selection is not None:
            if not isinstance(selection, str) or selection not in RULES:
                raise InvalidInputError("selection", f"one of {list(RULES)}", describe(selection))
            config = dataclasses.replace(config, rule=selection)
        if not isinstance(return_scores, (bool, np.bool_)):
            raise InvalidInputError("return_scores", "a bool", describe(return_scores))
        if num_candidates is not None and (isinstance(num_candidates, (bool, np.bool_))
                                           or not isinstance(num_candidates, (int, np.integer))
                                           or not 1 <= num_candidates <= MAX_CANDIDATES):
            raise InvalidInputError("num_candidates", f"an int in [1, {MAX_CANDIDATES}]", repr(num_candidates))
        if noise is not None:
            noise = np.asarray(noise)
            if noise.ndim == 3:
                noise = noise[:, None]
            shape = (self.agent.actor.config.action_horizon, self.agent.actor.config.action_dim)
            if noise.ndim != 4:
                raise InvalidInputError("noise", f"[N, {shape[0]}, {shape[1]}] (or [{shape[0]}, {shape[1]}] for one "
                                        "seed) per observation", f"shape {list(noise.shape[1:])} per observation")
            num_candidates = noise.shape[1] if num_candidates is None else num_candidates
            if noise.shape[1] != num_candidates:
                raise InvalidInputError("noise", f"num_candidates = {num_candidates} seeds",
                                        f"{noise.shape[1]} seeds (shape {list(noise.shape[1:])})")
        if num_candidates is not None:
            config = dataclasses.replace(config, num_candidates=int(num_candidates))
        decisions = self.agent.act_batch(self.learner, observations, selection=config, noise=noise,
                                         batch_size=batch_bucket(len(observations)))
        outs = []
        for decision in decisions:
            out: dict[str, Any] = {"actions": decision.actions, "policy_timing": decision.timing_ms}
            if decision.warnings:
                out["warnings"] = list(decision.warnings)
            if return_scores:
                out.update(seed_index=decision.seed_index, edited=decision.edited)
                if decision.noise_scores is not None:
                    out["noise_scores"] = decision.noise_scores
            outs.append(out)
        return outs


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's manifest, checked for format and version."""
    manifest_path = Path(path) / BUNDLE_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not a faster-vla bundle ({BUNDLE_FILE} unreadable: {exc})") from exc
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path} is not a faster-vla bundle manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path} is a version {manifest.get('version')} bundle; this faster-vla reads version "
                          f"{BUNDLE_VERSION}: re-export it with this version (`faster-vla export`)")
    return manifest


def load_policy(path: str | Path, *, preset: str = "pi05_libero", strict_prompts: bool = False,
                seed: int = 0) -> TunedPolicy | Policy:
    """A bundle -> `TunedPolicy`; a plain openpi checkpoint (folder with params/) -> the base `Policy`.

    `preset` names the architecture of a plain checkpoint (a bundle records its own). A prompt longer than the
    model's max_token_len is truncated as openpi does, and the result's `warnings` say so; with
    `strict_prompts` it is an error instead.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a bundle from `faster-vla export` or an openpi "
                                "checkpoint folder")
    if not (path / BUNDLE_FILE).exists():
        return ActorSource(preset, checkpoint=str(path)).build(policy_seed=seed, strict_prompts=strict_prompts)
    manifest = read_manifest(path)
    config = from_jsonable(TrainConfig, manifest["train_config"])
    tokenizer = manifest["actor"]["tokenizer"]
    if tokenizer is not None and not download.is_remote(tokenizer):
        tokenizer = str(path / tokenizer)
    source = ActorSource(manifest["actor"]["preset"], checkpoint=str(path), tokenizer=tokenizer)
    policy = source.build(num_steps=manifest["actor"]["num_steps"], policy_seed=seed, strict_prompts=strict_prompts)
    lconfig = learner_config(config, get_preset(source.preset))
    learner = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=0)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _acting_params(learner))
    params = restore_params(path / "critics", expected=shapes)
    learner = learner.replace(noise_target=params["noise_critic"], chunk_target=params["chunk_critic"],
                              edit_policy=learner.edit_policy.replace(params=params["edit_policy"]))
    selection = dataclasses.replace(config.selection, temperature=0.0)
    agent = Agent(policy, lconfig, num_steps=manifest["actor"]["num_steps"], seed=seed)
    metadata = {"bundle": str(path), "selection": dataclasses.asdict(selection), **manifest["provenance"],
                "action_horizon": policy.actor.config.action_horizon}
    return TunedPolicy(agent, learner, selection, metadata)
