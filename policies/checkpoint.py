"""Reads and writes π0.5 parameters in openpi's checkpoint layouts, with strict shape validation.

Layouts (see ../shared/spec/pi05.md, "Checkpoint layouts"):

- release: `<ckpt>/params` is an orbax PyTree checkpoint holding `{"params": <nested dict>}` whose leaf
  paths are nnx "pure dict" paths such as `PaliGemma/llm/layers/attn/q_einsum_1/w`;
- training: `<run>/<step>/params` is the same item written by an orbax CheckpointManager from an
  `nnx.State`, so every leaf path ends in `value`; that suffix is stripped on restore (as openpi does).

`restore_params` accepts `<ckpt>`, `<run>/<step>`, the `params` folder itself, or a `gs://` URL of any of
them (downloaded into openpi's cache by `download.maybe_download`). The layout is decided from the files
orbax writes (`_METADATA`, the tree metadata) before any array is read, and so is the shape check against
the model (`expected=`): a checkpoint that does not fit fails in about a second, whatever its size, and no
error ever leaves a partly restored tree behind.

Memory: at pi05_libero size the float32 params are 13.4 GB, so a restore must never hold two copies.
Leaves are restored directly as `jax.Array`s on one device (the first CPU device unless `sharding` says
otherwise) through orbax `ArrayRestoreArgs` with a single-device sharding: no numpy tree is built and then
converted. Orbax reads a leaf into a host staging buffer and copies it into the device array (JAX on CPU
does not alias numpy buffers that are not 64-byte aligned, and orbax's are not), and by default it reads
every leaf concurrently, so one `restore` call for the whole tree can stage many leaves at once. Here the
leaves are restored in sequential groups (`partial_restore`; small leaves packed up to 64 MiB, big leaves
alone), waiting for each group's device copies before the next, so at most about one leaf is staged at a
time: peak ≈ checkpoint + largest leaf + ~130 MB of tensorstore caches (pi05_libero float32: about
13.4 + 4.8 GB, where its largest leaf is the 4.8 GB LLM `gating_einsum`). Measured (VmHWM growth of a fresh
process, 2-core CPU): 1024 MiB in 8 leaves → +1282 MiB (one whole-tree orbax call: +1489..1516 MiB;
restore to numpy then `jnp.asarray` the tree: +2086 MiB); 3072 MiB in 23 leaves → +3331 MiB (one call:
+3546..3651 MiB). Speed is the same as one call. `save_params` caps orbax's in-flight bytes near the
largest leaf for the same reason.

Why one file of ~470 lines: openpi's two checkpoint layouts, the metadata-first shape check and the
atomic writer are one compatibility contract with openpi's code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import download

PARAMS_ITEM = "params"  # the folder of the params item, and the single top-level key inside it
TRAINING_SUFFIX = "value"  # nnx.State leaf suffix in training checkpoints
_METADATA_FILE = "_METADATA"  # orbax PyTree checkpoint tree metadata (written by orbax >= 0.5)
_CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"

ACCEPTED_LAYOUTS = (
    "accepted layouts: a release checkpoint folder <ckpt> holding params/ (orbax PyTree checkpoint of "
    "{'params': nested dict}); a training step folder <run>/<step> holding params/ (leaf paths ending in "
    "'value'); either params/ folder itself; or a gs:// URL of any of these"
)


class CheckpointError(ValueError):
    """A path is not a π0.5 params checkpoint in one of openpi's layouts, or cannot be used as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointMismatchError(CheckpointError):
    """Parameters do not fit the expected tree; lists every missing, unexpected and mis-shaped path.

    Attributes (all '/'-joined paths, sorted): `missing` (expected, absent), `unexpected` (present, not
    expected), `mismatched` (path, expected shape, found shape).
    """

    def __init__(
        self,
        missing: list[tuple[str, tuple[int, ...]]],
        unexpected: list[tuple[str, tuple[int, ...]]],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        *,
        source: str = "params",
    ) -> None:
        self.missing = [path for path, _ in missing]
        self.unexpected = [path for path, _ in unexpected]
        self.mismatched = mismatched
        count = len(missing) + len(unexpected) + len(mismatched)
        lines = [f"{source}: parameters do not match the expected tree ({count} problem{'s' * (count != 1)}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}; expected, not found):")
            lines += [f"    {path}: expected {_fmt(shape)}" for path, shape in missing]
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}; found, not expected):")
            lines += [f"    {path}: found {_fmt(shape)}" for path, shape in unexpected]
        if mismatched:
            lines.append(f"  wrong shape ({len(mismatched)}):")
            lines += [f"    {path}: expected {_fmt(exp)} found {_fmt(got)}" for path, exp, got in mismatched]
        super().__init__("\n".join(lines))


