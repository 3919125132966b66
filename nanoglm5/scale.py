"""Scale calculator: what any preset (tiny → glm5_744b) costs, counted exactly or estimated on paper.

Holds, for a ModelConfig (GLM-5 arXiv 2602.15763 §2; MLA's cache, DeepSeek-V2 §2.1; DSA costs, DeepSeek-V3.2 §2.1):
  - `meta_count(cfg)`: build GLM5 on the meta device (no memory, seconds even for 744B) and count numel;
    `param_counts(cfg)`: the same figures from config.py's analytic formulas (they must agree);
  - `active_params`, `matmul_params`: what one token touches (top-k + shared experts);
  - `attention_flops`, `train_flops_per_token(cfg, N)`: 6 · active matmul params + attention;
  - `dsa_cost(cfg, N)`: DSA (top-k main attention + O(N) indexer) against dense attention at context N;
    `decode_flops_per_token(cfg, N)`: one decode step of the whole model;
  - `weight_bytes` (fp32 / bf16 / int4 with group scales), `adam_bytes`, `kv_cache_bytes`;
  - `plan(cfg, Layout)`: "the 744B run on paper": memory per GPU under a TP/EP/PP/DP layout (an estimate);
  - `report(cfg, context) -> dict` with all of the above, and the CLI:
        python -m nanoglm5.scale glm5_744b --context 131072 [--tp 8 --pp 8 --ep 64 --dp 8 ...]
  - `readme_presets()`: README's table of preset sizes, counted from config.py (written by
        python -m nanoglm5.scale --write-readme README.md);
  - `dsa_saving(cfg, N)`: dense / DSA for every cost one might call "attention compute and memory" (FLOPs of
        prefill, training and decode, attention alone and the whole step, KV bytes read and stored), and
        `docs_dsa_saving()`, docs/scaling.md's table of them (python -m nanoglm5.scale --write-docs docs/scaling.md).

FLOP conventions (stated once, used everywhere): a multiply-add is 2 FLOPs; training = forward + backward
= 3 × forward, so a matmul weight costs 6 FLOPs per token; embedding lookups, norms and softmax are not
counted. Attention per query per layer over n keys, forward:
    dense (MHA form, expanded K/V: training and prefill)  2·h·n·(d_qk + d_v)
    absorbed (MQA form over latents: DSA kernels, decode) 2·h·n·(2·kv_lora + d_rope)
    lightning indexer over n keys                         2·H_I·n·(d_I + 1)
DSA: the main attention sees min(t, index_topk) keys (absorbed form), the indexer all t keys. A training
sequence of length N is causal, so per-token figures average over positions t = 1..N.
"""

import argparse
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from nanoglm5.config import PRESETS, ModelConfig
from nanoglm5.model import GLM5

GiB = 2**30


# ---------------------------------------------------------------------------------------------- parameter counts
def param_counts(cfg: ModelConfig) -> dict:
    """Exact parameter counts from config.py's formulas. The router bias
    (e_score_correction_bias) is a buffer in the model; `total` counts it as HF's 744B figure does."""
    return dict(
        total=cfg.num_params(),  # embedding + body + head, router bias included, no MTP
        total_without_router_bias=cfg.num_params(count_router_bias=False),
        mtp=cfg.num_nextn_predict_layers * cfg.mtp_params_per_layer(),
        total_with_mtp=cfg.num_params(include_mtp=True),
    )


def meta_count(cfg: ModelConfig) -> dict:
    """Build GLM5 on the meta device (shapes only, no memory) and count numel of the parameters plus
    the router-bias buffers. Same keys as `param_counts`; the tests check that both agree."""
    with torch.device("meta"):
        model = GLM5(cfg)
    params = dict(model.named_parameters())  # de-duplicates a tied embedding/head
    bias = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}

    def count(named, mtp):
        return sum(t.numel() for n, t in named.items() if n.startswith("mtp.") == mtp)

    main_p, main_b = count(params, False), count(bias, False)
    mtp = count(params, True) + count(bias, True)
    return dict(total=main_p + main_b, total_without_router_bias=main_p, mtp=mtp, total_with_mtp=main_p + main_b + mtp)


