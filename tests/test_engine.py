"""Inference engine: cache == recompute (greedy), batching == one at a time, seeded sampling, sampled-distribution
log-probs (in the completion and in each step event), absorbed MLA == expanded, admission limits, stop conditions,
abort, weights changed between steps, DSA tie-breaking chosen per forward (never set on the caller's model); the
lean forward (decode.py) == the model's forward for the main stack and the MTP layer, graph-bucket padding ==
unpadded, in-place weight refresh, bf16, and bench/gpu.py's guard on a machine without CUDA."""

import math

import pytest
import torch

from nanoglm5.config import ModelConfig
from nanoglm5.engine import (
    Engine,
    SamplingParams,
    cache_bytes_per_token,
    expanded_kv_bytes_per_token,
    sampling_logprobs,
)
from nanoglm5.model import GLM5, rope_cos_sin

# index_topk 8 ≪ the lengths below, so decode runs DSA's top-k selection; 16 indexer heads make exact ties of
# index scores (all ReLUs zero) rare: torch.topk breaks ties differently for rows of different length.
CFG = dict(vocab_size=256, index_topk=8, index_n_heads=16, max_position_embeddings=128)


def _model(seed=0, **overrides) -> GLM5:
    torch.manual_seed(seed)
    m = GLM5(ModelConfig.preset("tiny", **{**CFG, **overrides})).eval()
    with torch.no_grad():  # larger weights: peaked logits, so argmax is far from float-rounding ties
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(n, seed=1, lo=2, hi=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def _recompute_greedy(model, prompt, n):
    """The reference: the full no-cache forward (training code path) over the whole sequence at every step,
    breaking DSA ties by position as the engine does."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), tie_break="stable").logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cache_greedy_equals_recompute(model):
    eng = Engine(model, max_batch=1)
    for prompt in _prompts(3) + [[7]]:
        out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
        assert out.token_ids == _recompute_greedy(model, prompt, 24)
        assert out.finish_reason == "length" and out.logprobs == [0.0] * 24


def test_batching_equals_one_at_a_time(model):
    prompts = _prompts(7, seed=2)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (5, 20, 9, 14, 3, 17, 11)]
    alone = [Engine(model, max_batch=1).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    eng = Engine(model, max_batch=3)  # 7 requests through 3 slots: requests join and leave the running batch
    batched = eng.generate(prompts, params)
    assert [c.token_ids for c in batched] == alone
    assert not eng.has_unfinished() and sorted(eng.free_slots) == [0, 1, 2]


def test_seeded_sampling_reproducible_and_independent_of_batch(model):
    p = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=123)
    prompt = _prompts(1, seed=3)[0]
    alone = Engine(model, max_batch=1).generate([prompt], p)[0]
    others = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in (1, 2)]
    batched = Engine(model, max_batch=4).generate(_prompts(2, seed=4) + [prompt], others + [p])[-1]
    assert batched.token_ids == alone.token_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    other_seed = Engine(model, max_batch=1).generate([prompt], SamplingParams(**{**p.__dict__, "seed": 9}))[0]
    assert other_seed.token_ids != alone.token_ids


def test_logprobs_are_of_the_sampled_distribution(model):
    prompt = _prompts(1, seed=5)[0]
    p = SamplingParams(max_tokens=6, temperature=0.7, seed=0, logprobs=3)
    out = Engine(model).generate([prompt], p)[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]), tie_break="stable").logits[0, len(prompt) - 1 : -1]
    want = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert out.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    raw = logits.log_softmax(-1)
    for t, (tok, top) in enumerate(zip(out.token_ids, out.top_logprobs)):
        assert top[tok] == pytest.approx(float(raw[t, tok]), abs=1e-4)  # the sampled token's raw log-prob
        best = raw[t].topk(3).indices.tolist()
        assert set(best) <= set(top)


def test_step_events_carry_top_logprobs(model):
    """What a streaming server sends with each token: the step event's top log-probs == the completion's."""
    eng = Engine(model, max_batch=2)
    a = eng.add_request(_prompts(1, seed=5)[0], SamplingParams(max_tokens=5, temperature=0.7, seed=0, logprobs=3))
    b = eng.add_request(_prompts(1, seed=6)[0], SamplingParams(max_tokens=5, temperature=0))
    tops, done = {a: [], b: []}, {}
    while eng.has_unfinished():
        for ev in eng.step():
            tops[ev.request_id].append(ev.top_logprobs)
            if ev.completion is not None:
                done[ev.request_id] = ev.completion
    assert tops[a] == done[a].top_logprobs and all(len(t) >= 3 for t in tops[a])
    assert tops[b] == [None] * 5 and done[b].top_logprobs is None


def test_sampling_logprobs_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    lp = sampling_logprobs(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.3 reaches 0.7: keep two
    assert lp.exp().tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-6)
    lp = sampling_logprobs(logits, SamplingParams(top_k=3, temperature=1.0))
    assert lp.exp().tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], abs=1e-6)
    lp = sampling_logprobs(logits, SamplingParams(top_p=0.4))  # the top token alone already exceeds top_p
    assert lp.exp().tolist() == pytest.approx([1.0, 0, 0, 0])


def test_absorbed_decode_equals_expanded(model):
    """One decode query over 40 cached latents: MLA's absorbed form == the expanded per-head K/V form,
    dense and with a DSA top-k selection."""
    attn = model.layers[1].self_attn
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, cfg.hidden_size, generator=g)
    pos = torch.arange(40).expand(2, 40)
    cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta)
    with torch.no_grad():
        q_nope, q_rot, _, c_kv, k_rot = attn.project(x, cos, sin)
        q_nope, q_rot = q_nope[:, :, -1:], q_rot[:, :, -1:]  # the last token as the decode query
        mask = torch.ones(2, 1, 40, dtype=torch.bool)
        dense, _ = attn.attend_dense(q_nope, q_rot, c_kv, k_rot, mask)
        absorbed, _ = attn.attend_absorbed(q_nope, q_rot, c_kv, k_rot, mask)
        assert (dense - absorbed).abs().max() < 1e-5
        topk = torch.randperm(40, generator=g)[:8].expand(2, 1, 8)
        sel = torch.zeros_like(mask).scatter(-1, topk, True)
        dense, _ = attn.attend_dense(q_nope, q_rot, c_kv, k_rot, sel)
        absorbed, _ = attn.attend_absorbed(q_nope, q_rot, c_kv, k_rot, mask, topk)
        assert (dense - absorbed).abs().max() < 1e-5


def test_cache_sizes():
    glm5 = ModelConfig.preset("glm5_744b")
    assert cache_bytes_per_token(glm5, torch.bfloat16) == 78 * (512 + 64 + 128) * 2
    assert expanded_kv_bytes_per_token(glm5, torch.bfloat16) == 78 * 64 * (192 + 64 + 256) * 2
    eng = Engine(_model(), max_batch=2, max_seq_len=64)
    assert eng.cache.nbytes() == 2 * 64 * eng.cache_bytes_per_token()
    assert eng.expanded_kv_bytes_per_token() > eng.cache_bytes_per_token()


def test_stop_token_ids_and_strings(model):
    prompt = _prompts(1, seed=6)[0]
    free = Engine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    out = Engine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[free[3]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(free[3]) + 1]

    class ByteTok:  # decode: one character per id
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    text = ByteTok().decode(free)
    eng = Engine(model, tokenizer=ByteTok())
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop=[text[4:6]]))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == text.find(text[4:6]) + 2
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).add_request(prompt, SamplingParams(stop=["x"]))


def test_admission_limits_and_errors(model):
    eng = Engine(model, max_batch=2, max_tokens_in_flight=60, max_seq_len=64)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        eng.add_request([1] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([300], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request([1], SamplingParams(max_tokens=5, top_p=0))
    for _ in range(4):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0))  # budget 23 each: 2 fit in 60
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, len(eng.running))
        assert eng.tokens_in_flight <= eng.block_manager.num_blocks * eng.block_manager.block_size == 64
    assert peak == 2


def test_abort_frees_slot(model):
    eng = Engine(model, max_batch=1)
    a = eng.add_request([1, 2], SamplingParams(max_tokens=50))
    b = eng.add_request([3, 4], SamplingParams(max_tokens=3, temperature=0))
    eng.step()
    assert list(eng.running) == [a] and eng.abort(a) and eng.free_slots == [0]
    evs = [ev for _ in range(3) for ev in eng.step()]
    assert [e.request_id for e in evs] == [b] * 3 and evs[-1].completion is not None
    assert not eng.abort("nope")
    c = eng.add_request([1, 2], SamplingParams(max_tokens=50))
    d = eng.add_request([3, 4], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.abort_all() == [c, d] and not eng.has_unfinished() and eng.free_slots == [0]


def test_new_weights_between_steps(model):
    """RL partial rollouts: load newer weights between steps; the engine continues with them."""
    m = _model(seed=0)
    eng = Engine(m, max_batch=2)
    rid = eng.add_request(_prompts(1, seed=7)[0], SamplingParams(max_tokens=12, temperature=0))
    for _ in range(4):
        eng.step()
    m.load_state_dict(_model(seed=1).state_dict())  # "newer" weights
    done = None
    while done is None:
        done = next((ev.completion for ev in eng.step() if ev.request_id == rid), None)
    assert len(done.token_ids) == 12
    prompt = _prompts(1, seed=8)[0]  # a fresh request runs exactly on the new weights
    assert eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].token_ids == \
        _recompute_greedy(m, prompt, 8)
    assert math.isfinite(sum(done.logprobs))


def test_cache_equals_recompute_with_index_score_ties():
    """Default tiny indexer (4 heads, init scale): exact ties of index scores on the top-k boundary are common.
    The engine breaks them by position ("stable"), so decode matches a full recompute of the same model."""
    torch.manual_seed(0)
    model = GLM5(ModelConfig.preset("tiny", vocab_size=256, index_topk=6)).eval()
    eng = Engine(model, max_batch=2)
    assert eng.tie_break == "stable"
    prompts = _prompts(2, seed=7, lo=10, hi=30)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _recompute_greedy(model, prompt, 20)
    # and the reference-exact mode (the model's default, untouched by the engine) really differs on such ties
    x = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stable = model(x, tie_break="stable").logits
        ref = model(x).logits
        assert torch.equal(ref, model(x, tie_break="topk").logits)
    assert (stable - ref).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="tie_break"):
        Engine(model, tie_break="random")
    with pytest.raises(ValueError, match="tie_break"):
        model(x, tie_break="random")


def test_lean_forward_equals_model_forward(model):
    """decode.py's prefill over right-padded rows == the model's own forward at every real position, for the main
    stack and for the MTP layer (fed the main hidden states), with DSA selecting (index_topk 8 < 20 tokens)."""
    eng = Engine(model, max_batch=3, speculative="mtp")
    g = torch.Generator().manual_seed(0)
    lens = [20, 13]
    ids = torch.randint(0, 256, (2, 20), generator=g)
    ids[1, 13:] = 0
    tables = [[5, 2], [0, 7]]  # blocks out of order: the read gathered through the block tables
    hidden, logits = eng.decoder.run("main", ids, [0, 0], tables)
    cfg = model.config
    with torch.no_grad():
        for b, n in enumerate(lens):
            ref = model(ids[b:b + 1, :n], tie_break="stable")
            assert torch.allclose(logits[b, :n], ref.logits[0], rtol=1e-4, atol=1e-4)
            assert torch.allclose(hidden[b, :n], ref.hidden[0], rtol=1e-4, atol=1e-5)
        # the MTP layer at positions 0..n-2 reads h_i and x_{i+1} (model.MTPLayer, as in the MTP loss)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        _, mtp_logits = eng.decoder.run("mtp", nxt, [0, 0], tables, h_prev=hidden)
        for b, n in enumerate(lens):
            pos = torch.arange(n - 1)[None]
            cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta)
            h_ref = model.mtp[0](hidden[b:b + 1, : n - 1], model.embed_tokens(ids[b:b + 1, 1:n]), cos, sin, pos,
                                 tie_break="stable")[0]
            assert torch.allclose(mtp_logits[b, : n - 1], model.lm_head(h_ref)[0], rtol=1e-4, atol=1e-4)


def test_graph_buckets_pad_and_match_eager(model):
    """graphs="eager": the CUDA-graph path's padding to batch buckets (scratch block, attention over a length
    bucket) run eagerly; same greedy tokens as unpadded decoding, with requests joining and leaving."""
    prompts = _prompts(6, seed=9)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (6, 15, 3, 11, 8, 13)]
    plain = [c.token_ids for c in Engine(model, max_batch=8).generate(prompts, params)]
    eng = Engine(model, max_batch=8, graphs="eager", max_seq_len=64)
    assert eng.graph_buckets == [1, 2, 4, 8]
    assert [c.token_ids for c in eng.generate(prompts, params)] == plain
    assert {k[2] for k in eng.decoder.graphs} >= {4, 8}  # 6 running → bucket 8, later fewer → 4, 2, 1
    assert {k[3] for k in eng.decoder.graphs} >= {2, 4}  # attention over length buckets: 2 blocks, then 4
    assert [c.token_ids for c in Engine(model, max_batch=8, graphs="eager", graph_buckets=[4]).generate(
        prompts, params)] == plain  # 5+ running: beyond the largest bucket, eager
    d, ids, tables = eng.decoder, torch.tensor([[5], [7], [9]]), [[0], [3, 1], [2]]
    with torch.inference_mode():
        h1, l1 = d.run("main", ids, [12, 20, 7], tables)
        h2, l2 = d.run_static("main", ids, [12, 20, 7], tables, bucket=4)
    assert l2.shape == l1.shape and torch.allclose(l1, l2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, graphs="cuda")


def test_weights_refreshed_in_place(model):
    """New weights loaded in place between steps: the derived matrices are updated in place (what a captured CUDA
    graph reads) and the output is that of a fresh engine on the new weights."""
    m = _model(seed=0)
    eng = Engine(m, max_batch=2, graphs="eager")
    prompt = _prompts(1, seed=10)[0]
    eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    wa = eng.decoder.weights.layers[0].attn.qkv_a
    m.load_state_dict(_model(seed=1).state_dict())
    got = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    assert eng.decoder.weights.layers[0].attn.qkv_a is wa and eng.decoder.graphs
    assert got == Engine(m, max_batch=1).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    assert got == _recompute_greedy(m, prompt, 8)


def test_bf16_engine_runs():
    """The GPU default precision on CPU: bf16 weights and cache, fp32 routing, index scores and sampling."""
    m = _model()
    eng = Engine(m, max_batch=2, dtype=torch.bfloat16, speculative="mtp")
    assert eng.cache.kv.dtype == torch.bfloat16 and m.embed_tokens.weight.dtype == torch.bfloat16
    outs = eng.generate(_prompts(2, seed=11), SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    assert all(len(o.token_ids) == 6 and all(math.isfinite(x) and x <= 0 for x in o.logprobs) for o in outs)


def test_bench_gpu_without_cuda_says_so_and_exits_0(capsys, monkeypatch):
    import bench.gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.gpu.main([]) == 0
    assert "no CUDA" in capsys.readouterr().out