def _fmt(shape: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in shape))


# --------------------------------------------------------------------------------------------------------
# Trees


def flatten_params(tree: Any) -> dict[str, Any]:
    """Nested dict (or nnx.State) → {'a/b/c': leaf}. Keys are joined with '/' in insertion order."""
    if hasattr(tree, "to_pure_dict"):
        tree = tree.to_pure_dict()
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            if not node and prefix:
                return  # empty sub-dicts hold no parameters
            for key, value in node.items():
                visit(value, (*prefix, str(key)))
        else:
            flat["/".join(prefix)] = node

    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested dict of arrays, got {type(tree).__name__}")
    visit(tree, ())
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} → nested dict (inverse of `flatten_params`)."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


def _shapes(tree: Any, what: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, leaf in flatten_params(tree).items():
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise TypeError(f"{what} leaf {path!r} has no shape (got {type(leaf).__name__})")
        shapes[path] = tuple(int(d) for d in shape)
    return shapes


def compare_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *, source: str = "params"
) -> None:
    """Raises CheckpointMismatchError listing every difference between two flat {path: shape} maps."""
    missing = [(p, expected[p]) for p in sorted(expected.keys() - found.keys())]
    unexpected = [(p, found[p]) for p in sorted(found.keys() - expected.keys())]
    mismatched = [
        (p, tuple(expected[p]), tuple(found[p]))
        for p in sorted(expected.keys() & found.keys())
        if tuple(expected[p]) != tuple(found[p])
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source=source)


def validate_params(params: Any, expected: Any) -> None:
    """Checks that `params` has exactly the paths and shapes of `expected` (dtypes may differ).

    Args:
        params: nested dict (or nnx.State) of arrays.
        expected: nested dict (or nnx.State) of anything with a `.shape`, e.g. `jax.ShapeDtypeStruct`s from
            `jax.eval_shape`/`nnx.eval_shape`.

    Raises:
        CheckpointMismatchError: listing all missing, unexpected and mis-shaped paths at once.
    """
    compare_shapes(_shapes(params, "params"), _shapes(expected, "expected"))


# --------------------------------------------------------------------------------------------------------
# Orbax plumbing