def _attn_matmul(cfg: ModelConfig) -> int:
    """Matmul weights of one attention block (MLA + indexer); norms and biases excluded."""
    H, h, ql, kvl = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    mla = H * ql + ql * h * cfg.qk_head_dim + H * (kvl + cfg.qk_rope_head_dim) + kvl * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + h * cfg.v_head_dim * H
    idx = ql * cfg.index_n_heads * cfg.index_head_dim + H * cfg.index_head_dim + H * cfg.index_n_heads
    return mla + idx


def active_params(cfg: ModelConfig, include_embedding: bool = True, include_head: bool = True) -> int:
    """Parameters one token touches: every dense part, the router, top-k routed + shared experts (no MTP)."""
    return cfg.num_active_params(include_embedding=include_embedding, include_head=include_head)


def matmul_params(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Active matmul weights per token (the 6·N of training FLOPs): no embedding lookup, no norms, no router
    bias; the head counts. With MTP, its layer, eh_proj and a second pass through the shared head."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    moe = _attn_matmul(cfg) + (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * H * I + E * H
    dense = _attn_matmul(cfg) + 3 * H * cfg.intermediate_size
    head = cfg.vocab_size * H
    n = cfg.first_k_dense_replace * dense + cfg.n_moe_layers * moe + head
    if include_mtp:
        n += cfg.num_nextn_predict_layers * (moe + 2 * H * H + head)
    return n


# ---------------------------------------------------------------------------------------------- FLOPs
def attention_flops(cfg: ModelConfig, n_keys: float, form: str) -> float:
    """Forward FLOPs of one query over n_keys keys in one layer (see the module docstring)."""
    h = cfg.num_attention_heads
    if form == "dense":
        return 2 * h * n_keys * (cfg.qk_head_dim + cfg.v_head_dim)
    if form == "absorbed":
        return 2 * h * n_keys * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if form == "indexer":
        return 2 * cfg.index_n_heads * n_keys * (cfg.index_head_dim + 1)
    raise ValueError(f"form={form!r}: use 'dense', 'absorbed' or 'indexer'")


def mean_keys(context: int, topk: int | None = None) -> float:
    """Keys a query sees, averaged over the causal positions t = 1..N: t, or min(t, k) under DSA."""
    N = context
    if topk is None or N <= topk:
        return (N + 1) / 2
    return (topk * (topk + 1) / 2 + (N - topk) * topk) / N


def train_flops_per_token(cfg: ModelConfig, context: int, sparse: bool = True, include_mtp: bool = False) -> dict:
    """Training FLOPs per token of a causal sequence of `context` tokens: 6·matmul params + 3·attention fwd.
    sparse=True: DSA (absorbed top-k main attention + indexer over all keys); False: dense MHA."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    if sparse:
        attn = attention_flops(cfg, mean_keys(context, cfg.index_topk), "absorbed") + \
            attention_flops(cfg, mean_keys(context), "indexer")
    else:
        attn = attention_flops(cfg, mean_keys(context), "dense")
    matmul = 6 * matmul_params(cfg, include_mtp)
    return dict(matmul=matmul, attention=3 * layers * attn, total=matmul + 3 * layers * attn)


def dsa_cost(cfg: ModelConfig, context: int) -> dict:
    """Attention FLOPs of the token at position N (per layer, forward), DSA against dense, for prefill/training
    (dense = expanded MHA form) and decode (dense = absorbed MLA over the cache)."""
    N, k = context, min(context, cfg.index_topk)
    main, idx = attention_flops(cfg, k, "absorbed"), attention_flops(cfg, N, "indexer")
    dense_mha, dense_abs = attention_flops(cfg, N, "dense"), attention_flops(cfg, N, "absorbed")
    # bytes of cache a decode step reads per layer: dense MLA reads every latent + rope key; DSA's indexer reads every
    # indexer key (its O(N) scan), then the main attention only the k selected latents (arXiv 2602.15763 §2.1)
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    read_dense, read_dsa = N * latent, N * cfg.index_head_dim + k * latent
    return dict(dsa_main=main, dsa_indexer=idx, dsa=main + idx, dense_mha=dense_mha, dense_absorbed=dense_abs,
                ratio_prefill=(main + idx) / dense_mha, ratio_decode=(main + idx) / dense_abs,
                train_ratio=train_flops_per_token(cfg, N, True)["attention"] / train_flops_per_token(cfg, N, False)["attention"],
                kv_read_values_dense=read_dense, kv_read_values_dsa=read_dsa, kv_read_ratio=read_dsa / read_dense,
                kv_stored_ratio=(latent + cfg.index_head_dim) / latent)


def decode_flops_per_token(cfg: ModelConfig, context: int, sparse: bool = True) -> dict:
    """Forward FLOPs of one decode step at position N, whole model: 2·matmul params + every layer's attention
    (dense: absorbed MLA over all N latents; DSA: top-k absorbed attention + the indexer over all N keys)."""
    d = dsa_cost(cfg, context)
    attn = cfg.num_hidden_layers * (d["dsa"] if sparse else d["dense_absorbed"])
    matmul = 2 * matmul_params(cfg)
    return dict(matmul=matmul, attention=attn, total=matmul + attn)


def dsa_saving(cfg: ModelConfig, context: int) -> dict:
    """Dense / DSA at context N (a saving factor: 2.0 = half the cost), for each thing one might mean by "attention
    compute and memory": attention FLOPs of the token at N (prefill) and averaged over a causal training sequence,
    whole training FLOPs per token, attention and whole-model FLOPs of a decode step, KV-cache values a decode step
    reads, and (below 1: DSA costs more) the KV cache stored."""
    d = dsa_cost(cfg, context)
    train = [train_flops_per_token(cfg, context, s)["total"] for s in (False, True)]
    dec = [decode_flops_per_token(cfg, context, s)["total"] for s in (False, True)]
    return dict(context=context, attention_prefill=1 / d["ratio_prefill"], attention_train_sequence=1 / d["train_ratio"],
                train_step=train[0] / train[1], attention_decode=1 / d["ratio_decode"], decode_step=dec[0] / dec[1],
                kv_read_decode=1 / d["kv_read_ratio"], kv_stored=1 / d["kv_stored_ratio"])


def context_for_saving(cfg: ModelConfig, target: float, key: str = "train_step", hi: int = 1 << 24) -> int:
    """The shortest context N at which dsa_saving(cfg, N)[key] reaches `target` (bisection; the savings grow with N
    beyond index_topk)."""
    lo = cfg.index_topk
    if dsa_saving(cfg, hi)[key] < target:
        raise ValueError(f"{key} never reaches {target}x below {hi:,} tokens")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dsa_saving(cfg, mid)[key] < target else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------- memory
def _routed_expert_params(cfg: ModelConfig, include_mtp: bool = False) -> int:
    layers = cfg.n_moe_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def weight_bytes(cfg: ModelConfig, dtype: str, include_mtp: bool = False, group_size: int = 128) -> float:
    """Bytes of the weights. int4 as slime's INT4 QAT for GLM-5 (GLM-5 §2.4.3): the routed
    experts only, symmetric, one bf16 scale per group of `group_size` weights (4 + 16/g bits each); every other
    weight stays bf16."""
    n = cfg.num_params(include_mtp=include_mtp)
    if dtype == "fp32":
        return 4 * n
    if dtype == "bf16":
        return 2 * n
    if dtype == "int4":
        if group_size < 1:
            raise ValueError(f"group_size={group_size}: must be >= 1 (GLM-5's recipe uses 32-128)")
        experts = _routed_expert_params(cfg, include_mtp)
        return experts * (4 + 16 / group_size) / 8 + 2 * (n - experts)
    raise ValueError(f"dtype={dtype!r}: use 'fp32', 'bf16' or 'int4'")


def adam_bytes(cfg: ModelConfig, include_mtp: bool = True) -> dict:
    """Mixed-precision Adam on the trainable parameters (router bias is a buffer, MTP trains too):
    fp32 m and v (8 B) + fp32 master weights (4 B); with bf16 weights and grads, 16 B/param in all."""
    n = cfg.num_params(include_mtp=include_mtp, count_router_bias=False)
    return dict(trainable=n, moments=8 * n, master=4 * n, states=12 * n, with_bf16_weights_grads=16 * n)


def kv_cache_bytes(cfg: ModelConfig, tokens: int = 1, bytes_per_value: int = 2) -> dict:
    """KV cache (DeepSeek-V2 §2.1.2). Compressed: per layer the MLA latent + shared rope key + the indexer key.
    Expanded: per-head K (d_qk) and V (d_v), as the HF transformers path caches them."""
    L, b = cfg.num_hidden_layers, bytes_per_value
    mla = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
    idx = L * cfg.index_head_dim * b
    expanded = L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * b
    return dict(mla=mla * tokens, indexer=idx * tokens, compressed=(mla + idx) * tokens, expanded=expanded * tokens)


# ---------------------------------------------------------------------------------------------- the 744B run on paper
@dataclass
class Layout:
    """A Megatron-style parallel layout; CLI flags are these names (--tp, --gpus-per-node, ...)."""
    tp: int = 8  # tensor parallel: attention, dense MLP, shared expert, head split tp ways (within a node)
    pp: int = 4  # pipeline stages: layers split contiguously; stage 0 holds the embedding, the last the head + MTP
    ep: int = 32  # expert parallel: routed experts of a layer spread over ep GPUs (expert TP = 1)
    dp: int = 4  # data parallel replicas; the distributed optimizer shards Adam states over them
    gpus_per_node: int = 8
    gpu_mem_gib: float = 141.0  # one H200
    micro_batch: int = 1  # sequences per micro-batch
    seq_len: int = 4096
    recompute: bool = True  # full per-layer activation recomputation

    @classmethod
    def single_gpu(cls, gpu_mem_gib: float = 24.0) -> "Layout":
        """The small presets' layout: one consumer GPU, no parallelism."""
        return cls(tp=1, pp=1, ep=1, dp=1, gpus_per_node=1, gpu_mem_gib=gpu_mem_gib)


def plan(cfg: ModelConfig, lay: Layout) -> dict:
    """Memory per GPU of the heaviest pipeline stage: an ESTIMATE. bf16 weights + fp32 grads + Adam (12 B/param)
    sharded over the data-parallel replicas of each weight; activations = the checkpointed layer inputs of the
    1F1B in-flight micro-batches + one layer's working set (listed below). Ignores communication buffers,
    fragmentation, and the CUDA context (budget ~10%)."""
    world = lay.tp * lay.pp * lay.dp
    for name in ("tp", "pp", "ep", "dp", "gpus_per_node", "micro_batch", "seq_len"):
        if getattr(lay, name) < 1:
            raise ValueError(f"Layout.{name}={getattr(lay, name)}: must be >= 1")
    if (lay.tp * lay.dp) % lay.ep:
        raise ValueError(f"Layout.ep={lay.ep} must divide tp·dp={lay.tp * lay.dp} (the GPUs of one pipeline stage)")
    if cfg.n_routed_experts % lay.ep:
        raise ValueError(f"Layout.ep={lay.ep} must divide n_routed_experts={cfg.n_routed_experts}")
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if lay.pp > cfg.num_hidden_layers:
        raise ValueError(f"Layout.pp={lay.pp} exceeds num_hidden_layers={cfg.num_hidden_layers}")
    c = cfg._counts()
    H, V = cfg.hidden_size, cfg.vocab_size
    moe_dense_part = c["attn"] + cfg.n_shared_experts * c["expert"] + c["router_w"]
    routed = cfg.n_routed_experts * c["expert"]
    per_layer = [(c["attn"] + c["dense_mlp"], 0) if not cfg.is_moe_layer(i) else (moe_dense_part, routed)
                 for i in range(cfg.num_hidden_layers)]
    mtp = [(moe_dense_part + 2 * H * H + 3 * H, routed)] * cfg.num_nextn_predict_layers
    bounds = [round(i * cfg.num_hidden_layers / lay.pp) for i in range(lay.pp + 1)]
    expert_replicas = lay.tp * lay.dp // lay.ep  # GPUs holding the same expert shard
    stages = []
    for s in range(lay.pp):
        layers = per_layer[bounds[s] : bounds[s + 1]] + (mtp if s == lay.pp - 1 else [])
        dense = sum(d for d, _ in layers) + (c["emb"] if s == 0 else 0) + ((c["head"] + H) if s == lay.pp - 1 else 0)
        experts = sum(e for _, e in layers)
        p_dense, p_exp = dense / lay.tp, experts / lay.ep
        weights = 2 * (p_dense + p_exp)
        grads = 4 * (p_dense + p_exp)
        optim = 12 * (p_dense / lay.dp + p_exp / expert_replicas)
        tokens = lay.micro_batch * lay.seq_len
        in_flight = lay.pp - s  # 1F1B: stage s holds pp - s micro-batches' activations
        work = _layer_working_bytes(cfg, tokens, lay.tp) + (4 * tokens * V / lay.tp if s == lay.pp - 1 else 0)
        if lay.recompute:
            acts = in_flight * len(layers) * tokens * H * 2 / lay.tp + work
        else:
            acts = in_flight * len(layers) * work
        stages.append(dict(stage=s, layers=len(layers), params=p_dense + p_exp, weights=weights, grads=grads,
                           optimizer=optim, activations=acts, total=weights + grads + optim + acts))
    worst = max(stages, key=lambda d: d["total"])
    return dict(world=world, nodes=math.ceil(world / lay.gpus_per_node), layers_with_mtp=n_layers,
                experts_per_gpu=cfg.n_routed_experts // lay.ep, stages=stages, worst=worst,
                fits=worst["total"] <= 0.9 * lay.gpu_mem_gib * GiB)


def _layer_working_bytes(cfg: ModelConfig, tokens: int, tp: int) -> float:
    """bf16 bytes saved for backward by one MoE layer (the largest), per micro-batch: q, k, v and the output
    per head (split tp ways), the latents, the indexer queries/keys, the sparse attention weights
    (h · index_topk per token), the routed tokens' copies through their experts (k · (H + 3·I)) and the
    shared expert. A rough count, not a profile."""
    h, k = cfg.num_attention_heads, cfg.num_experts_per_tok
    per_head = h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim + min(tokens, cfg.index_topk)) / tp
    latents = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim * (1 + cfg.index_n_heads / tp)
    moe = k * (cfg.hidden_size + 3 * cfg.moe_intermediate_size) + 3 * cfg.moe_intermediate_size * cfg.n_shared_experts
    return 2 * tokens * (per_head + latents + moe + 4 * cfg.hidden_size)


