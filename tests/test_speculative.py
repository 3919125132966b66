"""Speculative decoding with the MTP layer (nanoglm5/speculative.py): greedy output identical to plain decoding
(batch 1 and continuous batching, DSA top-k active, chained drafts, padded graph buckets), log-probs equal to the
target distribution's, the sampled output distributed exactly as plain sampling (a deterministic statistical
test, which also shows it catches a broken rejection step), acceptance statistics, errors."""

import pytest
import torch

import nanoglm5.speculative as spec
from nanoglm5.config import ModelConfig
from nanoglm5.engine import Engine, SamplingParams, sampling_logprobs
from nanoglm5.model import GLM5

MICRO = dict(hidden_size=64, num_hidden_layers=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=16)


def _model(V=16, ctx=None, seed=0, micro=False) -> GLM5:
    """index_topk 8 < the prompts below: DSA selects. ctx=None: a random MTP layer (most drafts rejected);
    ctx=c: attention and MLP outputs scaled by c and the MTP layer reading only the next token's embedding, so
    the MTP layer mostly predicts what the model will (most drafts accepted, some not). micro: a 0.1M-parameter
    model, for the thousands of samples of the statistical test."""
    torch.manual_seed(seed)
    m = GLM5(ModelConfig.preset("tiny", **{**dict(vocab_size=V, index_topk=8, index_n_heads=16,
                                                  max_position_embeddings=128), **(MICRO if micro else {})}))
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)  # peaked logits: argmax far from rounding ties
        if ctx is not None:
            H = m.config.hidden_size
            for block in list(m.layers) + [m.mtp[0].block]:
                block.self_attn.o_proj.weight.mul_(ctx)
                mlp = block.mlp
                for w in ([mlp.experts.down_proj, mlp.shared_experts.down_proj.weight] if hasattr(mlp, "experts")
                          else [mlp.down_proj.weight]):
                    w.mul_(ctx)
            eh = m.mtp[0].eh_proj.weight
            eh.zero_()
            eh[:, :H] = torch.eye(H)
    return m


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny forwards: one torch thread avoids the oversubscription of a busy machine (10× faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts(n, V, seed=1, lo=10, hi=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("ctx", [None, 0.03])
def test_greedy_identical_to_plain_decoding(ctx):
    m = _model(ctx=ctx)
    prompts = _prompts(6, 16)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (5, 20, 9, 14, 1, 17)]
    alone = [Engine(m, max_batch=1).generate([p], sp)[0].token_ids for p, sp in zip(prompts[:2], params[:2])]
    plain = [c.token_ids for c in Engine(m, max_batch=3).generate(prompts, params)]  # requests join and leave
    assert plain[:2] == alone
    for k, max_batch, graphs in [(1, 1, "off"), (1, 3, "off"), (2, 3, "eager"), (3, 4, "off")]:
        eng = Engine(m, max_batch=max_batch, speculative="mtp", num_draft=k, graphs=graphs)
        outs = eng.generate(prompts, params)
        assert [c.token_ids for c in outs] == plain, (k, max_batch, graphs)
        assert sum(c.drafted for c in outs) == eng.drafted and sum(c.accepted for c in outs) == eng.accepted
        assert 0 <= eng.accepted <= eng.drafted and not eng.has_unfinished()
        assert sorted(eng.free_slots) == list(range(max_batch))
        if ctx is not None:  # the friendly MTP layer: most drafts accepted, some rejected
            assert 0.3 < eng.acceptance_rate < 1, eng.acceptance_rate


def test_stop_tokens_and_top_logprobs_match_plain_decoding():
    m = _model(ctx=0.03)
    prompts = _prompts(4, 16, seed=3)
    free = Engine(m).generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[free[5]], logprobs=3)] + \
        [SamplingParams(max_tokens=12, temperature=0, logprobs=2)] * 3
    plain = Engine(m, max_batch=4).generate(prompts, params)
    ours = Engine(m, max_batch=4, speculative="mtp", num_draft=2).generate(prompts, params)
    assert ours[0].finish_reason == "stop" and ours[0].token_ids == free[: free.index(free[5]) + 1]
    for a, b in zip(plain, ours):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        for ta, tb in zip(a.top_logprobs, b.top_logprobs):
            assert ta.keys() == tb.keys() and all(abs(ta[t] - tb[t]) < 1e-4 for t in ta)


def _reference_logprobs(m, prompt, tokens, p: SamplingParams):
    with torch.no_grad():
        logits = m(torch.tensor([prompt + tokens]), tie_break="stable").logits[0, len(prompt) - 1: -1]
    return sampling_logprobs(logits, p).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_logprobs_are_the_target_distributions(k):
    m = _model(ctx=0.05)
    prompts = _prompts(3, 16, seed=4)
    params = [SamplingParams(max_tokens=16, temperature=t, top_k=tk, top_p=tp, seed=s)
              for s, (t, tk, tp) in enumerate([(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9)])]
    eng = Engine(m, max_batch=2, speculative="mtp", num_draft=k)
    outs = eng.generate(prompts, params)
    assert 0 < eng.accepted < eng.drafted
    for prompt, p, out in zip(prompts, params, outs):
        want = _reference_logprobs(m, prompt, out.token_ids, p)
        assert out.logprobs == pytest.approx(want.tolist(), abs=1e-5)
    again = Engine(m, max_batch=3, speculative="mtp", num_draft=k).generate(prompts, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in outs]  # seeded: reproducible


