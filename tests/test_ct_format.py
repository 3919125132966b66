"""ct_format.py: our int4 checkpoint in compressed-tensors' pack-quantized W4A16 format (what llm-compressor writes
and vLLM serves). The compressed-tensors library's own decompression of every exported Linear equals our dequantized
weight bit for bit, and its compression of that weight with our scales gives our packed words (one convention);
every other tensor is copied unchanged. transformers loads the export through its compressed-tensors integration:
its logits equal, bit for bit, transformers' on our dequantized weights saved in full precision, and our Int4Linear
model's within the parity tolerance of tests/test_model.py (1e-5: two implementations of the same fp32 model)."""

import dataclasses
import json

import pytest
import torch
from conftest import require

from nanoglm5.checkpoint import load_int4, load_state, save_hf, save_int4, to_hf_state_dict
from nanoglm5.config import ModelConfig
from nanoglm5.ct_format import pack_int32
from nanoglm5.int4 import Int4Experts, Int4Linear
from nanoglm5.model import GLM5
from nanoglm5.quant import main, ptq

WHY = "the check that our export is compressed-tensors' format (requirements-dev.txt)"


def _dequantized(packed: GLM5) -> GLM5:
    """The full-precision model whose weights are the packed model's dequantized ones (int4.py's ŵ = q · s)."""
    sd = {k: v for k, v in packed.state_dict().items() if not k.endswith(("_packed", "_scale"))}
    for name, m in packed.named_modules():
        if isinstance(m, Int4Linear):
            sd[f"{name}.weight"] = m.weight
        elif isinstance(m, Int4Experts):
            sd[f"{name}.gate_up_proj"], sd[f"{name}.down_proj"] = m.weights()
    fp = GLM5(dataclasses.replace(packed.config, quantization_config=None))
    fp.load_state_dict(sd)  # strict: every tensor accounted for
    return fp.eval()


def _export(tmp_path, layers: str, scale_dtype: str):
    torch.manual_seed(0)
    save_int4(ptq(GLM5(ModelConfig.preset("tiny")), layers, 32, scale_dtype), tmp_path / "int4")
    main(["export-ct", "--checkpoint", str(tmp_path / "int4"), "--out", str(tmp_path / "ct")])
    return load_int4(tmp_path / "int4"), tmp_path / "ct"


def test_pack_int32_is_the_nibble_stream_low_first():
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -3, 5]], dtype=torch.int8)  # 9 values: a second, padded word
    words = pack_int32(q)
    nibbles = [0, 15, 8, 9, 7, 10, 11, 5]
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert int(words[0, 0]) & 0xFFFFFFFF == sum(n << 4 * i for i, n in enumerate(nibbles))
    assert int(words[0, 1]) == 13  # 5 + 8, the padding bits 0


@pytest.mark.parametrize("layers,scale_dtype", [("experts", "float32"), ("linears", "bfloat16")])
def test_compressed_tensors_decompresses_our_weights_bit_for_bit(tmp_path, layers, scale_dtype):
    require("compressed_tensors", WHY)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    packed, ct = _export(tmp_path, layers, scale_dtype)
    qc = QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    assert qc.format == "pack-quantized" and qc.quant_method == "compressed-tensors"
    scheme = qc.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.symmetric and scheme.weights.group_size == 32
    ref, got = to_hf_state_dict(_dequantized(packed)), load_state(ct)
    modules = sorted(k[: -len(".weight_packed")] for k in got if k.endswith(".weight_packed"))
    n_experts = sum(".experts." in m for m in modules)
    assert n_experts == 3 * ModelConfig.preset("tiny").n_routed_experts * 4  # 3 MoE layers + the MTP layer
    assert (len(modules) > n_experts) == (layers == "linears") and ("lm_head" in modules) == (layers == "linears")
    for m in modules:
        part = {n: got[f"{m}.{n}"] for n in ("weight_packed", "weight_scale", "weight_shape")}
        w = PackedQuantizationCompressor.decompress(part, scheme)["weight"]
        assert torch.equal(w, ref[f"{m}.weight"]), m
        again = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": part["weight_scale"]}, scheme)
        assert torch.equal(again["weight_packed"], part["weight_packed"]), m
    rest = {k for k in got if k.rsplit(".", 1)[0] not in modules}
    assert rest == {k for k in ref if k.rsplit(".", 1)[0] not in modules}
    assert all(torch.equal(got[k], ref[k]) for k in rest)


@pytest.mark.slow
def test_transformers_runs_the_export_with_our_logits(tmp_path):
    AutoModelForCausalLM = require("transformers", WHY).AutoModelForCausalLM
    require("compressed_tensors", WHY)
    packed, ct = _export(tmp_path, "linears", "float32")
    save_hf(_dequantized(packed), tmp_path / "fp")
    # 29 tokens ≤ index_topk 32: DSA keeps every key. At 40 tokens our model and transformers differ by 0.34 on these
    # weights, the full-precision dequantized model as much as the packed one (not an int4 matter: the DSA top-k on
    # them, left to the model's parity tests)
    x = torch.randint(0, packed.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        from_ct = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()(x).logits
        from_fp = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.float32).eval()(x).logits
        ours = packed(x).logits
    assert torch.equal(from_ct, from_fp)
    assert (from_ct - ours).abs().max().item() <= 1e-5


def test_a_group_size_that_does_not_divide_is_refused_with_the_fix(tmp_path, capsys):
    torch.manual_seed(0)
    save_int4(ptq(GLM5(ModelConfig.preset("tiny")), "experts", 48), tmp_path / "int4")  # 48 does not divide 64
    with pytest.raises(SystemExit, match="not a multiple of group_size 48.*--group-size"):
        main(["export-ct", "--checkpoint", str(tmp_path / "int4"), "--out", str(tmp_path / "ct")])
    assert not (tmp_path / "ct").exists()
