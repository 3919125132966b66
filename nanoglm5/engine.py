"""Inference engine: token ids in, token ids out. What the server, the RL rollout workers, the evaluations and
the training samples generate with.

Holds, top to bottom:
  - cache sizes: what GLM-5 caches per token (the MLA latent c_kv, the roped shared key k_rot, the DSA
    indexer key) vs the expanded per-head K/V of plain multi-head attention (DeepSeek-V2 §2.1.2);
  - sampling (sampling.py, re-exported here): temperature, top-k, top-p (nucleus), per-request seeded
    `torch.Generator`, and the log-prob of each token under the distribution actually sampled from (what RL's
    importance ratios need);
  - stop strings: `find_stop`, the one check the engine (to finish a request) and the server (to cut its
    text) both use;
  - `Engine`: the loop. Each step asks the scheduler what to run, runs the (chunked) prefills in right-padded
    batches and one batched decode of every other running sequence (B×1 tokens, one position per row) or, with
    `speculative="mtp"`, batched verification of the MTP layer's drafts (speculative.py), samples, and finishes
    requests.

The rooms, as nano-vllm splits them: block_manager.py (the paged cache's blocks, ref counts and hash-chained
prefix reuse), scheduler.py (sequences, admission by free blocks, chunked prefill, preemption by recompute),
decode.py (the model runner: the folded weights and the forward over block tables), this file (the loop).

The forward itself is decode.py: MLA in its absorbed (MQA) form over the compressed cache (DeepSeek-V2 §2.1.2),
DSA's top-k selection once a context is longer than index_topk (DeepSeek-V3.2 §2.1), fused and folded weights,
no training statistics. On CUDA the decode step of each batch-size bucket is a captured CUDA graph.

Weights may change between `step()` calls (RL partial rollouts continue with newer weights): the derived
matrices are rebuilt whenever a parameter changes in place (its version counter moves; not for writes through
`.data`), so the next step runs with whatever `engine.model` holds. The cache of running requests was written by
the older weights; that is what "partial rollout" means in asynchronous RL.

New weights also drop the prefix cache (block_manager.reset_prefix_cache): a new request never reads keys that
an older policy wrote. Simplified: the paged attention is a gather of the sequence's cache rows per layer (no
fused paged-attention kernel), speculative engines do not share prefixes (`prefix_caching` is off with MTP), and
only full blocks are shared.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from nanoglm5.block_manager import BlockManager
from nanoglm5.decode import Decoder
from nanoglm5.model import GLM5, TIE_BREAKS, autocast_off
from nanoglm5.precision import cast_model
from nanoglm5.sampling import SamplingParams, draw, sample, sampling_logprobs  # noqa: F401 (re-exported)
from nanoglm5.scheduler import Scheduler, Sequence
from nanoglm5.speculative import MTPSpeculator


# ---------------------------------------------------------------------------------------------- cache sizes
def cache_bytes_per_token(cfg, dtype=torch.float32) -> int:
    """Bytes per token over all layers of what we cache: c_kv (kv_lora_rank) + k_rot (qk_rope_head_dim)
    + the indexer key (index_head_dim). GLM-5 in bf16: 78 · (512 + 64 + 128) · 2 = 109,824 B."""
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
    return cfg.num_hidden_layers * per_layer * torch.finfo(dtype).bits // 8


def expanded_kv_bytes_per_token(cfg, dtype=torch.float32) -> int:
    """Bytes per token of the expanded per-head cache plain MHA would keep: keys h·(qk_nope + qk_rope) and
    values h·v_head per layer. GLM-5 in bf16: 78 · 64 · (192 + 64 + 256) · 2 = 5,111,808 B (46.5× ours)."""
    per_layer = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------------------------------------- stop strings
def find_stop(text: str, stop) -> int:
    """Where the earliest of the stop strings starts in text; -1 when none occurs."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # per generated token, under the distribution sampled from (greedy: 0.0)
    finish_reason: str  # "stop" | "length" | "error" (isolate_errors: this request failed alone)
    # raw-model top-n per token when params.logprobs > 0; each dict also holds the sampled token's raw log-prob
    top_logprobs: list[dict[int, float]] | None = None
    drafted: int = 0  # speculative decoding: MTP drafts verified for this request, and how many were accepted
    accepted: int = 0
    # params.prompt_logprobs: per prompt token, the raw-model top-n log-probs and that token's own (None at 0)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class StepEvent(NamedTuple):
    """One new token of one request; `completion` is set when that token finished the request.
    `top_logprobs`: the raw-model top-n log-probs at this token (and the sampled token's), when
    params.logprobs > 0, else None: what a streaming server sends with each token."""

    request_id: str
    token_id: int
    logprob: float
    completion: Completion | None
    top_logprobs: dict[int, float] | None = None
    error: str | None = None  # isolate_errors: why this request failed (token_id is then -1, no token was added)


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Continuous batching over a paged compressed KV cache.

    Use: `rid = engine.add_request(ids, SamplingParams(...))`, then call `engine.step()` while
    `engine.has_unfinished()`. Each step (1) gives every decoding sequence room for its next positions,
    preempting the newest when no block is free, and admits waiting requests FIFO while a slot is free and the
    pool has blocks for their tokens (scheduler.py), (2) prefills the admitted ones from their cached prefix on,
    at most `chunked_prefill` tokens per step, and samples the first token of those whose prompt is complete,
    (3) decodes one token for every
    other running request, as one (B, 1) batch (speculative: verifies each one's drafts and emits 1 to
    num_draft + 1 tokens). It returns one `StepEvent(request_id, token_id, logprob, completion, top_logprobs)`
    per new token, in order; `completion` is not None when the request finished at this token, and its slot is
    free for the next step. `abort(id)` drops one request, `abort_all()` every one. Not thread-safe: one
    thread owns it.

    tie_break: how DSA breaks exact ties of index scores. The default "stable" (by position) makes the
    selection depend only on visible scores, so cached decode, batching and a full recompute
    `model(ids, tie_break="stable")` agree exactly; "topk" is the reference's.
    speculative: None, or "mtp": the model's first MTP layer drafts num_draft tokens (chained), the model
    verifies them in one forward; lossless (speculative.py). Acceptance: `engine.acceptance_rate`.
    graphs: "auto" (CUDA graphs on a CUDA device, else off), "off", "cuda", or "eager": the graph path's
    bucket padding and static shapes run eagerly (what the CPU tests check). Decode batches up to the largest
    of `graph_buckets` (default: powers of two up to max_batch) are padded to the next bucket.
    device / dtype: where and in what precision the model runs; the model is moved there (in place) if needed.
    max_tokens_in_flight: cache positions in the pool (at most max_batch × max_seq_len are allocated), in blocks
    of `block_size`; a request whose prompt + max_tokens exceeds it is refused. prefix_caching: share the full
    blocks of common prefixes (default: on, off with speculative="mtp"); `engine.stats()` counts prefill tokens
    computed and the hit rate. chunked_prefill: prompt tokens computed per step over all prefills (None: all).
    isolate_errors: False (default): an exception while sampling or finishing a request propagates out of
    step(), as any bug should in training and evaluation. True (the server): that request alone is finished
    with finish_reason "error" and a StepEvent whose `error` says why, and the rest of its batch goes on."""

    def __init__(self, model: GLM5, tokenizer=None, max_batch: int = 16, max_tokens_in_flight: int = 8192,
                 max_seq_len: int | None = None, device=None, sparse: bool = True, prefill_tokens: int = 4096,
                 tie_break: str = "stable", speculative: str | None = None, num_draft: int = 1,
                 graphs: str = "auto", graph_buckets: list[int] | None = None, dtype: torch.dtype | None = None,
                 isolate_errors: bool = False, block_size: int = 16, prefix_caching: bool | None = None,
                 chunked_prefill: int | None = 512):
        cfg = model.config
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r}: use 'stable' (cache-consistent) or 'topk' (reference-exact)")
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: use None (plain decoding) or 'mtp'")
        if speculative and cfg.num_nextn_predict_layers == 0:
            raise ValueError("speculative='mtp' needs a model with an MTP layer, but this one has "
                             "num_nextn_predict_layers=0; serve it with speculative=None")
        if not isinstance(num_draft, int) or num_draft < 1:
            raise ValueError(f"num_draft={num_draft!r} must be an integer >= 1")
        if graphs not in ("auto", "off", "cuda", "eager"):
            raise ValueError(f"graphs={graphs!r}: use 'auto', 'off', 'cuda' or 'eager'")
        self.model, self.tokenizer, self.cfg, self.tie_break = model, tokenizer, cfg, tie_break
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        if dtype is not None and model.embed_tokens.weight.dtype != dtype:
            self.model = cast_model(model, dtype=dtype)  # the routers (and QAT masters) stay fp32: routing is fp32
        if graphs == "auto":
            graphs = "cuda" if self.device.type == "cuda" else "off"
        if graphs == "cuda" and self.device.type != "cuda":
            raise ValueError(f"graphs='cuda' needs a CUDA device, not {self.device}; use 'eager' or 'off'")
        self.graphs = graphs
        self.graph_buckets = sorted(graph_buckets or [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < max_batch]
                                    + [max_batch])
        self.max_batch, self.max_tokens_in_flight = max_batch, max_tokens_in_flight
        # default: what one request can use (no request exceeds max_tokens_in_flight), not the model's whole
        # context, so the RoPE tables and the block tables of a long-context preset stay the pool's size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, max_tokens_in_flight)
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; pass max_seq_len <= {cfg.max_position_embeddings}")
        self.sparse, self.prefill_tokens = sparse, prefill_tokens
        self.speculative, self.num_draft = speculative, num_draft
        self.isolate_errors = isolate_errors
        # drafts are written past a request's budget (then rolled back): room for the longest chain
        headroom = 2 * num_draft + 1 if speculative else 0
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an integer >= 1")
        # the MTP layer's key at position i reads token i+1, past a block's own tokens: its blocks are not a pure
        # function of their prefix, so speculative engines do not share prefixes
        if prefix_caching and speculative:
            raise ValueError("prefix_caching=True with speculative='mtp' is not supported (the MTP layer's cached key "
                             "at a block's last position depends on the next block's first token); pick one")
        self.prefix_caching = not speculative if prefix_caching is None else prefix_caching
        # the pool: max_tokens_in_flight positions, never more than max_batch full-length sequences (what a
        # contiguous cache would hold), and one sequence's draft headroom, in blocks
        pool = min(max_tokens_in_flight, max_batch * self.max_seq_len) + headroom
        num_blocks = -(-pool // block_size)
        self.block_manager = BlockManager(num_blocks, block_size, self.prefix_caching)
        self.scheduler = Scheduler(max_batch, self.block_manager, chunked_prefill, headroom or 1,
                                   -(-(self.max_seq_len + headroom) // block_size))
        self.decoder = Decoder(self.model, num_blocks, block_size, self.max_seq_len, headroom, self.device, sparse,
                               tie_break, mtp=speculative is not None)
        self.cache = self.decoder.cache
        self.spec = MTPSpeculator(self) if speculative else None
        self.waiting, self.running = self.scheduler.waiting, self.scheduler.running
        self.free_slots = self.scheduler.free_slots
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.drafted = self.accepted = 0  # speculative decoding, over the engine's life
        self.prompt_tokens = self.prefill_computed = 0  # tokens admitted as prompts / computed by prefills

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted (speculative decoding); nan before any draft was verified."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    # -- sizes -----------------------------------------------------------------------------------
    def cache_bytes_per_token(self) -> int:
        return cache_bytes_per_token(self.cfg, self.cache.kv.dtype)

    def expanded_kv_bytes_per_token(self) -> int:
        return expanded_kv_bytes_per_token(self.cfg, self.cache.kv.dtype)

    @property
    def tokens_in_flight(self) -> int:
        """Cache positions the running sequences hold (blocks in use × block size; shared blocks once)."""
        bm = self.block_manager
        return len({b for r in self.running.values() for b in r.blocks}) * bm.block_size

    def stats(self) -> dict:
        """Engine counters over its life: prompt tokens of the requests added, prefill tokens computed (a preempted
        request's recompute included), cache-hit tokens and hit rate (cached / looked-up tokens at each admission),
        preemptions."""
        bm = self.block_manager
        return {"prompt_tokens": self.prompt_tokens, "prefill_computed": self.prefill_computed,
                "cache_hit_tokens": bm.hits, "hit_rate": bm.hit_rate, "preemptions": self.scheduler.preemptions}

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a request; raises ValueError naming the limit when it can never run."""
        p = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.running or any(r.id == rid for r in self.waiting):
            raise ValueError(f"request_id {rid!r} is already in use; pass a unique id or None")
        if not prompt:
            raise ValueError("the prompt is empty; pass at least one token id")
        V = self.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V})")
        if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise ValueError(f"max_tokens={p.max_tokens!r} must be an integer >= 1")
        need = len(prompt) + p.max_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) = {need} exceeds "
                             f"max_seq_len={self.max_seq_len}; shorten the prompt or lower max_tokens to "
                             f"{max(self.max_seq_len - len(prompt), 0)}")
        if need > self.max_tokens_in_flight:
            raise ValueError(f"prompt + max_tokens = {need} exceeds max_tokens_in_flight="
                             f"{self.max_tokens_in_flight}; lower max_tokens or raise the engine limit")
        if p.temperature < 0:
            raise ValueError(f"temperature={p.temperature} must be >= 0 (0 = greedy)")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"top_p={p.top_p} must be in (0, 1]")
        if p.top_k < 0 or p.logprobs < 0:
            raise ValueError(f"top_k={p.top_k} and logprobs={p.logprobs} must be >= 0")
        if p.prompt_logprobs is not None and (not isinstance(p.prompt_logprobs, int) or p.prompt_logprobs < 0):
            raise ValueError(f"prompt_logprobs={p.prompt_logprobs!r} must be None (off) or an integer >= 0")
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer=...) or use stop_token_ids")
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seed_gen))
            gen = torch.Generator(self.device).manual_seed(seed)
        req = Sequence(rid, prompt, p, gen, stop_bytes=max((len(s.encode()) for s in p.stop), default=0))
        self.waiting.append(req)
        self.prompt_tokens += len(prompt)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        """Drop a request (client gone); frees its slot. True if it was known."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        r = self.running.get(request_id)
        if r is not None:
            self._free(r)
        return r is not None

    def abort_all(self) -> list[str]:
        """Drop every running and waiting request (e.g. after a failed step); returns their ids."""
        ids = list(self.running) + [r.id for r in self.waiting]
        for rid in ids:
            self.abort(rid)
        return ids

    def _free(self, r: Sequence) -> None:
        self.scheduler.remove(r)

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        # the engine's dtype is its weights' and its routing and index scores are fp32 (decode.py): a caller's
        # autocast must not recast them, or the engine would choose other experts and keys than the learner
        with autocast_off(self.device):
            return self._step()

    def _step(self) -> list[StepEvent]:
        if self.decoder.refresh():  # the weights changed: keys cached by the old ones serve no new request
            self.block_manager.reset_prefix_cache()
        prefill, decoding = self.scheduler.schedule()
        events = []
        # prefill in right-padded groups of similar length, each at most prefill_tokens padded tokens
        group: list[tuple[Sequence, int]] = []
        for r, n in sorted(prefill, key=lambda rn: rn[1]):
            if group and (len(group) + 1) * n > self.prefill_tokens:
                events += self._prefill(group)
                group = []
            group.append((r, n))
        if group:
            events += self._prefill(group)
        if decoding:
            decoding.sort(key=lambda r: r.slot)
            events += self.spec.decode(decoding) if self.spec else self._decode(decoding)
        return events

    def run(self, stack: str, ids: torch.Tensor, reqs: list[Sequence], start: list[int], h_prev=None, last=None,
            decode=True):
        """One forward of `stack` ("main" or "mtp") for reqs, ids (B, T) at positions start[b]...; decode-sized
        batches go through the graph buckets. → hidden (B, T, H), logits (B, T, V) (or (B, V) at `last`)."""
        tables = [r.blocks for r in reqs]
        B = len(reqs)
        if decode and self.graphs != "off" and B <= self.graph_buckets[-1]:
            bucket = next(b for b in self.graph_buckets if b >= B)
            hidden, logits = self.decoder.run_static(stack, ids, start, tables, bucket, h_prev,
                                                     capture=self.graphs == "cuda")
            if last is not None:
                logits = logits[torch.arange(B, device=self.device), torch.tensor(last, device=self.device)]
            return hidden, logits
        return self.decoder.run(stack, ids, start, tables, h_prev, last)

    def _prefill(self, group: list[tuple[Sequence, int]]) -> list[StepEvent]:
        """Compute n tokens of each sequence from its `computed` on; those whose prompt is then complete sample."""
        reqs, T = [r for r, _ in group], max(n for _, n in group)
        start = [r.computed for r in reqs]
        if len(group) > 1 and max(start) + T > self.decoder.capacity:
            # rows are padded to the longest chunk: a short chunk near the end of its window would run past the
            # positions the cache and RoPE tables hold, so such a batch is computed row by row
            return [e for item in group for e in self._prefill([item])]
        fed = [r.tokens[c:c + n] for (r, n), c in zip(group, start)]
        ids = torch.tensor([f + [0] * (T - len(f)) for f in fed], device=self.device)
        last = [n - 1 for _, n in group]
        if any(r.params.prompt_logprobs is not None for r in reqs):  # logits at every position, for the scoring
            hidden, full = self.run("main", ids, reqs, start, decode=False)
            self._prompt_logprobs(group, start, full)
            logits = full[torch.arange(len(reqs), device=self.device), torch.tensor(last, device=self.device)]
        else:
            hidden, logits = self.run("main", ids, reqs, start, last=last, decode=False)
        for r, n in group:
            r.computed += n
            self.prefill_computed += n
            self.block_manager.register(r)
        done = [b for b, r in enumerate(reqs) if r.computed == len(r.prompt) + len(r.out)]
        for b in done:
            reqs[b].prefilled = True
        events = self._sample([reqs[b] for b in done], logits[torch.tensor(done, device=self.device)]) if done else []
        if self.spec:
            live = [b for b, r in enumerate(reqs) if r.id in self.running]
            if live:
                self.spec.prefill([reqs[b] for b in live], [start[b] for b in live], [group[b][1] for b in live],
                                  hidden[torch.tensor(live, device=self.device)])
        return events

    def _prompt_logprobs(self, group, start: list[int], logits: torch.Tensor) -> None:
        """Append the prompt-token entries this chunk's logits (B, T, V) give: position j scores prompt token j+1."""
        for b, (r, n) in enumerate(group):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            if not r.prompt_lp:
                r.prompt_lp.append(None)  # the first token has no context
            c, P = start[b], len(r.prompt)
            lo, hi = len(r.prompt_lp) - 1, min(c + n, P - 1)  # positions whose entries are missing (a recompute
            if hi <= lo:                                          # after preemption has them already)
                continue
            lp = logits[b, lo - c:hi - c].float().log_softmax(-1)
            nxt = torch.tensor(r.prompt[lo + 1:hi + 1], device=lp.device)
            own = lp.gather(1, nxt[:, None])[:, 0].tolist()
            vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for t, o, vs, ids in zip(nxt.tolist(), own, vals.tolist(), idx.tolist()):
                r.prompt_lp.append({**dict(zip(ids, vs)), t: o})

    def _decode(self, reqs: list[Sequence]) -> list[StepEvent]:
        ids = torch.tensor([[r.out[-1]] for r in reqs], device=self.device)
        _, logits = self.run("main", ids, reqs, [r.computed for r in reqs])
        for r in reqs:
            r.computed += 1
            self.block_manager.register(r)
        return self._sample(reqs, logits[:, 0])

    def _sample(self, reqs: list[Sequence], logits: torch.Tensor) -> list[StepEvent]:
        logits = logits.float()
        raw = logits.log_softmax(-1) if any(r.params.logprobs for r in reqs) else None
        toks, lps = logits.argmax(-1).tolist(), [0.0] * len(reqs)  # greedy rows: one argmax, one transfer
        groups: dict[tuple, list[int]] = {}  # sampled rows by transform: one batched transform and draw each
        for b, r in enumerate(reqs):
            if r.params.temperature > 0:
                groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(b)
        failed: dict[int, Exception] = {}
        for rows in groups.values():
            try:
                self._draw(reqs, rows, logits, toks, lps)
            except Exception:
                if not self.isolate_errors:
                    raise
                for b in rows:  # one bad request must not fail its group: draw each row alone, fail the bad one
                    try:
                        self._draw(reqs, [b], logits, toks, lps)
                    except Exception as e:
                        failed[b] = e
        return [self._fail(r, failed[b]) if b in failed else self._emit(r, t, lp, raw[b] if raw is not None else None)
                for b, (r, t, lp) in enumerate(zip(reqs, toks, lps))]

    def _draw(self, reqs: list[Sequence], rows: list[int], logits: torch.Tensor, toks: list, lps: list) -> None:
        """Sample rows (one transform: the same temperature, top-k, top-p) into toks / lps, each from its generator."""
        p = reqs[rows[0]].params
        logp = sampling_logprobs(logits[rows], p)
        got = draw(logp.exp(), [reqs[b].gen for b in rows])
        for b, t, lp in zip(rows, got, logp[torch.arange(len(rows)), got].tolist()):
            toks[b], lps[b] = t, lp

    def _emit(self, r: Sequence, tok: int, lp: float, raw: torch.Tensor | None) -> StepEvent:
        """Append one token to r (and its raw top-n log-probs from raw (V,) when asked); finish r if done."""
        n = len(r.out)
        try:
            r.out.append(tok)
            r.logprobs.append(lp)
            top = None
            if r.params.logprobs:
                vals, idx = raw.topk(min(r.params.logprobs, raw.shape[-1]))
                top = dict(zip(idx.tolist(), vals.tolist()))
                top.setdefault(tok, float(raw[tok]))
                r.top.append(top)
            return StepEvent(r.id, tok, lp, self._finish_if_done(r), top)
        except Exception as e:  # e.g. the stop-string check's detokenization
            if not self.isolate_errors:
                raise
            del r.out[n:], r.logprobs[n:]  # the token was never emitted
            return self._fail(r, e)

    def _fail(self, r: Sequence, e: Exception) -> StepEvent:
        """Finish r alone with finish_reason "error" (isolate_errors): free its slot, say why in the event."""
        self._free(r)
        del r.top[len(r.out):]
        why = f"{type(e).__name__}: {e}"
        done = Completion(r.id, r.prompt, r.out, r.logprobs, "error", r.top if r.params.logprobs else None,
                          r.drafted, r.accepted, self._prompt_lp(r))
        return StepEvent(r.id, -1, float("nan"), done, None, why)

    def _finish_if_done(self, r: Sequence) -> Completion | None:
        reason = None
        if r.out[-1] in r.params.stop_token_ids:
            reason = "stop"
        elif r.params.stop:
            if find_stop(self.tokenizer.decode(r.out[-(r.stop_bytes + 1):]), r.params.stop) >= 0:
                reason = "stop"
        if reason is None and len(r.out) >= r.params.max_tokens:
            reason = "length"
        if reason is None:
            return None
        self._free(r)
        return Completion(r.id, r.prompt, r.out, r.logprobs, reason, r.top if r.params.logprobs else None,
                          r.drafted, r.accepted, self._prompt_lp(r))

    @staticmethod
    def _prompt_lp(r: Sequence) -> list | None:
        return None if r.params.prompt_logprobs is None else r.prompt_lp

    # -- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Run prompts to completion with continuous batching; completions in the order of `prompts`."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[str, Completion] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="seq") if progress else None
        wanted = set(ids)
        while wanted - done.keys():
            for ev in self.step():
                if ev.error is not None and ev.request_id in wanted:
                    raise RuntimeError(f"request {ev.request_id} failed: {ev.error}")
                if ev.completion is not None and ev.request_id in wanted:
                    done[ev.request_id] = ev.completion
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]
