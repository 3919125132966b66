"""ModelConfig: every GLM-5 architecture knob, named as the HF `GlmMoeDsaConfig` keys.

Holds: the presets table (tiny → glm5_744b), validation with errors that name the field and the fix,
round-trip to and from an HF `config.json` dict, and exact parameter counting (the formulas of MLA,
DeepSeek-V2 §2.1; the DSA indexer, DeepSeek-V3.2 §2.1; MoE and MTP, DeepSeek-V3 §2.1-2.2), which
`scale.py` and the meta-device test check against `numel`.
"""

import dataclasses
from dataclasses import dataclass, field, fields

# One screen from a laptop to the real model: each preset is a handful of overrides of the
# defaults below, which are the tiny model. `glm5_744b` is zai-org/GLM-5's config.json (GLM-5, arXiv 2602.15763).
PRESETS: dict[str, dict] = {
    # Sizes: 2.1M parameters here, exactly in README's table (python -m nanoglm5.scale --write-readme README.md).
    # Trains at useful speed on a 2-core CPU; index_topk 32 ≪ seq 256, so DSA is really sparse.
    "tiny": dict(),
    # 15M parameters: a bigger CPU config for benchmarks ("mid-size"), or a quick GPU run.
    "mini": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=6, first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
        index_n_heads=4, index_head_dim=32, index_topk=128, max_position_embeddings=2048,
    ),
    # 0.3B total / 0.1B active: one consumer GPU (24 GB) trains it in bf16 with Adam.
    "small": dict(
        vocab_size=32768, hidden_size=768, num_hidden_layers=12, first_k_dense_replace=1,
        num_attention_heads=12, num_key_value_heads=12, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2048,
        moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=4,
        index_n_heads=8, index_head_dim=64, index_topk=512, max_position_embeddings=4096,
    ),
    # The real GLM-5 (HF GlmMoeDsaConfig defaults, zai-org/GLM-5 config.json).
    "glm5_744b": dict(
        vocab_size=154880, hidden_size=6144, num_hidden_layers=78, first_k_dense_replace=3,
        num_attention_heads=64, num_key_value_heads=64, q_lora_rank=2048, kv_lora_rank=512,
        qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, intermediate_size=12288,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=1, topk_group=1, routed_scaling_factor=2.5, index_n_heads=32, index_head_dim=128,
        index_topk=2048, rope_theta=1e6, max_position_embeddings=202752, rms_norm_eps=1e-5,
        num_nextn_predict_layers=1, bos_token_id=None, eos_token_id=[154820, 154827, 154829],
        pad_token_id=154820,
    ),
}


