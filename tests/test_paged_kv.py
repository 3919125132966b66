"""Paged KV cache (block_manager.py, scheduler.py, decode.PagedKVCache): paged attention over shared prefix blocks
== the model's contiguous forward; a prefix hit gives the tokens a miss gives; a GRPO group prefills its prompt
once; a multi-turn conversation prefills only each turn's new tokens; preemption loses no request and no token
(plain and speculative); chunked prefill == one-shot prefill and lets running streams decode meanwhile; new
weights drop the prefix cache; the block manager's ref counts, reuse and eviction."""

import pytest
import torch
from test_engine import _model  # the tiny model with peaked logits (argmax far from rounding ties)

from nanoglm5.block_manager import BlockManager
from nanoglm5.engine import Engine, SamplingParams
from nanoglm5.scheduler import Sequence


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def test_paged_attention_over_shared_prefix_equals_contiguous_forward(model):
    """Row A prefills prefix + its suffix into scattered blocks; rows B and C reuse A's two prefix blocks and compute
    only their suffixes (one batch, different lengths): every logit == the model's forward over the whole row."""
    eng = Engine(model, max_batch=4, max_tokens_in_flight=256)
    d, prefix = eng.decoder, _ids(32, 0)  # two full blocks of 16
    a, b, c = prefix + _ids(9, 1), prefix + _ids(12, 2), prefix + _ids(5, 3)
    ta, tb, tc = [9, 3, 14], [9, 3, 0], [9, 3, 6]
    with torch.inference_mode():
        _, la = d.run("main", torch.tensor([a]), [0], [ta])
        suf = [b[32:], c[32:] + [0] * 7]  # right-padded
        _, lbc = d.run("main", torch.tensor(suf), [32, 32], [tb, tc])
        for row, logits, n in ((a, la[0], len(a)), (b, lbc[0], 12), (c, lbc[1], 5)):
            ref = model(torch.tensor([row]), tie_break="stable").logits[0]
            assert torch.allclose(logits[-n:] if row is a else logits[:n], ref[-n:], rtol=1e-4, atol=1e-4)


def test_prefix_hit_gives_the_tokens_of_a_miss(model):
    """A multi-turn conversation: turn 2's prompt extends turn 1's prompt and reply. With the prefix cache it
    prefills only what the cache does not hold; the tokens equal an engine without a prefix cache."""
    hit, miss = Engine(model, max_batch=2), Engine(model, max_batch=2, prefix_caching=False)
    turn1 = _ids(37, 4)
    r1 = hit.generate([turn1], _greedy(12))[0]
    assert r1.token_ids == miss.generate([turn1], _greedy(12))[0].token_ids
    turn2 = turn1 + r1.token_ids + _ids(6, 5)  # 55 tokens: the reply's last token was never fed, so 48 are cached
    before = hit.prefill_computed
    assert hit.generate([turn2], _greedy(10))[0].token_ids == miss.generate([turn2], _greedy(10))[0].token_ids
    assert hit.prefill_computed - before == len(turn2) - 48
    assert hit.block_manager.hits == 48 and miss.block_manager.hits == 0


