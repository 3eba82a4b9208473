"""Run logging: a local run folder that survives SIGKILL, optional wandb, plots, and a progress bar.

Run folder (everything a run writes, wandb included):

    <run_dir>/config.json     the resolved run config (a dataclass or mapping as JSON), written atomically
    <run_dir>/run.json        the run id (reused by wandb on resume) and creation time
    <run_dir>/metrics.jsonl   one JSON object per `log` call: {"step": ..., "logged_at": unix time, **metrics}
    <run_dir>/plots/*.png     success rate vs env steps, success rate vs cumulative FLOPs (the FASTER
                              paper's Fig. 7 view, log-x), losses vs update step; regenerated every
                              `plot_every` logs and on `plot()` / `close()`
    <run_dir>/wandb/          wandb's own files (offline runs sync later with `wandb sync`)

metrics.jsonl is the authoritative record: each line goes to the OS in one `os.write` on an O_APPEND
descriptor, so a SIGKILL loses at most the line being written (the page cache survives the process; an
fsync happens on `close`). `read_metrics` drops a truncated last line, and resuming repairs it before
appending. Non-finite values are written as JSON `NaN`/`Infinity` (Python's json reads them back), so a
diverging loss stays visible.

Files other than metrics.jsonl are replaced whole (temp file in the same folder, fsync, `os.replace`), so
a reader, or a run killed mid-write, never sees half a PNG or half a config.

Why one file of ~440 lines: metrics.jsonl's crash-safe append and repair, the plots read from it and the
logger that writes both are one record format.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from faster_vla.shared.files import atomic_write, ensure_writable_dir
from faster_vla.shared.jsonable import json_diff, to_jsonable

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = ("offline", "online", "disabled")

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
RESERVED_KEYS = ("step", "logged_at")


# -- metrics.jsonl ------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in order. A truncated last line (a run killed mid-write) is dropped;
    an unreadable line anywhere else raises ValueError naming it (the file was damaged by something else)."""
    records, _ = _read_metrics(Path(path))
    return records


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """(records, byte length to truncate the file to, or None if it is intact)."""
    if not path.exists():
        return [], None
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (b"" if the file ends in one)
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: line {number} is not JSON ({exc}); the file was damaged by something other "
                             "than an interrupted write") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a {type(record).__name__}, not a JSON object")
        records.append(record)
    if not tail.strip():
        return records, None
    try:  # a last line cut before its newline: keep it if it is whole, else drop it
        record = json.loads(tail)
        if isinstance(record, dict):
            records.append(record)
            return records, -1  # whole: only its newline is missing
    except ValueError:
        pass
    return records, len(data) - len(tail)


# -- plots ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlotKeys:
    """Which metric names the plots read. Success and loss series are every numeric metric whose name
    contains `success` / `loss` (so 'train/success_rate' and 'eval/success_rate' both show, and a
    'successes' count does not)."""

    env_steps: str = "env_steps"
    flops: str = "flops"  # cumulative FLOPs (acting + updates)
    update_step: str = "update_step"  # falls back to the record's `step` when absent
    success: str = "success_rate"
    loss: str = "loss"


def _series(records: Sequence[dict], x_key: str, y_key: str, *, positive_x: bool = False) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if _is_number(x) and _is_number(y) and (not positive_x or x > 0):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metric_names(records: Sequence[dict], pattern: str) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if pattern in k and k not in RESERVED_KEYS and _is_number(v):
                names[k] = None
    return list(names)


