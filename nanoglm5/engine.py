"""Inference engine: token ids in, token ids out. What the server and the RL rollout workers generate with.

Holds, top to bottom:
  - cache sizes: what GLM-5 caches per token (the MLA latent c_kv, the roped shared key k_rot, the DSA
    indexer key) vs the expanded per-head K/V of plain multi-head attention (research/int4_serve_data.md §B3);
  - `KVCache`: that compressed cache, preallocated as max_batch slots × max_seq_len per layer, with per-slot
    lengths; it implements the model's cache protocol `update(layer, c_kv, k_rot, index_k, positions)`;
  - sampling: temperature, top-k, top-p (nucleus), per-request seeded `torch.Generator`, and the log-prob of
    each token under the distribution actually sampled from (what RL's importance ratios need, rl.md §5);
  - `Engine`: a continuous-batching scheduler (nano-vllm's waiting/running queues, §B2) with admission limits
    (max concurrent sequences, max tokens in flight), right-padded batched prefill, and batched decode of
    every running slot (B×1 tokens, one position per row).

Decode runs MLA in its absorbed (MQA) form over the latent cache (DeepSeek-V2 §2.1, arch.md §3.3), and DSA's
top-k selection at every step once a context is longer than index_topk (DeepSeek-V3.2 §2.1): the model does
both when it is given a cache (model.py `Attention.forward`); this file only stores and hands back the cache.

Weights may change between `step()` calls (RL partial rollouts continue with newer weights): nothing derived
from the weights is kept here, so the next step simply runs with whatever `engine.model` holds. The cache of
running requests was written by the older weights; that is what "partial rollout" means (rl.md §5).

Simplified: no paged blocks or prefix caching (one contiguous region per slot), no chunked prefill, no
preemption (admission reserves prompt + max_tokens up front, so a running request never runs out of room).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nanoglm5.model import GLM5

EMPTY_POS = 2**30  # key position of an empty cache row: larger than any query position, so causally masked


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


# ---------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Per layer: c_kv (slots, max_seq_len, kv_lora_rank), k_rot (slots, max_seq_len, qk_rope_head_dim),
    index_k (slots, max_seq_len, index_head_dim), and `lengths` (slots,) tokens held per slot.

    Before each forward the engine calls `bind(slots, n_new)`: row b of the batch is slot slots[b] and brings
    n_new[b] real tokens (the rest of the row is right padding, never written). `update` (called by every
    layer) writes the new rows and returns the cache sliced to the longest live length S, with the key
    positions of empty entries set to EMPTY_POS; `commit()` after the forward makes the new lengths count."""

    def __init__(self, cfg, max_batch: int, max_seq_len: int, device=None, dtype=torch.float32):
        L = cfg.num_hidden_layers
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.c_kv = torch.zeros(L, max_batch, max_seq_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_rot = torch.zeros(L, max_batch, max_seq_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.index_k = torch.zeros(L, max_batch, max_seq_len, cfg.index_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * max_batch
        self._arange = torch.arange(max_seq_len, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.c_kv, self.k_rot, self.index_k))

    def bind(self, slots: list[int], n_new: list[int]) -> None:
        dev = self.c_kv.device
        self.slots = slots
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        # a contiguous run of slots is read as a view; otherwise gathered (one copy per layer)
        self.rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=dev)
        self.new_len = [self.lengths[s] + n for s, n in zip(slots, n_new)]
        self.S = max(self.new_len)
        new_len = torch.tensor(self.new_len, device=dev)
        pos = self._arange[: self.S].expand(len(slots), -1)  # (B, S)
        self.key_pos = torch.where(pos < new_len[:, None], pos, EMPTY_POS)
        self.slot_idx = torch.tensor(slots, device=dev)
        self.n_new = torch.tensor(n_new, device=dev)

    def update(self, layer_idx, c_kv, k_rot, index_k, positions):
        """The model's cache protocol: write (B, T, ·) new entries at `positions`, return everything cached."""
        B, T = positions.shape
        if T == 1:  # decode: one token per row
            idx = (self.slot_idx, positions[:, 0])
            new = (c_kv[:, 0], k_rot[:, 0], index_k[:, 0])
        else:  # prefill: only the first n_new[b] tokens of row b are real
            valid = torch.arange(T, device=positions.device)[None, :] < self.n_new[:, None]  # (B, T)
            idx = (self.slot_idx[:, None].expand(B, T)[valid], positions[valid])
            new = (c_kv[valid], k_rot[valid], index_k[valid])
        for store, x in zip((self.c_kv, self.k_rot, self.index_k), new):
            store[layer_idx].index_put_(idx, x.to(store.dtype))
        S = self.S
        return (self.c_kv[layer_idx, self.rows, :S], self.k_rot[layer_idx, self.rows, :S],
                self.index_k[layer_idx, self.rows, :S], self.key_pos)

    def commit(self) -> None:
        for s, n in zip(self.slots, self.new_len):
            self.lengths[s] = n

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever else is in the batch
    stop: list[str] = ()  # stop strings (need the engine's tokenizer); the completing token is kept
    stop_token_ids: list[int] = ()  # e.g. tokenizer.stop_ids; the stop token is kept in token_ids
    logprobs: int = 0  # top-n raw-model log-probs to report per token


def sampling_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits (V,) → log-probs (V,) of the distribution we sample from: logits / T, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches top_p), renormalised. Removed tokens get -inf."""
    lg = logits.float() / p.temperature
    if 0 < p.top_k < lg.numel():
        kth = lg.topk(p.top_k).values[-1]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_lg, order = lg.sort(descending=True)
        probs = sorted_lg.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # mass before this token already reaches top_p
        lg = lg.index_put((order[drop],), torch.tensor(float("-inf"), device=lg.device))
    return lg.log_softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> tuple[int, float]:
    """One token from logits (V,) → (token id, its log-prob under the sampled distribution; greedy: 0.0)."""
    if p.temperature == 0:
        return int(logits.argmax()), 0.0
    logp = sampling_logprobs(logits, p)
    tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
    return tok, float(logp[tok])


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # per generated token, under the distribution sampled from (greedy: 0.0)
    finish_reason: str  # "stop" | "length"
    # raw-model top-n per token when params.logprobs > 0; each dict also holds the sampled token's raw log-prob
    top_logprobs: list[dict[int, float]] | None = None


class StepEvent(NamedTuple):
    """One new token of one request; `completion` is set when that token finished the request."""

    request_id: str
    token_id: int
    logprob: float
    completion: Completion | None


@dataclass(eq=False)  # compared by identity
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    gen: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    slot: int = -1
    stop_bytes: int = 0  # longest stop string in bytes: how many trailing tokens to decode when checking

    @property
    def budget(self) -> int:  # tokens this request may occupy: reserved at admission
        return len(self.prompt) + self.params.max_tokens


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Continuous batching over a compressed KV cache.

    Use: `rid = engine.add_request(ids, SamplingParams(...))`, then call `engine.step()` while
    `engine.has_unfinished()`. Each step (1) admits waiting requests FIFO while a slot is free and the tokens
    in flight (prompt + max_tokens of every running request) stay within max_tokens_in_flight, (2) prefills
    the admitted ones (right-padded batches) and samples their first token, (3) decodes one token for every
    other running request, as one (B, 1) batch. It returns one `StepEvent(request_id, token_id, logprob,
    completion)` per running request; `completion` is not None when the request finished at this token, and
    its slot is free for the next step. `engine.last_top` maps request id → the raw top-n log-probs of the
    token just emitted (when params.logprobs > 0), for streaming. Not thread-safe: one thread owns it."""

    def __init__(self, model: GLM5, tokenizer=None, max_batch: int = 16, max_tokens_in_flight: int = 8192,
                 max_seq_len: int | None = None, device=None, sparse: bool = True, prefill_tokens: int = 4096,
                 tie_break: str = "stable"):
        cfg = model.config
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        # DSA ties broken by position (model.Attention.__init__): the selection then depends only on visible
        # scores, so cached decode, batching and a full recompute with this model agree exactly
        model.set_tie_break(tie_break)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        self.max_batch, self.max_tokens_in_flight = max_batch, max_tokens_in_flight
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        if self.max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; pass max_seq_len <= {cfg.max_position_embeddings}")
        self.sparse, self.prefill_tokens = sparse, prefill_tokens
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:  # int4 models keep packed weights: cache in fp32
            dtype = torch.float32
        self.cache = KVCache(cfg, max_batch, self.max_seq_len, self.device, dtype)
        self.waiting: deque[_Request] = deque()
        self.running: dict[str, _Request] = {}
        self.free_slots = list(range(max_batch))
        self.last_top: dict[str, dict[int, float]] = {}
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))

    # -- sizes -----------------------------------------------------------------------------------
    def cache_bytes_per_token(self) -> int:
        return cache_bytes_per_token(self.cfg, self.cache.c_kv.dtype)

    def expanded_kv_bytes_per_token(self) -> int:
        return expanded_kv_bytes_per_token(self.cfg, self.cache.c_kv.dtype)

    @property
    def tokens_in_flight(self) -> int:
        return sum(r.budget for r in self.running.values())

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
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer=...) or use stop_token_ids")
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seed_gen))
            gen = torch.Generator(self.device).manual_seed(seed)
        req = _Request(rid, prompt, p, gen, stop_bytes=max((len(s.encode()) for s in p.stop), default=0))
        self.waiting.append(req)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        """Drop a request (client gone); frees its slot. True if it was known."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        r = self.running.pop(request_id, None)
        if r is not None:
            self._free(r)
        return r is not None

    def _free(self, r: _Request) -> None:
        self.cache.free(r.slot)
        self.free_slots.append(r.slot)
        self.free_slots.sort()  # lowest slots first: running requests stay contiguous, read as views

    # -- the scheduler ---------------------------------------------------------------------------
    def _admit(self) -> list[_Request]:
        admitted, in_flight = [], self.tokens_in_flight
        while self.waiting and self.free_slots and in_flight + self.waiting[0].budget <= self.max_tokens_in_flight:
            r = self.waiting.popleft()
            r.slot = self.free_slots.pop(0)
            in_flight += r.budget
            self.running[r.id] = r
            admitted.append(r)
        return admitted

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        self.last_top = {}
        admitted = self._admit()
        new = {r.id for r in admitted}
        decoding = [r for r in self.running.values() if r.id not in new]
        events = []
        # prefill in right-padded groups of similar length, each at most prefill_tokens padded tokens
        group: list[_Request] = []
        for r in sorted(admitted, key=lambda r: len(r.prompt)):
            if group and (len(group) + 1) * len(r.prompt) > self.prefill_tokens:
                events += self._prefill(group)
                group = []
            group.append(r)
        if group:
            events += self._prefill(group)
        if decoding:
            events += self._decode(sorted(decoding, key=lambda r: r.slot))
        return events

    def _forward(self, reqs, ids, positions, n_new):
        self.cache.bind([r.slot for r in reqs], n_new)
        out = self.model(ids, positions=positions, cache=self.cache, sparse=self.sparse, last_logits_only=True)
        self.cache.commit()
        return out

    def _prefill(self, reqs: list[_Request]) -> list[StepEvent]:
        T = max(len(r.prompt) for r in reqs)
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, : len(r.prompt)] = torch.tensor(r.prompt)
        ids = ids.to(self.device)
        positions = torch.arange(T, device=self.device).expand(len(reqs), T)
        n = [len(r.prompt) for r in reqs]
        out = self._forward(reqs, ids, positions, n)
        # the logits of each row's last real token: norm + head over the hidden state there
        last = out.hidden[torch.arange(len(reqs)), torch.tensor(n) - 1]  # (B, H)
        logits = self.model.lm_head(self.model.norm(last))
        return self._sample(reqs, logits)

    def _decode(self, reqs: list[_Request]) -> list[StepEvent]:
        ids = torch.tensor([[r.out[-1]] for r in reqs], device=self.device)
        positions = torch.tensor([[self.cache.lengths[r.slot]] for r in reqs], device=self.device)  # (B, 1)
        out = self._forward(reqs, ids, positions, [1] * len(reqs))
        return self._sample(reqs, out.logits[:, -1])

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[StepEvent]:
        logits = logits.float()
        raw = None
        if any(r.params.logprobs for r in reqs):
            raw = logits.log_softmax(-1)
        events = []
        for b, r in enumerate(reqs):
            tok, lp = sample(logits[b], r.params, r.gen)
            r.out.append(tok)
            r.logprobs.append(lp)
            if r.params.logprobs:
                vals, idx = raw[b].topk(min(r.params.logprobs, raw.shape[-1]))
                top = dict(zip(idx.tolist(), vals.tolist()))
                top.setdefault(tok, float(raw[b, tok]))
                r.top.append(top)
                self.last_top[r.id] = top
            events.append(StepEvent(r.id, tok, lp, self._finish_if_done(r)))
        return events

    def _finish_if_done(self, r: _Request) -> Completion | None:
        reason = None
        if r.out[-1] in r.params.stop_token_ids:
            reason = "stop"
        elif r.params.stop:
            tail = self.tokenizer.decode(r.out[-(r.stop_bytes + 1):])
            if any(s in tail for s in r.params.stop):
                reason = "stop"
        if reason is None and len(r.out) >= r.params.max_tokens:
            reason = "length"
        if reason is None:
            return None
        del self.running[r.id]
        self._free(r)
        return Completion(r.id, r.prompt, r.out, r.logprobs, reason, r.top if r.params.logprobs else None)

    # -- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Run prompts to completion with continuous batching; completions in the order of `prompts`."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[str, Completion] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        wanted = set(ids)
        while wanted - done.keys():
            for ev in self.step():
                if ev.completion is not None and ev.request_id in wanted:
                    done[ev.request_id] = ev.completion
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]
