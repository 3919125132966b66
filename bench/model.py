"""Model benchmark: one run, a table of ratios measured side by side (section "model" of docs/benchmarks.md).

Measures, on this machine:
  1. the fp32 matmul rate (the MFU denominator);
  2. a fwd+bwd training step of our GLM5 vs transformers' GlmMoeDsaForCausalLM with the same weights
     (save_hf → from_pretrained), on `tiny` and `mini`; MFU = model FLOPs (scale.py) / time / matmul rate;
  3. one DSA attention layer, sparse (indexer + gathered top-k, k = 512) vs dense masked, at L = 1024/4096/8192
     (and L = 16384 forward only: dense's fwd+bwd there keeps 8 GiB of probabilities and their gradients, more
     than a 23 GB machine holds; its no-grad forward peaks at ~17 GB):
     forward time, fwd+bwd time, and memory = bytes of the tensors autograd saves for backward; for memory the
     sparse path (query chunks recomputed in backward) is also set against dense attention in the same chunks,
     each chunk's attention recomputed, and against fused causal SDPA: dense baselines that keep no L² probabilities;
  4. one MoE layer, grouped (torch._grouped_mm) vs the per-expert loop vs a dense SwiGLU MLP of equal active FLOPs.
Targets (issues 2 and 22): ≥3× faster than transformers per training step; DSA forward ≤ 1/3 the time of dense
at 8192 and 16384 keys, fwd+bwd ≤ 1/3 and saved-for-backward ≤ 1/4 of dense's at 8192; MoE ≤ 1.3× the dense MLP.
Run from the repo root: python -m bench.model [--quick]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from bench.report import machine, write_section
from nanoglm5 import scale
from nanoglm5.checkpoint import save_hf
from nanoglm5.config import ModelConfig
from nanoglm5.model import GLM5, MLP, MoE, rope_cos_sin
from nanoglm5.model import Attention as MLAttention


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over reps runs (after warmup runs)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def mem_available() -> int:
    """Bytes of memory the OS can hand out now (Linux MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


DENSE_16K_BYTES = 18 * 2**30  # dense attention's no-grad forward at 16384 keys peaked at 16.9 GB RSS (mini, B=1)


def matmul_rate(n: int = 1024, reps: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timeit(lambda: a @ b, reps, warmup=2)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (activation memory)."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# ---------------------------------------------------------------------------------------------- 1+2. vs transformers
def step_vs_hf(name: str, B: int, T: int, reps: int, rate: float) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig.preset(name, num_nextn_predict_layers=0)
    if T <= cfg.index_topk:
        raise ValueError(f"T={T} must exceed index_topk={cfg.index_topk} so DSA is really sparse")
    torch.manual_seed(0)
    ours = GLM5(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(x, y, sparse=True).loss.backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=x, labels=x).loss.backward()  # HF shifts labels inside: the same next-token CE

    def ours_masked_step():  # same selection, dense masked attention (what transformers' eager path computes)
        ours.zero_grad(set_to_none=True)
        ours(x, y, sparse=True, impl="dense").loss.backward()

    t_ours, t_hf, t_masked = timeit(ours_step, reps), timeit(hf_step, reps), timeit(ours_masked_step, reps)
    flops = scale.train_flops_per_token(cfg, T, sparse=True)["total"] * B * T
    return dict(name=name, B=B, T=T, ours=t_ours, hf=t_hf, masked=t_masked, speedup=t_hf / t_ours,
                speedup_masked=t_hf / t_masked, mfu=flops / t_ours / rate)


# ---------------------------------------------------------------------------------------------- 3. DSA one layer
def dense_chunked(attn, x, cos, sin, pos):
    """Dense masked attention in the sparse path's query chunks (attn.query_chunk), each chunk's attention recomputed
    in backward (activation checkpointing), so autograd keeps the chunk inputs (the projections, the (L, L) mask),
    not h·L² probabilities (the sparse path also recomputes its chunk's q projections and builds no L² mask). Built from the layer's own pieces (project, attend_dense, o_proj): the same numbers as
    impl="dense"."""
    q_nope, q_rot, _, c_kv, k_rot = attn.project(x, cos, sin)
    allowed = pos[:, None, :] <= pos[:, :, None]
    T, C = x.shape[1], attn.query_chunk

    def block(qn, qr, ckv, kr, mask):
        return attn.attend_dense(qn, qr, ckv, kr, mask)[0]

    outs = []
    for i in range(0, T, C):
        args = (q_nope[:, :, i : i + C], q_rot[:, :, i : i + C], c_kv, k_rot, allowed[:, i : i + C])
        outs.append(torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else block(*args))
    return attn.o_proj(torch.cat(outs, dim=1))


def dense_sdpa(attn, x, cos, sin, pos):
    """Dense causal attention through torch's fused scaled_dot_product_attention (a flash-style kernel that
    keeps no L² probabilities for backward): the dense baseline a practitioner would use."""
    q_nope, q_rot, _, c_kv, k_rot = attn.project(x, cos, sin)
    B, S, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(B, S, attn.n_heads, attn.dn + attn.dv).transpose(1, 2)
    k_nope, v = kv.split([attn.dn, attn.dv], dim=-1)
    k = torch.cat([k_nope, k_rot[:, None].expand(-1, attn.n_heads, -1, -1)], dim=-1)
    q = torch.cat([q_nope, q_rot], dim=-1)
    # the fused kernels need one head dim for q, k and v: zero-pad v (dn + dr > dv in MLA) and drop the pad after
    v = torch.nn.functional.pad(v, (0, q.shape[-1] - attn.dv))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)[..., : attn.dv]
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, attn.n_heads * attn.dv))