def figure_png(draw: Any, size: tuple[float, float]) -> bytes:
    """Draws with `draw(figure)` on an Agg canvas (no pyplot, so no global backend change) -> PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - plotting only
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(records: Sequence[dict], plots_dir: str | os.PathLike[str], keys: PlotKeys = PlotKeys()) -> list[Path]:
    """Regenerates the run's PNGs from its metric records; returns the files written (a plot without data
    yet is skipped)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    success = _metric_names(records, keys.success)

    def success_plot(x_key: str, x_label: str, log_x: bool, name: str) -> None:
        lines = {y: _series(records, x_key, y, positive_x=log_x) for y in success}
        lines = {y: xy for y, xy in lines.items() if xy[0]}
        if not lines:
            return

        def draw(fig: Any) -> None:
            ax = fig.add_subplot()
            for y, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker="o", markersize=3, label=y)
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel("success rate")
            if all(0 <= v <= 1 for _, ys in lines.values() for v in ys):
                ax.set_ylim(-0.02, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)

        path = plots_dir / name
        atomic_write(path, figure_png(draw, (6, 4)))
        written.append(path)

    success_plot(keys.env_steps, "env steps", False, "success_vs_env_steps.png")
    success_plot(keys.flops, "cumulative FLOPs", True, "success_vs_flops.png")

    losses = {}
    for name in _metric_names(records, keys.loss):
        xs, ys = _series(records, keys.update_step, name)
        if not xs:
            xs, ys = _series(records, "step", name)
        if xs:
            losses[name] = (xs, ys)
    if losses:
        def draw(fig: Any) -> None:
            axes = fig.subplots(len(losses), 1, sharex=True, squeeze=False)[:, 0]
            for ax, (name, (xs, ys)) in zip(axes, losses.items()):
                ax.plot(xs, ys, linewidth=1)
                ax.set_ylabel(name, fontsize=8)
                ax.grid(True, alpha=0.3)
            axes[-1].set_xlabel("update step")

        path = plots_dir / "losses.png"
        atomic_write(path, figure_png(draw, (6, 1.8 * len(losses) + 0.6)))
        written.append(path)
    return written


# -- the logger -------------------------------------------------------------------------------------------


