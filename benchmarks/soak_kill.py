"""kill -9 soak: a real `faster-vla train` run killed with SIGKILL at random moments and resumed each time must
end equal to an uninterrupted run of the same config, and never leave a checkpoint that does not restore.

    .venv/bin/python benchmarks/soak_kill.py            # the documented soak (docs/benchmarks.md, Reliability)

What it does (all on this machine, no network):

1. **Reference**: the run, uninterrupted (`faster-vla train cpu_small_faster_expo` on libero_90 task 20 with the
   built-in small π0.5, cut down by the flags below). Its phase timeline is the profile the kill delays are
   drawn from.
2. **Soak**: the same run in another folder, started, then `--kills` times: wait for a target phase (acting,
   update, eval, save; a balanced shuffled schedule), sleep a random fraction of that phase's median length in
   the reference, SIGKILL the whole process group (the trainer and its env worker processes), check that no
   process of the group survives and that every checkpoint folder left behind restores (learner, replay,
   state), then start it again with `--resume`. After the last kill it runs to the end.
3. **Compare**: every per-episode record of metrics.jsonl (outcome, init state, steps, counters, FLOPs,
   losses, evaluations; only wall times and timestamps are left out) and every checkpoint both runs kept
   (counters but wall time, RNG state, eval success, replay arrays, learner leaves) must be *equal*, not
   close: a resume claims to continue exactly (`faster_vla.runs.loop`).

How the phase is known: each life runs through this script's `_child` entry, which calls the `faster-vla`
CLI's own `main` after wrapping `Run.rollout` (acting), `Run.store`, `Run.update`, `Run.evaluate`,
`Run.save`, `Run.restore` and `RunLogger.log` so that each appends "<time> <phase> >|< <episodes>" to a trace
file with one `os.write` (O_APPEND; it survives the SIGKILL). Nothing else changes: the wrappers call the
originals with the same arguments. The phase a kill landed in is the trace's last line, read after the
process is dead, so it is the phase the process was in, not the one that was aimed at.

Writes `--out` (the runs, traces and logs) and the summary `--json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET_PHASES = ("acting", "update", "eval", "save")
"""The phases kills aim at (the issue's acting, updates, evaluation and checkpoint writes)."""

TRACED = {"rollout": "acting", "store": "store", "update": "update", "evaluate": "eval", "save": "save",
          "restore": "restore"}
"""Run methods traced by the child, and their phase names."""

VOLATILE_KEYS = ("logged_at", "wall_s")
"""Record fields that measure time, not the run: left out of the comparison (as are the time_ms/* fields)."""


# -- the child: `faster-vla train` with a phase trace -------------------------------------------------------


def _child_main(trace: str, argv: list[str]) -> None:
    """Runs the `faster-vla` CLI on `argv`, appending each traced phase's start and end to `trace`."""
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(phase: str, edge: str, episodes: int | None = None) -> None:
        os.write(fd, f"{time.time():.6f} {phase} {edge} {-1 if episodes is None else episodes}\n".encode())

    mark("startup", ">")
    from faster_vla.launch.cli import main  # noqa: PLC0415 - after the first mark: imports are startup
    from faster_vla.runs.logger import RunLogger  # noqa: PLC0415
    from faster_vla.runs.run import Run  # noqa: PLC0415

    def traced(cls: type, name: str, phase: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            counters = getattr(self, "counters", None)
            mark(phase, ">", None if counters is None else counters.episodes)
            try:
                return original(self, *args, **kwargs)
            finally:
                mark(phase, "<", None if counters is None else self.counters.episodes)

        setattr(cls, name, wrapper)

    for name, phase in TRACED.items():
        traced(Run, name, phase)
    traced(RunLogger, "log", "log")
    main(argv)
    mark("done", ">")


# -- traces ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mark:
    t: float
    phase: str
    edge: str  # ">" start, "<" end
    episodes: int


def read_trace(path: Path) -> list[Mark]:
    """The whole lines of a trace (a line cut by the kill is dropped)."""
    if not path.exists():
        return []
    marks = []
    for line in path.read_text().split("\n")[:-1]:
        t, phase, edge, episodes = line.split()
        marks.append(Mark(float(t), phase, edge, int(episodes)))
    return marks


def segments(marks: Sequence[Mark]) -> list[tuple[str, float, float]]:
    """(phase, start, end) of each phase, consecutive calls of one phase merged (the 10 updates after an
    episode are one update segment)."""
    out: list[list[Any]] = []
    for m in marks:
        if m.edge == ">":
            if out and out[-1][0] == m.phase and out[-1][3]:  # the same phase again right after it ended
                out[-1][3] = False
            else:
                out.append([m.phase, m.t, m.t, False])
        elif out and out[-1][0] == m.phase:
            out[-1][2], out[-1][3] = m.t, True
    return [(p, s, e) for p, s, e, _ in out]


def phase_at_end(marks: Sequence[Mark]) -> tuple[str, int]:
    """The phase the process was in when its trace ended, and the episodes completed then: a started phase,
    or 'between' after an ended one (the loop's bookkeeping between two traced calls)."""
    if not marks:
        return "before-start", -1
    last = marks[-1]
    return (last.phase if last.edge == ">" else f"after-{last.phase}"), last.episodes


# -- processes ------------------------------------------------------------------------------------------------


def group_members(pgid: int) -> dict[int, str]:
    """{pid: state letter} of the processes in process group `pgid` (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid:
            found[int(entry)] = fields[0]
    return found


def kill_group(proc: subprocess.Popen, settle_s: float = 10.0) -> dict[str, Any]:
    """SIGKILLs the child's whole process group and waits for it; returns the group's size before the kill
    and the processes still alive after `settle_s` (zombies, already dead but not reaped, are counted apart)."""
    before = group_members(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + settle_s
    while True:
        left = group_members(proc.pid)
        alive = {p: s for p, s in left.items() if s != "Z"}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {"group_size": len(before), "survivors": sorted(alive), "zombies": sorted(p for p, s in left.items()
                                                                                     if s == "Z")}


# -- checkpoints ----------------------------------------------------------------------------------------------


class Checker:
    """Restores checkpoints of the run's config (a learner template built once, as `faster-vla eval` does)."""

    def __init__(self, config_path: Path, scratch: Path) -> None:
        from faster_vla.policies.config import get_preset  # noqa: PLC0415 - JAX only when checking
        from faster_vla.rl.learner import Learner  # noqa: PLC0415
        from faster_vla.runs.config import TrainConfig, learner_config  # noqa: PLC0415
        from faster_vla.shared.jsonable import from_jsonable  # noqa: PLC0415

        self.config = from_jsonable(TrainConfig, json.loads(config_path.read_text()))
        lconfig = learner_config(self.config, get_preset(self.config.actor.preset))
        self.template = Learner.create(lconfig, lconfig.chunk_critic.encoder.example_inputs(1), seed=self.config.seed)
        self.scratch = scratch

    def checkpointer(self, directory: Path) -> Any:
        from faster_vla.runs.checkpoint import RunCheckpointer  # noqa: PLC0415

        return RunCheckpointer(directory, keep_last=self.config.keep_last, keep_best=self.config.keep_best)

    def check_copy(self, directory: Path) -> dict[str, Any]:
        """Restores every complete checkpoint in a copy of `directory` (opening a checkpointer deletes unfinished
        step folders; the copy leaves the run's own for its resume to clean). Returns the episodes, the
        unfinished folders found and the checkpoints that failed to restore, with why."""
        unfinished = sorted(p.name for p in directory.iterdir() if not p.name.isdigit()) if directory.exists() else []
        if self.scratch.exists():  # the previous check's copy (kept until now: orbax may still be listing it)
            shutil.rmtree(self.scratch)
        if directory.exists():
            shutil.copytree(directory, self.scratch)
        return {"unfinished": unfinished, **self.restore_all(self.scratch)}

    def restore_all(self, directory: Path) -> dict[str, Any]:
        checkpointer = self.checkpointer(directory)
        corrupt = {}
        for episode in checkpointer.episodes:
            try:
                self.restore(checkpointer, episode)
            except Exception as exc:  # noqa: BLE001 - any failure is a corrupt checkpoint, reported
                corrupt[episode] = f"{type(exc).__name__}: {exc}"[:500]
        checkpointer.close()
        return {"episodes": checkpointer.episodes, "corrupt": corrupt}

    def restore(self, checkpointer: Any, episode: int) -> dict[str, Any]:
        """One checkpoint, whole: learner, replay, RNG, counters, and consistency between them."""
        restored = checkpointer.restore(episode, self.template)
        checkpointer.restore_actor(episode, None)  # a frozen-actor run: must say it holds no actor
        c = restored.counters
        problems = []
        if c["episodes"] != episode or restored.replay.episodes_added != episode:
            problems.append(f"episodes {c['episodes']}, replay episodes {restored.replay.episodes_added}")
        if c["env_steps"] != restored.replay.steps_added:
            problems.append(f"env_steps {c['env_steps']} != replay steps {restored.replay.steps_added}")
        if c["updates"] != int(restored.learner.step):
            problems.append(f"updates {c['updates']} != learner step {int(restored.learner.step)}")
        if problems:
            raise ValueError("inconsistent checkpoint: " + "; ".join(problems))
        return {"learner": restored.learner, "rng_state": restored.rng_state, "counters": c,
                "eval_success": checkpointer.eval_success(episode)}


# -- comparison -----------------------------------------------------------------------------------------------


def _exact(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a diverging loss logged twice is still the same record)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def _host(leaf: Any) -> Any:
    """A learner leaf as a numpy array (a typed PRNG key as its raw key data)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def compare_metrics(soak: Path, reference: Path) -> dict[str, Any]:
    """Every metrics.jsonl record field but timestamps and wall times, exactly; the first differences."""
    from faster_vla.runs.logger import read_metrics  # noqa: PLC0415

    a, b = read_metrics(soak / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    differences = []
    if [r["step"] for r in a] != [r["step"] for r in b]:
        differences.append(f"logged steps differ: soak {[r['step'] for r in a]}, reference {[r['step'] for r in b]}")
    compared = 0
    for ra, rb in zip(a, b):
        keys = {k for k in ra.keys() | rb.keys() if k not in VOLATILE_KEYS and not k.startswith("time_ms/")}
        for k in sorted(keys):
            compared += 1
            if not _exact(ra.get(k), rb.get(k)):
                differences.append(f"step {ra['step']} {k}: soak {ra.get(k)!r}, reference {rb.get(k)!r}")
    outcomes = lambda rs: [(r["step"], r["train/success"], r["train/init_state"], r["train/episode_steps"])  # noqa: E731
                           for r in rs]
    return {"records": [len(a), len(b)], "values_compared": compared, "differences": len(differences),
            "first_differences": differences[:10], "outcomes_equal": outcomes(a) == outcomes(b),
            "successes": [sum(r["train/success"] for r in a), sum(r["train/success"] for r in b)],
            "evals": [[r["step"], r["eval/success_rate"]] for r in a if "eval/success_rate" in r]}


def compare_checkpoints(checker: Checker, soak: Path, reference: Path) -> dict[str, Any]:
    """The checkpoints both runs kept: counters (but wall time), RNG, eval success, learner leaves and the replay
    file's arrays, each exactly."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    ca, cb = checker.checkpointer(soak), checker.checkpointer(reference)
    common = sorted(set(ca.episodes) & set(cb.episodes))
    differences = []
    for episode in common:
        ra, rb = checker.restore(ca, episode), checker.restore(cb, episode)
        drop = lambda c: {k: v for k, v in c.items() if k not in VOLATILE_KEYS}  # noqa: E731
        for name in ("rng_state", "eval_success"):
            if ra[name] != rb[name]:
                differences.append(f"checkpoint {episode}: {name} differs")
        if drop(ra["counters"]) != drop(rb["counters"]):
            differences.append(f"checkpoint {episode}: counters {drop(ra['counters'])} != {drop(rb['counters'])}")
        la = jax.tree_util.tree_flatten_with_path(ra["learner"])[0]
        lb = jax.tree_util.tree_flatten_with_path(rb["learner"])[0]
        for (path, x), (_, y) in zip(la, lb, strict=True):
            x, y = _host(x), _host(y)
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
                differences.append(f"checkpoint {episode}: learner {jax.tree_util.keystr(path)} differs (max abs "
                                   f"{float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))):.3g})")
        with np.load(ca.path(episode) / "replay" / "replay.npz") as xa, \
                np.load(cb.path(episode) / "replay" / "replay.npz") as xb:
            if sorted(xa.files) != sorted(xb.files):
                differences.append(f"checkpoint {episode}: replay arrays {sorted(xa.files)} != {sorted(xb.files)}")
            for k in sorted(set(xa.files) & set(xb.files)):
                if xa[k].shape != xb[k].shape or xa[k].dtype != xb[k].dtype or not np.array_equal(xa[k], xb[k]):
                    differences.append(f"checkpoint {episode}: replay {k} differs")
    result = {"soak": ca.episodes, "reference": cb.episodes, "compared": common, "differences": len(differences),
              "first_differences": differences[:10]}
    ca.close()
    cb.close()
    return result


# -- the soak -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SoakArgs:
    """kill -9 soak of a `faster-vla train` run (see the module docstring); the defaults are the documented run."""

    kills: int = 20
    """SIGKILLs, each followed by a `--resume`."""
    episodes: int = 32
    """Training episodes of the run (enough that the kills, about one episode of progress each, end before it)."""
    max_steps: int = 100
    """Env steps per episode (--env.max-steps): about what a scripted demonstration of the task needs, so some
    episodes succeed and the compared outcomes are not all failures."""
    num_envs: int = 2
    """Env worker processes (--num-envs): the kill must take them down with the trainer."""
    checkpoint_every: int = 2
    """--checkpoint-every."""
    eval_every: int = 4
    """--eval-every."""
    eval_episodes: int = 2
    """--eval-episodes."""
    config: str = "cpu_small_faster_expo"
    """The named train config the flags above cut down."""
    extra: tuple[str, ...] = ()
    """More `faster-vla train` flags, e.g. --extra --env.resolution 64."""
    seed: int = 0
    """Seed of the kill schedule (targets, which occurrence, delays); the run's own seed is the config's."""
    life_timeout_s: float = 900.0
    """A life (start to kill, or to the end) taking longer fails the soak."""
    out: Path = Path("runs/soak_kill")
    """Folder of the runs, traces and logs (must not exist, unless --overwrite)."""
    json: Path = Path("benchmarks/results/soak_kill_cpu.json")
    """Summary JSON."""
    overwrite: bool = False
    """Delete --out first."""
    jax_cache: bool = True
    """Share compiled programs between lives through JAX's persistent compilation cache (in --out): a life
    then spends its start on imports and env workers, not on compiling (minutes on 2 cores)."""

    def train_argv(self, run_dir: Path, resume: bool) -> list[str]:
        argv = ["train", self.config, "--run-dir", str(run_dir), "--episodes", str(self.episodes),
                "--env.max-steps", str(self.max_steps), "--num-envs", str(self.num_envs),
                "--checkpoint-every", str(self.checkpoint_every), "--eval-every", str(self.eval_every),
                "--eval-episodes", str(self.eval_episodes), "--no-progress", "--wandb-mode", "disabled",
                *self.extra]
        return argv + (["--resume"] if resume else [])


class Life:
    """One process of the run: started, watched through its trace, killed or finished."""

    def __init__(self, args: SoakArgs, run_dir: Path, name: str, resume: bool) -> None:
        self.trace = args.out / "traces" / f"{name}.trace"
        self.log_path = args.out / "logs" / f"{name}.log"
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(self.trace), "--",
               *args.train_argv(run_dir, resume)]
        self.command = cmd
        self.started = time.time()
        env = dict(os.environ)
        if args.jax_cache:
            env.update(JAX_COMPILATION_CACHE_DIR=str((args.out / "jax_cache").resolve()),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.deadline = time.monotonic() + args.life_timeout_s

    def marks(self) -> list[Mark]:
        return read_trace(self.trace)

    def wait_for_segment(self, phase: str, nth: int) -> float | None:
        """Waits until the `nth` segment of `phase` starts; its start time, or None if the run ended first."""
        while True:
            starts = [s for p, s, _ in segments(self.marks()) if p == phase]
            if len(starts) >= nth:
                return starts[nth - 1]
            if self.proc.poll() is not None:
                return None
            self._check_deadline()
            time.sleep(0.01)

    def sleep_until(self, t: float) -> None:
        while time.time() < t and self.proc.poll() is None:
            time.sleep(min(0.005, max(t - time.time(), 0)))

    def finish(self) -> int:
        while self.proc.poll() is None:
            self._check_deadline()
            time.sleep(0.5)
        self.log.close()
        return self.proc.returncode

    def kill(self) -> dict[str, Any]:
        result = kill_group(self.proc)
        self.log.close()
        return result

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            kill_group(self.proc)
            raise TimeoutError(f"{self.trace.stem} ran past --life-timeout-s; log tail:\n{self.tail()}")


def median_lengths(marks: Sequence[Mark]) -> dict[str, float]:
    """Median length in seconds of each phase's segments (the profile kill delays are drawn from)."""
    lengths: dict[str, list[float]] = {}
    for phase, start, end in segments(marks):
        lengths.setdefault(phase, []).append(end - start)
    return {p: sorted(v)[len(v) // 2] for p, v in lengths.items()}


def kill_plan(args: SoakArgs) -> list[dict[str, Any]]:
    """Per kill: the target phase (a shuffled, balanced schedule), which of the life's segments of it, and the
    fraction of its median length to wait after it starts. Later occurrences let the run move on between
    kills (a kill at the first acting segment after a resume would repeat the same episode forever)."""
    rng = random.Random(args.seed)
    targets = [TARGET_PHASES[i % len(TARGET_PHASES)] for i in range(args.kills)]
    rng.shuffle(targets)
    most = {"acting": 2, "update": 3, "eval": 1, "save": 2}
    return [{"target": t, "nth": rng.randint(1, most[t]), "fraction": rng.uniform(0.05, 0.95)} for t in targets]


def corrupt_checkpoints(kills: Sequence[dict[str, Any]], final: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct corrupt checkpoint once (a corrupt folder stays until retention deletes it, so consecutive
    checks see it again): the run, its episode, the first check that saw it and how many did."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    checks = [(f"kill {k['life'] + 1}", "soak", k["corrupt"]) for k in kills]
    checks += [(f"end ({name})", name, c["corrupt"]) for name, c in final.items()]
    for check, run, corrupt in checks:
        for episode, error in corrupt.items():
            entry = seen.setdefault((run, str(episode)), {"run": run, "episode": int(episode), "first_seen": check,
                                                          "sightings": 0, "error": error[:200]})
            entry["sightings"] += 1
    return list(seen.values())


def soak(args: SoakArgs) -> dict[str, Any]:
    if args.out.exists():
        if not args.overwrite:
            raise FileExistsError(f"{args.out} exists: pass --overwrite or another --out")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    reference_dir, soak_dir = args.out / "reference", args.out / "soak"
    begin = time.time()

    # 1. The uninterrupted run, and its phase profile.
    print(f"reference run: {' '.join(args.train_argv(reference_dir, False))}", flush=True)
    life = Life(args, reference_dir, "reference", resume=False)
    if life.finish() != 0:
        raise RuntimeError(f"the reference run failed:\n{life.tail()}")
    reference_s = time.time() - life.started
    profile = median_lengths(life.marks())
    print(f"reference: {reference_s:.0f} s; median phase lengths {json.dumps({k: round(v, 3) for k, v in profile.items()})}",
          flush=True)
    checker = Checker(reference_dir / "config.json", args.out / "check_scratch")

    # 2. The killed run.
    kills = []
    finished_early = False
    soak_begin = time.time()
    for i, plan in enumerate(kill_plan(args)):
        life = Life(args, soak_dir, f"life{i:02d}", resume=i > 0)
        start = life.wait_for_segment(plan["target"], plan["nth"])
        if start is None:
            code = life.finish()
            if code != 0:
                raise RuntimeError(f"life {i} crashed (exit {code}) before its kill (aimed at {plan['target']} "
                                   f"#{plan['nth']}):\n{life.tail()}")
            finished_early = True  # the run reached its end first: fewer kills (raise --episodes), reported
            print(f"the run finished in life {i}, before kill {i + 1}: raise --episodes for more kills", flush=True)
            break
        delay = plan["fraction"] * profile.get(plan["target"], 0.0)
        life.sleep_until(start + delay)
        if life.proc.poll() is not None:
            raise RuntimeError(f"life {i} exited ({life.proc.returncode}) before its kill:\n{life.tail()}")
        killed = life.kill()
        marks = life.marks()
        phase, episodes = phase_at_end(marks)
        resumed_from = next((m.episodes for m in marks if m.phase == "restore" and m.edge == "<"), 0)
        check = checker.check_copy(soak_dir / "checkpoints")
        record = {"life": i, **plan, "delay_s": round(delay, 3), "landed": phase, "episodes_done": episodes,
                  "resumed_from": resumed_from, "life_s": round(time.time() - life.started, 1), **killed,
                  "checkpoints": check["episodes"], "unfinished": check["unfinished"], "corrupt": check["corrupt"]}
        kills.append(record)
        print(f"kill {i + 1}/{args.kills}: aimed at {plan['target']} #{plan['nth']} +{delay:.2f} s, landed in "
              f"{phase} (episodes done {episodes}, resumed from {resumed_from}); group {killed['group_size']}, "
              f"survivors {killed['survivors']}; checkpoints {check['episodes']} unfinished {check['unfinished']} "
              f"corrupt {list(check['corrupt'])}", flush=True)

    if not finished_early:
        life = Life(args, soak_dir, "final", resume=bool(kills))
        code = life.finish()
        if code != 0:
            raise RuntimeError(f"the final resume failed (exit {code}):\n{life.tail()}")
    soak_s = time.time() - soak_begin

    # 3. Compare.
    metrics = compare_metrics(soak_dir, reference_dir)
    checkpoints = compare_checkpoints(checker, soak_dir / "checkpoints", reference_dir / "checkpoints")
    final_check = {name: checker.restore_all(d / "checkpoints") for name, d in
                   (("soak", soak_dir), ("reference", reference_dir))}
    corrupt = corrupt_checkpoints(kills, final_check)
    landed = Counter(k["landed"] for k in kills)
    result = {
        "benchmark": "soak_kill",
        "command": " ".join([".venv/bin/python", "benchmarks/soak_kill.py", *sys.argv[1:]]),
        "train_argv": args.train_argv(Path("<run_dir>"), False),
        "kills": len(kills),
        "kills_planned": args.kills,
        "resumes": len(kills),
        "aimed": dict(Counter(k["target"] for k in kills)),
        "landed": dict(sorted(landed.items())),
        "survivors": sum(len(k["survivors"]) for k in kills),
        "checkpoints_checked": sum(len(k["checkpoints"]) for k in kills)
        + sum(len(c["episodes"]) for c in final_check.values()),
        "unfinished_folders_seen": sum(len(k["unfinished"]) for k in kills),
        "corrupt_checkpoints": len(corrupt),
        "corrupt": corrupt,
        "metrics": metrics,
        "checkpoints": checkpoints,
        "divergences": metrics["differences"] + checkpoints["differences"],
        "reference_s": round(reference_s, 1),
        "soak_s": round(soak_s, 1),
        "total_s": round(time.time() - begin, 1),
        "profile_median_s": {k: round(v, 3) for k, v in profile.items()},
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "kill_log": kills,
    }
    from bench_common import write_result  # noqa: PLC0415 - the benchmarks folder is on sys.path

    write_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("kill_log", "metrics", "checkpoints")}, indent=1))
    print(f"divergences {result['divergences']}, corrupt checkpoints {len(corrupt)}, survivors {result['survivors']}; "
          f"wrote {args.json}", flush=True)
    return result


def _cpu_model() -> str:
    from bench_common import cpu_model  # noqa: PLC0415

    return cpu_model()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":  # one life of the run: _child TRACE -- <faster-vla argv>
        _child_main(argv[1], argv[3:])
        return
    import tyro  # noqa: PLC0415

    result = soak(tyro.cli(SoakArgs, args=argv))
    if result["divergences"] or result["corrupt_checkpoints"] or result["survivors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