# ---------------------------------------------------------------------------------------------- report + CLI
def report(cfg: ModelConfig, context: int = 4096, layout: Layout | None = None, int4_group_size: int = 128) -> dict:
    """Every figure above for one config at one context, as a flat-ish dict (the notebook plots from it)."""
    if context < 1:
        raise ValueError(f"context={context}: must be >= 1 token")
    out = dict(params=param_counts(cfg),
               active=dict(with_embedding_head=active_params(cfg), without_embedding_head=active_params(cfg, False, False),
                           matmul=matmul_params(cfg)),
               train_flops_per_token=dict(dsa=train_flops_per_token(cfg, context, True),
                                          dense=train_flops_per_token(cfg, context, False),
                                          dsa_with_mtp=train_flops_per_token(cfg, context, True, include_mtp=True)),
               weights={d: weight_bytes(cfg, d, group_size=int4_group_size) for d in ("fp32", "bf16", "int4")},
               adam=adam_bytes(cfg),
               kv_per_token=kv_cache_bytes(cfg, 1), kv_at_context=kv_cache_bytes(cfg, context),
               dsa=dsa_cost(cfg, context), context=context)
    if layout is not None:
        out["plan"] = plan(cfg, layout)
    return out


def _b(n: float) -> str:
    """Human size: 1.23 GiB."""
    for unit, div in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def _n(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


# README's preset table: written from config.py's presets by `--write-readme`, checked equal by tests/test_scale.py
PRESETS_BEGIN = "<!-- presets: written by `python -m nanoglm5.scale --write-readme README.md` from config.py; do not edit by hand -->"
PRESETS_END = "<!-- /presets -->"
PRESET_USE = {"tiny": "CPU: the main job, tests, notebooks", "mini": "CPU benchmarks; a quick GPU run",
              "small": "one GPU (24 GB, bf16 with Adam)", "glm5_744b": "the real GLM-5 (zai-org/GLM-5 config.json)"}


def readme_presets() -> str:
    """The README block: each preset's exact parameters (HF convention: no MTP, router bias counted) and what one
    token touches, from config.py's counts."""
    rows = ["| preset | parameters | active per token | for |", "|---|---:|---:|---|"]
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        total, active = cfg.num_params(), active_params(cfg)
        rows.append(f"| `{name}` | {total:,} ({_n(total)}) | {active:,} ({_n(active)}) | {PRESET_USE.get(name, '')} |")
    return "\n".join([PRESETS_BEGIN, *rows, PRESETS_END])


def _replace_block(path, begin: str, end: str, body: str, what: str) -> None:
    """Replace the text from `begin` to `end` in the file at `path` with `body` (which carries both markers)."""
    path = Path(path)
    text = path.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path} has no {what} block ({begin!r} … {end!r}) to replace; add one")
    path.write_text(text[:i] + body + text[j + len(end):])


