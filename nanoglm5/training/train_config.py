"""What a training run is told: `TrainConfig` (one field per `train.py` flag), the per-stage defaults,
the fields a resume may change, and `TrainError`.

The DSA stage lengths follow GLM-5 (arXiv 2602.15763), which adds DSA to a model pretrained dense, and
DeepSeek-V3.2 (arXiv 2512.02556, §2.1): a dense warm-up of the indexer alone, then sparse training.
"""

from dataclasses import dataclass, replace

from nanoglm5.cli import config_field
from nanoglm5.config import PRESETS


class TrainError(RuntimeError):
    """Bad input or a failed run; the message is one line naming the bad value and the fix."""


f = config_field  # a field with its --help text


@dataclass
class TrainConfig:
    stage: str = f("pretrain", "pretrain (token shards, DSA stages), sft (chat, loss on assistant tokens) or "
                               "long_context (mid-training context extension of a pretrained model, raised RoPE base)",
                  choices=("pretrain", "sft", "long_context"))
    preset: str = f("tiny", "ModelConfig preset (config.PRESETS); single fields via --index-topk etc.",
                choices=PRESETS)
    model: dict = f({}, "ModelConfig overrides; on the CLI, one flag per ModelConfig field")
    data_dir: str = f("data", "output of `python data/prepare.py`: tokenizer.json, tokens/, knowledge.jsonl")
    out_dir: str | None = f(None, "run directory; the latest checkpoint is out_dir/ckpt")
    checkpoint: str = f("", "start from this checkpoint's weights (ours or an HF GlmMoeDsa directory)",
                        aliases=("--init-from",))
    resume: str = f("", "continue a run exactly: 'auto' (= out_dir/ckpt) or a checkpoint path")
    seed: int = f(1337, "one seed for init, data order and everything else")
    # batches
    seq_len: int | None = f(None, "tokens per sequence (SFT: longer conversations are cut); default 256, "
                                  "long_context 2048")
    batch_size: int | None = f(None, "sequences per optimizer step, summed over ranks and micro-batches")
    micro_batch_size: int | None = f(None, "sequences per forward/backward on one rank (gradient accumulation)")
    max_steps: int | None = f(None, "optimizer steps in total, DSA warm-up included (the lr schedule's length)")
    until_step: int = f(0, "stop (evaluate and save) after this step; the lr schedule still spans --max-steps, so a "
                           "--resume continues the same run (0 = run to --max-steps)")
    # DSA stages
    dense_steps: int | None = f(None, "pretrain: first steps with dense attention, all weights (GLM-5's pre-DSA phase)")
    dsa_warmup_steps: int | None = f(None, "then steps where only the indexer trains, on its KL (DeepSeek-V3.2 §2.1)")
    dsa_warmup_lr: float = f(1e-3, "indexer lr during the DSA warm-up (DeepSeek-V3.2: 1e-3)")
    # losses
    mtp_weight: float = f(0.3, "λ of the MTP loss (GLM-4.5: 0.3, later 0.1)")
    balance_loss_weight: float = f(1e-4, "α of the sequence-level balance loss (GLM-4.5: 1e-4)")
    bias_update_rate: float = f(1e-3, "γ of the aux-loss-free router-bias update (GLM-4.5: 1e-3)")
    # optimizer
    optimizer: str = f("adamw", "adamw, or muon (2D matrices; experts, embeddings, norms, router on AdamW)",
                     choices=("adamw", "muon"))
    lr: float | None = f(None, "peak learning rate")
    min_lr_ratio: float = f(0.1, "final lr as a fraction of the peak")
    warmup_steps: int | None = f(None, "linear lr warm-up steps")
    decay: str = f("cosine", "lr decay after warm-up: cosine, linear or constant",
                 choices=("cosine", "linear", "constant"))
    weight_decay: float = f(0.1, "decoupled weight decay of matrices")
    beta1: float = f(0.9, "AdamW β1")
    beta2: float = f(0.95, "AdamW β2")
    grad_clip: float = f(1.0, "clip the global grad norm to this (0 = off)")
    # evaluation and logging
    eval_every: int | None = f(None, "steps between validation losses (0 = only at the end)")
    eval_seqs: int = f(32, "validation sequences per evaluation")
    sample_tokens: int = f(48, "tokens per sample generation at each evaluation (0 = none)")
    save_every: int | None = f(None, "steps between checkpoints (one is always written at the end)")
    log_every: int = f(10, "steps between history entries / metrics.jsonl lines")
    wandb: bool = f(False, "log to Weights & Biases (offline mode unless logged in)")
    wandb_project: str = f("nanoglm5", "W&B project name")
    # hardware
    device: str = f("auto", "auto (cuda if available), cpu, cuda, cuda:1 …")
    dtype: str = f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16",
                 choices=("auto", "fp32", "bf16"))
    fsdp: bool = f(False, "under torchrun: shard parameters and optimizer state with FSDP2 (fully_shard) instead "
                          "of DDP; checkpoints then hold the shards too (torch.distributed.checkpoint)")
    threads: int = f(0, "CPU threads (0 = torch default)")
    # SFT
    sft_examples: int = f(12000, "SFT conversations generated (math, knowledge Q&A, RL-style tasks)")
    sft_pretrain_mix: float = f(0.03125, "fraction of each SFT batch that is pretraining windows of --data-dir's "
                                         "token shards (loss on all their tokens), so SFT keeps what pretraining "
                                         "learned; 1/32 = one window of 32 sequences (0 = chat only)")
    # long context
    passkey_mix: float | None = f(None, "long_context: fraction of each batch that is synthetic passkey documents "
                                        "(train-shard filler, a key hidden at a random depth and asked for at the end; "
                                        "nanoglm5/data/passkey.py), the rest corpus windows; default 0.5 there, 0 "
                                        "elsewhere")
    # quantization-aware training (GLM-5 §2.4.3)
    qat: str = f("", "'int4': fake-quantize weights during training (straight-through estimator)")
    qat_layers: str = f("experts", "which weights QAT covers (see nanoglm5.int4.prepare_qat)")
    qat_group_size: int = f(32, "int4 group size")
    qat_start_step: int = f(0, "QAT starts at this step; the steps before it train in full precision, so a "
                               "full-precision run resumed from a checkpoint at or before it can branch into QAT")

    def resolved(self) -> "TrainConfig":
        """Fill the stage-dependent fields left at None from STAGE_DEFAULTS."""
        if self.stage not in STAGE_DEFAULTS:
            raise TrainError(f"--stage {self.stage!r}: choose one of {sorted(STAGE_DEFAULTS)}")
        if self.preset not in PRESETS:  # here, before the trainer reads any data
            raise TrainError(f"--preset {self.preset!r} is unknown: choose one of {', '.join(PRESETS)}")
        d = {k: v for k, v in STAGE_DEFAULTS[self.stage].items() if getattr(self, k) is None}
        return replace(self, **d)


