"""The block manager: which fixed-size blocks of the paged KV cache each sequence holds, and which full blocks
hold a prefix that another sequence may reuse (nano-vllm's `engine/block_manager.py` is the compact model; the
idea is vLLM's PagedAttention, Kwon et al. 2023, SOSP, arXiv 2309.06180 §4).

  - the pool: `num_blocks` blocks of `block_size` token positions each (decode.PagedKVCache holds the tensors);
    a sequence's block table `seq.blocks` lists the blocks that hold its positions 0, 1, ... in order;
  - ref counts: a block is in use while some sequence's table holds it, and free (on the free list) otherwise;
  - locality: a sequence takes the free blocks of its batch slot's own run (`seq.home` + i) before others, so
    sequences without a shared prefix sit on consecutive blocks and decode reads them as one strided view;
  - prefix reuse: a FULL block whose keys were all computed is registered under a chained hash, hash(previous
    block's hash, its token ids), so a hash names the whole prefix up to the block's end. A new sequence whose
    leading blocks' hashes are registered takes those blocks (ref count + 1) and computes only the rest. A
    block freed by its last holder keeps its hash: it is reused if asked for before the free list hands it out
    again (oldest-freed first, so the most recently used prefixes stay longest);
  - `pending`: full blocks allocated but not yet computed. A sequence that would share one waits a step
    (`Scheduler` defers it): then the block is computed and it hits, so a GRPO group of G samples of one
    prompt prefills that prompt once;
  - `reset_prefix_cache` forgets every hash: the engine calls it when the weights change (RL loads newer
    weights), so a new request never reads keys another policy wrote; running sequences keep their blocks.

Hash collisions cannot give wrong keys: a hit is checked against the block's stored token ids.
"""

from __future__ import annotations


def chain_hash(prev: int | None, tokens) -> int:
    """The hash of a block given the hash of the block before it: names the whole prefix up to its end.
    Python's hash of a tuple of ints is the same in every process (no hash randomisation for ints)."""
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered: oldest-freed first
        self.hash_of: list[int | None] = [None] * num_blocks  # registered (computed) full blocks
        self.tokens_of: list[tuple | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.pending: dict[int, int] = {}  # hash → block: allocated full blocks whose keys are not computed yet
        self.epoch = 0  # moves on reset_prefix_cache: a sequence admitted before it registers nothing after
        self.hits = self.lookups = 0  # prefix-cache counters over the engine's life, in tokens

    # -- sizes -------------------------------------------------------------------------------------
    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free)

    # -- prefix lookup -------------------------------------------------------------------------------
    def _hashes(self, tokens: list[int]) -> list[int]:
        """Chained hashes of the full blocks of tokens that leave at least one token after them (the last
        token is always computed: its logits are what the sequence samples from)."""
        bs, out, h = self.block_size, [], None
        for i in range((len(tokens) - 1) // bs):
            h = chain_hash(h, tokens[i * bs:(i + 1) * bs])
            out.append(h)
        return out

    def match(self, tokens: list[int]) -> tuple[list[int], bool]:
        """(the cached blocks of tokens' longest registered prefix, whether the next full block is pending)."""
        if not self.prefix_caching:
            return [], False
        bs, blocks = self.block_size, []
        for i, h in enumerate(self._hashes(tokens)):
            b = self.by_hash.get(h)
            if b is None or self.tokens_of[b] != tuple(tokens[i * bs:(i + 1) * bs]):
                return blocks, h in self.pending
            blocks.append(b)
        return blocks, False

    def can_allocate(self, tokens: list[int], positions: int, reuse: bool = True) -> bool:
        """Whether a sequence of these tokens can get blocks for `positions` positions now."""
        cached, _ = self.match(tokens) if reuse else ([], False)
        taken = sum(self.ref[b] == 0 for b in cached)  # cached blocks on the free list leave it
        return taken + self.blocks_for(positions) - len(cached) <= self.num_free

    # -- a sequence's blocks -------------------------------------------------------------------------
    def allocate(self, seq, positions: int, reuse: bool = True) -> int:
        """Give seq (fields blocks, hashed, epoch, computed) the cached blocks of its prefix (reuse=False: none)
        and fresh blocks up to `positions` positions; → the number of tokens whose keys are cached (seq.computed)."""
        tokens = seq.tokens
        cached, _ = self.match(tokens) if reuse else ([], False)
        self.lookups += len(tokens)
        self.hits += len(cached) * self.block_size
        for b in cached:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        seq.blocks, seq.hashed, seq.epoch, seq.prev_hash = list(cached), len(cached), self.epoch, None
        if cached:
            seq.prev_hash = self.hash_of[cached[-1]]
        seq.computed = len(cached) * self.block_size
        self.grow(seq, positions)
        if self.prefix_caching:  # its full uncomputed prompt blocks: pending until computed
            for i, h in enumerate(self._hashes(tokens)[len(cached):], start=len(cached)):
                self.pending.setdefault(h, seq.blocks[i])
        return seq.computed

    def grow(self, seq, positions: int) -> bool:
        """Fresh blocks until seq's table covers `positions` positions; False (nothing taken) if too few free."""
        need = self.blocks_for(positions) - len(seq.blocks)
        if need > self.num_free:
            return False
        for _ in range(max(need, 0)):
            b = seq.home + len(seq.blocks)  # the slot's own run first (decode reads it as a view), unless cached
            if seq.home < 0 or b not in self.free or self.hash_of[b] is not None:
                b = next(iter(self.free))
            del self.free[b]
            self._forget(b)
            self.ref[b] = 1
            seq.blocks.append(b)
        return True

    def register(self, seq) -> None:
        """Register seq's full blocks whose keys are all computed (seq.computed) under their chained hashes."""
        bs, tokens = self.block_size, None
        while seq.hashed < seq.computed // bs and seq.hashed < len(seq.blocks):
            if tokens is None:
                tokens = seq.tokens
            i, b = seq.hashed, seq.blocks[seq.hashed]
            h = chain_hash(seq.prev_hash, tokens[i * bs:(i + 1) * bs])
            seq.prev_hash, seq.hashed = h, i + 1
            if self.pending.get(h) == b:
                del self.pending[h]
            if not self.prefix_caching or seq.epoch != self.epoch:
                continue
            if h not in self.by_hash and self.hash_of[b] is None:
                self.by_hash[h], self.hash_of[b], self.tokens_of[b] = b, h, tuple(tokens[i * bs:(i + 1) * bs])

    def release(self, seq) -> None:
        """seq gives its blocks back (finished, aborted or preempted); registered ones stay reusable."""
        for b in seq.blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.hash_of[b] is None:
                    self._forget(b)
        seq.blocks, seq.hashed, seq.computed = [], 0, 0

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]
        self.hash_of[b] = self.tokens_of[b] = None
        for k in [] if not self.pending else [k for k, v in self.pending.items() if v == b]:
            del self.pending[k]

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (the weights changed: cached keys belong to the old policy)."""
        self.by_hash.clear()
        self.pending.clear()
        self.hash_of = [None] * self.num_blocks
        self.tokens_of = [None] * self.num_blocks
        self.epoch += 1

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens admitted; nan before any."""
        return self.hits / self.lookups if self.lookups else float("nan")
