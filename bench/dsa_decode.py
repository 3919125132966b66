"""DSA's decode cost against context length, on CPU: one decode step of one MLA layer over N cached tokens.

    python -m bench.dsa_decode                     # mini's layer, N = 1K, 4K, 16K, 64K; writes docs/benchmarks.md
    python -m bench.dsa_decode --preset tiny --contexts 1024 4096 --no-write

Dense = the absorbed MLA attention over all N cached latents (what decode does without DSA). DSA (arXiv
2602.15763 §2.1; DeepSeek-V3.2 §2.1) = the lightning indexer's scan of all N indexer keys + top-k, then the same
absorbed attention over the k selected latents only. The two DSA parts are timed apart: the attention part must stay
flat as N grows, the indexer's O(N) scan grows, with few heads and a small head dimension, far more slowly than
dense attention.
"""

import argparse
import os
import time

import torch

from bench.model import timeit
from bench.report import machine, write_section
from nanoglm5.config import ModelConfig
from nanoglm5.model import Attention, rope_cos_sin


@torch.no_grad()
def decode_step_costs(cfg: ModelConfig, N: int, reps: int) -> dict:
    """ms of one query over N cached tokens: dense attention, DSA's indexer (scan + top-k), DSA's attention."""
    g = torch.Generator().manual_seed(0)
    att = Attention(cfg, layer_idx=0).eval()
    x = torch.randn(1, 1, cfg.hidden_size, generator=g)
    c_kv = torch.randn(1, N, cfg.kv_lora_rank, generator=g)
    k_rot = torch.randn(1, N, cfg.qk_rope_head_dim, generator=g)
    index_k = torch.randn(1, N, cfg.index_head_dim, generator=g)
    cos, sin = rope_cos_sin(torch.tensor([[N]]), cfg.qk_rope_head_dim, cfg.rope_theta)
    q_nope, q_rot, q_latent, _, _ = att.project(x, cos, sin)
    allowed = torch.ones(1, 1, N, dtype=torch.bool)

    def dense():
        return att.attend_absorbed(q_nope, q_rot, c_kv, k_rot, allowed)[0]

    def indexer():
        s = att.indexer.scores(x, att.indexer.queries(q_latent, cos, sin), index_k)
        return att.select(s, allowed)

    topk = indexer()

    def sparse_attention():
        return att.attend_absorbed(q_nope, q_rot, c_kv, k_rot, allowed, topk)[0]

    # the sparse output over k keys equals dense attention over the same k keys: the timed path computes attention
    sel = torch.zeros_like(allowed).scatter(-1, topk, True)
    assert torch.allclose(sparse_attention(), att.attend_absorbed(q_nope, q_rot, c_kv, k_rot, sel)[0], atol=1e-5)
    ms = lambda f: 1e3 * timeit(f, reps)  # noqa: E731
    d, i, a = ms(dense), ms(indexer), ms(sparse_attention)
    return {"N": N, "dense_ms": d, "indexer_ms": i, "dsa_attention_ms": a, "dsa_ms": i + a, "ratio": (i + a) / d}


def render(preset: str, cfg: ModelConfig, rows: list[dict], elapsed: float, load: str = "not recorded") -> str:
    lines = [f"## DSA decode cost by context length (`python -m bench.dsa_decode --preset {preset}`)", "",
             f"Machine: {machine()}. One decode step (one query) of one MLA layer of `{preset}` "
             f"({cfg.num_attention_heads} heads, kv_lora {cfg.kv_lora_rank}, indexer {cfg.index_n_heads} heads × "
             f"{cfg.index_head_dim}, index_topk {cfg.index_topk}) over N cached tokens, fp32, medians of repeats "
             f"after a warm-up; total {elapsed:.0f} s. Load: {load}.", "",
             "| cached tokens N | dense attention | DSA: indexer scan + top-k | DSA: attention over top-k | "
             "DSA total | DSA / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']:,} | {r['dense_ms']:.3f} ms | {r['indexer_ms']:.3f} ms | "
                     f"{r['dsa_attention_ms']:.3f} ms | {r['dsa_ms']:.3f} ms | {r['ratio']:.2f} |")
    first, last = rows[0], rows[-1]
    grow = lambda k: last[k] / max(first[k], 1e-9)  # noqa: E731
    lines += ["", f"From {first['N']:,} to {last['N']:,} cached tokens ({last['N'] / first['N']:.0f}× more), dense "
              f"attention grew {grow('dense_ms'):.1f}×, DSA's attention over the top-k {grow('dsa_attention_ms'):.1f}× "
              f"and the indexer's scan {grow('indexer_ms'):.1f}×. Below index_topk keys DSA selects every key and "
              "only adds the indexer; the model then skips the selection altogether (`Attention.forward`)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini", help="ModelConfig preset whose attention layer is timed")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    a = ap.parse_args(argv)
    cfg = ModelConfig.preset(a.preset)
    t0, cpu0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
    rows = [decode_step_costs(cfg, n, a.reps) for n in a.contexts]
    elapsed = time.time() - t0
    # a loaded host preempts the timed steps: the CPU share says how far the medians can be trusted
    load = (f"1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
            f"{os.cpu_count()} cores; this process ran on a CPU {100 * (time.process_time() - cpu0) / elapsed:.0f}% "
            "of its wall time (a quiet machine: ~100% per thread)")
    md = render(a.preset, cfg, rows, elapsed, load)
    print(md)
    if not a.no_write:
        write_section("dsa_decode", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