# ---------------------------------------------------------------------------------------------- the distribution
V_STAT, N_STAT = 8, 3000
STAT_PARAMS = dict(max_tokens=3, temperature=0.9, top_k=6)


def _exact_joint(m, prompt):
    """P(x1, x2, x3 | prompt) under the sampling transform, by enumerating every continuation: (V, V, V)."""
    p = SamplingParams(**STAT_PARAMS)
    V = V_STAT
    with torch.no_grad():
        def step(prefixes):  # (n, L) → (n, V) next-token probabilities
            return sampling_logprobs(m(torch.tensor(prefixes), tie_break="stable").logits[:, -1], p).exp()
        p1 = step([prompt])[0]
        p2 = step([prompt + [a] for a in range(V)])  # (V, V)
        p3 = step([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _tv_to_exact(m, prompt, k):
    """Total-variation distance between the empirical and exact joints of (x1, x2) and of (x2, x3) over N_STAT
    seeded speculative samples (deterministic: fixed seeds)."""
    eng = Engine(m, max_batch=64, speculative="mtp", num_draft=k)
    outs = eng.generate([prompt] * N_STAT, [SamplingParams(**STAT_PARAMS, seed=s) for s in range(N_STAT)])
    seqs = torch.tensor([o.token_ids for o in outs])
    exact = _exact_joint(m, prompt)
    tv = []
    for (i, j), marg in (((0, 1), exact.sum(2)), ((1, 2), exact.sum(0))):
        emp = torch.zeros(V_STAT, V_STAT).index_put_((seqs[:, i], seqs[:, j]), torch.ones(N_STAT), accumulate=True)
        tv.append(0.5 * (emp / N_STAT - marg).abs().sum().item())
    return tv, eng


# Sampling noise alone gives TV ≈ 0.5·Σ sqrt(P(1−P)/N)·sqrt(2/π) ≈ 0.05 over these 64 cells at N = 3000.
TV_BOUND = 0.09


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_tokens_distributed_as_plain_sampling(k):
    m, prompt = _model(V=V_STAT, ctx=1.0, micro=True), _prompts(1, V_STAT, seed=5)[0]
    tv, eng = _tv_to_exact(m, prompt, k)
    assert max(tv) < TV_BOUND, tv
    assert 0.2 < eng.acceptance_rate < 0.9  # both the acceptance and the resampling path ran many times


def test_the_statistical_test_catches_a_broken_rejection_step(monkeypatch):
    """Always accepting the draft emits the MTP layer's distribution instead of the model's: the test above fails."""
    m, prompt = _model(V=V_STAT, ctx=1.0, micro=True), _prompts(1, V_STAT, seed=5)[0]
    monkeypatch.setattr(spec, "_accepts", lambda u, p_d, q_d: True)
    tv, eng = _tv_to_exact(m, prompt, k=1)
    assert eng.acceptance_rate == 1.0
    assert max(tv) > 2 * TV_BOUND, tv


def test_accept_rule_unit():
    """accept(): greedy stops at the first mismatch; sampled with p == q accepts everything; with p(d) = 0 never."""
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    g = SamplingParams(temperature=0)
    assert spec.accept(logits, [1, 2], [None, None], g, None, 2) == ([1, 2, 0], [0.0] * 3, 2)
    assert spec.accept(logits, [1, 0], [None, None], g, None, 2) == ([1, 2], [0.0] * 2, 1)
    assert spec.accept(logits, [1, 2], [None, None], g, None, 1) == ([1, 2], [0.0] * 2, 1)  # budget: one draft
    s = SamplingParams(temperature=1.0)
    q = sampling_logprobs(logits, s).exp()
    gen = torch.Generator().manual_seed(0)
    toks, lps, a = spec.accept(logits, [1, 2], [q[0], q[1]], s, gen, 2)
    assert a == 2 and toks[:2] == [1, 2] and lps[:2] == pytest.approx(q[[0, 1], [1, 2]].log().tolist())
    top_k = SamplingParams(temperature=1.0, top_k=1)  # p puts no mass on token 0: a draft of 0 is always rejected
    for seed in range(5):
        toks, _, a = spec.accept(logits, [0], [torch.tensor([0.9, 0.05, 0.05])], top_k, torch.Generator().manual_seed(seed), 1)
        assert a == 0 and toks == [1]


def test_errors():
    no_mtp = GLM5(ModelConfig.preset("tiny", vocab_size=64, num_nextn_predict_layers=0)).eval()
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        Engine(no_mtp, speculative="mtp")
    Engine(no_mtp)  # plain decoding still works
    m = _model()
    with pytest.raises(ValueError, match="speculative"):
        Engine(m, speculative="eagle")
    with pytest.raises(ValueError, match="num_draft"):
        Engine(m, speculative="mtp", num_draft=0)
    eng = Engine(m, speculative="mtp", max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len=32"):  # admission limits as without speculation
        eng.add_request([1] * 30, SamplingParams(max_tokens=5))
    assert eng.acceptance_rate != eng.acceptance_rate  # nan before any draft
