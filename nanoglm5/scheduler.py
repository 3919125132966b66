"""The scheduler: which sequences run in the next engine step and how many of their tokens it computes
(nano-vllm's `engine/scheduler.py` and `engine/sequence.py` are the compact model; continuous batching as in
Orca, Yu et al. 2022, OSDI; chunked prefill as in Sarathi-Serve, Agrawal et al. 2024, arXiv 2403.02310 §4).

  - `Sequence`: one request: its prompt and generated tokens, its block table (block_manager.py) and
    `computed`, how many leading positions have their keys in the cache. A step feeds tokens[computed:]: all
    of a fresh prompt (minus its cached prefix) in a prefill, the last sampled token in a decode;
  - admission by free blocks: the oldest waiting sequence is admitted while a batch slot is free and the pool
    has blocks for all its tokens (cached prefix blocks count for nothing), never by reserving
    prompt + max_tokens up front;
  - chunked prefill: at most `chunk` prompt tokens are computed per step over all prefilling sequences, and the
    running streams decode in the same step, so a long prompt does not stall them (None: no limit);
  - preemption by recompute: when a decoding sequence needs a block and none is free, the most recently
    admitted running sequence gives its blocks back and returns to the front of the queue with every token it
    has; re-admitted, it prefills them all and samples its next token, as the decode step it missed would
    have (nothing lost; vLLM's RECOMPUTE mode);
  - a waiting sequence whose next full prefix block is being computed by another sequence (`pending`) waits a
    step and then shares it: G samples of one prompt prefill it once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from nanoglm5.block_manager import BlockManager
from nanoglm5.sampling import SamplingParams


@dataclass(eq=False)  # compared by identity
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    gen: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    slot: int = -1  # batch row while running (graph buckets, max_batch)
    stop_bytes: int = 0  # longest stop string in bytes: how many trailing tokens to decode when checking
    drafts: list[int] = field(default_factory=list)  # speculative: the MTP layer's draft tokens for the next step
    q: list = field(default_factory=list)  # their draft distributions (sampled requests), (V,) probs each
    drafted: int = 0
    accepted: int = 0
    # paged cache (block_manager.py): the block table, positions with keys cached, registered full blocks
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    hashed: int = 0
    prev_hash: int | None = None
    epoch: int = 0
    prefilled: bool = False  # sampled since its (re-)admission: it decodes now
    cached: int = 0  # tokens its last admission found in the prefix cache
    prompt_lp: list = field(default_factory=list)  # params.prompt_logprobs: one entry per prompt token so far
    home: int = -1  # the first block of its batch slot's own run (block_manager.py: locality), -1: none

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def budget(self) -> int:  # positions this request may occupy at most
        return len(self.prompt) + self.params.max_tokens


class Scheduler:
    """waiting (FIFO) and running (admission order) sequences over one BlockManager and `max_batch` batch slots.
    `lookahead`: positions past `computed` a decode step may write (1; speculative: the drafts and the chain)."""

    def __init__(self, max_batch: int, blocks: BlockManager, chunk: int | None, lookahead: int, home_blocks: int):
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunked_prefill={chunk!r} must be None (off) or a number of tokens >= 1")
        self.blocks, self.chunk, self.lookahead = blocks, chunk, lookahead
        self.home_blocks = home_blocks  # blocks of a batch slot's own run: one full-length sequence
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.free_slots = list(range(max_batch))
        self.preemptions = 0

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """→ (prefill: (sequence, tokens to compute this step), decode: sequences that feed their last token)."""
        decode = self._make_room([r for r in self.running.values() if r.prefilled])
        budget = self.chunk if self.chunk is not None else float("inf")
        prefill = []
        for r in self.running.values():  # prefills under way (chunked) go first
            if not r.prefilled and budget > 0:
                n = int(min(len(r.prompt) + len(r.out) - r.computed, budget))
                prefill.append((r, n))
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            r = self.waiting[0]
            tokens = r.tokens
            reuse = r.params.prompt_logprobs is None  # scoring a prompt needs the logits at all of its positions
            _, pending = self.blocks.match(tokens) if reuse else ([], False)
            if pending or not self.blocks.can_allocate(tokens, len(tokens), reuse):
                break  # its prefix is being computed (share it next step), or no room: FIFO, nothing jumps ahead
            self.waiting.popleft()
            r.slot = self.free_slots.pop(0)
            home = r.slot * self.home_blocks
            r.home = home if home + self.home_blocks <= self.blocks.num_blocks else -1
            r.cached = self.blocks.allocate(r, len(tokens), reuse)
            self.running[r.id] = r
            n = int(min(len(tokens) - r.computed, budget))
            prefill.append((r, n))
            budget -= n
        return prefill, decode

    def _make_room(self, decode: list[Sequence]) -> list[Sequence]:
        """Blocks for each decoding sequence's next positions; preempt the newest running sequence while none."""
        for r in decode:
            while r.id in self.running and not self.blocks.grow(r, r.computed + self.lookahead):
                self.preempt(next(reversed(self.running.values())))
        return [r for r in decode if r.id in self.running]

    def preempt(self, r: Sequence) -> None:
        """r gives back its blocks and slot and waits at the front of the queue with all its tokens."""
        self.remove(r)
        r.prefilled, r.drafts, r.q = False, [], []
        self.waiting.appendleft(r)
        self.preemptions += 1

    def remove(self, r: Sequence) -> None:
        """r leaves the running set (finished, failed, aborted, preempted): its blocks and slot are free."""
        if self.running.pop(r.id, None) is None:
            return
        self.blocks.release(r)
        self.free_slots.append(r.slot)
        self.free_slots.sort()  # lowest slots first
        r.slot = -1