class RunLogger:
    """Writes a run's config, metrics, plots, wandb and progress bar (see the module docstring).

    Example::

        with RunLogger("runs/libero_faster", config, total_env_steps=200_000) as log:
            log.log({"env_steps": 4_000, "episodes": 20, "flops": 3.1e15, "train/success_rate": 0.4}, step=20)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: Any = None,
        *,
        resume: bool = False,
        allow_config_change: bool = False,
        wandb_mode: WandbMode = "offline",
        wandb_project: str = "faster-vla",
        wandb_name: str | None = None,
        wandb_tags: Sequence[str] = (),
        total_env_steps: int | None = None,
        progress: bool = True,
        plot_every: int = 20,
        plot_keys: PlotKeys = PlotKeys(),
    ) -> None:
        """run_dir: the run folder (created). config: the resolved run config (a dataclass or mapping).
        resume: continue the run already in run_dir (append to its metrics, same wandb run id); without it
        a folder that already holds metrics is refused, so that two runs never mix. allow_config_change: on
        resume, accept a config that differs from the stored one (it is replaced; otherwise the differences
        raise). wandb_mode: 'offline' (default; needs no login, sync later), 'online' (needs credentials,
        checked now) or 'disabled' (nothing written). total_env_steps: the progress bar's total (ETA).
        progress: show the bar (only ever on a terminal). plot_every: regenerate the PNGs every that many
        `log` calls (0: only on `plot()`/`close()`)."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        if plot_every < 0:
            raise ValueError(f"plot_every must be >= 0, got {plot_every}")
        self.run_dir = ensure_writable_dir(run_dir)
        wandb = None if wandb_mode == "disabled" else _import_wandb(wandb_mode, self.run_dir)  # fails before writing
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plots_dir = self.run_dir / PLOTS_DIR
        self.plot_keys = plot_keys
        self.plot_every = int(plot_every)
        self._closed = False
        self._fd: int | None = None
        self._bar: Any = None
        self._wandb_run: Any = None
        self._logs_since_plot = 0

        self.records = self._open_metrics(resume)
        self.config = self._write_config(config, resume, allow_config_change)
        self.run_id = self._run_id(resume)
        try:
            if wandb is not None:
                self._wandb_run = wandb.init(
                    mode=wandb_mode,
                    dir=self.run_dir,  # wandb writes into <dir>/wandb
                    project=wandb_project,
                    name=wandb_name,
                    tags=list(wandb_tags) or None,
                    id=self.run_id,
                    resume="allow" if resume else None,
                    config=self.config,
                    settings=wandb.Settings(console="off"),  # leave the terminal (and the progress bar) alone
                )
            self._start_progress(progress, total_env_steps)
            self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self.close(failed=True)
            raise

    # -- setup --------------------------------------------------------------------------------------------

    def _open_metrics(self, resume: bool) -> list[dict[str, Any]]:
        exists = self.metrics_path.exists() and self.metrics_path.stat().st_size > 0
        if exists and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run ({METRICS_FILE} is not empty): pass "
                                  "resume=True to continue it, or choose a new run folder")
        if not resume:
            return []
        records, repair = _read_metrics(self.metrics_path)
        if repair == -1:  # a whole last record without its newline: complete it
            with open(self.metrics_path, "ab") as f:
                f.write(b"\n")
        elif repair is not None:  # a truncated last line: cut it so that appends start on a fresh line
            os.truncate(self.metrics_path, repair)
        return records

    def _write_config(self, config: Any, resume: bool, allow_change: bool) -> dict[str, Any] | None:
        path = self.run_dir / CONFIG_FILE
        stored = json.loads(path.read_text()) if resume and path.exists() else None
        if config is None:
            return stored
        data = to_jsonable(config, strict=False, _where="config")
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dataclass or a mapping, got {type(config).__name__}")
        if stored is not None:
            stored = _with_added_defaults(stored, data, _defaults(config))
        if stored is not None and stored != data and not allow_change:
            diff = "\n  ".join(json_diff(stored, data))
            raise ValueError(f"the config differs from the one this run was started with ({path}):\n  {diff}\n"
                             "resume with the same config, pass allow_config_change=True, or start a new run folder")
        atomic_write(path, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())
        return data

    def _run_id(self, resume: bool) -> str:
        path = self.run_dir / RUN_FILE
        if resume and path.exists():
            return str(json.loads(path.read_text())["run_id"])
        run_id = secrets.token_hex(4)  # 8 chars of [0-9a-f]: a valid wandb run id
        atomic_write(path, json.dumps({"run_id": run_id, "created": time.time()}).encode())
        return run_id

    def _start_progress(self, enabled: bool, total: int | None) -> None:
        if not enabled or not sys.stderr.isatty():
            return
        from tqdm import tqdm  # noqa: PLC0415

        start = 0
        for r in reversed(self.records):
            if _is_number(r.get(self.plot_keys.env_steps)):
                start = int(r[self.plot_keys.env_steps])
                break
        self._bar = tqdm(total=total, initial=start, unit="step", desc="env steps", dynamic_ncols=True,
                         smoothing=0.05)

    # -- logging ------------------------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Appends one record (scalars or text labels; env_steps, episodes, flops... as the caller counts them) to
        metrics.jsonl, wandb and the progress bar, and refreshes the plots every `plot_every` calls."""
        if self._closed:
            raise RuntimeError("this RunLogger is closed")
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by the logger; rename them")
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        record = {"step": int(step), "logged_at": time.time(), **values}
        line = (json.dumps(record, allow_nan=True) + "\n").encode()
        os.write(self._fd, line)  # one write on an O_APPEND fd: a kill loses at most this line
        self.records.append(record)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        self._advance_progress(values)
        self._logs_since_plot += 1
        if self.plot_every and self._logs_since_plot >= self.plot_every:
            self.plot()

    def _advance_progress(self, values: dict[str, Any]) -> None:
        if self._bar is None:
            return
        env_steps = values.get(self.plot_keys.env_steps)
        if _is_number(env_steps) and env_steps > self._bar.n:
            self._bar.update(int(env_steps) - self._bar.n)
        shown = {k: v for k, v in values.items() if self.plot_keys.success in k and _is_number(v)}
        if shown:
            self._bar.set_postfix({k.rsplit("/", 1)[-1]: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def plot(self) -> list[Path]:
        """Regenerates the PNGs now; returns the files written."""
        self._logs_since_plot = 0
        return write_plots(self.records, self.plots_dir, self.plot_keys)

    def rewind(self, step: int) -> int:
        """Drops the records after `step` (e.g. those logged after the checkpoint a resumed run restarts from),
        so metrics.jsonl and the plots show one history; returns how many were dropped. wandb cannot drop
        logged steps: it ignores re-logged steps <= its last one, so metrics.jsonl is the record to trust."""
        keep = [r for r in self.records if r.get("step", -math.inf) <= step]
        dropped = len(self.records) - len(keep)
        if dropped:
            os.close(self._fd)
            body = b"".join((json.dumps(r, allow_nan=True) + "\n").encode() for r in keep)
            atomic_write(self.metrics_path, body)
            self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.records = keep
        return dropped

    # -- teardown -----------------------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> None:
        """Final plots, fsync of metrics.jsonl, progress bar and wandb run closed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.records:
                self.plot()
        finally:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._bar is not None:
                self._bar.close()
            if self._wandb_run is not None:
                self._wandb_run.finish(exit_code=1 if failed else 0)
                self._wandb_run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