def test_group_of_samples_prefills_its_prompt_once(model):
    """G = 6 sampled requests of one 40-token prompt: the first prefills it, the others wait one step for its
    two full blocks and compute only the 8 tokens after them; each sample's tokens and log-probs equal those of an
    engine without a prefix cache (same seeds)."""
    prompt, G = _ids(40, 6), 6
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in range(G)]
    eng = Engine(model, max_batch=8)
    outs = eng.generate([prompt] * G, params)
    ref = Engine(model, max_batch=8, prefix_caching=False).generate([prompt] * G, params)
    assert eng.prefill_computed == 40 + (G - 1) * 8
    assert eng.stats()["hit_rate"] == pytest.approx((G - 1) * 32 / (G * 40))
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids
        assert o.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_preemption_loses_no_request_and_no_token(model):
    """A pool of 4 blocks (64 positions) for 5 requests that each grow to 2 blocks: decoding runs out of blocks,
    the newest running request is preempted and later recomputed; every request finishes with the tokens it
    gets alone."""
    prompts = [_ids(n, 10 + n) for n in (12, 9, 14, 5, 11)]
    params = [_greedy(m) for m in (18, 20, 12, 25, 16)]
    alone = [Engine(model, max_batch=1).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    eng = Engine(model, max_batch=4, max_tokens_in_flight=64)
    assert eng.block_manager.num_blocks == 4
    outs = eng.generate(prompts, params)
    assert eng.scheduler.preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert not eng.has_unfinished() and eng.block_manager.num_free == 4


def test_speculative_preemption_equals_plain_greedy(model):
    """The same squeeze with MTP speculative decoding (drafts need room past each sequence): still lossless."""
    prompts = [_ids(n, 20 + n) for n in (12, 9, 14)]
    params = [_greedy(m) for m in (18, 20, 12)]
    plain = [c.token_ids for c in Engine(model, max_batch=3).generate(prompts, params)]
    eng = Engine(model, max_batch=3, max_tokens_in_flight=64, speculative="mtp", num_draft=2)
    assert not eng.prefix_caching
    assert [c.token_ids for c in eng.generate(prompts, params)] == plain
    assert eng.scheduler.preemptions > 0


def test_chunked_prefill_matches_and_does_not_stall_decoding(model):
    """A 70-token prompt prefilled 16 tokens per step: the same tokens as one-shot prefill, and a request already
    decoding gets one token in every step meanwhile."""
    long, short = _ids(70, 30), _ids(5, 31)
    one_shot = Engine(model, chunked_prefill=None).generate([long], _greedy(8))[0].token_ids
    eng = Engine(model, max_batch=2, chunked_prefill=16)
    s = eng.add_request(short, _greedy(12))
    eng.step()
    lo = eng.add_request(long, _greedy(8))
    got, steps = {s: [], lo: []}, 0
    while not got[lo]:
        evs = eng.step()
        steps += 1
        assert [e.request_id for e in evs if e.request_id == s] == [s]  # the short stream never waits
        for e in evs:
            got[e.request_id].append(e.token_id)
    assert steps == 5  # ceil(70 / 16) steps until the long prompt's first token
    while eng.has_unfinished():
        for e in eng.step():
            got[e.request_id].append(e.token_id)
    assert got[lo] == one_shot


def test_new_weights_drop_the_prefix_cache():
    m = _model(0)
    eng = Engine(m, max_batch=2)
    prompt = _ids(40, 40)
    eng.generate([prompt], _greedy(4))
    m.load_state_dict(_model(1).state_dict())
    before = eng.block_manager.hits
    got = eng.generate([prompt], _greedy(6))[0].token_ids
    assert eng.block_manager.hits == before  # nothing read from keys the old weights wrote
    assert got == Engine(m, max_batch=1).generate([prompt], _greedy(6))[0].token_ids


def test_block_manager_ref_counts_reuse_and_eviction():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence("a", list(range(10)), SamplingParams(), None)
    assert bm.allocate(a, 10) == 0 and len(a.blocks) == 3 and bm.num_free == 1
    a.computed = 10
    bm.register(a)
    assert a.hashed == 2  # the two full blocks; the third holds 2 tokens
    b = Sequence("b", list(range(8)) + [99, 98, 97], SamplingParams(), None)
    assert bm.can_allocate(b.tokens, 11) and bm.allocate(b, 11) == 8  # shares a's two full blocks
    assert b.blocks[:2] == a.blocks[:2] and [bm.ref[x] for x in a.blocks[:2]] == [2, 2] and bm.num_free == 0
    c = Sequence("c", list(range(20)), SamplingParams(), None)
    assert not bm.can_allocate(c.tokens, 20)
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 4 and all(r == 0 for r in bm.ref)
    d = Sequence("d", list(range(9)), SamplingParams(), None)
    assert bm.allocate(d, 9) == 8  # freed blocks keep their hashes until handed out again
    bm.release(d)
    e = Sequence("e", [7] * 16, SamplingParams(), None)
    bm.allocate(e, 16)  # takes every block: the cached prefix is evicted
    bm.release(e)
    assert bm.match(list(range(9))) == ([], False)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_prompt_logprobs_equal_the_models_and_survive_chunking(model):
    """params.prompt_logprobs: each prompt token's raw log-prob (and the top-n) == log_softmax of the model's
    forward at the position before it; the same with chunked prefill, and a cached prefix is not used for it."""
    prompt = _ids(40, 50)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), tie_break="stable").logits[0].log_softmax(-1)
    eng = Engine(model, chunked_prefill=16)
    eng.generate([prompt], _greedy(2))  # its full blocks are now cached
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))[0]
    lp = out.prompt_logprobs
    assert len(lp) == 40 and lp[0] is None
    for j in range(1, 40):
        assert lp[j][prompt[j]] == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
        top = ref[j - 1].topk(3).indices.tolist()
        assert set(top) <= set(lp[j]) and len(lp[j]) <= 4
    with pytest.raises(ValueError, match="prompt_logprobs"):
        eng.add_request(prompt, SamplingParams(prompt_logprobs=-1))


def test_batched_prefill_near_the_end_of_the_window_stays_inside_it(model):
    """A cached conversation whose new chunk is short and ends near max_seq_len, prefilled in one step beside a
    fresh 40-token prompt: padded to the longer chunk, the short row's positions would run past the cache and
    RoPE tables (an IndexError in an RL run). The engine computes such a batch row by row; tokens equal a miss."""
    hit, miss = Engine(model, max_batch=2, max_seq_len=128), Engine(model, max_batch=2, max_seq_len=128,
                                                                     prefix_caching=False)
    turn1 = _ids(100, 6)
    hit.generate([turn1], _greedy(4))
    turn2, fresh = turn1 + _ids(14, 7), _ids(40, 8)  # 96 cached positions + a 18-token chunk, beside 40 new
    assert 96 + 40 > hit.decoder.capacity
    want = [c.token_ids for c in miss.generate([turn2, fresh], _greedy(8))]
    assert [c.token_ids for c in hit.generate([turn2, fresh], _greedy(8))] == want
