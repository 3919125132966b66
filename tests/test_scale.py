"""scale.py: analytic counts == meta-device numel for every preset, the GLM-5 numbers (parameters, KV cache),
and the CLI (notebooks 00_scale and 02_model run in tests/test_notebooks.py)."""

from pathlib import Path

import pytest

from nanoglm5 import scale
from nanoglm5.config import PRESETS, ModelConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_count_equals_analytic(name):
    import time

    cfg = ModelConfig.preset(name)
    t = time.perf_counter()
    assert scale.meta_count(cfg) == scale.param_counts(cfg)
    assert time.perf_counter() - t < 120  # "seconds" (~1 s unloaded, even for 744B); a loose bound, not a benchmark


def test_meta_count_variants():
    # tied head, no MTP, no shared expert, all-dense, grouped routing, attention bias: still exact
    for over in [dict(tie_word_embeddings=True), dict(num_nextn_predict_layers=0), dict(n_shared_experts=0),
                 dict(first_k_dense_replace=4), dict(n_group=2, topk_group=1), dict(attention_bias=True),
                 dict(num_nextn_predict_layers=2)]:
        cfg = ModelConfig.preset("tiny", **over)
        assert scale.meta_count(cfg) == scale.param_counts(cfg), over


def test_glm5_744b_numbers():
    cfg = ModelConfig.preset("glm5_744b")
    p = scale.param_counts(cfg)
    assert p["total"] == 743_911_218_432
    assert p["total_without_router_bias"] == 743_911_199_232
    assert p["mtp"] == 9_952_920_576
    assert p["total_with_mtp"] == 743_911_218_432 + 9_952_920_576
    assert scale.active_params(cfg) == 41_784_728_832
    assert scale.active_params(cfg, include_embedding=False, include_head=False) == 39_881_563_392
    kv = scale.kv_cache_bytes(cfg, 1)
    assert kv["compressed"] == 109_824 and kv["mla"] == 89_856 and kv["expanded"] == 5_111_808
    assert scale.kv_cache_bytes(cfg, 200_000)["compressed"] == 21_964_800_000  # 21.96 GB
    # with the MTP layer cached too: 79 layers × 1408 B
    assert scale.kv_cache_bytes(cfg.replace(num_hidden_layers=79, first_k_dense_replace=3), 1)["compressed"] == 111_232


def test_flops_and_dsa_formulas():
    cfg = ModelConfig.preset("glm5_744b")
    h, n = 64, 10_000
    assert scale.attention_flops(cfg, n, "dense") == 2 * h * n * (256 + 256)
    assert scale.attention_flops(cfg, n, "absorbed") == 2 * h * n * (2 * 512 + 64)
    assert scale.attention_flops(cfg, n, "indexer") == 2 * 32 * n * 129
    # below index_topk DSA attends every key: the main part equals the absorbed dense cost
    d = scale.dsa_cost(cfg, 1000)
    assert d["dsa_main"] == d["dense_absorbed"]
    # at 128K, DSA is several times cheaper than dense attention; the matmul part does not depend on it
    d = scale.dsa_cost(cfg, 131_072)
    assert d["ratio_prefill"] < 0.2 and d["ratio_decode"] < 0.1
    f_s, f_d = scale.train_flops_per_token(cfg, 131_072, True), scale.train_flops_per_token(cfg, 131_072, False)
    assert f_s["matmul"] == f_d["matmul"] == 6 * scale.matmul_params(cfg)
    assert f_s["total"] < f_d["total"]
    assert scale.mean_keys(4, None) == 2.5 and scale.mean_keys(4, 2) == (1 + 2 + 2 + 2) / 4
    with pytest.raises(ValueError, match="form="):
        scale.attention_flops(cfg, 1, "flash")


def test_memory():
    cfg = ModelConfig.preset("glm5_744b")
    n = 743_911_218_432
    assert scale.weight_bytes(cfg, "bf16") == 2 * n and scale.weight_bytes(cfg, "fp32") == 4 * n
    experts = 75 * 256 * 3 * 6144 * 2048
    assert scale.weight_bytes(cfg, "int4", group_size=128) == experts * 4.125 / 8 + 2 * (n - experts)
    a = scale.adam_bytes(cfg)
    assert a["states"] == 12 * (743_911_199_232 + 9_952_920_576 - 256)  # MTP's router bias is a buffer too
    with pytest.raises(ValueError, match="dtype="):
        scale.weight_bytes(cfg, "fp8")


def test_plan_and_layout_errors():
    cfg = ModelConfig.preset("glm5_744b")
    p = scale.plan(cfg, scale.Layout())
    assert p["world"] == 128 and p["experts_per_gpu"] == 8
    assert sum(s["layers"] for s in p["stages"]) == 79  # 78 + the MTP layer
    assert p["worst"]["total"] > p["worst"]["optimizer"] > 0
    with pytest.raises(ValueError, match="Layout.ep=3"):
        scale.plan(cfg, scale.Layout(ep=3))
    with pytest.raises(ValueError, match="Layout.pp=100"):
        scale.plan(cfg, scale.Layout(pp=100))


