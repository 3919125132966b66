"""GLM-5 model: MLA attention (DeepSeek-V2 §2.1), DSA lightning indexer + top-k sparse attention
(DeepSeek-V3.2 §2.1), MoE with a sigmoid router and aux-loss-free bias (DeepSeek-V3 §2.1.2),
multi-token prediction (DeepSeek-V3 §2.2), first layers dense, as GLM-5 (arXiv 2602.15763 §2) builds them.

Read top to bottom: RMSNorm → RoPE → Indexer → MLA attention (dense masked path + gathered sparse
path + absorbed MQA form) → MLP → Router/Experts/MoE → Block → MTP → GLM5.

Weights are named as in HF `GlmMoeDsaForCausalLM` (no `model.` prefix): checkpoint.py's converter is a rename, and
logits equal the reference's on the same weights. Aux losses and statistics come back in `ModelOutput`, never globals."""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoglm5.config import ModelConfig
from nanoglm5.dsa import sparse_attention

TIE_BREAKS = ("topk", "stable")  # how DSA breaks exact ties of index scores: see `Attention`


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def autocast_off(device: torch.device):
    """Autocast off for the device: under autocast F.linear/matmul cast even fp32 inputs to bf16, so "routing in
    fp32" needs this as well as .float(); outside autocast it changes nothing (fp32 results stay bit for bit)."""
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta tensors: no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """positions (B, T) → cos, sin (B, T, dim/2): one angle per rotated pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, dim/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (GLM-5: rope_interleave = indexer_rope_interleave = true): pairs (x0,x1), (x2,x3)…
    The output lists the rotated evens then the rotated odds, as HF does; q and k share the layout,
    so every dot product equals the in-place interleaved rotation. cos/sin broadcast to x[..., :d/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------- DSA indexer
class Indexer(nn.Module):
    """Lightning indexer (DeepSeek-V3.2 eq. 1): I[t,s] = Σ_j w[t,j] · ReLU(q_j[t]·k[s] · d^-1/2),
    w = weights_proj(x) · H_I^-1/2, q from the normed query latent, one shared key per token
    (LayerNorm, then RoPE on its first qk_rope_head_dim dims)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5

    def _rope_first(self, x, cos, sin):  # RoPE on the first rope_dim dims (the reference's [pe, nope] split)
        x_rot, x_pass = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(x_rot, cos, sin), x_pass], dim=-1)

    def keys(self, x, cos, sin):
        return self._rope_first(self.k_norm(self.wk(x)), cos, sin)  # (B, T, dI)

    def queries(self, q_latent, cos, sin):
        B, T, _ = q_latent.shape
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        return self._rope_first(q, cos[:, :, None], sin[:, :, None])  # (B, T, HI, dI)

    def scores(self, x, q, k):
        """x (B,T,H) block input, q (B,T,HI,dI), k (B,S,dI) → index scores (B, T, S) in fp32."""
        B, T, HI, D = q.shape
        w = self.weights_proj(x).float() * self.n_heads**-0.5  # (B, T, HI); bf16 under autocast, as the engine's
        # autocast would run the matmuls below in bf16 whatever their inputs: the scores that choose the top-k
        # keys are fp32, as the engine (decode.py) computes them, so learner and workers select the same keys
        with autocast_off(x.device):
            # one (T·HI, D) @ (D, S) matmul per sequence; a broadcast matmul would copy k T times
            s = torch.matmul(q.float().reshape(B, T * HI, D), k.float().transpose(-1, -2)).view(B, T, HI, -1)
            s = torch.relu_(s.mul_(self.softmax_scale))  # (B, T, HI, S), in place: the largest tensor of DSA
            return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)  # (B, T, S)

    def scores_at(self, x, q, k_sel):
        """`scores` at chosen keys only: k_sel (B,T,k,dI), each query's own keys → (B, T, k), O(T·k) not O(T·S)."""
        w = self.weights_proj(x).float() * self.n_heads**-0.5  # (B, T, HI)
        with autocast_off(x.device):
            s = F.relu(torch.einsum("bthd,btkd->bthk", q.float(), k_sel.float()) * self.softmax_scale)
            return torch.einsum("bth,bthk->btk", w, s)


