"""INT4 (nanoglm5/int4.py, quant.py and checkpoint.py's int4 format): quantizer convention, packing, STE,
QAT == packed bit for bit, convert/load round trips, byte counts, bad input, the torchao cross-check (notebook
05_int4 runs in tests/test_notebooks.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import require

from nanoglm5 import int4, quant
from nanoglm5.checkpoint import CheckpointError, load_hf, save_hf, save_int4
from nanoglm5.config import ModelConfig
from nanoglm5.data.tokenizer import MIN_VOCAB, Tokenizer
from nanoglm5.model import GLM5

# small config; dims 48 / 24 / 40 exercise groups that do not divide the input dim (padded last group)
CFG = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=96,
           num_attention_heads=2, q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2,
           index_n_heads=2, index_head_dim=16, index_topk=8, attention_bias=True)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return GLM5(ModelConfig(**{**CFG, **over})).eval()


def _ids(T=24, B=2, V=128):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- quantizer
def test_pack_unpack_every_value_and_order():
    q = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8)  # every pair, (256, 2)
    packed = int4.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert torch.equal(int4.unpack_int4(packed), q)
    # stated order: nibble = q + 8, even column in the low nibble
    assert int(int4.pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8))) == 0 | (15 << 4)
    assert int(int4.pack_int4(torch.tensor([[3, -1]], dtype=torch.int8))) == 11 | (7 << 4)
    odd = torch.arange(-8, 7, dtype=torch.int8).repeat(3, 1)  # 15 columns: padded with one nibble
    assert int4.pack_int4(odd).shape == (3, 8)
    assert torch.equal(int4.unpack_int4(int4.pack_int4(odd), 15), odd)
    assert int4.pack_int4(torch.zeros(4, 6, 10, dtype=torch.int8)).shape == (4, 6, 5)


@pytest.mark.parametrize("shape,g", [((16, 64), 32), ((8, 40), 16), ((3, 5, 96), 128), ((7, 33), 8), ((4, 10), 1)])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_quantize_error_bounded_by_half_scale(shape, g, scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3
    w[..., 0] = -w.abs().amax(-1)  # -amax: w/s = -7.5 up to float rounding → -8 (or -7), error s/2
    q, s = int4.quantize_int4(w, g, scale_dtype)
    K, G = shape[-1], -(-shape[-1] // g)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (*shape[:-1], G)
    assert s.dtype == int4.SCALE_DTYPES[scale_dtype]
    assert int(q.min()) >= -8 and int(q.max()) <= 7 and bool((q[..., 0] <= -7).all())
    w_hat = int4.dequantize_int4(q, s, g)
    s_each = s.float().repeat_interleave(g, -1)[..., :K]
    # no weight is clipped by more than s/2: w/s ∈ [-7.5, 7.5] and only (7, 7.5] clips (to 7)
    ulps = 4 * torch.finfo(torch.float32).eps * w.abs()  # float rounding of w·(1/s) and of w - ŵ
    assert bool(((w - w_hat).abs() <= s_each / 2 + ulps).all())
    assert torch.equal(int4.fake_quant_int4(w, g, scale_dtype), w_hat)


def test_scale_rule_and_zero_group():
    w = torch.tensor([[7.5, -3.0, 0.4, 7.1], [0.0, 0.0, 0.0, 0.0], [-7.5, 2.5, 3.5, 0.5]])
    q, s = int4.quantize_int4(w, 4)
    assert torch.equal(s[:, 0], torch.tensor([1.0, int4.SCALE_EPS, 1.0]))  # s = amax / 7.5, floored at eps
    # +amax clips to 7, -amax reaches -8; halves round to even
    assert q.tolist() == [[7, -3, 0, 7], [0, 0, 0, 0], [-8, 2, 4, 0]]


def test_ste_gradient_is_identity():
    torch.manual_seed(0)
    w = torch.randn(6, 64, requires_grad=True)
    c = torch.randn(6, 64)
    (int4.fake_quant_int4(w, 32) * c).sum().backward()
    assert torch.equal(w.grad, c)


# ---------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("g", [16, 32, 128])
def test_fake_quant_linear_equals_int4linear_bit_for_bit(g):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20, bias=True)
    x = torch.randn(5, 48)
    model = nn.Sequential(lin)
    lin.__class__ = int4.QATLinear  # what prepare_qat does
    lin.group_size, lin.scale_dtype = g, "float32"
    packed = int4.Int4Linear.from_linear(lin, g)
    assert torch.equal(lin.weight, packed.weight)
    assert torch.equal(model(x), packed(x))
    assert packed.weight_packed.dtype == torch.uint8 and packed.weight_packed.shape == (20, 24)


@pytest.mark.parametrize("layers,g", [("experts", 32), ("all_but_head", 16), ("linears", 128)])
def test_converted_logits_equal_qat_logits(layers, g, tmp_path):
    model = _model()
    ids = _ids()
    int4.prepare_qat(model, layers, g)
    with torch.no_grad():
        qat = model(ids).logits
        qat_dense = model(ids, sparse=False).logits
    # the QAT model saves as a plain full-precision checkpoint that loads anywhere
    save_hf(model, tmp_path / "qat", extra_files=int4.qat_extra_files(model))
    plain = load_hf(tmp_path / "qat")
    assert not any(isinstance(m, int4.QATLinear) for m in plain.modules())
    assert json.loads((tmp_path / "qat" / "qat_config.json").read_text())["group_size"] == g
    quant.convert_qat(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qat)
        assert torch.equal(model(ids, sparse=False).logits, qat_dense)
    # the packed checkpoint loads through checkpoint.load_hf and gives the same logits
    save_int4(model, tmp_path / "int4")
    loaded = load_hf(tmp_path / "int4")
    assert loaded.config.quantization_config["group_size"] == g
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qat)
    # and convert on the QAT checkpoint reproduces the recipe from qat_config.json
    quant.convert_checkpoint(tmp_path / "qat", tmp_path / "int4b")
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "int4b")(ids).logits, qat)


def test_ptq_cli_and_names(tmp_path):
    model = _model(seed=3)
    ids = _ids()
    save_hf(model, tmp_path / "fp")
    Tokenizer.train(["the cat sat on the mat"] * 4, vocab_size=MIN_VOCAB).save(tmp_path / "fp" / "tokenizer.json")
    r = subprocess.run([sys.executable, "-m", "nanoglm5.quant", "convert", "--checkpoint", str(tmp_path / "fp"),
                        "--out", str(tmp_path / "int4"), "--layers", "all_but_head", "--group-size", "32"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert "post-training quantization" in r.stdout
    assert (tmp_path / "int4" / "tokenizer.json").exists() and (tmp_path / "int4" / "tokenizer_config.json").exists()
    qc = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "nanoglm5_int4" and qc["bits"] == 4 and qc["symmetric"] and qc["source"] == "ptq"
    quant.ptq(model, "all_but_head", 32)
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "int4")(ids).logits, model(ids).logits)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "int4" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_a_proj.weight_packed" in names
    assert "model.layers.1.mlp.experts.gate_up_proj_packed" in names and "lm_head.weight" in names


def test_byte_counts():
    lin = int4.Int4Linear.from_linear(nn.Linear(64, 8, bias=False), 32)
    assert lin.weight_packed.numel() == 8 * 32 and lin.weight_scale.numel() == 8 * 2
    model = _model()
    fp = quant.weight_bytes(model)
    assert fp["int4_bytes"] == 0 and fp["total_bytes"] == 4 * sum(p.numel() for p in model.parameters()) + 4 * 2 * 4
    quant.ptq(model, "experts", 32, "bfloat16")
    wb = quant.weight_bytes(model)
    E, I, H = 4, 40, 64  # two MoE layers (one main, one MTP); down_proj: I=40 → 2 groups of 32 (padded)
    per_layer = E * 2 * I * (H // 2) + E * 2 * I * (H // 32) * 2 + E * H * (I // 2) + E * H * 2 * 2
    assert wb["int4_bytes"] == 2 * per_layer and wb["int4_weights"] == 2 * E * 3 * I * H
    assert wb["n_weights"] == fp["total_bytes"] // 4


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize_int4(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="layers"):
        int4.prepare_qat(_model(), "embeddings")
    with pytest.raises(ValueError, match="\\[-8, 7\\]"):
        int4.pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="tied"):
        int4.prepare_qat(_model(tie_word_embeddings=True), "linears")
    model = quant.ptq(_model(), "experts", 32)
    with pytest.raises(ValueError, match="already"):
        quant.ptq(model)
    with pytest.raises(ValueError, match="int4"):
        int4.prepare_qat(model)
    save_int4(model, tmp_path / "int4")
    with pytest.raises(ValueError, match="already an int4 checkpoint"):
        quant.convert_checkpoint(tmp_path / "int4", tmp_path / "again")
    # a config that does not match the tensors, or an unknown method, is refused when loading
    for edit, match in [({"group_size": 16}, "do not match quantization_config"),
                        ({"layers": "all_but_head"}, "do not match quantization_config"),
                        ({"quant_method": "gptq"}, "quant_method"), ({"bits": 8}, "bits")]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "int4", bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"].update(edit)
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            load_hf(bad)
    # converting a QAT checkpoint with another recipe would break bit-identity
    qat = int4.prepare_qat(_model(), "experts", 32)
    save_hf(qat, tmp_path / "qat", extra_files=int4.qat_extra_files(qat))
    with pytest.raises(ValueError, match="QAT-trained"):
        quant.convert_checkpoint(tmp_path / "qat", tmp_path / "x", int4.QuantConfig("experts", 64))


def test_recipe_from_train_config(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"stage": "sft", "qat": "int4", "qat_group_size": 64}))
    assert quant.read_qat_recipe(tmp_path) == int4.QuantConfig("experts", 64)
    (tmp_path / "train_config.json").write_text(json.dumps({"train": {"qat_config": {"layers": "linears", "group_size": 16}}}))
    assert quant.read_qat_recipe(tmp_path) == int4.QuantConfig("linears", 16)


# ---------------------------------------------------------------------------------------------- torchao
@pytest.mark.parametrize("g", [32, 128])
def test_matches_torchao_int4_weight_fake_quantizer(g):
    """Our fake-quant == torchao's IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=g,
    is_symmetric=True)), fp32 scales, on CPU, bit for bit."""
    qat = require("torchao.quantization.qat", "the cross-check of our int4 fake quantizer needs torchao "
                                              "(requirements-dev.txt pins it)")
    IntxFakeQuantizeConfig, IntxFakeQuantizer = qat.IntxFakeQuantizeConfig, qat.IntxFakeQuantizer
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1)
    w[3, :g] = 0.0  # an all-zero group: both clamp the scale at the smallest normal
    fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=g, is_symmetric=True))
    assert torch.equal(int4.fake_quant_int4(w, g), fq(w))
