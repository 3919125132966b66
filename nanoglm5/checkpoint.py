"""Checkpoints: one format for every stage, and it is the HF one.

A checkpoint is a directory: config.json (HF `GlmMoeDsaConfig` keys), model.safetensors (or shards
+ model.safetensors.index.json), tokenizer.json with tokenizer_config.json (GLM's chat template, eos and pad) and
generation_config.json (stop ids, sampling defaults), and for resumable stages trainer_state.pt.
Tensor names are those of `GlmMoeDsaForCausalLM` with per-expert weights, as the real zai-org/GLM-5
checkpoint has them (`model.layers.L.mlp.experts.E.gate_proj.weight`), so
`transformers.AutoModelForCausalLM.from_pretrained` loads what `save_hf` writes and `load_hf`
reads what `save_pretrained` writes. The MTP layer is stored as layer `num_hidden_layers`
(`model.layers.78.*` for GLM-5: eh_proj, enorm, hnorm, shared_head.norm + a decoder layer), which
transformers ignores.

An int4 checkpoint is the same directory with packed tensors: config.json carries a `quantization_config`
(int4.py's QuantConfig), and each quantized weight is stored as `<name>_packed` (uint8, two values a byte) +
`<name>_scale`; `save_int4` writes it, `load_hf` sees the quantization_config and builds the packed model
(`load_int4`).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place,
so a crash mid-write never leaves a broken checkpoint under the final name.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import Tokenizer, hf_tokenizer_config
from nanoglm5.int4 import Int4Experts, Int4Linear, QuantConfig, quant_targets, set_module
from nanoglm5.model import GLM5, Experts, MTPLayer
from nanoglm5.precision import cast_model


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match the model."""


# ---------------------------------------------------------------------------------------------- names
def _mtp_prefix(cfg: ModelConfig, i: int) -> str:
    return f"model.layers.{cfg.num_hidden_layers + i}."


def hf_name(cfg: ModelConfig, name: str) -> str:
    """One of our tensor (or module) names → its HF name; stacked experts stay stacked (to_hf_state_dict splits),
    lm_head.weight is the caller's (it stays lm_head.weight, or is left out when tied)."""
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        rest = rest.replace("block.", "", 1).replace("shared_head_norm.", "shared_head.norm.")
        return _mtp_prefix(cfg, i) + rest
    return "model." + name


def to_hf_state_dict(model: GLM5) -> dict[str, torch.Tensor]:
    """Our state dict → HF names, stacked experts split per expert."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = t
            continue
        hf = hf_name(cfg, name)
        e = re.match(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)$", hf)
        if e:
            base, which = e.groups()
            inter = cfg.moe_intermediate_size
            for j in range(t.shape[0]):
                if which == "gate_up_proj":
                    out[f"{base}.{j}.gate_proj.weight"] = t[j, :inter]
                    out[f"{base}.{j}.up_proj.weight"] = t[j, inter:]
                else:
                    out[f"{base}.{j}.down_proj.weight"] = t[j]
        else:
            out[hf] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names → ours. Accepts per-expert weights (checkpoints) or stacked ones (in-memory HF layout)."""
    out, experts = {}, {}
    L = cfg.num_hidden_layers
    for name, t in sd.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        if not name.startswith("model."):
            raise CheckpointError(f"unexpected tensor {name!r}: GLM-5 checkpoints name every tensor 'model.*' or 'lm_head.weight'")
        rest = name[len("model."):]
        m = re.match(r"layers\.(\d+)\.(.*)", rest)
        if m and int(m.group(1)) >= L:  # the MTP layer(s)
            i, sub = int(m.group(1)) - L, m.group(2)
            if i >= cfg.num_nextn_predict_layers:
                continue
            if sub.startswith(("embed_tokens.", "shared_head.head.")):
                continue  # shared with the main model
            sub = sub.replace("shared_head.norm.", "shared_head_norm.")
            if not sub.startswith(("enorm.", "hnorm.", "eh_proj.", "shared_head_norm.")):
                sub = "block." + sub
            rest = f"mtp.{i}.{sub}"
        e = re.match(r"(.*mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if e:
            base, j, which = e.group(1), int(e.group(2)), e.group(3)
            experts.setdefault(base, {}).setdefault(which, {})[j] = t
        else:
            out[rest] = t
    for base, parts in experts.items():
        n = cfg.n_routed_experts
        for which in ("gate_proj", "up_proj", "down_proj"):
            missing = [j for j in range(n) if j not in parts.get(which, {})]
            if missing:
                raise CheckpointError(f"{base}: {which} missing for experts {missing[:8]}")
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][j], parts["up_proj"][j]], 0) for j in range(n)])
        out[f"{base}.down_proj"] = torch.stack([parts["down_proj"][j] for j in range(n)])
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------------------------------- atomic writes
def atomic_dir(path: str | Path):
    """Context manager: yields a temporary directory beside `path`; on success it replaces `path`."""
    return _AtomicDir(Path(path))


