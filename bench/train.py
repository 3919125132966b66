"""Training throughput: tokens/s and MFU of the MoE presets against dense models of equal active parameters.

    python -m bench.train                     # tiny and mini, writes the "train" section of docs/benchmarks.md
    python -m bench.train --presets tiny --steps 5

For each preset, the same training step as train.py (Trainer.train_step: forward, backward, AdamW,
router-bias update; sparse DSA stage) runs on random tokens, against a dense twin: every layer a
SwiGLU MLP of width (top-k + shared)·moe_intermediate_size, so active parameters per token match.
MFU = achieved model FLOPs / the fp32 matmul rate of this machine, measured in the same run
(a 1024² matmul). Model FLOPs/token = 6·(active params without the embedding lookup)
+ 12·layers·heads·(qk_head_dim + v_head_dim)/2·keys, keys = min(index_topk, T/2) under DSA, T/2 dense.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import machine, write_section  # noqa: E402
from nanoglm5.config import ModelConfig  # noqa: E402
from nanoglm5.training.loop import Trainer  # noqa: E402
from nanoglm5.training.train_config import TrainConfig  # noqa: E402


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(mc: ModelConfig, seq_len: int, sparse: bool) -> float:
    dense_attn_keys = seq_len / 2
    keys = min(mc.index_topk, dense_attn_keys) if sparse else dense_attn_keys
    attn = 12 * mc.num_hidden_layers * mc.num_attention_heads * (mc.qk_head_dim + mc.v_head_dim) / 2 * keys
    return 6 * mc.num_active_params(include_embedding=False) + attn


def dense_twin(mc: ModelConfig) -> dict:
    width = (mc.num_experts_per_tok + mc.n_shared_experts) * mc.moe_intermediate_size
    return {"first_k_dense_replace": mc.num_hidden_layers, "intermediate_size": width}


def measure(preset: str, overrides: dict, data_dir: str, args) -> dict:
    cfg = TrainConfig(preset=preset, model=overrides, data_dir=data_dir, out_dir=tempfile.mkdtemp(),
                      seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                      max_steps=10**6, dense_steps=0, dsa_warmup_steps=0, sample_tokens=0)
    tr = Trainer(cfg, quiet=True)
    for s in range(args.warmup):
        tr.train_step(s)
    t, c = time.perf_counter(), time.process_time()
    for s in range(args.steps):
        tr.train_step(args.warmup + s)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tokens = args.steps * args.batch_size * args.seq_len
    mc = tr.model_config
    return {"preset": preset, "kind": "dense twin" if overrides else "MoE", "params": mc.num_params(),
            "active": mc.num_active_params(), "tok_s": tokens / wall, "cpu_s_per_step": cpu / args.steps,
            "flops_tok": flops_per_token(mc, args.seq_len, sparse=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "mini"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)

    peak = matmul_flops()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset in args.presets:
            vocab = ModelConfig.preset(preset).vocab_size
            (Path(d) / "tokens").mkdir(exist_ok=True)
            toks = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.uint16)
            toks.tofile(Path(d) / "tokens" / "train.bin")
            toks[:20_000].tofile(Path(d) / "tokens" / "val.bin")
            (Path(d) / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab}))
            moe = measure(preset, {}, d, args)
            dense = measure(preset, dense_twin(ModelConfig.preset(preset)), d, args)
            for r in (moe, dense):
                r["mfu"] = r["tok_s"] * r["flops_tok"] / peak
                r["vs_dense"] = r["tok_s"] / dense["tok_s"]
                rows.append(r)
                print(json.dumps(r))
    peak_after = matmul_flops()
    md = [f"`python -m bench.train` — {machine()}; seq {args.seq_len} × batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, sparse DSA stage, AdamW, fp32.",
          f"Measured fp32 matmul rate (1024²): {peak / 1e9:.1f} GFLOP/s at start, {peak_after / 1e9:.1f} at end.", "",
          "| preset | model | params | active/token | tokens/s | × dense twin | FLOPs/token | MFU |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['preset']} | {r['kind']} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                  f"{r['tok_s']:,.0f} | {r['vs_dense']:.2f} | {r['flops_tok'] / 1e6:.1f}M | {100 * r['mfu']:.1f}% |")
    md += ["", "The dense twin has every layer dense with width (top-k + shared)·moe_intermediate_size, so the same "
           "active parameters per token; the MoE pays for routing, sorting and the grouped matmul of small experts, "
           "which is why it trails its twin at this size. Low MFU is expected at these widths (128–256): "
           "per-op overhead dominates matmuls this small. Wall-clock figures on a shared machine vary with load."]
    print("\n".join(md))
    if not args.no_write:
        write_section("train", "\n".join(md))


if __name__ == "__main__":
    main()
