"""Policy losses (nanoglm5/rl/loss.py): hand-computed formulas and the toy-bandit bias test."""

import math

import pytest
import torch

from nanoglm5.rl.loss import group_advantages, policy_loss

L = math.log
D = torch.float64


def _t(*rows):
    return torch.tensor(rows, dtype=D)


def test_group_advantages_normalized_unbiased_std():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-6))
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.7, 0.7])), torch.zeros(3))  # no signal
    assert torch.equal(group_advantages(torch.tensor([5.0])), torch.zeros(1))
    assert torch.allclose(
        group_advantages(torch.tensor([3.0, 1.0]), std_normalize=False), torch.tensor([1.0, -1.0])
    )
    batched = group_advantages(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
    assert torch.allclose(batched[0], group_advantages(torch.tensor([1.0, 0.0]))) and torch.equal(
        batched[1], torch.zeros(2)
    )


def _grad(kind, logp_vals, rollout_vals, adv, mask=None, **kw):
    logp = _t(logp_vals).requires_grad_(True)
    mask = torch.ones_like(logp) if mask is None else _t(mask)
    loss, stats = policy_loss(logp, _t(rollout_vals), torch.tensor([adv], dtype=D), mask, kind=kind, **kw)
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), stats


def test_grpo_clip_hand_values():
    old = _t([0.0, 0.0, 0.0, 0.0])
    # r = 1.5, 0.5 with A = +1: max(−rA, −clip(r)A) = max(−1.5, −1.28) = −1.28 (clipped), max(−0.5, −0.8) = −0.5
    loss, grad, st = _grad("grpo_clip", [L(1.5), L(0.5)], [0.0, 0.0], 1.0, logp_old=old[:, :2])
    assert loss == pytest.approx((-1.28 - 0.5) / 2) and grad == pytest.approx([0.0, -0.5 / 2])
    assert st["clip_frac"] == 0.5
    # A = −1: max(1.5, 1.28) = 1.5 (unclipped, grad r·1/2), max(0.5, 0.8) = 0.8 (clipped)
    loss, grad, _ = _grad("grpo_clip", [L(1.5), L(0.5)], [0.0, 0.0], -1.0, logp_old=old[:, :2])
    assert loss == pytest.approx((1.5 + 0.8) / 2) and grad == pytest.approx([1.5 / 2, 0.0])


def test_tis_weight_clamped_detached_multiplies_ppo():
    # π_old = sg(π_θ) so the PPO ratio is 1; ρ = π_old/μ = 3 → w = 2, ρ = 0.5 → w = 0.5
    loss, grad, st = _grad("tis", [0.0, 0.0], [-L(3.0), -L(0.5)], 1.0)
    assert loss == pytest.approx(-(2.0 + 0.5) / 2) and grad == pytest.approx([-1.0, -0.25])
    assert st["mean_is_weight"] == pytest.approx(1.25) and st["is_mask_frac"] == 0.0


def test_icepop_band_inclusive_and_zero_outside():
    # ρ = 2 and 0.5 are inside (inclusive), 2.01 and 0.49 outside → weight 0, still in the denominator
    rho = [2.0, 0.5, 2.01, 0.49]
    loss, grad, st = _grad("icepop", [0.0] * 4, [-L(x) for x in rho], 1.0)
    assert loss == pytest.approx(-(2.0 + 0.5) / 4) and grad == pytest.approx([-0.5, -0.125, 0.0, 0.0])
    assert st["is_mask_frac"] == 0.5


def test_ddis_strict_band_stop_gradient_weight():
    # r = π_θ/μ: 0.8 and 1.28 are outside (strict), 1.0 and 1.2 inside; gradient = −r·A/N inside
    r = [0.8, 1.28, 1.0, 1.2]
    loss, grad, st = _grad("ddis", [L(x) for x in r], [0.0] * 4, 2.0)
    assert grad == pytest.approx([0.0, 0.0, -1.0 * 2 / 4, -1.2 * 2 / 4])
    assert loss == pytest.approx(-(1.2 * 2 * L(1.2)) / 4)  # log π_θ = 0 for r = 1
    assert st["is_mask_frac"] == 0.5 and st["mean_ratio"] == pytest.approx(sum(r) / 4)
    _, grad, _ = _grad("ddis", [L(0.8001), L(0.7999)], [0.0, 0.0], 1.0)
    assert grad[0] != 0.0 and grad[1] == 0.0


