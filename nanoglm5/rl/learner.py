"""The RL learner: log-probs on exactly the sampled ids, GRPO advantages, the policy update.

Holds, top to bottom:
  - `pad_trajectories`, `sequence_logprobs`: log π_θ(token_t | tokens_<t) on the token ids the worker
    sampled — no text, no re-tokenization (TITO, GLM-5 arXiv 2602.15763 §4.1.2). At temperature 1 with no
    top-k/top-p these are the same numbers the worker recorded for the same weights, and at
    --temperature T the learner takes the same tempered distribution (logits / T) as the worker's μ
    (tests/test_rl_system.py checks both);
  - `attach_advantages`: GRPO advantages, group-normalised, computed over the whole group when it arrives;
  - `Learner`: `policy_loss` (DDIS by default; grpo_clip / tis / icepop / is / pg as switches; token- or
    sample-mean), AdamW over the training room's parameter groups, gradient clipping, an optional optimizer
    reset after each weight push (GLM-5 §4.1);
  - the policy as built: `load_policy` (a checkpoint, QAT-prepared with the recipe it was trained with),
    `policy_config` / `build_policy` (the same modules in a rollout worker, weights from the relay).

GLM-5's chain (arXiv 2602.15763 §2.4.3): SFT trains with INT4 QAT, and RL keeps training that QAT model.
A checkpoint with a QAT recipe (quant.read_qat_recipe) loads QAT-prepared: the learner's forward and the
workers' (the same QAT modules; the relay carries the latent full-precision weights, under the same names)
both read the fake-quantized weights, so the behaviour log-probs are those of the int4 model, and the RL
checkpoint (its recipe saved beside it) converts to packed int4 with logits equal bit for bit.

One rollout batch = push_every × groups_per_step groups = one weight version: the learner takes
push_every optimizer steps on it (minibatches in group order), then the controller publishes. With
push_every > 1 the later minibatches are off-policy for the current θ, which the IS ratio π_θ/μ
(DDIS) sees directly.
Simplified: no KL term, no entropy bonus, no critic; the MoE router bias is not moved during RL.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from nanoglm5.checkpoint import load_hf
from nanoglm5.config import ModelConfig
from nanoglm5.int4 import QuantConfig, prepare_qat
from nanoglm5.model import GLM5
from nanoglm5.quant import read_qat_recipe
from nanoglm5.rl.buffer import Group
from nanoglm5.rl.loss import group_advantages, policy_loss
from nanoglm5.rl.rl_config import RLConfig
from nanoglm5.training.optim import build_optimizer


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


def sequence_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π_θ(ids[:, t] | ids[:, :t]) for t ≥ 1, shape (N, T-1): one full forward on the sampled ids.
    Right padding never changes earlier positions (causal attention, causal DSA top-k). DSA ties are broken
    by position, as the rollout engines break them, so the learner selects the same keys they did.
    temperature: π_θ is the tempered distribution softmax(logits / T), the one the workers sample from and
    record as μ (engine.sampling_logprobs: the same float ops), so at any --temperature the IS ratio π_θ/μ
    is 1 for the same weights. The forward runs on the model's device (under bf16 autocast on CUDA); the
    result comes back on the device of `ids`, with its graph."""
    dev = next(model.parameters()).device
    x = ids.to(dev)
    # bf16 autocast on CUDA; elsewhere the caller's (a CPU test's torch.autocast), not switched off here
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    with amp:
        out = model(x[:, :-1], sparse=True, tie_break="stable")
    logp = (out.logits.float() / temperature).log_softmax(-1)  # (N, T-1, V)
    return logp.gather(-1, x[:, 1:, None]).squeeze(-1).to(ids.device)


# ---------------------------------------------------------------------------------------------- the policy
def load_policy(path) -> GLM5:
    """A checkpoint as RL trains and evaluates it: QAT-prepared with its recipe when it has one."""
    model = load_hf(path).eval()  # CheckpointError names the bad file
    recipe = read_qat_recipe(path)
    if recipe is not None:
        prepare_qat(model, recipe.layers, recipe.group_size, recipe.scale_dtype)
    return model


def policy_config(model: GLM5) -> dict:
    """What a rollout worker needs to build the same modules: the HF config (+ the QAT recipe)."""
    d = model.config.to_hf_dict()
    if getattr(model, "qat_config", None) is not None:
        d["qat_config"] = dataclasses.asdict(model.qat_config)
    return d


def build_policy(d: dict) -> GLM5:
    """The modules of `policy_config` with fresh weights (the worker pulls the real ones from the relay)."""
    model = GLM5(ModelConfig.from_hf_dict(d)).eval()
    if d.get("qat_config"):
        qc = QuantConfig(**d["qat_config"])
        prepare_qat(model, qc.layers, qc.group_size, qc.scale_dtype)
    return model


# ---------------------------------------------------------------------------------------------- learner
def attach_advantages(group: Group, std_normalize: bool = True) -> None:
    """GRPO advantages over the whole group, stored per trajectory before any τ-drop removes samples."""
    adv = group_advantages(torch.tensor([t.reward for t in group.trajectories]), std_normalize)
    for t, a in zip(group.trajectories, adv.tolist()):
        t.advantage = a


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
        # micro-batches of similar lengths: each is padded to its longest sequence, and multi-turn episodes range
        # from one short attempt to several with observations between them, so group order would pad most
        # micro-batches to the longest episode; the step's loss and gradient are sums over micro-batches either way
        trajs = sorted(trajs, key=lambda t: len(t.tokens))
        ids, lp_mu, mask = pad_trajectories(trajs)
        adv = torch.tensor([t.advantage for t in trajs])
        lp_mu, mask = lp_mu[:, 1:], mask[:, 1:]  # align with the predictions of tokens 1..T-1
        n_tok, n_seq = float(mask.sum()), len(trajs)
        sums = {}
        for lo in range(0, n_seq, c.micro_batch_size):
            sl = slice(lo, lo + c.micro_batch_size)
            m = mask[sl]
            # trim right padding of this micro-batch
            T = int(m.nonzero()[:, 1].max()) + 2 if m.any() else 2
            logp = sequence_logprobs(model, ids[sl, :T], c.temperature)
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