def test_report_counts_the_parameters_a_built_model_has():
    """report's totals against an independent count: numel over a real GLM5(tiny)'s parameters, plus the router
    bias, a buffer the HF convention counts; "total" leaves out the MTP layer (its parameters under mtp.)."""
    from nanoglm5.model import GLM5

    cfg = ModelConfig.preset("tiny")
    model = GLM5(cfg)
    n = {"main": 0, "mtp": 0, "bias_main": 0, "bias_mtp": 0}
    for name, t in model.named_parameters():
        n["mtp" if name.startswith("mtp.") else "main"] += t.numel()
    for name, t in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            n["bias_mtp" if name.startswith("mtp.") else "bias_main"] += t.numel()
    p = scale.report(cfg, 256)["params"]
    assert p["total"] == n["main"] + n["bias_main"] and n["bias_main"] == 3 * cfg.n_routed_experts  # 3 MoE layers
    assert p["total_without_router_bias"] == n["main"]
    assert p["mtp"] == n["mtp"] + n["bias_mtp"]
    assert p["total_with_mtp"] == sum(n.values())


def test_report_and_cli(capsys):
    with pytest.raises(ValueError, match="context=0"):
        scale.report(ModelConfig.preset("tiny"), 0)
    scale.main(["glm5_744b", "--context", "131072"])
    out = capsys.readouterr().out
    assert "743,911,218,432" in out and "109,824 B" in out and "5,111,808 B" in out and "fits" in out
    scale.main(["tiny", "--context", "256", "--meta"])
    assert "== analytic" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scale.main(["glm5_744b", "--ep", "3"])


def test_dsa_decode_reads_fewer_kv_bytes_but_stores_more():
    cfg = ModelConfig.preset("glm5_744b")
    d = scale.dsa_cost(cfg, 200_000)
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 512 + 64: what dense MLA decode reads for every cached token
    assert d["kv_read_values_dense"] == 200_000 * 576
    assert d["kv_read_values_dsa"] == 200_000 * 128 + 2048 * 576  # indexer keys of all tokens + top-2048 latents
    assert d["kv_read_ratio"] == pytest.approx((128 + 2048 * 576 / 200_000) / 576)
    assert d["kv_stored_ratio"] == pytest.approx((latent + 128) / latent) and d["kv_stored_ratio"] > 1
    short = scale.dsa_cost(cfg, 1024)  # below k every key is selected: DSA reads more than dense
    assert short["kv_read_ratio"] > 1


def test_readme_preset_table_is_the_one_config_py_gives(tmp_path):
    """README's preset sizes are written by `python -m nanoglm5.scale --write-readme` and equal what it writes now;
    the tiny row carries the count test_report_counts_the_parameters_a_built_model_has checks against the module."""
    text = (ROOT / "README.md").read_text()
    i, j = text.index(scale.PRESETS_BEGIN), text.index(scale.PRESETS_END) + len(scale.PRESETS_END)
    assert text[i:j] == scale.readme_presets(), "README's preset table is stale: python -m nanoglm5.scale --write-readme README.md"
    assert f"| `tiny` | {ModelConfig.preset('tiny').num_params():,} (2.12M) |" in text[i:j]
    stale = tmp_path / "README.md"
    stale.write_text(f"# intro\n{scale.PRESETS_BEGIN}\n| `tiny` | 2.5M |\n{scale.PRESETS_END}\nafter\n")
    scale.main(["--write-readme", str(stale)])
    assert stale.read_text() == f"# intro\n{scale.readme_presets()}\nafter\n"
    stale.write_text("# no block\n")
    with pytest.raises(SystemExit, match="no preset block"):
        scale.main(["--write-readme", str(stale)])


def test_dsa_saving_is_dense_over_dsa_and_grows_with_context():
    cfg = ModelConfig.preset("glm5_744b")
    s, d = scale.dsa_saving(cfg, 200_000), scale.dsa_cost(cfg, 200_000)
    assert s["attention_decode"] == pytest.approx(1 / d["ratio_decode"]) and s["kv_read_decode"] == pytest.approx(1 / d["kv_read_ratio"])
    dec = scale.decode_flops_per_token(cfg, 200_000, sparse=False)
    assert dec["total"] == 2 * scale.matmul_params(cfg) + cfg.num_hidden_layers * d["dense_absorbed"]
    assert 1 < s["train_step"] < s["attention_train_sequence"] and 1 < s["decode_step"] < s["attention_decode"]  # matmuls dilute
    assert s["kv_stored"] < 1  # the indexer key is stored beside the latent
    n = scale.context_for_saving(cfg, 2.0)
    assert scale.dsa_saving(cfg, n - 1)["train_step"] < 2.0 <= scale.dsa_saving(cfg, n)["train_step"]
    with pytest.raises(ValueError, match="never reaches"):
        scale.context_for_saving(cfg, 1e6)


def test_docs_dsa_saving_table_is_the_one_the_code_gives(tmp_path):
    text = (ROOT / "docs/scaling.md").read_text()
    i, j = text.index(scale.SAVING_BEGIN), text.index(scale.SAVING_END) + len(scale.SAVING_END)
    assert text[i:j] == scale.docs_dsa_saving(), "docs/scaling.md's table is stale: python -m nanoglm5.scale --write-docs docs/scaling.md"
    stale = tmp_path / "scaling.md"
    stale.write_text(f"intro\n{scale.SAVING_BEGIN}\nold\n{scale.SAVING_END}\nafter\n")
    scale.main(["--write-docs", str(stale)])
    assert stale.read_text() == f"intro\n{scale.docs_dsa_saving()}\nafter\n"
