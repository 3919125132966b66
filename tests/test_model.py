"""The GLM-5 model: parity with transformers' GlmMoeDsaForCausalLM, causality, equal paths, MoE, DSA gradients."""

import pytest
import torch
from conftest import require

from nanoglm5.checkpoint import load_hf, save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.model import GLM5, rope_cos_sin

# random small configs: dense + MoE layers, index_topk below the sequence, grouped routing, biases, ties
PARITY_CONFIGS = [
    dict(vocab_size=300, num_hidden_layers=3, first_k_dense_replace=1, index_topk=8),
    dict(vocab_size=256, hidden_size=96, num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=3,
         q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
         n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3, index_n_heads=3, index_head_dim=16,
         index_topk=5, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(vocab_size=200, num_hidden_layers=2, first_k_dense_replace=2, attention_bias=True, index_topk=12,
         tie_word_embeddings=True, rope_theta=10000.0),
]


ORACLE = "the reference oracle of the parity tests (requirements-dev.txt pins transformers)"


def _hf_model(cfg: ModelConfig, seed: int):
    transformers = require("transformers", ORACLE)
    GlmMoeDsaConfig, GlmMoeDsaForCausalLM = transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hf = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**d)).eval()
    with torch.no_grad():  # make norms, biases and the router bias matter
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return hf


@pytest.mark.parametrize("overrides", PARITY_CONFIGS)
def test_logits_equal_transformers_both_directions(overrides, tmp_path):
    AutoModelForCausalLM = require("transformers", ORACLE).AutoModelForCausalLM

    cfg = ModelConfig.preset("tiny", **overrides)
    hf = _hf_model(cfg, seed=len(overrides))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    x = torch.randint(0, cfg.vocab_size, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        for impl in ("auto", "dense"):
            assert (ours(x, impl=impl).logits - ref).abs().max().item() <= 1e-5, impl
    # and back: our save_hf loads in transformers with the same logits
    save_hf(ours, tmp_path / "ours")
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (hf2(x).logits - ours(x).logits).abs().max().item() <= 1e-5


def test_our_checkpoint_roundtrip_keeps_mtp_and_bias(tmp_path):
    cfg = ModelConfig.preset("tiny", vocab_size=128)
    torch.manual_seed(0)
    m = GLM5(cfg)
    m.layers[1].mlp.gate.e_score_correction_bias.normal_()
    save_hf(m, tmp_path / "c")
    m2 = load_hf(tmp_path / "c")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GLM5(ModelConfig.preset("tiny", vocab_size=256, **kw)).eval()


@pytest.mark.parametrize("impl", ["auto", "dense"])
def test_causality_changing_the_future_leaves_the_past(impl):
    model = _tiny(index_topk=6)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    t = 17
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 256, y[:, t + 1 :].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(x, impl=impl).logits, model(y, impl=impl).logits
    # equal up to float reassociation (the grouped MoE matmul sees other row counts)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() < 1e-5
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max().item() > 1e-2


@pytest.mark.parametrize("tie_break", ["topk", "stable"])
def test_topk_selection_never_contains_the_future(tie_break):
    """The model's own selection (`select`, the call every DSA path makes): each query picks the k best-scoring
    keys it can see, and a future key only as padding when fewer than k are visible (masked out afterwards)."""
    k, T = 6, 30
    model = _tiny(index_topk=k)
    cfg, attn = model.config, model.layers[0].self_attn
    x = torch.randn(2, T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T).expand(2, T)
    cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta)
    with torch.no_grad():
        _, _, ql, _, _ = attn.project(x, cos, sin)
        scores = attn.indexer.scores(x, attn.indexer.queries(ql, cos, sin), attn.indexer.keys(x, cos, sin))
    allowed = pos[:, None, :] <= pos[:, :, None]
    # the future must be able to win, or masking would not be tested: some future key outscores the past
    assert (scores.masked_fill(allowed, float("-inf")).amax(-1)[:, k:-1]
            > scores.masked_fill(~allowed, float("-inf")).kthvalue(T - k + 1, -1).values[:, k:-1]).any()
    top = attn.select(scores, allowed, tie_break)
    assert top.shape == (2, T, k)
    chosen = torch.zeros_like(allowed).scatter(-1, top, True)
    n_future = (chosen & ~allowed).sum(-1)
    assert torch.equal(n_future, (k - pos - 1).clamp(min=0))  # future keys only as padding of short rows
    assert torch.equal((chosen & allowed).sum(-1), (pos + 1).clamp(max=k))  # every row fills k with visible keys
    # ... the best visible ones: no unchosen visible key scores above a chosen one
    lo = scores.masked_fill(~(chosen & allowed), float("inf")).amin(-1)
    hi = scores.masked_fill(~(allowed & ~chosen), float("-inf")).amax(-1)
    assert (hi <= lo).all()