def write_readme_presets(readme) -> None:
    """Replace README's preset block (PRESETS_BEGIN … PRESETS_END) with readme_presets()."""
    _replace_block(readme, PRESETS_BEGIN, PRESETS_END, readme_presets(), "preset")


# docs/scaling.md's DSA-saving table: written by `--write-docs`, checked equal by tests/test_scale.py
SAVING_BEGIN = "<!-- dsa-saving: written by `python -m nanoglm5.scale --write-docs docs/scaling.md`; do not edit by hand -->"
SAVING_END = "<!-- /dsa-saving -->"
SAVING_CONTEXTS = (4096, 32768, 131072, 200000)
SAVING_ROWS = (("attention_prefill", "attention FLOPs, the token at N (prefill)"),
               ("attention_train_sequence", "attention FLOPs, mean over a causal training sequence of N"),
               ("train_step", "whole training FLOPs per token (6·matmul + attention)"),
               ("attention_decode", "attention FLOPs of a decode step (dense: absorbed MLA)"),
               ("decode_step", "whole decode step FLOPs (2·matmul + attention)"),
               ("kv_read_decode", "KV-cache values a decode step reads"),
               ("kv_stored", "KV cache stored (below 1: DSA stores more)"))


def docs_dsa_saving(name: str = "glm5_744b") -> str:
    """docs/scaling.md's block: dense/DSA saving factors of `name` at SAVING_CONTEXTS (dsa_saving), and the contexts
    where the whole-step savings reach the report's quoted 1.5× and 2×."""
    cfg = ModelConfig.preset(name)
    cols = [dsa_saving(cfg, n) for n in SAVING_CONTEXTS]
    rows = [f"| dense / DSA, `{name}` (index_topk {cfg.index_topk}) | " + " | ".join(f"N = {n:,}" for n in SAVING_CONTEXTS) + " |",
            "|---|" + "---:|" * len(SAVING_CONTEXTS)]
    rows += [f"| {label} | " + " | ".join(f"{c[key]:.2f}×" for c in cols) + " |" for key, label in SAVING_ROWS]
    reach = [f"{key.replace('_', ' ')} {t}× from N = {context_for_saving(cfg, t, key):,}"
             for key in ("train_step", "decode_step") for t in (1.5, 2.0)]
    return "\n".join([SAVING_BEGIN, *rows, "", "The whole-step savings reach the quoted range at: " + "; ".join(reach) + ".",
                      SAVING_END])


