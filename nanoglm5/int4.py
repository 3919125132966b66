"""INT4 weights: one quantizer for quantization-aware training, post-training quantization and packed
serving. GLM-5 (arXiv 2602.15763) §2.4.3 applies INT4 QAT in the SFT stage with "a quantization kernel
applicable to both training and offline weight quantization, which ensures bitwise-identical behavior between
training and inference"; this file is that kernel and the modules built on it.

Read top to bottom:
  1. the quantizer: `quantize_int4` → (q, scale), `dequantize_int4`, `fake_quant_int4` (straight-through
     estimator), `pack_int4` / `unpack_int4` (two values a byte);
  2. `QuantConfig`: which layers, group size, scale dtype (the recipe QAT records and convert reproduces),
     and `quant_targets(model, layers)`, the modules a recipe covers;
  3. QAT: `prepare_qat(model, layers, group_size)` re-classes the chosen nn.Linear layers (`QATLinear`) and
     the stacked MoE experts (`QATExperts`) so that every read of their weight is fake-quantized. Parameter
     names do not change, so `checkpoint.save_hf` of a QAT model writes plain full-precision tensors;
     `qat_extra_files(model)` saves the recipe beside it;
  4. packed modules: `Int4Linear`, `Int4Experts` (packed uint8 + scales, dequantized on the fly).
The int4 checkpoint format is in checkpoint.py (`save_int4`, `load_int4`); the recipes that produce packed
models (`ptq`, `convert_qat`) and the `python -m nanoglm5.quant convert` CLI are in quant.py.

The convention is torchao's SYMMETRIC int4 mapping (`IntxFakeQuantizeConfig(torch.int4, group_size=g)`):
for each group of g consecutive weights along the input (last) dim of one output row
    s = max(amax / 7.5, 2^-126)      q = clamp(round_half_even(w · (1/s)), -8, 7)      ŵ = q · s
so every w/s lies in [-7.5, 7.5]: -7.5 rounds to -8 (half to even), and only values in (7, 7.5]·s are clipped
(to 7), so |w - ŵ| <= s/2 for every weight, clipped or not (up to the float rounding of w · (1/s)). (slime uses amax/7 and [-7, 7], 15 levels; we keep 16.)
When g does not divide the input dim, the last group of each row is shorter: it is padded with zeros, which
leave its amax unchanged, and the padding is dropped again (slime pads the same way). Scales are fp32 by
default (torchao's default); `scale_dtype="bfloat16"` stores them in bf16, rounded UP so |w/s| <= 7.5 holds.

Packing: nibble = q + 8 (0..15, offset binary); byte = nibble[2j] | nibble[2j+1] << 4 (even column in the
LOW nibble, as torchao's Int4PlainInt32Tensor / mx pack_uint4); an odd last dim is padded with one q = 0.

Simplified: weight-only (activations stay full precision, W4A16); the STE passes the gradient unchanged
for every weight (slime's choice; torchao zeroes it for the few clipped ones); scales are recomputed from
the weight on every forward (torchao's `is_dynamic=True`), never learned; embeddings, norms and the router
always stay full precision.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoglm5.model import GLM5, Experts

QMIN, QMAX = -8, 7
SCALE_EPS = torch.finfo(torch.float32).smallest_normal  # torchao's eps for fp32/bf16 weights
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANT_METHOD = "nanoglm5_int4"


# ---------------------------------------------------------------------------------------------- 1. the quantizer
def _check_group_size(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer (e.g. 32, 64 or 128)")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., K) → (..., ceil(K/g), g), zero-padding the last group when g does not divide K."""
    K = x.shape[-1]
    n_groups = -(-K // group_size)
    x = F.pad(x, (0, n_groups * group_size - K))
    return x.view(*x.shape[:-1], n_groups, group_size)


def _round_scale(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """fp32 scales → the storage dtype. bf16 is rounded UP, so |w/s| <= 7.5 still holds."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r}: choose one of {sorted(SCALE_DTYPES)}")
    if scale_dtype == "float32":
        return s
    b = s.to(torch.bfloat16)
    return torch.where(b.float() < s, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: str = "float32"):
    """w (..., K) float → q (..., K) int8 in [-8, 7], scale (..., ceil(K/g)) in scale_dtype. Math in fp32."""
    _check_group_size(group_size)
    if not w.is_floating_point():
        raise TypeError(f"quantize_int4 expects a floating-point weight, got {w.dtype}")
    wg = _grouped(w.detach().float(), group_size)  # (..., G, g)
    amax = wg.abs().amax(-1)  # (..., G) == torchao's max(-min_neg, max_pos)
    scale = _round_scale((amax / ((QMAX - QMIN) / 2)).clamp(min=SCALE_EPS), scale_dtype)  # s = amax / 7.5
    q = torch.clamp(torch.round(wg * (1.0 / scale.float()[..., None])), QMIN, QMAX)  # same ops as torchao
    q = q.flatten(-2)[..., : w.shape[-1]].to(torch.int8)
    return q, scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (..., K) int8, scale (..., ceil(K/g)) → ŵ = q · s (..., K) in fp32."""
    _check_group_size(group_size)
    K = q.shape[-1]
    if scale.shape != (*q.shape[:-1], -(-K // group_size)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit q {tuple(q.shape)} with group_size={group_size}: "
                         f"expected {(*q.shape[:-1], -(-K // group_size))}")
    w = _grouped(q.float(), group_size) * scale.float()[..., None]  # (..., G, g)
    return w.flatten(-2)[..., :K]


def fake_quant_int4(w: torch.Tensor, group_size: int, scale_dtype: str = "float32") -> torch.Tensor:
    """Forward: dequantize(quantize(w)) in w's dtype. Backward: identity (straight-through estimator).
    Written `fq + (w - w.detach())` rather than `w + (fq - w).detach()`: the same gradient, but the value
    is fq exactly (x - x == 0 in floating point), which the bit-identity with Int4Linear needs."""
    fq = dequantize_int4(*quantize_int4(w, group_size, scale_dtype), group_size).to(w.dtype)
    return fq + (w - w.detach())


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., K) int8 in [-8, 7] → (..., ceil(K/2)) uint8: nibble = q + 8, even column in the low nibble."""
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4 expects integer values, got {q.dtype}")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"pack_int4: values must lie in [{QMIN}, {QMAX}], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1), value=8)  # one q = 0 pads an odd row
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(..., B) uint8 → q (..., n) int8; n defaults to 2·B (pass the original length for odd rows)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    n = 2 * packed.shape[-1] if n is None else n
    if not 2 * packed.shape[-1] - 1 <= n <= 2 * packed.shape[-1]:
        raise ValueError(f"unpack_int4: n={n} does not fit {packed.shape[-1]} bytes per row")
    u = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :n]  # lo, hi, lo, hi …
    return u.to(torch.int8) - 8


# ---------------------------------------------------------------------------------------------- 2. the recipe
LAYERS = {
    "experts": "the routed experts' stacked weights only (slime's recipe for MoE models)",
    "all_but_head": "experts + every nn.Linear except lm_head (attention, indexer, dense and shared MLPs, MTP)",
    "linears": "experts + every nn.Linear including lm_head",
}


@dataclass
class QuantConfig:
    layers: str = "experts"  # one of LAYERS; embeddings, norms and the router always stay full precision
    group_size: int = 32  # weights per scale along the input dim
    scale_dtype: str = "float32"  # or "bfloat16" (half the scale bytes)

    def __post_init__(self):
        if self.layers not in LAYERS:
            raise ValueError(f"layers={self.layers!r}: choose one of {sorted(LAYERS)}")
        _check_group_size(self.group_size)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}: choose one of {sorted(SCALE_DTYPES)}")

    def to_hf(self, source: str) -> dict:
        """The `quantization_config` of an int4 config.json."""
        return {"quant_method": QUANT_METHOD, "bits": 4, "symmetric": True, "group_size": self.group_size,
                "layers": self.layers, "scale_dtype": self.scale_dtype, "range": [QMIN, QMAX],
                "scale_rule": "amax/7.5", "packing": "uint8, nibble=q+8, even column in the low nibble",
                "source": source}

    @classmethod
    def from_hf(cls, d: dict, where: str = "quantization_config") -> "QuantConfig":
        if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD:
            got = d.get("quant_method") if isinstance(d, dict) else d
            raise ValueError(f"{where}: quant_method={got!r}; this loader reads {QUANT_METHOD!r} checkpoints "
                             "written by `python -m nanoglm5.quant convert`")
        if d.get("bits") != 4 or d.get("symmetric") is not True:
            raise ValueError(f"{where}: bits={d.get('bits')!r}, symmetric={d.get('symmetric')!r}; only "
                             "symmetric 4-bit is supported: re-run `python -m nanoglm5.quant convert`")
        try:
            return cls(d.get("layers"), d.get("group_size"), d.get("scale_dtype", "float32"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def quant_targets(model: GLM5, layers: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a recipe quantizes: Experts, and nn.Linear unless layers == "experts"."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            out.append((name, m))
        elif isinstance(m, (nn.Linear, Int4Linear)) and layers != "experts":
            if name == "lm_head" and layers != "linears":
                continue
            out.append((name, m))
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---------------------------------------------------------------------------------------------- 3. QAT
def _fake_quant_cached(module: nn.Module, name: str, w: torch.Tensor) -> torch.Tensor:
    """fake_quant_int4(w) for `module`; without autograd (decoding, evaluation, RL rollouts) the result is kept
    and reused until w changes: its version counter moves on every in-place write (optimizer steps, relay
    pulls, load_state_dict), its storage on reassignment. Same values, so the same logits bit for bit."""
    if torch.is_grad_enabled():  # training (or a graph through frozen weights): recompute, for the STE
        return fake_quant_int4(w, module.group_size, module.scale_dtype)
    key = (w._version, w.data_ptr(), w.dtype, w.device)
    cache = module.__dict__.setdefault("_fake_quant_cache", {})
    if name not in cache or cache[name][0] != key:
        with torch.no_grad():
            cache[name] = (key, fake_quant_int4(w, module.group_size, module.scale_dtype))
    return cache[name][1]


class QATLinear(nn.Linear):
    """nn.Linear whose `weight` reads fake-quantized (so `kv_b_proj.weight` in the absorbed attention sees
    it too); the Parameter itself still lives in `_parameters["weight"]`, so names and the optimizer's
    references do not change."""

    group_size: int
    scale_dtype: str
    fp32_tensors = ("weight",)  # the master weight stays fp32 in a bf16 copy (precision.cast_model): QAT rounds it

    @property
    def weight(self):
        return _fake_quant_cached(self, "weight", self.raw_weight)

    @property
    def raw_weight(self) -> nn.Parameter:
        p = self._parameters.get("weight")
        if p is None:
            raise AttributeError("QATLinear has no weight parameter")
        return p


class QATExperts(Experts):
    """Stacked experts whose weights() hook (what both dispatch paths read) returns fake-quantized tensors."""

    group_size: int
    scale_dtype: str
    fp32_tensors = ("gate_up_proj", "down_proj")  # fp32 masters in a bf16 copy, as QATLinear's

    def weights(self):
        return (_fake_quant_cached(self, "gate_up_proj", self.gate_up_proj),
                _fake_quant_cached(self, "down_proj", self.down_proj))


def prepare_qat(model: GLM5, layers: str = "experts", group_size: int = 32, scale_dtype: str = "float32") -> GLM5:
    """Make the chosen layers fake-quantize their weights on every forward (in place; returns the model).
    layers: "experts" | "all_but_head" | "linears" (see LAYERS). The recipe is kept in `model.qat_config`;
    save it beside the checkpoint with `extra_files=qat_extra_files(model)` so convert reproduces it."""
    qc = QuantConfig(layers, group_size, scale_dtype)
    if getattr(model, "qat_config", None) is not None:
        raise ValueError(f"the model is already prepared for QAT ({model.qat_config}); prepare it once")
    if is_packed(model):
        raise ValueError("the model already holds packed int4 weights; QAT needs a full-precision model "
                         "(load the checkpoint from before `convert`)")
    if layers == "linears" and model.config.tie_word_embeddings:
        raise ValueError("layers='linears' would quantize lm_head, which is tied to the embeddings here; "
                         "use layers='all_but_head'")
    for _, m in quant_targets(model, layers):
        m.__class__ = QATExperts if isinstance(m, Experts) else QATLinear  # re-class in place: same Parameters
        m.group_size, m.scale_dtype = group_size, scale_dtype
    model.qat_config = qc
    return model


def qat_extra_files(model: GLM5) -> dict:
    """{"qat_config.json": writer} for checkpoint.save_hf(..., extra_files=...); {} for a non-QAT model."""
    qc = getattr(model, "qat_config", None)
    if qc is None:
        return {}
    return {"qat_config.json": lambda p: Path(p).write_text(json.dumps(dataclasses.asdict(qc), indent=2))}

# ---------------------------------------------------------------------------------------------- 4. packed modules
class Int4Linear(nn.Module):
    """A Linear holding packed int4 weights (out, ceil(in/2)) uint8 + scales (out, ceil(in/g)); `weight`
    dequantizes on every read (forward, and kv_b_proj's absorbed form), which is where memory is saved."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 scale_dtype: str = "float32", device=None):
        super().__init__()
        _check_group_size(group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features // 2), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, -(-in_features // group_size),
                                                         dtype=SCALE_DTYPES[scale_dtype], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int, scale_dtype: str = "float32") -> "Int4Linear":
        w = lin.raw_weight if isinstance(lin, QATLinear) else lin.weight
        new = cls(lin.in_features, lin.out_features, group_size, lin.bias is not None, scale_dtype, device=w.device)
        q, s = quantize_int4(w, group_size, scale_dtype)
        new.weight_packed.copy_(pack_int4(q))
        new.weight_scale.copy_(s)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone())
        return new

    @property
    def weight(self) -> torch.Tensor:  # (out, in) fp32
        return dequantize_int4(unpack_int4(self.weight_packed, self.in_features), self.weight_scale, self.group_size)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4Experts(Experts):
    """Stacked experts as packed int4 + scales; weights() (the hook both dispatch paths read) dequantizes."""

    def __init__(self, n_experts: int, hidden: int, inter: int, group_size: int, scale_dtype: str = "float32",
                 device=None):
        nn.Module.__init__(self)  # no full-precision Parameters
        E, H, I, g = n_experts, hidden, inter, group_size
        self.hidden, self.inter, self.group_size = H, I, g
        sdt = SCALE_DTYPES[scale_dtype]
        self.register_buffer("gate_up_proj_packed", torch.zeros(E, 2 * I, -(-H // 2), dtype=torch.uint8, device=device))
        self.register_buffer("gate_up_proj_scale", torch.zeros(E, 2 * I, -(-H // g), dtype=sdt, device=device))
        self.register_buffer("down_proj_packed", torch.zeros(E, H, -(-I // 2), dtype=torch.uint8, device=device))
        self.register_buffer("down_proj_scale", torch.zeros(E, H, -(-I // g), dtype=sdt, device=device))
        # follows model.to(dtype), so the dequantized experts match the activations' dtype
        self.register_buffer("compute_dtype", torch.empty(0, device=device), persistent=False)

    @classmethod
    def from_experts(cls, ex: Experts, group_size: int, scale_dtype: str = "float32") -> "Int4Experts":
        E, twoI, H = ex.gate_up_proj.shape
        new = cls(E, H, twoI // 2, group_size, scale_dtype, device=ex.gate_up_proj.device)
        new.compute_dtype = torch.empty(0, dtype=ex.gate_up_proj.dtype, device=ex.gate_up_proj.device)
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_int4(getattr(ex, name), group_size, scale_dtype)
            getattr(new, f"{name}_packed").copy_(pack_int4(q))
            getattr(new, f"{name}_scale").copy_(s)
        return new

    def weights(self):
        g, dt = self.group_size, self.compute_dtype.dtype
        gate_up = dequantize_int4(unpack_int4(self.gate_up_proj_packed, self.hidden), self.gate_up_proj_scale, g)
        down = dequantize_int4(unpack_int4(self.down_proj_packed, self.inter), self.down_proj_scale, g)
        return gate_up.to(dt), down.to(dt)  # (E, 2I, H), (E, H, I)


def is_packed(model: GLM5) -> bool:
    """True for a model that already holds packed int4 weights (or says so in its config)."""
    return model.config.quantization_config is not None or \
        any(isinstance(m, (Int4Linear, Int4Experts)) for m in model.modules())