def test_sparse_gather_path_equals_dense_masked_path():
    model = _tiny(index_topk=7)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        g = model(x, impl="absorbed").logits
        d = model(x, impl="dense").logits
    assert (g - d).abs().max().item() < 1e-5
    # and DSA really is sparse here: dense attention gives different logits
    with torch.no_grad():
        full = model(x, sparse=False).logits
    assert (full - d).abs().max().item() > 1e-4


@pytest.mark.parametrize("impl", ["absorbed", "dense"])
def test_dsa_with_short_contexts_equals_dense_attention(impl):
    """index_topk = 20 < T = 50, so DSA selects (the gathered top-k path with impl="absorbed", the masked
    dense path with the selection's mask with impl="dense"); a query that sees at most k tokens selects all of
    them, so positions 0..k-1 equal full dense attention (sparse=False), and later positions do not."""
    k = 20
    model = _tiny(index_topk=k)
    x = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sparse, full = model(x, impl=impl).logits, model(x, sparse=False).logits
    assert (sparse[:, :k] - full[:, :k]).abs().max().item() < 1e-5
    assert (sparse[:, k:] - full[:, k:]).abs().amax(-1).min().item() > 1e-4  # every longer row is sparse


def test_grouped_moe_equals_per_expert_loop_forward_and_backward():
    model = _tiny()
    x = torch.randint(0, 256, (2, 24))
    grads = []
    for loop in (False, True):
        model.zero_grad()
        model.set_moe_loop(loop)
        out = model(x, targets=x)
        out.loss.backward()
        grads.append((out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = grads
    assert (la - lb).abs().max().item() < 1e-5
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert (a - b).abs().max().item() < 1e-5


def test_router_bias_update_moves_load_toward_balance():
    model = _tiny(seed=1)
    moe = model.layers[1].mlp
    with torch.no_grad():  # skew the router: expert 0 attracts everyone
        moe.gate.weight[0] += 0.5 * model.layers[1].post_attention_layernorm.weight.sign()
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))

    def imbalance():
        with torch.no_grad():
            load = model(x).expert_load
        return (load.max(-1).values / load.mean(-1)).max().item(), load

    before, load = imbalance()
    for _ in range(60):
        model.update_router_bias(load, gamma=0.01)
        after, load = imbalance()
    assert after < before * 0.7, (before, after)


def test_indexer_learns_only_from_its_kl_in_the_sparse_stage():
    model = _tiny(index_topk=6).train()
    x = torch.randint(0, 256, (2, 32))
    out = model(x, targets=x, sparse=True, indexer_kl=True)
    idx = {id(p) for p in model.indexer_parameters()}
    # LM (+MTP) loss: no gradient reaches the indexer (top-k is a selection, its input is detached)
    out.loss.backward(retain_graph=True)
    for n, p in model.named_parameters():
        if id(p) in idx:
            assert p.grad is None or p.grad.abs().max() == 0, n
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if id(p) not in idx)
    # the KL: gradient only on the indexer
    model.zero_grad(set_to_none=True)
    out.indexer_kl.backward()
    for n, p in model.named_parameters():
        if id(p) not in idx:
            assert p.grad is None or p.grad.abs().max() == 0, n
    names = [n for n, p in model.named_parameters() if id(p) in idx and p.grad is not None and p.grad.abs().max() > 0]
    for part in ("wq_b", "wk", "k_norm", "weights_proj"):
        assert any(part in n for n in names), part


def test_warmup_kl_falls_when_training_only_the_indexer():
    model = _tiny(seed=2, index_topk=6).train()
    x = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.indexer_parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        kl = model(x, sparse=False, indexer_kl=True).indexer_kl
        first = first if first is not None else kl.item()
        opt.zero_grad()
        kl.backward()
        opt.step()
    assert kl.item() < 0.5 * first


def test_outputs_loss_mtp_and_aux():
    model = _tiny()
    x = torch.randint(0, 256, (2, 20))
    out = model(x)
    assert out.logits.shape == (2, 20, 256) and out.loss is None
    out = model(x, targets=x, indexer_kl=True)
    assert out.mtp_loss is not None and torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    n_moe = model.config.n_moe_layers + model.config.num_nextn_predict_layers
    assert out.expert_load.shape == (n_moe, 8)
    assert out.expert_load[0].sum().item() == 2 * 20 * 2  # tokens × top-k
    assert out.indexer_kl.item() >= 0 and out.balance_loss.item() > 0
    no_mtp = GLM5(ModelConfig.preset("tiny", vocab_size=256, num_nextn_predict_layers=0))
    assert no_mtp(x, targets=x).mtp_loss is None


