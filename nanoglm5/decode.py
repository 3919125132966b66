"""The lean inference forward over the compressed KV cache: what the engine runs for prefill, decode, the
speculative verification and the MTP drafter. The math of model.py's absorbed MLA (DeepSeek-V2 §2.1.2), DSA
top-k (DeepSeek-V3.2 §2.1) and sigmoid-routed MoE, arranged for few torch ops per step (bench/serve.py counts
them); tests/test_engine.py checks it against the model's full forward.

  - `derive_weights`: matrices computed once from the model's parameters, rebuilt when a parameter changes
    (`Decoder.refresh`: its `_version` moves on every in-place update, e.g. RL loading newer weights, an
    optimizer step; its storage moves on `.to()`). Per layer:
      qkv_a       everything computed from the block input (q_a_proj, kv_a_proj_with_mqa's latent and rope key,
                  the indexer's wk and weights_proj): one matmul;
      q_b         everything computed from the query latent c_q (q_b_proj with W_UK absorbed, its rope rows,
                  the indexer's wq_b): one matmul;
      o_absorbed  kv_b_proj's W_UV folded into o_proj: one matmul fused with the residual add (addmm).
    (`_attn_weights` shows the algebra.)
    RMSNorm weights (except the final ones before the shared head) and the softmax scales are folded into the
    next matrix, and RoPE's pair rotation into a fixed signed permutation of rows (`_rope_perms`), so RoPE is
    two multiplies and an add with cos/sin tables built once per engine.
  - inference only: no MoE loads, balance loss or indexer KL. The MoE gathers the chosen experts' weights for a
    few tokens (decode) and runs the model's grouped dispatch for many (prefill); the shared expert is one matmul.
  - `PagedKVCache`: one preallocated tensor per layer stack, (layers, (blocks + 1) · block_size, kvl + rope +
    index_dim): a token's latent, rope key and indexer key side by side, in fixed-size blocks that block tables
    (block_manager.py) assign to sequences; written with one index_put_ per layer, read through the tables (one
    index_select per layer; rows on consecutive blocks at a fixed stride read one strided view). The last block is scratch: padded
    rows of a batch write there. A row attends to keys at positions <= its query's, so entries past a row's
    length (rejected drafts, padding) are never read before being overwritten.
  - static shapes (`Decoder.run_static`): the batch padded to a bucket, attention over a length bucket (a power
    of two of blocks), the inputs in fixed buffers: what `torch.cuda.CUDAGraph` captures per bucket (on CPU the
    same path runs eagerly, which the tests use to check the padding).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanoglm5.model import GLM5, MoE

GATHER_PAIRS = 64  # MoE: up to this many (token, expert) pairs gather the experts' weights, else grouped dispatch


def _rope_perms(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """P v = [v0, v2, ..., v1, v3, ...] and Q v = [-v1, -v3, ..., v0, v2, ...]: model.apply_rope(v) (rotated
    evens, then rotated odds) = (P v)·[cos, cos] + (Q v)·[sin, sin]. Exact: each row has one ±1."""
    eye = torch.eye(d, device=device)
    return torch.cat([eye[0::2], eye[1::2]]), torch.cat([-eye[1::2], eye[0::2]])


def _rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight (folded into the next matrix), in fp32: x · rsqrt(‖x‖²/d + eps), four ops.
    eps: a 0-dim fp32 tensor (a Python number costs a host-to-tensor conversion per op)."""
    if x.dtype != torch.float32:
        return _rms(x.float(), eps).to(x.dtype)
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


