"""Optimizers and learning-rate schedules for pretraining, SFT and RL.

Holds: the parameter groups (which tensor gets which optimizer and weight decay), `build_optimizer`
for AdamW or Muon (PyTorch's own `torch.optim.Muon`, Keller Jordan's Newton–Schulz orthogonalised
momentum; "Muon is Scalable for LLM Training", Moonshot 2025, arXiv 2502.16982), the `Optimizers`
bundle that steps, saves and restores several optimizers as one, and `lr_multiplier` (linear warm-up,
then cosine or linear decay to a floor).

Groups (nanochat/modded-nanoGPT practice; GLM-5, arXiv 2602.15763, pre-trains with Muon):
  matrix   2D hidden weights (attention, dense MLP, shared expert, indexer, MTP eh_proj) → Muon or AdamW+wd
  expert   stacked routed-expert tensors (E, out, in) → AdamW+wd. `torch.optim.Muon` accepts only 2D
           parameters; orthogonalising each expert separately needs a 3D-aware Muon, left as an exercise.
  embed    token embedding and lm_head → AdamW, no weight decay
  router   MoE router weights → AdamW, no weight decay (the routing bias is a buffer moved by the sign
           rule, model.update_router_bias, and is never handed to an optimizer)
  vector   norms and biases → AdamW, no weight decay
"""

import math

import torch


def param_groups(model: torch.nn.Module, params=None) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Split (name, parameter) pairs into the groups above. `params`: restrict to this subset."""
    keep = None if params is None else {id(p) for p in params}
    groups = {"matrix": [], "expert": [], "embed": [], "router": [], "vector": []}
    for name, p in model.named_parameters():
        if keep is not None and id(p) not in keep:
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            groups["embed"].append((name, p))
        elif name.endswith("mlp.gate.weight"):
            groups["router"].append((name, p))
        elif p.ndim == 3:
            groups["expert"].append((name, p))
        elif p.ndim == 2:
            groups["matrix"].append((name, p))
        else:
            groups["vector"].append((name, p))
    return groups


class Optimizers:
    """Several torch optimizers stepped, zeroed, saved and restored as one. Each param group carries
    `base_lr`, so a schedule sets lr = base_lr × multiplier for every group at once."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for g in self.param_groups:
            g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_lr(self, multiplier: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * multiplier

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "kinds": [type(o).__name__ for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        kinds = [type(o).__name__ for o in self.optimizers]
        if state.get("kinds") != kinds:
            raise ValueError(f"optimizer state holds {state.get('kinds')}, this run builds {kinds}; "
                             "resume with the same --optimizer")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def build_optimizer(model: torch.nn.Module, name: str = "adamw", lr: float = 3e-3, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), params=None, muon_momentum: float = 0.95) -> Optimizers:
    """AdamW over every group, or Muon over the 2D `matrix` group + AdamW over the rest.
    Muon uses adjust_lr_fn="match_rms_adamw" (Moonshot: 0.2·sqrt(max(A,B)) scaling), so one lr serves both."""
    if name not in ("adamw", "muon"):
        raise ValueError(f"optimizer={name!r}: choose 'adamw' or 'muon'")
    g = param_groups(model, params)
    decay = [p for _, p in g["matrix"] + g["expert"]]
    no_decay = [p for _, p in g["embed"] + g["router"] + g["vector"]]
    opts = []
    if name == "muon" and g["matrix"]:
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}: "
                             "upgrade torch or use --optimizer adamw")
        opts.append(torch.optim.Muon([p for _, p in g["matrix"]], lr=lr, weight_decay=weight_decay,
                                     momentum=muon_momentum, adjust_lr_fn="match_rms_adamw"))
        decay = [p for _, p in g["expert"]]
    adam_groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if adam_groups:
        opts.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=1e-8))
    return Optimizers(opts)


def lr_multiplier(step: int, total: int, warmup: int = 0, decay: str = "cosine", min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then decay to `min_ratio` at `total`:
    cosine: min + (1-min)·(1+cos(π·t))/2; linear: 1 - (1-min)·t; constant: 1 (t = progress after warm-up)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if decay == "linear":
        return 1 - (1 - min_ratio) * t
    raise ValueError(f"decay={decay!r}: choose 'cosine', 'linear' or 'constant'")
