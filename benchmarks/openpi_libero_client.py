"""Run openpi's own LIBERO client (openpi's examples/libero/main.py, unmodified) on chosen tasks against a policy
server, and record every episode's outcome: the reference `faster-vla eval --protocol openpi` is compared with.

openpi's main.py evaluates every task of a suite (`for task_id in range(task_suite.n_tasks)`) and takes no task
argument. This driver loads main.py from a path you give (a copy of openpi, not shipped here) and runs its
`eval_libero` unchanged, with three things around it, none of which touches an episode:

- the suite main.py sees holds only the `--tasks` asked for (libero's own task objects and init states, in the
  given order), so `task_id` 0 of main.py's loop is the first task asked for;
- `imageio` (main.py writes a replay video per episode) is replaced by a stub that writes nothing when the
  package is missing (faster-vla does not install it);
- the env class main.py creates (`OffScreenRenderEnv`) is a subclass that counts the steps of each episode
  (and is closed after the run, which main.py leaves to the interpreter's exit), and a logging handler reads
  main.py's own "Success: ..." line of each episode (and any error it caught).

With `--eval-noise-seed S` (not openpi's: a check of our own) each request also carries, in the server's `noise`
extension, the noise `faster-vla eval --protocol openpi --seed S` draws at that decision of that episode (episode
i's key `fold_in(key(S), i)`, split once per decision, then as `Agent.act_batch` splits it), so the server acts
as our eval's policy does; without it the server draws noise from its own stream, as it does for openpi.

Usage (a policy server on port 8000, e.g. `faster-vla serve --actor.preset pi05_libero_small --port 8000`):

    python benchmarks/openpi_libero_client.py --openpi-main /tmp/openpi/examples/libero/main.py \
        --tasks 20 --trials 10 --port 8000 --out benchmarks/results/openpi_client_task20.json

Needs what main.py imports: the LIBERO simulator (`pip install -e ".[libero]"`), openpi_client
(`pip install --no-deps openpi-client==0.1.2`), tyro and tqdm (faster-vla dependencies).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import Any


class _RestrictedSuite:
    """A LIBERO suite seen through a list of its task ids: task i of this view is task `ids[i]` of the suite."""

    def __init__(self, suite: Any, ids: list[int]) -> None:
        self._suite, self._ids = suite, ids
        self.n_tasks = len(ids)

    def get_task(self, i: int) -> Any:
        return self._suite.get_task(self._ids[i])

    def get_task_init_states(self, i: int) -> Any:
        return self._suite.get_task_init_states(self._ids[i])


class _EpisodeLog(logging.Handler):
    """Collects main.py's per-episode log lines: 'Success: True/False' and 'Caught exception: ...'."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.successes: list[bool] = []
        self.errors: list[tuple[int, str]] = []  # (episode number, message)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Success: "):
            self.successes.append(message.split(":", 1)[1].strip() == "True")
        elif message.startswith("Caught exception"):
            self.errors.append((len(self.successes), message))


