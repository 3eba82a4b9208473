"""Run logging: metrics.jsonl survives kills, config.json, plots, wandb modes, progress bar."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.image import imread

from faster_vla.runs.logger import RunLogger, read_metrics
from faster_vla.shared.jsonable import json_diff, to_jsonable
from tests.toy_task import ToyRunConfig, ToyTaskConfig, toy_learner_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _logger(run_dir, config=None, **kwargs) -> RunLogger:
    kwargs = {"wandb_mode": "disabled", "progress": False, **kwargs}
    return RunLogger(run_dir, config, **kwargs)


def _record(i: int) -> dict:
    """A record as the training loop logs one: numpy and jax scalars included."""
    return {"env_steps": 100 * i, "episodes": np.int64(i), "flops": 1.5e12 * i, "update_step": 3 * i,
            "train/success_rate": np.float32(i / 10), "eval/success_rate": (i % 3) / 2,
            "critic_loss": jnp.asarray(1.0 / i), "temperature_loss": -0.1 * i}


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No W&B credentials anywhere, and a server address that refuses connections: nothing may reach out."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


# -- metrics.jsonl ----------------------------------------------------------------------------------------------


def test_metrics_round_trip_and_a_truncated_last_line_is_dropped_then_repaired(tmp_path):
    with _logger(tmp_path, plot_every=0) as log:
        for i in range(1, 6):
            log.log(_record(i), step=i)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1]["episodes"] == 2 and isinstance(records[1]["episodes"], int)
    assert records[1]["train/success_rate"] == pytest.approx(0.2) and records[4]["critic_loss"] == pytest.approx(0.2)
    assert all(isinstance(r["logged_at"], float) for r in records)

    # A SIGKILL in the middle of a write leaves part of a line.
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "env_steps": 6')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    with _logger(tmp_path, resume=True, plot_every=0) as log:
        assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5]
        log.log(_record(6), step=6)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # the partial line is gone

    # A last record that lost only its newline is whole: kept, and the next one starts on its own line.
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(json.dumps({"step": 7, "env_steps": 700}).encode())
    assert read_metrics(tmp_path / "metrics.jsonl")[-1] == {"step": 7, "env_steps": 700}
    with _logger(tmp_path, resume=True, plot_every=0) as log:
        log.log({"env_steps": 800}, step=8)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_damage_before_the_last_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path):
    with _logger(tmp_path) as log:
        log.log({"env_steps": 1}, step=1)
    with pytest.raises(FileExistsError, match="resume=True"):
        _logger(tmp_path)


def test_rewind_drops_records_after_the_checkpoint_step(tmp_path):
    with _logger(tmp_path, plot_every=0) as log:
        for i in range(1, 6):
            log.log({"env_steps": i}, step=i)
    with _logger(tmp_path, resume=True, plot_every=0) as log:
        assert log.rewind(3) == 2
        log.log({"env_steps": 40}, step=4)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["env_steps"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_metric_values_must_be_scalars(tmp_path):
    with _logger(tmp_path) as log:
        with pytest.raises(TypeError, match=r"metric 'q' must be a scalar, got an array of shape \[3\]"):
            log.log({"q": np.zeros(3)}, step=1)
        with pytest.raises(ValueError, match="reserved"):
            log.log({"step": 1}, step=1)
        log.log({"q": np.ones((1, 1)), "flag": np.bool_(True), "nan": float("nan"),
                 "env_steps": 10, "eval/success_rate": 0.5, "eval/protocol": "openpi"}, step=1)  # a text label
        assert log.plot()  # the plots read the numbers and skip the label
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert record["q"] == 1.0 and record["flag"] is True and np.isnan(record["nan"])
    assert record["eval/protocol"] == "openpi"


def test_unwritable_run_folder_fails_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write the run folder"):
        _logger(blocker / "run")


# -- config.json ------------------------------------------------------------------------------------------------


def test_config_json_holds_the_resolved_config_and_resume_checks_it(tmp_path):
    config = toy_learner_config(ToyTaskConfig(), ToyRunConfig(hidden=8, utd=1))
    with _logger(tmp_path, config) as log:
        log.log({"env_steps": 1}, step=1)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == to_jsonable(config, strict=False)
    assert stored["utd"] == 1 and stored["chunk_critic"]["hidden_dims"] == [8, 8]
    assert stored["selection"]["rule"] == "faster" and stored["chunk_critic"]["chunk_shape"] == [2, 2]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing

    changed = dataclasses.replace(config, utd=2)
    with pytest.raises(ValueError, match=r"utd: 1 -> 2[\s\S]*allow_config_change=True"):
        _logger(tmp_path, changed, resume=True)
    _logger(tmp_path, config, resume=True).close()  # the same config resumes
    _logger(tmp_path, changed, resume=True, allow_config_change=True).close()
    assert json.loads((tmp_path / "config.json").read_text())["utd"] == 2


def test_json_helpers():
    assert to_jsonable({"a": (1, np.float32(0.5)), "p": Path("x", "y")}) == {"a": [1, 0.5], "p": "x/y"}
    with pytest.raises(TypeError, match=r"value\.f is a function"):
        to_jsonable({"f": lambda: 0})
    assert to_jsonable({"f": len}, strict=False) == {"f": repr(len)}
    assert json_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == ["a.c: 2 -> 3", "a.d: (absent) -> 4"]


# -- plots ------------------------------------------------------------------------------------------------------


def test_plots_are_written_every_k_logs_as_valid_pngs(tmp_path):
    names = ["losses.png", "success_vs_env_steps.png", "success_vs_flops.png"]
    with _logger(tmp_path, plot_every=4) as log:
        for i in range(1, 4):
            log.log(_record(i), step=i)
        assert not (tmp_path / "plots").exists()  # not yet: every 4 logs
        log.log(_record(4), step=4)
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names
        first = (tmp_path / "plots" / "success_vs_flops.png").read_bytes()
        for i in range(5, 9):
            log.log(_record(i), step=i)
        assert (tmp_path / "plots" / "success_vs_flops.png").read_bytes() != first  # regenerated with more data
        assert sorted(p.name for p in log.plot()) == names
    for name in names:
        path = tmp_path / "plots" / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = imread(path)  # decodes the whole file
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500
        assert image[..., :3].std() > 0  # something is drawn
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names  # no temp files left


def test_a_plot_without_its_data_is_not_written(tmp_path):
    with _logger(tmp_path) as log:
        log.log({"env_steps": 10, "eval/success_rate": 0.5}, step=1)  # no FLOPs, no losses yet
        assert [p.name for p in log.plot()] == ["success_vs_env_steps.png"]


# -- wandb ------------------------------------------------------------------------------------------------------


def test_wandb_offline_writes_only_into_the_run_folder_and_resumes_the_same_id(tmp_path, no_wandb_credentials):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, {"lr": 0.1}, wandb_mode="offline", progress=False) as log:
        run_id = log.run_id
        log.log({"env_steps": 10, "critic_loss": 1.0}, step=1)
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert not (tmp_path / "home" / ".netrc").exists()

    with RunLogger(run_dir, {"lr": 0.1}, wandb_mode="offline", progress=False, resume=True) as log:
        assert log.run_id == run_id
        log.log({"env_steps": 20}, step=2)
    assert len(sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run_id


def test_wandb_disabled_writes_nothing(tmp_path):
    with RunLogger(tmp_path, {"lr": 0.1}, wandb_mode="disabled", progress=False) as log:
        log.log({"env_steps": 10, "eval/success_rate": 0.5}, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "plots", "run.json"]


def test_wandb_online_without_credentials_is_a_clear_error_not_a_prompt(tmp_path, no_wandb_credentials):
    with pytest.raises(RuntimeError, match=r"wandb login[\s\S]*wandb_mode='offline'"):
        RunLogger(tmp_path / "run", {"lr": 0.1}, wandb_mode="online", progress=False)
    assert list((tmp_path / "run").iterdir()) == []  # refused before anything was written
    with pytest.raises(ValueError, match="wandb_mode must be one of"):
        RunLogger(tmp_path, wandb_mode="cloud", progress=False)


# -- progress bar -----------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_follows_env_steps_on_a_terminal_only(tmp_path, monkeypatch):
    with _logger(tmp_path / "pipe", progress=True, total_env_steps=1000) as log:
        assert log._bar is None  # stderr is not a terminal under pytest

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with _logger(tmp_path / "tty", progress=True, total_env_steps=1000) as log:
        log.log({"env_steps": 250, "eval/success_rate": 0.5}, step=1)
        log.log({"env_steps": 500}, step=2)
        assert log._bar.n == 500 and log._bar.total == 1000
    assert "500/1000" in terminal.getvalue()
    with _logger(tmp_path / "tty", progress=True, total_env_steps=1000, resume=True) as log:
        assert log._bar.n == 500  # a resumed run's bar starts where it stopped
    with _logger(tmp_path / "off", progress=False, total_env_steps=1000) as log:
        assert log._bar is None


def test_a_run_started_before_a_field_existed_resumes_with_its_default(tmp_path):
    """A config.json without a field added since (e.g. num_envs) resumes when the run keeps that field's
    default; set to anything else, the difference is named as any other."""
    from faster_vla.runs.config import TRAIN_CONFIGS

    config = dataclasses.replace(TRAIN_CONFIGS["cpu_small_faster_expo"][1], run_dir=tmp_path)
    with _logger(tmp_path, config) as log:
        log.log({"env_steps": 1}, step=1)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["num_envs"], old["env"]["render_mode"]  # as written before these fields existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"num_envs: \(absent\) -> 2"):
        _logger(tmp_path, dataclasses.replace(config, num_envs=2), resume=True)
    _logger(tmp_path, config, resume=True).close()
    restored = json.loads((tmp_path / "config.json").read_text())
    assert restored["num_envs"] == 1 and restored["env"]["render_mode"] == "chunk_boundary"
