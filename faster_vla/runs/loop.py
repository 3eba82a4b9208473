"""The fine-tuning loop (the paper's VLA protocol, §5.3 and appendix B).

One episode at a time: act with the train-time selection rule, executing whole chunks; store the episode
with the frozen-actor cache of every state a window can start or bootstrap at; run the learner's updates
(episode-wise: U updates of UTD critic steps each); every K episodes evaluate greedily on a fixed set of the
suite's init states; log, plot and checkpoint. Counters: env steps, episodes, successes, and FLOPs split into
acting, caching and updates (cumulative: the paper's Fig. 7 x-axis).

Everything a resume needs is in the run checkpoint (learner, replay with its cache, sampling RNG, counters,
and the actor trainer with its success buffer when the actor trains); per-episode randomness (init state,
noises) derives from (seed, episode), so a resumed run continues exactly as an uninterrupted one would from
that checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from faster_vla.libero.config import EnvsConfig
from faster_vla.libero.rollout import WorkerFailuresExceededError, num_init_states, open_envs
from faster_vla.runs.config import TrainConfig
from faster_vla.runs.logger import CONFIG_FILE, RunLogger
from faster_vla.runs.run import Run

RECENT_EPISODES = 20
"""Episodes in the moving success rate `train/recent_success_rate`: the cumulative rate hides a trend."""


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns the final counters, the last eval success and, when this
    process ran the final evaluation, its per-episode outcomes (init state, success, steps)."""
    run = Run(config, log=log)
    if config.resume:
        if run.restore():
            log(f"resumed {config.run_dir} at episode {run.counters.episodes} ({run.counters.env_steps} env steps)")
        elif (config.run_dir / CONFIG_FILE).is_file():
            # Stopped before its first checkpoint (metrics may hold episodes logged since): it starts again at
            # episode 0 with the same config (the logger checks it) and its log rewound, as if never started.
            log(f"--resume: {config.run_dir} has no checkpoint yet (it stopped before its first); starting it again "
                "from episode 0")
        else:
            raise FileNotFoundError(f"--resume: {config.run_dir} holds no run (no {CONFIG_FILE}, no checkpoint in "
                                    f"{run.checkpointer.directory}); start without --resume")
    elif run.checkpointer.latest_episode is not None:
        raise FileExistsError(f"{config.run_dir} already holds a run: pass --resume to continue it, or choose "
                              "another --run-dir")
    total_env_steps = config.episodes * config.env.episode_max_steps()
    if config.env_step_budget is not None:
        total_env_steps = min(total_env_steps, config.env_step_budget)
    eval_success: float | None = None

    def finished() -> bool:  # episodes done, or the env-step budget spent
        c = run.counters
        return c.episodes >= config.episodes or (config.env_step_budget is not None
                                                 and c.env_steps >= config.env_step_budget)

    # `resume` and `envs` (where the env workers run) are how this process runs, not part of the run: the stored
    # config carries their defaults, so a run may be resumed on another backend or cluster.
    stored = dataclasses.replace(config, resume=False, envs=EnvsConfig())
    with RunLogger(config.run_dir, stored, resume=config.resume, wandb_mode=config.wandb_mode,
                   total_env_steps=total_env_steps, progress=config.progress) as logger:
        if config.resume:
            logger.rewind(run.counters.episodes)  # drop records logged after the checkpoint
        # A local Ray (ray backend, no address) is started here, sized for the eval workers opened later too.
        eval_workers = config.eval_num_workers if config.eval_num_workers > 1 else 0
        envs = open_envs(config.env, config.num_envs, config.envs, local_ray_workers=config.num_envs + eval_workers)
        if config.envs.backend == "ray":
            log(f"env workers: {config.num_envs} Ray actors ({envs.name}-w*), on "
                f"{config.envs.ray_address or 'a local Ray'}")
        try:
            key = jax.random.key(config.seed)
            init_states = num_init_states(envs)
            while not finished():
                start = time.perf_counter()
                # A round: up to num_envs episodes in lockstep, never across a checkpoint or evaluation, so
                # those happen where they would with one env and a resume repeats no stored episode.
                first = run.counters.episodes
                size = min(config.num_envs, config.episodes - first, _until(first, config.checkpoint_every),
                           _until(first, config.eval_every) if config.eval_every else config.num_envs)
                episodes = [(episode_init_state(config.seed, e, init_states), jax.random.fold_in(key, e))
                            for e in range(first, first + size)]
                for trajectory in run.rollout(envs, episodes):
                    if finished():  # the env-step budget ran out earlier in this round: the rest is dropped
                        break
                    c = run.counters
                    c.episodes += 1
                    c.env_steps += trajectory.steps
                    c.successes += int(trajectory.success)
                    c.acting_flops += trajectory.acting_flops
                    c.cache_flops += run.store(trajectory)
                    infos = []
                    due = config.updates_per_episode  # episode-wise, the paper's VLA setting
                    update_start = time.perf_counter()
                    if config.selection.rule != "base" and run.replay.num_windows(run.horizon, run.stride) > 0:
                        infos = [run.update() for _ in range(due)]  # each ends on a host sync (float(info))
                    update_ms = (time.perf_counter() - update_start) * 1e3 / max(len(infos), 1)
                    actor_start = time.perf_counter()
                    actor_infos = run.update_actor(due)  # nothing unless the actor trains and something succeeded
                    actor_ms = (time.perf_counter() - actor_start) * 1e3 / max(len(actor_infos), 1)
                    c.wall_s += time.perf_counter() - start
                    start = time.perf_counter()  # a round's rollout counts towards its first episode
                    # The log holds one record per earlier episode (a resume rewinds it to the checkpoint).
                    recent = [r["train/success"] for r in logger.records[-(RECENT_EPISODES - 1):]]
                    recent.append(float(trajectory.success))
                    metrics = {"episodes": c.episodes, "env_steps": c.env_steps, "updates": c.updates,
                               "flops": c.flops, "flops/acting": c.acting_flops, "flops/cache": c.cache_flops,
                               "flops/update": c.update_flops, "train/success": float(trajectory.success),
                               "train/success_rate": c.successes / c.episodes,
                               "train/recent_success_rate": float(np.mean(recent)), "train/episode_steps": trajectory.steps,
                               "train/init_state": trajectory.init_state,
                               "envs/worker_failures": c.worker_failures, "wall_s": c.wall_s}
                    metrics.update({f"time_ms/{k}": v for k, v in trajectory.timing_ms.items()})
                    if infos:
                        metrics.update({f"update/{k}": float(np.mean([i[k] for i in infos])) for k in infos[0]})
                        metrics["time_ms/update"] = update_ms  # mean wall time of one update (first ones compile)
                    if run.successes is not None:
                        metrics.update({"actor/updates": c.actor_updates, "actor/success_chunks": len(run.successes),
                                        "flops/actor_update": c.actor_update_flops})
                    if actor_infos:
                        metrics.update({f"actor/{k}": float(np.mean([i[k] for i in actor_infos])) for k in actor_infos[0]})
                        metrics["time_ms/actor_update"] = actor_ms  # mean wall time of one flow-loss step
                    evaluate = (config.eval_every and c.episodes % config.eval_every == 0) or finished()
                    if evaluate:
                        eval_success = run.evaluate(envs)
                        metrics["eval/success_rate"] = eval_success
                        metrics["eval/protocol"] = config.eval_protocol  # which protocol scored it
                    # Cumulative wall time per stage (the checkpoint written below shows in the next record).
                    metrics.update({f"time_s/{k}": v for k, v in c.time_s.items()})
                    logger.log(metrics, step=c.episodes)
                    if evaluate or c.episodes % config.checkpoint_every == 0:
                        run.save(eval_success if evaluate else None)
        except WorkerFailuresExceededError as exc:  # raised before anything of the failed round was saved
            latest = run.checkpointer.latest_episode
            exc.add_note(f"the run's last checkpoint ({'none yet' if latest is None else f'episode {latest}'}) is "
                         "intact: fix the cause and continue with --resume (--envs.max-worker-failures, now "
                         f"{config.envs.max_worker_failures}, sets how many failures a run recovers from)")
            raise
        finally:
            envs.close()
            run.close()
    # The final evaluation's per-episode outcomes, when this process ran it (a resume of a finished run does not).
    eval_episodes = run.last_eval if eval_success is not None else None
    return {"counters": dataclasses.asdict(run.counters), "eval_success": eval_success, "eval_episodes": eval_episodes}


def episode_init_state(seed: int, episode: int, num_init_states: int) -> int:
    """The init state training episode `episode` (0-based) starts from: a function of (seed, episode) alone, so
    runs of any method with the same seed and task meet the same init states in the same order (paired)."""
    return int(np.random.default_rng([seed, 2, episode]).integers(num_init_states))


def _until(episodes: int, every: int) -> int:
    """Episodes until the next multiple of `every` (every > 0)."""
    return every - episodes % every
