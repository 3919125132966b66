"""What a run measures and where it goes.

  - `write_metrics`: the run's history as metrics.jsonl, one JSON object per logged step;
  - `init_wandb`: the one Weights & Biases setup of train.py and rl.py (online only when logged in);
  - `token_weighted_loss`: validation LM loss per target token, what train.py prints and the main job's
    report compares across checkpoints;
  - `unigram_entropy` (the loss to beat) and `bytes_per_token` (nats/token → bits per byte).
"""

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch


def write_metrics(out_dir: str | Path, history: list[dict]) -> None:
    (Path(out_dir) / "metrics.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")


def init_wandb(enabled: bool, project: str, out_dir: str | Path, config: dict,
               log: Callable[[str], None] | None = None):
    """A W&B run, or None when not enabled. Online when logged in (WANDB_API_KEY, or `wandb login`'s entry
    in ~/.netrc), offline otherwise; WANDB_MODE overrides both."""
    if not enabled:
        return None
    import wandb  # optional: needed only with --wandb

    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
    if log is not None:
        log(f"wandb {mode}")
    return wandb.init(project=project, config=config, mode=mode, dir=str(out_dir))


@torch.no_grad()
def token_weighted_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device=None,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, **forward) -> float:
    """Mean LM loss per target token over (inputs, targets) batches (targets -1 carry no loss): each
    batch's mean loss weighted by its loss-bearing tokens, so the figure does not depend on how the
    sequences are batched. `reduce` sums the (loss · tokens, tokens) pair over ranks; `forward` goes to
    the model (e.g. sparse=False). MTP is left out: this is the next-token loss only."""
    tot = torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        n = int((y >= 0).sum())
        if n == 0:
            continue
        if device is not None:
            x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x, y, mtp_weight=0.0, **forward)
        tot += torch.tensor([out.lm_loss.item() * n, n], dtype=torch.float64)
    if reduce is not None:
        reduce(tot)
    return (tot[0] / tot[1].clamp_min(1)).item()


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -Σ p(v) ln p(v) in nats over the shard's token frequencies: the loss of the best model that
    ignores context, the baseline a language model must beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bytes_per_token(tokens: np.ndarray, tokenizer, n: int = 100_000) -> float:
    """UTF-8 bytes per token on (a prefix of) a shard: converts nats/token to bits per byte."""
    ids = np.asarray(tokens[:n])
    return len(tokenizer.decode(ids.tolist()).encode("utf-8")) / max(1, len(ids))