# Defaults sized for the tiny preset on a 2-core CPU: pretraining ≈ 3 min, SFT ≈ 7 min (docs/benchmarks.md).
# SFT is long enough for the model to learn to copy numbers from the prompt, without which RL has nothing to
# build on. Copying emerges suddenly, and the lr sets when: at 1e-3 not by step 600 of 32 conversations, at 2e-3
# between steps 400 and 600 (so where it stood at the end moved with the thread count: held-out greedy 0.87-1.00),
# at 3e-3 by step 400 (greedy 0.95 there, 1.00 at 600; docs/LOG.md).
STAGE_DEFAULTS = {
    "pretrain": dict(out_dir="out/pretrain", max_steps=400, batch_size=8, micro_batch_size=8, dense_steps=250,
                     dsa_warmup_steps=30, lr=3e-3, warmup_steps=20, eval_every=100, save_every=100),
    "sft": dict(out_dir="out/sft", max_steps=600, batch_size=32, micro_batch_size=8, dense_steps=0,
                dsa_warmup_steps=0, lr=3e-3, warmup_steps=20, eval_every=200, save_every=200),
    # GLM-5 extends the context in mid-training, after pretraining and before SFT (arXiv 2602.15763, mid-training; GLM-4.5,
    # arXiv 2508.06471 §2.4): the pretrained model continues on longer windows of the same corpus with a raised
    # RoPE base, at a lower lr; DSA stays on, so attention per query stays at index_topk keys
    "long_context": dict(out_dir="out/long_context", seq_len=2048, max_steps=100, batch_size=2, micro_batch_size=2,
                         dense_steps=0, dsa_warmup_steps=0, lr=1e-3, warmup_steps=10, eval_every=50, save_every=20,
                         passkey_mix=0.5),
}
for _d in STAGE_DEFAULTS.values():
    _d.setdefault("seq_len", 256)
    _d.setdefault("passkey_mix", 0.0)

# GLM-4.5 raised the RoPE base from 10,000 to 1,000,000 (100×) when it extended the context to 32K
# (arXiv 2508.06471 §2.4); the long_context stage raises the pretrained model's base by the same factor unless
# --rope-theta names one
LONG_CONTEXT_ROPE_FACTOR = 100.0

# Fields that may change between a run and its --resume without breaking exactness of the math. fsdp, like the
# number of ranks, changes only the order of floating-point reductions (its sharded state reshards on load).
RESUME_NEUTRAL = {"max_steps", "until_step", "save_every", "eval_every", "eval_seqs", "sample_tokens", "log_every", "wandb",
                  "wandb_project", "resume", "checkpoint", "out_dir", "data_dir", "device", "dtype", "threads", "fsdp"}

# The QAT recipe may be switched on by a --resume that has not reached --qat-start-step yet: until then the run
# trains in full precision either way, so the branch is exact (Trainer._maybe_resume checks the steps).
QAT_FIELDS = {"qat", "qat_layers", "qat_group_size", "qat_start_step"}