class _AtomicDir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = self.path.with_name(f".{self.path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)  # a crash between these two renames leaves `.old`; read_dir recovers it
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return False


def resolve_dir(path: str | Path) -> Path:
    """The checkpoint directory, recovering one whose final rename was interrupted."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            os.replace(old, path)
    return path


# ---------------------------------------------------------------------------------------------- save / load
def read_config(path: str | Path) -> ModelConfig:
    path = resolve_dir(path)
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{f} not found: {path} is not a checkpoint directory (expected config.json + model.safetensors)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt: re-save it or use an earlier one") from e
    try:
        return ModelConfig.from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}") from e


def save_hf(model: GLM5, path: str | Path, tokenizer=None, extra_files: dict | None = None,
            max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write `model` (and optionally a tokenizer and extra files) as an HF checkpoint directory, atomically.
    With a tokenizer (passed, or a tokenizer.json among extra_files) the directory also gets what other tools
    need to chat with it and to stop generating: tokenizer_config.json (chat template, eos/pad tokens),
    generation_config.json, and the tokenizer's eos/pad ids in config.json."""
    sd = to_hf_state_dict(model)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    with atomic_dir(path) as tmp:
        save_shards({k: v.detach().cpu() for k, v in sd.items()}, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        if (tmp / "tokenizer.json").exists():
            tok = tokenizer if tokenizer is not None else _read_tokenizer(tmp)
            cfg.update(token_ids(tok))  # the ids of the tokenizer saved beside the weights win over the preset's
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(hf_tokenizer_config(model.config.max_position_embeddings), indent=2))
            (tmp / "generation_config.json").write_text(
                json.dumps(generation_config(tok, model.config.max_position_embeddings), indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(path)


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except Exception as e:  # noqa: BLE001 — tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"the tokenizer.json to be saved with the checkpoint is not a tokenizer ({e}); copy "
                              "the one the model was trained with (data/tokenizer.json)") from e


def token_ids(tok: Tokenizer) -> dict:
    """config.json's special-token ids: generation ends at any of the tokens that end an assistant turn
    (`<|endoftext|>`, `<|user|>`, `<|observation|>`: GLM-5's eos_token_id list, config.py), pads with eos."""
    return {"eos_token_id": list(tok.stop_ids), "pad_token_id": tok.eos_id, "bos_token_id": None}


def generation_config(tok: Tokenizer, max_length: int) -> dict:
    """generation_config.json: the stop ids, and sampling defaults equal to our engine's (sampling.SamplingParams:
    temperature 1, no top-k, no top-p), so `model.generate` and vLLM sample as `serve.py` does by default."""
    return {**token_ids(tok), "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "max_length": max_length}


def save_shards(sd, path: Path, max_shard_bytes: int = 4 * 2**30):
    """HF's safetensors layout: one model.safetensors, or shards of at most max_shard_bytes and their index."""
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), with errors that name the file."""
    path = resolve_dir(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e})") from e
    else:
        raise CheckpointError(f"no model.safetensors (or index) in {path}: the checkpoint is incomplete; "
                              "re-run the stage that writes it or point at another checkpoint")
    sd = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f} is listed in the index but missing: the checkpoint is incomplete")
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e}); delete it and re-save, or resume from an earlier checkpoint") from e
    return sd


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GLM5:
    """Build a GLM5 from a checkpoint directory (ours, or transformers' save_pretrained of GlmMoeDsaForCausalLM)."""
    cfg = read_config(path)
    if cfg.quantization_config is not None:  # int4 checkpoints hold packed weights
        return load_int4(path, device=device)
    sd = from_hf_state_dict(load_state(path), cfg)
    with torch.device("meta"):
        model = GLM5(cfg)
    if cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in sd):
        # transformers' GlmMoeDsaForCausalLM neither builds nor saves the MTP layer: start it fresh
        print(f"[nanoglm5] {path}: no MTP weights in the checkpoint; the MTP layer starts freshly initialised")
        mtp = torch.nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i) for i in range(cfg.num_nextn_predict_layers))
        mtp.apply(model._init)
        sd.update({f"mtp.{k}": v for k, v in mtp.state_dict().items()})
    load_into(model, sd, path)
    # the routers stay fp32 (the bias is fp32 in the reference too): routing is computed in fp32
    return cast_model(model, device, dtype).eval()