@dataclass
class ModelConfig:
    # field names are the HF GlmMoeDsaConfig keys, so config.json round-trips without a mapping table
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1  # layers [0, k) use a dense SwiGLU MLP, the rest MoE
    intermediate_size: int = 384  # dense MLP width
    # MLA (DeepSeek-V2 §2.1): queries through a low-rank latent, keys/values from one shared latent
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # nominal under MLA (K/V come from the latent); kept for HF
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    attention_bias: bool = False
    # MoE (DeepSeek-V3 §2.1.2): sigmoid router, aux-loss-free bias, shared expert
    moe_intermediate_size: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # DSA lightning indexer (DeepSeek-V3.2 §2.1)
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 32
    # positions, norms, heads
    rope_theta: float = 1e6
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # MTP depth (GLM-5: 1 layer)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # INT4 checkpoints carry their quantization recipe here (None = full precision); see int4.py
    quantization_config: dict | None = field(default=None)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name, why, fix):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}; {fix}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type is int and (not isinstance(v, int) or isinstance(v, bool)):
                bad(f.name, "must be an integer", "pass an int")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                    "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) < 1:
                bad(name, "must be >= 1", "use a positive value")
        for name in ["n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]:
            if getattr(self, name) < 0:
                bad(name, "must be >= 0", "use 0 or more")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "RoPE rotates pairs of dimensions, so it must be even", "use an even size")
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"the indexer rotates its first qk_rope_head_dim={self.qk_rope_head_dim} dims",
                f"use index_head_dim >= {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"exceeds num_hidden_layers={self.num_hidden_layers}",
                f"use at most {self.num_hidden_layers}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-k exceeds n_routed_experts={self.n_routed_experts}",
                f"use num_experts_per_tok <= {self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}", "pick a divisor (GLM-5 uses 1)")
        if self.topk_group > self.n_group:
            bad("topk_group", f"exceeds n_group={self.n_group}", f"use topk_group <= {self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            bad("n_group", "group scores sum the top-2 experts of each group, so groups need >= 2 experts",
                "use fewer groups")
        if self.num_experts_per_tok > self.topk_group * per_group:
            bad("num_experts_per_tok", f"the {self.topk_group} kept groups hold only {self.topk_group * per_group} experts",
                "raise topk_group or lower num_experts_per_tok")
        if self.hidden_act != "silu":
            bad("hidden_act", "GLM-5 uses SwiGLU", "use 'silu'")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be positive", "GLM-5 uses 1e6")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be positive", "GLM-5 uses 1e-5")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rope_theta", "quantization_config")}
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        d["head_dim"] = self.qk_rope_head_dim  # HF names the RoPE slice head_dim
        d["architectures"] = ["GlmMoeDsaForCausalLM"]
        d["model_type"] = "glm_moe_dsa"
        d["rope_interleave"] = True
        d["indexer_rope_interleave"] = True
        d["scoring_func"] = "sigmoid"
        d["topk_method"] = "noaux_tc"
        d["moe_layer_freq"] = 1
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in d:
            kw["rope_theta"] = d["rope_theta"]
        elif "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError(f"rope_parameters={rope}: only plain RoPE (rope_type 'default') is implemented, as GLM-5 uses")
        if d.get("indexer_types") and any(t != "full" for t in d["indexer_types"]):
            raise ValueError("indexer_types: shared-indexer layers (GLM-5.2 IndexShare) are not implemented; "
                             "GLM-5 runs its own indexer in every layer")
        if "num_local_experts" in d and "n_routed_experts" not in d:
            kw["n_routed_experts"] = d["num_local_experts"]
        if d.get("mlp_layer_types") is not None:
            types = d["mlp_layer_types"]
            k = sum(1 for t in types if t == "dense")
            if types != ["dense"] * k + ["sparse"] * (len(types) - k):
                raise ValueError(f"mlp_layer_types={types}: only 'k dense layers, then MoE' is supported")
            kw["first_k_dense_replace"] = k
        return cls(**kw)

    # ------------------------------------------------------------------ parameter counting
    def _counts(self) -> dict:
        H, nh = self.hidden_size, self.num_attention_heads
        ql, kvl, dn, dr, dv = self.q_lora_rank, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        attn_bias = (ql + kvl + dr + H) if self.attention_bias else 0
        mla = H * ql + ql + ql * nh * (dn + dr) + H * (kvl + dr) + kvl + kvl * nh * (dn + dv) + nh * dv * H + attn_bias
        idx = ql * self.index_n_heads * self.index_head_dim + H * self.index_head_dim + 2 * self.index_head_dim \
            + H * self.index_n_heads
        expert = 3 * H * self.moe_intermediate_size
        E = self.n_routed_experts
        return dict(attn=mla + idx + 2 * H, dense_mlp=3 * H * self.intermediate_size, expert=expert,
                    router_w=E * H, router_b=E, emb=self.vocab_size * H,
                    head=0 if self.tie_word_embeddings else self.vocab_size * H)

    def num_params(self, include_mtp: bool = False, count_router_bias: bool = True) -> int:
        """Exact total parameters (HF GlmMoeDsaForCausalLM convention: embedding + head, no MTP)."""
        c = self._counts()
        rb = c["router_b"] if count_router_bias else 0
        moe = c["attn"] + (self.n_routed_experts + self.n_shared_experts) * c["expert"] + c["router_w"] + rb
        dense = c["attn"] + c["dense_mlp"]
        total = self.first_k_dense_replace * dense + self.n_moe_layers * moe + self.hidden_size + c["emb"] + c["head"]
        if include_mtp:
            total += self.num_nextn_predict_layers * self.mtp_params_per_layer(count_router_bias)
        return total

    def mtp_params_per_layer(self, count_router_bias: bool = True) -> int:
        """One MTP module: a MoE decoder layer + eh_proj (2H→H) + enorm, hnorm, shared_head norm."""
        c = self._counts()
        rb = c["router_b"] if count_router_bias else 0
        layer = c["attn"] + (self.n_routed_experts + self.n_shared_experts) * c["expert"] + c["router_w"] + rb
        return layer + 2 * self.hidden_size * self.hidden_size + 3 * self.hidden_size

    def num_active_params(self, include_embedding: bool = True, include_head: bool = True) -> int:
        """Parameters touched per token (top-k routed + shared experts), no MTP."""
        c = self._counts()
        moe = c["attn"] + (self.num_experts_per_tok + self.n_shared_experts) * c["expert"] + c["router_w"] + c["router_b"]
        dense = c["attn"] + c["dense_mlp"]
        body = self.first_k_dense_replace * dense + self.n_moe_layers * moe + self.hidden_size
        head = self.vocab_size * self.hidden_size if include_head else 0
        emb = c["emb"] if (include_embedding and not self.tie_word_embeddings) else 0
        return body + head + emb
