"""The training loop behind `train.py`: pretraining with DSA's stages, and SFT.

`Trainer`, read top to bottom: setup (devices, data, model, optimizers, resume) → one step →
evaluation and samples → checkpoints → `run()`. Its settings are `TrainConfig` (train_config.py).

Pretraining stages (GLM-5, arXiv 2602.15763, continues a dense model with DSA; the warm-up and the
sparse stage are DeepSeek-V3.2's, arXiv 2512.02556 §2.1):
  dense   [0, dense_steps)               dense attention, all parameters, LM loss (+ λ·MTP, + α·balance).
                                         GLM-5 adds DSA to a model pretrained dense; this stage stands in.
  warmup  [dense_steps, +dsa_warmup_steps) dense attention, everything frozen but the indexer, which
                                         learns KL(p ‖ softmax(I)) at its own lr (--dsa-warmup-lr).
  sparse  the rest                       top-k attention, all parameters: LM loss + λ·MTP + indexer KL over
                                         the selected set (+ α·balance). The model detaches the indexer's
                                         input, so the KL trains only the indexer and the LM loss never does.
MoE: after every dense/sparse step the router bias moves by the sign rule (γ = --bias-update-rate) on
the expert load summed over micro-batches and ranks (DeepSeek-V3, arXiv 2412.19437 §2.1.2), so all ranks
stay identical. SFT runs sparse from the first step (post-training in DSA mode), loss on assistant tokens, with
--sft-pretrain-mix of each batch being pretraining windows (loss on all tokens) so SFT does not erase
pretraining; its evaluations also report the pretraining val loss (`pretrain_val_loss`, the windows pretraining
evaluated on). INT4 QAT (--qat int4) fake-quantizes from --qat-start-step on: a full-precision SFT checkpoint
at or before that step resumes into either branch, QAT or full precision (the speedrun's PTQ baseline), and
--until-step stops a run early on the same lr schedule, so the shared trunk is trained once.

Exactness: batches are a pure function of (seed, step), the RNG states and optimizer go into
trainer_state.pt, so on CPU a killed-and-resumed run ends bit-identical to an uninterrupted one. Under FSDP2
the model and optimizer shards go beside it through torch.distributed.checkpoint (state.save_sharded), and
the same holds at the same world size; DCP reshards, so such a checkpoint also resumes on another world size
or without FSDP, and one written without FSDP resumes under it (exact up to the order of reductions).
Simplified: one latest checkpoint (out_dir/ckpt); evaluation uses the current stage's attention mode.
"""

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
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
from nanoglm5.data.sft import build_conversations
from nanoglm5.data.tokenizer import Tokenizer
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.int4 import prepare_qat
from nanoglm5.model import GLM5
from nanoglm5.training.batches import (
    ChatBatches,
    MixedBatches,
    PasskeyMix,
    TokenBatches,
    chat_example,
    load_shards,
)
from nanoglm5.training.dist import setup_distributed
from nanoglm5.training.metrics import (
    bytes_per_token,
    init_wandb,
    token_weighted_loss,
    unigram_entropy,
    write_metrics,
)
from nanoglm5.training.optim import Optimizers, build_optimizer, lr_multiplier
from nanoglm5.training.state import (
    check_resume,
    config_dict,
    has_sharded_state,
    load_sharded,
    load_trainer_state,
    optimizer_state,
    restore_optimizer_state,
    save_checkpoint,
    save_sharded,
    seed_everything,
    set_rng_state,
    trainer_state,
)
from nanoglm5.training.train_config import (
    LONG_CONTEXT_ROPE_FACTOR,
    QAT_FIELDS,
    RESUME_NEUTRAL,
    TrainConfig,
    TrainError,
)


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
        self._resume_shards: Path | None = None  # a checkpoint whose sharded state _wrap loads
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
        if not 0 <= c.until_step <= c.max_steps:
            raise TrainError(f"--until-step {c.until_step}: must lie in [0, --max-steps {c.max_steps}] (0 = no early stop)")
        if not 0.0 <= c.sft_pretrain_mix < 1.0:
            raise TrainError(f"--sft-pretrain-mix {c.sft_pretrain_mix}: must be in [0, 1)")
        if c.qat_start_step < 0:
            raise TrainError(f"--qat-start-step {c.qat_start_step}: must be >= 0")
        if c.batch_size % (world * c.micro_batch_size):
            raise TrainError(f"--batch-size {c.batch_size} must be a multiple of --micro-batch-size "
                             f"{c.micro_batch_size} × {world} rank(s); e.g. --batch-size "
                             f"{max(1, round(c.batch_size / (world * c.micro_batch_size))) * world * c.micro_batch_size}")
        if c.optimizer not in ("adamw", "muon"):
            raise TrainError(f"--optimizer {c.optimizer!r}: choose adamw or muon")
        if c.decay not in ("cosine", "linear", "constant"):
            raise TrainError(f"--decay {c.decay!r}: choose cosine, linear or constant")
        if c.stage in ("sft", "long_context") and not (c.checkpoint or c.resume):
            raise TrainError(f"--stage {c.stage} starts from a pretrained model: pass --checkpoint out/pretrain/ckpt")
        if c.passkey_mix and c.stage != "long_context":
            raise TrainError(f"--passkey-mix {c.passkey_mix} applies to --stage long_context only; drop it")
        if c.qat not in ("", "int4"):
            raise TrainError(f"--qat {c.qat!r}: the only scheme is int4")
        if c.fsdp and not self.dist.enabled:
            self.log("[train] --fsdp has no effect in a single process (run under torchrun --nproc_per_node N)")
        if c.fsdp and c.qat and c.qat_start_step > 0:
            raise TrainError("--qat-start-step with --fsdp: FSDP2 re-classes the modules QAT would re-class mid-run; "
                             "start QAT at step 0 (--qat-start-step 0) under --fsdp")
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
        """The tokenizer of --checkpoint / --resume checkpoints, else of --data-dir (None if absent in pretraining)."""
        c = self.cfg
        for d in (c.resume if c.resume not in ("", "auto") else "", c.checkpoint, c.data_dir):
            if d and (Path(d) / "tokenizer.json").exists():
                self.tokenizer_file = Path(d) / "tokenizer.json"
                return Tokenizer.load(self.tokenizer_file)
        self.tokenizer_file = None
        if c.stage == "sft":
            raise TrainError(f"no tokenizer.json in {c.checkpoint or c.resume} or {c.data_dir}: "
                             "build one with `python data/prepare.py`")
        self.log(f"[train] no tokenizer.json in {c.data_dir}: no bits-per-byte and no sample generations")
        return None

    def _load_data(self):
        c = self.cfg
        self.tokenizer = self._tokenizer()
        self.bytes_per_token = None
        self.val_text = None  # SFT: pretraining val windows, when the data dir has them
        if c.stage in ("pretrain", "long_context"):
            train, val = load_shards(c.data_dir, "train"), load_shards(c.data_dir, "val")
            self.data, self.val = TokenBatches(train, c.seq_len, c.seed), TokenBatches(val, c.seq_len, c.seed)
            if c.passkey_mix > 0:  # long_context: synthetic passkey documents among the windows (batches.py)
                self.data = PasskeyMix(self.data, self.tokenizer, c.passkey_mix)
                self.log(f"[train] long context: {self.data.split(c.batch_size)[1]} of each batch's {c.batch_size} "
                         "sequences are synthetic passkey documents, the rest corpus windows (packed, no doc masks)")
            meta = json.loads((Path(c.data_dir) / "tokens" / "meta.json").read_text())
            self.data_vocab = int(meta.get("vocab_size") or int(np.max(train)) + 1)
            self.unigram = unigram_entropy(train, self.data_vocab)
            if self.tokenizer is not None:
                self.bytes_per_token = bytes_per_token(val, self.tokenizer)
            self.log(f"[train] {len(train):,} train / {len(val):,} val tokens; unigram entropy of the train shard "
                     f"{self.unigram:.3f} nats/token (the loss to beat)")
        else:
            tok = self.tokenizer
            convs = build_conversations(c.sft_examples, c.seed, data_dir=c.data_dir)
            rendered = [chat_example(*tok.render_chat(m["messages"]), c.seq_len) for m in convs]
            val_idx = set(range(0, len(rendered), 20))  # every 20th conversation is held out
            self.data = ChatBatches([r for i, r in enumerate(rendered) if i not in val_idx], c.seed, tok.eos_id)
            self.val = ChatBatches([r for i, r in enumerate(rendered) if i in val_idx], c.seed, tok.eos_id)
            shards = Path(c.data_dir) / "tokens"
            if c.sft_pretrain_mix > 0:
                if not (shards / "train.bin").exists():
                    raise TrainError(f"--sft-pretrain-mix {c.sft_pretrain_mix} mixes pretraining windows into SFT, but "
                                     f"{shards} has no train.bin: pass the --data-dir of `python data/prepare.py` or "
                                     "--sft-pretrain-mix 0")
                self.data = MixedBatches(self.data, TokenBatches(load_shards(c.data_dir, "train"), c.seq_len, c.seed),
                                         c.sft_pretrain_mix)
            if (shards / "val.bin").exists():  # what SFT does to the pretraining loss, on pretraining's own windows
                self.val_text = TokenBatches(load_shards(c.data_dir, "val"), c.seq_len, c.seed)
            self.sample_convs = [convs[i] for i in sorted(val_idx)[:3]]
            self.data_vocab = tok.vocab_size
            self.unigram = None
            kinds = {}
            for m in convs:
                kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
            self.log(f"[train] SFT: {len(self.data.examples)} train / {len(self.val.examples)} val conversations {kinds}"
                     + (f"; {self.data.split(c.batch_size)[1]} of each batch's {c.batch_size} sequences are pretraining "
                        "windows" if isinstance(self.data, MixedBatches) else ""))

    def _model_config(self) -> ModelConfig:
        c = self.cfg
        overrides = {k: v for k, v in c.model.items() if v is not None}
        try:
            if c.checkpoint:
                base = read_config(c.checkpoint)
                if c.stage == "long_context":
                    overrides.setdefault("rope_theta", base.rope_theta * LONG_CONTEXT_ROPE_FACTOR)
                    overrides.setdefault("max_position_embeddings", max(base.max_position_embeddings, c.seq_len))
                mc = base.replace(**overrides)
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
        if c.checkpoint and not c.resume:
            sd_model = load_hf(c.checkpoint)  # CheckpointError names the bad file
            torch.manual_seed(c.seed)
            self.model = GLM5(mc)
            load_into(self.model, sd_model.state_dict(), c.checkpoint)
            self.log(f"[train] initialised from {c.checkpoint}")
        else:
            torch.manual_seed(c.seed)
            self.model = GLM5(mc)
        self.model.to(self.device).train()
        self.qat_on = False
        if c.qat and c.qat_start_step == 0:
            self._start_qat(0)
        n, act = mc.num_params(include_mtp=True), mc.num_active_params()
        self.log(f"[train] model: {n / 1e6:.2f}M parameters (MTP incl.), {act / 1e6:.2f}M active per token")

    def _start_qat(self, step: int) -> None:
        """Fake quant on from here (prepare_qat re-classes modules in place: the Parameters, their names and the
        optimizer's references stay the same)."""
        c = self.cfg
        prepare_qat(self.model, layers=c.qat_layers, group_size=c.qat_group_size)
        self.qat_on = True
        self.log(f"[train] QAT int4 on {c.qat_layers} (group size {c.qat_group_size}) from step {step}")

    def _maybe_start_qat(self, step: int) -> None:
        if self.cfg.qat and not self.qat_on and step >= self.cfg.qat_start_step:
            self._start_qat(step)

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
        neutral = set(RESUME_NEUTRAL)
        fp_so_far = lambda d: not d.get("qat") or d.get("qat_start_step", 0) >= state["step"]  # noqa: E731
        if fp_so_far(saved) and fp_so_far(config_dict(self.cfg)):
            neutral |= QAT_FIELDS  # neither run fake-quantized before this step: branch into QAT or not, exactly
        check_resume(path, saved, config_dict(self.cfg), neutral,
                     "the checkpoint was trained with a different config",
                     model=(read_config(path).to_hf_dict(), self.model_config.to_hf_dict()))
        if state.get("sharded"):  # FSDP: model + optimizer shards beside the weights, loaded by _wrap
            if not has_sharded_state(path):
                raise CheckpointError(f"{path}: trainer_state.pt says the model and optimizer state are sharded, but "
                                      "the shard index (.metadata) is missing: the checkpoint is incomplete; resume "
                                      "from an earlier one or start from its weights with --checkpoint")
            self._resume_shards = path
            if state.get("world") != self.dist.world:
                self.log(f"[train] the checkpoint was written by {state.get('world')} ranks, this run has "
                         f"{self.dist.world}: its shards are resharded (the math is the same up to reduction order)")
        else:
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

    def _optimizers(self) -> dict[str, Optimizers]:
        return {"main": self.opt, "warmup": self.opt_warm}

    @property
    def sharded(self) -> bool:
        """FSDP2 in effect: parameters and optimizer state are DTensor shards (--fsdp under torchrun)."""
        return self.cfg.fsdp and self.dist.enabled

    def _wrap(self):
        """DDP (or FSDP2 with --fsdp) under torchrun; `self.model` stays the plain module. A resumed sharded
        state is loaded here, into whichever layout this run has."""
        self.wrapped = self.model
        if self.sharded:
            carried = optimizer_state(self.model, self._optimizers())  # resumed from a checkpoint without shards
            for block in list(self.model.layers) + [m.block for m in self.model.mtp]:
                fully_shard(block)
            fully_shard(self.model)
            self._build_optimizers()  # parameters are now DTensor shards
            restore_optimizer_state(self.model, self._optimizers(), carried)
            self.log(f"[train] FSDP2 over {self.dist.world} ranks")
        if self._resume_shards is not None:
            load_sharded(self._resume_shards, self.model, self._optimizers())
            self.log(f"[train] loaded the sharded model and optimizer state of {self._resume_shards}")
        if self.dist.enabled and not self.cfg.fsdp:
            # find_unused_parameters: the dense stage leaves the indexer without gradients
            self.wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               find_unused_parameters=True)
            self.log(f"[train] DDP over {self.dist.world} ranks ({'nccl' if self.device.type == 'cuda' else 'gloo'})")

    # ------------------------------------------------------------------------------------ one step
    def stage_at(self, step: int) -> str:
        c = self.cfg
        if c.stage in ("sft", "long_context"):
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
        self._maybe_start_qat(step)
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
    def evaluate(self, stage: str) -> dict:
        c, d = self.cfg, self.dist
        model = self.wrapped if c.fsdp else self.model
        was = model.training
        model.eval()
        # FSDP: every rank runs every batch (the forward is collective); otherwise the ranks split them
        batches = (b for i, b in enumerate(self.val.eval_batches(c.eval_seqs, c.micro_batch_size))
                   if c.fsdp or i % d.world == d.rank)
        val_loss = token_weighted_loss(model, batches, self.device, self._autocast,
                                       reduce=None if c.fsdp else d.all_reduce, sparse=stage == "sparse")
        res = {"val_loss": val_loss}
        if self.val_text is not None:  # SFT: the pretraining val loss on the windows pretraining evaluated
            batches = (b for i, b in enumerate(self.val_text.eval_batches(c.eval_seqs, c.micro_batch_size))
                       if c.fsdp or i % d.world == d.rank)
            res["pretrain_val_loss"] = token_weighted_loss(model, batches, self.device, self._autocast,
                                                           reduce=None if c.fsdp else d.all_reduce, sparse=True)
        model.train(was)
        if self.bytes_per_token:
            res["val_bpb"] = res["val_loss"] / math.log(2) / self.bytes_per_token
        return res

    def samples(self, stage: str) -> list[str]:
        """Greedy continuations of three fixed prompts (SFT: held-out conversations), through the engine."""
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
        max_len = self.model_config.max_position_embeddings
        prompts = [(text, ids) for text, ids in prompts if len(ids) < max_len]
        params = [SamplingParams(max_tokens=min(c.sample_tokens, max_len - len(ids)), temperature=0.0,
                                 stop_token_ids=tok.stop_ids) for _, ids in prompts]
        was = self.model.training
        self.model.eval()
        # the engine seeds its own generator from torch's: fork, so sampling leaves the training RNG stream as
        # it was. tie_break "topk": the DSA selection the model trains and evaluates with (model.Attention).
        # graphs off: a few samples per eval would not repay capturing CUDA graphs for a short-lived engine
        with torch.random.fork_rng(devices=[]):
            engine = Engine(self.model, max_batch=max(1, len(prompts)), sparse=stage == "sparse", tie_break="topk",
                            graphs="off")
            done = engine.generate([ids for _, ids in prompts], params)
        self.model.train(was)
        return [f"{text!r} → {tok.decode(comp.token_ids)!r}" for (text, _), comp in zip(prompts, done)]

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self):
        """out_dir/ckpt ← weights + trainer state, atomically (rank 0 writes; all ranks wait).
        FSDP: every rank first writes its model and optimizer shards (DCP) into a staging directory; after a
        barrier rank 0 moves them into the checkpoint with the gathered HF weights and trainer_state.pt."""
        model, shards = self.model, None
        if self.sharded:
            shards = self.out_dir / ".ckpt.shards.tmp"
            if self.dist.main:
                shutil.rmtree(shards, ignore_errors=True)  # left by a run that died mid-save
            self.dist.barrier()
            save_sharded(shards, self.model, self._optimizers())
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.dist.main:
                model = GLM5(self.model_config)
                model.load_state_dict(full)
            self.dist.barrier()  # every rank's shards are on disk before rank 0 publishes the checkpoint
        if self.dist.main:
            config = config_dict(self.cfg)
            state = trainer_state(self.step, {} if self.sharded else self._optimizers(),
                                  {"kind": self.cfg.stage, "seed": self.cfg.seed, "step": self.step},
                                  config, history=self.history, world=self.dist.world, sharded=self.sharded)
            save_checkpoint(self.ckpt_dir, model, state, self.tokenizer_file, config, shards=shards)
            write_metrics(self.out_dir, self.history)
        self.dist.barrier()

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> list[dict]:
        c = self.cfg
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(config_dict(c), indent=2))
        self.log("[train] config " + json.dumps(config_dict(c)))
        self.log(f"[train] model config {json.dumps(self.model_config.to_hf_dict())}")
        wb = init_wandb(c.wandb and self.dist.main, c.wandb_project, self.out_dir, config_dict(c),
                        log=lambda m: self.log(f"[train] {m}"))
        stop = c.until_step or c.max_steps  # the limit that binds: the bar counts to it
        bar = tqdm(range(self.step, stop), initial=self.step, total=stop, disable=self.quiet, dynamic_ncols=True,
                   desc=c.stage + (f" (until step {stop} of {c.max_steps})" if stop < c.max_steps else ""))
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
            last = self.step == stop
            if (c.eval_every and self.step % c.eval_every == 0) or last:
                rec.update(self.evaluate(stage))
                msg = f"[train] step {self.step} {stage}: train {rec['loss']:.3f} val {rec['val_loss']:.3f}"
                if "val_bpb" in rec:
                    msg += f" ({rec['val_bpb']:.3f} bits/byte)"
                if self.unigram:
                    msg += f" | unigram {self.unigram:.3f}"
                if "pretrain_val_loss" in rec:
                    msg += f" | pretraining val {rec['pretrain_val_loss']:.3f}"
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
            bar.set_postfix(lm_loss=f"{rec['lm_loss']:.3f}", stage=stage + (" qat" if self.qat_on else ""),
                            lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tok_per_s']:.0f}")
            if (c.save_every and self.step % c.save_every == 0) or last:
                self.save()
        bar.close()
        if wb is not None:
            wb.finish()
        return self.history
