"""Per-token policy-gradient losses for RL with stale rollouts (GLM-5 arXiv 2602.15763 §3.2–3.3, §4.1).

Notation: μ = π_rollout, the distribution the worker actually sampled from (its
log-probs travel with the trajectory, token-in-token-out); π_old = log-probs the trainer recomputes
before the update (default here: sg(π_θ), i.e. one gradient step per batch, so π_θ/π_old = 1 in
value); π_θ = the policy being optimized; A = advantage, broadcast to every response token.

  group_advantages   GRPO: A_i = (R_i − mean(R)) / (std(R) + eps), unbiased std like torch.std;
                     slime `_post_process_rewards`; std_normalize=False is Dr.GRPO (r − mean).
  kind="pg"          plain on-policy REINFORCE, ℓ = −A·log π_θ (nanochat chat_rl.py). No correction.
  kind="is"          unclipped importance sampling, ℓ = −sg(π_θ/μ)·A·log π_θ; unbiased, high variance
                     (the reference the others are measured against).
  kind="grpo_clip"   PPO/GRPO clip (slime compute_policy_loss): r = π_θ/π_old,
                     ℓ = max(−r·A, −clip(r, 1−ε_l, 1+ε_h)·A), ε_l = 0.2, ε_h = 0.28 (GLM-5 scripts).
  kind="tis"         truncated IS (Yao et al.; slime vanilla_tis_function): w = clamp(π_old/μ, 0, C),
                     C = 2, detached; ℓ = w·ℓ_clip.
  kind="icepop"      IcePop (GLM-5 Eq. 1, pop(ρ, 1/β, β), β = 2; slime icepop_function): ρ = π_old/μ,
                     w = ρ·1[1/β ≤ ρ ≤ β] (inclusive), detached; ℓ = w·ℓ_clip.
  kind="ddis"        GLM-5 direct double-sided IS (§3.3, §4.1.2, Eqs. 3–5): r = exp(log π_θ − log μ),
                     f(r) = r if 1−ε_l < r < 1+ε_h (strict) else 0; ℓ = −sg(f(r))·A·log π_θ, so the
                     gradient is r·A·∇log π_θ inside the band and 0 outside. No π_old at all.
                     The stop-gradient weight and ε_l = 0.2, ε_h = 0.28 are our guesses: the report
                     gives neither.

Aggregation over a padded [B, T] batch with loss_mask (1 = a sampled response token):
  "token_mean"   Σ_{b,t} m·ℓ / Σ_{b,t} m               (DAPO; GLM-4.5 §3.2 preferred it for code RL)
  "sample_mean"  (1/B) Σ_b [Σ_t m·ℓ / Σ_t m]           (GRPO's 1/G Σ 1/|y_i| Σ_t; slime's default)
Tokens rejected by an IS band (ddis, icepop) keep their place in the denominators, as slime does
(its per-rollout denominators are not reduced by the TIS/IcePop mask; slime PR #657):
rejection scales the step down instead of re-weighting the surviving tokens up. In sample_mean a
sample with no loss tokens contributes 0 and still counts in B (slime divides by the batch size).

Simplified: no KL term, no entropy bonus, no dual clip (GLM-5 Eq. 1 and slime defaults drop KL).
"""

from __future__ import annotations

import torch