def test_aggregation_token_vs_sample_mean_and_masks():
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    mask = _t([1, 0, 0], [1, 1, 1])
    adv = torch.tensor([1.0, 2.0], dtype=D)
    # pg per-token loss is −A·logπ: use its gradient, −A per loss token / denominator
    for agg, want in [
        ("token_mean", [[-1 / 4, 0, 0], [-2 / 4] * 3]),
        ("sample_mean", [[-1 / 2, 0, 0], [-2 / 6] * 3]),
    ]:
        logp.grad = None
        policy_loss(logp, torch.zeros(2, 3, dtype=D), adv, mask, kind="pg", agg=agg)[0].backward()
        assert torch.allclose(logp.grad, torch.tensor(want, dtype=D))
    per_token_adv = adv[:, None].expand(2, 3)
    a = policy_loss(logp, torch.zeros(2, 3, dtype=D), adv, mask, kind="ddis")[0]
    b = policy_loss(logp, torch.zeros(2, 3, dtype=D), per_token_adv, mask, kind="ddis")[0]
    assert torch.equal(a, b)
    # a sample with no loss tokens contributes 0 but counts in B (slime divides by the batch size)
    loss, _ = policy_loss(
        logp - 1.0, torch.zeros(2, 3, dtype=D), adv, _t([0, 0, 0], [1, 1, 1]), kind="pg", agg="sample_mean"
    )
    assert loss.item() == pytest.approx(2.0 / 2)


def test_bad_arguments_name_the_value():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="'ppo2'"):
        policy_loss(x, x, torch.zeros(1), x, kind="ppo2")
    with pytest.raises(ValueError, match="'mean'"):
        policy_loss(x, x, torch.zeros(1), x, agg="mean")
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        policy_loss(x, torch.zeros(1, 3), torch.zeros(1), x)


# ---- toy bandit -------------------------------------------------------------


def _bandit_weights(kind, rho):
    """The per-arm weight each estimator applies, from ρ = π/μ (π_old = π here)."""
    return {
        "pg": torch.ones_like(rho),
        "is": rho,
        "tis": rho.clamp(max=2.0),
        "icepop": torch.where((rho >= 0.5) & (rho <= 2.0), rho, 0 * rho),
        "ddis": torch.where((rho > 0.8) & (rho < 1.28), rho, 0 * rho),
    }[kind]


def test_toy_bandit_is_unbiased_uncorrected_biased_truncations_lower_variance():
    g = torch.Generator().manual_seed(0)
    K, N = 6, 100_000
    theta = torch.randn(K, generator=g, dtype=D)
    theta_stale = theta + 0.8 * torch.randn(K, generator=g, dtype=D)
    R = torch.randn(K, generator=g, dtype=D)
    pi, mu = theta.softmax(0), theta_stale.softmax(0)
    true_grad = pi * R - pi * (pi @ R)  # ∇_θ E_π[R] = π ⊙ (R − E_π[R])
    rho = pi / mu
    assert rho.max() > 2.0 and rho.min() < 0.8  # the stale μ exercises every band

    arms = torch.multinomial(mu, N, replacement=True, generator=g)
    score = torch.eye(K, dtype=D)[arms] - pi  # ∇_θ log π(a) = e_a − π, (N, K)
    results = {}
    for kind in ("pg", "is", "tis", "icepop", "ddis"):
        th = theta.clone().requires_grad_(True)
        logp = th.log_softmax(0)[arms][:, None]  # (N, 1): one-token "responses"
        loss, _ = policy_loss(logp, mu.log()[arms][:, None], R[arms], torch.ones(N, 1, dtype=D), kind=kind)
        loss.backward()
        est = -th.grad  # the loss is −objective
        w = _bandit_weights(kind, rho)
        contrib = (w * R)[arms][:, None] * score  # per-sample estimator, (N, K)
        assert torch.allclose(est, contrib.mean(0), atol=1e-10)  # autograd == the estimator we analyse
        expect = (mu * w * R) @ (torch.eye(K, dtype=D) - pi)  # its exact expectation
        se = contrib.std(0) / math.sqrt(N)
        assert ((est - expect).abs() <= 4.5 * se + 1e-12).all(), kind  # MC estimate matches its mean
        results[kind] = dict(est=est, expect=expect, se=se, var=contrib.var(0).sum().item())

    assert torch.allclose(results["is"]["expect"], true_grad, atol=1e-12)  # IS is exactly unbiased
    assert ((results["is"]["est"] - true_grad).abs() <= 4.5 * results["is"]["se"]).all()
    z_pg = ((results["pg"]["est"] - true_grad).abs() / results["pg"]["se"]).max()
    assert z_pg > 8, f"the uncorrected estimator should be measurably biased, z={z_pg:.1f}"
    for kind in ("tis", "icepop", "ddis"):
        assert results[kind]["var"] < results["is"]["var"], kind
        # bounded bias: at most what the truncated / masked arms could contribute
        w = _bandit_weights(kind, rho)
        bound = sum(
            (mu[a] * (rho[a] - w[a]).abs() * R[a].abs() * (torch.eye(K, dtype=D)[a] - pi).norm()).item()
            for a in range(K)
        )
        assert (results[kind]["expect"] - true_grad).norm() <= bound + 1e-12
        assert (results[kind]["est"] - true_grad).norm() <= bound + 5 * results[kind]["se"].norm()
    assert (results["tis"]["expect"] - true_grad).norm() < (results["pg"]["expect"] - true_grad).norm()