def indexer_kl(p_heads: torch.Tensor, index_scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """DSA indexer loss (DeepSeek-V3.2 §2.1): KL(p ‖ softmax(I)) per query, averaged over queries.
    p = main attention summed over heads, L1-normalised, detached (the teacher); the student sees the
    same allowed set (all causal keys in the warm-up, the selected keys in the sparse stage).
    p_heads (B, H, T, S) attention probs, index_scores (B, T, S), allowed (B, T, S) bool."""
    p = p_heads.detach().float().sum(1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    log_q = torch.log_softmax(index_scores.masked_fill(~allowed, float("-inf")), dim=-1)
    log_q = log_q.masked_fill(~allowed, 0.0)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p))
    return kl.sum(-1).mean()


# ---------------------------------------------------------------------------------------------- MLA attention
class Attention(nn.Module):
    """Multi-head latent attention with DSA. Per token only the normed KV latent (kv_lora_rank), the
    roped shared key (qk_rope_head_dim) and the indexer key are computed from x; the per-head keys
    and values come from kv_b_proj. Three equal ways to attend:
      - dense masked (MHA form, expanded K/V): the reference, used for parity and the warm-up;
      - gathered sparse (MQA/absorbed form over the top-k latents): cost O(T·k), the point of DSA;
      - absorbed over the compressed KV cache (inference: decode.py, the same math arranged for decoding):
        W_UK folded into q, W_UV applied after (DeepSeek-V2 §2.1.2).

    DSA top-k ties (`tie_break`, a forward argument): ReLU makes all-zero index scores common, so exact ties
    on the top-k boundary happen.
      "topk"   torch.topk on the causally masked row, as the reference does: equal to transformers, but
               topk's order among ties depends on the row's length, so a token's selection can change when
               more (masked) future tokens are in the tensor: cache decode ≠ full recompute on ties.
      "stable" ties go to the earlier position: the selection depends only on visible scores, so cache
               decode, batching and full recompute agree exactly. The engine and the RL learner pass it.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.kvl = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        bias = cfg.attention_bias
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # eps 1e-6 in the reference, not rms_norm_eps
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kvl + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kvl, 1e-6)
        self.kv_b_proj = nn.Linear(self.kvl, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, cfg.hidden_size, bias=bias)
        self.indexer = Indexer(cfg)
        self.scale = (self.dn + self.dr) ** -0.5
        self.query_chunk = 1024  # sparse path: queries per checkpointed block (bounds memory at long T)
        self.index_chunk = 64  # fast sparse path (dsa.py): queries selected and attended at once
        self.gather_min_keys = 1024  # impl="auto" gathers above this many keys (2K training: 7x faster than dense)

    # -- projections --------------------------------------------------------------------------
    def project(self, x, cos, sin):
        """x (B,T,H) → q_nope (B,h,T,dn), q_rot (B,h,T,dr), q latent (B,T,ql), c_kv (B,T,kvl), k_rot (B,T,dr)."""
        return *self.project_q(x, cos, sin), *self.project_kv(x, cos, sin)

    def project_q(self, x, cos, sin):
        B, T, _ = x.shape
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        return q_nope, apply_rope(q_rot, cos[:, None], sin[:, None]), q_latent

    def project_kv(self, x, cos, sin):
        c_kv, k_rot = self.kv_a_proj_with_mqa(x).split([self.kvl, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rot, cos, sin)

    def w_uk_uv(self):
        """kv_b_proj split per head: W_UK (h, dn, kvl) and W_UV (h, dv, kvl)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kvl)
        return w[:, : self.dn], w[:, self.dn :]

    # -- the three attention forms ------------------------------------------------------------
    def attend_dense(self, q_nope, q_rot, c_kv, k_rot, mask):
        """Expanded MHA form. mask (B,T,S) bool, True = may attend. → out (B,T,h·dv), probs (B,h,T,S)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B,h,S,dn), (B,h,S,dv)
        k = torch.cat([k_nope, k_rot[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, h, T, S)
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)  # q is fp32 where RoPE left q_rot so
        out = torch.matmul(probs, v)  # (B, h, T, dv)
        return out.transpose(1, 2).reshape(B, -1, self.n_heads * self.dv), probs

    def attend_absorbed(self, q_nope, q_rot, c_kv, k_rot, mask, topk=None):
        """Absorbed MQA form over latents (decode and DSA kernels). With topk (B,T,k) each query gathers
        its own k latents (cost O(T·k)); without, every query sees all S latents.
        → out (B,T,h·dv), probs (B,h,T,k or S)."""
        B, T = q_nope.shape[0], q_nope.shape[2]
        w_uk, w_uv = self.w_uk_uv()
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, h, T, kvl): W_UK absorbed into q
        if topk is None:
            logits = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv) + torch.einsum("bhtr,bsr->bhts", q_rot, k_rot)
        else:
            idx = topk.reshape(B, -1)  # gather (B, T·k) rows of the latent cache
            c_sel = c_kv.gather(1, idx[..., None].expand(-1, -1, c_kv.shape[-1])).view(B, T, -1, c_kv.shape[-1])
            r_sel = k_rot.gather(1, idx[..., None].expand(-1, -1, k_rot.shape[-1])).view(B, T, -1, k_rot.shape[-1])
            mask = mask.gather(-1, topk)
            logits = torch.einsum("bhtc,btkc->bhtk", q_lat, c_sel) + torch.einsum("bhtr,btkr->bhtk", q_rot, r_sel)
        logits = (logits * self.scale).masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(q_lat.dtype)
        if topk is None:
            o_lat = torch.einsum("bhts,bsc->bhtc", probs, c_kv)
        else:
            o_lat = torch.einsum("bhtk,btkc->bhtc", probs, c_sel)
        out = torch.einsum("bhtc,hvc->bthv", o_lat, w_uv)  # W_UV applied after the weighted sum
        return out.reshape(B, T, self.n_heads * self.dv), probs

    # -- DSA selection and the sparse block -----------------------------------------------------
    def select(self, index_scores, allowed, tie_break: str = "topk"):
        """Top-k keys per query. The causal mask is added BEFORE top-k, so the selection never holds the future."""
        masked = index_scores.detach().masked_fill(~allowed, float("-inf"))
        if tie_break == "stable":
            return masked.sort(dim=-1, descending=True, stable=True).indices[..., : self.cfg.index_topk]
        return masked.topk(self.cfg.index_topk, dim=-1).indices

    def sparse_block(self, x_i, ql_i, cos, sin, q_nope, q_rot, c_kv, k_rot, index_k, allowed, want_kl: bool,
                     tie_break: str = "topk"):
        """Indexer → top-k → gathered absorbed attention, for a block of queries (all keys): the readable form of
        the sparse path (Attention.forward runs dsa.py's fast one, which tests check equal to this).
        Returns (out, KL over the selected set, or 0 when not asked)."""
        with torch.set_grad_enabled(want_kl and torch.is_grad_enabled()):
            scores = self.indexer.scores(x_i, self.indexer.queries(ql_i, cos, sin), index_k)  # (B, t, S)
        topk = self.select(scores, allowed, tie_break)
        out, probs = self.attend_absorbed(q_nope, q_rot, c_kv, k_rot, allowed, topk)
        if not want_kl:
            return out, out.new_zeros(())
        return out, indexer_kl(probs, scores.gather(-1, topk), allowed.gather(-1, topk))

    def forward(self, x, cos, sin, positions, sparse=True, want_kl=False, impl="auto", tie_break="topk"):
        """x (B,T,H) normed block input; positions (B,T) absolute.
        impl: "dense" (masked MHA), "absorbed" (gathered latents) or "auto".
        tie_break: "topk" or "stable", how DSA breaks exact ties of index scores (see the class docstring).
        Returns (out (B,T,H), indexer KL or None)."""
        S = x.shape[1]
        select = sparse and S > self.cfg.index_topk  # with S <= k the top-k holds every visible token: dense
        if impl == "auto":
            # gathering the top-k latents only pays off for long contexts (on CPU, below ~1K keys the masked
            # dense matmuls are faster: docs/benchmarks.md)
            impl = "absorbed" if select and S > self.gather_min_keys else "dense"
        if select and impl == "absorbed":  # dsa.py: chunked, causal-only indexer, recomputed in backward
            out, kl = sparse_attention(self, x, cos, sin, positions, want_kl, tie_break, indexer_kl)
            return out, (kl if want_kl else None)

        q_nope, q_rot, q_latent, c_kv, k_rot = self.project(x, cos, sin)
        # the indexer learns only from its own KL: its inputs are detached (DeepSeek-V3.2 §2.1)
        x_i, ql_i = x.detach(), q_latent.detach()
        index_k = self.indexer.keys(x_i, cos, sin) if (sparse or want_kl) else None
        allowed = positions[:, None, :] <= positions[:, :, None]  # (B, T, S) causal over absolute positions
        topk, index_scores, kl = None, None, None
        if select or want_kl:
            with torch.set_grad_enabled(want_kl and torch.is_grad_enabled()):
                index_scores = self.indexer.scores(x_i, self.indexer.queries(ql_i, cos, sin), index_k)
        if select:
            topk = self.select(index_scores, allowed, tie_break)
        if impl == "dense":
            mask = allowed
            if topk is not None:
                mask = mask & torch.zeros_like(allowed).scatter(-1, topk, True)
            out, probs = self.attend_dense(q_nope, q_rot, c_kv, k_rot, mask)
            if want_kl:  # warm-up: the full causal distribution; sparse stage: the selected set
                kl = indexer_kl(probs, index_scores, mask)
        else:
            out, probs = self.attend_absorbed(q_nope, q_rot, c_kv, k_rot, allowed)
            if want_kl:
                kl = indexer_kl(probs, index_scores, allowed)
        return self.o_proj(out), kl


# ---------------------------------------------------------------------------------------------- MLP and MoE
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). The first_k_dense_replace layers and the shared expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid router, noaux_tc (DeepSeek-V3 eqs. 15-16): experts chosen by top-k of sigmoid(logits) + b,
    gates = the chosen sigmoid scores WITHOUT b, normalised, × routed_scaling_factor. b is a buffer
    (`e_score_correction_bias`) moved by the sign rule after each step, never by the optimizer."""
    # kept fp32 when the model is cast to bf16 (`cast_model`): the learner routes with its fp32 master
    # weights, so a bf16 worker must route with the same ones to choose the same experts
    fp32_tensors = ("weight", "e_score_correction_bias")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x):
        """x (N, H) → gates (N, k), expert ids (N, k), sigmoid scores (N, E)."""
        cfg = self.cfg
        with autocast_off(x.device):  # routing in true fp32, autocast or not (the engine routes in fp32 too)
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:  # group-limited routing (DeepSeek-V3); GLM-5 has n_group = 1
            g = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            keep = g.topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1)[1]  # (N, topk_group)
            group_mask = torch.zeros_like(g[..., 0]).scatter(1, keep, 1.0).bool()
            choice = choice.masked_fill(~group_mask.repeat_interleave(g.shape[-1], dim=1), float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        gates = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return gates * cfg.routed_scaling_factor, idx, scores


_warned = set()


def _warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        print(f"[nanoglm5] {msg}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on for x's device, else x's own."""
    on = x.dtype.is_floating_point and torch.amp.is_autocast_available(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on and torch.is_autocast_enabled(x.device.type) else x.dtype


class Experts(nn.Module):
    """Routed experts as stacked tensors (HF layout): gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def weights(self):
        """(gate_up, down); int4.py overrides this to fake-quantize or unpack int4."""
        return self.gate_up_proj, self.down_proj

    def forward_loop(self, x, gates, idx):
        """The readable reference: for each expert, run its tokens through its SwiGLU."""
        gate_up, down = self.weights()
        out = torch.zeros_like(x)
        for e in range(gate_up.shape[0]):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            g, u = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, down[e]) * gates[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def forward(self, x, gates, idx):
        """Grouped dispatch: sort (token, expert) pairs by expert, two grouped matmuls, scatter back. Under autocast
        in its dtype, as the loop's F.linear (autocast does not cast _grouped_mm's inputs); returns x's dtype."""
        dt = compute_dtype(x)
        if not hasattr(torch, "_grouped_mm") or (x.device.type == "cuda" and dt == torch.float32):
            _warn_once("torch._grouped_mm unavailable for this device/dtype: MoE falls back to the per-expert loop")
            return self.forward_loop(x, gates, idx)
        gate_up, down = (w.to(dt) for w in self.weights())
        E, k = gate_up.shape[0], idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[token].to(dt), gate_up.transpose(-1, -2), offs=offs)  # (N·k, 2I)
        g, u = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(g) * u, down.transpose(-1, -2), offs=offs)  # (N·k, H)
        y = y * gates.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        self.use_loop = False  # the per-expert reference loop instead of grouped dispatch

    def forward(self, x):
        """x (B,T,H) → out, expert load (E,) token counts, sequence-level balance loss (DeepSeek-V3 eq. 17-20)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        gates, idx, scores = self.gate(flat)
        run = self.experts.forward_loop if self.use_loop else self.experts
        out = run(flat, gates.to(x.dtype), idx).view(B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        E, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        load = torch.bincount(idx.reshape(-1), minlength=E).float()
        if not torch.is_grad_enabled():
            return out, load, None
        # f_i = E/(k·T) · #tokens of the sequence routed to i; P_i = mean_t of normalised scores
        chosen = torch.zeros(B * T, E, device=x.device).scatter(1, idx, 1.0).view(B, T, E)
        f = chosen.sum(1) * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        balance = (f.detach() * p).sum(-1).mean()
        return out, load, balance


# ---------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """Pre-norm decoder layer: x += Attn(norm(x)); x += MLP_or_MoE(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, positions, sparse=True, want_kl=False, impl="auto", tie_break="topk"):
        a, kl = self.self_attn(self.input_layernorm(x), cos, sin, positions, sparse, want_kl, impl, tie_break)
        x = x + a
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            m, load, balance = self.mlp(h)
        else:
            m, load, balance = self.mlp(h), None, None
        return x + m, kl, load, balance