def dsa_layer(L: int, k: int, bwd: bool, reps: int) -> dict:
    cfg = ModelConfig.preset("mini", index_topk=k, max_position_embeddings=max(L, 2048))
    torch.manual_seed(0)
    attn = GLM5(cfg.replace(num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)).layers[0].self_attn
    assert isinstance(attn, MLAttention)
    x = torch.randn(1, L, cfg.hidden_size, requires_grad=bwd)
    pos = torch.arange(L)[None]
    cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta)
    res = {}
    # sparse: the model's gathered path (chunks of attn.query_chunk queries, checkpointed in backward);
    # dense: the masked expanded-MHA path, which keeps its (B, h, L, L) probabilities for backward;
    # dense_ckpt / sdpa (fwd+bwd only): dense attention without L² saved, to isolate what sparsity saves
    modes = [("sparse", lambda: attn(x, cos, sin, pos, sparse=True, impl="absorbed")[0]),
             ("dense", lambda: attn(x, cos, sin, pos, sparse=False, impl="dense")[0])]
    if bwd:
        modes += [("dense_ckpt", lambda: dense_chunked(attn, x, cos, sin, pos)),
                  ("sdpa", lambda: dense_sdpa(attn, x, cos, sin, pos))]
        with torch.no_grad():  # the two extra baselines compute the dense path's numbers
            ref = modes[1][1]()
            for mode, f in modes[2:]:
                assert (f() - ref).abs().max().item() < 1e-4, mode
            del ref
    for mode, fwd in modes:
        if bwd:
            def run(fwd=fwd):
                x.grad = None
                attn.zero_grad(set_to_none=True)
                fwd().sum().backward()
            mem, _ = saved_bytes(fwd)
        else:
            def run(fwd=fwd):
                with torch.no_grad():
                    fwd()
            mem = None
        res[mode] = dict(time=timeit(run, reps), mem=mem)
    return res


