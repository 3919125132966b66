"""Our int4 checkpoint in compressed-tensors' pack-quantized W4A16 format: what llm-compressor writes and vLLM
serves (symmetric, group-wise int4 weights, activations in 16 bits). No requantization: our q and s are rewritten.

    python -m nanoglm5.quant export-ct --checkpoint out/int4 --out out/int4_ct

Per quantized Linear `X` (HF names, experts split per expert as in every HF checkpoint):
  X.weight_packed  int32 (out, ceil(in·4/32)): element i of a row at bits 4i..4i+3 of the row's int32 stream,
                   as the unsigned nibble q + 8 (compressed_tensors.compressors.pack_quantized.pack_to_int32);
                   our uint8 packing (int4.pack_int4: even column in the low nibble) is the same stream, byte-wise;
  X.weight_scale   fp32 (out, in / group_size): our scales, fp32 so that decompression (q · s in the scale's
                   dtype) is exact for bf16 scales too;
  X.weight_shape   int64 [out, in].
config.json's quantization_config: quant_method "compressed-tensors", format "pack-quantized", one config group
(num_bits 4, type int, symmetric, strategy group, our group_size) whose targets are regexes over the quantized
module names; the router, embeddings and norms are no Linear it targets. Same quantizer as int4.py: ŵ = q · s
with q = clamp(round(w / s), -8, 7), which is compressed-tensors' symmetric int4 (zero point 0, range [-8, 7]).
Needs a group size that divides every quantized input dim (compressed-tensors has no short last group).
"""

import json
import re
import shutil
from pathlib import Path

import torch

from nanoglm5.checkpoint import (
    CheckpointError,
    atomic_dir,
    hf_name,
    load_int4,
    resolve_dir,
    save_shards,
    to_hf_state_dict,
)
from nanoglm5.int4 import Int4Experts, Int4Linear, QuantConfig, unpack_int4
from nanoglm5.model import GLM5

CT_FORMAT = "pack-quantized"
COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """q (..., K) int8 in [-8, 7] → (..., ceil(K/8)) int32: nibble q + 8, element i at bits 4(i mod 8) of word i // 8."""
    K = q.shape[-1]
    u = (q.to(torch.int64) + 8)
    u = torch.nn.functional.pad(u, (0, -K % 8))  # a short last word is padded with 0 bits, as compressed-tensors
    words = (u.unflatten(-1, (-1, 8)) << (4 * torch.arange(8))).sum(-1)  # (..., ceil(K/8)) in [0, 2^32)
    return (words - (words >= 2**31) * 2**32).to(torch.int32)  # the same 32 bits as a signed int32


def _entry(prefix: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight_packed": pack_int32(q).contiguous(), f"{prefix}.weight_scale": scale.float().contiguous(),
            f"{prefix}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}


def ct_tensors(model: GLM5) -> dict[str, torch.Tensor]:
    """The packed model's tensors in compressed-tensors' names and layout (HF names, per-expert Linears)."""
    cfg, g = model.config, model.config.quantization_config["group_size"]
    out = {k: v for k, v in to_hf_state_dict(model).items() if not k.endswith(("_packed", "_scale"))}
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            _check_divides(name, m.in_features, g)
            out.update(_entry("lm_head" if name == "lm_head" else hf_name(cfg, name),
                              unpack_int4(m.weight_packed, m.in_features), m.weight_scale))
        elif isinstance(m, Int4Experts):
            _check_divides(name, min(m.hidden, m.inter), g)
            base, I = hf_name(cfg, name), m.inter
            gu = unpack_int4(m.gate_up_proj_packed, m.hidden), m.gate_up_proj_scale  # (E, 2I, H), (E, 2I, H/g)
            down = unpack_int4(m.down_proj_packed, m.inter), m.down_proj_scale  # (E, H, I), (E, H, I/g)
            for j in range(gu[0].shape[0]):
                out.update(_entry(f"{base}.{j}.gate_proj", gu[0][j, :I], gu[1][j, :I]))
                out.update(_entry(f"{base}.{j}.up_proj", gu[0][j, I:], gu[1][j, I:]))
                out.update(_entry(f"{base}.{j}.down_proj", *(t[j] for t in down)))
    return out


def _check_divides(name: str, k: int, g: int) -> None:
    if k % g:
        raise ValueError(f"{name}: input dim {k} is not a multiple of group_size {g}; compressed-tensors' group "
                         "strategy has no short last group: re-quantize with a --group-size that divides it")


def targets(names: list[str], others: list[str]) -> list[str]:
    """Regexes over the quantized module names (layer and expert indices generalised), none matching `others`."""
    pats = sorted({"re:^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) + "$" for n in names})
    clash = [o for o in others if any(re.match(p[3:], o) for p in pats)]
    return pats if not clash else sorted(names)  # a pattern would catch a full-precision Linear: list them all


def ct_quantization_config(group_size: int, tensors: dict[str, torch.Tensor]) -> dict:
    quantized = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    others = sorted(k[: -len(".weight")] for k in tensors if k.endswith(".weight"))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": targets(quantized, others), "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": CT_FORMAT}},
            "ignore": [] if "lm_head" in quantized else ["lm_head"], "kv_cache_scheme": None}


def export_ct(checkpoint: str | Path, out: str | Path) -> dict:
    """An int4 checkpoint directory (quant.py convert/ptq) → a compressed-tensors one. Returns a summary."""
    src = resolve_dir(checkpoint)
    model = load_int4(src)
    qc = QuantConfig.from_hf(model.config.quantization_config, f"{src}/config.json quantization_config")
    tensors = ct_tensors(model)
    n = sum(k.endswith(".weight_packed") for k in tensors)
    if n == 0:
        raise CheckpointError(f"{src} holds no packed Linear to export")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = ct_quantization_config(qc.group_size, tensors)
    with atomic_dir(out) as tmp:
        save_shards(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in COPIED:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
    return {"out": str(out), "quantized_linears": n, "group_size": qc.group_size}