class MTPLayer(nn.Module):
    """Multi-token prediction module (DeepSeek-V3 §2.2; GLM-5: one layer): at position i,
    h' = eh_proj([enorm(emb(x_{i+1})); hnorm(h_i)]) → one decoder layer → shared_head.norm → the shared
    lm_head, predicting x_{i+2}. h_i is the main model's last hidden state before its final norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)  # embedding first, hidden second, as the reference's eh_proj
        self.block = Block(cfg, layer_idx, moe=True)
        self.shared_head_norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, h, emb_next, cos, sin, positions, sparse=True, want_kl=False, tie_break="topk"):
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        x, kl, load, balance = self.block(x, cos, sin, positions, sparse, want_kl, tie_break=tie_break)
        return self.shared_head_norm(x), kl, load, balance


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab), or logits_at.shape + (vocab,) when the forward was given logits_at
    loss: torch.Tensor | None = None  # lm_loss + mtp_weight · mtp_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    indexer_kl: torch.Tensor | None = None  # mean over layers, when asked
    balance_loss: torch.Tensor | None = None  # mean over MoE layers (sequence-level, unweighted)
    expert_load: torch.Tensor | None = None  # (n_moe_layers, E) token counts of this forward
    hidden: torch.Tensor | None = None  # last hidden state before the final norm (MTP drafting)


# ---------------------------------------------------------------------------------------------- the model
class GLM5(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i) for i in range(cfg.num_nextn_predict_layers))
        self.apply(self._init)

    def _init(self, m):
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (Router, Experts)):
            for p in m.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, targets=None, *, positions=None, sparse=True, indexer_kl=False,
                mtp_weight=0.3, impl="auto", logits_at=None, tie_break="topk") -> ModelOutput:
        """input_ids (B, T). targets (B, T) with -1 = ignore. sparse: DSA top-k on (off = dense attention,
        the warm-up stage). indexer_kl: also return the indexer's KL to the main attention (both stages).
        Generation with a KV cache is decode.py (the engine's forward), not this one.
        logits_at: per-row indices into T, (B,) or (B, K): the final norm and the head run only there and
        logits has shape logits_at.shape + (vocab,) (generation: each row's last real token, whatever its
        right padding). Not with targets, whose loss needs every position.
        tie_break: "topk" (reference-exact, default) or "stable" (cache-consistent), see `Attention`."""
        cfg = self.config
        B, T = input_ids.shape
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r}: use 'topk' (equal to transformers) or 'stable' (cache-consistent)")
        if logits_at is not None and targets is not None:
            raise ValueError("logits_at and targets together: the loss needs the logits of every position")
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if int(positions.max()) >= cfg.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} >= max_position_embeddings={cfg.max_position_embeddings}; "
                             "use shorter sequences or a config with a longer context")
        cos, sin = rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta)
        x = self.embed_tokens(input_ids)
        kls, loads, balances = [], [], []
        for layer in self.layers:
            x, kl, load, bal = layer(x, cos, sin, positions, sparse, indexer_kl, impl, tie_break)
            kls.append(kl)
            loads.append(load)
            balances.append(bal)
        hidden = x
        if logits_at is not None:
            rows = torch.arange(B, device=x.device)
            x = x[rows if logits_at.dim() == 1 else rows[:, None], logits_at.to(x.device)]
        out = ModelOutput(logits=self.lm_head(self.norm(x)), hidden=hidden)

        if targets is not None:
            V = cfg.vocab_size
            out.lm_loss = F.cross_entropy(out.logits.float().view(-1, V), targets.reshape(-1), ignore_index=-1)
            out.loss = out.lm_loss
            if len(self.mtp) and T > 1:
                out.mtp_loss = self._mtp_loss(hidden, input_ids, targets, cos, sin, positions, sparse, indexer_kl,
                                               tie_break, kls, loads, balances)
                out.loss = out.loss + mtp_weight * out.mtp_loss
        if indexer_kl:
            out.indexer_kl = torch.stack([k for k in kls if k is not None]).mean()
        loads = [ld for ld in loads if ld is not None]
        if loads:
            out.expert_load = torch.stack(loads).detach()
            balances = [b for b in balances if b is not None]
            out.balance_loss = torch.stack(balances).mean() if balances else None
        return out

    def _mtp_loss(self, hidden, input_ids, targets, cos, sin, positions, sparse, want_kl, tie_break, kls, loads,
                  balances):
        """L_MTP = (1/D) Σ_k CE_k (DeepSeek-V3 eq. 25); depth k predicts the token k+1 ahead."""
        losses, h = [], hidden
        V = self.config.vocab_size
        for k, mtp in enumerate(self.mtp, start=1):
            n = h.shape[1] - 1
            if n < 1:
                break
            emb_next = self.embed_tokens(input_ids[:, k : k + n])
            h, kl, load, bal = mtp(h[:, :n], emb_next, cos[:, :n], sin[:, :n], positions[:, :n], sparse, want_kl,
                                   tie_break)
            kls.append(kl)
            loads.append(load)
            balances.append(bal)
            logits = self.lm_head(h)
            losses.append(F.cross_entropy(logits.float().reshape(-1, V), targets[:, k : k + n].reshape(-1), ignore_index=-1))
        return torch.stack(losses).mean()

    # -- MoE balancing -------------------------------------------------------------------------
    @torch.no_grad()
    def update_router_bias(self, expert_load: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += γ·sign(mean load − load_e), per MoE layer.
        expert_load (n_moe_layers [+ MTP], E) from the last step's ModelOutput (summed over micro-batches)."""
        routers = [m.gate for m in self.moe_layers()]  # main layers first, then MTP, as forward reports them
        n_main = self.config.n_moe_layers
        if expert_load.shape[0] not in (n_main, len(routers)):
            raise ValueError(f"expert_load has {expert_load.shape[0]} rows; the model has {n_main} MoE layers "
                             f"({len(routers)} with MTP): pass ModelOutput.expert_load")
        for router, load in zip(routers, expert_load.to(self.lm_head.weight.device)):
            router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)] + [m.block.mlp for m in self.mtp]

    def set_moe_loop(self, on: bool) -> None:
        for m in self.moe_layers():
            m.use_loop = on

    def indexer_parameters(self):
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    def num_params(self, include_mtp: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))
        return n