def load_main(path: Path) -> types.ModuleType:
    """openpi's examples/libero/main.py as a module (imageio stubbed when missing)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    if importlib.util.find_spec("imageio") is None:
        sys.modules["imageio"] = types.SimpleNamespace(mimwrite=lambda *args, **kwargs: None)
    spec = importlib.util.spec_from_file_location("openpi_libero_main", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_noise(seed: int, shape: tuple[int, int]) -> tuple[Any, Any]:
    """(start(episode), next()): the base policy's noise [H, A] at each decision of `faster-vla eval`'s episodes."""
    import jax  # noqa: PLC0415

    state: dict[str, Any] = {}

    def start(episode: int) -> None:
        state["key"] = jax.random.fold_in(jax.random.key(seed), episode)  # init_state_keys

    def draw() -> Any:
        state["key"], sub = jax.random.split(state["key"])  # rollout._Live.next_key
        k_noise = jax.random.split(sub, 3)[0]  # Agent.act_batch: (noise, selection, critic) keys
        import numpy as np  # noqa: PLC0415

        return np.asarray(jax.random.normal(k_noise, (1, *shape))[0], np.float32)  # the base rule's one seed

    return start, draw


def run(openpi_main: Path, suite: str, tasks: list[int], trials: int, host: str, port: int, seed: int,
        video_dir: Path, eval_noise_seed: int | None = None, noise_shape: tuple[int, int] = (10, 32)) -> dict[str, Any]:
    main = load_main(openpi_main)
    benchmark = main.benchmark  # libero.libero.benchmark, as main.py imported it
    full = benchmark.get_benchmark_dict()[suite]()
    main.benchmark = types.SimpleNamespace(get_benchmark_dict=lambda: {suite: lambda: _RestrictedSuite(full, tasks)})

    steps: list[int] = []  # env.step calls of each episode, wait steps included
    envs: list[Any] = []

    class CountingEnv(main.OffScreenRenderEnv):  # type: ignore[name-defined, misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            envs.append(self)

        def reset(self) -> Any:
            steps.append(0)
            if eval_noise_seed is not None:
                start_noise((len(steps) - 1) % trials)  # the episode's init state index within its task
            return super().reset()

        def step(self, action: Any) -> Any:
            steps[-1] += 1
            return super().step(action)

    main.OffScreenRenderEnv = CountingEnv
    if eval_noise_seed is not None:
        start_noise, draw_noise = _eval_noise(eval_noise_seed, noise_shape)
        client_class = main._websocket_client_policy.WebsocketClientPolicy
        infer = client_class.infer

        class NoiseClient(client_class):  # type: ignore[misc, valid-type]
            def infer(self, obs: dict) -> dict:
                return infer(self, {**obs, "noise": draw_noise()})

        main._websocket_client_policy = types.SimpleNamespace(WebsocketClientPolicy=NoiseClient)
    handler = _EpisodeLog()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    start = time.time()
    try:
        main.eval_libero(main.Args(host=host, port=port, task_suite_name=suite, num_trials_per_task=trials,
                                   seed=seed, video_out_path=str(video_dir)))
    finally:
        for env in envs:  # before the interpreter's EGL teardown, which would otherwise complain
            env.close()
    wall_s = time.time() - start
    logging.getLogger().removeHandler(handler)
    if len(handler.successes) != len(tasks) * trials:
        raise RuntimeError(f"expected {len(tasks) * trials} episodes, main.py logged {len(handler.successes)}")
    args = main.Args()
    results: dict[str, Any] = {}
    for t, task_id in enumerate(tasks):
        task = full.get_task(task_id)
        episodes = []
        for i in range(trials):
            k = t * trials + i
            episodes.append({"init_state": i, "success": handler.successes[k],
                             # env.step calls less the wait steps: the policy steps of the episode
                             "steps": steps[k] - args.num_steps_wait})
        successes = sum(e["success"] for e in episodes)
        results[str(task_id)] = {"name": task.name, "instruction": task.language, "trials": trials,
                                 "successes": successes, "success_rate": successes / trials, "episodes": episodes}
    return {"client": f"openpi examples/libero/main.py ({openpi_main})", "suite": suite, "seed": seed,
            "replan_steps": args.replan_steps, "resize_size": args.resize_size,
            "num_steps_wait": args.num_steps_wait, "server": f"{host}:{port}", "wall_s": wall_s,
            "noise": ("the server's own stream" if eval_noise_seed is None else
                      f"faster-vla eval --seed {eval_noise_seed}'s per-episode keys (the server's noise extension)"),
            "errors": handler.errors, "tasks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openpi-main", type=Path, required=True, help="path to openpi's examples/libero/main.py")
    parser.add_argument("--suite", default="libero_90")
    parser.add_argument("--tasks", type=int, nargs="+", default=[20], help="task ids of the suite, in order")
    parser.add_argument("--trials", type=int, default=10, help="episodes per task, on init states 0..trials-1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=7, help="main.py's --seed (its default 7)")
    parser.add_argument("--video-dir", type=Path, default=Path("/tmp/openpi_libero_videos"))
    parser.add_argument("--eval-noise-seed", type=int, default=None,
                        help="send the noise `faster-vla eval --seed S` would draw (a check; not openpi's client)")
    parser.add_argument("--noise-shape", type=int, nargs=2, default=(10, 32), help="the policy's [H, A] noise")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the per-episode results")
    args = parser.parse_args()
    report = run(args.openpi_main, args.suite, args.tasks, args.trials, args.host, args.port, args.seed,
                 args.video_dir, args.eval_noise_seed, tuple(args.noise_shape))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for task_id, r in report["tasks"].items():
        print(f"task {task_id} ({r['name']}): {r['successes']}/{r['trials']} "
              f"{[int(e['success']) for e in r['episodes']]}")


if __name__ == "__main__":
    main()
