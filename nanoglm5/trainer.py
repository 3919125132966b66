"""The training loop behind `train.py`: pretraining with DSA's two stages, and SFT.

Holds `TrainConfig` (every CLI flag is a field; `STAGE_DEFAULTS` fills what a stage sets differently)
and `Trainer`, read top to bottom: setup (devices, data, model, optimizers, resume) → one step →
evaluation and samples → checkpoints → `run()`.

Pretraining stages (DESIGN.md §3, research/arch.md §3.4, DeepSeek-V3.2 §2.1):
  dense   [0, dense_steps)               dense attention, all parameters, LM loss (+ λ·MTP, + α·balance).
                                         GLM-5 adds DSA to a model pretrained dense; this stage stands in.
  warmup  [dense_steps, +dsa_warmup_steps) dense attention, everything frozen but the indexer, which
                                         learns KL(p ‖ softmax(I)) at its own lr (--dsa-warmup-lr).
  sparse  the rest                       top-k attention, all parameters: LM loss + λ·MTP + indexer KL over
                                         the selected set (+ α·balance). The model detaches the indexer's
                                         input, so the KL trains only the indexer and the LM loss never does.
MoE: after every dense/sparse step the router bias moves by the sign rule (γ = --bias-update-rate) on
the expert load summed over micro-batches and ranks (DeepSeek-V3 §2.1.2), so all ranks stay identical.
SFT runs sparse from the first step (post-training in DSA mode), loss on assistant tokens only.

Exactness: batches are a pure function of (seed, step), the RNG states and optimizer go into
trainer_state.pt, so on CPU a killed-and-resumed run ends bit-identical to an uninterrupted one.
Simplified: one latest checkpoint (out_dir/ckpt); evaluation uses the current stage's attention mode.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nanoglm5.checkpoint import (
    CheckpointError,
    from_hf_state_dict,
    load_hf,
    load_into,
    load_state,
    read_config,
)
from nanoglm5.config import ModelConfig
from nanoglm5.model import GLM5
from nanoglm5.optim import Optimizers, build_optimizer, lr_multiplier
from nanoglm5.train_utils import (
    ChatBatches,
    TokenBatches,
    TrainError,
    asdict,
    bytes_per_token,
    chat_example,
    config_diff,
    config_field,
    greedy_generate,
    load_shards,
    load_trainer_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup_distributed,
    trainer_state,
    unigram_entropy,
)

f = config_field  # a field with its --help text


@dataclass
class TrainConfig:
    stage: str = f("pretrain", "pretrain (token shards, DSA stages) or sft (chat, loss on assistant tokens)")
    preset: str = f("tiny", "ModelConfig preset (config.PRESETS); single fields via --index-topk etc.")
    model: dict = f({}, "ModelConfig overrides; on the CLI, one flag per ModelConfig field")
    data_dir: str = f("data", "output of `python data/prepare.py`: tokenizer.json, tokens/, knowledge.jsonl")
    out_dir: str | None = f(None, "run directory; the latest checkpoint is out_dir/ckpt")
    init_from: str = f("", "start from this checkpoint's weights (ours or an HF GlmMoeDsa directory)")
    resume: str = f("", "continue a run exactly: 'auto' (= out_dir/ckpt) or a checkpoint path")
    seed: int = f(1337, "one seed for init, data order and everything else")
    # batches
    seq_len: int = f(256, "tokens per sequence (SFT: longer conversations are cut)")
    batch_size: int | None = f(None, "sequences per optimizer step, summed over ranks and micro-batches")
    micro_batch_size: int | None = f(None, "sequences per forward/backward on one rank (gradient accumulation)")
    max_steps: int | None = f(None, "optimizer steps in total, DSA warm-up included")
    # DSA stages
    dense_steps: int | None = f(None, "pretrain: first steps with dense attention, all weights (GLM-5's pre-DSA phase)")
    dsa_warmup_steps: int | None = f(None, "then steps where only the indexer trains, on its KL (DeepSeek-V3.2 §2.1)")
    dsa_warmup_lr: float = f(1e-3, "indexer lr during the DSA warm-up (DeepSeek-V3.2: 1e-3)")
    # losses
    mtp_weight: float = f(0.3, "λ of the MTP loss (GLM-4.5: 0.3, later 0.1)")
    balance_loss_weight: float = f(1e-4, "α of the sequence-level balance loss (GLM-4.5: 1e-4)")
    bias_update_rate: float = f(1e-3, "γ of the aux-loss-free router-bias update (GLM-4.5: 1e-3)")
    # optimizer
    optimizer: str = f("adamw", "adamw, or muon (2D matrices; experts, embeddings, norms, router on AdamW)")
    lr: float | None = f(None, "peak learning rate")
    min_lr_ratio: float = f(0.1, "final lr as a fraction of the peak")
    warmup_steps: int | None = f(None, "linear lr warm-up steps")
    decay: str = f("cosine", "lr decay after warm-up: cosine, linear or constant")
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
    dtype: str = f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16")
    fsdp: bool = f(False, "under torchrun: shard parameters with FSDP2 (fully_shard) instead of DDP")
    threads: int = f(0, "CPU threads (0 = torch default)")
    # SFT
    sft_examples: int = f(12000, "SFT conversations generated (math, knowledge Q&A, RL-style tasks)")
    # quantization-aware training (INT4 issue: nanoglm5.quant.prepare_qat)
    qat: str = f("", "'int4': fake-quantize weights during training (straight-through estimator)")
    qat_layers: str = f("experts", "which weights QAT covers (see nanoglm5.quant.prepare_qat)")
    qat_group_size: int = f(32, "int4 group size")

    def resolved(self) -> "TrainConfig":
        """Fill the stage-dependent fields left at None from STAGE_DEFAULTS."""
        if self.stage not in STAGE_DEFAULTS:
            raise TrainError(f"--stage {self.stage!r}: choose one of {sorted(STAGE_DEFAULTS)}")
        d = {k: v for k, v in STAGE_DEFAULTS[self.stage].items() if getattr(self, k) is None}
        return replace(self, **d)


# Defaults sized for the tiny preset on a 2-core CPU: pretraining ≈ 3 min, SFT ≈ 10 min (docs/benchmarks.md).
# SFT is long enough for the model to learn to copy numbers from the prompt (between 400 and 800 steps of
# 32 conversations), without which RL has nothing to build on (docs/LOG.md).
STAGE_DEFAULTS = {
    "pretrain": dict(out_dir="out/pretrain", max_steps=400, batch_size=8, micro_batch_size=8, dense_steps=250, dsa_warmup_steps=30, lr=3e-3,
                     warmup_steps=20, eval_every=100, save_every=100),
    "sft": dict(out_dir="out/sft", max_steps=800, batch_size=32, micro_batch_size=8, dense_steps=0, dsa_warmup_steps=0, lr=1e-3, warmup_steps=20, eval_every=200, save_every=200),
}

# Fields that may change between a run and its --resume without breaking exactness of the math.
RESUME_NEUTRAL = {"max_steps", "save_every", "eval_every", "eval_seqs", "sample_tokens", "log_every", "wandb",
                  "wandb_project", "resume", "init_from", "out_dir", "data_dir", "device", "dtype", "threads"}


class Trainer:
    def __init__(self, cfg: TrainConfig, quiet: bool = False):
        self.cfg = cfg = cfg.resolved()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.dist = setup_distributed(cfg.device)
        self.device = self.dist.device
        self.quiet = quiet or not self.dist.main
        self._check_config()
        seed_everything(cfg.seed)
        self.amp = self._amp_dtype()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "ckpt"
        self.history: list[dict] = []
        self.step = 0
        self._load_data()
        self._build_model()
        self._build_optimizers()
        self._maybe_resume()
        self._wrap()

    # ------------------------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def _check_config(self):
        c, world = self.cfg, self.dist.world
        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps"):
            if getattr(c, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be >= 1")
        if c.batch_size % (world * c.micro_batch_size):
            raise TrainError(f"--batch-size {c.batch_size} must be a multiple of --micro-batch-size "
                             f"{c.micro_batch_size} × {world} rank(s); e.g. --batch-size "
                             f"{max(1, round(c.batch_size / (world * c.micro_batch_size))) * world * c.micro_batch_size}")
        if c.optimizer not in ("adamw", "muon"):
            raise TrainError(f"--optimizer {c.optimizer!r}: choose adamw or muon")
        if c.decay not in ("cosine", "linear", "constant"):
            raise TrainError(f"--decay {c.decay!r}: choose cosine, linear or constant")
        if c.stage == "sft" and not (c.init_from or c.resume):
            raise TrainError("--stage sft starts from a pretrained model: pass --init-from out/pretrain/ckpt")
        if c.qat not in ("", "int4"):
            raise TrainError(f"--qat {c.qat!r}: the only scheme is int4")
        if c.fsdp and not self.dist.enabled:
            self.log("[train] --fsdp has no effect in a single process (run under torchrun --nproc_per_node N)")
        if c.fsdp and c.resume and self.dist.enabled:
            # trainer_state.pt holds rank 0's optimizer shard only: resuming would silently lose the others
            raise TrainError("--resume with --fsdp is not supported yet (the sharded optimizer state is not gathered "
                             "into trainer_state.pt); resume under DDP (drop --fsdp) or restart from the weights "
                             "with --init-from")
        if c.fsdp and c.optimizer == "muon":
            raise TrainError("--fsdp with --optimizer muon: Muon orthogonalises whole matrices, FSDP shards them; "
                             "use --optimizer adamw with --fsdp")
        if min(c.dense_steps, c.dsa_warmup_steps) < 0:
            raise TrainError("--dense-steps and --dsa-warmup-steps must be >= 0")

    def _amp_dtype(self):
        d = self.cfg.dtype
        if d not in ("auto", "fp32", "bf16"):
            raise TrainError(f"--dtype {d!r}: choose auto, fp32 or bf16")
        if d == "bf16" or (d == "auto" and self.device.type == "cuda"):
            if self.device.type == "cpu":
                self.log("[train] bf16 autocast on CPU: expect it to be far slower than fp32 on most CPUs")
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def _tokenizer(self):
        """The tokenizer of --init-from / --resume checkpoints, else of --data-dir (None if absent in pretraining)."""
        from nanoglm5.tokenizer import Tokenizer

        c = self.cfg
        for d in (c.resume if c.resume not in ("", "auto") else "", c.init_from, c.data_dir):
            if d and (Path(d) / "tokenizer.json").exists():
                self.tokenizer_file = Path(d) / "tokenizer.json"
                return Tokenizer.load(self.tokenizer_file)
        self.tokenizer_file = None
        if c.stage == "sft":
            raise TrainError(f"no tokenizer.json in {c.init_from or c.resume} or {c.data_dir}: "
                             "build one with `python data/prepare.py`")
        self.log(f"[train] no tokenizer.json in {c.data_dir}: no bits-per-byte and no sample generations")
        return None

    def _load_data(self):
        c = self.cfg
        self.tokenizer = self._tokenizer()
        self.bytes_per_token = None
        if c.stage == "pretrain":
            train, val = load_shards(c.data_dir, "train"), load_shards(c.data_dir, "val")
            self.data, self.val = TokenBatches(train, c.seq_len, c.seed), TokenBatches(val, c.seq_len, c.seed)
            meta = json.loads((Path(c.data_dir) / "tokens" / "meta.json").read_text())
            self.data_vocab = int(meta.get("vocab_size") or int(np.max(train)) + 1)
            self.unigram = unigram_entropy(train, self.data_vocab)
            if self.tokenizer is not None:
                self.bytes_per_token = bytes_per_token(val, self.tokenizer)
            self.log(f"[train] {len(train):,} train / {len(val):,} val tokens; unigram entropy of the train shard "
                     f"{self.unigram:.3f} nats/token (the loss to beat)")
        else:
            from nanoglm5.sft_data import build_conversations

            tok = self.tokenizer
            convs = build_conversations(c.sft_examples, c.seed, data_dir=c.data_dir)
            rendered = [chat_example(*tok.render_chat(m["messages"]), c.seq_len) for m in convs]
            val_idx = set(range(0, len(rendered), 20))  # every 20th conversation is held out
            self.data = ChatBatches([r for i, r in enumerate(rendered) if i not in val_idx], c.seed, tok.eos_id)
            self.val = ChatBatches([r for i, r in enumerate(rendered) if i in val_idx], c.seed, tok.eos_id)
            self.sample_convs = [convs[i] for i in sorted(val_idx)[:3]]
            self.data_vocab = tok.vocab_size
            self.unigram = None
            kinds = {}
            for m in convs:
                kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
            self.log(f"[train] SFT: {len(self.data.examples)} train / {len(self.val.examples)} val conversations {kinds}")

    def _model_config(self) -> ModelConfig:
        c = self.cfg
        overrides = {k: v for k, v in c.model.items() if v is not None}
        try:
            if c.init_from:
                mc = read_config(c.init_from).replace(**overrides)
            else:
                overrides.setdefault("vocab_size", self.data_vocab)
                mc = ModelConfig.preset(c.preset, **overrides)
            mc.validate()
        except (ValueError, TypeError) as e:
            raise TrainError(str(e)) from None
        if mc.vocab_size < self.data_vocab:
            raise TrainError(f"vocab_size={mc.vocab_size} < the data's vocabulary {self.data_vocab}; "
                             f"drop --vocab-size or use --vocab-size {self.data_vocab}")
        if c.seq_len > mc.max_position_embeddings:
            raise TrainError(f"--seq-len {c.seq_len} exceeds max_position_embeddings={mc.max_position_embeddings}")
        return mc

    def _build_model(self):
        c = self.cfg
        self.model_config = mc = self._model_config()
        if c.init_from and not c.resume:
            sd_model = load_hf(c.init_from)  # CheckpointError names the bad file
            torch.manual_seed(c.seed)
            self.model = GLM5(mc)
            load_into(self.model, sd_model.state_dict(), c.init_from)
            self.log(f"[train] initialised from {c.init_from}")
        else:
            torch.manual_seed(c.seed)
            self.model = GLM5(mc)
        self.model.to(self.device).train()
        if c.qat:
            try:
                from nanoglm5 import quant
            except ImportError:
                raise TrainError("--qat int4 needs nanoglm5/quant.py (the INT4 stage), which is not installed") from None
            quant.prepare_qat(self.model, layers=c.qat_layers, group_size=c.qat_group_size)
            self.log(f"[train] QAT int4 on {c.qat_layers} (group size {c.qat_group_size})")
        n, act = mc.num_params(include_mtp=True), mc.num_active_params()
        self.log(f"[train] model: {n / 1e6:.2f}M parameters (MTP incl.), {act / 1e6:.2f}M active per token")

    def _build_optimizers(self):
        c = self.cfg
        self.opt = build_optimizer(self.model, c.optimizer, c.lr, c.weight_decay, (c.beta1, c.beta2))
        idx = self.model.indexer_parameters()
        self.opt_warm = Optimizers([torch.optim.AdamW(idx, lr=c.dsa_warmup_lr, betas=(c.beta1, c.beta2),
                                                      weight_decay=0.0)])

    def _maybe_resume(self):
        c = self.cfg
        if not c.resume:
            return
        path = self.ckpt_dir if c.resume == "auto" else Path(c.resume)
        if c.resume == "auto" and not path.exists() and not path.with_name(".ckpt.old").exists():
            self.log(f"[train] --resume: no checkpoint at {path} yet; starting fresh")
            return
        if not path.exists() and not path.with_name(f".{path.name}.old").exists():
            raise TrainError(f"--resume {c.resume}: no checkpoint at {path}; check the path or drop --resume")
        state = load_trainer_state(path)
        saved = state.get("train_config", {})
        now = asdict(self.cfg)
        diff = config_diff(saved, now, RESUME_NEUTRAL)
        saved_mc, now_mc = read_config(path).to_hf_dict(), self.model_config.to_hf_dict()
        diff += [f"model.{d}" for d in config_diff(saved_mc, now_mc)]
        if diff:
            raise TrainError(f"--resume {path}: the checkpoint was trained with a different config: " + "; ".join(diff)
                             + ". Pass the same flags, or start a new run from its weights with --init-from")
        sd = from_hf_state_dict(load_state(path), self.model_config)
        load_into(self.model, sd, path)
        self.model.to(self.device)
        self._build_optimizers()  # load_into assigned new tensors: rebuild, then restore the state
        try:
            self.opt.load_state_dict(state["optimizers"]["main"])
            self.opt_warm.load_state_dict(state["optimizers"]["warmup"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}/trainer_state.pt: optimizer state does not fit this run ({e})") from None
        set_rng_state(state["rng"])
        self.step, self.history = state["step"], state.get("history", [])
        if saved.get("max_steps") != self.cfg.max_steps:
            self.log(f"[train] --max-steps changed from {saved.get('max_steps')} to {self.cfg.max_steps}: "
                     "the lr schedule stretches from here")
        self.log(f"[train] resumed from {path} at step {self.step}")

    def _wrap(self):
        """DDP (or FSDP2 with --fsdp) under torchrun; `self.model` stays the plain module."""
        self.wrapped = self.model
        if not self.dist.enabled:
            return
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in list(self.model.layers) + [m.block for m in self.model.mtp]:
                fully_shard(block)
            fully_shard(self.model)
            self._build_optimizers()  # parameters are now DTensor shards
            self.log(f"[train] FSDP2 over {self.dist.world} ranks")
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters: the dense stage leaves the indexer without gradients
            self.wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               find_unused_parameters=True)
            self.log(f"[train] DDP over {self.dist.world} ranks ({'nccl' if self.device.type == 'cuda' else 'gloo'})")

    # ------------------------------------------------------------------------------------ one step
    def stage_at(self, step: int) -> str:
        c = self.cfg
        if c.stage == "sft":
            return "sparse"
        if step < c.dense_steps:
            return "dense"
        return "warmup" if step < c.dense_steps + c.dsa_warmup_steps else "sparse"

    def lr_at(self, step: int) -> float:
        """Main-optimizer schedule over the steps that train the LM (the DSA warm-up steps do not count)."""
        c = self.cfg
        main_step = step if step < c.dense_steps else max(c.dense_steps, step - c.dsa_warmup_steps)
        return lr_multiplier(main_step, c.max_steps - c.dsa_warmup_steps, c.warmup_steps, c.decay, c.min_lr_ratio)

    def _set_trainable(self, stage: str):
        idx = {id(p) for p in self.model.indexer_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(stage != "warmup" or id(p) in idx)

    def _loss(self, out, stage: str) -> torch.Tensor:
        if stage == "warmup":
            return out.indexer_kl  # the only trainable weights are the indexer's
        loss = out.loss
        if stage == "sparse":
            loss = loss + out.indexer_kl
        if out.balance_loss is not None and self.cfg.balance_loss_weight:
            loss = loss + self.cfg.balance_loss_weight * out.balance_loss
        return loss

    def train_step(self, step: int) -> dict:
        c, d = self.cfg, self.dist
        stage = self.stage_at(step)
        self._set_trainable(stage)
        opt = self.opt_warm if stage == "warmup" else self.opt
        if stage != "warmup":
            opt.set_lr(self.lr_at(step))
        # under DDP the warm-up runs the plain module (frozen weights) and averages the indexer grads by hand
        model = self.model if (stage == "warmup" and not c.fsdp) else self.wrapped
        per_rank = c.batch_size // d.world
        n_micro = per_rank // c.micro_batch_size
        n_total = self.data.n_targets(step, c.batch_size)  # loss-bearing tokens in the global batch
        stats = torch.zeros(6, dtype=torch.float64)  # loss, lm, mtp, kl, balance, tokens
        load = None
        for m in range(n_micro):
            lo = d.rank * per_rank + m * c.micro_batch_size
            x, y = self.data.batch(step, c.batch_size, lo, lo + c.micro_batch_size)
            x, y = x.to(self.device), y.to(self.device)
            w = int((y >= 0).sum()) / n_total  # token-weighted mean over the global batch
            sync = m == n_micro - 1 or model is self.model
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    out = model(x, y, sparse=stage == "sparse", indexer_kl=stage != "dense", mtp_weight=c.mtp_weight)
                    loss = self._loss(out, stage)
                (loss * (w * d.world)).backward()  # DDP averages over ranks: × world restores the sum
            parts = [loss, out.lm_loss, out.mtp_loss, out.indexer_kl, out.balance_loss]
            stats[:5] += torch.tensor([float(v.detach()) if v is not None else 0.0 for v in parts], dtype=torch.float64) * w
            stats[5] += x.numel()
            if out.expert_load is not None:
                load = out.expert_load.float() if load is None else load + out.expert_load.float()
        if stage == "dense":  # DDP hands unused parameters zero grads; None keeps AdamW off the indexer
            for p in self.model.indexer_parameters():
                p.grad = None
        if stage == "warmup" and d.enabled and not c.fsdp:
            for p in self.model.indexer_parameters():
                if p.grad is not None:
                    d.all_reduce(p.grad).div_(d.world)
        d.all_reduce(stats)
        if load is not None:
            load = d.all_reduce(load.cpu())
        if not math.isfinite(stats[0]):
            self._diverged(step, stage, f"loss is {stats[0].item()}")
        params = [p for p in opt.params() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):
            self._diverged(step, stage, f"the gradient norm is {gnorm.item()}")
        opt.step()
        opt.zero_grad()
        if stage != "warmup" and load is not None and c.bias_update_rate > 0:
            self.model.update_router_bias(load, c.bias_update_rate)
        rec = {"step": step + 1, "stage": stage, "loss": stats[0].item(), "lm_loss": stats[1].item(),
               "mtp_loss": stats[2].item(), "indexer_kl": stats[3].item(), "balance_loss": stats[4].item(),
               "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm.item(), "tokens": int(stats[5].item())}
        if load is not None:
            ratio = (load.max(1).values / load.mean(1).clamp_min(1e-9))
            rec["load_max_over_mean"] = ratio.mean().item()
            rec["expert_load"] = (load / load.sum(1, keepdim=True)).tolist()  # (layers, E) shares, for plots
        return rec

    def _diverged(self, step: int, stage: str, what: str):
        last = f"the last good checkpoint is {self.ckpt_dir}" if self.ckpt_dir.exists() else "no checkpoint was written yet"
        lr = self.cfg.dsa_warmup_lr if stage == "warmup" else self.cfg.lr
        raise TrainError(f"training diverged at step {step + 1} ({stage} stage): {what}; {last} (untouched). "
                         f"Try a lower lr (now {lr:g}), --grad-clip 1.0, a longer --warmup-steps, or --dtype fp32, "
                         "then --resume")

    # ------------------------------------------------------------------------------------ eval and samples
    @torch.no_grad()
    def evaluate(self, stage: str) -> dict:
        c, d = self.cfg, self.dist
        model = self.wrapped if c.fsdp else self.model
        was = model.training
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        for i, (x, y) in enumerate(self.val.eval_batches(c.eval_seqs, c.micro_batch_size)):
            if i % d.world != d.rank and not c.fsdp:
                continue
            with self._autocast():
                out = model(x.to(self.device), y.to(self.device), sparse=stage == "sparse", mtp_weight=0.0)
            n = int((y >= 0).sum())
            tot += torch.tensor([out.lm_loss.item() * n, n], dtype=torch.float64)
        if not c.fsdp:
            d.all_reduce(tot)
        model.train(was)
        res = {"val_loss": (tot[0] / tot[1].clamp_min(1)).item()}
        if self.bytes_per_token:
            res["val_bpb"] = res["val_loss"] / math.log(2) / self.bytes_per_token
        return res

    def samples(self, stage: str) -> list[str]:
        c, tok = self.cfg, self.tokenizer
        if tok is None or c.sample_tokens <= 0 or c.fsdp or not self.dist.main:
            return []
        if c.stage == "sft":
            prompts = []
            for conv in self.sample_convs:
                msgs = conv["messages"]
                first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                prompts.append((msgs[first - 1]["content"], tok.render_prompt(msgs[:first])))
        else:
            prompts = [(p, tok.encode(p)) for p in ("Problem: Compute 12 + 7.\nSolution:\n", "def ", "The ")]
        out = []
        for text, ids in prompts:
            new = greedy_generate(self.model, ids, c.sample_tokens, tok.stop_ids, sparse=stage == "sparse")
            out.append(f"{text!r} → {tok.decode(new)!r}")
        return out

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self):
        """out_dir/ckpt ← weights + trainer state, atomically (rank 0 writes; all ranks wait)."""
        model = self.model
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.dist.main:
                model = GLM5(self.model_config)
                model.load_state_dict(full)
        if self.dist.main:
            state = trainer_state(self.step, {"main": self.opt, "warmup": self.opt_warm},
                                  {"kind": self.cfg.stage, "seed": self.cfg.seed, "step": self.step},
                                  asdict(self.cfg), history=self.history)
            save_checkpoint(self.ckpt_dir, model, state, self.tokenizer_file, asdict(self.cfg))
            self._write_metrics()
        self.dist.barrier()

    def _write_metrics(self):
        lines = [json.dumps(h) for h in self.history]
        (self.out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> list[dict]:
        c = self.cfg
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(asdict(c), indent=2))
        self.log("[train] config " + json.dumps(asdict(c)))
        self.log(f"[train] model config {json.dumps(self.model_config.to_hf_dict())}")
        wb = self._wandb()
        bar = tqdm(range(self.step, c.max_steps), initial=self.step, total=c.max_steps, disable=self.quiet,
                   desc=f"{c.stage}", dynamic_ncols=True)
        t0, tokens = time.time(), 0
        stage = self.stage_at(self.step)
        for step in bar:
            if self.stage_at(step) != stage:
                stage = self.stage_at(step)
                self.log(f"[train] step {step}: entering the {stage} stage")
            rec = self.train_step(step)
            self.step = step + 1
            tokens += rec["tokens"]
            rec["tok_per_s"] = tokens / max(time.time() - t0, 1e-9)
            last = self.step == c.max_steps
            if (c.eval_every and self.step % c.eval_every == 0) or last:
                rec.update(self.evaluate(stage))
                msg = f"[train] step {self.step} {stage}: train {rec['loss']:.3f} val {rec['val_loss']:.3f}"
                if "val_bpb" in rec:
                    msg += f" ({rec['val_bpb']:.3f} bits/byte)"
                if self.unigram:
                    msg += f" | unigram {self.unigram:.3f}"
                if stage != "dense":
                    msg += f" | indexer KL {rec['indexer_kl']:.4f}"
                if "load_max_over_mean" in rec:
                    msg += f" | expert load max/mean {rec['load_max_over_mean']:.2f}"
                self.log(msg)
                for s in self.samples(stage):
                    self.log(f"  sample: {s}")
            if self.step % c.log_every == 0 or last or "val_loss" in rec:
                self.history.append(rec)
                if wb is not None:
                    wb.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=self.step)
            bar.set_postfix(lm_loss=f"{rec['lm_loss']:.3f}", stage=stage, lr=f"{rec['lr']:.1e}",
                            tok_s=f"{rec['tok_per_s']:.0f}")
            if (c.save_every and self.step % c.save_every == 0) or last:
                self.save()
        bar.close()
        if wb is not None:
            wb.finish()
        return self.history

    def _wandb(self):
        if not (self.cfg.wandb and self.dist.main):
            return None
        import wandb

        logged_in = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
            Path.home().joinpath(".netrc").read_text() if Path.home().joinpath(".netrc").exists() else "")
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
        self.log(f"[train] wandb {mode}")
        return wandb.init(project=self.cfg.wandb_project, config=asdict(self.cfg), mode=mode, dir=str(self.out_dir))
