"""Sampling: the distribution a token is drawn from, and the log-prob of the drawn token under it.

`SamplingParams` (temperature, top-k, top-p, a per-request seed, stop conditions, how many top log-probs to
report), `sampling_logprobs` (the transform: logits / T, then top-k, then top-p, renormalised) and `sample`.
The engine samples with these, speculative decoding transforms the draft and the target distributions with the
same `sampling_logprobs`, and RL's importance ratios rely on the log-probs being of exactly this distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever else is in the batch
    stop: list[str] = ()  # stop strings (need the engine's tokenizer); the completing token is kept
    stop_token_ids: list[int] = ()  # e.g. tokenizer.stop_ids; the stop token is kept in token_ids
    logprobs: int = 0  # top-n raw-model log-probs to report per token
    # top-n raw-model log-probs at every prompt token (and that token's own): what log-likelihood scoring reads
    # (lm-evaluation-harness through echo); None = off. Such a prompt is computed whole (no prefix-cache hit)
    prompt_logprobs: int | None = None


def sampling_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits (..., V) → log-probs (..., V) of the distribution we sample from: logits / T, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches top_p), renormalised. Removed tokens get -inf."""
    lg = logits.float() / p.temperature
    if 0 < p.top_k < lg.shape[-1]:
        kth = lg.topk(p.top_k, dim=-1).values[..., -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_lg, order = lg.sort(dim=-1, descending=True)
        probs = sorted_lg.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # mass before this token already reaches top_p
        lg = lg.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return lg.log_softmax(-1)


def draw(probs: torch.Tensor, gens: list) -> list[int]:
    """One token per row of probs (B, V) (non-negative, any sum), each row from its own generator: inverse CDF with
    one uniform per row (torch.multinomial draws V exponentials per row: ~20× the work at V = 1024)."""
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in gens])
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    V = probs.shape[-1]
    bad = (tok >= V) | (probs.gather(1, tok.clamp(max=V - 1)[:, None])[:, 0] <= 0)
    out = tok.tolist()
    if bool(bad.any()):  # u·sum rounded onto the end of the CDF (probability ~1e-7): draw that row exactly
        for b in bad.nonzero()[:, 0].tolist():
            out[b] = int(torch.multinomial(probs[b], 1, generator=gens[b]))
    return out


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> tuple[int, float]:
    """One token from logits (V,) → (token id, its log-prob under the sampled distribution; greedy: 0.0)."""
    if p.temperature == 0:
        return int(logits.argmax()), 0.0
    logp = sampling_logprobs(logits, p)
    tok = draw(logp.exp()[None], [gen])[0]
    return tok, float(logp[tok])
