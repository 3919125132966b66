"""RLConfig: the one declaration of the RL settings.

Every `rl.py` flag is a field (kebab-case on the CLI, help text in the field). The controller, the learner,
the task source and every rollout worker read this one dataclass (workers get it as a dict through the spawn
arguments), so each setting has one name and one default. `resolved()` applies --mode; `validate()` names
the bad flag and the fix. `RESUME_NEUTRAL`: the settings a --resume may change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nanoglm5.cli import config_field
from nanoglm5.rl.loss import AGGS, KINDS

f = config_field  # a field with its --help text (cli.add_config_flags)

# Settings that may change between a run and its --resume (the rest must match: training.state.check_resume).
RESUME_NEUTRAL = {"max_steps", "time_budget_s", "resume", "checkpoint", "out_dir", "save_every", "log_every", "wandb",
                  "wandb_project", "plot", "progress", "workers", "worker_threads", "trainer_threads",
                  "lease_timeout_s", "renew_every_s", "n_eval_tasks", "repack", "long_workers", "long_threshold",
                  "backend", "ray_address", "device", "gpus_per_actor", "max_task_failures"}


@dataclass
class RLConfig:
    """Every RL setting, defaults as the main job runs them. GLM-5's async rules (arXiv 2602.15763 §4.1) are on:
    τ-drop by the oldest segment (τ = η), env-crash samples removed, partial rollout (segments w0…wk), and the
    optimizer reset after each push. The reset was measured against none (docs/LOG.md, 2026-12-07): the main
    job's RL stage setting, code_mt, sync, seed 1337, 10 steps from a 200-step SFT checkpoint: batch reward
    after step 1, reset minus none, +0.002 ± 0.004 per step; held-out sampled pass@1 after, +0.008 [−0.014,
    +0.030] (64 tasks × 4 draws, paired): no difference within noise, so GLM-5's choice is kept."""

    checkpoint: str = f("", "the SFT checkpoint to start from (out/sft/ckpt); holds tokenizer.json",
                        aliases=("--init-from",))
    resume: str = f("", "continue a run: 'auto' (= out_dir/ckpt) or a checkpoint path")
    out_dir: str = f("out/rl", "run directory: ckpt/, metrics.jsonl, reward_vs_time.png")
    seed: int = f(1337, "one seed: tasks, sampling (per (seed, group_id)), init")
    mode: str = f("async", "async (workers run ahead up to --max-staleness versions) or sync (η = 0)", choices=("async", "sync"))
    env: str = f("code", "code (the sandboxed judge; where the tiny model learns), code_mt (multi-turn code: failing "
                         "tests fed back, up to --max-turns attempts), math, agent or mix (math, code, agent)",
                choices=("code", "code_mt", "math", "agent", "mix"))
    max_turns: int = f(3, "code_mt: attempts per episode (the first plus max_turns - 1 revisions after feedback)")
    turn_discount: float = f(1.0, "code_mt: reward of a pass at attempt k is turn_discount^(k-1) (1.0 = no discount)")
    # processes, backend and devices
    backend: str = f("mp", "mp (worker processes on this machine) or ray (the workers and the learner as Ray actors)",
                    choices=("mp", "ray"))
    ray_address: str = f("", "--backend ray: join this running cluster ('auto' or host:port); empty = start a local "
                             "one sized to this machine and shut it down at exit")
    device: str = f("cpu", "cpu or cuda: where the learner and the workers run (the workers in bf16 on CUDA; on one "
                           "GPU they share it with the learner)", choices=("cpu", "cuda"))
    gpus_per_actor: float = f(0.0, "--backend ray --device cuda: GPUs each actor asks Ray for (0 = the learner and all "
                                   "workers share one GPU)")
    workers: int = f(2, "rollout worker processes")
    worker_threads: int = f(1, "torch threads per worker")
    trainer_threads: int = f(1, "torch threads of the trainer (the main process)")
    worker_groups: int = f(2, "groups a worker decodes together (continuous batching); 1 = bitwise reproducible")
    env_threads: int = f(32, "judge / environment calls in flight per worker (a slow judge waits here, not the engine)")
    # GRPO batch
    group_size: int = f(8, "G: samples per prompt")
    groups_per_step: int = f(16, "B: groups per optimizer step (RL's gradient is noisy: B·G samples average it)")
    max_steps: int = f(40, "optimizer steps")
    time_budget_s: float = f(0.0, "stop (and save) after this many seconds of training (0 = no limit)")
    max_new_tokens: int = f(48, "tokens per assistant turn")
    max_len: int = f(256, "tokens per trajectory, prompt and observations included")
    temperature: float = f(1.0, "sampling temperature T; the learner's π_θ is the same tempered distribution "
                                      "(logits / T), so the IS ratio compares like with like")
    # staleness and weights
    max_staleness: int = f(2, "η: admit a group only while submitted ≤ (η + v + 1)·B (async mode)")
    drop_tau: int = f(-2, "τ: drop samples whose oldest segment is more than τ versions old (GLM-5 §4.1). -2 (default): "
                          "τ = --max-staleness, η's bound enforced under every --order (fifo admission already keeps "
                          "it, so there it drops nothing); -1 = off")
    order: str = f("fifo", "batch order: fifo (group_id order, staleness ≤ η) or ready (no head-of-line wait)",
                   choices=("fifo", "ready"))
    push_every: int = f(1, "K: optimizer steps per weight push (one rollout batch = K·B groups)")
    reset_optimizer: bool = f(True, "clear the optimizer state after each weight push (GLM-5 §4.1; measured against "
                                    "--no-reset-optimizer: no difference within noise, kept as GLM-5: docs/LOG.md)")
    partial_rollout: bool = f(True, "workers swap in newer weights mid-trajectory (per-segment versions, GLM-5 §4.1's "
                                    "w0…wk) instead of draining their decode batch at every push; a no-op in sync "
                                    "mode (no newer weights while a batch decodes); --no-partial-rollout: slime's "
                                    "between-groups pickup")
    pull_every: int = f(8, "decode steps between relay polls with --partial-rollout")
    repack: bool = f(False, "dynamic repackaging: long groups go to --long-workers dedicated workers")
    long_workers: int = f(1, "workers reserved for long groups with --repack")
    long_threshold: int = f(96, "--repack: a group whose length hint exceeds this many tokens is long")
    lease_timeout_s: float = f(30.0, "a lease not renewed for this long is re-queued (dead worker)")
    renew_every_s: float = f(1.0, "worker heartbeat period")
    max_task_failures: int = f(3, "a group whose worker died this many times is dropped, never trained, with a log "
                                  "line (0 = retry forever); after its first death it runs alone on a worker")
    # loss and optimizer
    loss: str = f("ddis", "ddis (GLM-5), grpo_clip, tis, icepop, is or pg", choices=KINDS)
    agg: str = f("token_mean", "token_mean or sample_mean", choices=AGGS)
    eps_low: float = f(0.2, "ε_l of the IS band / PPO clip")
    eps_high: float = f(0.28, "ε_h of the IS band / PPO clip")
    tis_cap: float = f(2.0, "TIS cap C")
    icepop_beta: float = f(2.0, "IcePop band [1/β, β]")
    std_normalize: bool = f(True, "divide advantages by the group std (False = Dr.GRPO)")
    lr: float = f(1e-4, "AdamW learning rate (constant)")
    weight_decay: float = f(0.0, "decoupled weight decay")
    beta1: float = f(0.9, "AdamW β1")
    beta2: float = f(0.95, "AdamW β2")
    grad_clip: float = f(1.0, "clip the global grad norm (0 = off)")
    micro_batch_size: int = f(16, "sequences per forward/backward")
    # workload and environment
    n_train_tasks: int = f(2000, "training tasks per environment (cycled, reshuffled per epoch)")
    n_eval_tasks: int = f(128, "held-out tasks per environment for the before/after evaluation (0 = none)")
    eval_samples: int = f(8, "seeded draws per held-out task for the sampled pass@1 (0 = greedy only)")
    env_latency_s: float = f(0.0, "agent env: median tool-call latency in seconds (lognormal, p99/p50 = 10)")
    length_median: int = f(0, "benchmark workload: force each group to decode a lognormal length (0 = natural)")
    length_p99_over_p50: float = f(10.0, "skew of the forced lengths")
    judge_latency_s: float = f(0.0, "benchmark workload: seconds each judge call sleeps (a slow grader)")
    allow_unsandboxed: bool = f(False, "run model-written code without bubblewrap (resource limits only, never "
                                       "as root); by default the code judge refuses when bubblewrap cannot run")
    # logging and checkpoints
    save_every: int = f(0, "steps between checkpoints (one is always written at the end)")
    log_every: int = f(1, "steps between log lines")
    wandb: bool = f(False, "log to Weights & Biases (offline unless logged in)")
    wandb_project: str = f("nanoglm5", "W&B project")
    plot: bool = f(True, "write reward_vs_time.png into out_dir")
    progress: bool = f(True, "tqdm progress bar")

    def resolved(self) -> RLConfig:
        """--mode sync is the same code with η = 0 and group-id order (η = 0 is the synchronous schedule); the
        default τ (-2) becomes η."""
        if self.mode not in ("async", "sync"):
            raise ValueError(f"--mode {self.mode!r}: choose async or sync")
        c = replace(self, max_staleness=0, order="fifo") if self.mode == "sync" else self
        if c.drop_tau == -2:  # τ = η: a sample is never older than the admission bound allows (GLM-5 §4.1's τ-drop)
            c = replace(c, drop_tau=c.max_staleness)
        return c

    def validate(self) -> None:
        checks = [
            (self.env in ("math", "code", "code_mt", "agent", "mix"), "--env", "choose math, code, code_mt, agent or mix"),
            (self.max_turns >= 1, "--max-turns", "use at least 1 attempt (3 or more lets the model revise)"),
            (0.0 < self.turn_discount <= 1.0, "--turn-discount", "use a factor in (0, 1] (1.0 = no discount)"),
            (self.drop_tau >= -2, "--drop-tau", "use -2 (τ = --max-staleness), -1 (off) or τ >= 0"),
            (self.loss in KINDS, "--loss", f"choose one of {KINDS}"),
            (self.agg in AGGS, "--agg", f"choose one of {AGGS}"),
            (self.order in ("fifo", "ready"), "--order", "choose fifo or ready"),
            (self.backend in ("mp", "ray"), "--backend", "choose mp or ray"),
            (self.device in ("cpu", "cuda"), "--device", "choose cpu or cuda"),
            (self.gpus_per_actor >= 0, "--gpus-per-actor", "use 0 (share one GPU) or a positive fraction"),
            (self.max_task_failures >= 0, "--max-task-failures", "use 0 (retry forever) or more"),
            (self.temperature > 0, "--temperature", "sampling needs a temperature > 0 (the IS ratios need "
                                                     "the behaviour log-probs)"),
            (self.workers >= 1, "--workers", "use at least 1"),
            (self.group_size >= 2, "--group-size", "GRPO needs at least 2 samples per prompt"),
            (self.groups_per_step >= 1, "--groups-per-step", "use at least 1"),
            (self.max_staleness >= 0, "--max-staleness", "use 0 (synchronous) or more"),
            (self.push_every >= 1, "--push-every", "use at least 1"),
            (self.max_new_tokens >= 1 and self.max_len > self.max_new_tokens, "--max-len",
             "must exceed --max-new-tokens"),
            (not self.repack or self.workers > self.long_workers >= 1, "--long-workers",
             "with --repack keep at least one short worker: 1 <= --long-workers < --workers"),
            (self.lease_timeout_s > 2 * self.renew_every_s, "--lease-timeout-s",
             "must exceed twice --renew-every-s, or live workers lose their leases"),
        ]
        for ok, flag, fix in checks:
            if not ok:
                name = flag[2:].replace("-", "_")
                raise ValueError(f"{flag} {getattr(self, name)!r} is invalid: {fix}")