def test_glm5_744b_counts_on_the_meta_device():
    cfg = ModelConfig.preset("glm5_744b")
    with torch.device("meta"):
        model = GLM5(cfg)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    bias = sum(b.numel() for n, b in model.named_buffers() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.")) + \
        sum(b.numel() for n, b in model.named_buffers() if n.startswith("mtp."))
    assert params == 743_911_199_232
    assert params + bias == 743_911_218_432 == cfg.num_params()
    assert mtp == 9_952_920_576 == cfg.mtp_params_per_layer()


@pytest.mark.parametrize("overrides, field, hint", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok", "<= 8"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim", "even"),
    (dict(n_group=2, topk_group=3), "topk_group", "<= 2"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace", "at most 4"),
    (dict(n_group=3), "n_group", "divisor"),
    (dict(hidden_size=0), "hidden_size", ">= 1"),
    (dict(index_head_dim=8), "index_head_dim", ">= 16"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
])
def test_bad_configs_name_the_field_and_the_fix(overrides, field, hint):
    with pytest.raises(ValueError) as e:
        ModelConfig.preset("tiny", **overrides)
    assert field in str(e.value) and hint in str(e.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="glm5_744b"):
        ModelConfig.preset("huge")


def test_hf_config_dict_roundtrip():
    for name in ("tiny", "mini", "small", "glm5_744b"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    d = ModelConfig.preset("glm5_744b").to_hf_dict()
    assert d["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"} and d["head_dim"] == 64


def test_logits_at_equals_the_full_logits_there():
    """logits_at runs the final norm and head only at the asked positions (generation: each right-padded
    row's last real token); the values equal the full forward's at those positions (up to GEMM rounding)."""
    model = _tiny()
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x).logits
        last = torch.tensor([19, 4, 11])
        assert torch.allclose(model(x, logits_at=last).logits, full[torch.arange(3), last], atol=1e-5)
        some = torch.tensor([[0, 7], [3, 3], [19, 1]])
        assert torch.allclose(model(x, logits_at=some).logits, full[torch.arange(3)[:, None], some], atol=1e-5)
    with pytest.raises(ValueError, match="logits_at"):
        model(x, targets=x, logits_at=last)


def test_position_beyond_the_context_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 1, 2, 5000]]))


def test_chunked_sparse_path_equals_one_block_forward_and_backward():
    model = _tiny(index_topk=6).train()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    results = []
    for chunk in (1024, 7):  # 7 does not divide 40: a ragged last chunk
        for m in model.modules():
            if hasattr(m, "query_chunk"):
                m.query_chunk = chunk
        model.zero_grad(set_to_none=True)
        out = model(x, targets=x, impl="absorbed", indexer_kl=True)
        (out.loss + out.indexer_kl).backward()
        results.append((out.logits.detach(), out.indexer_kl.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (la, ka, ga), (lb, kb, gb) = results
    assert (la - lb).abs().max().item() < 1e-5 and abs(ka.item() - kb.item()) < 1e-6
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] - gb[n]).abs().max().item() < 1e-5, n


@pytest.mark.slow
def test_sparse_decode_equals_recompute_at_long_context():
    """At ~2K tokens DSA runs its long-context paths: the recompute gathers the top-k latents (impl auto, S > 1024
    keys) in query chunks, the engine decodes from the compressed cache; greedy tokens agree."""
    from nanoglm5.engine import Engine, SamplingParams

    torch.manual_seed(0)
    m = GLM5(ModelConfig.preset("tiny", vocab_size=256, index_topk=16, index_n_heads=16,
                                max_position_embeddings=2112)).eval()
    with torch.no_grad():  # peaked logits, so argmax is far from float-rounding ties (as tests/test_engine.py)
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)
    prompt = torch.randint(0, 256, (2040,), generator=torch.Generator().manual_seed(1)).tolist()
    assert 2040 > m.layers[0].self_attn.gather_min_keys and 2040 > m.layers[0].self_attn.query_chunk
    out = Engine(m, max_batch=1).generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(m(torch.tensor([ids]), tie_break="stable").logits[0, -1].argmax()))
    assert out == ids[len(prompt):]