def _const(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------- derived weights
def _attn_weights(layer, dtype) -> SimpleNamespace:
    """model.Attention's matrices folded for decoding. Per head, with c_q = q_a_layernorm(q_a_proj x) and
    c_kv = kv_a_layernorm(latent of kv_a_proj_with_mqa x), the model scores
        q_nope·k_nope + q_rope·k_rope,   q_nope = W_UQ c_q (q_b_proj's nope rows), k_nope = W_UK c_kv (kv_b_proj's
                                          key rows),
    and q_nope·k_nope = (W_UK^T W_UQ c_q)·c_kv: `q_b` maps c_q straight to a query in latent space that attends
    the cached c_kv itself (DeepSeek-V2 §2.1.2). The values: o_proj(W_UV Σ_s p_s c_kv,s) = (o_proj W_UV) Σ_s p_s
    c_kv,s: `o_absorbed`. Names: qkv_a = the stacked matrices of the block input, q_b = those of c_q, o_absorbed,
    k_rope_perm = RoPE's permutations on the key side; the RMSNorm weights and the softmax scales are folded in."""
    a, f = layer.self_attn, (lambda t: t.detach().float())
    ix = a.indexer
    h, dn, dr, dv, kvl, HI, dI = a.n_heads, a.dn, a.dr, a.dv, a.kvl, ix.n_heads, ix.head_dim
    dev = a.kv_b_proj.weight.device
    rope_even_odd, rope_rotate = _rope_perms(dr, dev)
    idx_even_odd = torch.block_diag(rope_even_odd, torch.eye(dI - dr, device=dev))  # the indexer ropes only its first dr dims
    idx_rotate = torch.block_diag(rope_rotate, torch.zeros(dI - dr, dI - dr, device=dev))
    # [q_a_proj; kv_a_proj_with_mqa; indexer.wk; indexer.weights_proj] · diag(input_layernorm): one matmul of x
    qkv_a = torch.cat([f(a.q_a_proj.weight), f(a.kv_a_proj_with_mqa.weight), f(ix.wk.weight),
                       f(ix.weights_proj.weight) * ix.n_heads**-0.5]) * f(layer.input_layernorm.weight)
    qkv_a_bias = None
    if a.q_a_proj.bias is not None or a.kv_a_proj_with_mqa.bias is not None:
        z = lambda n: torch.zeros(n, device=dev)  # noqa: E731
        qkv_a_bias = torch.cat([f(a.q_a_proj.bias) if a.q_a_proj.bias is not None else z(a.q_a_proj.weight.shape[0]),
                                f(a.kv_a_proj_with_mqa.bias) if a.kv_a_proj_with_mqa.bias is not None else z(kvl + dr),
                                z(dI + HI)]).to(dtype)
    w_kv = f(a.kv_a_layernorm.weight)
    W_UQ_and_QR = f(a.q_b_proj.weight).view(h, dn + dr, -1)  # per head: the nope rows W_UQ, then the rope rows W_QR
    W_UK_and_UV = f(a.kv_b_proj.weight).view(h, dn + dv, kvl)  # per head: the key rows W_UK, then the value rows W_UV
    W_UK, W_UV = W_UK_and_UV[:, :dn], W_UK_and_UV[:, dn:]
    q_nope_absorbed = torch.einsum("hdc,hdj->hcj", W_UK, W_UQ_and_QR[:, :dn]) * (w_kv[:, None] * a.scale)  # W_UK^T W_UQ
    q_rope = W_UQ_and_QR[:, dn:] * a.scale
    iq = f(ix.wq_b.weight).view(HI, dI, -1) * ix.softmax_scale  # relu(s)·c = relu(s·c) for c > 0
    # [W_UK^T W_UQ | P W_QR | P wq_b | Q W_QR | Q wq_b] · diag(q_a_layernorm): RoPE(v) = (P v)·cos + (Q v)·sin
    q_b = torch.cat([q_nope_absorbed.reshape(h * kvl, -1), (rope_even_odd @ q_rope).reshape(h * dr, -1),
                     (idx_even_odd @ iq).reshape(HI * dI, -1), (rope_rotate @ q_rope).reshape(h * dr, -1),
                     (idx_rotate @ iq).reshape(HI * dI, -1)]) * f(a.q_a_layernorm.weight)
    H = a.o_proj.weight.shape[0]
    o_absorbed = torch.einsum("ohv,hvc->ohc", f(a.o_proj.weight).view(H, h, dv), W_UV * w_kv).reshape(H, -1)
    # the key side [k_rot | indexer key] → [P k | Q k] in one matmul: RoPE is then two multiplies and an add
    k_rope_perm = torch.cat([torch.block_diag(rope_even_odd, idx_even_odd), torch.block_diag(rope_rotate, idx_rotate)]).t()
    ln, c = ix.k_norm, lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
    return SimpleNamespace(
        qkv_a=qkv_a.t().contiguous().to(dtype), qkv_a_bias=qkv_a_bias, q_b=q_b.t().contiguous().to(dtype),
        o_absorbed=o_absorbed.t().contiguous().to(dtype),
        o_bias=None if a.o_proj.bias is None else a.o_proj.bias.detach().to(dtype),
        k_rope_perm=k_rope_perm.contiguous().to(dtype),
        kn_w=ln.weight.detach().to(dtype), kn_b=ln.bias.detach().to(dtype), kn_eps=ln.eps,
        split_qkv_a=[a.q_a_proj.weight.shape[0], kvl, dr, dI, HI],
        split_q_b=[h * kvl, h * dr + HI * dI, h * dr + HI * dI],
        h=h, kvl=kvl, dr=dr, HI=HI, dI=dI, topk=a.cfg.index_topk,
        eps=c(layer.input_layernorm.eps), eps_q=c(a.q_a_layernorm.eps), eps_kv=c(a.kv_a_layernorm.eps))


def _mlp_weights(layer, dtype) -> SimpleNamespace:
    f, w = (lambda t: t.detach().float()), layer.post_attention_layernorm.weight.detach().float()
    m, moe = layer.mlp, isinstance(layer.mlp, MoE)
    out = SimpleNamespace(eps=torch.tensor(layer.post_attention_layernorm.eps, device=w.device), moe=moe)
    shared = m.shared_experts if moe else m
    Wgu = None if shared is None else torch.cat([f(shared.gate_proj.weight), f(shared.up_proj.weight)]) * w
    out.I = 0 if shared is None else shared.gate_proj.weight.shape[0]
    out.Wd = None if shared is None else f(shared.down_proj.weight).t().contiguous().to(dtype)
    if not moe:
        out.Wgu = Wgu.t().contiguous().to(dtype)
        return out
    cfg = m.cfg
    if cfg.n_group > 1:
        raise ValueError("group-limited routing (n_group > 1) is not in the inference path; GLM-5 has n_group = 1")
    gu, down = m.experts.weights()  # (E, 2I, H), (E, H, I): views of the parameters unless int4 / QAT
    out.gu, out.down = gu.detach().to(dtype).contiguous(), down.detach().to(dtype).contiguous()
    out.w = w.to(dtype)
    # the router (fp32, as the model routes) and the shared expert's gate/up read the same input: one matmul
    out.Wr = torch.cat([f(m.gate.weight) * w] + ([Wgu] if Wgu is not None else [])).t().contiguous()
    out.bias, out.E = m.gate.e_score_correction_bias, cfg.n_routed_experts
    out.k, out.norm, out.experts = cfg.num_experts_per_tok, cfg.norm_topk_prob, m.experts
    out.rsf, out.tiny = torch.tensor(cfg.routed_scaling_factor, device=w.device), torch.tensor(1e-20, device=w.device)
    return out


@torch.no_grad()
def derive_weights(model: GLM5, dtype: torch.dtype) -> SimpleNamespace:
    m = model
    mtp = []
    for layer in m.mtp[:1]:
        H = layer.eh_proj.weight.shape[0]
        eh = layer.eh_proj.weight.detach().float()
        eh = torch.cat([eh[:, :H] * layer.enorm.weight.float(), eh[:, H:] * layer.hnorm.weight.float()], 1)
        mtp.append(SimpleNamespace(eh=eh.t().contiguous().to(dtype), e_eps=_const(layer.enorm.eps, eh.device),
                                   h_eps=_const(layer.hnorm.eps, eh.device), attn=_attn_weights(layer.block, dtype),
                                   mlp=_mlp_weights(layer.block, dtype),
                                   w_out=layer.shared_head_norm.weight.detach().to(dtype),
                                   out_eps=_const(layer.shared_head_norm.eps, eh.device)))
    return SimpleNamespace(
        emb=m.embed_tokens.weight.detach().to(dtype), head=m.lm_head.weight.detach().to(dtype).t(),
        w_norm=m.norm.weight.detach().to(dtype), norm_eps=_const(m.norm.eps, m.norm.weight.device),
        layers=[SimpleNamespace(attn=_attn_weights(layer, dtype), mlp=_mlp_weights(layer, dtype)) for layer in m.layers],
        mtp=mtp)


def _tensors_of(ns, out: list) -> list:
    for v in vars(ns).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, SimpleNamespace):
            _tensors_of(v, out)
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, SimpleNamespace):
                    _tensors_of(x, out)
    return out


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place update counter; inference tensors (made under torch.inference_mode) keep none."""
    try:
        return t._version
    except RuntimeError:
        return -1


# ---------------------------------------------------------------------------------------------- KV cache
class PagedKVCache:
    """The paged compressed cache: kv (layers, (num_blocks + 1) · block_size, kvl + rope + index_dim), block b
    holding rows b·block_size .. (b+1)·block_size - 1. Position p of a sequence with block table t is row
    t[p // block_size] · block_size + p % block_size (block_manager.py decides the tables). Block `num_blocks`
    is scratch: padded rows of a batch, and positions no block covers, write there and are never read."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, width: int, device, dtype):
        self.num_blocks, self.block_size, self.scratch = num_blocks, block_size, num_blocks
        self.kv = torch.zeros(n_layers, (num_blocks + 1) * block_size, width, device=device, dtype=dtype)
        self.layers = self.kv.unbind(0)

    def nbytes(self) -> int:
        """Bytes the blocks requests can use hold (the scratch block not counted)."""
        n_layers, _, width = self.kv.shape
        return n_layers * self.num_blocks * self.block_size * width * self.kv.element_size()


# ---------------------------------------------------------------------------------------------- the forward
class Decoder:
    """The engine's forward. `run(stack, ids, start, tables, h_prev)` eagerly; `run_static(...)` with the batch
    padded to a bucket (CUDA graph per bucket on CUDA). stack "main" is the model; "mtp" its first MTP layer,
    whose input is the main model's hidden state h_i and the next token x_{i+1} (model.MTPLayer); each has its
    own PagedKVCache, both addressed by the same block tables."""

    def __init__(self, model: GLM5, num_blocks: int, block_size: int, max_seq_len: int, headroom: int, device,
                 sparse: bool, tie_break: str, mtp: bool):
        cfg = self.cfg = model.config
        self.model, self.device, self.sparse, self.tie_break = model, device, sparse, tie_break
        self.dtype = model.embed_tokens.weight.dtype
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, width, device, self.dtype)
        self.mtp_cache = PagedKVCache(1, num_blocks, block_size, width, device, self.dtype) if mtp else None
        self.block_size, self.capacity = block_size, max_seq_len + headroom  # positions a sequence may reach
        cap = self.capacity
        self.max_blocks = -(-cap // block_size)  # block-table width
        self.ar = torch.arange(self.max_blocks * block_size, device=device)
        self.blk, self.off = self.ar // block_size, self.ar % block_size  # position → (table column, row in block)
        # RoPE tables, built once (model.rope_cos_sin's arithmetic) and gathered once per forward for all layers:
        # query side [q_rot of every head | indexer queries], key side [k_rot | indexer key]
        dr, dI, h, HI = cfg.qk_rope_head_dim, cfg.index_head_dim, cfg.num_attention_heads, cfg.index_n_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float, device=device) / dr))
        freqs = self.ar[:cap, None].float() * inv_freq
        c2, s2 = freqs.cos().repeat(1, 2), freqs.sin().repeat(1, 2)
        ci = torch.cat([c2, torch.ones(cap, dI - dr, device=device)], 1)
        si = torch.cat([s2, torch.zeros(cap, dI - dr, device=device)], 1)
        self.rope = torch.cat([c2.repeat(1, h), ci.repeat(1, HI), s2.repeat(1, h), si.repeat(1, HI), c2, ci, s2, si],
                              1).to(self.dtype)
        R = h * dr + HI * dI
        self.rope_split = [R, R, dr + dI, dr + dI]
        self._state = list(model.parameters()) + list(model.buffers())
        self._key = None
        self.graphs: dict = {}  # (stack, T, bucket, blocks) → static buffers (+ a CUDA graph)
        self.static = False  # inside run_static: the MoE always gathers (static shapes, no host sync)
        self._buffers: dict[str, torch.Tensor] = {}  # expert matrices gathered for decode
        self.refresh()

    # -- weights -----------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Rebuild the derived weights if any parameter or buffer changed since the last call (→ True). In place
        when the storages did not move, so captured CUDA graphs stay valid; otherwise the graphs are dropped."""
        ptrs = tuple(t.data_ptr() for t in self._state)
        key = (ptrs, tuple(_version(t) for t in self._state))
        if key == self._key:
            return False
        new = derive_weights(self.model, self.dtype)
        if self._key is not None and ptrs == self._key[0] and self.graphs:
            for old, t in zip(_tensors_of(self.weights, []), _tensors_of(new, [])):
                if old.data_ptr() != t.data_ptr():
                    old.copy_(t)
        else:
            self.weights = new
            self.graphs.clear()
        self._key = key
        return True

    # -- one forward -------------------------------------------------------------------------------
    def _table(self, tables: list[list[int]], width: int) -> list[list[int]]:
        """Block tables padded with the scratch block to `width` columns."""
        pad = self.cache.scratch
        return [t[:width] + [pad] * (width - len(t)) for t in tables]

    def _strided(self, tables: list[list[int]], nb: int) -> tuple[int, int] | None:
        """(first block, stride) when row b's blocks are first + b·stride, first + b·stride + 1, ...: then the batch's
        keys are one strided view of the cache, nb blocks per row, no gather (a shorter row's view runs on past its
        own blocks into positions its queries mask; every cache entry is finite, so they weigh exactly 0). The
        block manager hands each batch slot its own run of blocks first (`Sequence.home`), so this holds unless
        prefixes are shared or the pool ran short."""
        if not all(tables):
            return None
        first = tables[0][0]
        stride = tables[1][0] - first if len(tables) > 1 else 1
        if stride < 1 or first + (len(tables) - 1) * stride + nb > self.cache.num_blocks + 1:
            return None
        for b, t in enumerate(tables):
            t0 = first + b * stride
            if t[:nb] != list(range(t0, t0 + min(len(t), nb))):
                return None
        return first, stride

    @torch.inference_mode()
    def run(self, stack: str, ids: torch.Tensor, start: list[int], tables: list[list[int]], h_prev=None,
            last: list[int] | None = None):
        """ids (B, T) on the device, right-padded; row b holds the tokens at positions start[b]..start[b]+T-1 of a
        sequence with block table tables[b] and writes their keys to the cache (the caller counts only its real
        ones). h_prev (B, T, H): the main model's hidden states (stack "mtp"). → hidden (B, T, H) and the logits,
        (B, T, V), or (B, V) at each row's index `last[b]` when given. hidden is before the final norm (main) or
        the MTP layer's normed output (what a chained draft feeds back)."""
        B, T = ids.shape
        S = max(start) + T
        nb = -(-S // self.block_size)
        meta = torch.tensor([start] + ([last] if last is not None else []), device=self.device)
        table = torch.tensor(self._table(tables, nb), device=self.device)
        view = self._strided(tables, nb)
        sparse = self.sparse and S > self.cfg.index_topk
        return self._forward(stack, ids, meta[0], table, view, S, sparse, h_prev, meta[1] if last is not None else None)

    def _forward(self, stack, ids, start, table, view, S, sparse, h_prev, last=None):
        """table (B, >= S / block_size) block ids; view: (first block, stride) when the rows' blocks are consecutive
        runs at a fixed stride (`_strided`: their keys are read as one strided view), else None (the rows gathered
        through the table after each layer's write)."""
        W, (B, T) = self.weights, ids.shape
        N, bs = B * T, self.block_size
        pos = (start[:, None] + self.ar[:T]).view(-1)  # (N,)
        rope = self.rope[pos].split(self.rope_split, -1)
        neg = torch.zeros(B, T, S, device=self.device).masked_fill_(self.ar[:S] > pos.view(B, T, 1), float("-inf"))
        p2 = pos.view(B, T)
        write = (table.gather(1, self.blk[p2]) * bs + self.off[p2],)  # (B, T): the cache row of each new token
        x = W.emb[ids.view(-1)]
        if stack == "mtp":
            M = W.mtp[0]
            x = torch.mm(torch.cat([_rms(x, M.e_eps), _rms(h_prev.reshape(N, -1), M.h_eps)], -1), M.eh)
            layers, cache = [M], self.mtp_cache
        else:
            layers, cache = W.layers, self.cache
        if view is not None:
            kv, (first, stride) = cache.kv, view
            L, R, Wd = kv.shape
            reads = kv.as_strided((L, B, S, Wd), (R * Wd, stride * bs * Wd, Wd, 1), first * bs * Wd).unbind(0)
        else:  # the cache row of every position 0..S-1 of every row, (B·S,)
            reads = [(table[:, self.blk[:S]] * bs + self.off[:S]).view(-1)] * len(layers)
        for L, kv, cached in zip(layers, cache.layers, reads):
            x = self._attention(L.attn, x, kv, write, cached, S, sparse, neg, rope, B, T)
            x = self._mlp(L.mlp, x)
        x = x.view(B, T, -1)
        if stack == "mtp":
            x = _rms(x, M.out_eps) * M.w_out
        at = x if last is None else x[self.ar[:B], last]
        if stack == "main":
            at = _rms(at, W.norm_eps) * W.w_norm
        return x, torch.mm(at.reshape(-1, at.shape[-1]), W.head).view(*at.shape[:-1], -1)

    def _attention(self, L, x, kv, write, cached, S, sparse, neg, rope, B, T):
        N, h, kvl, dr, HI, dI = x.shape[0], L.h, L.kvl, L.dr, L.HI, L.dI
        cq, sq, ck, sk = rope
        xn = _rms(x, L.eps)
        a = torch.mm(xn, L.qkv_a) if L.qkv_a_bias is None else torch.addmm(L.qkv_a_bias, xn, L.qkv_a)
        qa, ckv, kr, ik, iw = a.split(L.split_qkv_a, -1)
        lat, rp, rq = torch.mm(_rms(qa, L.eps_q), L.q_b).split(L.split_q_b, -1)
        r = torch.addcmul(rp * cq, rq, sq)  # roped [q_rot of each head | indexer queries]
        q = torch.cat([lat.view(N, h, kvl), r[:, : h * dr].view(N, h, dr)], -1)  # (N, h, kvl + dr)
        z = torch.mm(torch.cat([kr, F.layer_norm(ik, (dI,), L.kn_w, L.kn_b, L.kn_eps)], -1), L.k_rope_perm)
        W2 = dr + dI
        new = torch.cat([_rms(ckv, L.eps_kv), torch.addcmul(z[:, :W2] * ck, z[:, W2:], sk)], -1)  # [c_kv|k_rot|index key]
        kv.index_put_(write, new.view(B, T, -1))
        if cached.dtype == torch.long:  # cache rows (B·S,) through the block tables: gathered now, after the write
            cached = kv.index_select(0, cached).view(B, S, -1)
        latent = cached[..., : kvl + dr]
        if sparse:  # DSA: index scores over every cached key, top-k, attention over the selected latents
            iq, ikc = r[:, h * dr:], cached[..., kvl + dr:]
            if self.dtype != torch.float32:
                iq, ikc, iw = iq.float(), ikc.float(), iw.float()
            s = torch.bmm(iq.reshape(B, T * HI, dI), ikc.transpose(1, 2)).relu_()
            s = torch.baddbmm(neg.view(N, 1, S), iw.reshape(N, 1, HI), s.view(N, HI, S)).view(B, T, S)
            k = min(L.topk, S)
            top = self._select(s, k)
            sel = latent.gather(1, top.reshape(B, T * k, 1).expand(B, T * k, kvl + dr)).view(N, k, kvl + dr)
            p = (torch.bmm(q, sel.transpose(1, 2)) + neg.gather(-1, top).view(N, 1, k)).softmax(-1)
            return self._out(L, x, torch.bmm(p if self.dtype == torch.float32 else p.to(self.dtype), sel[..., :kvl]))
        logits = torch.bmm(q.view(B, T * h, kvl + dr), latent.transpose(1, 2)).view(B, T, h, S)
        p = (logits + neg[:, :, None]).softmax(-1)
        p = p if self.dtype == torch.float32 else p.to(self.dtype)
        return self._out(L, x, torch.bmm(p.view(B, T * h, S), cached[..., :kvl]))

    def _out(self, L, x, o):
        out = torch.addmm(x, o.reshape(x.shape[0], -1), L.o_absorbed)  # W_UV and o_proj, with the residual
        return out if L.o_bias is None else out + L.o_bias

    def _mlp(self, L, x):
        N, I = x.shape[0], L.I
        h = _rms(x, L.eps)
        if not L.moe:
            gu = torch.mm(h, L.Wgu)
            return torch.addmm(x, F.silu(gu[:, :I]) * gu[:, I:], L.Wd)
        rs = torch.mm(h if h.dtype == torch.float32 else h.float(), L.Wr)  # [router logits | shared gate, up]
        k = L.k
        gates, idx = self._route(L, rs[:, : L.E])
        hw = h * L.w
        if N * k <= GATHER_PAIRS or self.static:  # gather the chosen experts' weights: few ops, static shapes
            # copy the chosen experts' matrices (whole, fast) into preallocated buffers: a fresh megabyte-sized
            # tensor per step would be a fresh mapping from the OS, its page faults costlier than the copy
            flat, gu, dn = idx.view(-1), self._buffer("gu", L.gu, N * k), self._buffer("down", L.down, N * k)
            y = torch.bmm(hw.unsqueeze(1).expand(N, k, -1).reshape(N * k, 1, -1),
                          torch.index_select(L.gu, 0, flat, out=gu).transpose(1, 2))
            Ie = y.shape[-1] // 2
            y = F.silu(y[..., :Ie]) * y[..., Ie:] * gates.view(N * k, 1, 1)
            routed = torch.bmm(y, torch.index_select(L.down, 0, flat, out=dn).transpose(1, 2)).view(N, k, -1).sum(1)
        else:  # many tokens (prefill): the model's grouped dispatch
            routed = L.experts(hw, gates, idx)
        if L.Wd is None:
            return x + routed
        g = rs[:, L.E:] if self.dtype == torch.float32 else rs[:, L.E:].to(self.dtype)
        return torch.addmm(x + routed, F.silu(g[:, :I]) * g[:, I:], L.Wd)

    def _select(self, s, k):
        """DSA top-k of the fp32 index scores s (B, T, S): the keys model.Attention.select picks."""
        if self.tie_break == "stable":
            return s.sort(dim=-1, descending=True, stable=True)[1][..., :k]
        return s.topk(k, dim=-1)[1]

    def _route(self, L, logits):
        """fp32 router logits (N, E) → gates (N, k) in the engine's dtype, expert ids (N, k): model.Router's rule."""
        scores = logits.sigmoid()
        idx = (scores + L.bias).topk(L.k, dim=-1, sorted=False)[1]
        gates = scores.gather(1, idx)
        gates = gates * (L.rsf / (gates.sum(-1, keepdim=True) + L.tiny)) if L.norm else gates * L.rsf
        return (gates if self.dtype == torch.float32 else gates.to(self.dtype)), idx

    def _buffer(self, name: str, like: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of a reusable (rows, *like.shape[1:]) buffer. Eager: one per name, grown as needed; static: one
        per (name, n), so a captured CUDA graph's buffer is never replaced under it."""
        key = (name, n) if self.static else name
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = self._buffers[key] = torch.empty(n, *like.shape[1:], dtype=like.dtype, device=like.device)
        return buf[:n]

    # -- static shapes: buckets and CUDA graphs -------------------------------------------------------
    @torch.inference_mode()
    def run_static(self, stack: str, ids: torch.Tensor, start: list[int], tables: list[list[int]], bucket: int,
                   h_prev=None, capture: bool = False):
        """`run` with the batch padded to `bucket` rows (padded rows: position 0 in the scratch block) and attention
        over a length bucket (the block tables padded to the next power of two of blocks the longest row needs, at
        most the full width), every input in a fixed buffer; with capture=True (CUDA) the first call per
        (stack, T, bucket, blocks) records a CUDA graph and later calls replay it. Same outputs as `run`."""
        B, T = ids.shape
        need = -(-(max(start) + T) // self.block_size)
        width = min(self.max_blocks, 1 << (need - 1).bit_length())  # blocks attended: a power of two
        key = (stack, T, bucket, width)
        g = self.graphs.get(key)
        if g is None:
            H = self.cfg.hidden_size
            g = self.graphs[key] = SimpleNamespace(
                ids=torch.zeros(bucket, T, dtype=torch.long, device=self.device),
                start=torch.zeros(bucket, dtype=torch.long, device=self.device),
                table=torch.zeros(bucket, width, dtype=torch.long, device=self.device),
                h=torch.zeros(bucket, T, H, dtype=self.dtype, device=self.device) if stack == "mtp" else None,
                graph=None, out=None)
        g.ids.zero_()
        g.ids[:B] = ids
        g.start.copy_(torch.tensor(start + [0] * (bucket - B)))
        g.table.copy_(torch.tensor(self._table(tables + [[]] * (bucket - B), width)))
        if h_prev is not None:
            g.h[:B] = h_prev
        if g.out is None or not capture:
            self.static = True
            try:
                S = width * self.block_size
                fwd = lambda: self._forward(stack, g.ids, g.start, g.table, None, S,  # noqa: E731
                                            self.sparse and S > self.cfg.index_topk, g.h)
                if capture:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):  # warm-up outside the graph (allocator, kernels' workspaces)
                        fwd()
                    torch.cuda.current_stream().wait_stream(s)
                    g.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g.graph):
                        g.out = fwd()
                else:
                    g.out = fwd()
            finally:
                self.static = False
        if capture:
            g.graph.replay()
        hidden, logits = g.out
        return hidden[:B], logits[:B]