# ---------------------------------------------------------------------------------------------- 4. MoE one layer
def moe_layer(N: int, reps: int) -> dict:
    cfg = ModelConfig.preset("mini")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = MLP(cfg.hidden_size, (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size)
    x = torch.randn(1, N, cfg.hidden_size, requires_grad=True)
    g = torch.randn(1, N, cfg.hidden_size)  # a real incoming gradient (grouped_mm rejects stride-0 ones)

    def run(m, loop=None):
        def f():
            x.grad = None
            m.zero_grad(set_to_none=True)
            if loop is not None:
                m.use_loop = loop
            out = m(x)
            (out[0] if isinstance(out, tuple) else out).backward(g)
        return f

    return dict(grouped=timeit(run(moe, False), reps), loop=timeit(run(moe, True), reps), dense=timeit(run(dense), reps))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no fwd+bwd at L=8192, no L=16384 (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else 3
    t0 = time.time()
    load = os.getloadavg()[0]
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s (1024², median)")

    steps = [step_vs_hf("tiny", 4, 128, reps, rate), step_vs_hf("mini", 2, 256, reps, rate)]
    for s in steps:
        print(f"{s['name']}: ours {s['ours'] * 1e3:.0f} ms, transformers {s['hf'] * 1e3:.0f} ms → {s['speedup']:.2f}×, MFU {s['mfu']:.1%}")

    dsa = {}
    for L in (1024, 4096, 8192) + (() if args.quick else (16384,)):
        if L == 16384 and mem_available() < DENSE_16K_BYTES:
            print(f"DSA L=16384 skipped: dense attention needs ~17 GB, {mem_available() / 2**30:.1f} GiB available")
            continue
        fwd = dsa_layer(L, 512, bwd=False, reps=reps)
        bwd = L < 8192 or (L == 8192 and not args.quick)  # 16384: forward only (see the docstring)
        both = dsa_layer(L, 512, bwd=True, reps=max(1, reps - 1)) if bwd else None
        dsa[L] = (fwd, both)
        line = f"DSA L={L}: fwd sparse {fwd['sparse']['time'] * 1e3:.0f} ms vs dense {fwd['dense']['time'] * 1e3:.0f} ms"
        if both:
            line += (f"; fwd+bwd {both['sparse']['time'] * 1e3:.0f} vs {both['dense']['time'] * 1e3:.0f} ms; saved "
                     f"{both['sparse']['mem'] / 2**20:.0f} vs {both['dense']['mem'] / 2**20:.0f} MiB")
        print(line)

    moe = moe_layer(4096, reps)
    print(f"MoE N=4096: grouped {moe['grouped'] * 1e3:.0f} ms, loop {moe['loop'] * 1e3:.0f} ms, dense MLP {moe['dense'] * 1e3:.0f} ms")
    elapsed = time.time() - t0
    md = render(rate, steps, dsa, moe, load, elapsed)
    print(md)
    if not args.no_write:
        write_section("model", md)


WHY = """Reading the table (each ratio is ours / baseline from the same run; the memory column is exact):
- **vs transformers**: at these widths both models run the same matmuls; what differs is elementwise and dispatch
  overhead (RoPE, routing, masks), so the ratio stays near 1× on a CPU. Below 2048 keys our `impl="auto"` applies the
  DSA selection as a mask on dense attention (the `impl="dense"` row), as transformers does.
- **DSA**: sparse = the model's gathered path (`impl="absorbed"`, nanoglm5/dsa.py): the lightning indexer scores
  each query's causal keys (O(L²/2) with few heads) 64 queries at a time, fused with their top-k, then each query
  attends to its top-k latents (one row of [c_kv; k_rot] per key, shared by the heads); dense's time grows with h·L²
  softmax and masking, which is why the ratio falls with L. Queries run in chunks of 1024, each recomputed in
  backward from the block input to o_proj (its q projections, selection, attention): autograd keeps x and the
  per-token key latents. Dense with "the same per-chunk recomputation" keeps the chunk inputs: the q/kv
  projections' activations and the (L, L) boolean causal mask (64 MiB at 8192), which the sparse path never builds
  (its mask is (chunk, k), from positions); that mask and the projections, not the sparsity itself, are what the
  ≤ 0.25 row is made of: a dense layer recomputed to the same extent would keep about as few bytes (O(L)), as
  fused causal SDPA, the last row, does. What the sparsity itself buys is the time.
- **MoE**: `torch._grouped_mm` itself runs as fast as one dense matmul of the same FLOPs (docs/LOG.md); the layer
  pays for the routing around it (fp32 sigmoid, argsort, gathers, `index_add`, balance statistics) and its backward.
  The grouped path beats the per-expert loop."""


def _ok(c: bool) -> str:
    return "**met**" if c else "**not met**"


def render(rate, steps, dsa, moe, load, elapsed) -> str:
    rows = ["| measurement | ours | baseline | ratio | target |", "|---|---|---|---|---|"]
    for s in steps:
        rows.append(f"| train step fwd+bwd, `{s['name']}` B={s['B']} T={s['T']} (MFU {s['mfu']:.1%}) | {s['ours'] * 1e3:.0f} ms "
                    f"| transformers {s['hf'] * 1e3:.0f} ms | {s['speedup']:.2f}× faster | ≥3× faster: {_ok(s['speedup'] >= 3)} |")
        rows.append(f"| ↳ ours with `impl=\"dense\"` (masked, as transformers) | {s['masked'] * 1e3:.0f} ms "
                    f"| transformers {s['hf'] * 1e3:.0f} ms | {s['speedup_masked']:.2f}× faster | |")
    for L, (fwd, both) in dsa.items():
        r = fwd["sparse"]["time"] / fwd["dense"]["time"]
        tgt = f"≤ 0.33: {_ok(r <= 1 / 3)}" if L >= 8192 else ""
        rows.append(f"| DSA layer fwd, L={L}, k=512 | {fwd['sparse']['time'] * 1e3:.0f} ms | dense {fwd['dense']['time'] * 1e3:.0f} ms "
                    f"| {r:.2f} | {tgt} |")
        if both:
            r = both["sparse"]["time"] / both["dense"]["time"]
            m = both["sparse"]["mem"] / both["dense"]["mem"]
            rows.append(f"| DSA layer fwd+bwd, L={L} | {both['sparse']['time'] * 1e3:.0f} ms | dense {both['dense']['time'] * 1e3:.0f} ms "
                        f"| {r:.2f} | {'≤ 0.33: ' + _ok(r <= 1 / 3) if L == 8192 else ''} |")
            sp = both["sparse"]["mem"] / 2**20
            rows.append(f"| DSA layer saved-for-backward, L={L}, vs dense keeping its h·L² probabilities | {sp:.0f} MiB "
                        f"| dense {both['dense']['mem'] / 2**20:.0f} MiB | {m:.2f} | |")
            m = both["sparse"]["mem"] / both["dense_ckpt"]["mem"]
            rows.append(f"| ↳ vs dense with the same query chunks recomputed (attention only) | {sp:.0f} MiB "
                        f"| dense, chunks recomputed {both['dense_ckpt']['mem'] / 2**20:.0f} MiB "
                        f"(fwd+bwd {both['dense_ckpt']['time'] * 1e3:.0f} ms) | {m:.2f} "
                        f"| {'≤ 0.25: ' + _ok(m <= 0.25) if L == 8192 else ''} |")
            rows.append(f"| ↳ vs dense fused causal SDPA | {sp:.0f} MiB | SDPA {both['sdpa']['mem'] / 2**20:.0f} MiB "
                        f"(fwd+bwd {both['sdpa']['time'] * 1e3:.0f} ms) | {both['sparse']['mem'] / both['sdpa']['mem']:.2f} | |")
    r = moe["grouped"] / moe["dense"]
    rows.append(f"| MoE layer fwd+bwd, `mini`, 4096 tokens, grouped | {moe['grouped'] * 1e3:.0f} ms | dense MLP "
                f"{moe['dense'] * 1e3:.0f} ms | {r:.2f} | ≤ 1.3: {_ok(r <= 1.3)} |")
    rows.append(f"| MoE layer, per-expert loop | {moe['loop'] * 1e3:.0f} ms | grouped {moe['grouped'] * 1e3:.0f} ms "
                f"| {moe['loop'] / moe['grouped']:.2f} | |")
    return "\n".join([
        "## Model (`python -m bench.model`)",
        "",
        f"Machine: {machine()}; 1-min load average at start {load:.1f} (the machine is shared: absolute times are noisy, "
        f"ratios are taken side by side). fp32 matmul rate measured in this run: **{rate / 1e9:.1f} GFLOP/s** "
        f"(1024×1024, median). Total run time {elapsed:.0f} s.",
        "",
        *rows,
        "",
        "How it was measured (medians of a few repeats after a warm-up):",
        "- **vs transformers**: the same weights through `save_hf` → `from_pretrained`; MTP off "
        "(`num_nextn_predict_layers=0`), ours with `sparse=True` and `index_topk` < T, no indexer KL, because transformers "
        "runs its indexer under `no_grad` and has no MTP: both do the same work. MFU = scale.py's training FLOPs "
        "(6·active matmul weights + DSA attention) / step time / the matmul rate above.",
        "- **DSA**: one MLA layer of `mini` (8 heads, kv_lora 64) with `index_topk=512`, B=1; sparse = indexer scores over "
        "each query's causal keys + top-k + gathered absorbed attention (1024-query chunks, recomputed in backward); "
        "dense = the masked expanded-MHA path; "
        "for memory also dense with the same 1024-query chunks, each chunk's attention checkpointed, and "
        "`scaled_dot_product_attention(is_causal=True)`, both checked equal to the dense path. Memory = bytes of the distinct "
        "storages autograd saves for backward (torch's CPU allocator exposes no peak counter; tracemalloc cannot see it).",
        "- **MoE**: one `mini` MoE layer (16 experts, top-4 + 1 shared, I=128) vs a SwiGLU MLP of width (4+1)·128, the same "
        "active FLOPs (router excluded), fwd+bwd with a random incoming gradient.",
        "",
        WHY,
    ])


if __name__ == "__main__":
    main()
