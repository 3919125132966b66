"""DSA's fast sparse path (nanoglm5/dsa.py) against the readable one (Attention.sparse_block): the same selection,
the same outputs, KL and gradients, with ties, ragged chunks and shifted positions."""

import pytest
import torch

from nanoglm5 import dsa
from nanoglm5.config import ModelConfig
from nanoglm5.model import GLM5, rope_cos_sin


def _attn(k: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", vocab_size=256, index_topk=k, num_hidden_layers=1, first_k_dense_replace=1,
                             num_nextn_predict_layers=0)
    return GLM5(cfg).layers[0].self_attn


def readable(attn, x, cos, sin, pos, want_kl, tie_break):
    """The readable sparse path, all queries in one block: indexer over all keys → select → attend_absorbed."""
    q_nope, q_rot, ql, c_kv, k_rot = attn.project(x, cos, sin)
    index_k = attn.indexer.keys(x.detach(), cos, sin)
    allowed = pos[:, None, :] <= pos[:, :, None]
    out, kl = attn.sparse_block(x.detach(), ql.detach(), cos, sin, q_nope, q_rot, c_kv, k_rot, index_k, allowed,
                                want_kl, tie_break)
    return attn.o_proj(out), kl


@pytest.mark.parametrize("tie_break", ["topk", "stable"])
def test_top_k_of_cut_rows_equals_select_on_full_rows(tie_break):
    """Scores from {0, 1, 2}: almost every row ties at its k-th score; rows cut after their visible keys."""
    attn = _attn(k=5)
    g = torch.Generator().manual_seed(0)
    B, t, S, n = 2, 30, 64, 40
    scores = torch.randint(0, 3, (B, t, n), generator=g).float()
    pos_q = torch.arange(t).expand(B, t) + torch.tensor([[0], [9]])  # second row: positions shifted
    allowed = torch.arange(n)[None, None] <= pos_q[..., None]
    got = dsa.topk_of_rows(scores, allowed, S, 5, tie_break)
    want = attn.select(torch.nn.functional.pad(scores, (0, S - n)), torch.nn.functional.pad(allowed, (0, S - n)),
                       tie_break)
    if tie_break == "stable":
        assert torch.equal(got, want)
    else:  # the same set; order only among equal scores may differ
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("tie_break", ["topk", "stable"])
@pytest.mark.parametrize("tied", [False, True])
def test_fast_sparse_path_equals_the_readable_block_forward_and_backward(tie_break, tied):
    """k = 6 < T = 45 keys; chunks of 16 queries selected 5 at a time (both ragged); tied: the indexer's head
    weights are zero, so every index score is 0 and every row's top-k is a tie broken as the reference does."""
    attn = _attn(k=6).train()
    if tied:
        with torch.no_grad():
            attn.indexer.weights_proj.weight.zero_()
    attn.query_chunk, attn.index_chunk = 16, 5
    B, T = 2, 45
    x = torch.randn(B, T, attn.cfg.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pos = torch.arange(T).expand(B, T) + torch.tensor([[0], [7]])
    cos, sin = rope_cos_sin(pos, attn.cfg.qk_rope_head_dim, attn.cfg.rope_theta)
    g = torch.randn(B, T, attn.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    results = []
    for run in (readable, lambda *a: attn(*a[:4], sparse=True, want_kl=a[4], impl="absorbed", tie_break=a[5])):
        x.grad = None
        attn.zero_grad(set_to_none=True)
        out, kl = run(attn, x, cos, sin, pos, True, tie_break) if run is readable else run(x, cos, sin, pos, True,
                                                                                             tie_break)
        ((out * g).sum() + kl).backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        results.append((out.detach(), kl.detach(), x.grad.clone(), grads))
    (oa, ka, xa, ga), (ob, kb, xb, gb) = results
    assert (oa - ob).abs().max().item() < 1e-5
    assert abs(ka.item() - kb.item()) < 1e-6
    assert (xa - xb).abs().max().item() < 1e-5
    assert ga.keys() == gb.keys() and any(n.startswith("indexer.") for n in ga)  # the indexer learns from its KL
    for n in ga:
        assert (ga[n] - gb[n]).abs().max().item() < 1e-5, n


def test_fast_sparse_path_saves_no_index_scores_nor_mask():
    """What autograd keeps for the sparse layer does not grow with T·S: doubling T about doubles it."""
    attn = _attn(k=8).train()
    attn.query_chunk, attn.index_chunk = 64, 16

    def saved(T):
        x = torch.randn(1, T, attn.cfg.hidden_size, requires_grad=True)
        pos = torch.arange(T)[None]
        cos, sin = rope_cos_sin(pos, attn.cfg.qk_rope_head_dim, attn.cfg.rope_theta)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn(x, cos, sin, pos, sparse=True, impl="absorbed")
        return sum(seen.values())

    assert saved(512) < 2.2 * saved(256)
