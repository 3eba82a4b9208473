"""openpi checkpoint I/O: both fixture layouts, dtype handling, atomic writes, and strict shape validation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from faster_vla.policies import checkpoint as ckpt
from faster_vla.policies import download

RELEASE = "ckpt_tiny_a"
TRAINING = "ckpt_tiny_a_trainstyle/0"
# Every way of naming the two fixture checkpoints: <ckpt>, <ckpt>/params, <run>/<step>, <run>/<step>/params.
LOCATIONS = [RELEASE, f"{RELEASE}/params", TRAINING, f"{TRAINING}/params"]


@pytest.fixture(scope="module")
def ref(openpi_fixtures: Path) -> dict[str, np.ndarray]:
    with np.load(openpi_fixtures / "tiny_a_params.npz") as data:
        return dict(data)


def _expected(ref: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in ref.items()}


def _no_array_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any orbax restore (i.e. any read of array data) now fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("array data was read")

    monkeypatch.setattr(ocp.Checkpointer, "restore", forbidden)


def _siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


# ---------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("location", LOCATIONS)
def test_fixture_layouts_restore_exactly(openpi_fixtures: Path, ref, location: str) -> None:
    params = ckpt.restore_params(openpi_fixtures / location)
    flat = ckpt.flatten_params(params)
    assert sorted(flat) == sorted(ref)
    cpu = jax.devices("cpu")[0]
    for key, value in flat.items():
        assert isinstance(value, jax.Array) and value.devices() == {cpu}, key
        assert value.dtype == ref[key].dtype, key  # the stored dtype is kept
        np.testing.assert_array_equal(np.asarray(value), ref[key], err_msg=key)
    # Nested like openpi's pure dict, with no '/value' left over from the training layout.
    assert params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum_1"]["w"].shape == ref[
        "PaliGemma/llm/layers/attn/q_einsum_1/w"
    ].shape


@pytest.mark.parametrize("location", LOCATIONS)
def test_layout_detection_and_metadata_shapes(openpi_fixtures: Path, ref, location: str) -> None:
    expected_layout = "training" if location.startswith(TRAINING) else "release"
    assert ckpt.checkpoint_layout(openpi_fixtures / location) == expected_layout
    assert ckpt.read_param_shapes(openpi_fixtures / location) == {k: v.shape for k, v in ref.items()}
    assert ckpt.read_param_dtypes(openpi_fixtures / location) == {k: v.dtype for k, v in ref.items()}


def test_shapes_are_read_without_array_data(openpi_fixtures: Path, ref, monkeypatch) -> None:
    _no_array_reads(monkeypatch)
    assert ckpt.read_param_shapes(openpi_fixtures / RELEASE) == {k: v.shape for k, v in ref.items()}
    with pytest.raises(ckpt.CheckpointError, match="array data was read"):  # the guard itself works
        ckpt.restore_params(openpi_fixtures / RELEASE)


def test_restore_with_dtype_casts(openpi_fixtures: Path, ref) -> None:
    flat = ckpt.flatten_params(ckpt.restore_params(openpi_fixtures / TRAINING, dtype=jnp.bfloat16))
    for key, value in flat.items():
        assert value.dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(np.asarray(value), ref[key].astype(ml_dtypes.bfloat16), err_msg=key)


def test_restore_checks_expected_tree_first(openpi_fixtures: Path, ref) -> None:
    params = ckpt.restore_params(openpi_fixtures / RELEASE, expected=ckpt.unflatten_params(_expected(ref)))
    assert sorted(ckpt.flatten_params(params)) == sorted(ref)
    # dtype differences are allowed: only paths and shapes are checked.
    bf16 = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16) for k, v in ref.items()}
    ckpt.restore_params(openpi_fixtures / TRAINING, expected=ckpt.unflatten_params(bf16))


def test_restore_matches_the_model_tree(openpi_fixtures: Path) -> None:
    from faster_vla.policies import config, pi05

    expected = pi05.param_shapes(config.TINY_A)
    params = ckpt.restore_params(openpi_fixtures / RELEASE, expected=expected)
    ckpt.validate_params(params, expected)


def test_gs_url_restores_from_cache_without_network(openpi_fixtures: Path, ref, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(download, "_gcs_filesystem", lambda: pytest.fail("network used"))
    shutil.copytree(openpi_fixtures / RELEASE, tmp_path / "openpi-assets" / "checkpoints" / "tiny_a")
    params = ckpt.restore_params("gs://openpi-assets/checkpoints/tiny_a")
    np.testing.assert_array_equal(
        np.asarray(params["action_in_proj"]["kernel"]), ref["action_in_proj/kernel"]
    )


# ------------------------------------------------------------------------------------------- validation


def _altered_expected(ref) -> tuple[dict, dict[str, str]]:
    """An expected tree with 2 missing, 2 unexpected and 2 mis-shaped paths relative to the fixture."""
    expected = _expected(ref)
    keys = sorted(ref)
    dropped = keys[:2]  # in the checkpoint, not expected -> "unexpected"
    for key in dropped:
        del expected[key]
    added = ["PaliGemma/llm/extra/w", "action_out_proj/scale"]  # expected, not in checkpoint -> "missing"
    expected[added[0]] = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    expected[added[1]] = jax.ShapeDtypeStruct((7,), jnp.float32)
    reshaped = [k for k in keys[2:] if ref[k].ndim == 2][:2]
    lines = {}
    for key in reshaped:
        a, b = ref[key].shape
        expected[key] = jax.ShapeDtypeStruct((a + 1, b), jnp.float32)
        lines[key] = f"{key}: expected {(a + 1, b)} found {(a, b)}"
    for key in dropped:
        lines[key] = f"{key}: found {tuple(ref[key].shape)}"
    lines[added[0]] = f"{added[0]}: expected (3, 4)"
    lines[added[1]] = f"{added[1]}: expected (7,)"
    return ckpt.unflatten_params(expected), {"missing": added, "unexpected": dropped, "mismatched": reshaped, **lines}


def _check_mismatch(error: ckpt.CheckpointMismatchError, info: dict) -> None:
    message = str(error)
    assert "6 problems" in message
    assert error.missing == sorted(info["missing"])
    assert error.unexpected == sorted(info["unexpected"])
    assert [p for p, _, _ in error.mismatched] == sorted(info["mismatched"])
    for key in [*info["missing"], *info["unexpected"], *info["mismatched"]]:
        assert info[key] in message, (key, message)


def test_validate_params_lists_every_problem(ref) -> None:
    params = ckpt.unflatten_params({k: jnp.asarray(v) for k, v in ref.items()})
    ckpt.validate_params(params, ckpt.unflatten_params(_expected(ref)))  # exact match passes
    expected, info = _altered_expected(ref)
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.validate_params(params, expected)
    _check_mismatch(error.value, info)
    assert isinstance(error.value, ckpt.CheckpointError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("location", [RELEASE, TRAINING])
def test_restore_mismatch_fails_before_reading_data(openpi_fixtures: Path, ref, location, monkeypatch) -> None:
    expected, info = _altered_expected(ref)
    _no_array_reads(monkeypatch)
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.restore_params(openpi_fixtures / location, expected=expected)
    _check_mismatch(error.value, info)
    assert str(openpi_fixtures / location) in str(error.value)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "mismatched"])
def test_each_kind_of_mismatch_alone(ref, kind: str) -> None:
    params = {k: jnp.asarray(v) for k, v in ref.items()}
    expected = _expected(ref)
    key = "action_in_proj/kernel"
    if kind == "missing":
        del params[key]
        text = f"{key}: expected {ref[key].shape}"
    elif kind == "unexpected":
        del expected[key]
        text = f"{key}: found {ref[key].shape}"
    else:
        expected[key] = jax.ShapeDtypeStruct(ref[key].shape[::-1] + (1,), jnp.float32)
        text = f"{key}: expected {ref[key].shape[::-1] + (1,)} found {ref[key].shape}"
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.validate_params(ckpt.unflatten_params(params), ckpt.unflatten_params(expected))
    assert "(1 problem)" in str(error.value) and text in str(error.value)
    assert getattr(error.value, kind) and all(
        not getattr(error.value, other) for other in ("missing", "unexpected", "mismatched") if other != kind
    )


# ------------------------------------------------------------------------------------------- bad paths


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointNotFoundError, match="does not exist") as error:
        ckpt.restore_params(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(error.value)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ckpt.CheckpointError)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"x")
    (tmp_path / "assets").mkdir()
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.restore_params(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "assets/" in message and "weights.npz" in message
    assert "accepted layouts" in message
    with pytest.raises(ckpt.CheckpointError, match="is a file"):
        ckpt.read_param_shapes(tmp_path / "weights.npz")
    (tmp_path / "params").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="params/ folder without orbax's _METADATA"):
        ckpt.restore_params(tmp_path)


def test_run_folder_points_at_steps(openpi_fixtures: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match=r"training run folder with steps \['0'\]"):
        ckpt.restore_params(openpi_fixtures / "ckpt_tiny_a_trainstyle")


def test_other_orbax_item_is_rejected(tmp_path: Path) -> None:
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "train_state", args=ocp.args.PyTreeSave({"opt_state": {"mu": np.zeros(3)}}))
    with pytest.raises(ckpt.CheckpointError, match=r"top-level keys \['opt_state'\]"):
        ckpt.restore_params(tmp_path / "train_state")


# ------------------------------------------------------------------------------------------------ save


def test_save_restore_round_trip(ref, tmp_path: Path) -> None:
    out = ckpt.save_params(tmp_path / "ckpt", ckpt.unflatten_params(ref))  # numpy leaves
    assert out == tmp_path / "ckpt"
    assert ckpt.checkpoint_layout(out) == "release"
    flat = ckpt.flatten_params(ckpt.restore_params(out))
    assert sorted(flat) == sorted(ref)
    for key, value in flat.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(value), ref[key], err_msg=key)
    assert _siblings(out) == ["ckpt"]  # no temporary folder left behind


def test_restore_from_a_relative_path(ref, tmp_path: Path, monkeypatch) -> None:
    """`--actor.checkpoint runs/x/checkpoint` works: orbax finds no metadata under a relative path."""
    ckpt.save_params(tmp_path / "ckpt", ckpt.unflatten_params(ref))
    monkeypatch.chdir(tmp_path)
    assert sorted(ckpt.flatten_params(ckpt.restore_params("ckpt"))) == sorted(ref)


def test_saved_checkpoint_is_what_openpi_writes_and_reads(openpi_fixtures: Path, ref, tmp_path: Path) -> None:
    out = ckpt.save_params(tmp_path / "ckpt", ckpt.unflatten_params({k: jnp.asarray(v) for k, v in ref.items()}))
    ours, theirs = out / "params", openpi_fixtures / RELEASE / "params"
    # Same kind of checkpoint as openpi's writer: PyTree handler, OCDBT, zarr v2, jax.Array leaves.
    for name in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "ocdbt.process_0", "_sharding"):
        assert (ours / name).exists() and (theirs / name).exists(), name
    ours_meta, theirs_meta = (json.loads((p / "_METADATA").read_text()) for p in (ours, theirs))
    assert ours_meta["tree_metadata"].keys() == theirs_meta["tree_metadata"].keys()
    for key, entry in theirs_meta["tree_metadata"].items():
        assert ours_meta["tree_metadata"][key]["value_metadata"] == entry["value_metadata"], key
    assert ours_meta["use_zarr3"] is theirs_meta["use_zarr3"] is False
    handler = json.loads((ours / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert handler == json.loads((theirs / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    # openpi's restore_params: a plain PyTreeCheckpointer restore of <ckpt>/params holding {"params": ...}.
    with ocp.PyTreeCheckpointer() as checkpointer:
        item = checkpointer.metadata(ours).item_metadata.tree
        sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), item)
        restored = checkpointer.restore(ours, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    assert list(restored) == ["params"]
    flat = ckpt.flatten_params(restored["params"])
    for key, value in ref.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)


def test_bf16_round_trip(ref, tmp_path: Path) -> None:
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in ref.items()}
    bf16["numpy_leaf"] = ref["action_in_proj/kernel"].astype(ml_dtypes.bfloat16)  # numpy bf16 works too
    ckpt.save_params(tmp_path / "ckpt", ckpt.unflatten_params(bf16))
    assert set(ckpt.read_param_dtypes(tmp_path / "ckpt").values()) == {np.dtype(jnp.bfloat16)}
    flat = ckpt.flatten_params(ckpt.restore_params(tmp_path / "ckpt"))
    assert sorted(flat) == sorted(bf16)
    for key, value in flat.items():
        assert value.dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(bf16[key]), err_msg=key)
    as_f32 = ckpt.flatten_params(ckpt.restore_params(tmp_path / "ckpt", dtype=jnp.float32))
    assert {v.dtype for v in as_f32.values()} == {np.dtype(np.float32)}


def test_save_refuses_to_overwrite_unless_forced(ref, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    small = {"a": {"w": np.ones((2, 3), np.float32)}}
    ckpt.save_params(target, small)
    with pytest.raises(FileExistsError, match="force=True"):
        ckpt.save_params(target, {"a": {"w": np.zeros((2, 3), np.float32)}})
    np.testing.assert_array_equal(np.asarray(ckpt.restore_params(target)["a"]["w"]), small["a"]["w"])
    (tmp_path / "other").mkdir()  # any existing path is refused, not only checkpoints
    with pytest.raises(FileExistsError):
        ckpt.save_params(tmp_path / "other", small)
    ckpt.save_params(target, ckpt.unflatten_params(ref), force=True)
    assert ckpt.read_param_shapes(target) == {k: v.shape for k, v in ref.items()}
    assert _siblings(target) == ["ckpt", "other"]


@pytest.mark.parametrize("force", [False, True])
def test_failed_save_leaves_nothing_behind(ref, tmp_path: Path, monkeypatch, force: bool) -> None:
    target = tmp_path / "ckpt"
    old = {"old": np.ones(4, np.float32)}
    if force:
        ckpt.save_params(target, old)
    real_save = ocp.Checkpointer.save
    seen = []

    def save_then_crash(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the data is fully written into the temporary folder...
        seen.append(Path(directory))
        raise OSError("disk full (simulated)")  # ...and the save still fails

    monkeypatch.setattr(ocp.Checkpointer, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_params(target, ckpt.unflatten_params(ref), force=force)
    assert seen and not seen[0].exists()  # the temporary folder was removed
    assert _siblings(target) == (["ckpt"] if force else [])
    if force:  # the previous checkpoint is untouched
        assert ckpt.read_param_shapes(target) == {"old": (4,)}


def test_save_rejects_non_arrays_and_remote(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="a/b"):
        ckpt.save_params(tmp_path / "x", {"a": {"b": 3.0}})
    with pytest.raises(ckpt.CheckpointError, match="local folders only"):
        ckpt.save_params("gs://bucket/x", {"a": np.ones(2)})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ memory

_MEMORY_PROBE = textwrap.dedent(
    """
    import sys, time
    import jax, numpy as np, orbax.checkpoint, tensorstore  # libraries loaded before the baseline
    from faster_vla.policies import checkpoint as ckpt
    def status_mib(field):  # VmHWM, unlike ru_maxrss, does not inherit the parent's peak across exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
    jax.devices("cpu")
    before = status_mib("VmRSS")
    params = ckpt.restore_params(sys.argv[1])
    jax.block_until_ready(params)
    time.sleep(0.2)
    print(status_mib("VmHWM") - before)
    """
)


@pytest.mark.slow
def test_restore_peak_memory_is_one_copy_plus_a_leaf(tmp_path: Path) -> None:
    """Restoring 1 GiB of float32 must not hold a second copy of the tree (peak < tree + 3 leaves)."""
    leaf = 32 * 1024 * 1024  # 128 MiB float32
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal(leaf, dtype=np.float32).reshape(4096, -1) for i in range(8)}
    ckpt.save_params(tmp_path / "ckpt", params)
    del params
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "ckpt")], capture_output=True, text=True, check=True
    )
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 1024 + 3 * 128, f"restoring 1024 MiB grew RSS by {growth_mib:.0f} MiB"
