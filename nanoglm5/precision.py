"""Casting a model to bf16 while keeping in fp32 what the code computes in fp32 (the routers; QAT's masters)."""

import torch
from torch import nn


def cast_model(model: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """model.to(device, dtype), in place, keeping in fp32 what the code computes in fp32: each module's
    `fp32_tensors` (the routers' weight and bias; QAT's master weights, int4.py, so the fake quantizer
    rounds the learner's fp32 weights, not bf16 copies of them). The rollout workers, the engine, load_hf
    and bench/gpu.py cast with this. dtype None: model.to(device)."""
    if dtype is None:
        return model.to(device)
    keep = set()
    for m in model.modules():
        for name in getattr(m, "fp32_tensors", ()):
            t = m._parameters.get(name, m._buffers.get(name))  # the tensor itself (QATLinear.weight is a property)
            if t is not None:
                keep.add(id(t))
    for t in list(model.parameters()) + list(model.buffers()):
        to = (torch.float32 if id(t) in keep else dtype) if t.is_floating_point() else t.dtype
        t.data = t.data.to(device=device, dtype=to)
    return model
