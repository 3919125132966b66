"""DSA sparse attention at long context: the fast form of model.py's `Attention.sparse_block` (the readable
version: indexer over all keys → top-k → gathered absorbed attention, DeepSeek-V3.2 §2.1). The same numbers up
to fp32 rounding, the same selection (tests/test_dsa.py checks both). What it does differently, and why
(where the time went on a CPU at 8K keys: docs/LOG.md, 2026-12-08):
  - index scores only over each query chunk's causal keys (the later ones are masked anyway): half the
    O(T·S·H_I·d_I) indexer work, and top-k on the shorter row. torch.topk's order among tied scores depends on
    the row's length, so a row whose k-th and (k+1)-th scores tie takes the full masked row, as the reference;
  - the (T, S) index scores are never whole: `index_chunk` queries at a time, fused with their top-k and attention,
    so each sub-chunk's tensors stay a few MB (see `sparse_chunk`);
  - one row gather per selected key of the latent [c_kv; k_rot] shared by all heads (MLA's point), then
    batched matmuls over (query: head × key);
  - a query chunk is one checkpoint: its q projections, selection, attention and o_proj are recomputed in
    backward, so autograd keeps x and the per-token latents (O(T)), not the (T, S) mask, the index scores or
    the (T, k) selection.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def visible_keys(pos_q: torch.Tensor, pos_k: torch.Tensor) -> int:
    """How many leading keys a chunk of queries can see: keys after the last one at or before the chunk's latest
    position are masked for every query in it. pos_q (B, t), pos_k (B, S) absolute positions."""
    seen = (pos_k <= pos_q.amax(-1, keepdim=True)).any(0)  # (S,)
    return int(seen.nonzero().max()) + 1 if seen.any() else 1


def topk_of_rows(scores: torch.Tensor, allowed: torch.Tensor, S: int, k: int, tie_break: str) -> torch.Tensor:
    """`Attention.select` on rows cut after the last visible key: scores, allowed (B, t, n), n <= S keys; the
    keys n..S-1 are masked. → (B, t, k) key indices, the same set as select on the full (B, t, S) rows (and the
    same order for "stable"). A row whose top-k set is not unique (the k-th and (k+1)-th scores tie) is redone
    on its full masked row, where torch.topk breaks the tie as it does for the reference."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    n = masked.shape[-1]
    if n <= k:  # every key is taken: pad with masked keys as select does
        return _full_rows(masked, S, k, tie_break)
    vals, idx = masked.topk(k + 1, dim=-1, sorted=False)  # the k + 1 best, in no order
    low = vals.min(-1, keepdim=True)  # the (k+1)-th score: the top-k set is unique unless another one equals it
    tied = (vals == low.values).sum(-1) > 1  # (B, t)
    top = idx.scatter(-1, low.indices, idx[..., k:])[..., :k]  # drop the (k+1)-th
    if tie_break == "stable":  # ties to the earlier position, as the stable sort: order the set by (score, position)
        top = top.sort(dim=-1).values
        top = top.gather(-1, masked.gather(-1, top).sort(dim=-1, descending=True, stable=True).indices)
    if tied.any():
        b, t = tied.nonzero(as_tuple=True)
        top = top.clone()
        top[b, t] = _full_rows(masked[b, t][None], S, k, tie_break)[0]
    return top


def _full_rows(masked: torch.Tensor, S: int, k: int, tie_break: str) -> torch.Tensor:
    full = F.pad(masked, (0, S - masked.shape[-1]), value=float("-inf"))  # (B, t, S), as select sees them
    if tie_break == "stable":
        return full.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return full.topk(k, dim=-1).indices


def select_causal(attn, x_i, q_idx, index_k, pos_q, pos_k, tie_break):
    """Indexer + top-k for a few queries over their visible keys: x_i (B,c,H), q_idx (B,c,HI,dI), index_k (B,S,dI)
    → (B, c, k) int64 key indices, `Attention.select`'s."""
    S, k = index_k.shape[1], attn.cfg.index_topk
    n = max(visible_keys(pos_q, pos_k), min(S, k + 1))
    scores = attn.indexer.scores(x_i, q_idx, index_k[:, :n])  # (B, c, n)
    return topk_of_rows(scores, pos_k[:, None, :n] <= pos_q[..., None], S, k, tie_break)