class _DropOrbaxInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        # orbax >= 0.12 warns on every training-layout read: CheckpointManager writes _CHECKPOINT_METADATA
        # into the step folder, not into its params/ item, which is how openpi's checkpoints look.
        return _CHECKPOINT_METADATA_FILE not in record.getMessage()


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Drops orbax's INFO records (dozens per save/restore) while we call it; real warnings still pass."""
    absl_logger = logging.getLogger("absl")
    log_filter = _DropOrbaxInfo()
    absl_logger.addFilter(log_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(log_filter)


def checkpoint_manager(directory: Any, options: Any, **kwargs: Any) -> Any:
    """The one way we open an orbax `CheckpointManager` (run checkpoints, the pretraining trainer): built with
    orbax's INFO records dropped; `kwargs` (item_names, item_handlers) go to the manager. Use `quiet_orbax()`
    around its save/restore calls too."""
    ocp = _ocp()
    with quiet_orbax():
        return ocp.CheckpointManager(directory, options=options, **kwargs)


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only needed for actual checkpoint I/O

    return ocp


def _is_item_dir(path: Path) -> bool:
    return (path / _METADATA_FILE).is_file()


def _list_dir(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "an empty folder"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "entries " + ", ".join(names[:limit]) + more


def resolve_params_dir(path: str | os.PathLike[str]) -> Path:
    """The `params` item folder for any accepted location (downloading gs:// URLs first)."""
    if download.is_remote(path):
        path = download.maybe_download(str(path))
    path = Path(path).expanduser().absolute()  # orbax reads no metadata from a relative path
    if not path.exists():
        raise CheckpointNotFoundError(f"Checkpoint path {str(path)!r} does not exist; {ACCEPTED_LAYOUTS}")
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint path {str(path)!r} is a file, not a folder; {ACCEPTED_LAYOUTS}")
    if _is_item_dir(path):
        return path
    if _is_item_dir(path / PARAMS_ITEM):
        return path / PARAMS_ITEM
    steps = sorted(
        (p.name for p in path.iterdir() if p.name.isdigit() and _is_item_dir(p / PARAMS_ITEM)), key=int
    )
    if steps:
        raise CheckpointError(
            f"{str(path)!r} looks like a training run folder with steps {steps}; pass one step folder, "
            f"e.g. {str(path / steps[-1])!r}"
        )
    if (path / PARAMS_ITEM).is_dir():
        found = f"a params/ folder without orbax's {_METADATA_FILE} ({_list_dir(path / PARAMS_ITEM)})"
    else:
        found = _list_dir(path)
    raise CheckpointError(f"{str(path)!r} is not an orbax params checkpoint: found {found}; {ACCEPTED_LAYOUTS}")


class _Layout:
    """What the orbax tree metadata of a params item says: raw leaf paths, and whether to strip 'value'."""

    def __init__(self, item_dir: Path, tree: Mapping[str, Any]):
        self.item_dir = item_dir
        self.tree = tree  # raw metadata tree, {"params": {... ArrayMetadata}}
        keys = sorted(map(str, tree))
        if keys != [PARAMS_ITEM]:
            raise CheckpointError(
                f"{str(item_dir)!r} is an orbax checkpoint but holds top-level keys {keys} instead of only "
                f"'{PARAMS_ITEM}' (a train_state or other item?); {ACCEPTED_LAYOUTS}"
            )
        raw = flatten_params(tree[PARAMS_ITEM])
        not_arrays = [p for p, leaf in raw.items() if getattr(leaf, "shape", None) is None]
        if not raw or not_arrays:
            detail = f"non-array leaves {not_arrays[:5]}" if not_arrays else "no leaves"
            raise CheckpointError(f"{str(item_dir)!r} holds {detail}; a params checkpoint holds only arrays")
        # openpi's rule: a training checkpoint (nnx.State) has every path ending in 'value'.
        self.training = all(p.rsplit("/", 1)[-1] == TRAINING_SUFFIX and "/" in p for p in raw)
        self.raw = raw  # stored '/'-joined path (without the top-level 'params') -> ArrayMetadata
        self.leaves = {self.clean(p): leaf for p, leaf in raw.items()}

    def clean(self, raw_path: str) -> str:
        return raw_path[: -len(TRAINING_SUFFIX) - 1] if self.training else raw_path

    @property
    def name(self) -> str:
        return "training (nnx.State, '/value' leaves)" if self.training else "release"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p: tuple(int(d) for d in leaf.shape) for p, leaf in self.leaves.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {p: np.dtype(leaf.dtype) for p, leaf in self.leaves.items()}


def _read_layout(path: str | os.PathLike[str]) -> _Layout:
    item_dir = resolve_params_dir(path)
    ocp = _ocp()
    try:
        with quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(item_dir)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
        raise CheckpointError(f"Cannot read orbax metadata of {str(item_dir)!r}: {type(e).__name__}: {e}") from e
    # orbax >= 0.12 returns StepMetadata(item_metadata=TreeMetadata(tree=...)); older versions the tree itself.
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{str(item_dir)!r} holds a {type(tree).__name__}, not a dict tree")
    return _Layout(item_dir, tree)


def read_param_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of a params checkpoint, from orbax metadata only (no array data is read).

    Accepts the same locations as `restore_params`; training-layout '/value' suffixes are stripped.
    """
    return _read_layout(path).shapes()


def read_param_dtypes(path: str | os.PathLike[str]) -> dict[str, np.dtype]:
    """{'/'-joined path: stored dtype}, from orbax metadata only."""
    return _read_layout(path).dtypes()


def checkpoint_layout(path: str | os.PathLike[str]) -> str:
    """'release' or 'training' for an accepted checkpoint location (raises CheckpointError otherwise)."""
    return "training" if _read_layout(path).training else "release"


def _inflight_cap_gb(largest_leaf_bytes: int) -> float:
    """Orbax's save cap on bytes in flight (`save_concurrent_gb`), just above the largest leaf.

    Orbax rejects a leaf larger than the cap (it counts the exact host bytes of each leaf when writing);
    anything above it only lets more leaves be staged at once. Measured: saving 1.5 GiB of jax.Arrays took
    +1418 MiB transient with orbax's default cap and +593 MiB with this one. A float is fine: orbax
    multiplies it by 1e9 and compares bytes.
    """
    return largest_leaf_bytes * 1.05 / 1e9 + 1e-3


def restore_params(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    expected: Any = None,
    sharding: jax.sharding.Sharding | None = None,
) -> dict[str, Any]:
    """Restores π0.5 params as a nested dict of `jax.Array`s in openpi's pure-dict layout.

    Args:
        path: `<ckpt>`, `<run>/<step>`, a `params` item folder, or a `gs://` URL of one of them.
        dtype: cast every leaf to this dtype while reading; None keeps the stored dtype (bf16 stays bf16).
        expected: optional nested dict of `jax.ShapeDtypeStruct` (or arrays); paths and shapes are checked
            against the checkpoint's metadata before any array data is read.
        sharding: where to place the leaves; default the first CPU device.

    Raises:
        CheckpointNotFoundError, CheckpointError, CheckpointMismatchError, download.DownloadError.
    """
    layout = _read_layout(path)
    if expected is not None:
        compare_shapes(layout.shapes(), _shapes(expected, "expected"), source=f"Checkpoint {str(layout.item_dir)!r}")
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    if dtype is not None:
        dtype = np.dtype(dtype)
    ocp = _ocp()
    restored: dict[str, Any] = {}
    part: dict[str, Any] = {}
    try:
        # No restore_concurrent_gb: the groups already bound what is in flight, and orbax's read estimate
        # rounds up to whole chunks, so a cap near the largest leaf could reject a leaf with ragged chunks.
        with quiet_orbax(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            for group in _restore_groups(layout):
                item = {PARAMS_ITEM: unflatten_params({p: layout.raw[p] for p, _ in group})}
                restore_args = jax.tree.map(
                    lambda _: ocp.ArrayRestoreArgs(sharding=sharding, restore_type=jax.Array, dtype=dtype), item
                )
                args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
                part = flatten_params(checkpointer.restore(layout.item_dir, args=args)[PARAMS_ITEM])
                if sorted(part) != sorted(p for p, _ in group):
                    raise CheckpointError(f"orbax returned {sorted(part)} for {sorted(p for p, _ in group)}")
                # Wait for the host-to-device copies so that this group's staging buffers are freed before
                # the next group is read.
                jax.block_until_ready(list(part.values()))
                restored.update(part)
    except Exception as e:  # noqa: BLE001
        restored.clear()  # never hand out, or keep alive through the traceback, a partly restored tree
        part.clear()
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"Failed to restore {layout.name} params from {str(layout.item_dir)!r}: {type(e).__name__}: {e}"
        ) from e
    return unflatten_params({layout.clean(p): restored[p] for p in layout.raw})


_GROUP_BYTES = 64 * 2**20


def _restore_groups(layout: _Layout) -> list[list[tuple[str, int]]]:
    """Leaves (stored path, bytes) in checkpoint order, restored one orbax call per group: small leaves are
    packed into groups of up to 64 MiB (fewer calls), any larger leaf is a group of its own. Measured, this
    keeps the transient memory of a restore at about one leaf (see the module docstring)."""
    # 64 MiB: small enough not to matter next to pi05's big leaves, large enough that the ~100 small leaves
    # (norms, biases) take a handful of orbax calls.
    groups: list[list[tuple[str, int]]] = [[]]
    total = 0
    for path, leaf in layout.raw.items():
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if groups[-1] and total + nbytes > _GROUP_BYTES:
            groups.append([])
            total = 0
        groups[-1].append((path, nbytes))
        total += nbytes
    return groups


def save_params(path: str | os.PathLike[str], params: Any, *, force: bool = False) -> Path:
    """Writes `params` in openpi's release layout: `<path>/params`, an orbax PyTree checkpoint of
    `{"params": params}` (OCDBT, zarr v2 — what openpi's writer produces), readable by openpi's
    `restore_params` and by a plain `orbax.checkpoint.PyTreeCheckpointer().restore(<path>/params)`.

    The checkpoint is written into a hidden temporary sibling of `path`, checked, and only then moved to
    `path`, so `path` never holds a partial checkpoint. An existing `path` is refused unless `force`, in
    which case it is replaced in one step (see `download.move_into_place`). Dtypes are kept (bf16 stays
    bf16). Every leaf is written as a jax.Array, as openpi's writer does: jax.Array leaves cost no copy (the
    transient memory is about twice the largest leaf); numpy leaves are copied to the CPU device first
    (orbax's numpy path ignores the in-flight cap and measured ~2x the whole tree transient).

    Returns the `<path>` folder.
    """
    if download.is_remote(path):
        raise CheckpointError(f"save_params writes local folders only, got {path!r}")
    path = Path(path).expanduser().absolute()
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    if hasattr(params, "to_pure_dict"):
        params = params.to_pure_dict()
    flat = flatten_params(params)
    bad = [p for p, leaf in flat.items() if not isinstance(leaf, jax.Array | np.ndarray)]
    if not flat or bad:
        raise TypeError(f"params must be a non-empty nested dict of arrays; non-array leaves: {bad[:5]}")
    if all(p.rsplit("/", 1)[-1] == TRAINING_SUFFIX for p in flat):
        raise CheckpointError("params leaves all end in 'value': pass a pure dict (nnx.State.to_pure_dict())")
    shapes = _shapes(flat, "params")
    cpu = jax.devices("cpu")[0]
    flat = {p: leaf if isinstance(leaf, jax.Array) else jax.device_put(leaf, cpu) for p, leaf in flat.items()}
    cap = _inflight_cap_gb(max(leaf.nbytes for leaf in flat.values()))

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        staged = work / path.name
        staged.mkdir()
        ocp = _ocp()
        with quiet_orbax(), ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(save_concurrent_gb=cap, save_device_host_concurrent_gb=cap)
        ) as checkpointer:
            checkpointer.save(staged / PARAMS_ITEM, args=ocp.args.PyTreeSave({PARAMS_ITEM: unflatten_params(flat)}))
        written = _read_layout(staged)
        if written.training:
            raise CheckpointError(f"wrote a checkpoint that reads as the training layout: {staged}")
        compare_shapes(written.shapes(), shapes, source=f"Written checkpoint {str(staged)!r}")
        download.move_into_place(staged, path, replace=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