def _import_wandb(mode: str, run_dir: Path) -> Any:
    """wandb, after checking (without prompting, without network) that 'online' has credentials."""
    try:
        import wandb  # noqa: PLC0415 - heavy; only when enabled
    except ImportError as exc:
        raise ImportError(f"wandb_mode={mode!r} needs the wandb package (pip install wandb), or pass "
                          "wandb_mode='disabled'") from exc
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        env_mode = os.environ.get("WANDB_MODE")
        hint = f" (WANDB_MODE={env_mode} is set in the environment and also prevents it)" if env_mode else ""
        raise RuntimeError(
            f"wandb_mode='online' needs W&B credentials and none were found{hint}: run `wandb login` (or set "
            "WANDB_API_KEY), or use wandb_mode='offline' (no login; upload later with `wandb sync "
            f"{run_dir / 'wandb'}/offline-run-*`) or 'disabled'"
        )
    return wandb


def _scalar(name: str, value: Any) -> int | float | bool | str:
    """A metric value as a Python scalar; arrays of one element are accepted (jax/numpy results), and text
    labels (e.g. eval/protocol) pass as they are (the plots read numbers only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.size == 1 and arr.dtype.kind in "biuf":
            return arr.reshape(()).item()
        raise TypeError(f"metric {name!r} must be a scalar, got an array of shape {list(arr.shape)} ({arr.dtype})")
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")


def _defaults(config: Any) -> dict[str, Any] | None:
    """The JSON of `type(config)()` (a dataclass with defaults for every field), else None."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return None
    try:
        return to_jsonable(type(config)(), strict=False, _where="config")
    except TypeError:  # a field without a default
        return None


def _with_added_defaults(stored: Any, data: Any, defaults: Any) -> Any:
    """`stored` with the fields it lacks taken from `data` where `data` holds their default: a run started
    before a field existed ran as its default does (new fields default to the earlier behaviour), so resuming
    it with that default is no change. A field set otherwise is still a difference."""
    if not (isinstance(stored, dict) and isinstance(data, dict) and isinstance(defaults, dict)):
        return stored
    out = dict(stored)
    for key, value in data.items():
        if key not in stored:
            if key in defaults and defaults[key] == value:
                out[key] = value
        else:
            out[key] = _with_added_defaults(stored[key], value, defaults.get(key))
    return out