def format_report(name: str, r: dict, lay: Layout | None = None) -> str:
    p, a, f, d = r["params"], r["active"], r["train_flops_per_token"], r["dsa"]
    N = r["context"]
    lines = [
        f"== {name}: parameters (exact) ==",
        f"  total (emb + body + head, router bias counted) {p['total']:>22,}  ({_n(p['total'])})",
        f"  total without the router-bias buffers          {p['total_without_router_bias']:>22,}",
        f"  MTP layer(s)                                   {p['mtp']:>+22,}",
        f"  total with MTP                                 {p['total_with_mtp']:>22,}  ({_n(p['total_with_mtp'])})",
        f"  active per token, with embedding + head        {a['with_embedding_head']:>22,}  ({_n(a['with_embedding_head'])})",
        f"  active per token, without embedding + head     {a['without_embedding_head']:>22,}  ({_n(a['without_embedding_head'])})",
        f"  active matmul weights (6·N of the FLOPs)       {a['matmul']:>22,}",
        f"== training FLOPs per token at context N = {N:,} (causal mean; fwd+bwd = 3 × fwd) ==",
        f"  DSA   {_n(f['dsa']['total'])}FLOP  = 6·matmul {_n(f['dsa']['matmul'])} + attention {_n(f['dsa']['attention'])}"
        f"   (+MTP: {_n(f['dsa_with_mtp']['total'])})",
        f"  dense {_n(f['dense']['total'])}FLOP  = 6·matmul {_n(f['dense']['matmul'])} + attention {_n(f['dense']['attention'])}",
        "== DSA vs dense attention, token at position N, one layer, forward (index_topk k) ==",
        f"  DSA: main attention over min(N,k) keys {_n(d['dsa_main'])} + indexer over N keys {_n(d['dsa_indexer'])}",
        f"  prefill/training: dense MHA {_n(d['dense_mha'])} → DSA/dense = {d['ratio_prefill']:.3f}",
        f"  decode:           dense absorbed {_n(d['dense_absorbed'])} → DSA/dense = {d['ratio_decode']:.3f}",
        f"  whole training sequence (causal mean): DSA/dense attention FLOPs = {d['train_ratio']:.3f}",
        f"  decode KV bytes read per layer: dense {d['kv_read_values_dense']:,} values, DSA {d['kv_read_values_dsa']:,}"
        f" (indexer keys of all N + k latents) → DSA/dense = {d['kv_read_ratio']:.3f};"
        f" KV bytes stored DSA/dense = {d['kv_stored_ratio']:.3f} (the indexer key is cached too)",
        "== memory ==",
        "  weights (no MTP): " + ", ".join(f"{k} {_b(v)}" for k, v in r["weights"].items())
        + "   (int4: routed experts only, bf16 group scales)",
        f"  Adam (trainable {_n(r['adam']['trainable'])} incl. MTP): m+v fp32 {_b(r['adam']['moments'])} + fp32 master "
        f"{_b(r['adam']['master'])} = {_b(r['adam']['states'])}; with bf16 weights+grads {_b(r['adam']['with_bf16_weights_grads'])}",
        "== KV cache (bf16) ==",
        f"  per token: compressed (latent + rope key + indexer key) {r['kv_per_token']['compressed']:,} B"
        f" (MLA only {r['kv_per_token']['mla']:,} B) vs expanded per-head K/V {r['kv_per_token']['expanded']:,} B"
        f"  ({r['kv_per_token']['expanded'] / r['kv_per_token']['compressed']:.1f}×)",
        f"  at N = {N:,} tokens: compressed {_b(r['kv_at_context']['compressed'])} vs expanded {_b(r['kv_at_context']['expanded'])}",
    ]
    if "plan" in r and lay is not None:
        pl, w = r["plan"], r["plan"]["worst"]
        lines += [
            f"== the run on paper (ESTIMATE): tp={lay.tp} pp={lay.pp} ep={lay.ep} dp={lay.dp} → {pl['world']} GPUs,"
            f" {pl['nodes']} nodes of {lay.gpus_per_node} ==",
            f"  {pl['experts_per_gpu']} routed experts per GPU per layer; micro-batch {lay.micro_batch}×{lay.seq_len} tokens,"
            f" recompute={'full' if lay.recompute else 'off'}",
            f"  heaviest stage {w['stage']} ({w['layers']} layers, {_n(w['params'])} params/GPU): weights {_b(w['weights'])}"
            f" + fp32 grads {_b(w['grads'])} + Adam {_b(w['optimizer'])} + activations {_b(w['activations'])}",
            f"  = {_b(w['total'])} per GPU of {lay.gpu_mem_gib:g} GiB → {'fits' if pl['fits'] else 'does NOT fit'}"
            " (with 10% headroom)",
        ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Count and cost a nanoGLM5 preset (total/active params, FLOPs, memory, KV cache, DSA).")
    ap.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    ap.add_argument("--write-readme", metavar="README", help="rewrite README's preset table from config.py and exit")
    ap.add_argument("--write-docs", metavar="SCALING_MD", help="rewrite docs/scaling.md's DSA-saving table and exit")
    ap.add_argument("--context", type=int, default=4096, help="context length N in tokens")
    ap.add_argument("--int4-group-size", type=int, default=128)
    ap.add_argument("--meta", action="store_true", help="also build on the meta device and check numel == analytic")
    # Layout flags default to None: glm5_744b starts from Layout() (16 nodes), the others from one 24 GB GPU
    for f in fields(Layout):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(flag, type=type(f.default), default=None, help=f"default {f.default} for glm5_744b")
    args = ap.parse_args(argv)
    if args.write_readme:
        return write_readme_presets(args.write_readme)
    if args.write_docs:
        return _replace_block(args.write_docs, SAVING_BEGIN, SAVING_END, docs_dsa_saving(), "dsa-saving")
    if args.preset is None:
        ap.error("name a preset (" + ", ".join(sorted(PRESETS)) + ") or pass --write-readme README.md")
    cfg = ModelConfig.preset(args.preset)
    base = Layout() if args.preset == "glm5_744b" else Layout.single_gpu()
    given = {f.name: getattr(args, f.name) for f in fields(Layout) if getattr(args, f.name) is not None}
    lay = Layout(**{**base.__dict__, **given})
    try:
        r = report(cfg, args.context, layout=lay, int4_group_size=args.int4_group_size)
    except ValueError as e:
        ap.error(str(e))
    print(format_report(args.preset, r, lay))
    if args.meta:
        m = meta_count(cfg)
        ok = m == r["params"]
        print(f"== meta-device build: numel {m['total']:,} (+MTP {m['mtp']:,}) {'== analytic' if ok else '!= analytic: ' + str(m)}")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
