"""bench/dsa_decode.py: the timed DSA path computes attention over exactly the indexer's top-k, and the table has a
row per context length with the parts timed apart."""

from bench.dsa_decode import decode_step_costs, render
from nanoglm5.config import ModelConfig


def test_decode_costs_time_each_part_and_render_a_row_per_context():
    cfg = ModelConfig.preset("tiny")
    rows = [decode_step_costs(cfg, n, reps=2) for n in (64, 256)]  # asserts sparse = dense over the same keys
    for r in rows:
        assert min(r["dense_ms"], r["indexer_ms"], r["dsa_attention_ms"]) > 0
        assert abs(r["dsa_ms"] - r["indexer_ms"] - r["dsa_attention_ms"]) < 1e-9
    md = render("tiny", cfg, rows, 1.0)
    assert "| 64 |" in md and "| 256 |" in md and "index_topk 32" in md
