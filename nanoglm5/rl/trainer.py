"""The RL learner: configuration, task source, log-probs on exactly the sampled ids, the policy update, evaluation.

Holds, top to bottom:
  - `RLConfig`: every `rl.py` flag is a field (kebab-case on the CLI); `resolved()` applies --mode;
  - `TaskSource`: the controller's task stream: group_id → task, a pure function of (seed, group_id),
    so re-issued and resumed groups get the same prompt; plus the benchmark's heavy-tailed workload
    (per-group forced lengths, lognormal with p99/p50 = 10, rl.md §5 "Long-tail workload");
  - `sequence_logprobs`: log π_θ(token_t | tokens_<t) on the token ids the worker sampled — no text,
    no re-tokenization (TITO, GLM-5 §4.1.2). At temperature 1 with no top-k/top-p these are the same
    numbers the worker recorded for the same weights (tests/test_rl_system.py checks it);
  - `Learner`: advantages (GRPO, group-normalised, computed over the whole group when it arrives),
    `policy_loss` (DDIS by default; grpo_clip / tis / icepop / is / pg as switches; token- or
    sample-mean), AdamW over optim.py's parameter groups, gradient clipping, an optional optimizer reset
    after each weight push (GLM-5 §4.1);
  - `evaluate`: pass@1 on the held-out "eval" split, greedy and sampled (seeded draws), in-process.

One rollout batch = push_every × groups_per_step groups = one weight version: the learner takes
push_every optimizer steps on it (minibatches in group order), then the controller publishes. With
push_every > 1 the later minibatches are off-policy for the current θ, which the IS ratio π_θ/μ
(DDIS) sees directly.
Simplified: no KL term, no entropy bonus, no critic; the MoE router bias is not moved during RL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from nanoglm5.optim import build_optimizer
from nanoglm5.rl.buffer import Group, Lease
from nanoglm5.rl.envs import lognormal_lengths, make_env
from nanoglm5.rl.loss import AGGS, KINDS, group_advantages, policy_loss
from nanoglm5.train_utils import config_field

f = config_field  # a field with its --help text (train_utils.add_config_flags)


@dataclass
class RLConfig:
    init_from: str = f("", "the SFT checkpoint to start from (out/sft/ckpt); holds tokenizer.json")
    resume: str = f("", "continue a run: 'auto' (= out_dir/ckpt) or a checkpoint path")
    out_dir: str = f("out/rl", "run directory: ckpt/, metrics.jsonl, reward_vs_time.png")
    seed: int = f(1337, "one seed: tasks, sampling (per (seed, group_id)), init")
    mode: str = f("async", "async (workers run ahead up to --max-staleness versions) or sync (η = 0)")
    env: str = f("code", "code (the sandboxed judge; where the tiny model learns), math, agent or mix (all three)")
    # processes
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
    temperature: float = f(1.0, "sampling temperature (1.0: behaviour log-probs are the model's own)")
    # staleness and weights
    max_staleness: int = f(2, "η: admit a group only while submitted ≤ (η + v + 1)·B (async mode)")
    drop_tau: int = f(-1, "τ: drop samples whose oldest segment is more than τ versions old (-1 = off)")
    order: str = f("fifo", "batch order: fifo (group_id order, staleness ≤ η) or ready (no head-of-line wait)")
    push_every: int = f(1, "K: optimizer steps per weight push (one rollout batch = K·B groups)")
    reset_optimizer: bool = f(False, "clear the optimizer state after each weight push (GLM-5 §4.1)")
    partial_rollout: bool = f(False, "workers swap in newer weights mid-trajectory (per-segment versions)")
    pull_every: int = f(8, "decode steps between relay polls with --partial-rollout")
    repack: bool = f(False, "dynamic repackaging: long groups go to --long-workers dedicated workers")
    long_workers: int = f(1, "workers reserved for long groups with --repack")
    long_threshold: int = f(96, "--repack: a group whose length hint exceeds this many tokens is long")
    lease_timeout_s: float = f(30.0, "a lease not renewed for this long is re-queued (dead worker)")
    renew_every_s: float = f(1.0, "worker heartbeat period")
    # loss and optimizer
    loss: str = f("ddis", "ddis (GLM-5), grpo_clip, tis, icepop, is or pg")
    agg: str = f("token_mean", "token_mean or sample_mean")
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
    # logging and checkpoints
    save_every: int = f(0, "steps between checkpoints (one is always written at the end)")
    log_every: int = f(1, "steps between log lines")
    wandb: bool = f(False, "log to Weights & Biases (offline unless logged in)")
    wandb_project: str = f("nanoglm5", "W&B project")
    plot: bool = f(True, "write reward_vs_time.png into out_dir")
    progress: bool = f(True, "tqdm progress bar")

    def resolved(self) -> RLConfig:
        """--mode sync is the same code with η = 0 and group-id order (rl.md §5: η=0 ≡ synchronous)."""
        if self.mode not in ("async", "sync"):
            raise ValueError(f"--mode {self.mode!r}: choose async or sync")
        if self.mode == "sync":
            return replace(self, max_staleness=0, order="fifo")
        return self

    def validate(self) -> None:
        checks = [
            (self.env in ("math", "code", "agent", "mix"), "--env", "choose math, code, agent or mix"),
            (self.loss in KINDS, "--loss", f"choose one of {KINDS}"),
            (self.agg in AGGS, "--agg", f"choose one of {AGGS}"),
            (self.order in ("fifo", "ready"), "--order", "choose fifo or ready"),
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


# ---------------------------------------------------------------------------------------------- tasks
class TaskSource:
    """group_id → Task. Epoch e over the task list is np.random.default_rng([seed, e]).permutation."""

    def __init__(self, cfg: RLConfig):
        names = ["math", "code", "agent"] if cfg.env == "mix" else [cfg.env]
        lists = [make_env(n).make_tasks(cfg.n_train_tasks, cfg.seed, "train") for n in names]
        self.tasks = [t for row in zip(*lists) for t in row]  # interleaved: math, code, agent, math, ...
        self.cfg, self.names = cfg, names
        self._perm = (-1, None)

    def __call__(self, group_id: int):
        n = len(self.tasks)
        epoch = group_id // n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch]).permutation(n))
        task = self.tasks[int(self._perm[1][group_id % n])]
        c = self.cfg
        meta = dict(task.meta)
        if c.length_median > 0:
            meta["forced_len"] = lognormal_lengths(1, f"{c.seed}:{group_id}", c.length_median,
                                                   c.length_p99_over_p50, lo=1, hi=c.max_len // 2)[0]
        if c.judge_latency_s > 0:
            meta["judge_latency_s"] = c.judge_latency_s
        return replace(task, meta=meta)

    def length_hint(self, task) -> int:
        """Expected decode tokens of a group (dynamic repackaging routes on it)."""
        if "forced_len" in task.meta:
            return task.meta["forced_len"]
        if task.env == "agent":
            return (len(task.meta["ops"]) + 1) * 12
        return self.cfg.max_new_tokens // 2

    def eval_tasks(self) -> list:
        return [t for n in self.names for t in make_env(n).make_tasks(self.cfg.n_eval_tasks, self.cfg.seed, "eval")]


# ---------------------------------------------------------------------------------------------- log-probs
def pad_trajectories(trajs, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to (N, T): token ids, behaviour log-probs, loss mask."""
    T = max(len(t.tokens) for t in trajs)
    ids = torch.full((len(trajs), T), pad_id, dtype=torch.long)
    lp = torch.zeros(len(trajs), T)
    mask = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        n = len(t.tokens)
        ids[i, :n] = torch.tensor(t.tokens)
        lp[i, :n] = torch.tensor(t.logprobs)
        mask[i, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
    return ids, lp, mask


def sequence_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log π_θ(ids[:, t] | ids[:, :t]) for t ≥ 1, shape (N, T-1): one full forward on the sampled ids.
    Right padding never changes earlier positions (causal attention, causal DSA top-k)."""
    out = model(ids[:, :-1], sparse=True)
    logp = out.logits.float().log_softmax(-1)  # (N, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- learner
def attach_advantages(group: Group, std_normalize: bool = True) -> None:
    """GRPO advantages over the whole group, stored per trajectory before any τ-drop removes samples."""
    adv = group_advantages(torch.tensor([t.reward for t in group.trajectories]), std_normalize)
    for t, a in zip(group.trajectories, adv.tolist()):
        t.meta["advantage"] = a


class Learner:
    """The trainer's math: K optimizer steps on one rollout batch."""

    def __init__(self, model, cfg: RLConfig):
        self.model, self.cfg = model, cfg
        self.opt = self.build_optimizer()

    def build_optimizer(self):
        c = self.cfg
        return build_optimizer(self.model, "adamw", c.lr, c.weight_decay, (c.beta1, c.beta2))

    def reset_optimizer(self) -> None:
        for o in self.opt.optimizers:
            o.state.clear()

    def update(self, groups: list[Group]) -> dict:
        """push_every optimizer steps over `groups` (in order); returns averaged statistics."""
        c = self.cfg
        K = max(1, min(c.push_every, len(groups)))
        n = len(groups)
        chunks = [groups[i * n // K:(i + 1) * n // K] for i in range(K)]  # minibatches in group order
        recs = [self._step([t for g in ch for t in g.trajectories]) for ch in chunks if ch]
        return {k: float(np.mean([r[k] for r in recs])) for k in recs[0]} if recs else {}

    def _step(self, trajs) -> dict:
        c, model = self.cfg, self.model
        model.train()
        ids, lp_mu, mask = pad_trajectories(trajs)
        adv = torch.tensor([t.meta.get("advantage", 0.0) for t in trajs])
        lp_mu, mask = lp_mu[:, 1:], mask[:, 1:]  # align with the predictions of tokens 1..T-1
        n_tok, n_seq = float(mask.sum()), len(trajs)
        sums = {}
        for lo in range(0, n_seq, c.micro_batch_size):
            sl = slice(lo, lo + c.micro_batch_size)
            m = mask[sl]
            # trim right padding of this micro-batch
            T = int(m.nonzero()[:, 1].max()) + 2 if m.any() else 2
            logp = sequence_logprobs(model, ids[sl, :T])
            loss, st = policy_loss(logp, lp_mu[sl, : T - 1], adv[sl], m[:, : T - 1], kind=c.loss, agg=c.agg,
                                   eps_low=c.eps_low, eps_high=c.eps_high, tis_cap=c.tis_cap,
                                   icepop_beta=c.icepop_beta)
            w = float(m.sum()) / max(n_tok, 1.0) if c.agg == "token_mean" else m.shape[0] / n_seq
            (loss * w).backward()
            tw = float(m.sum()) / max(n_tok, 1.0)
            for k, v in st.items():
                if k != "n_tokens":
                    sums[k] = sums.get(k, 0.0) + v * tw
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * w
        params = self.opt.params()
        gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):
            raise FloatingPointError(f"RL update diverged: grad norm {gnorm.item()}; lower --lr (now {c.lr:g})")
        self.opt.step()
        self.opt.zero_grad()
        model.eval()
        return {**sums, "grad_norm": float(gnorm), "trained_tokens": n_tok}


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, tokenizer, tasks, settings, batch_groups: int = 16, samples: int = 0) -> dict:
    """Held-out accuracy over `tasks`, in-process: greedy pass@1 {"acc", "acc/<env>", "n"}, and with
    samples > 0 also the sampled pass@1 {"sampled", "sampled/<env>"}: the mean reward of `samples` draws
    per task at the rollout temperature, each seeded by (seed, task index, draw) so before and after see
    the same draws. Sampled pass@1 is what RL optimises (the policy's expected reward); greedy shows what
    it does to the mode, which the SFT model may already have right."""
    from nanoglm5.rl.rollout import Rollout

    def run(greedy: bool, g: int) -> list[float]:
        s = replace(settings, group_size=g, worker_groups=batch_groups, env_latency_s=0.0)
        ro = Rollout(model, tokenizer, s, greedy=greedy)
        try:
            groups = ro.run([(Lease(i, 0, math.inf, 0), t) for i, t in enumerate(tasks)])
        finally:
            ro.close()
        return [float(np.mean([t.reward for t in grp.trajectories])) for grp in groups]

    out = {"n": len(tasks)}
    for key, rewards in [("acc", run(True, 1))] + ([("sampled", run(False, samples))] if samples > 0 else []):
        out[key] = float(np.mean(rewards)) if rewards else float("nan")
        for env in sorted({t.env for t in tasks}):
            out[f"{key}/{env}"] = float(np.mean([r for r, t in zip(rewards, tasks) if t.env == env]))
    return out


# ---------------------------------------------------------------------------------------------- stand-in
def toy_checkpoint(path, seed: int = 0, vocab_size: int = 400, **model_overrides):
    """A random 2-layer GLM5 + a small BPE trained on the RL prompts, saved as a checkpoint directory.
    What tests, the throughput benchmark and the notebook use when no SFT checkpoint is at hand
    (its rewards are ~0: good for systems measurements, not for "it learns")."""
    from nanoglm5.checkpoint import save_hf
    from nanoglm5.config import ModelConfig
    from nanoglm5.model import GLM5
    from nanoglm5.tokenizer import Tokenizer

    texts = []
    for name in ("math", "code", "agent"):
        for t in make_env(name).make_tasks(40, 0, "train"):
            texts += [m["content"] for m in t.messages] + [t.answer]
    tok = Tokenizer.train(texts * 3, vocab_size=vocab_size)
    torch.manual_seed(seed)
    kw = dict(vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
              n_routed_experts=4, q_lora_rank=32, index_topk=16, max_position_embeddings=512)
    save_hf(GLM5(ModelConfig.preset("tiny", **{**kw, **model_overrides})), path, tokenizer=tok)
    return path