def sparse_chunk(attn, x, cos, sin, pos_q, pos_k, latents, index_k, want_kl: bool, tie_break: str, kl_fn):
    """One query chunk from the block input to o_proj: x (B,t,H), pos_q (B,t), pos_k (B,S), latents (B,S,kvl+dr)
    = [c_kv; k_rot] of every key, index_k (B,S,dI) → (out (B,t,H), indexer KL over the selected keys or 0).
    Selection and attention run `attn.index_chunk` queries at a time: their index scores and gathered latents
    stay a few MB (on a CPU, fresh tensors of tens of MB cost more in page faults than the copy itself)."""
    B, t, _ = x.shape
    h, kvl, S, C = attn.n_heads, attn.kvl, latents.shape[1], attn.index_chunk
    q_nope, q_rot, q_latent = attn.project_q(x, cos, sin)  # (B,h,t,dn), (B,h,t,dr), (B,t,ql)
    x_i, ql_i = x.detach(), q_latent.detach()  # the indexer learns only from its own KL (as Attention.forward)
    with torch.set_grad_enabled(want_kl and torch.is_grad_enabled()):
        q_idx = attn.indexer.queries(ql_i, cos, sin)  # (B, t, HI, dI)
    w_uk, w_uv = attn.w_uk_uv()
    q_lat = torch.einsum("bhtd,hdc->bthc", q_nope, w_uk)  # (B, t, h, kvl): W_UK absorbed into q
    q_cat = torch.cat([q_lat, q_rot.transpose(1, 2)], dim=-1) * attn.scale  # (B, t, h, kvl + dr), pre-scaled
    rows = latents.reshape(B * S, -1)  # one row per (sequence, key)
    # without autograd one buffer takes every sub-chunk's gathered latents: a fresh 10 MB tensor per sub-chunk
    # costs the CPU more in page faults than the copy itself (the allocator hands such sizes back to the OS)
    buf = None if torch.is_grad_enabled() else rows.new_empty(B * min(C, t) * attn.cfg.index_topk, rows.shape[1])
    o_lat, kl = [], q_cat.new_zeros(())
    for j in reversed(range(0, t, C)):  # the longest rows first: see `sparse_attention`
        s = slice(j, j + C)
        with torch.no_grad():
            top = select_causal(attn, x_i[:, s], q_idx[:, s].detach(), index_k.detach(), pos_q[:, s], pos_k, tie_break)
        c, k = top.shape[1:]
        flat = (top + torch.arange(B, device=x.device)[:, None, None] * S).reshape(-1)  # (B·c·k,)
        sel = rows.index_select(0, flat) if buf is None else torch.index_select(rows, 0, flat, out=buf[: flat.numel()])
        sel = sel.view(B * c, k, -1)  # (B·c, k, kvl + dr): the latents of each query's keys
        mask = pos_k.gather(1, top.reshape(B, -1)).view(B * c, 1, k) <= pos_q[:, s].reshape(B * c, 1, 1)
        logits = torch.bmm(q_cat[:, s].reshape(B * c, h, -1), sel.transpose(1, 2))  # (B·c, h, k)
        if not mask.all():  # only queries that see fewer than k keys select masked ones
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(q_cat.dtype)
        o_lat.append(torch.bmm(probs, sel[..., :kvl]).view(B, c, h, kvl))
        if want_kl:
            k_sel = index_k.reshape(B * S, -1).index_select(0, flat).view(B, c, k, -1)  # (B, c, k, dI)
            scores = attn.indexer.scores_at(x_i[:, s], q_idx[:, s], k_sel)  # (B, c, k)
            kl = kl + kl_fn(probs.view(B, c, h, k).transpose(1, 2), scores, mask.view(B, c, k)) * (c / t)
    out = torch.einsum("bthc,hvc->bthv", torch.cat(o_lat[::-1], dim=1), w_uv)  # W_UV after the weighted sum
    return attn.o_proj(out.reshape(B, t, h * attn.dv)), kl


def sparse_attention(attn, x, cos, sin, positions, want_kl: bool, tie_break: str, kl_fn):
    """`Attention.forward`'s sparse path: x (B,T,H) normed block input, positions (B,T) → (out (B,T,H), indexer
    KL averaged over queries, or 0). kl_fn: model.py's `indexer_kl`."""
    T, C = x.shape[1], attn.query_chunk
    c_kv, k_rot = attn.project_kv(x, cos, sin)  # (B, S, kvl), (B, S, dr)
    latents = torch.cat([c_kv, k_rot], dim=-1)  # (B, S, kvl + dr): one row per key, shared by the heads
    with torch.set_grad_enabled(want_kl and torch.is_grad_enabled()):  # the indexer learns from its KL only
        index_k = attn.indexer.keys(x.detach(), cos, sin)  # (B, S, dI)
    outs, kl = [], 0.0
    # chunks and their sub-chunks run last first: the index scores shrink from one to the next, so each fits the
    # memory the allocator kept from the one before (growing tensors of MBs each get fresh pages from the OS)
    for i in reversed(range(0, T, C)):
        s = slice(i, i + C)
        args = (attn, x[:, s], cos[:, s], sin[:, s], positions[:, s], positions, latents, index_k, want_kl,
                tie_break, kl_fn)
        if torch.is_grad_enabled():
            out, k = checkpoint(sparse_chunk, *args, use_reentrant=False)
        else:
            out, k = sparse_chunk(*args)
        outs.append(out)
        kl = kl + k * (out.shape[1] / T)  # the mean over all queries
    return torch.cat(outs[::-1], dim=1), kl