def load_into(model: GLM5, sd: dict[str, torch.Tensor], path="checkpoint") -> None:
    """Load our-named tensors into a (possibly meta) model, with errors listing what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config: missing {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch (name, checkpoint, model): {bad[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- int4
def save_int4(model: GLM5, path: str | Path, tokenizer_src: str | Path | None = None) -> Path:
    """Write a packed model as a checkpoint directory (config.json with quantization_config, packed
    tensors + scales in safetensors, tokenizer.json copied from tokenizer_src). Names follow
    to_hf_state_dict: `model.layers.L.self_attn.q_a_proj.weight_packed` / `.weight_scale`,
    stacked experts as `model.layers.L.mlp.experts.gate_up_proj_packed` / `_scale` (E, 2I, ·),
    and a quantized head as `model.lm_head.weight_packed`."""
    if model.config.quantization_config is None:
        raise ValueError("save_int4 needs a packed model: run quant.ptq(model) or quant.convert_qat(model) first")
    extra = {}
    if tokenizer_src is not None and Path(tokenizer_src).exists():
        extra["tokenizer.json"] = lambda p: shutil.copyfile(tokenizer_src, p)
    return save_hf(model, path, extra_files=extra)


def load_int4(path: str | Path, device: str | torch.device = "cpu") -> GLM5:
    """Build the packed model an int4 checkpoint describes (load_hf dispatches here)."""
    cfg = read_config(path)
    if cfg.quantization_config is None:
        raise CheckpointError(f"{path} is not an int4 checkpoint (no quantization_config in config.json); "
                              "use checkpoint.load_hf")
    try:
        qc = QuantConfig.from_hf(cfg.quantization_config, f"{path}/config.json quantization_config")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    with torch.device("meta"):
        model = GLM5(cfg)
    for name, m in quant_targets(model, qc.layers):  # empty packed modules with the shapes the recipe implies
        if isinstance(m, Experts):
            E, twoI, H = m.gate_up_proj.shape
            new = Int4Experts(E, H, twoI // 2, qc.group_size, qc.scale_dtype, device="meta")
        else:
            new = Int4Linear(m.in_features, m.out_features, qc.group_size, m.bias is not None, qc.scale_dtype, device="meta")
        set_module(model, name, new)
    sd = from_hf_state_dict(load_state(path), cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{path}: the tensors do not match quantization_config (layers={qc.layers!r}, group_size={qc.group_size}, "
            f"scale_dtype={qc.scale_dtype!r}): missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape (name, file, expected) {bad[:3]}; the config was edited or the files come from another "
            "conversion: re-run `python -m nanoglm5.quant convert`")
    model.load_state_dict(sd, assign=True)
    if cfg.tie_word_embeddings and not isinstance(model.lm_head, Int4Linear):
        model.lm_head.weight = model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, Int4Experts):  # non-persistent, so still on meta
            m.compute_dtype = torch.empty(0, dtype=model.embed_tokens.weight.dtype)
    return model.to(device).eval()
