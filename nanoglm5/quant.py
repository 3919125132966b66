"""INT4 recipes and the conversion CLI: post-training quantization (`ptq`), packing a QAT-trained model
with its own recipe (`convert_qat`), the recipe a checkpoint was trained with (`read_qat_recipe`),
converting a checkpoint directory (`convert_checkpoint`), stored sizes (`weight_bytes`), and

    python -m nanoglm5.quant {convert,ptq} --checkpoint DIR --out DIR2 [--layers --group-size --scale-dtype]
    python -m nanoglm5.quant export-ct --checkpoint DIR2 --out DIR3    # compressed-tensors' format (ct_format.py)

GLM-5 (arXiv 2602.15763) §2.4.3 trains with INT4 QAT in the SFT stage and serves the packed weights: since
`convert_qat` packs with the same quantizer the fake-quant forward used (int4.py), the packed model's logits
equal the QAT model's bit for bit. `ptq` packs any full-precision model with that quantizer (the baseline).
The quantizer and the QAT and packed modules are in int4.py; the int4 checkpoint format in checkpoint.py.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from nanoglm5.checkpoint import CheckpointError, load_hf, read_config, save_int4
from nanoglm5.ct_format import export_ct
from nanoglm5.int4 import (
    LAYERS,
    SCALE_DTYPES,
    Int4Experts,
    Int4Linear,
    QuantConfig,
    is_packed,
    prepare_qat,
    quant_targets,
    set_module,
)
from nanoglm5.model import GLM5, Experts


# ---------------------------------------------------------------------------------------------- recipes
def read_qat_recipe(path: str | Path) -> QuantConfig | None:
    """The QAT recipe a checkpoint was trained with: qat_config.json, else train_config.json (in the directory
    or its parent)'s "qat_config" dict (or flat "qat": "int4" with optional "qat_layers" / "qat_group_size" /
    "qat_scale_dtype"); None if absent."""
    path = Path(path)
    if (path / "qat_config.json").exists():
        return QuantConfig(**json.loads((path / "qat_config.json").read_text()))
    found = [f for f in (path / "train_config.json", path.parent / "train_config.json") if f.exists()]
    if not found:  # train.py writes train_config.json beside its ckpt/ directory
        return None
    d = json.loads(found[0].read_text())
    for scope in [d] + [v for v in d.values() if isinstance(v, dict)]:
        if isinstance(scope.get("qat_config"), dict):
            return QuantConfig(**scope["qat_config"])
        if scope.get("qat") in ("int4", True):
            kw = {k: scope[f"qat_{k.replace('-', '_')}"] for k in ("layers", "group_size", "scale_dtype") if f"qat_{k}" in scope}
            return QuantConfig(**kw)
    return None


def _pack_model(model: GLM5, qc: QuantConfig, source: str) -> GLM5:
    for name, m in quant_targets(model, qc.layers):
        if isinstance(m, Experts):
            set_module(model, name, Int4Experts.from_experts(m, qc.group_size, qc.scale_dtype))
        else:
            set_module(model, name, Int4Linear.from_linear(m, qc.group_size, qc.scale_dtype))
    model.config = model.config.replace(quantization_config=qc.to_hf(source))
    if hasattr(model, "qat_config"):
        del model.qat_config
    return model


def _check_full_precision(model: GLM5) -> None:
    if is_packed(model):
        raise ValueError(f"the model is already int4 ({model.config.quantization_config}); quantize the "
                         "full-precision checkpoint it came from instead")


@torch.no_grad()
def ptq(model: GLM5, layers: str = "experts", group_size: int = 32, scale_dtype: str = "float32") -> GLM5:
    """Post-training quantization (in place): pack the chosen layers with the same quantizer QAT uses."""
    qc = QuantConfig(layers, group_size, scale_dtype)
    _check_full_precision(model)
    if getattr(model, "qat_config", None) is not None:
        raise ValueError("this model is QAT-prepared: use convert_qat(model) to pack it with its own recipe")
    if layers == "linears" and model.config.tie_word_embeddings:
        raise ValueError("layers='linears' would quantize lm_head, tied to the embeddings here; use 'all_but_head'")
    return _pack_model(model, qc, "ptq")


@torch.no_grad()
def convert_qat(model: GLM5) -> GLM5:
    """Pack a QAT-prepared model with its recipe: the packed weights dequantize to exactly what its
    fake-quant forward used (GLM-5 §2.4.3), so logits are equal too."""
    qc = getattr(model, "qat_config", None)
    if qc is None:
        raise ValueError("the model is not QAT-prepared (no model.qat_config): use ptq(model, ...) instead")
    _check_full_precision(model)
    return _pack_model(model, qc, "qat")


def weight_bytes(model: nn.Module) -> dict:
    """Stored bytes: int4 layers (packed + scales) and the rest; `int4_weights` = the weights they stand for."""
    seen, out = set(), {"int4_bytes": 0, "int4_weights": 0, "other_bytes": 0, "other_params": 0}
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int4Experts)):
            for name, b in m.named_buffers(recurse=False):
                if name != "compute_dtype":
                    out["int4_bytes"] += b.numel() * b.element_size()
            out["int4_weights"] += (m.in_features * m.out_features if isinstance(m, Int4Linear)
                                    else m.gate_up_proj_packed.shape[0] * 3 * m.inter * m.hidden)
            if isinstance(m, Int4Linear) and m.bias is not None:
                seen.add(id(m.bias))
                out["other_bytes"] += m.bias.numel() * m.bias.element_size()
                out["other_params"] += m.bias.numel()
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int4Experts)):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                out["other_bytes"] += t.numel() * t.element_size()
                out["other_params"] += t.numel()
    out["total_bytes"] = out["int4_bytes"] + out["other_bytes"]
    out["n_weights"] = out["int4_weights"] + out["other_params"]
    return out


# ---------------------------------------------------------------------------------------------- convert
def convert_checkpoint(checkpoint_dir: str | Path, out: str | Path, qc: QuantConfig | None = None,
                       mode: str = "convert") -> dict:
    """Checkpoint → int4 checkpoint. mode "convert": reproduce the QAT recipe found beside the checkpoint
    (PTQ with `qc` or the defaults when there is none); mode "ptq": ignore any recipe. Returns a summary."""
    cfg = read_config(checkpoint_dir)
    if cfg.quantization_config is not None:
        raise ValueError(f"{checkpoint_dir} is already an int4 checkpoint ({cfg.quantization_config.get('quant_method')}, "
                         f"group_size={cfg.quantization_config.get('group_size')}); convert the full-precision "
                         "checkpoint it came from")
    recipe = read_qat_recipe(checkpoint_dir) if mode == "convert" else None
    if recipe is not None and qc is not None and qc != recipe:
        raise ValueError(f"{checkpoint_dir} was QAT-trained with {recipe}, but {qc} was asked: converting with "
                         "another recipe loses the bit-identity with training; drop the flags (or use `ptq`)")
    model = load_hf(checkpoint_dir, device="cpu")
    if recipe is not None:
        print(f"[nanoglm5] QAT checkpoint: packing with its recipe {recipe}")
        model = convert_qat(prepare_qat(model, recipe.layers, recipe.group_size, recipe.scale_dtype))
    else:
        qc = qc or QuantConfig()
        print(f"[nanoglm5] {'no QAT recipe beside the checkpoint: ' if mode == 'convert' else ''}"
              f"post-training quantization (PTQ) with {qc}")
        model = ptq(model, qc.layers, qc.group_size, qc.scale_dtype)
    save_int4(model, out, tokenizer_src=Path(checkpoint_dir) / "tokenizer.json")
    wb = weight_bytes(model)
    return {"out": str(out), "source": model.config.quantization_config["source"], **wb}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanoglm5.quant", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, help in [("convert", "pack a checkpoint; reproduces its QAT recipe when it has one (else PTQ)"),
                      ("ptq", "post-training quantization of any full-precision checkpoint")]:
        s = sub.add_parser(cmd, help=help)
        s.add_argument("--checkpoint", required=True, help="full-precision checkpoint directory")
        s.add_argument("--out", required=True, help="where to write the int4 checkpoint directory")
        s.add_argument("--layers", choices=sorted(LAYERS), default=None, help="; ".join(f"{k}: {v}" for k, v in LAYERS.items()))
        s.add_argument("--group-size", type=int, default=None, help="weights per scale (default 32)")
        s.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default=None)
    s = sub.add_parser("export-ct", help="an int4 checkpoint in compressed-tensors' pack-quantized W4A16 format "
                                         "(transformers, vLLM, llm-compressor)")
    s.add_argument("--checkpoint", required=True, help="int4 checkpoint directory (written by convert or ptq)")
    s.add_argument("--out", required=True, help="where to write the compressed-tensors checkpoint directory")
    a = p.parse_args(argv)
    if a.cmd == "export-ct":
        return _export_ct(a.checkpoint, a.out)
    flags = {"layers": a.layers, "group_size": a.group_size, "scale_dtype": a.scale_dtype}
    try:  # flags given → that recipe (defaults for the rest); none → the checkpoint's QAT recipe, else defaults
        qc = QuantConfig(**{k: v for k, v in flags.items() if v is not None}) if any(v is not None for v in flags.values()) else None
        r = convert_checkpoint(a.checkpoint, a.out, qc, mode=a.cmd)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    ratio = r["int4_bytes"] / max(2 * r["int4_weights"], 1)
    print(f"wrote {r['out']} ({r['source']}): {r['int4_weights']:,} weights in int4 = {r['int4_bytes']:,} bytes "
          f"({ratio:.3f}x bf16), {r['other_params']:,} other params kept full precision; "
          f"total {r['total_bytes'] / 2**20:.2f} MiB")



def _export_ct(checkpoint: str, out: str) -> None:
    try:
        r = export_ct(checkpoint, out)
    except (ValueError, OSError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {r['out']}: {r['quantized_linears']:,} Linears as compressed-tensors pack-quantized int4 "
          f"(group size {r['group_size']})")


if __name__ == "__main__":
    main()