KINDS = ("pg", "is", "grpo_clip", "tis", "icepop", "ddis")
AGGS = ("token_mean", "sample_mean")


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages over the last dim (one GRPO group of G samples per row).

    A_i = R_i − mean(R), then ÷ (std(R) + eps) if std_normalize (unbiased std, N−1, like torch.std).
    An all-equal group gets zeros (no signal); a group of one gets zero too.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(
            f"group_advantages needs rewards of shape [..., G] with G >= 1, got {tuple(rewards.shape)}"
        )
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not std_normalize or rewards.shape[-1] == 1:  # G = 1: centered is already 0 (std would be NaN)
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True) + eps)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    if agg == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    per_sample = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sample.mean()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def policy_loss(
    logp: torch.Tensor,
    logp_rollout: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    kind: str = "ddis",
    agg: str = "token_mean",
    logp_old: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    tis_cap: float = 2.0,
    icepop_beta: float = 2.0,
) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss for one batch of padded [B, T] response tokens.

    logp:         log π_θ(a_t | s_t) of the sampled tokens, with grad.             (B, T)
    logp_rollout: log μ(a_t | s_t) recorded by the rollout worker.                  (B, T)
    advantages:   per sample (B,) or per token (B, T); e.g. group_advantages.
    loss_mask:    1 for trained tokens, 0 for prompt / observation / padding.        (B, T)
    logp_old:     trainer-recomputed π_old for grpo_clip / tis / icepop; default sg(logp).
    Returns (scalar loss, stats): is_mask_frac (loss tokens rejected by an IS band), clip_frac
    (tokens where the PPO clip is active), mean_ratio (π_θ/μ over loss tokens), mean_is_weight
    (the detached weight applied), mismatch_k1 (mean log μ − log π_θ: the rollout/trainer gap).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
    if agg not in AGGS:
        raise ValueError(f"unknown aggregation {agg!r}; choose one of {AGGS}")
    if logp.dim() != 2 or logp_rollout.shape != logp.shape or loss_mask.shape != logp.shape:
        raise ValueError(
            f"logp, logp_rollout, loss_mask must share a [B, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(logp_rollout.shape)}, {tuple(loss_mask.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    adv = advantages.to(logp.dtype).expand_as(logp).detach()  # (B, T)
    mask = loss_mask.to(logp.dtype)
    logp_rollout = logp_rollout.detach()
    old = logp.detach() if logp_old is None else logp_old.detach()
    ratio_mu = torch.exp(logp.detach() - logp_rollout)  # π_θ/μ, (B, T)
    weight = torch.ones_like(logp)  # detached per-token weight
    rejected = torch.zeros_like(logp)
    clip_active = torch.zeros_like(logp)

    if kind == "pg":
        per_token = -adv * logp
    elif kind == "is":
        weight = ratio_mu
        per_token = -weight * adv * logp
    elif kind == "ddis":
        inside = (ratio_mu > 1 - eps_low) & (ratio_mu < 1 + eps_high)  # f(r): strict band, Eq. 4
        weight = torch.where(inside, ratio_mu, torch.zeros_like(ratio_mu))
        rejected = (~inside).to(logp.dtype)
        per_token = -weight * adv * logp
    else:  # the PPO clip objective, possibly re-weighted by a behaviour correction π_old/μ
        r = torch.exp(logp - old)  # π_θ/π_old (value 1 when π_old = sg(π_θ), gradient ∇log π_θ)
        clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high)
        unclipped_loss, clipped_loss = -r * adv, -clipped * adv
        per_token = torch.maximum(unclipped_loss, clipped_loss)
        clip_active = (clipped_loss > unclipped_loss).to(logp.dtype)
        rho = torch.exp(old - logp_rollout)  # π_old/μ
        if kind == "tis":
            weight = torch.clamp(rho, 0.0, tis_cap)
        elif kind == "icepop":
            inside = (rho >= 1 / icepop_beta) & (rho <= icepop_beta)  # inclusive band [1/β, β]
            weight = torch.where(inside, rho, torch.zeros_like(rho))
            rejected = (~inside).to(logp.dtype)
        per_token = weight * per_token

    loss = _aggregate(per_token, mask, agg)
    stats = {
        "is_mask_frac": _masked_mean(rejected, mask),
        "clip_frac": _masked_mean(clip_active, mask),
        "mean_ratio": _masked_mean(ratio_mu, mask),
        "mean_is_weight": _masked_mean(weight, mask),
        "mismatch_k1": _masked_mean(logp_rollout - logp.detach(), mask),
        "n_tokens": float(mask.sum()),
    }
    return loss, stats
