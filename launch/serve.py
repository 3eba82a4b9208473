"""`faster-vla serve`: serve a π0.5 LIBERO policy over openpi's websocket protocol.

openpi's clients (`openpi_client.websocket_client_policy.WebsocketClientPolicy`, e.g. openpi's LIBERO
example) connect to it unchanged; the protocol and the `"noise"` extension are described in
`faster_vla.serving.server`.

Policy sources, one at a time:
- `--actor.*` (an `ActorSource`, as `train` and `eval` take it): by default the small π0.5 (`pi05_small`,
  random weights from `--actor.seed`, the shipped LIBERO tokenizer, unit norm stats), which exercises the
  whole path on any CPU; or an openpi checkpoint (`--actor.preset pi05_libero`, openpi's release by default,
  or `--actor.checkpoint` a local folder or gs:// URL) with its LIBERO norm stats and the PaliGemma tokenizer;
- `--bundle`: an exported policy bundle (`faster-vla export`), loaded by `faster_vla.serving.bundle.load_policy`: it
  acts with the run's selection rule, and clients may add `num_candidates`, `selection` and `return_scores`.

`--max-batch` lets concurrent clients share one batched policy call (see `faster_vla.serving.server`); every batch
size the server can run at is compiled before it listens.

Every argument is checked (paths exist, port free) before any weight is read or compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import numpy as np

from faster_vla import checkpoints
from faster_vla.serving import server as serving
from faster_vla.acting.actor_source import LIBERO_ASSETS, SHIPPED_TOKENIZER, ActorSource
from faster_vla.serving.bundle import load_policy, read_manifest
from faster_vla.launch.demo import libero_observation
from faster_vla.policies import download
from faster_vla.policies.checkpoint import resolve_params_dir
from faster_vla.policies.config import get_preset
from faster_vla.policies.normalize import NORM_STATS_FILENAME
from faster_vla.policies.policy import Policy, batch_buckets
from faster_vla.policies.tokenizer import default_tokenizer_path

logger = logging.getLogger(__name__)

API_KEY_ENV = "FASTER_VLA_API_KEY"
MAX_BATCH_LIMIT = 256


@dataclasses.dataclass(frozen=True)
class ServeArgs:
    """Serve a π0.5 LIBERO policy over openpi's websocket protocol (openpi_client's WebsocketClientPolicy)."""

    host: str = "0.0.0.0"
    """Interface to listen on (0.0.0.0: all; 127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port (openpi's default 8000; 0 picks a free one, printed at start)."""
    api_key: str | None = None
    """Clients must send 'Authorization: Api-Key <key>'. Default: $FASTER_VLA_API_KEY if set, else no check."""
    num_steps: int = 10
    """Euler denoising steps per request."""
    seed: int = 0
    """Seed of the policy's noise stream (requests without a 'noise' field draw from it)."""
    actor: ActorSource = ActorSource()
    """The π0.5 policy: --actor.preset, --actor.checkpoint, --actor.tokenizer, --actor.norm-stats, --actor.seed."""
    bundle: Path | None = None
    """Exported policy bundle (`faster-vla export`) to serve instead of --actor.*."""
    max_batch: int | None = None
    """Most waiting requests run in one batched policy call (1: one request at a time). Default: 1 on CPU,
    where π0.5 is compute-bound: a row of a batch of 4 is only 2-6 % cheaper than a lone request, and under
    4 clients batching cut requests/s to x0.74-0.80 (batches of 3 padded to 4; docs/benchmarks.md, Serving). 8 on a GPU/TPU, where one request leaves the device mostly idle (not yet measured here). Batch
    sizes are padded to powers of two, each compiled at start."""
    warmup: bool = True
    """Run inference (every batch size) before listening, so no client waits for compilation."""


def _tokenizer_location(actor: ActorSource) -> str:
    """The file `ActorSource.build` will read (its defaults), so a missing one fails before the weights load."""
    if actor.tokenizer is not None:
        return actor.tokenizer
    if actor.preset in SHIPPED_TOKENIZER:
        return str(checkpoints.path(SHIPPED_TOKENIZER[actor.preset]))
    return str(default_tokenizer_path())


def _check_actor(actor: ActorSource) -> None:
    """`ActorSource.check`, plus what it leaves to load time: checkpoint layout, default norm stats, tokenizer."""
    actor.check()
    ckpt = actor.checkpoint_path
    if ckpt is not None and not download.is_remote(ckpt):
        resolve_params_dir(ckpt)  # a folder that is no checkpoint fails here, naming the accepted layouts
        if actor.norm_stats is None:
            stats = Path(ckpt).expanduser() / LIBERO_ASSETS / NORM_STATS_FILENAME
            if not stats.is_file():
                raise FileNotFoundError(f"norm stats not found at {str(stats)!r} (where openpi keeps a LIBERO "
                                        "checkpoint's): pass --actor.norm-stats with openpi's norm_stats.json")
    tokenizer = _tokenizer_location(actor)
    if not download.is_remote(tokenizer) and not Path(tokenizer).expanduser().is_file():
        raise FileNotFoundError(f"tokenizer model not found at {tokenizer!r}: pass --actor.tokenizer (openpi "
                                "caches PaliGemma's under $OPENPI_DATA_HOME/big_vision/)")


def default_max_batch() -> int:
    """--max-batch when not given: 1 on CPU (batching buys nothing there), 8 on an accelerator backend."""
    return 1 if jax.default_backend() == "cpu" else 8


def check_args(args: ServeArgs) -> None:
    """Every cheap check, so a typo fails in a second rather than after loading weights."""
    if args.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {args.num_steps}")
    if args.max_batch is not None and not 1 <= args.max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"--max-batch must be in [1, {MAX_BATCH_LIMIT}], got {args.max_batch}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty (leave it out for no key check)")
    if args.bundle is not None:
        if args.actor != ActorSource():
            raise ValueError("--actor.* does not apply to --bundle: a bundle carries its own policy; pass one or "
                             "the other")
        if not args.bundle.expanduser().exists():
            raise FileNotFoundError(f"bundle not found at {str(args.bundle)!r}: pass an exported bundle with --bundle")
        read_manifest(args.bundle.expanduser())  # another version or no bundle: fails before loading
    else:
        _check_actor(args.actor)
    serving.check_port_free(args.host, args.port)


def build_policy(args: ServeArgs) -> serving.PolicyLike:
    """The policy `args` describe (weights loaded, not yet compiled); call `check_args` first for early errors."""
    if args.bundle is not None:
        policy = load_policy(args.bundle, seed=args.seed)
        policy.metadata.update({"server": "faster-vla", "env": "libero", "action_dim": 7,
                                "policy": f"bundle {args.bundle} ({policy.selection.rule})"})
        return policy
    actor = args.actor
    policy = actor.build(num_steps=args.num_steps, policy_seed=args.seed)
    config = get_preset(actor.preset)
    ckpt = actor.checkpoint_path
    # What a client learns on connect: enough to send well-shaped observations and noises.
    policy.metadata.update({
        "server": "faster-vla",
        "policy": f"{actor.preset} from {ckpt}" if ckpt else f"{actor.preset} (random weights, seed {actor.seed})",
        "env": "libero",
        "action_horizon": config.action_horizon,
        "action_dim": 7,  # LIBERO's robot actions; the model's own action_dim is padded
        "noise_shape": [config.action_horizon, config.action_dim],
        "num_steps": args.num_steps,
    })
    return policy


def warm_up(policy: serving.PolicyLike, max_batch: int = 1) -> None:
    """Inference on LIBERO-shaped observations at every batch size up to `max_batch` (`batch_buckets`), so
    compilation happens before the first client.

    A π0.5 `Policy` gets an explicit zero noise, which leaves its seeded noise stream untouched.
    """
    obs = libero_observation("warm up")
    for size in batch_buckets(max_batch):
        noise = {}
        if isinstance(policy, Policy):
            config = policy.actor.config
            noise = {"noise": np.zeros((size, config.action_horizon, config.action_dim), np.float32)}
        if size == 1:
            policy.infer(obs, **{k: v[0] for k, v in noise.items()})
        else:
            policy.infer_batch([obs] * size, **noise)


def run_serve(args: ServeArgs) -> None:
    """Checks the arguments, builds and warms up the policy, then serves until Ctrl-C or SIGTERM."""
    if args.api_key is None and os.environ.get(API_KEY_ENV):
        args = dataclasses.replace(args, api_key=os.environ[API_KEY_ENV])
    check_args(args)
    # Our progress at INFO, libraries from WARNING; ISO 8601 timestamps, request ids in the server's lines.
    serving.configure_logging(logging.INFO)
    if not serving.return_large_buffers_to_os():
        logger.info("not glibc: freed large buffers are returned to the OS as this C library's malloc decides")
    max_batch = default_max_batch() if args.max_batch is None else args.max_batch
    policy = build_policy(args)
    logger.info("serving %s", policy.metadata.get("policy", type(policy).__name__))
    if args.warmup:
        logger.info("warming up (compiling batch sizes %s) ...", batch_buckets(max_batch))
        warm_up(policy, max_batch)
    serving.serve(policy, args.host, args.port, api_key=args.api_key, max_batch=max_batch)
