"""The fine-tuning run's configuration: critic sizes, the train config, the learner built from it, and the named
configs `faster-vla train <name>` starts from (kept apart from the loop, as openpi keeps its config list)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from faster_vla.acting.actor_source import ActorSource
from faster_vla.acting.flow_trainer import ActorFinetuneConfig
from faster_vla.critics.edit_policy import EditPolicyConfig
from faster_vla.critics.encoders import encoder_for_pi05
from faster_vla.critics.networks import ChunkCriticConfig, NoiseCriticConfig
from faster_vla.libero.config import STATE_DIM, EnvsConfig, LiberoEnvConfig, ProtocolName, check_num_workers, get_protocol
from faster_vla.policies.transforms import LIBERO_ACTION_DIM
from faster_vla.rl.filtering import FilterSchedule
from faster_vla.rl.learner import LearnerConfig
from faster_vla.rl.selection import SelectionConfig


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """Critic and edit-policy sizes (defaults: the ≈20M-parameter noise critic of the design card)."""

    hidden_dims: tuple[int, ...] = (768, 768)
    """Hidden widths of every ensemble member's MLP (and of the edit policy)."""
    num_members: int = 10
    """Ensemble members of Q^a and Q^dn (min over a random pair)."""
    feature_proj_dim: int = 1024
    """Width the frozen backbone's prefix features are projected to."""
    state_embed_dim: int = 64
    """Width of the proprio state embedding."""
    edit_scale: float = 0.2
    """EXPO's β: the edit's bound around the base chunk (normalised units); 0.2 for the VLA."""
    encoder: Literal["backbone", "resnet"] = "backbone"
    """What the critics and the edit policy see besides the state: the frozen VLM's prefix features (the
    paper's VLA setting; free, since acting computes them), or the base and wrist cameras through their own
    small ResNet (stored in replay as uint8 at the model's image size: ~2·S²·3 bytes per step)."""
    resnet_stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    """With encoder resnet: basic blocks per ResNet stage (default ResNet-34, EXPO's π0.5 recipe; each stage
    after the first halves the resolution and doubles the width). Fewer, e.g. (1, 1), for a cheap critic."""
    resnet_filters: int = 64
    """With encoder resnet: the first stage's channels (doubled per stage: 512 at the last of 4 stages, and
    2 cameras × that in the embedding)."""
    edit_init_temperature: float = 1.0
    """EXPO's initial entropy temperature α of the edit policy (1.0). log α moves by about the learning rate
    per update, so over a short run (≈100 updates) α stays near it and the edits stay near-uniform
    exploration; a smaller value lets the critic steer them from the start (docs/reproduction.md)."""

    def __post_init__(self) -> None:
        if self.encoder not in ("backbone", "resnet"):
            raise ValueError(f"critics.encoder must be 'backbone' or 'resnet', got {self.encoder!r}")
        if not self.resnet_stage_sizes or any(n < 1 for n in self.resnet_stage_sizes):
            raise ValueError(f"critics.resnet_stage_sizes must be block counts >= 1 (one per stage), got "
                             f"{list(self.resnet_stage_sizes)}")
        if self.resnet_filters < 1:
            raise ValueError(f"critics.resnet_filters must be >= 1, got {self.resnet_filters}")
        if not self.edit_init_temperature > 0:
            raise ValueError(f"edit_init_temperature must be > 0 (α is learned in log space), got "
                             f"{self.edit_init_temperature}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A FASTER-EXPO (or EXPO, or base) fine-tuning run of π0.5 on one LIBERO task."""

    run_dir: Path = Path("runs/faster_expo")
    """Run folder: config, metrics, plots, wandb files and checkpoints."""
    actor: ActorSource = ActorSource()
    """The frozen π0.5 policy being fine-tuned."""
    env: LiberoEnvConfig = LiberoEnvConfig()
    """The LIBERO task (suite, task id or name, rendering)."""
    selection: SelectionConfig = SelectionConfig("faster", num_candidates=8, temperature=0.0)
    """Train-time selection rule (evaluation uses the same rule, greedy)."""
    critics: CriticConfig = CriticConfig()
    """Critic sizes."""
    episodes: int = 500
    """Training episodes."""
    env_step_budget: int | None = None
    """Also stop after the episode that brings the run to this many env steps (methods compared side by side
    get the same budget; episodes that succeed sooner leave more of it). None: only `episodes` counts."""
    updates_per_episode: int = 3
    """Updates after each episode (the paper's VLA setting: 3)."""
    utd: int = 10
    """Critic steps per update (each on its own minibatch)."""
    batch_size: int = 32
    """Windows per critic step."""
    gamma: float = 0.99
    """Per-step discount."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    learning_rate: float = 3e-4
    """Adam learning rate of critics, edit policy and α."""
    num_steps: int = 10
    """Euler denoising steps of the actor."""
    filter_steps: tuple[int, ...] = ()
    """The general filtering MDP (paper §4.1–4.2): the Euler steps k_1 < … < k_J (0 = pure noise) at which Q^dn
    filters the candidates, with `filter_keep` survivors each (the last keeps 1). Empty (default): §4.3's one
    filter at the initial noise. Needs a rule that scores noises (faster, faster_idql); Q^dn becomes
    time-conditioned and replay caches every seed's x_t at the filter steps."""
    filter_keep: tuple[int, ...] = ()
    """Survivors m_1 > … > m_J = 1 after each of `filter_steps` (same length)."""
    window_starts: Literal["chunk", "step"] = "chunk"
    """Where replay windows may start: at chunk boundaries (observed when rendering chunk_boundary), or at
    every step (the paper's all-sliding-windows, appendix B, and the pi05_libero presets'; needs
    env.render_mode=every_step and caches every step: the rows no decision was made at cost a prefix too)."""
    cache_seeds: int = 32
    """K: noises cached per replay row, with their denoised chunks (the frozen-actor cache). Each critic step
    draws N = selection.num_candidates of them per row afresh, for Q^dn's regression and the TD target's a',
    so Q^dn keeps meeting new (state, noise) pairs, as the authors' fresh noises at every critic step do
    (Algorithm 1, line 1). K = N freezes each row's pool: every update sees the same N seeds (the cpu_small
    presets, for their committed results). Costs K denoisings per row and ≈ K·H·A_model·8 bytes per row."""
    td_backup: Literal["split", "min"] = "split"
    """Which target critics pick the TD target's a' and which value it: split (the FASTER authors': one random
    pair, one member picks, the other values) or min (EXPO's: picked by the min of one random pair, valued by
    the min of another, pessimistic twice). pi05_libero_expo uses min, the cpu_small presets min."""
    alpha_entropy: Literal["edit", "tanh"] = "edit"
    """Where the edit policy's α measures entropy against −|A|/2: edit (the authors' default: the edit β·y's
    entropy, which at β = 0.2 never reaches the target, so α rises slowly) or tanh (the tanh sample's: α
    decays once the edits are broad; the cpu_small presets, for their committed results)."""
    replay_capacity: int = 100_000
    """Replay size in env steps (whole episodes are evicted, oldest first)."""
    cache_batch: int = 16
    """Observations per actor call when caching an episode."""
    cache_from_acting: bool = True
    """Compute the frozen-actor cache of each row a decision was made at from the prefix that decision encoded
    (no observation is encoded twice). False encodes every stored observation again after its episode (the
    cache is the same up to float rounding; for measuring what the shared encode saves)."""
    eval_every: int = 10
    """Evaluate every this many episodes (0: never); also at the end."""
    eval_episodes: int = 10
    """Evaluation episodes, on the suite's init states 0..eval_episodes-1 (the same every time)."""
    eval_protocol: ProtocolName = "chunk"
    """How the evaluations run (docs/finetune.md, "Evaluation protocols"): chunk, whole chunks in the training
    env (as training acts); openpi, openpi's LIBERO client exactly (replan every 5 steps, 256² renders at every
    step resized to 224² by PIL, hard resets, the suite's max steps whatever env.max_steps says), in eval envs
    of its own opened for each evaluation. Logged with each evaluation (eval/protocol)."""
    num_envs: int = 1
    """Training episodes stepped in lockstep over this many env workers (processes, or Ray actors with
    --envs.backend ray), the policy acting once per round on all of them (1 on the local backend: one env in
    this process). Episode i's init state and keys depend only on (seed, i); the learner still takes
    `updates_per_episode` updates after each episode, but the episodes of a round act with the learner of its
    start (rounds never straddle a checkpoint or an evaluation). Each worker needs ~2 GB of RAM and, on CPU,
    about a core (rendering dominates a step)."""
    shard_actor_params: bool = False
    """With several local accelerators, split the actor's parameters over them (each array along its largest
    evenly dividing axis) instead of copying the whole actor to each: for an actor that does not fit one device.
    Decisions stay data-parallel over the same devices; one device: no effect."""
    envs: EnvsConfig = EnvsConfig()
    """Where the env workers run (this machine's processes, or Ray actors on a Ray cluster) and how many worker
    failures the run recovers from. Not part of the run: a resume may choose differently (config.json keeps
    the defaults)."""
    eval_num_workers: int = 1
    """Env worker processes for the evaluation (1: the training env). More step the eval episodes in lockstep, the
    policy acting once per step on all of them; each needs ~2 GB of RAM and, on CPU, about a core (rendering
    dominates a step). Started at the first evaluation and kept until the run ends."""
    checkpoint_every: int = 5
    """Save a run checkpoint every this many episodes (and after each evaluation and at the end)."""
    actor_update: Literal["frozen", "success_bc"] = "frozen"
    """What happens to the actor: frozen (the FASTER-EXPO default: replay caches what the actor computes), or
    success_bc (EXPO's π0.5 recipe): after each episode's learner updates, the action expert also takes
    flow-loss steps on the chunks of the successful training episodes (VLM frozen) and the actor acts with
    their EMA. Replay rows keep the chunks the actor produced when they were stored (docs/finetune.md)."""
    actor_optimizer: ActorFinetuneConfig = ActorFinetuneConfig()
    """The action expert's optimiser, EMA, augmentation, batch size and flow-loss steps per learner update
    (with --actor-update success_bc)."""
    success_capacity: int = 2000
    """Chunks of successful episodes kept for the actor's flow loss (oldest episodes dropped first); each holds
    its two camera images, so this bounds memory and checkpoint size."""
    keep_last: int = 3
    """Checkpoints kept by recency."""
    keep_best: int = 1
    """Checkpoints kept by eval success."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb logging: offline (default, no login), online, or disabled."""
    progress: bool = True
    """Show a progress bar on a terminal."""
    seed: int = 0
    """Seed of init-state choice, noises, critics and replay sampling."""

    def __post_init__(self) -> None:
        for name in ("episodes", "updates_per_episode", "utd", "batch_size", "num_steps", "replay_capacity",
                     "cache_batch", "checkpoint_every", "keep_last", "eval_episodes", "success_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_num_workers(self.num_envs, "num_envs")
        check_num_workers(self.eval_num_workers, "eval_num_workers")
        get_protocol(self.eval_protocol)  # an unknown name fails here, listing the protocols
        if self.env_step_budget is not None and self.env_step_budget < 1:
            raise ValueError(f"env_step_budget must be >= 1 or None, got {self.env_step_budget}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        if len(self.filter_steps) != len(self.filter_keep):
            raise ValueError(f"filter_steps {list(self.filter_steps)} and filter_keep {list(self.filter_keep)} must "
                             "have the same length (one survivor count per filter step)")
        if self.filter_steps:
            if not self.selection.uses_noise_critic:
                raise ValueError(f"filter_steps filter with Q^dn, but selection rule {self.selection.rule!r} "
                                 "scores no noise; choose --selection.rule faster or faster_idql")
            try:  # bad steps or survivor counts fail here, before anything is built
                self.filter_schedule()
            except ValueError as e:
                raise ValueError(f"filter_steps {list(self.filter_steps)} / filter_keep {list(self.filter_keep)} "
                                 f"(with num_steps {self.num_steps}, selection.num_candidates "
                                 f"{self.selection.num_candidates}): {e}") from e
        if self.window_starts not in ("chunk", "step"):
            raise ValueError(f"window_starts must be 'chunk' or 'step', got {self.window_starts!r}")
        if self.window_starts == "step" and self.env.render_mode != "every_step":
            raise ValueError("window_starts='step' trains on windows starting at every step, which needs an "
                             "observation at every step: set --env.render-mode every_step (or use "
                             "--window-starts chunk)")
        if self.cache_seeds < self.selection.num_candidates:
            raise ValueError(f"cache_seeds ({self.cache_seeds}) must be >= selection.num_candidates "
                             f"({self.selection.num_candidates}): each critic step draws N of the K cached seeds")
        if self.td_backup not in ("split", "min"):
            raise ValueError(f"td_backup must be 'split' or 'min', got {self.td_backup!r}")
        if self.alpha_entropy not in ("edit", "tanh"):
            raise ValueError(f"alpha_entropy must be 'edit' or 'tanh', got {self.alpha_entropy!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.actor_update not in ("frozen", "success_bc"):
            raise ValueError(f"actor_update must be 'frozen' or 'success_bc', got {self.actor_update!r}")
        if self.actor_update == "success_bc":
            if self.actor_optimizer.trainable != "action_expert":
                raise ValueError("--actor-update success_bc trains the action expert only: replay caches the "
                                 "frozen VLM's prefix features, which training the VLM would make stale; set "
                                 "--actor-optimizer.trainable action_expert")
            if self.env.render_mode == "none":
                raise ValueError("--actor-update success_bc trains on the camera images of successful episodes: "
                                 "set --env.render-mode chunk_boundary (or every_step)")

    def filter_schedule(self) -> FilterSchedule | None:
        """The filtering MDP's schedule, or None for §4.3's single filter at the initial noise."""
        if not self.filter_steps:
            return None
        return FilterSchedule(self.selection.num_candidates, self.num_steps,
                              tuple(zip(self.filter_steps, self.filter_keep)))


def learner_config(config: TrainConfig, actor_config: Any) -> LearnerConfig:
    """Critics sized by `config.critics`, shaped for this actor (chunks [H, 7], noise [H, A_model])."""
    c = config.critics
    encoder = encoder_for_pi05(actor_config, "backbone" if c.encoder == "backbone" else "image",
                               state_dim=STATE_DIM, state_embed_dim=c.state_embed_dim,
                               feature_proj_dim=c.feature_proj_dim, resnet_stage_sizes=tuple(c.resnet_stage_sizes),
                               resnet_filters=c.resnet_filters)
    chunk = (actor_config.action_horizon, LIBERO_ACTION_DIM)
    schedule = config.filter_schedule()
    return LearnerConfig(
        chunk_critic=ChunkCriticConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=c.hidden_dims,
                                       num_members=c.num_members),
        noise_critic=NoiseCriticConfig(encoder=encoder, noise_shape=(actor_config.action_horizon,
                                                                     actor_config.action_dim),
                                       hidden_dims=c.hidden_dims, num_members=c.num_members,
                                       time_conditioned=schedule is not None),
        edit_policy=EditPolicyConfig(encoder=encoder, chunk_shape=chunk, hidden_dims=c.hidden_dims, beta=c.edit_scale),
        selection=config.selection,
        gamma=config.gamma, tau=config.tau, utd=config.utd, batch_size=config.batch_size,
        critic_lr=config.learning_rate, policy_lr=config.learning_rate, temperature_lr=config.learning_rate,
        init_temperature=c.edit_init_temperature, filter_schedule=schedule, td_backup=config.td_backup,
        alpha_entropy=config.alpha_entropy,
    )


# The paper's VLA setting in the FASTER authors' forms (docs/finetune.md, "Faithful to the method"): every
# sliding window (observations rendered at every step), K = 32 cached seeds per row of which each critic step
# draws N = 8, the split TD backup (EXPO's preset: min) and α's entropy in edit space.
_PI05_LIBERO = TrainConfig(actor=ActorSource("pi05_libero"), env=LiberoEnvConfig(render_mode="every_step"),
                           window_starts="step", cache_seeds=32, td_backup="split", alpha_entropy="edit")
# The built-in small π0.5 (checkpoints/pi05_libero_small, pretrained on scripted demonstrations) on the
# task where its base success is mid-band, libero_90 task 20 "turn on the stove" (60 %, MODEL_CARD.md),
# with small critics: every part of a real run, on a 2-core CPU. Images at the model's 112² input; episodes
# cut at 200 steps (the expert needs ~100); windows start at chunk boundaries (observations rendered only
# there). N = 8 as in the paper's VLA setting. Unlike the paper's 100k-step runs, 200 episodes (~28k env steps)
# must show learning, so the critics get 10 updates per episode instead of 3 and EXPO's edit step starts at
# α 0.01 instead of 1 (log α moves by about the learning rate per update, so from 1 the edits stay
# near-uniform noise for thousands of updates). Measured in docs/reproduction.md, "A 300-episode run".
# Those committed results used the forms kept here, not the authors' (docs/reproduction.md, "Which forms"): each
# row's 8 seeds frozen (K = N), the doubly pessimistic min TD backup, α's entropy in tanh space, chunk windows.
_CPU_SMALL = TrainConfig(
    actor=ActorSource("pi05_libero_small"),
    env=LiberoEnvConfig(suite="libero_90", task=20, max_steps=200, image_size=112),
    selection=SelectionConfig("faster", num_candidates=8, temperature=0.0),
    critics=CriticConfig(hidden_dims=(128, 128), num_members=4, feature_proj_dim=64, state_embed_dim=16,
                         edit_init_temperature=0.01),
    episodes=200, updates_per_episode=10, utd=10, batch_size=32, replay_capacity=20_000, cache_batch=8,
    eval_every=50, eval_episodes=20, checkpoint_every=10,
    window_starts="chunk", cache_seeds=8, td_backup="min", alpha_entropy="tanh",
)

TRAIN_CONFIGS: dict[str, tuple[str, TrainConfig]] = {
    "pi05_libero_faster_expo": (
        "FASTER-EXPO on openpi's pi05_libero (paper's VLA setting: N 8, greedy, 3 updates × UTD 10, batch 32, "
        "every sliding window; the authors' TD backup, α target and fresh seed draws)",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_faster_expo"))),
    "pi05_libero_expo": (
        "EXPO (best-of-N: denoise all 8, edit each, argmax Q) on pi05_libero, EXPO's min TD backup",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_expo"),
                            selection=SelectionConfig("best_of_n", 8, 0.0), td_backup="min")),
    "pi05_libero_base": (
        "The frozen pi05_libero policy alone (no learning): the baseline curve",
        dataclasses.replace(_PI05_LIBERO, run_dir=Path("runs/pi05_libero_base"), selection=SelectionConfig("base", 1),
                            env=LiberoEnvConfig(), window_starts="chunk")),
    "cpu_small_faster_expo": (
        "FASTER-EXPO with the built-in pretrained small π0.5 on libero_90 task 20, on CPU",
        dataclasses.replace(_CPU_SMALL, run_dir=Path("runs/cpu_small_faster_expo"))),
    "cpu_small_expo": (
        "EXPO (best-of-N) with the built-in small π0.5 on CPU",
        dataclasses.replace(_CPU_SMALL, run_dir=Path("runs/cpu_small_expo"),
                            selection=SelectionConfig("best_of_n", 8, 0.0))),
    "cpu_small_base": (
        "The built-in small π0.5 alone (no learning) on CPU: the baseline curve",
        dataclasses.replace(_CPU_SMALL, run_dir=Path("runs/cpu_small_base"), selection=SelectionConfig("base", 1))),
}


def get_config(name: str) -> TrainConfig:
    """A named train config; the error lists the names."""
    if name not in TRAIN_CONFIGS:
        raise ValueError(f"unknown train config {name!r}; choose one of {sorted(TRAIN_CONFIGS)}")
    return TRAIN_CONFIGS[name][1]
